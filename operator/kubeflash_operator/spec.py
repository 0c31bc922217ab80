"""InferenceJob spec dicts -> frozen dataclasses, with errors that name the field path.

The CRD schema rejects most mistakes at apply time; this module is the second line (and the only one for
`kubeflash run` without a cluster): it checks what the schema cannot (URI forms, relative paths) and fills
the same defaults as the CRD, so both paths see one JobSpec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

DTYPES = ("float16", "bfloat16", "float32")
QUANTIZATIONS = ("none", "int8", "int4")
COMPRESSIONS = ("none", "int8", "int4")
POLICIES = ("auto", "explicit")
DEFAULT_KV_DISK = "10Gi"
MAX_NAME = 56  # <name>-<attempt> stays a 63-character label value

_QUANTITY = re.compile(r"^\+?(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[kMGTPE]|[eE]\+?[0-9]+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_BUILTIN = re.compile(r"^builtin:[a-z0-9][a-z0-9._-]*$")


class SpecError(ValueError):
    """A user's mistake in an InferenceJob spec; `path` is the offending field (spec.generation.topP)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path} {problem}")
        self.path = path
        self.problem = problem


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
class InputSpec:
    prompts: tuple[str, ...] = ()
    file: str | None = None  # JSONL path relative to the root of `pvc`
    config_map: ConfigMapKey | None = None
    pvc: str | None = None  # claim name


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 128
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
    r = _Reader(spec, path)
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


def parse_quantity(value: Any, *, path: str) -> int:
    """A Kubernetes quantity (10Gi, 1.5G, 1e9, 4096) as whole bytes, rounded up."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(path, f"must be a quantity such as 10Gi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SpecError(path, f"must not be negative, got {value}")
        return value
    m = _QUANTITY.match(value.strip())
    if not m:
        raise SpecError(path, f"must be a quantity such as 10Gi, got {value!r}")
    try:
        number = Decimal(m["num"])
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise SpecError(path, f"must be a quantity such as 10Gi, got {value!r}") from e
    suffix = m["suffix"] or ""
    if suffix[:1] in ("e", "E"):
        number *= Decimal(10) ** int(suffix[1:].lstrip("+"))
    else:
        number *= _BINARY.get(suffix) or _DECIMAL.get(suffix) or 1
    return int(math.ceil(number))


# ----------------------------------------------------------------------------------------------- sections


def _model(r: _Reader) -> ModelSpec:
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


def _input(r: _Reader) -> InputSpec:
    r.only("prompts", "file", "configMap", "pvc")
    given = [k for k in ("prompts", "file", "configMap") if r.has(k)]
    if len(given) != 1:
        raise SpecError(r.path, f"needs exactly one of prompts, file or configMap, got {given or 'none'}")
    prompts = tuple(r.strings("prompts", min_items=1)) if r.has("prompts") else ()
    file = r.string("file", default=None)
    if file is not None:
        _check_relative(file, f"{r.path}.file")
    if file is not None and not r.has("pvc"):
        raise SpecError(f"{r.path}.pvc.claimName", "is required with file (the claim that holds the file)")
    if r.has("pvc") and file is None:
        raise SpecError(f"{r.path}.pvc", "is only used together with file")
    cm = r.sub("configMap", required=False)
    pvc = r.sub("pvc", required=False)
    return InputSpec(
        prompts=prompts,
        file=file,
        config_map=ConfigMapKey(cm.name("name"), cm.string("key")) if cm.present else None,
        pvc=pvc.name("claimName") if pvc.present else None,
    )


def _generation(r: _Reader) -> GenerationSpec:
    r.only("maxNewTokens", "temperature", "topP", "seed", "stop")
    top_p = r.number("topP", default=1.0)
    if not 0.0 < top_p <= 1.0:
        raise SpecError(f"{r.path}.topP", f"must be in (0, 1], got {top_p:g}")
    return GenerationSpec(
        max_new_tokens=r.integer("maxNewTokens", default=128, lo=1, hi=32768),
        temperature=r.number("temperature", default=0.0, lo=0.0),
        top_p=top_p,
        seed=r.integer("seed", default=None, lo=0),
        stop=tuple(r.strings("stop", min_items=0)) if r.has("stop") else (),
    )


def _resources(r: _Reader) -> ResourcesSpec:
    r.only("gpus", "gpuMemory", "cpuMemory", "kvDisk")
    return ResourcesSpec(
        gpus=r.integer("gpus", default=1, lo=1, hi=8),
        gpu_memory=r.quantity("gpuMemory"),
        cpu_memory=r.quantity("cpuMemory"),
        kv_disk=r.quantity("kvDisk", default=DEFAULT_KV_DISK),
        cpu_memory_quantity=str(r.get("cpuMemory")) if r.has("cpuMemory") else None,
    )


def _offload(r: _Reader) -> OffloadSpec:
    r.only("policy", "weights", "kv", "activations", "kvWriteBack", "xCache", "cpuAttention", "compression")
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
    )


def _split(r: _Reader) -> Split | None:
    if not r.present:
        return None
    r.only("gpu", "cpu", "disk")
    split = Split(*(r.integer(k, default=0, lo=0, hi=100) for k in ("gpu", "cpu", "disk")))
    total = split.gpu + split.cpu + split.disk
    if total != 100:
        raise SpecError(r.path, f"gpu + cpu + disk must sum to 100, got {total}")
    return split


def _output(r: _Reader) -> OutputSpec:
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


# ------------------------------------------------------------------------------------------------ reader


class _Reader:
    """Typed access to one mapping of the spec; every error names `<path>.<key>`."""

    def __init__(self, data: Any, path: str, *, present: bool = True):
        if data is None:
            data, present = {}, False
        if not isinstance(data, Mapping):
            raise SpecError(path, f"must be an object, got {type(data).__name__}")
        self.data, self.path, self.present = data, path, present

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def only(self, *allowed: str) -> None:
        for key in self.data:
            if key not in allowed:
                raise SpecError(f"{self.path}.{key}", f"is not a known field (known: {', '.join(allowed)})")

    def sub(self, key: str, *, required: bool = True) -> _Reader:
        if required and not self.has(key):
            raise SpecError(f"{self.path}.{key}", "is required")
        return _Reader(self.get(key), f"{self.path}.{key}", present=self.has(key))

    def string(self, key: str, *, default: Any = ...) -> Any:
        value = self._value(key, default)
        if value is default and default is not ...:
            return default
        if not isinstance(value, str) or not value:
            raise SpecError(f"{self.path}.{key}", f"must be a non-empty string, got {value!r}")
        return value

    def name(self, key: str) -> str:
        value = self.string(key)
        if len(value) > 253 or not _K8S_NAME.match(value):
            raise SpecError(f"{self.path}.{key}", f"must be a Kubernetes object name, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, default: str) -> str:
        value = self._value(key, default)
        if value not in choices:
            raise SpecError(f"{self.path}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, key: str, *, default: Any = ..., lo: int | None = None, hi: int | None = None) -> Any:
        value = self._value(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{self.path}.{key}", f"must be an integer, got {value!r}")
        self._range(key, value, lo, hi)
        return value

    def number(self, key: str, *, default: float, lo: float | None = None) -> float:
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"{self.path}.{key}", f"must be a number, got {value!r}")
        self._range(key, value, lo, None)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._value(key, False)
        if not isinstance(value, bool):
            raise SpecError(f"{self.path}.{key}", f"must be true or false, got {value!r}")
        return value

    def quantity(self, key: str, *, default: Any = None) -> Any:
        value = self._value(key, default)
        return None if value is None else parse_quantity(value, path=f"{self.path}.{key}")

    def strings(self, key: str, *, min_items: int) -> list[str]:
        value = self.get(key)
        where = f"{self.path}.{key}"
        if not isinstance(value, list) or len(value) < min_items:
            raise SpecError(where, f"must be a list of at least {min_items} strings, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise SpecError(f"{where}[{i}]", f"must be a non-empty string, got {item!r}")
        return value

    def _value(self, key: str, default: Any) -> Any:
        value = self.get(key)
        if value is None:
            if default is ...:
                raise SpecError(f"{self.path}.{key}", "is required")
            return default
        return value

    def _range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
            raise SpecError(f"{self.path}.{key}", f"must be in {bounds}, got {value}")
