"""Dense against sparse decode of a model streamed from disk: weight bytes read and seconds per decode step.

    .venv/bin/python bench/sparse_decode.py --model dummy:llama-3-8b --work /tmp/sd --device cuda --targets 0.5,0.9

Converts the model (float16 on a GPU, float32 on the CPU) under --work, calibrates the targets on random token ids
(dummy weights have no tokenizer; the bytes and times, not the accuracy, are what this measures) with neuron
bundles, then for dense and each target runs one prompt of --prompt random tokens with every stage streamed from
disk, twice (1 and 1 + --new tokens): the difference is --new decode steps, so prefill and set-up drop out. The
page cache is not dropped (the reads are warm unless the model is larger than the free memory) unless --cold.
SPARSE_NO_DENSE=1 in the environment skips the dense run (when it was measured already).

reads_in_flight_mean: over the decode steps of the longer run, the time-weighted mean number of preadv calls on the
row files (neuron bundles, input-channel and attention channel files) in flight while the engine waits for a row
read (neurons.read_kept: every read of input sparsity's columns), as bench/kvdisk_io.py counts the KV tier's; the
weights' streamer keeps up to its policy's io_threads reads in flight (more across prefetched stages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

from kubeflash_node.engine.bench import drop_file_pages
from kubeflash_node.engine.cli_calibrate import calibrate
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.sparse import for_job, hold_on_device
from kubeflash_node.store.bundles import write_bundles
from kubeflash_node.store.convert import convert
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig

PARTS = ("compute_layer_decode", "load_weight", "load_weight_stall", "load_neurons", "load_neurons_stall")


class ReadsInFlight:
    """preadv calls on the fds `fds()` gives (the row readers', O_DIRECT ones opened on first use too) in flight while
    a row read (neurons.read_kept) is waited for, once `on` is set: os.preadv and read_kept wrapped from construction
    until `stop`."""

    def __init__(self, fds):
        from kubeflash_node.engine import neurons

        self.fds, self.on, self.lock = fds, False, threading.Lock()
        self.events, self.waits, self.calls = [], [], 0
        self.orig, self.mod, self.orig_kept = os.preadv, neurons, neurons.read_kept

        def preadv(fd, bufs, offset):
            if not (self.on and fd in self.fds()):
                return self.orig(fd, bufs, offset)
            with self.lock:
                self.events.append((time.perf_counter(), 1))
                self.calls += 1
            try:
                return self.orig(fd, bufs, offset)
            finally:
                with self.lock:
                    self.events.append((time.perf_counter(), -1))

        def read_kept(*args, **kw):
            t0 = time.perf_counter()
            try:
                return self.orig_kept(*args, **kw)
            finally:
                if self.on:
                    self.waits.append((t0, time.perf_counter()))

        os.preadv, neurons.read_kept = preadv, read_kept

    def stop(self) -> dict:
        """{reads_in_flight_mean: over the waits, wait_s: their seconds, preadv: the calls counted}."""
        os.preadv, self.mod.read_kept = self.orig, self.orig_kept
        ev, area, waited = sorted(self.events), 0.0, 0.0
        n, i = 0, 0  # reads in flight at the sweep's time, next event
        for a, b in sorted(self.waits):
            while i < len(ev) and ev[i][0] <= a:
                n, i = n + ev[i][1], i + 1
            last = a
            while i < len(ev) and ev[i][0] <= b:
                area += n * (ev[i][0] - last)
                n, last, i = n + ev[i][1], ev[i][0], i + 1
            area += n * (b - last)
            waited += b - a
        return {"reads_in_flight_mean": round(area / waited, 2) if waited else 0.0, "wait_s": round(waited, 4),
                "preadv": self.calls}


def _row_fds(ffn) -> set[int]:
    """The open fds of a sparse FFN's row readers (bundles, gate rows, input-channel and attention channel files;
    buffered and O_DIRECT)."""
    if ffn is None:
        return set()
    readers = (ffn.bundles, ffn.gates, getattr(ffn.channels, "reader", ffn.channels),
               ffn.attention and ffn.attention.channels)
    return {fd for r in readers if r is not None
            for fd in [*r.fds, *(getattr(r, "_direct_fds", None) or {}).values()] if fd is not None}


def drop_cached(store: Path) -> None:
    """Drop the store's files from the page cache (fadvise DONTNEED): the next reads come from the disk."""
    drop_file_pages(f for f in store.rglob("*") if f.is_file())


def run(store: Path, target, *, device: str, prompt: list[int], new: int, batch: int, hot: int,
        gap: int | None, repeat: int = 1, cold: bool = False, method: str = "gate", hot_device: int = 0,
        rows_odirect: bool = False) -> dict:
    c = ModelConfig.from_dict(load_manifest(store).config)
    out = {}
    for n in (1, 1 + new):
        for _ in range(repeat if n > 1 else 1):  # the fastest of `repeat` runs: the least disturbed by other work
            ffn = None if target is None else for_job(c, store, target, hot_bytes=hot, gap=gap,
                                                      method=method.split("+")[0], attention=method == "input+attn")
            if ffn is not None and hot_device:  # input sparsity: the most frequent rows on the compute device
                hold_on_device(ffn, device_bytes=hot_device, host_bytes=hot, device=device)
            policy = Policy(gpu_batch_size=batch)
            e = Engine(store, policy=policy, device=device, sparsity=ffn)
            if ffn is not None and rows_odirect:  # the engine reads rows buffered; this reads aligned ones O_DIRECT
                ffn.io(threads=policy.io_threads, task_bytes=policy.io_task_bytes, direct=True)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            counter = ReadsInFlight(lambda ffn=ffn: _row_fds(ffn)) if n > 1 else None

            def step(_, counter=counter) -> None:
                if cold:
                    drop_cached(store)
                if counter is not None:
                    counter.on = True  # the prefill step is done: count the decode steps' reads
            try:
                if cold:
                    drop_cached(store)
                e.generate([prompt] * batch, GenParams(max_new_tokens=n), on_step=step)
            finally:
                flight = counter.stop() if counter is not None else None
                e.close()
            t = e.timings
            got = (t.bytes["load_weight"] + t.bytes["load_neurons"], e.stats["decode_s"],
                   torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0,
                   {k: t.sec[k] for k in PARTS},
                   sum(r.reads for r in (ffn.bundles, ffn.channels, ffn.attention and ffn.attention.channels)
                       if r is not None) if ffn is not None else 0)
            if n not in out or got[1] < out[n][1]:
                out[n], flights = got, flight
    (b1, _, _, p1, r1), (b2, s2, peak, p2, r2) = out[1], out[1 + new]
    return {"target": "dense" if target is None else target, "method": None if ffn is None else ffn.method,
            "attention": ffn is not None and ffn.attention is not None,
            "gap": None if ffn is None else (ffn.channel_gaps if ffn.method == "input" else ffn.gap),
            "bytes_per_step": (b2 - b1) / new,
            "s_per_step": s2 / new, "peak_gpu_gib": peak / 2**30,
            # seconds a decode step spends, summed over layers (the prefill's run subtracted); load_weight and
            # load_neurons run on reader threads, the *_stall parts are the compute thread waiting for them
            "parts_per_step": {k: round((p2[k] - p1[k]) / new, 4) for k in PARTS},
            "preadv_per_step": (r2 - r1) / new,
            # the decode steps' row reads: mean preadv calls in flight while the engine waited for them (ReadsInFlight)
            "reads_in_flight_mean": flights["reads_in_flight_mean"] if flights else None,
            "row_read_wait_s_per_step": round(flights["wait_s"] / new, 4) if flights else None,
            # input sparsity's hot set over the whole last run: bytes on the device / in host memory, and the rows'
            # bytes copied host->device (all, and those host memory held)
            "channel_cache": None if ffn is None else ffn.channel_cache()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--targets", default="0.5")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hot", default="0", help="hot-set bytes (e.g. 1073741824; with --method input*, channel rows held "
                   "in host memory, chosen by keep frequency)")
    p.add_argument("--hot-device", default="0", help="with --method input*: this many bytes of the most frequent "
                   "channel rows held on the compute device (never read, never copied host->device), --hot's next")
    p.add_argument("--gap", type=int, help="merge runs of missing neurons this many apart (default: "
                   "costmodel.merge_gap's, from the per-read cost; 0: one read per run)")
    p.add_argument("--repeat", type=int, default=1, help="run each setting this many times, report the fastest")
    p.add_argument("--slots", action="store_true", help="on the CPU, the neuron cache's slot buffer (gather, then "
                   "multiply once the reads are done) instead of reading into the bundle image while multiplying")
    p.add_argument("--cold", action="store_true", help="drop the store's files from the page cache before the run "
                   "and after every step, so every step reads from the disk (a disk-bound run on any machine)")
    p.add_argument("--method", choices=["gate", "input", "input+attn"], default="gate",
                   help="gate: threshold on act(gate(h)), gate read whole, neuron bundles (CATS); input: thresholds on "
                        "the FFN input and intermediate, kept columns from the input-channel files (TEAL); input+attn: "
                        "input, and the attention's inputs too (q/k/v and o columns from the attention channel files)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="the store's dtype (default float16 on "
                   "a GPU, float32 on the CPU; float16 on the CPU gives the GPU run's row sizes and merge gaps)")
    p.add_argument("--rows-odirect", action="store_true", help="read the sparse rows (bundles, channel columns) "
                   "with O_DIRECT where 4 KiB-aligned (llama-3-8b's in float16), as the streamer reads weights on a GPU; "
                   "the engine's default is the page cache")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    targets = [float(t) for t in a.targets.split(",")]
    if a.slots:
        from kubeflash_node.engine import neurons

        neurons.DIRECT = False
    store = a.work / "store"
    dtype = a.dtype or ("float32" if a.device == "cpu" else "float16")
    if not (store / "manifest.json").exists():
        convert(a.model, store, dtype=dtype)
        print("converted", file=sys.stderr)
    c = ModelConfig.from_dict(load_manifest(store).config)
    g = torch.Generator().manual_seed(0)
    from kubeflash_node.store import channels
    from kubeflash_node.store import sparsity as cal

    old = cal.load(store) if (store / cal.FILE).exists() else None
    chan_freq = None
    teal = a.method.startswith("input")
    if not (store / "ffn_bundles").exists() or (teal and (old is None or not old.inputs)) \
            or (a.method == "input+attn" and (old is None or not old.attention)):
        ids = torch.randint(0, c.vocab_size, (1024,), generator=g).tolist()
        _, rec = calibrate(store, ids, tuple(targets), device=a.device, window=512, recorder=True)
        made = cal.load(store)
        write_bundles(store, {t: rec.frequency_at(v) for t, v in made.thresholds.items()})
        chan_freq = {t: rec.input_frequency_at(v) for t, v in made.inputs.items()}  # --hot: the channel rows' hot set
        print("calibrated and bundled", file=sys.stderr)
    if teal and (not channels.present(store) or chan_freq):
        channels.write_channels(store, chan_freq)
        print("input-channel files written", file=sys.stderr)
    if a.method == "input+attn" and not channels.attn_present(store):
        channels.write_attn_channels(store)
        print("attention channel files written", file=sys.stderr)
    prompt = torch.randint(0, c.vocab_size, (a.prompt,), generator=g).tolist()
    rows = []
    for t in ([] if os.environ.get("SPARSE_NO_DENSE") else [None]) + targets:
        rows.append(run(store, t, device=a.device, prompt=prompt, new=a.new, batch=a.batch, hot=int(a.hot),
                        gap=a.gap, repeat=a.repeat, cold=a.cold, method=a.method,
                        hot_device=int(a.hot_device), rows_odirect=a.rows_odirect))
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
