"""The agent's one frozen configuration, built once at the edge (YAML file + command-line flags), passed down.

The YAML file may also declare fake devices (`gpus`, `disks`) for kind and tests, and, for `--no-kube` mode,
the wanted models and jobs. Every mistake is reported with the field path (`disks[1].path is required`).
Format: docs/agent.md.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from kubeflash_api import SpecError, parse_quantity
from kubeflash_api.flashnode import parse_model_entry

DEFAULT_STORE = Path("/var/lib/kubeflash")
DEFAULT_LISTEN = "127.0.0.1:9477"
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m|h|)\s*$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ConfigError(ValueError):
    """A configuration mistake; the message names the field path and what is expected."""


@dataclass(frozen=True)
class GpuSpec:
    """A GPU declared in the config file (fake, or to override what NVML reports)."""

    index: int
    name: str = ""
    uuid: str = ""
    memory: int = 0  # bytes
    pci_bus_id: str = ""  # e.g. 0000:17:00.0; resolved in sysfs for pciRoot/numaNode when those are not given
    pci_root: str = ""
    numa_node: int | None = None


@dataclass(frozen=True)
class DiskSpec:
    """A store directory on one SSD: where models and job spaces live."""

    name: str
    path: Path
    device: str = ""  # block device name in sysfs (nvme0n1); found from the path's st_dev when empty
    pci_root: str = ""
    numa_node: int | None = None
    capacity: int = 0  # bytes; 0: the file system's size. A fake capacity also caps free space.
    reserve: int = 0  # bytes always left free


@dataclass(frozen=True)
class ModelWant:
    """A model that should be staged (FlashNode.spec.models entry, or the config in --no-kube mode)."""

    uri: str
    dtype: str = "float16"
    quantization: str = "none"
    disk: str = ""  # preferred disk name; a hint
    id: str = ""  # the id the operator computed; checked against ours, never used as a path
    tensor_parallel: int = 1  # > 1: shard k of N also staged on pair k's disk (agent/tpstaging.py)
    sparsity: tuple[float, ...] = ()  # targets the staging worker calibrates the model for (engine/autocalib.py)


@dataclass(frozen=True)
class JobWant:
    """A job whose directory should exist (a pod on this node, or the config in --no-kube mode)."""

    namespace: str
    name: str
    disk: str = ""
    quota: int = 0  # bytes; 0: the agent's default
    model_id: str = ""  # the model the job reads (marks it in use)
    uid: int | None = None  # owner of the job directory (the pod's runAsUser)
    gid: int | None = None
    running: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to know; nothing else is read from the environment later."""

    node_name: str
    disks: tuple[DiskSpec, ...]
    gpus: tuple[GpuSpec, ...] | None = None  # None: ask NVML
    kube: bool = True
    kubeconfig: str = ""  # empty: in-cluster config, else $KUBECONFIG / ~/.kube/config
    listen: str = DEFAULT_LISTEN  # host:port on loopback, unix:/path, or "none"
    interval: float = 10.0  # seconds between reconcile passes
    sysfs_root: Path = Path("/sys")
    state_dir: Path = DEFAULT_STORE  # lock, probe cache, status.json; default: the first disk's path
    allowed_roots: tuple[Path, ...] = ()  # local model sources must resolve under one of these
    allow_http: bool = False  # http(s) model sources: off unless the admin turns them on
    http_allow_hosts: tuple[str, ...] = ()  # httpSources.allowHosts; empty: any host (public addresses only)
    http_private_hosts: tuple[str, ...] = ()  # httpSources.privateHosts: may resolve to private/loopback addresses
    http_max_bytes: int = 200 << 30  # httpSources.maxBytes: the largest download
    allow_dummy: bool = True
    probe: bool = True
    reprobe: bool = False  # ignore the probe cache
    probe_bytes: int = 256 << 20
    probe_seconds: float = 2.0
    default_job_quota: int = 10 << 30  # InferenceJob spec.resources.kvDisk default
    kv_cache_budget: int = 20 << 30  # kvCache.budget: bytes the node's prefix KV cache may take; 0: no cache
    job_uid: int | None = 1000  # owner of a placed job's directory before its pod shows (the engine's user)
    job_gid: int | None = 1000
    retry_seconds: float = 300.0  # a Failed model is retried after this long
    models: tuple[ModelWant, ...] = ()  # --no-kube: wanted models
    jobs: tuple[JobWant, ...] = ()  # --no-kube: wanted job directories
    once: bool = False  # one reconcile pass (waiting for staging), then exit
    log_format: str = "json"
    log_level: str = "INFO"
    python: str = ""  # interpreter for worker subprocesses; empty: sys.executable

    def disk(self, name: str) -> DiskSpec | None:
        return next((d for d in self.disks if d.name == name), None)


# ------------------------------------------------------------------------------------------- parsing


def parse_bytes(value: Any, where: str) -> int:
    """A byte count: an integer or a Kubernetes quantity (`10Gi`, `500M`, `1e9`), by the API's one parser."""
    try:
        return parse_quantity(value, path=where)
    except SpecError as e:
        raise ConfigError(str(e)) from None


def parse_seconds(value: Any, where: str) -> float:
    """A duration: seconds as a number, or `500ms`, `10s`, `2m`, `1h`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(f"{where} must be a duration like 10s or 2m, got {value!r}")
    scale = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}[m.group(2)]
    return float(m.group(1)) * scale


def _opt_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]} is not a known field; expected one of {sorted(allowed)}")


def parse_gpu(raw: Any, where: str) -> GpuSpec:
    raw = _mapping(raw, where)
    _check_keys(raw, {"index", "name", "uuid", "memory", "pciBusId", "pciRoot", "numaNode"}, where)
    index = _opt_int(raw.get("index"), f"{where}.index")
    if index is None or index < 0:
        raise ConfigError(f"{where}.index is required (a GPU index >= 0)")
    return GpuSpec(index=index, name=str(raw.get("name", "")), uuid=str(raw.get("uuid", "")),
                   memory=parse_bytes(raw.get("memory", 0), f"{where}.memory"),
                   pci_bus_id=str(raw.get("pciBusId", "")), pci_root=str(raw.get("pciRoot", "")),
                   numa_node=_opt_int(raw.get("numaNode"), f"{where}.numaNode"))


def parse_disk(raw: Any, where: str, index: int) -> DiskSpec:
    raw = _mapping(raw, where)
    _check_keys(raw, {"name", "path", "device", "pciRoot", "numaNode", "capacity", "reserve"}, where)
    path = raw.get("path")
    if not path or not str(path).startswith("/"):
        raise ConfigError(f"{where}.path is required (an absolute directory path), got {path!r}")
    name = str(raw.get("name") or f"disk{index}")
    if not _NAME.match(name):
        raise ConfigError(f"{where}.name must be lowercase letters, digits and '-', got {name!r}")
    return DiskSpec(name=name, path=Path(path), device=str(raw.get("device", "")),
                    pci_root=str(raw.get("pciRoot", "")), numa_node=_opt_int(raw.get("numaNode"), f"{where}.numaNode"),
                    capacity=parse_bytes(raw.get("capacity", 0), f"{where}.capacity"),
                    reserve=parse_bytes(raw.get("reserve", 0), f"{where}.reserve"))


def parse_model(raw: Any, where: str) -> ModelWant:
    """A wanted model: a spec.models entry (its id checked) or a config entry (a uri string, or an object without
    an id), by the API's one parser (kubeflash_api.flashnode)."""
    if isinstance(raw, str):
        raw = {"uri": raw.strip()}
    raw = _mapping(raw, where)
    try:
        entry = parse_model_entry(raw, where, require_id=False)
    except SpecError as e:
        raise ConfigError(str(e)) from None
    return ModelWant(uri=entry.uri, dtype=entry.dtype, quantization=entry.quantization, disk=entry.disk,
                     id=entry.id, tensor_parallel=entry.tensor_parallel, sparsity=entry.sparsity)


def parse_job(raw: Any, where: str) -> JobWant:
    from kubeflash_node.store.ids import model_id

    raw = _mapping(raw, where)
    _check_keys(raw, {"namespace", "name", "disk", "quota", "model", "dtype", "uid", "gid"}, where)
    ns, name = raw.get("namespace") or "default", raw.get("name")
    for value, key in ((ns, "namespace"), (name, "name")):
        if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value):
            raise ConfigError(f"{where}.{key} must be a Kubernetes name, got {value!r}")
    model = raw.get("model") or ""
    mid = model_id(model, dtype=raw.get("dtype") or "float16") if model else ""
    return JobWant(namespace=ns, name=name, disk=str(raw.get("disk") or ""),
                   quota=parse_bytes(raw.get("quota", 0), f"{where}.quota"), model_id=mid,
                   uid=_opt_int(raw.get("uid"), f"{where}.uid"), gid=_opt_int(raw.get("gid"), f"{where}.gid"))


_TOP = {"nodeName", "kube", "kubeconfig", "listen", "interval", "sysfsRoot", "stateDir", "allowedSourceRoots",
        "allowHttp", "httpSources",
        "allowDummy", "probe", "defaultJobQuota", "kvCache", "jobOwner", "retryInterval", "gpus", "disks", "models",
        "jobs", "logFormat", "logLevel"}


def from_mapping(raw: Mapping[str, Any] | None, **overrides: Any) -> AgentConfig:
    """Build the config from the YAML document; keyword overrides (from flags) win where not None."""
    raw = _mapping(raw or {}, "config")
    _check_keys(raw, _TOP, "")
    disks = tuple(parse_disk(d, f"disks[{i}]", i) for i, d in enumerate(_list(raw.get("disks"), "disks")))
    if not disks:
        disks = (DiskSpec(name="disk0", path=DEFAULT_STORE),)
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise ConfigError(f"disks[].name must be unique, got {names}")
    gpus = None
    if "gpus" in raw:
        gpus = tuple(parse_gpu(g, f"gpus[{i}]") for i, g in enumerate(_list(raw["gpus"], "gpus")))
    probe = _mapping(raw.get("probe") or {}, "probe")
    _check_keys(probe, {"enabled", "maxBytes", "maxSeconds"}, "probe")
    listen = str(raw.get("listen", DEFAULT_LISTEN))
    owner = _mapping(raw.get("jobOwner") or {}, "jobOwner")
    hs = _mapping(raw.get("httpSources") or {}, "httpSources")
    _check_keys(hs, {"allowHosts", "privateHosts", "maxBytes"}, "httpSources")
    _check_keys(owner, {"uid", "gid"}, "jobOwner")
    kv_cache = _mapping(raw.get("kvCache") or {}, "kvCache")
    _check_keys(kv_cache, {"budget"}, "kvCache")
    cfg = AgentConfig(
        node_name=str(raw.get("nodeName") or ""),
        disks=disks,
        gpus=gpus,
        kube=bool(raw.get("kube", True)),
        kubeconfig=str(raw.get("kubeconfig") or ""),
        listen=listen,
        interval=parse_seconds(raw.get("interval", 10), "interval"),
        sysfs_root=Path(raw.get("sysfsRoot") or "/sys"),
        state_dir=Path(raw["stateDir"]) if raw.get("stateDir") else disks[0].path,
        allowed_roots=tuple(Path(p) for p in _list(raw.get("allowedSourceRoots"), "allowedSourceRoots")),
        allow_http=_bool(raw.get("allowHttp", False), "allowHttp"),
        http_allow_hosts=_hosts(hs.get("allowHosts"), "httpSources.allowHosts"),
        http_private_hosts=_hosts(hs.get("privateHosts"), "httpSources.privateHosts"),
        http_max_bytes=parse_bytes(hs.get("maxBytes", 200 << 30), "httpSources.maxBytes"),
        allow_dummy=bool(raw.get("allowDummy", True)),
        probe=bool(probe.get("enabled", True)),
        probe_bytes=parse_bytes(probe.get("maxBytes", 256 << 20), "probe.maxBytes"),
        probe_seconds=parse_seconds(probe.get("maxSeconds", 2), "probe.maxSeconds"),
        default_job_quota=parse_bytes(raw.get("defaultJobQuota", 10 << 30), "defaultJobQuota"),
        kv_cache_budget=parse_bytes(kv_cache.get("budget", 20 << 30), "kvCache.budget"),
        job_uid=_opt_int(owner.get("uid", 1000), "jobOwner.uid"),
        job_gid=_opt_int(owner.get("gid", 1000), "jobOwner.gid"),
        retry_seconds=parse_seconds(raw.get("retryInterval", 300), "retryInterval"),
        models=tuple(parse_model(m, f"models[{i}]") for i, m in enumerate(_list(raw.get("models"), "models"))),
        jobs=tuple(parse_job(j, f"jobs[{i}]") for i, j in enumerate(_list(raw.get("jobs"), "jobs"))),
        log_format=str(raw.get("logFormat", "json")),
        log_level=str(raw.get("logLevel", "INFO")).upper(),
    )
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if not cfg.node_name:
        cfg = replace(cfg, node_name=socket.gethostname().split(".")[0].lower())
    return validate(cfg)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _hosts(value: Any, where: str) -> tuple[str, ...]:
    """Host names, IP literals or `*.domain` patterns (no scheme, port or path)."""
    out = []
    for i, h in enumerate(_list(value, where)):
        if not isinstance(h, str) or not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?", h):
            raise ConfigError(f"{where}[{i}] must be a host name, an IP address or *.domain, got {h!r}")
        out.append(h.lower())
    return tuple(out)


def http_policy(cfg: AgentConfig) -> dict[str, Any]:
    """The download policy as the staging worker receives it (store.fetch.FetchPolicy's fields)."""
    return {"allowHosts": list(cfg.http_allow_hosts), "privateHosts": list(cfg.http_private_hosts),
            "maxBytes": cfg.http_max_bytes}


def validate(cfg: AgentConfig) -> AgentConfig:
    """Checks that need the whole config (the listen address, paths)."""
    check_listen(cfg.listen)
    for i, root in enumerate(cfg.allowed_roots):
        if not root.is_absolute():
            raise ConfigError(f"allowedSourceRoots[{i}] must be an absolute path, got {str(root)!r}")
    if cfg.log_format not in ("json", "text"):
        raise ConfigError(f"logFormat must be json or text, got {cfg.log_format!r}")
    if cfg.interval <= 0:
        raise ConfigError(f"interval must be positive, got {cfg.interval}")
    return cfg


def check_listen(listen: str) -> None:
    """The local API is never reachable from outside the node: loopback TCP or a Unix socket only."""
    if listen == "none" or listen.startswith("unix:/"):
        return
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost") or not port.isdigit():
        raise ConfigError(f"listen must be 127.0.0.1:PORT, [::1]:PORT, unix:/path or none, got {listen!r}")


def load(path: str | Path | None, **overrides: Any) -> AgentConfig:
    """Read the YAML config file (if any) and apply flag overrides."""
    import yaml

    raw: Mapping[str, Any] = {}
    if path:
        if Path(path).exists() and not Path(path).is_file():  # a named pipe would block the read
            raise ConfigError(f"{path}: cannot read the config file (not a regular file)")
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e}); expected a YAML config file") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return from_mapping(raw, **overrides)
