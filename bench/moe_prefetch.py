"""Expert prefetch during attention against routed reads after the router: seconds per decode step of a MoE model
streamed from disk, and the prediction's hit rate.

    .venv/bin/python bench/moe_prefetch.py --preset qwen3-30b-a3b --layers 4 --vocab 32000 --work /tmp/moepf --cold

Converts `dummy:PRESET` with its first --layers layers only (the real layer shape, random weights; a float32 store by
default, the CPU's compute dtype, so no cast runs per read) and, with --vocab, a smaller vocabulary (the embedding and
head are streamed every step too; a smaller one keeps them from dominating a CPU step) under --work, then runs one
batch of --batch prompts of --prompt random tokens for --new tokens with every stage streamed from disk, alternating
prefetch off / on --repeat times each. Decode step time: the engine's decode seconds over its decode steps (prefill
and set-up drop out). --cold drops the page cache of each layer file (posix_fadvise DONTNEED) when the streamer hands
the layer out, so that layer's expert reads, predicted or on demand, come from the disk; without it the reads are
warm (page cache) once the first run has read them. The hot-expert cache is off (random weights have no synthetic
skew for it to keep), every routed expert is read. The hit rate and prefetched bytes count the prefill too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from kubeflash_node.engine.bench import drop_file_pages
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import convert as convert_mod
from kubeflash_node.store.format import load_manifest


def build(preset: str, layers: int, vocab: int, dtype: str, store: Path) -> None:
    if (store / "manifest.json").is_file():
        return
    src = convert_mod.DummySource(preset)
    src.config = replace(src.config, num_layers=layers, vocab_size=vocab or src.config.vocab_size)
    src.description = f"dummy:{preset} (first {layers} layers, vocabulary {src.config.vocab_size})"
    real = convert_mod.open_source
    convert_mod.open_source = lambda uri: src  # the preset with fewer layers; everything else as convert does it
    try:
        convert_mod.convert(f"dummy:{preset}", store, dtype=dtype,
                            progress=lambda d, t, n: print(f"  converted {n} ({d}/{t})", flush=True))
    finally:
        convert_mod.open_source = real
    os.sync()  # written pages are clean, so DONTNEED can drop them


def run(store: Path, *, prefetch: bool, cold: bool, prompts: list[list[int]], new: int, threads: int) -> dict:
    e = Engine(store, policy=Policy(gpu_batch_size=len(prompts), expert_prefetch=prefetch, io_threads=threads,
                                    io_backend="posix"))
    if cold:
        get = e.streamer.get

        def cold_get(stage: int):
            w = get(stage)
            if stage in e.streamer.routed:  # this layer's experts are read from here on: from the disk
                drop_file_pages([store / e.manifest.stages[stage]])
            return w

        e.streamer.get = cold_get
    try:
        e.generate(prompts, GenParams(max_new_tokens=new))
    finally:
        e.close()
    steps = e.stats["decode_tokens"] // len(prompts)
    out = {"prefetch": prefetch, "decode_step_s": e.stats["decode_s"] / steps, "decode_steps": steps,
           "expert_bytes": e.timings.bytes["load_expert"], "expert_reads": e.timings.count["load_expert"]}
    if e.streamer.expert_prefetch is not None:
        out |= e.streamer.expert_prefetch.describe()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b", help="a MoE dummy preset (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="layers kept of the preset (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: the preset's)")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"],
                   help="store dtype (default: %(default)s)")
    p.add_argument("--work", type=Path, required=True, help="where the store is converted (kept for reruns)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=16, help="tokens per prompt (default: %(default)s)")
    p.add_argument("--new", type=int, default=17, help="tokens generated (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode, alternating (default: %(default)s)")
    p.add_argument("--threads", type=int, default=4, help="reader threads (default: %(default)s)")
    p.add_argument("--cold", action="store_true", help="drop each layer file's page cache as it is used")
    p.add_argument("--json", type=Path, help="write every run's figures here")
    a = p.parse_args()
    store = a.work / f"{a.preset}-{a.layers}l-v{a.vocab}-{a.dtype}"
    build(a.preset, a.layers, a.vocab, a.dtype, store)
    vocab = load_manifest(store).config["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (a.prompt,), generator=g).tolist() for _ in range(a.batch)]
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    runs = []
    for _ in range(a.repeat):
        for prefetch in (False, True):
            r = run(store, prefetch=prefetch, cold=a.cold, prompts=prompts, new=a.new, threads=a.threads)
            runs.append(r)
            print(json.dumps(r), flush=True)
    for prefetch in (False, True):
        rs = [r for r in runs if r["prefetch"] == prefetch]
        line = (f"prefetch {'on ' if prefetch else 'off'}: decode step median "
                f"{statistics.median(r['decode_step_s'] for r in rs) * 1e3:.1f} ms "
                f"(runs: {', '.join('%.1f' % (r['decode_step_s'] * 1e3) for r in rs)}), "
                f"expert bytes {rs[-1]['expert_bytes'] / 2**20:.1f} MiB")
        if prefetch:
            line += (f", hit rate {rs[-1]['hit_rate']:.1%} ({rs[-1]['predicted_hits']}/{rs[-1]['routed']}), "
                     f"prefetched unused {rs[-1]['bytes_unused'] / 2**20:.1f} of "
                     f"{rs[-1]['bytes_prefetched'] / 2**20:.1f} MiB")
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
