"""Per-rank shard stores: a converted model's layer stages split for tensor parallelism, one store per GPU<->SSD pair.

Each shard is itself a complete store (manifest.json + one file per stage, 4 KiB-aligned, sha256 per file,
published by one atomic rename), so a rank streams only its own bytes from its own SSD with the ordinary
WeightStreamer. Layer stages hold that rank's slice (store/tpsplit.shard_layer); embed and head are replicated.
The manifest keeps the whole model's config and records the slice in extra.tensor_parallel, so a shard is never
mistaken for a model (TPEngine checks the rank; merge_shards reassembles the original tensors).

    python -m kubeflash_node.store.tpshards MODEL_DIR OUT_0 OUT_1 [...]

The node agent cuts the shards of a staged model onto each GPU<->SSD pair's own disk with
`shard_store(..., only=...)` (agent/tpstaging.py). `ensure_shards` is what `kubeflash run` with
spec.offload.tensorParallel N uses: the shards are kept beside the store entry
(`<root>/models/<model-id>.tp<N>/<rank>`), written once under a lock, reused while they were cut from the same
manifest (its sha256 is recorded in each shard) and refused, naming the directory, when they were not.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .convert import SourceError, StoreSource
from .format import MANIFEST, Manifest, ModelWriter, StoreError, load_manifest, verify_model
from .modelconfig import ModelConfig
from .scratch import clean_stale
from .tpsplit import merge_layer, plan, shard_layer


def _stage_tensors(src: StoreSource, i: int) -> dict[str, torch.Tensor]:
    n = len(src.m.stages)
    return src.embed() if i == 0 else src.head() if i == n - 1 else src.layer(i - 1)


def _arrays(tensors: dict[str, torch.Tensor], dtypes: dict[str, str]):
    for name, t in tensors.items():
        arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        yield name, np.ascontiguousarray(arr), dtypes[name]


def shard_store(model_dir: Path, out_dirs: Sequence[Path], *, overwrite: bool = False,
                progress: Callable[[int, int, str], None] | None = None,
                only: Sequence[int] | None = None) -> list[Manifest]:
    """Write rank r's shard of the store at `model_dir` to out_dirs[r] (one per pair); returns their manifests
    (of the ranks in `only`, default all, in rank order: the others are not written). Nothing appears in an out
    dir until its shard is whole."""
    model_dir, world = Path(model_dir), len(out_dirs)
    if world < 2:
        raise StoreError(f"{model_dir}: sharding needs at least 2 output directories, got {world}")
    try:
        src = StoreSource(model_dir)
    except (SourceError, StoreError, OSError) as e:  # a missing/corrupt manifest or a quantized store
        raise StoreError(f"{model_dir}: cannot be sharded: {e}") from e
    m = src.m
    c = ModelConfig.from_dict(m.config)
    ranks = sorted(set(range(world) if only is None else only))
    splits = [plan(c, r, world) for r in ranks]
    writers = [ModelWriter(Path(out_dirs[r]), overwrite=overwrite) for r in ranks]
    try:
        for i, stage in enumerate(m.stages):
            tensors = _stage_tensors(src, i)
            dtypes = {k: e.dtype for k, e in m.files[stage].tensors.items()}
            for s, wr in zip(splits, writers):
                part = shard_layer(c, tensors, s) if stage.startswith("layer_") else tensors
                wr.add_stage(stage, _arrays(part, dtypes))
            if progress:
                progress(i + 1, len(m.stages), stage)
        out = []
        for s, wr in zip(splits, writers):
            if m.tokenizer:
                shutil.copytree(model_dir / m.tokenizer, wr.tmp / m.tokenizer)
            extra = {k: v for k, v in m.extra.items() if k != "other_files"}
            extra["tensor_parallel"] = {**asdict(s), "model": m.source or str(model_dir),
                                        "source_manifest_sha256": manifest_sha256(model_dir)}
            man = Manifest(architecture=m.architecture, config=m.config, dtype=m.dtype, files=dict(wr.files),
                           stages=list(m.stages), tokenizer=m.tokenizer, source=m.source, extra=extra)
            wr.publish(man)
            out.append(man)
        return out
    except BaseException:
        for wr in writers:
            wr.abort()
        raise


def manifest_sha256(model_dir: Path) -> str:
    """sha256 of a store's manifest.json: it names every file's checksum, so it names the whole store."""
    return hashlib.sha256((Path(model_dir) / MANIFEST).read_bytes()).hexdigest()


def shard_dirs(model_dir: Path, world: int) -> list[Path]:
    """Where `ensure_shards` keeps the `world` shards of the store at `model_dir`: beside it."""
    model_dir = Path(model_dir)
    return [model_dir.parent / f"{model_dir.name}.tp{world}" / str(r) for r in range(world)]


def check_shard(shard_dir: Path, *, model_dir: Path, rank: int, world: int) -> Manifest:
    """The verified manifest of rank `rank`'s shard, cut from the store at `model_dir` as it is now; StoreError
    naming the directory otherwise."""
    m = verify_model(shard_dir)
    tp = m.extra.get("tensor_parallel") or {}
    if (tp.get("rank"), tp.get("world")) != (rank, world):
        raise StoreError(f"{shard_dir}: extra.tensor_parallel is {tp or 'absent'}, expected the shard of rank {rank} "
                         f"of {world}; remove {shard_dir.parent} and run again")
    if tp.get("source_manifest_sha256") != manifest_sha256(model_dir):
        raise StoreError(f"{shard_dir}: stale tensor-parallel shard: it was cut from another version of {model_dir} "
                         f"(manifest sha256 differs); remove {shard_dir.parent} and run again")
    return m


def ensure_shards(model_dir: Path, world: int, *, progress: Callable[[int, int, str], None] | None = None
                  ) -> list[Path]:
    """The `world` shard stores of `model_dir`, written beside it on first use and reused afterwards. Shards of a
    killed run are never published half-written (each is one atomic rename); a set with some shards missing is
    completed; a shard cut from another version of the store is refused, naming it."""
    model_dir = Path(model_dir)
    dirs = shard_dirs(model_dir, world)
    dirs[0].parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dirs[0].parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # concurrent runs of one model cut it once
        clean_stale(dirs[0].parent)  # scratch dirs of a killed sharding
        present = [d for d in dirs if (d / MANIFEST).exists()]
        for d in present:
            check_shard(d, model_dir=model_dir, rank=dirs.index(d), world=world)
        if len(present) < world:  # first use, or a run killed between two ranks' renames
            shard_store(model_dir, dirs, overwrite=True, progress=progress)
        return dirs
    finally:
        os.close(fd)


def merge_shards(shard_dirs: Sequence[Path]) -> list[dict[str, torch.Tensor]]:
    """Every stage's tensors reassembled from the shards (in rank order), as the original store holds them."""
    srcs = [StoreSource(Path(d)) for d in shard_dirs]
    for r, s in enumerate(srcs):
        tp = s.m.extra.get("tensor_parallel") or {}
        if (tp.get("rank"), tp.get("world")) != (r, len(srcs)):
            raise StoreError(f"{shard_dirs[r]}: extra.tensor_parallel is {tp or 'absent'}, expected rank {r} of "
                             f"{len(srcs)}")
    c = ModelConfig.from_dict(srcs[0].m.config)
    stages = srcs[0].m.stages
    return [merge_layer(c, [_stage_tensors(s, i) for s in srcs]) if stage.startswith("layer_")
            else _stage_tensors(srcs[0], i) for i, stage in enumerate(stages)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeflash_node.store.tpshards",
                                 description="Split a converted model store into one tensor-parallel shard store per "
                                             "GPU<->SSD pair (layer stages split, embed and head replicated).")
    ap.add_argument("model_dir", type=Path, help="a converted store (the directory holding manifest.json)")
    ap.add_argument("out_dirs", type=Path, nargs="+", help="one output directory per rank, on that rank's SSD")
    ap.add_argument("--overwrite", action="store_true", help="replace output directories that exist")
    a = ap.parse_args(argv)
    try:
        shard_store(a.model_dir, a.out_dirs, overwrite=a.overwrite,
                    progress=lambda d, n, s: print(f"[{d}/{n}] {s}", file=sys.stderr))
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r, d in enumerate(a.out_dirs):
        print(f"rank {r}: {d} ({load_manifest(d).total_bytes} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
