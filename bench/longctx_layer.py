"""One Llama-3-8B decoder layer (GQA, 32 query / 8 K/V heads) at long context on the GPU: prefill time, decode
step time and peak GPU memory of the attention path as the engine runs it (model.make_batch + llama_layer over
a DeviceKV cache), for the before/after of issue 18 (dense [B,1,S,T] mask vs per-row spans).

Usage: PYTHONPATH=<node-agent of the tree to measure> python3 bench/longctx_layer.py --json OUT.json
Works with the make_batch of either tree (the old one took the compute dtype, the new one the device).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from dataclasses import replace

import torch

from kubeflash_node.engine import model as M
from kubeflash_node.engine.kvcache import DeviceKV
from kubeflash_node.engine.rope import Rope
from kubeflash_node.store.modelconfig import preset

DT = torch.float16
DEV = torch.device("cuda")


def weights(c):
    h, q, kv, f = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    r = lambda *s: torch.randn(*s, device=DEV, dtype=DT) * 0.02  # noqa: E731
    if c.architecture == "opt":  # no biases, no LayerNorm affine (opt_layer takes what the dict holds)
        return {"wq": r(q, h), "wk": r(kv, h), "wv": r(kv, h), "wo": r(h, q), "fc1_w": r(f, h), "fc2_w": r(h, f)}
    return {"attn_norm": torch.ones(h, device=DEV, dtype=DT), "mlp_norm": torch.ones(h, device=DEV, dtype=DT),
            "wq": r(q, h), "wk": r(kv, h), "wv": r(kv, h), "wo": r(h, q), "w_gate": r(f, h), "w_up": r(f, h),
            "w_down": r(h, f)}


def batch_of(mask, start, new):
    if list(inspect.signature(M.make_batch).parameters)[3] == "dtype":
        return M.make_batch(mask.to(DEV), start, new, DT)  # the tree before issue 18
    return M.make_batch(mask, start, new, DEV)


def flops(c, b, s, t):
    h, q, kv, f = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    mm = 2 * b * s * (h * q * 2 + h * kv * 2 + (2 if c.architecture == "opt" else 3) * h * f)
    causal = s * (t - s) + s * (s + 1) / 2  # query-key pairs a causal step computes
    return mm + 4 * b * c.num_heads * c.head_dim * causal


def run(c, w, rope, lengths, gen=8, reps=3):
    b, tp = len(lengths), max(lengths)
    cap = tp + gen
    mask = torch.zeros(b, cap, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, tp - n:tp] = 1
    kv = DeviceKV(device=DEV, dtype=DT, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
    kv.allocate(0, 0, b, cap)
    x = torch.randn(b, tp, c.hidden_size, device=DEV, dtype=DT)
    out = {"batch": b, "prompt": tp, "lengths": sorted(set(lengths))}
    times = []
    for i in range(reps + 1):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        bt = batch_of(mask, 0, tp)
        cs = rope(bt.positions, DT) if rope else None
        if rope:
            bt.rope_at = lambda pos: rope(pos, DT)
        y = M.LAYERS[c.architecture](c, w, x, bt, kv.load(0, 0, 0), cs, layer=0)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base
        del y, bt, cs
    out["prefill_layer_s"] = min(times)
    out["prefill_peak_gib"] = peak / 2**30  # above what was allocated before the step (weights, cache, x)
    out["prefill_tflops"] = flops(c, b, tp, tp) / min(times) / 1e12
    mask[:, tp] = 1
    x1 = torch.randn(b, 1, c.hidden_size, device=DEV, dtype=DT)
    dec = []
    for i in range(21):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        bt = batch_of(mask, tp, 1)
        cs = rope(bt.positions, DT) if rope else None
        M.LAYERS[c.architecture](c, w, x1, bt, kv.load(0, 0, tp), cs, layer=0)
        torch.cuda.synchronize()
        if i:
            dec.append(time.perf_counter() - t0)
    kv_bytes = 2 * b * c.num_kv_heads * (tp + 1) * c.head_dim * 2
    w_bytes = sum(t.numel() * 2 for k, t in w.items() if not k.startswith("fused_"))  # (the parts are views of these)
    out["decode_layer_s"] = sorted(dec)[len(dec) // 2]
    out["decode_floor_s"] = (kv_bytes + w_bytes) / 4.3e12  # one read of the layer's weights and K/V at 4.3 TB/s
    out["decode_efficiency"] = out["decode_floor_s"] / out["decode_layer_s"]
    kv.close()
    return out


def profile(c, w, rope, lengths):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    run(c, w, rope, lengths, reps=1)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        run(c, w, rope, lengths, reps=1)
    print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--label", default="")
    p.add_argument("--preset", default="llama-3-8b", help="a dummy: preset (positions raised to 32K)")
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top GPU kernels of a prefill")
    p.add_argument("--shapes", default="32736;8192x8;ragged", help="prompt shapes: LEN, LENxB, ragged (8 of 4.6K-8K)")
    a = p.parse_args()
    c = replace(preset(a.preset), max_position_embeddings=32768)
    w = weights(c)
    if hasattr(M, "fuse_projections"):  # a tree with fused projections runs them as the engine runs a resident layer
        w = M.fuse_projections(w)
    rope = Rope(c, DEV) if c.architecture == "llama" else None
    rows = []
    shapes = {"ragged": [8192 - 512 * i for i in range(8)]}
    for spec in a.shapes.split(";"):
        if spec not in shapes:  # LEN or LENxB (a named shape such as "ragged" is already there)
            n, _, b = spec.partition("x")
            shapes[spec] = [int(n)] * int(b or 1)
    if a.profile:
        profile(c, w, rope, shapes[a.shapes.split(";")[0]])
    for lengths in (shapes[s] for s in a.shapes.split(";")):
        try:
            r = run(c, w, rope, lengths)
        except torch.OutOfMemoryError as e:
            r = {"batch": len(lengths), "prompt": max(lengths), "error": str(e)[:200]}
        torch.cuda.empty_cache()
        print(a.label, json.dumps(r), flush=True)
        rows.append(r)
    json.dump({"label": a.label, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows},
              open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
