"""SSD bytes per decode token of input sparsity with a resident hot set and a window (SmolLM2-135M, real weights, CPU).

Every layer is streamed from the store (policy: nothing resident); with a target the FFN (and, with `+attn`, the
attention) matrices are read per kept channel from the channel files, through engine/channelcache.py where a hot
set or a window is asked for. "SSD bytes / token" is the engine's own counters (Timings bytes of load_weight +
load_neurons: the stage files without the channel-cut matrices, and the channel rows not held) of a run with 1 + N
new tokens minus those of a run with 1, over N: decode steps only, the prefill and the hot set's start-up read left
out. Perplexity is taken with the same FFN settings (thresholds, hot set, window) on held-out text. The hot set is a
share of the FFN bytes (`--hot`); the share the issue's llama-3-8b budgets leave is derived in docs/sparsity.md.

  .venv/bin/python bench/sparse_hot.py --model-dir STORE/models/ID --targets 0.25,0.4 --hot 0,0.228 --windows 0,1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kubeflash_node.engine import sparse
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "GPL-3.txt"


def ffn_bytes(model_dir: Path) -> int:
    """Bytes of every decoder layer's gate, up and down matrices."""
    m = load_manifest(model_dir)
    return sum(e.nbytes for s in m.stages if s.startswith("layer_")
               for n, e in m.files[s].tensors.items() if n in ("w_gate", "w_up", "w_down"))


def make_ffn(model_dir: Path, target, *, attn: bool, hot: int, window: int, cap: int | None = None):
    if target is None:
        return None
    c = ModelConfig.from_dict(load_manifest(model_dir).config)
    ffn = sparse.for_job(c, model_dir, target, hot_bytes=hot, channel_window=window, gap=0, method="input",
                         attention=attn)
    if cap is not None:
        ffn.channels.window_bytes = cap
    return ffn


def decode(model_dir: Path, prompt: list[int], new: int, **kw) -> tuple[float, list[int], dict]:
    """(SSD bytes per decode token, the greedy tokens, the channel cache's figures of the longer run)."""
    got = {}
    for n in (1, 1 + new):
        ffn = make_ffn(model_dir, **kw)
        e = Engine(model_dir, policy=Policy(gpu_batch_size=1), device="cpu", sparsity=ffn)
        try:
            toks = e.generate([prompt], GenParams(max_new_tokens=n))[0].tokens
        finally:
            e.close()
        t = e.timings
        got[n] = (t.bytes["load_weight"] + t.bytes["load_neurons"], toks,
                  (ffn.channel_cache() if ffn is not None else None) or {})
    return (got[1 + new][0] - got[1][0]) / new, got[1 + new][1], got[1 + new][2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True, help="a store entry kubeflash calibrate wrote")
    ap.add_argument("--targets", default="0.25,0.4")
    ap.add_argument("--configs", default="0:0:-,0:1:-,0.228:0:-,0.228:1:-",
                    help="HOT:WINDOW:CAP,...: hot set as a share of the FFN bytes, window in decode calls, the "
                         "window's rows capped at a share of the FFN bytes (- none)")
    ap.add_argument("--dense-ppl", type=float, help="the dense perplexity of an earlier run (not measured again)")
    ap.add_argument("--methods", default="input,input+attn")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--eval-start", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model_dir / "tokenizer"))
    ids = tok(TEXT.read_text())["input_ids"]
    eval_ids = ids[args.eval_start:args.eval_start + args.eval_tokens]
    prompt = eval_ids[:args.prompt_tokens]
    total = ffn_bytes(args.model_dir)
    criterion = cal.load(args.model_dir).criterion  # kubeflash calibrate --criterion: what the thresholds compare
    t0 = time.perf_counter()
    dense_b, dense_toks, _ = decode(args.model_dir, prompt, args.new, target=None, attn=False, hot=0, window=0)
    if args.dense_ppl:
        dense_ppl = args.dense_ppl
    else:
        e = Engine(args.model_dir, policy=Policy(gpu_batch_size=1), device="cpu")
        dense_ppl, _ = sparse.perplexity(e, eval_ids)
        e.close()
    rows = [{"target": None, "method": "dense", "hot_share": 0.0, "window": 0, "ppl": dense_ppl,
             "ssd_bytes_per_token": dense_b, "vs_dense": 1.0, "tokens_equal_dense": True}]
    print(json.dumps(rows[0]), flush=True)
    for target in [float(t) for t in args.targets.split(",")]:
        for method in args.methods.split(","):
            configs = [(float(h), int(w), None if c == "-" else float(c))
                       for h, w, c in (x.split(":") for x in args.configs.split(","))]
            # the cache never changes a number (the test checks): one perplexity, with the largest hot set
            ffn = make_ffn(args.model_dir, target, attn=method == "input+attn",
                           hot=int(max(h for h, _, _ in configs) * total), window=0)
            e = Engine(args.model_dir, policy=Policy(gpu_batch_size=1), device="cpu", sparsity=ffn)
            ppl, _ = sparse.perplexity(e, eval_ids)
            e.close()
            base_toks = None
            for share, window, cap in configs:
                kw = dict(target=target, attn=method == "input+attn", hot=int(share * total), window=window,
                          cap=None if cap is None else int(cap * total))
                b, toks, cache = decode(args.model_dir, prompt, args.new, **kw)
                base_toks = base_toks or toks
                row = {"target": target, "method": method, "criterion": criterion, "hot_share": share, "window": window,
                       "window_cap_share": cap, "ppl": ppl,
                       "ppl_increase_pct": 100 * (ppl / dense_ppl - 1), "ssd_bytes_per_token": b,
                       "vs_dense": dense_b / b, "tokens_equal_no_cache": toks == base_toks,
                       "tokens_equal_dense": toks == dense_toks,
                       "hot_bytes": cache.get("hot_bytes", 0), "peak_held_bytes": cache.get("peak_held_bytes", 0),
                       "held_share_of_ffn": cache.get("peak_held_bytes", 0) / total,
                       "hit_rate": cache.get("hit_rate", 0.0)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"{time.perf_counter() - t0:.0f} s; FFN bytes {total}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ffn_bytes": total, "new": args.new,
                                         "prompt_tokens": args.prompt_tokens}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
