"""InferenceJob spec parsing into frozen dataclasses; every error names the field path and what was expected.

Torch-free: `kubeflash run` and the inference pod parse with it. The CRD schema (crds/) rejects most
malformed jobs at `kubectl apply` time; this parser gives the same answers on one machine with no cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

API_VERSION = "kubeflash.io/v1alpha1"
DTYPES = ("float16", "bfloat16", "float32")
QUANTIZATIONS = ("none", "int8", "int4")
TIERS = ("gpu", "cpu", "disk")


class SpecError(ValueError):
    """A manifest field is missing or has a bad value; the message starts with the field path."""


@dataclass(frozen=True)
class ModelSpec:
    uri: str
    dtype: str = "float16"
    quantization: str = "none"


@dataclass(frozen=True)
class Prompt:
    """One request: an id (custom_id) and either chat messages or a raw prompt."""

    id: str
    messages: tuple[dict, ...] | None = None
    text: str | None = None
    max_tokens: int | None = None
    token_ids: tuple[int, ...] | None = None  # synthetic prompts for tokenizer-free (dummy) models


@dataclass(frozen=True)
class InputSpec:
    prompts: tuple[Prompt, ...] = ()
    file: str | None = None


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Split:
    gpu: float = 0.0
    cpu: float = 0.0
    disk: float = 100.0


@dataclass(frozen=True)
class OffloadSpec:
    policy: str = "auto"  # auto | explicit
    weights: Split = Split()
    kv: Split = Split(gpu=100.0, disk=0.0)
    activations: Split = Split(gpu=100.0, disk=0.0)
    gpu_batch_size: int | None = None
    num_gpu_batches: int | None = None
    kv_write_back: bool = False
    x_cache: bool = False
    cpu_attention: bool = False
    compression: str = "none"


@dataclass(frozen=True)
class ResourcesSpec:
    kv_disk: int = 10 << 30  # bytes of the paired SSD the job's KV cache may take (spec.resources.kvDisk)
    gpu_memory: int | None = None  # bytes of GPU memory the engine may allocate (None: the whole GPU)
    cpu_memory: int | None = None  # bytes of host memory the plan may use (None: what the machine has free)


@dataclass(frozen=True)
class OutputSpec:
    path: str | None = None  # local file (kubeflash run), or a path inside the mounted output PVC
    pvc: str | None = None
    config_map: str | None = None


@dataclass(frozen=True)
class JobSpec:
    name: str
    namespace: str
    model: ModelSpec
    input: InputSpec
    generation: GenerationSpec = GenerationSpec()
    offload: OffloadSpec = OffloadSpec()
    output: OutputSpec = OutputSpec()
    resources: ResourcesSpec = ResourcesSpec()
    backoff_limit: int = 3
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers


def _obj(d, path: str) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SpecError(f"{path} must be a mapping, got {type(d).__name__}")
    return d


def _check_keys(d: dict, path: str, allowed: set[str]) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise SpecError(f"{path}.{unknown[0]} is not a known field; expected one of: {', '.join(sorted(allowed))}")


def _num(d: dict, key: str, path: str, default, *, kind=float, lo=None, hi=None, lo_open=False):
    v = d.get(key, default)
    p = f"{path}.{key}"
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise SpecError(f"{p} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    v = kind(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise SpecError(f"{p} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise SpecError(f"{p} must be <= {hi}, got {v}")
    return v


def _enum(d: dict, key: str, path: str, default: str, allowed) -> str:
    v = d.get(key, default)
    if v not in allowed:
        raise SpecError(f"{path}.{key} must be one of {', '.join(allowed)}, got {v!r}")
    return v


def _bool(d: dict, key: str, path: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise SpecError(f"{path}.{key} must be true or false, got {v!r}")
    return v


def _str(d: dict, key: str, path: str, default=None, *, required=False):
    v = d.get(key, default)
    if v is None and required:
        raise SpecError(f"{path}.{key} is required")
    if v is not None and (not isinstance(v, str) or not v.strip()):
        raise SpecError(f"{path}.{key} must be a non-empty string, got {v!r}")
    return v


# --------------------------------------------------------------------------------------------- sections


def parse_model(d, path="spec.model") -> ModelSpec:
    d = _obj(d, path)
    if not d:
        raise SpecError(f"{path} is required (e.g. model: {{uri: builtin:smollm2-135m}})")
    _check_keys(d, path, {"uri", "dtype", "quantization"})
    return ModelSpec(uri=_str(d, "uri", path, required=True), dtype=_enum(d, "dtype", path, "float16", DTYPES),
                     quantization=_enum(d, "quantization", path, "none", QUANTIZATIONS))


def parse_batch_line(line: str, where: str) -> Prompt:
    """One line of an OpenAI batch file: {custom_id, method, url, body{messages|prompt, max_tokens}}."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(req, dict):
        raise SpecError(f"{where}: expected a JSON object")
    cid = req.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise SpecError(f"{where}.custom_id is required (a non-empty string)")
    body = req.get("body")
    if not isinstance(body, dict):
        raise SpecError(f"{where}.body is required (an object with messages or prompt)")
    mt = _num(body, "max_tokens", f"{where}.body", None, kind=int, lo=1)
    if "messages" in body:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise SpecError(f"{where}.body.messages must be a non-empty list of {{role, content}} objects")
        return Prompt(id=cid, messages=tuple(msgs), max_tokens=mt)
    if isinstance(body.get("prompt"), str):
        return Prompt(id=cid, text=body["prompt"], max_tokens=mt)
    raise SpecError(f"{where}.body needs messages (chat) or prompt (completion)")


def read_batch_file(path: Path) -> tuple[Prompt, ...]:
    if not path.is_file():
        raise SpecError(f"spec.input.file: {path} does not exist")
    prompts, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            p = parse_batch_line(line, f"{path}:{n}")
            if p.id in seen:
                raise SpecError(f"{path}:{n}.custom_id {p.id!r} is used twice; ids must be unique")
            seen.add(p.id)
            prompts.append(p)
    if not prompts:
        raise SpecError(f"spec.input.file: {path} holds no requests")
    return tuple(prompts)


def parse_input(d, path="spec.input", base: Path | None = None) -> InputSpec:
    d = _obj(d, path)
    _check_keys(d, path, {"prompts", "file", "configMap", "pvc", "synthetic"})
    given = [k for k in ("prompts", "file", "configMap", "synthetic") if d.get(k) is not None]
    if len(given) != 1:
        raise SpecError(f"{path} needs exactly one of prompts, file, configMap or synthetic; got {given or 'none'}")
    if "prompts" in given:
        ps = d["prompts"]
        if not isinstance(ps, list) or not ps:
            raise SpecError(f"{path}.prompts must be a non-empty list of strings")
        out = []
        for i, p in enumerate(ps):
            if not isinstance(p, str) or not p.strip():
                raise SpecError(f"{path}.prompts[{i}] must be a non-empty string, got {p!r}")
            out.append(Prompt(id=f"prompt-{i}", messages=({"role": "user", "content": p},)))
        return InputSpec(prompts=tuple(out))
    if "synthetic" in given:
        s = _obj(d["synthetic"], f"{path}.synthetic")
        _check_keys(s, f"{path}.synthetic", {"count", "promptLength"})
        n = _num(s, "count", f"{path}.synthetic", 1, kind=int, lo=1)
        length = _num(s, "promptLength", f"{path}.synthetic", 32, kind=int, lo=1)
        return InputSpec(prompts=tuple(Prompt(id=f"synthetic-{i}", token_ids=tuple((7 * i + 13 * j) % 1000 + 3
                                                                                      for j in range(length)))
                                       for i in range(n)))
    if "configMap" in given:
        raise SpecError(f"{path}.configMap is read by the operator in a cluster; with kubeflash run use prompts or file")
    f = _str(d, "file", path)
    fp = Path(f)
    if not fp.is_absolute() and base is not None:
        fp = base / fp
    return InputSpec(prompts=read_batch_file(fp), file=str(fp))


def parse_generation(d, path="spec.generation") -> GenerationSpec:
    d = _obj(d, path)
    _check_keys(d, path, {"maxNewTokens", "temperature", "topP", "seed", "stop"})
    stop = d.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise SpecError(f"{path}.stop must be a list of non-empty strings, got {stop!r}")
    return GenerationSpec(
        max_new_tokens=_num(d, "maxNewTokens", path, 32, kind=int, lo=1, hi=32768),
        temperature=_num(d, "temperature", path, 0.0, lo=0),
        top_p=_num(d, "topP", path, 1.0, lo=0, hi=1, lo_open=True),
        seed=_num(d, "seed", path, 0, kind=int, lo=0),
        stop=tuple(stop),
    )


def _split(d, path: str, default: Split) -> Split:
    if d is None:
        return default
    d = _obj(d, path)
    _check_keys(d, path, set(TIERS))
    vals = {t: _num(d, t, path, 0, lo=0, hi=100) for t in TIERS}
    if abs(sum(vals.values()) - 100) > 1e-6:
        raise SpecError(f"{path}: gpu + cpu + disk must sum to 100, got {sum(vals.values()):g}")
    return Split(**vals)


def parse_offload(d, path="spec.offload") -> OffloadSpec:
    d = _obj(d, path)
    _check_keys(d, path, {"policy", "weights", "kv", "activations", "gpuBatchSize", "numGpuBatches",
                          "kvWriteBack", "xCache", "cpuAttention", "compression"})
    policy = _enum(d, "policy", path, "auto", ("auto", "explicit"))
    if policy == "auto" and any(k in d for k in ("weights", "kv", "activations")):
        raise SpecError(f"{path}.policy is auto, so weights/kv/activations must not be set (use policy: explicit)")
    return OffloadSpec(
        policy=policy, weights=_split(d.get("weights"), f"{path}.weights", Split()),
        kv=_split(d.get("kv"), f"{path}.kv", Split(gpu=100.0, disk=0.0)),
        activations=_split(d.get("activations"), f"{path}.activations", Split(gpu=100.0, disk=0.0)),
        gpu_batch_size=_num(d, "gpuBatchSize", path, None, kind=int, lo=1, hi=4096),
        num_gpu_batches=_num(d, "numGpuBatches", path, None, kind=int, lo=1, hi=1024),
        kv_write_back=_bool(d, "kvWriteBack", path, False), x_cache=_bool(d, "xCache", path, False),
        cpu_attention=_bool(d, "cpuAttention", path, False),
        compression=_enum(d, "compression", path, "none", QUANTIZATIONS),
    )


def parse_resources(d, path="spec.resources") -> ResourcesSpec:
    """What the engine enforces of spec.resources: the KV disk quota and the GPU and host memory budgets (the GPU
    count is the operator's)."""
    from .agent.config import ConfigError, parse_bytes  # torch-free

    d = _obj(d, path)
    _check_keys(d, path, {"gpus", "gpuMemory", "cpuMemory", "kvDisk"})

    def size(key: str):
        if d.get(key) is None:
            return None
        try:
            n = parse_bytes(d[key], f"{path}.{key}")
        except ConfigError as e:
            raise SpecError(str(e)) from None
        if n <= 0 and key != "kvDisk":
            raise SpecError(f"{path}.{key} must be more than 0, got {d[key]!r}")
        return n

    kv = size("kvDisk")
    return ResourcesSpec(kv_disk=ResourcesSpec.kv_disk if kv is None else kv, gpu_memory=size("gpuMemory"),
                         cpu_memory=size("cpuMemory"))


def parse_output(d, path="spec.output") -> OutputSpec:
    d = _obj(d, path)
    _check_keys(d, path, {"path", "pvc", "configMap"})
    pvc = _obj(d.get("pvc"), f"{path}.pvc")
    cm = _obj(d.get("configMap"), f"{path}.configMap")
    return OutputSpec(path=_str(d, "path", path) or _str(pvc, "path", f"{path}.pvc"),
                      pvc=_str(pvc, "claimName", f"{path}.pvc", required=bool(pvc)),
                      config_map=_str(cm, "name", f"{path}.configMap", required=bool(cm)))


def parse_job(doc, *, base: Path | None = None) -> JobSpec:
    """Parse a whole InferenceJob manifest (a dict from YAML)."""
    doc = _obj(doc, "manifest")
    if doc.get("apiVersion") != API_VERSION:
        raise SpecError(f"apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != "InferenceJob":
        raise SpecError(f"kind must be InferenceJob, got {doc.get('kind')!r}")
    meta = _obj(doc.get("metadata"), "metadata")
    name = _str(meta, "name", "metadata", required=True)
    spec = _obj(doc.get("spec"), "spec")
    if not spec:
        raise SpecError("spec is required")
    _check_keys(spec, "spec", {"model", "input", "generation", "resources", "offload", "output", "backoffLimit", "image"})
    return JobSpec(
        name=name, namespace=meta.get("namespace", "default"), model=parse_model(spec.get("model")),
        input=parse_input(spec.get("input"), base=base), generation=parse_generation(spec.get("generation")),
        offload=parse_offload(spec.get("offload")), output=parse_output(spec.get("output")),
        resources=parse_resources(spec.get("resources")),
        backoff_limit=_num(spec, "backoffLimit", "spec", 3, kind=int, lo=0, hi=20),
        extra={"image": spec.get("image")},
    )


def load_job(path: Path) -> JobSpec:
    """Read a manifest file (the first InferenceJob document in it)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such manifest file")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from e
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "InferenceJob"]
    if not jobs:
        raise SpecError(f"{path}: holds no InferenceJob (kind: InferenceJob)")
    return parse_job(jobs[0], base=path.parent)
