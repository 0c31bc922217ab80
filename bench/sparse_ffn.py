"""Milliseconds one FFN layer call takes in decode, dense against sparse from the neuron bundles (no model run).

    .venv/bin/python bench/sparse_ffn.py --store /tmp/sph/sd/store --target 0.5 --tokens 16 --rounds 7

For each of --tokens random decode inputs per layer (a layer's calls in order, so the window sees a sequence),
times: `dense`, the three matrix products on the layer's gate/up/down read whole (the streamer's read of those
bytes runs on its own thread and is timed apart, `dense_read`); `slots`, the sparse FFN with the neuron cache's
slot buffer (missing bundles read, copied into the buffer, gathered, then multiplied); `direct`, the sparse FFN
reading the missing bundles into the layer's bundle image on a thread while it multiplies the held ones, piece
by piece. The variants alternate round by round; each reports its fastest round (the least disturbed by other
work on a shared machine), with the mean split of a sparse call (gate, reads, waiting for reads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kubeflash_node.engine import neurons
from kubeflash_node.engine.model import ACTIVATIONS
from kubeflash_node.engine.sparse import for_job
from kubeflash_node.engine.timing import Timings
from kubeflash_node.store.format import load_manifest, tensor_view
from kubeflash_node.store.modelconfig import ModelConfig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True, help="a float32 model store with neuron bundles")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=16, help="decode calls per layer a round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gap", type=int, help="merge gap (default: the cost model's)")
    p.add_argument("--threads", type=int, help="torch compute threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    m = load_manifest(a.store)
    c = ModelConfig.from_dict(m.config)
    layers = [s for s in m.stages if s.startswith("layer_")]
    mats = []
    for s in layers:
        buf = np.memmap(a.store / s, dtype=np.uint8, mode="r")
        mats.append({k: torch.from_numpy(np.array(tensor_view(buf, m.files[s].tensors[k])))
                     for k in ("w_gate", "w_up", "w_down")})
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(a.tokens, 1, 1, c.hidden_size, generator=g) for _ in layers]
    act = ACTIVATIONS[c.hidden_act]
    files = [a.store / s for s in layers]

    def dense() -> dict:
        t0 = time.perf_counter()
        for k in range(a.tokens):  # layer after layer, as decode runs (no layer stays in the CPU's caches)
            for j, w in enumerate(mats):
                h = hs[j][k]
                F.linear(act(F.linear(h, w["w_gate"])) * F.linear(h, w["w_up"]), w["w_down"])
        calls = len(mats) * a.tokens
        t1 = time.perf_counter()
        for _ in range(a.tokens):  # what the streamer reads for these matrices, on its thread, per call
            for f, s in zip(files, layers):
                e = m.files[s].tensors
                lo = min(e[k].offset for k in ("w_gate", "w_up", "w_down"))
                hi = max(e[k].offset + e[k].nbytes for k in ("w_gate", "w_up", "w_down"))
                with open(f, "rb", buffering=0) as fh:
                    fh.seek(lo)
                    fh.readinto(bytearray(hi - lo))
        return {"ms": 1e3 * (t1 - t0) / calls, "read_ms": 1e3 * (time.perf_counter() - t1) / calls}

    def sparse(direct: bool) -> dict:
        neurons.DIRECT = direct
        ffn = for_job(c, a.store, a.target, gap=a.gap)
        ffn.timings = Timings()
        ws = [{"w_gate": w["w_gate"]} for w in mats]
        t0 = time.perf_counter()
        for k in range(a.tokens):
            for j, w in enumerate(ws):
                ffn.ffn(c, w, hs[j][k], j)
        calls = len(mats) * a.tokens
        out = {"ms": 1e3 * (time.perf_counter() - t0) / calls,
               "read_ms": 1e3 * ffn.timings.sec["load_neurons"] / calls,
               "wait_ms": 1e3 * ffn.timings.sec["load_neurons_stall"] / calls,
               "preadv": ffn.bundles.reads / calls, "bytes": ffn.bundles.bytes_read / calls}
        ffn.close()
        return out

    best: dict[str, dict] = {}
    for _ in range(a.rounds):
        for name, f in (("dense", dense), ("slots", lambda: sparse(False)), ("direct", lambda: sparse(True))):
            got = f()
            if name not in best or got["ms"] < best[name]["ms"]:
                best[name] = got
    neurons.DIRECT = True
    print(json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in best.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
