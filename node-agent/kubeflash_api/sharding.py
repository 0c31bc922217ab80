"""Which shard of a spec.parallelism job a prompt belongs to: sha256 of its custom_id mod the shard count.

Stable across processes, machines and Python versions (no hash randomization), so the operator, every shard's
pod and a retried pod agree on the split, and a prompt's shard never depends on the other prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from kubeflash_api.inferencejob import Prompt, ShardSpec


def shard_of(custom_id: str, count: int) -> int:
    """The shard (0 .. count-1) that runs the prompt with this custom_id."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    digest = hashlib.sha256(custom_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_prompts(prompts: Iterable[Prompt], shard: ShardSpec) -> tuple[Prompt, ...]:
    """The prompts of `shard`, in input order."""
    return tuple(p for p in prompts if shard_of(p.id, shard.count) == shard.index)
