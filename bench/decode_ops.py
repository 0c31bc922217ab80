"""Operators one decode step launches, per decoder layer, and the CPU time of a step: the launch count that bounds a
GPU decode at long context (ourslc: 31 steps x 48 layer calls), measured on the CPU where no GPU is lent.

Runs the engine (Engine.generate) on a small `dummy:` preset with weights resident and the KV cache on the
compute device (here the CPU), counts every aten operator a layer call dispatches during the decode steps (a
TorchDispatchMode below autograd: `linear` counts as its `addmm`; views such as `transpose` counted apart, since they
launch no kernel), and times the decode steps without the counter (median wall and process CPU time per step,
and the median process CPU time of one layer call; one torch thread by default). Works with the engine of any
tree, so a before/after is the same command with another PYTHONPATH:

    git archive <rev> node-agent | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before/node-agent .venv/bin/python bench/decode_ops.py --json before.json
    .venv/bin/python bench/decode_ops.py --json after.json

Usage: python bench/decode_ops.py [--models opt-125m,smollm2-135m] [--prompts 4] [--prompt-len 64] [--gen-len 9]
       [--tiny WIDTH] [--padded] [--repeat 3] [--store DIR] [--json OUT] [--top 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import modelconfig
from kubeflash_node.store.convert import convert

# (label, Policy fields): the KV cache on the compute device, as ourslc runs it (with and without its X-cache half)
SETUPS = {
    "kv device": dict(kv="device"),
    "kv device + X-cache 50%": dict(kv="device", x_cache_percent=50),
}


# operators that only make a new tensor header (no kernel, no data touched) besides those aten marks as views
NO_KERNEL = {"_unsafe_view", "lift_fresh", "split", "split_with_sizes", "unbind", "chunk", "detach", "empty",
             "empty_like", "empty_strided"}


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active; `views` the ones that launch no kernel."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        if func.is_view or name in NO_KERNEL:
            self.views[name] += 1
        return func(*args, **(kwargs or {}))


class Counting:
    """Wraps Engine.layer_fn: counts the operators of each decode-step layer call (S == 1) when `on`."""

    def __init__(self, fn):
        self.fn, self.on, self.calls = fn, False, 0
        self.ops: Counter = Counter()
        self.views: Counter = Counter()
        self.timed: list[float] = []  # process CPU seconds of each decode-step layer call while not counting

    def __call__(self, c, w, x, *a, **kw):
        if x.shape[1] != 1:
            return self.fn(c, w, x, *a, **kw)
        if not self.on:
            t0 = time.process_time()
            out = self.fn(c, w, x, *a, **kw)
            self.timed.append(time.process_time() - t0)
            return out
        self.calls += 1
        with OpCounter() as m:
            out = self.fn(c, w, x, *a, **kw)
        self.ops.update(m.ops)
        self.views.update(m.views)
        return out


def measure(store: Path, setup: dict, a) -> dict:
    pol = Policy(gpu_batch_size=a.prompts, weights_gpu_percent=100, **setup)
    eng = Engine(store, policy=pol, device="cpu")
    # equal lengths as ourslc runs them (one padding group); --padded: row i i tokens shorter (left padding)
    prompts = [[(7 * i + j) % 500 + 3 for j in range(a.prompt_len - (i if a.padded else 0))] for i in range(a.prompts)]
    params = GenParams(max_new_tokens=a.gen_len)
    counting = Counting(eng.layer_fn)
    eng.layer_fn = counting
    eng.generate(prompts, GenParams(max_new_tokens=2))  # warm-up
    counting.timed.clear()
    wall_ms, cpu_ms = [], []
    for _ in range(a.repeat):  # plain runs: wall and process CPU time of each decode step (the whole model)
        marks: list[tuple[float, float]] = []
        eng.generate(prompts, params, on_step=lambda _n, m=marks: m.append((time.perf_counter(), time.process_time())))
        for (w0, c0), (w1, c1) in zip(marks[1:], marks[2:]):  # marks[0]: the end of the prefill
            wall_ms.append(1000 * (w1 - w0))
            cpu_ms.append(1000 * (c1 - c0))
    layer_us = 1e6 * statistics.median(counting.timed)
    counting.on = True
    with torch.no_grad():
        done = eng.generate(prompts, params)
    eng.close()
    tokens = hashlib.sha256(json.dumps([d.tokens for d in done]).encode()).hexdigest()[:12]
    views = sum(counting.views.values())
    total = sum(counting.ops.values())
    per = counting.calls
    return {"tokens_sha256": tokens, "layer_calls": per, "ops_per_layer_step": total / per,
            "kernel_ops_per_layer_step": (total - views) / per,
            "view_ops_per_layer_step": views / per, "decode_step_ms": statistics.median(wall_ms),
            "decode_step_cpu_ms": statistics.median(cpu_ms), "layer_call_cpu_us": layer_us, "decode_steps_timed": len(wall_ms),
            "ops": {k: round(n / per, 2) for k, n in counting.ops.most_common()},
            "kernel_ops": {k: round((n - counting.views[k]) / per, 2) for k, n in counting.ops.most_common()
                           if n > counting.views[k]}}


def register_tiny(name: str, width: int) -> str:
    """`name`'s layers and heads with heads `width` wide and a 512-token vocabulary, as preset `name`-tiny`width`
    (in this process only): the matmuls shrink until a step's time is mostly per-operator overhead, as in a
    launch-bound GPU decode."""
    c = modelconfig.preset(name)
    h = width * c.num_heads
    modelconfig.PRESETS[f"{name}-tiny{width}"] = replace(c, hidden_size=h, head_dim=0, embed_dim=0, vocab_size=512,
                                                         intermediate_size=(4 if c.architecture == "opt" else 3) * h)
    return f"{name}-tiny{width}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="opt-125m,smollm2-135m", help="dummy: presets, comma separated")
    p.add_argument("--prompts", type=int, default=4, help="sequences in the one micro-batch")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens of the longest prompt (row i has i fewer)")
    p.add_argument("--tiny", type=int, default=0, metavar="WIDTH",
                   help="each preset with heads WIDTH wide and 512 tokens (register_tiny); 0: the preset as it is")
    p.add_argument("--padded", action="store_true", help="prompts of different lengths (row i has i fewer tokens)")
    p.add_argument("--gen-len", type=int, default=9, help="tokens generated (decode steps = gen-len - 1)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the median of their decode steps is reported")
    p.add_argument("--store", type=Path, default=None, help="where the converted presets go (default: a temp dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is work, not spinning)")
    p.add_argument("--top", type=int, default=0, help="also print the N most frequent operators per setup")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import kubeflash_node

    root = a.store or Path(tempfile.mkdtemp(prefix="kf-decode-ops-"))
    print(f"engine: {Path(kubeflash_node.__file__).parent}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for model in a.models.split(","):
        model = register_tiny(model, a.tiny) if a.tiny else model
        store = root / model
        if not (store / "manifest.json").exists():
            print(f"converting dummy:{model} -> {store}", file=sys.stderr, flush=True)
            convert(f"dummy:{model}", store, dtype="float32")
        for label, setup in SETUPS.items():
            t0 = time.perf_counter()
            r = measure(store, setup, a)
            results[f"{model} / {label}"] = r
            print(f"{model:14s} {label:24s} ops/layer/step {r['ops_per_layer_step']:6.1f}: kernels "
                  f"{r['kernel_ops_per_layer_step']:5.1f}, views {r['view_ops_per_layer_step']:5.1f};  "
                  f"ms/step wall {r['decode_step_ms']:6.2f} CPU {r['decode_step_cpu_ms']:6.2f}; "
                  f"layer call CPU {r['layer_call_cpu_us']:6.0f} us  "
                  f"tokens {r['tokens_sha256']}  [{time.perf_counter() - t0:.0f} s]",
                  flush=True)
            if a.top:
                print("    kernels:", ", ".join(f"{k} {n}" for k, n in list(r["kernel_ops"].items())[:a.top]))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
