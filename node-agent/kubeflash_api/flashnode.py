"""The FlashNode API: one per node, spec written by the operator (wanted models), status by the node agent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubeflash_api import schema as s
from kubeflash_api.errors import SpecError
from kubeflash_api.inferencejob import DTYPES, MAX_SPARSITY, QUANTIZATIONS, check_uri
from kubeflash_api.metadata import METADATA
from kubeflash_api.names import is_model_id, model_id
from kubeflash_api.prefixes import MAX_PER_ENTRY, PATTERN
from kubeflash_api.status import conditions

MODEL_STATES = ("Pending", "Staging", "Ready", "Failed", "Evicted")
MAX_MODELS = 256
MAX_KV_CACHE_ENTRIES = 64  # status.kvCache.entries: the largest (disk, namespace, model) caches only
_TIME = {"fmt": "date-time"}
_NUMA = {"lo": -1}


@dataclass(frozen=True)
class ModelEntry:
    """One wanted model of FlashNode.spec.models: its id is derived from the rest, never trusted as given."""

    uri: str
    dtype: str = "float16"
    quantization: str = "none"
    disk: str = ""
    tensor_parallel: int = 1  # > 1: also stage shard k of N on pair k's disk
    sparsity: tuple[float, ...] = ()  # targets calibrated at staging (engine/autocalib.py)

    @property
    def id(self) -> str:
        return model_id(self.uri, dtype=self.dtype, quantization=self.quantization)

    def to_dict(self) -> dict:
        out = {"id": self.id, "uri": self.uri, "dtype": self.dtype, "quantization": self.quantization}
        out = {**out, "disk": self.disk} if self.disk else out
        out = {**out, "sparsity": list(self.sparsity)} if self.sparsity else out
        return {**out, "tensorParallel": self.tensor_parallel} if self.tensor_parallel > 1 else out


MODEL_ENTRY = s.obj(
    "A model that should be staged on this node.",
    ("id", s.string("model_id(uri, dtype, quantization); checked against the other fields.", min_len=1,
                    max_len=128)),
    ("uri", s.string("The model's source, as in InferenceJob spec.model.uri.", min_len=1, max_len=2048)),
    ("dtype", s.string("The staged dtype.", enum=DTYPES, default="float16")),
    ("quantization", s.string("The staged weight quantization.", enum=QUANTIZATIONS, default="none")),
    ("disk", s.string("The disk the operator would like it on (the placed job's pair); a hint.")),
    ("tensorParallel", s.integer("Also stage the model cut into this many tensor-parallel shards, shard k on the "
                                 "disk of GPU<->SSD pair k (docs/multi-gpu.md); 1: no shards.", lo=1, hi=8,
                                 default=1)),
    ("sparsity", s.array("Target sparsities (as spec.offload.sparsity) the agent calibrates the model for when it "
                         "stages it, on the built-in calibration text (docs/sparsity.md), so a sparse job never "
                         "meets it uncalibrated.", s.number("A target sparsity.", lo=0, hi=MAX_SPARSITY),
                         max_len=20)),
    required=("id", "uri"))

SPEC = s.obj(
    "Desired state of the node's store: which models it should hold.",
    ("nodeName", s.string("The Node this FlashNode describes.", min_len=1, max_len=253)),
    ("models", s.array("Models that should be staged on this node (written by the operator).", MODEL_ENTRY,
                       max_len=MAX_MODELS, list_map_keys=("id",))),
    required=("nodeName",))

STATUS = s.obj(
    "What the node agent found and did: devices, pairs, staged models, KV reservations, heartbeat.",
    ("gpus", s.array("The node's GPUs.", s.obj(
        "One GPU.",
        ("index", s.integer("The GPU's index (CUDA order).", lo=0)),
        ("uuid", s.string("The GPU's UUID.")),
        ("name", s.string("The GPU's product name.")),
        ("memoryBytes", s.integer("GPU memory in bytes.", lo=0, fmt="int64")),
        ("pciRoot", s.string("The PCIe root complex it hangs off.")),
        ("numaNode", s.integer("Its NUMA node (-1: unknown).", **_NUMA)),
        ("h2dGBps", s.number("Measured host-to-device bandwidth, GB/s.", lo=0)),
        required=("index",)))),
    ("disks", s.array("The node's store disks.", s.obj(
        "One SSD with a kubeflash store.",
        ("name", s.string("The disk's name in the agent's config.")),
        ("path", s.string("Store root on this disk, e.g. /var/lib/kubeflash.")),
        ("pciRoot", s.string("The PCIe root complex it hangs off.")),
        ("numaNode", s.integer("Its NUMA node (-1: unknown).", **_NUMA)),
        ("capacityBytes", s.integer("The store's capacity in bytes.", lo=0, fmt="int64")),
        ("freeBytes", s.integer("Free for new models and KV reservations (unused parts of existing reservations "
                                "already subtracted).", lo=0, fmt="int64")),
        ("readGBps", s.number("Measured read bandwidth, GB/s.", lo=0)),
        ("writeGBps", s.number("Measured write bandwidth, GB/s.", lo=0)),
        required=("name", "path")))),
    ("pairs", s.array("GPU<->SSD pairs: each GPU with its closest store disk.", s.obj(
        "One pair.", ("gpu", s.integer("The GPU's index.", lo=0)), ("disk", s.string("The disk's name.")),
        required=("gpu", "disk")))),
    ("models", s.array("Models in the node's store, with their staging state.", s.obj(
        "One model copy.",
        ("id", s.string("The model's id.")),
        ("uri", s.string("Its source, credentials redacted.")),
        ("disk", s.string("The disk holding it.")),
        ("state", s.string("Pending, Staging, Ready, Failed or Evicted.", enum=MODEL_STATES)),
        ("bytes", s.integer("Bytes on disk.", lo=0, fmt="int64")),
        ("progress", s.number("Percent staged.", lo=0, hi=100)),
        ("lastUsed", s.string("When a job last used it (eviction is least recently used first).", **_TIME)),
        ("message", s.string("Why it failed, for people.")),
        ("tensorParallel", s.integer("How many tensor-parallel shards were asked for (spec.models).", lo=1)),
        ("shards", s.array("Its tensor-parallel shards, one per GPU<->SSD pair.", s.obj(
            "Shard `rank` of the model, on the disk of the pair of GPU `gpu`.",
            ("rank", s.integer("The shard's rank.", lo=0)),
            ("gpu", s.integer("The GPU of the pair whose disk holds it.", lo=0)),
            ("disk", s.string("The disk holding it.")),
            ("path", s.string("The shard store's directory on that disk.")),
            ("state", s.string("Pending, Staging, Ready or Failed.", enum=MODEL_STATES)),
            ("bytes", s.integer("Bytes on disk.", lo=0, fmt="int64")),
            ("progress", s.number("Percent cut.", lo=0, hi=100)),
            ("message", s.string("Why it failed, for people.")),
            required=("rank", "disk", "state")))),
        required=("id", "state")))),
    ("gpuCount", s.integer("How many GPUs the agent found (for kubectl get fn).", lo=0)),
    ("pairCount", s.integer("How many GPU<->SSD pairs (for kubectl get fn).", lo=0)),
    ("freeSSD", s.string("Free store space over all disks, e.g. 1.5 TiB (for kubectl get fn).")),
    ("modelsReady", s.integer("How many models are Ready (for kubectl get fn).", lo=0)),
    ("kvAllocations", s.array("KV space reserved for jobs placed here.", s.obj(
        "One job's reservation.",
        ("job", s.string('"<namespace>/<name>"')),
        ("disk", s.string("The disk it is on.")),
        ("bytes", s.integer("Reserved bytes.", lo=0, fmt="int64")),
        ("path", s.string("The job's directory on that disk.")),
        required=("job", "disk")))),
    ("kvCache", s.obj(
        "The node's prefix KV cache on its SSDs (docs/prefix-cache.md): size, budget, and totals over every job.",
        ("budgetBytes", s.integer("Bytes the cache may take (the agent's kvCache.budget); 0: no cache.", lo=0,
                                  fmt="int64")),
        ("bytes", s.integer("Bytes of blocks on disk.", lo=0, fmt="int64")),
        ("blocks", s.integer("Blocks on disk.", lo=0, fmt="int64")),
        ("hits", s.integer("Blocks jobs read from the cache (since the agent's state began).", lo=0, fmt="int64")),
        ("misses", s.integer("Blocks jobs computed because the cache lacked them.", lo=0, fmt="int64")),
        ("prefillTokensSaved", s.integer("Prompt tokens jobs did not prefill thanks to the cache.", lo=0,
                                         fmt="int64")),
        ("blocksEvicted", s.integer("Blocks removed to stay under the budget.", lo=0, fmt="int64")),
        ("bytesEvicted", s.integer("Bytes removed to stay under the budget.", lo=0, fmt="int64")),
        ("entries", s.array(f"What it holds per disk, namespace and model, largest first (at most "
                            f"{MAX_KV_CACHE_ENTRIES}; the operator prefers a node holding a job's model here).",
                            s.obj("One namespace's cache of one model on one disk.",
                                  ("disk", s.string("The disk.")),
                                  ("namespace", s.string("The namespace whose jobs wrote and read it.")),
                                  ("modelId", s.string("The model's id.")),
                                  ("blocks", s.integer("Blocks.", lo=0, fmt="int64")),
                                  ("bytes", s.integer("Bytes.", lo=0, fmt="int64")),
                                  ("lastUsed", s.string("When a block was last written or read.", **_TIME)),
                                  ("prefixes", s.array(
                                      f"Prefix fingerprints (kubeflash_api.prefixes) of the latest jobs whose "
                                      f"prompts' blocks it holds, newest first (at most {MAX_PER_ENTRY}); the "
                                      f"operator prefers the disk sharing the longest one with a job's prompts.",
                                      s.string("<bytes of text>-<16 hex digits of its sha256>",
                                               pattern=PATTERN.pattern),
                                      max_len=MAX_PER_ENTRY)),
                                  required=("disk", "namespace", "modelId", "blocks")),
                            max_len=MAX_KV_CACHE_ENTRIES)))),
    ("heartbeat", s.string("When the agent last wrote this status.", **_TIME)),
    ("conditions", conditions("Ready (the agent reports), as metav1.Conditions.")),
)

OBJECT = s.obj("A GPU/SSD node's devices, GPU<->SSD pairs, staged models and KV space.",
               ("apiVersion", s.string("kubeflash.io/v1alpha1.")), ("kind", s.string("FlashNode.")),
               ("metadata", METADATA), ("spec", SPEC), ("status", STATUS), required=("spec",))


def parse_model_entry(raw: Any, path: str, *, require_id: bool = True) -> ModelEntry:
    """One entry of spec.models, as the agent reads it: its id must be the one its other fields give (an entry of
    the agent's own config may leave the id out: `require_id=False`)."""
    if not isinstance(raw, Mapping):
        raise SpecError(path, f"must be an object, got {type(raw).__name__}")
    if not require_id and raw.get("id") is None:
        raw = {**raw, "id": "derived"}
        require_id = False
    else:
        require_id = True
    d = s.parse(MODEL_ENTRY, raw, path)
    check_uri(d["uri"], f"{path}.uri")
    entry = ModelEntry(uri=d["uri"], dtype=d["dtype"], quantization=d["quantization"], disk=d.get("disk", ""),
                       tensor_parallel=d["tensorParallel"],
                       sparsity=tuple(sorted({float(t) for t in d.get("sparsity") or ()})))
    if require_id and (not is_model_id(d["id"]) or d["id"] != entry.id):
        raise SpecError(f"{path}.id", f"must be {entry.id} (model_id of uri, dtype and quantization), got {d['id']!r}")
    return entry
