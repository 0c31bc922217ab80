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


def inline_split(n: int, count: int) -> list[list[int]]:
    """Which of `n` inline prompts (custom_ids prompt-0 .. prompt-<n-1>) each of `count` shards runs: their indices,
    in input order. The operator copies only these into a shard job (spec.shard.promptIndex keeps their ids)."""
    out: list[list[int]] = [[] for _ in range(count)]
    for i in range(n):
        out[shard_of(f"prompt-{i}", count)].append(i)
    return out


def part_path(path: str, index: int, count: int) -> str:
    """Shard `index` of `count`'s results file beside the job's spec.output.path: <path>.part-<index>-of-<count>."""
    return f"{path}.part-{index}-of-{count}"
