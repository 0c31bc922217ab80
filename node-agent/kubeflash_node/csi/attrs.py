"""What a NodePublishVolume asks for, parsed and checked: pure, no file system, unit-testable.

Volume attributes (the pod's `volumeAttributes` of a CSI inline volume):
  kubeflash.io/model-id  a staged model's id      -> model volume (read-only bind of models/<id>)
  kubeflash.io/kv-size   a size like 8Gi          -> KV volume (sized ext4 image, loop-mounted)
  kubeflash.io/job       the job's name           -> job volume (the job's directory on the store, read-write)
  kubeflash.io/kv-cache  a model id               -> cache volume (the node's prefix KV cache of that model in the
                                                     pod's namespace, kvcache/ns/<namespace>/<model-id>, read-write)
  kubeflash.io/disk      optional: the store disk's name (default: the disk holding the model / the first disk)
Exactly one of the first four. With kubeflash.io/model-id, `kubeflash.io/shard: <rank>` and
`kubeflash.io/tensor-parallel: <N>` ask for that rank's tensor-parallel shard instead of the whole model -> shard
volume (read-only bind of shards/<id>.tp<N>/<rank>, cut there by the node agent; docs/multi-gpu.md).
Keys the kubelet adds (csi.storage.k8s.io/*) are accepted and only the pod's
namespace is used (it confines a job or cache volume to the pod's own namespace).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubeflash_api import contract as c
from kubeflash_api.errors import SpecError
from kubeflash_api.names import MODEL_ID as MODEL_ID_RULE
from kubeflash_api.names import is_model_id
from kubeflash_api.quantity import parse_quantity

from .errors import CsiError

MODEL_ID, KV_SIZE, JOB, DISK, KV_CACHE = c.CSI_MODEL_ID, c.CSI_KV_SIZE, c.CSI_JOB, c.CSI_DISK, c.CSI_KV_CACHE
SHARD, TENSOR_PARALLEL = c.CSI_SHARD, c.CSI_TENSOR_PARALLEL
MAX_TP = 8  # spec.offload.tensorParallel's largest value
KINDS = {MODEL_ID: "model", KV_SIZE: "kv", JOB: "job", KV_CACHE: "cache"}
KNOWN = set(KINDS) | {DISK, SHARD, TENSOR_PARALLEL}
KUBELET_PREFIX = "csi.storage.k8s.io/"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
MIN_KV = c.CSI_MIN_KV

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class Request:
    """A checked publish request: which kind of volume, of what, where, and how it is mounted."""

    volume_id: str
    target: str
    kind: str  # model | shard | kv | job | cache
    read_only: bool
    model_id: str = ""  # model, cache
    size: int = 0  # kv: bytes
    job: str = ""  # job: <namespace>/<name>
    disk: str = ""  # requested disk name, "" = driver's choice
    namespace: str = ""  # cache: the pod's namespace
    rank: int = 0  # shard: which one
    world: int = 0  # shard: how many the model was cut into

    def same_volume(self, other: "Request") -> bool:
        """Same volume arguments (the target may differ)."""
        return (self.kind, self.model_id, self.size, self.job, self.disk, self.read_only, self.namespace, self.rank,
                self.world) == (other.kind, other.model_id, other.size, other.job, other.disk, other.read_only,
                                other.namespace, other.rank, other.world)

    def to_json(self) -> dict:
        return {"volume_id": self.volume_id, "target": self.target, "kind": self.kind, "read_only": self.read_only,
                "model_id": self.model_id, "size": self.size, "job": self.job, "disk": self.disk,
                "namespace": self.namespace, "rank": self.rank, "world": self.world}

    @classmethod
    def from_json(cls, d: dict) -> "Request":
        keys = ("volume_id", "target", "kind", "read_only", "model_id", "size", "job", "disk")
        return cls(**{k: d[k] for k in keys}, namespace=d.get("namespace", ""),  # records of older drivers lack
                   rank=int(d.get("rank", 0)), world=int(d.get("world", 0)))  # these three


def parse_size(value: str) -> int:
    """A Kubernetes quantity of bytes (8Gi, 500M, 1073741824); CsiError naming kubeflash.io/kv-size."""
    try:
        return parse_quantity(value, path=f"volume attribute {KV_SIZE}", lo=MIN_KV)
    except SpecError as e:
        raise CsiError.invalid(str(e)) from None


def parse_request(volume_id: str, target: str, context: dict[str, str], *, read_only: bool) -> Request:
    """Check the attributes; raises CsiError INVALID_ARGUMENT (bad attribute) or NOT_FOUND (no such volume)."""
    unknown = sorted(k for k in context if k not in KNOWN and not k.startswith(KUBELET_PREFIX))
    if unknown:
        raise CsiError.invalid(f"unknown volume attribute {unknown[0]!r}; kubeflash.io volumes take "
                               f"{MODEL_ID}, {KV_SIZE}, {JOB} or {KV_CACHE}, and optionally {DISK}")
    kinds = [k for k in KINDS if k in context]
    if not kinds:
        # Not an inline volume of ours: a pre-provisioned volume id, and this driver provisions none.
        raise CsiError.not_found(f"volume {volume_id!r} does not exist: kubeflash.io serves only inline volumes "
                                 f"with attribute {MODEL_ID}, {KV_SIZE}, {JOB} or {KV_CACHE}")
    if len(kinds) > 1:
        raise CsiError.invalid(f"volume attributes {kinds[0]} and {kinds[1]} exclude each other: one volume is "
                               "a model, a KV space or a job directory")
    key = kinds[0]
    value = context[key]
    disk = context.get(DISK, "")
    if disk and not _NAME.match(disk):
        raise CsiError.invalid(f"volume attribute {DISK} must be a store disk name like nvme0, got {disk!r}")
    if (SHARD in context or TENSOR_PARALLEL in context) and key != MODEL_ID:
        raise CsiError.invalid(f"volume attributes {SHARD} and {TENSOR_PARALLEL} go with {MODEL_ID} (a model's "
                               f"tensor-parallel shard), not with {key}")
    if key == MODEL_ID:
        if not is_model_id(value):
            raise CsiError.invalid(f"volume attribute {MODEL_ID} must be a model id as FlashNode.status.models[].id "
                                   f"shows it ({MODEL_ID_RULE.pattern}), got {value!r}")
        if SHARD in context or TENSOR_PARALLEL in context:
            world = _small_int(context, TENSOR_PARALLEL, 2, MAX_TP, "how many shards the model was cut into")
            rank = _small_int(context, SHARD, 0, world - 1, f"a shard's rank, below {TENSOR_PARALLEL} {world}")
            return Request(volume_id, target, "shard", True, model_id=value, disk=disk, rank=rank, world=world)
        return Request(volume_id, target, "model", True, model_id=value, disk=disk)
    if key == KV_SIZE:
        if read_only:
            raise CsiError.invalid(f"a {KV_SIZE} volume is the job's writable KV space; it cannot be readOnly")
        return Request(volume_id, target, "kv", False, size=parse_size(value), disk=disk)
    if key == KV_CACHE:
        return _cache_request(volume_id, target, value, context, read_only=read_only, disk=disk)
    if not _NAME.match(value) or len(value) > 253:
        raise CsiError.invalid(f"volume attribute {JOB} must be an InferenceJob name, got {value!r}")
    namespace = context.get(POD_NAMESPACE, "")
    if not _NAME.match(namespace):
        raise CsiError.invalid(f"volume attribute {JOB} needs the pod's namespace ({POD_NAMESPACE}, sent by the "
                               "kubelet when the CSIDriver has podInfoOnMount: true)")
    return Request(volume_id, target, "job", read_only, job=f"{namespace}/{value}", disk=disk)


def _small_int(context: dict[str, str], key: str, lo: int, hi: int, what: str) -> int:
    """An integer attribute in [lo, hi]; CsiError INVALID_ARGUMENT naming it (absent counts as wrong)."""
    value = context.get(key)
    if value is None or not value.isdigit() or not lo <= int(value) <= hi:
        raise CsiError.invalid(f"volume attribute {key} must be an integer from {lo} to {hi} ({what}), got "
                               f"{value!r}" + (" (missing)" if value is None else ""))
    return int(value)


def _cache_request(volume_id: str, target: str, value: str, context: dict[str, str], *, read_only: bool,
                   disk: str) -> Request:
    if not is_model_id(value):
        raise CsiError.invalid(f"volume attribute {KV_CACHE} must be a model id as FlashNode.status.models[].id "
                               f"shows it ({MODEL_ID_RULE.pattern}), got {value!r}")
    if read_only:
        raise CsiError.invalid(f"a {KV_CACHE} volume is where the engine adds new KV blocks; it cannot be readOnly")
    namespace = context.get(POD_NAMESPACE, "")
    if not _NAME.match(namespace) or len(namespace) > 63:
        raise CsiError.invalid(f"volume attribute {KV_CACHE} needs the pod's namespace ({POD_NAMESPACE}, sent by "
                               "the kubelet when the CSIDriver has podInfoOnMount: true)")
    return Request(volume_id, target, "cache", False, model_id=value, disk=disk, namespace=namespace)
