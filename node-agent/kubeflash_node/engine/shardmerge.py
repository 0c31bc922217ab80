"""Merge the part files of a spec.parallelism job's shards into one results file, lines in input order.

Shard k of N writes its results to <path>.part-<k>-of-<N> (kubeflash_api.sharding.part_path) on the output claim;
once every shard has Succeeded, one process that can reach the claim calls `merge_parts`. It checks everything
before it writes anything: every part exists and is a regular file (opened without following links), ends on a
whole line, every line is a result whose custom_id the input lists and belongs to that part's shard, no custom_id
comes twice, and every input custom_id has its line. Then it writes the lines, byte for byte as the shards wrote
them, in input order to a temp file beside the target, fsyncs it, renames it over <path> and fsyncs the directory:
a reader (or a crash at any moment) sees the old <path> or the whole new one, never a part of it. The same parts
and order give the same bytes, so a merge run twice (a retried merger) writes the same file. The part files are
left in place. Memory: the whole output is held once (the lines), as the results ConfigMap path holds it too.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kubeflash_api.sharding import part_path, shard_of

from ..store.format import atomic_write_bytes

SHOWN = 5  # custom_ids named in an error at most


class MergeError(ValueError):
    """The parts cannot be merged; the message names the part file (and line) and what was expected."""


@dataclass(frozen=True)
class Merged:
    path: Path
    lines: int
    bytes: int


def _read_part(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MergeError(f"{path}: does not exist (expected this shard's results; has the shard succeeded?)") from None
    except OSError as e:
        raise MergeError(f"{path}: cannot be opened: {e.strerror} (a link is not followed)") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise MergeError(f"{path}: is not a regular file (expected this shard's results)")
        return f.read()


def merge_parts(root: Path, path: str, count: int, order: Sequence[str]) -> Merged:
    """Merge the `count` parts of `path` (relative to `root`, the claim's mount) into root/path, lines in the order
    of `order` (the job's custom_ids as its input lists them). Raises MergeError before writing anything when the
    parts are not exactly one result per input prompt, each in its own shard's part."""
    root = Path(root)
    target = root / path
    rank = {cid: i for i, cid in enumerate(order)}
    lines: list[bytes | None] = [None] * len(order)
    where: dict[str, str] = {}
    for k in range(count):
        part = root / part_path(path, k, count)
        data = _read_part(part)
        if data and not data.endswith(b"\n"):
            raise MergeError(f"{part}: ends in a partial line (the shard did not finish writing it)")
        for n, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.strip():
                continue
            try:
                cid = json.loads(line)["custom_id"]
            except (ValueError, KeyError, TypeError) as e:
                raise MergeError(f"{part}:{n}: not a result line with a custom_id ({e})") from None
            if not isinstance(cid, str) or cid not in rank:
                raise MergeError(f"{part}:{n}: custom_id {cid!r} is not one of the job's prompts")
            if shard_of(cid, count) != k:
                raise MergeError(f"{part}:{n}: custom_id {cid!r} belongs to shard {shard_of(cid, count)}, not {k}")
            if cid in where:
                raise MergeError(f"{part}:{n}: custom_id {cid!r} comes twice (first in {where[cid]})")
            where[cid] = f"{part}:{n}"
            lines[rank[cid]] = line
    absent = [cid for cid, line in zip(order, lines) if line is None]
    if absent:
        raise MergeError(f"{root / path}.part-*-of-{count}: {len(absent)} of {len(order)} prompts have no result "
                         f"(first: {', '.join(absent[:SHOWN])})")
    return _write_atomic(target, lines)  # type: ignore[arg-type]  (no None left)


def _write_atomic(target: Path, lines: Sequence[bytes]) -> Merged:
    """The merged file, crash-safely (the store's temp + fsync + rename + directory fsync)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(lines)
    atomic_write_bytes(target, data)
    return Merged(path=target, lines=len(lines), bytes=len(data))
