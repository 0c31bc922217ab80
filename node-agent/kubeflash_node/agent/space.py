"""Space arithmetic, pure: how big a converted model will be, how much a disk has free, what to evict.

Eviction takes least-recently-used models first, never one a running job reads, and models nobody wants any
more before models still in FlashNode.spec.models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubeflash_api.quantity import human  # noqa: F401  (re-exported for the agent's messages)
from kubeflash_node.store.modelconfig import ModelConfig

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
ALIGN = 4096
MANIFEST_SLACK = 64 << 10  # manifest.json: ~100 bytes per tensor, plus its own 4 KiB rounding


@dataclass(frozen=True)
class Candidate:
    """A Ready model on the disk that needs room."""

    id: str
    bytes: int
    last_used: float  # epoch seconds; staging time when never used
    wanted: bool  # still in the desired set
    in_use: bool  # a running job reads it


def tensors_per_stage(cfg: ModelConfig) -> int:
    return cfg.layer_tensors()


def estimate_store_bytes(cfg: ModelConfig, dtype: str, *, extra: int = 0) -> int:
    """An upper bound of the layer store's size: every tensor padded to 4 KiB, plus manifest and `extra`."""
    tensors = tensors_per_stage(cfg) * cfg.num_layers + 2 + 3
    padding = (tensors + cfg.num_layers + 2) * ALIGN  # each tensor and each stage file rounded up
    return cfg.total_params() * ITEMSIZE[dtype] + padding + MANIFEST_SLACK + tensors * 256 + extra


def free_bytes(*, fs_free: int, capacity: int = 0, used: int = 0, reserve: int = 0, kv_unused: int = 0) -> int:
    """Free space for new models and KV: the file system's, capped by a configured capacity, less the reserve
    and the not-yet-used part of every job's KV quota."""
    free = fs_free if not capacity else min(fs_free, capacity - used)
    return max(0, free - reserve - kv_unused)


def eviction_order(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Evictable models, first to go first: unwanted before wanted, then least recently used."""
    return sorted((c for c in candidates if not c.in_use), key=lambda c: (c.wanted, c.last_used, c.id))


def plan_eviction(need: int, free: int, candidates: Sequence[Candidate], *,
                  only_unwanted: bool = False) -> list[str] | None:
    """Ids to evict so that `need` bytes fit in `free` (+ what they free); [] if it fits, None if it can't."""
    if need <= free:
        return []
    chosen, room = [], free
    for c in eviction_order(candidates):
        if only_unwanted and c.wanted:
            continue
        chosen.append(c.id)
        room += c.bytes
        if need <= room:
            return chosen
    return None


def evictable_bytes(candidates: Sequence[Candidate], *, only_unwanted: bool = False) -> int:
    return sum(c.bytes for c in eviction_order(candidates) if not (only_unwanted and c.wanted))
