"""Per-rank shard stores: a converted model's layer stages split for tensor parallelism, one store per GPU<->SSD pair.

Each shard is itself a complete store (manifest.json + one file per stage, 4 KiB-aligned, sha256 per file,
published by one atomic rename), so a rank streams only its own bytes from its own SSD with the ordinary
WeightStreamer. Layer stages hold that rank's slice (tensorparallel.shard_layer); embed and head are replicated.
The manifest keeps the whole model's config and records the slice in extra.tensor_parallel, so a shard is never
mistaken for a model (TPEngine checks the rank; merge_shards reassembles the original tensors).

    python -m kubeflash_node.engine.tpshards MODEL_DIR OUT_0 OUT_1 [...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..store.convert import SourceError, StoreSource
from ..store.format import Manifest, ModelWriter, StoreError, load_manifest
from ..store.modelconfig import ModelConfig
from .tensorparallel import merge_layer, plan, shard_layer


def _stage_tensors(src: StoreSource, i: int) -> dict[str, torch.Tensor]:
    n = len(src.m.stages)
    return src.embed() if i == 0 else src.head() if i == n - 1 else src.layer(i - 1)


def _arrays(tensors: dict[str, torch.Tensor], dtypes: dict[str, str]):
    for name, t in tensors.items():
        arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        yield name, np.ascontiguousarray(arr), dtypes[name]


def shard_store(model_dir: Path, out_dirs: Sequence[Path], *, overwrite: bool = False,
                progress: Callable[[int, int, str], None] | None = None) -> list[Manifest]:
    """Write rank r's shard of the store at `model_dir` to out_dirs[r] (one per pair); returns their manifests.
    Nothing appears in an out dir until its shard is whole."""
    model_dir, world = Path(model_dir), len(out_dirs)
    if world < 2:
        raise StoreError(f"{model_dir}: sharding needs at least 2 output directories, got {world}")
    try:
        src = StoreSource(model_dir)
    except (SourceError, StoreError, OSError) as e:  # a missing/corrupt manifest or a quantized store
        raise StoreError(f"{model_dir}: cannot be sharded: {e}") from e
    m = src.m
    c = ModelConfig.from_dict(m.config)
    splits = [plan(c, r, world) for r in range(world)]
    writers = [ModelWriter(Path(d), overwrite=overwrite) for d in out_dirs]
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
            extra["tensor_parallel"] = {**asdict(s), "model": m.source or str(model_dir)}
            man = Manifest(architecture=m.architecture, config=m.config, dtype=m.dtype, files=dict(wr.files),
                           stages=list(m.stages), tokenizer=m.tokenizer, source=m.source, extra=extra)
            wr.publish(man)
            out.append(man)
        return out
    except BaseException:
        for wr in writers:
            wr.abort()
        raise


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
    ap = argparse.ArgumentParser(prog="python -m kubeflash_node.engine.tpshards",
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
