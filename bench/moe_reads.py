"""Routed-expert reads against whole-layer reads, cold, in bytes/s: how fast the streamer reads the experts a decode
step routes to (uniform random top-k of --batch tokens) compared with reading the whole layer file.

    .venv/bin/python bench/moe_reads.py --work /tmp/moereads --batches 1 4 16 64 --repeat 3

Converts `dummy:PRESET` with its first --layers layers, a smaller vocabulary and the experts' intermediate size scaled
to --expert-inter (default 192: in float32 an expert of the qwen3-30b-a3b shape is then 4.5 MiB, about the size of one
of its int8 experts on the GPU machine, without the CPU dequantizing anything) under --work. Then, for every layer,
batch and repeat the layer is handed out by the streamer (its non-expert part read and any read ahead finished), a
routed set drawn, and each of the following runs, in an order rotated over layers and rounds, after the layer file's
page cache is dropped (posix_fadvise DONTNEED):
- `layer`: the whole file is read the way the streamer reads a stage (`WeightStreamer._read_parallel`: --task-bytes
  tasks on --threads reader threads) into one page-aligned buffer reused every time (as the GPU's pinned ring slots);
- `routed`: the routed set is asked for as model.moe asks (`want`, then every expert's tensors): the time from
  `want` to the last expert's tensors, over the experts' bytes;
- `per-expert` (with --compare): the same experts asked for through the earlier path, one read per expert, each its
  own reader-pool task (`RoutedWeights` without the streamer's batch read).
Reads use --backend (default odirect, what the GPU machine's streamer uses).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from kubeflash_node.engine.bench import drop_file_pages
from kubeflash_node.engine.experts import RoutedWeights
from kubeflash_node.engine.stream import WeightStreamer, _aligned
from kubeflash_node.store import convert as convert_mod
from kubeflash_node.store.format import load_manifest


def build(preset: str, layers: int, vocab: int, inter: int, store: Path) -> None:
    if (store / "manifest.json").is_file():
        return
    src = convert_mod.DummySource(preset)
    src.config = replace(src.config, num_layers=layers, vocab_size=vocab, intermediate_size=inter)
    src.description = f"dummy:{preset} (first {layers} layers, vocabulary {vocab}, expert intermediate {inter})"
    real = convert_mod.open_source
    convert_mod.open_source = lambda uri: src  # the scaled preset; everything else as convert does it
    try:
        convert_mod.convert(f"dummy:{preset}", store, dtype="float32",
                            progress=lambda d, t, n: print(f"  converted {n} ({d}/{t})", flush=True))
    finally:
        convert_mod.open_source = real
    os.sync()  # written pages are clean, so DONTNEED can drop them


def routed_set(rng: random.Random, experts: int, top_k: int, tokens: int) -> list[int]:
    """The distinct experts `tokens` tokens route to when each picks `top_k` of `experts` uniformly."""
    return sorted(set().union(*(rng.sample(range(experts), top_k) for _ in range(tokens))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b", help="a MoE dummy preset (default: %(default)s)")
    p.add_argument("--layers", type=int, default=3, help="layers kept of the preset (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default: %(default)s)")
    p.add_argument("--expert-inter", type=int, default=192, help="experts' intermediate size (default: %(default)s)")
    p.add_argument("--work", type=Path, required=True, help="where the store is converted (kept for reruns)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], help="tokens routed together")
    p.add_argument("--repeat", type=int, default=3, help="rounds over every layer and batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=4, help="reader threads (default: %(default)s)")
    p.add_argument("--task-bytes", type=int, default=16 << 20, help="read task size (default: %(default)s)")
    p.add_argument("--backend", default="odirect", choices=["posix", "odirect"], help="(default: %(default)s)")
    p.add_argument("--compare", action="store_true",
                   help="also time, on the same routed sets, the earlier per-expert path (one read per expert)")
    p.add_argument("--json", type=Path, help="write every measurement here")
    a = p.parse_args()
    store = a.work / f"{a.preset}-{a.layers}l-v{a.vocab}-i{a.expert_inter}"
    build(a.preset, a.layers, a.vocab, a.expert_inter, store)
    m = load_manifest(store)
    n = len(m.stages)
    s = WeightStreamer(store, m, device=torch.device("cpu"), dtype=torch.float32, placement=["disk"] * n,
                       order=itertools.cycle(range(n)), threads=a.threads, task_bytes=a.task_bytes,
                       backend=a.backend)
    experts, top_k = m.config["num_experts"], m.config["num_experts_per_tok"]
    rng = random.Random(0)
    # the whole-layer reads land in one page-aligned buffer, reused (as the GPU streamer's pinned ring slots are)
    slot = _aligned(max(m.files[m.stages[i]].size for i in s.routed))
    slot.fill_(0)
    rows = []
    try:
        stage = 0
        for rnd in range(a.repeat):
            for b in a.batches:
                for i, layer in enumerate(sorted(s.routed)):
                    path, size = store / m.stages[layer], m.files[m.stages[layer]].size
                    while stage != layer:  # hand stages out in schedule order up to this layer
                        s.get(stage)
                        stage = (stage + 1) % n
                    live = s.get(layer)
                    base, load = dict(live.items()), live._load  # the layer without experts; one expert's read
                    stage = (layer + 1) % n
                    for _, _, fut in s.inflight:
                        fut.result()  # the next stages' reads ahead are done: only the reads below run
                    want = routed_set(rng, experts, top_k, b)
                    ranges = s.routed[layer][1]
                    kinds = ["layer", "per-expert", "routed"] if a.compare else ["layer", "routed"]
                    k = (rnd + i) % len(kinds)
                    for what in kinds[k:] + kinds[:k]:  # each kind first as often as the others
                        drop_file_pages([path])
                        if what == "layer":
                            t0 = time.perf_counter()
                            s._read_parallel(path, slot[:size])
                            rows.append({"what": "layer", "batch": b, "bytes": size, "s": time.perf_counter() - t0})
                            continue
                        if what == "per-expert":  # the earlier path: one read per expert, each a pool task
                            w = RoutedWeights(base, load, s.task_pool)
                        else:
                            w = RoutedWeights(base, load, s.task_pool,
                                              load_many=lambda js, layer=layer: s._read_experts(layer, js))
                        t0 = time.perf_counter()
                        w.want(want)
                        for j in want:
                            w[f"e{j}.w_down"]
                        rows.append({"what": what, "batch": b, "experts": len(want),
                                     "bytes": sum(ranges[j][1] - ranges[j][0] for j in want),
                                     "s": time.perf_counter() - t0})
                        del w
                    del live
            print(f"round {rnd + 1}/{a.repeat} done", flush=True)
    finally:
        s.close()
    print(f"store {store} ({sum(f.size for f in m.files.values()) / 2**20:.0f} MiB), backend {a.backend}, "
          f"{a.threads} threads, tasks {a.task_bytes >> 20} MiB, {experts} experts top-{top_k}")
    for b in a.batches:
        for what in ("layer", "per-expert", "routed") if a.compare else ("layer", "routed"):
            rs = [r for r in rows if r["what"] == what and r["batch"] == b]
            rates = [r["bytes"] / r["s"] / 1e9 for r in rs]
            extra = f", {statistics.mean(r['experts'] for r in rs):.1f} experts" if what != "layer" else ""
            print(f"batch {b:3d} {what:10s}: median {statistics.median(rates):.2f} GB/s (min {min(rates):.2f}, max "
                  f"{max(rates):.2f}; {len(rs)} reads, mean {statistics.mean(r['bytes'] for r in rs) / 2**20:.1f} "
                  f"MiB{extra})")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
