"""InferenceJob spec dicts -> frozen dataclasses, with errors that name the field path.

The CRD schema rejects most mistakes at apply time; this module is the second line (and the only one for
`kubeflash run` without a cluster): it checks what the schema cannot (URI forms, relative paths) and fills
the same defaults as the CRD, so both paths see one JobSpec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeflash_operator.fields import Reader, SpecError, parse_quantity

__all__ = ["JobSpec", "SpecError", "parse_job_spec", "parse_quantity"]

DTYPES = ("float16", "bfloat16", "float32")
QUANTIZATIONS = ("none", "int8", "int4")
COMPRESSIONS = ("none", "int8", "int4")
POLICIES = ("auto", "explicit")
DEFAULT_KV_DISK = "10Gi"
MAX_NAME = 56  # <name>-<attempt> stays a 63-character label value

_BUILTIN = re.compile(r"^builtin:[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSpec:
    uri: str
    dtype: str = "float16"
    quantization: str = "none"

    @property
    def id(self) -> str:
        """The path-safe id the agent stages this model under (docs/contract.md)."""
        from kubeflash_node.store.ids import model_id  # torch-free

        return model_id(self.uri, dtype=self.dtype, quantization=self.quantization)


@dataclass(frozen=True)
class ConfigMapKey:
    name: str
    key: str


@dataclass(frozen=True)
class Synthetic:
    """Generated token-id prompts, for tokenizer-free dummy: models and benchmarks."""

    count: int = 1
    prompt_length: int = 32


@dataclass(frozen=True)
class InputSpec:
    prompts: tuple[str, ...] = ()
    file: str | None = None  # JSONL path relative to the root of `pvc`
    config_map: ConfigMapKey | None = None
    pvc: str | None = None  # claim name
    synthetic: Synthetic | None = None


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResourcesSpec:
    gpus: int = 1
    gpu_memory: int | None = None  # bytes
    cpu_memory: int | None = None  # bytes
    kv_disk: int = 10 * 2**30  # bytes reserved on the paired SSD for the KV cache
    cpu_memory_quantity: str | None = None  # as written, for the pod's memory request


@dataclass(frozen=True)
class Split:
    """Percent of one kind of tensor kept on each tier."""

    gpu: int = 0
    cpu: int = 0
    disk: int = 0


@dataclass(frozen=True)
class OffloadSpec:
    policy: str = "auto"
    weights: Split | None = None
    kv: Split | None = None
    activations: Split | None = None
    kv_write_back: bool = False
    x_cache: bool = False
    cpu_attention: bool = False
    compression: str = "none"
    gpu_batch_size: int | None = None  # sequences per micro-batch
    num_gpu_batches: int | None = None  # micro-batches per block


@dataclass(frozen=True)
class OutputSpec:
    pvc: str | None = None  # claim name
    path: str = ""  # directory relative to the claim's root
    config_map: str | None = None


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    input: InputSpec
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    offload: OffloadSpec = field(default_factory=OffloadSpec)
    output: OutputSpec | None = None
    backoff_limit: int = 3
    image: str | None = None


# ---------------------------------------------------------------------------------------------- entry point


def parse_job_spec(spec: Mapping[str, Any], *, path: str = "spec") -> JobSpec:
    """Parse and check an InferenceJob spec; raises SpecError naming the first bad field."""
    r = Reader(spec, path)
    r.only("model", "input", "generation", "resources", "offload", "output", "backoffLimit", "image")
    output = r.sub("output", required=False)
    return JobSpec(
        model=_model(r.sub("model")),
        input=_input(r.sub("input")),
        generation=_generation(r.sub("generation", required=False)),
        resources=_resources(r.sub("resources", required=False)),
        offload=_offload(r.sub("offload", required=False)),
        output=_output(output) if output.present else None,
        backoff_limit=r.integer("backoffLimit", default=3, lo=0, hi=20),
        image=r.string("image", default=None),
    )


# ----------------------------------------------------------------------------------------------- sections


def _model(r: Reader) -> ModelSpec:
    r.only("uri", "dtype", "quantization")
    uri = r.string("uri")
    _check_uri(uri, f"{r.path}.uri")
    return ModelSpec(
        uri=uri,
        dtype=r.choice("dtype", DTYPES, default="float16"),
        quantization=r.choice("quantization", QUANTIZATIONS, default="none"),
    )


def _check_uri(uri: str, path: str) -> None:
    if uri != uri.strip() or any(c.isspace() for c in uri):
        raise SpecError(path, f"must not contain whitespace, got {uri!r}")
    if uri.startswith("builtin:"):
        if not _BUILTIN.match(uri):
            raise SpecError(path, f"must be builtin:<name> with a lowercase name, got {uri!r}")
    elif uri.startswith("dummy:"):
        if len(uri) == len("dummy:"):
            raise SpecError(path, "must name a config after dummy:, e.g. dummy:llama-7b")
    elif uri.startswith(("http://", "https://")):
        if not re.match(r"^https?://[^/?#]+", uri):
            raise SpecError(path, f"must name a host, got {uri!r}")
    elif uri.startswith("/"):
        if ".." in uri.split("/"):
            raise SpecError(path, f"must not contain '..', got {uri!r}")
    else:
        raise SpecError(
            path, f"must be builtin:<name>, dummy:<config>, http(s)://… or an absolute path, got {uri!r}"
        )


def _input(r: Reader) -> InputSpec:
    r.only("prompts", "file", "configMap", "pvc", "synthetic")
    given = [k for k in ("prompts", "file", "configMap", "synthetic") if r.has(k)]
    if len(given) != 1:
        raise SpecError(r.path, f"needs exactly one of prompts, file, configMap or synthetic, got {given or 'none'}")
    prompts = tuple(r.strings("prompts", min_items=1)) if r.has("prompts") else ()
    file = r.string("file", default=None)
    if file is not None:
        _check_relative(file, f"{r.path}.file")
    if file is not None and not r.has("pvc"):
        raise SpecError(f"{r.path}.pvc.claimName", "is required with file (the claim that holds the file)")
    if r.has("pvc") and file is None:
        raise SpecError(f"{r.path}.pvc", "is only used together with file")
    cm, pvc, syn = r.sub("configMap", required=False), r.sub("pvc", required=False), r.sub("synthetic", required=False)
    if syn.present:
        syn.only("count", "promptLength")
    return InputSpec(
        prompts=prompts,
        file=file,
        config_map=ConfigMapKey(cm.name("name"), cm.string("key")) if cm.present else None,
        pvc=pvc.name("claimName") if pvc.present else None,
        synthetic=Synthetic(syn.integer("count", default=1, lo=1, hi=100000),
                            syn.integer("promptLength", default=32, lo=1, hi=32768)) if syn.present else None,
    )


def _generation(r: Reader) -> GenerationSpec:
    r.only("maxNewTokens", "temperature", "topP", "seed", "stop")
    top_p = r.number("topP", default=1.0)
    if not 0.0 < top_p <= 1.0:
        raise SpecError(f"{r.path}.topP", f"must be in (0, 1], got {top_p:g}")
    return GenerationSpec(
        max_new_tokens=r.integer("maxNewTokens", default=32, lo=1, hi=32768),
        temperature=r.number("temperature", default=0.0, lo=0.0),
        top_p=top_p,
        seed=r.integer("seed", default=None, lo=0),
        stop=tuple(r.strings("stop", min_items=0)) if r.has("stop") else (),
    )


def _resources(r: Reader) -> ResourcesSpec:
    r.only("gpus", "gpuMemory", "cpuMemory", "kvDisk")
    return ResourcesSpec(
        gpus=r.integer("gpus", default=1, lo=1, hi=8),
        gpu_memory=r.quantity("gpuMemory"),
        cpu_memory=r.quantity("cpuMemory"),
        kv_disk=r.quantity("kvDisk", default=DEFAULT_KV_DISK),
        cpu_memory_quantity=str(r.get("cpuMemory")) if r.has("cpuMemory") else None,
    )


def _offload(r: Reader) -> OffloadSpec:
    r.only("policy", "weights", "kv", "activations", "kvWriteBack", "xCache", "cpuAttention", "compression",
           "gpuBatchSize", "numGpuBatches")
    policy = r.choice("policy", POLICIES, default="auto")
    splits = {k: _split(r.sub(k, required=False)) for k in ("weights", "kv", "activations")}
    given = [k for k, v in splits.items() if v is not None]
    if policy == "explicit" and len(given) != 3:
        missing = [k for k in splits if k not in given]
        raise SpecError(f"{r.path}.{missing[0]}", "is required when spec.offload.policy is explicit")
    if policy == "auto" and given:
        raise SpecError(f"{r.path}.{given[0]}", "needs spec.offload.policy: explicit")
    return OffloadSpec(
        policy=policy,
        weights=splits["weights"],
        kv=splits["kv"],
        activations=splits["activations"],
        kv_write_back=r.boolean("kvWriteBack"),
        x_cache=r.boolean("xCache"),
        cpu_attention=r.boolean("cpuAttention"),
        compression=r.choice("compression", COMPRESSIONS, default="none"),
        gpu_batch_size=r.integer("gpuBatchSize", default=None, lo=1, hi=4096),
        num_gpu_batches=r.integer("numGpuBatches", default=None, lo=1, hi=1024),
    )


def _split(r: Reader) -> Split | None:
    if not r.present:
        return None
    r.only("gpu", "cpu", "disk")
    split = Split(*(r.integer(k, default=0, lo=0, hi=100) for k in ("gpu", "cpu", "disk")))
    total = split.gpu + split.cpu + split.disk
    if total != 100:
        raise SpecError(r.path, f"gpu + cpu + disk must sum to 100, got {total}")
    return split


def _output(r: Reader) -> OutputSpec:
    r.only("pvc", "configMap")
    if r.has("pvc") == r.has("configMap"):
        raise SpecError(r.path, "needs exactly one of pvc or configMap")
    pvc, cm = r.sub("pvc", required=False), r.sub("configMap", required=False)
    if pvc.present:
        pvc.only("claimName", "path")
        path = pvc.string("path", default="")
        if path:
            _check_relative(path, f"{pvc.path}.path")
        return OutputSpec(pvc=pvc.name("claimName"), path=path)
    cm.only("name")
    return OutputSpec(config_map=cm.name("name"))


def _check_relative(path: str, where: str) -> None:
    if path.startswith("/") or ".." in path.split("/"):
        raise SpecError(where, f"must be a path relative to the claim's root without '..', got {path!r}")
