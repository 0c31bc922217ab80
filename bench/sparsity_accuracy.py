"""Accuracy and FFN bytes of activation sparsity on SmolLM2-135M-Instruct (real weights, float32, CPU).

    .venv/bin/python bench/sparsity_accuracy.py [--work /tmp/kubeflash-sparsity] [--json FILE]
    .venv/bin/python bench/sparsity_accuracy.py --targets 0.25,0.4,0.5 --methods input,input+attn   # FFN vs FFN+attention

Calibrates (as `kubeflash calibrate` does) on the first --cal-tokens tokens of tests/data/GPL-3.txt, then per
target sparsity measures on held-out tokens of the same text (from --eval-start on, windows of 512 tokens):
perplexity, top-1 agreement with dense (teacher forced), the share of neuron activations actually dropped, and
greedy continuations of chat prompts against dense (mean matching prefix, and all tokens equal). Bytes: the FFN
matrix bytes a decode step at batch 1 needs (gate whole + an up row and a down column per active neuron) over
what dense reads, counted by engine/sparse.py's FFNReads during the greedy runs; the same measured: the gate
plus the bytes the neuron-bundle reader's preadv calls returned (store/bundles.py, one read per run of
consecutive active neurons, "reads / layer"); and the whole model's layer bytes (attention and norms in full).

Each target is measured twice: method "gate" (CATS: threshold on act(gate(h)), gate read whole, neuron bundles)
and method "input" (TEAL: thresholds on the FFN input before gate/up and on the intermediate before down, the
kept columns read from the input-channel files, store/channels.py), from the same calibration run; with --methods
also "input+attn": the input method with the attention's inputs thresholded too (before q/k/v and before o,
engine/attnsparse.py, the kept columns read from the attention channel files), whose layer bytes count the
attention's kept columns instead of the whole attention. With --allocations uniform,greedy each input method is
measured with both allocations of the target: every layer and input at the target, and TEAL's greedy per-layer
allocation (engine/allocate.py, `kubeflash calibrate --allocation greedy`; the layer errors measured once on the
first 128 calibration tokens, shared out over the FFN's inputs for input, the attention's too for input+attn).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from accuracy import PROMPTS as ACCURACY_PROMPTS  # bench/accuracy.py, beside this script

from kubeflash_node.engine import allocate, sparse
from kubeflash_node.engine.allocate import ALLOCATIONS
from kubeflash_node.engine.attnsparse import SparseAttention
from kubeflash_node.engine.cli_calibrate import calibrate
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.bundles import BundleReader, write_bundles
from kubeflash_node.store.channels import AttnChannelReader, ChannelReader, write_attn_channels, write_channels
from kubeflash_node.store.convert import convert
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "GPL-3.txt"
TARGETS = (0.0, 0.25, 0.4, 0.5, 0.6)
PROMPTS = [*ACCURACY_PROMPTS, "What does a compiler do?"]  # bench/accuracy.py's prompts, and one more


def smollm2_float32(work: Path):
    """(SmolLM2-135M converted to a float32 store under `work`, once; its tokenizer)."""
    store = work / "smollm2-float32"
    if not store.exists():
        convert("builtin:smollm2-135m", store, dtype="float32")
    from transformers import AutoTokenizer

    return store, AutoTokenizer.from_pretrained(str(store / "tokenizer"))


def greedy(store: Path, prompts, new: int, ffn) -> list[list[int]]:
    # streamed: layers come without their bundled / channel-cut matrices, those read per active neuron or channel
    bundled = ffn is not None and (ffn.bundles is not None or ffn.channels is not None)
    e = Engine(store, policy=Policy(weights_gpu_percent=0 if bundled else 100, gpu_batch_size=1), sparsity=ffn)
    try:
        return [c.tokens for c in e.generate(prompts, GenParams(max_new_tokens=new))]
    finally:
        e.close()


def prefix_match(a: list[int], b: list[int]) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), 1)


def layer_bytes(store: Path) -> tuple[int, int, int]:
    """(bytes of one decoder layer's stage file, of which the three FFN matrices, of which the four attention ones)."""
    m = load_manifest(store)
    f = m.files[[s for s in m.stages if s.startswith("layer_")][0]]
    ffn = sum(e.nbytes for n, e in f.tensors.items() if n in ("w_gate", "w_up", "w_down"))
    return f.size, ffn, sum(e.nbytes for n, e in f.tensors.items() if n in ("wq", "wk", "wv", "wo"))


def _attention(store: Path, target: float, n_layers: int, method: str, reader=None):
    if method != "input+attn":
        return None
    ths = cal.attention_thresholds_for(store, target, num_layers=n_layers, field="target")
    return SparseAttention(ths, num_layers=n_layers, channels=reader)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kubeflash-sparsity"))
    ap.add_argument("--cal-tokens", type=int, default=2048)
    ap.add_argument("--eval-start", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32, help="greedy tokens per chat prompt")
    ap.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS), help="target sparsities, comma-separated")
    ap.add_argument("--methods", default="gate,input",
                    help="gate, input (FFN inputs) and/or input+attn (FFN and attention inputs), comma-separated")
    ap.add_argument("--allocations", default="uniform",
                    help="uniform and/or greedy (engine/allocate.py: per layer and input, over the FFN's inputs for "
                         "method input, the attention's too for input+attn), comma-separated")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    targets = tuple(sorted({float(t) for t in args.targets.split(",")}))
    methods = args.methods.split(",")
    if not set(methods) <= {"gate", "input", "input+attn"}:
        ap.error(f"--methods {args.methods}: expected gate, input and/or input+attn")
    allocations = args.allocations.split(",")
    if not set(allocations) <= set(ALLOCATIONS) or (set(allocations) - {"uniform"} and "gate" in methods):
        ap.error(f"--allocations {args.allocations}: expected some of {', '.join(ALLOCATIONS)} (greedy ones: input "
                 "methods only)")
    store, tok = smollm2_float32(args.work)
    ids = tok(TEXT.read_text())["input_ids"]
    cal_ids, eval_ids = ids[:args.cal_tokens], ids[args.eval_start:args.eval_start + args.eval_tokens]
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                     return_dict=True)["input_ids"] for q in PROMPTS]
    t0 = time.perf_counter()
    _, rec = calibrate(store, cal_ids, targets, window=512, recorder=True)
    cals = {("uniform", m): cal.load(store) for m in methods}
    if set(allocations) - {"uniform"}:  # the layers' errors measured once, shared out over the FFN's (and attention's) inputs
        config, t1 = ModelConfig.from_dict(load_manifest(store).config), time.perf_counter()
        errors = allocate.measure(store, rec, cal_ids[:allocate.EVAL_TOKENS], attention=True)
        print(f"greedy allocation: layer errors on {allocate.EVAL_TOKENS} tokens in {time.perf_counter() - t1:.0f} s",
              file=sys.stderr)
        for a, m in [(a, m) for a in allocations if a != "uniform" for m in methods]:
            ins, att, lev = allocate.greedy(rec, errors, config, targets, attention=m == "input+attn",
                                            per_layer=a == "greedy")
            cals[a, m] = replace(cals["uniform", m], inputs=ins, attention=att, allocation=a, levels=lev)
    write_bundles(store)
    write_channels(store)
    write_attn_channels(store)
    print(f"calibrated on {len(cal_ids)} tokens in {time.perf_counter() - t0:.0f} s; evaluating on "
          f"{len(eval_ids)} tokens (tokens {args.eval_start}..), {len(PROMPTS)} prompts x {args.new} greedy tokens",
          file=sys.stderr)
    n_layers = load_manifest(store).num_layers
    resident = Policy(weights_gpu_percent=100)
    e = Engine(store, policy=resident)
    dense_ppl, dense_top = sparse.perplexity(e, eval_ids)
    e.close()
    dense_out = greedy(store, chats, args.new, None)
    layer, ffn_bytes, attn_bytes = layer_bytes(store)
    rows = [{"sparsity": "off (dense)", "ppl": dense_ppl, "ppl_increase_pct": 0.0, "top1_agreement": 1.0,
             "token_sparsity": 0.0, "greedy_prefix": 1.0, "greedy_identical": len(chats), "ffn_read_fraction": 1.0,
             "ffn_read_fraction_measured": 1.0, "layer_read_fraction": 1.0, "runs_per_layer_call": 1,
             "method": "-", "attn_read_fraction": 1.0}]
    for alloc, target, method in [(a, t, m) for t in targets for m in methods for a in allocations]:
        cal.save(store, cals[alloc, method])
        th = cal.thresholds_for(store, target, num_layers=n_layers, field="target")
        ins = cal.input_thresholds_for(store, target, num_layers=n_layers, field="target") \
            if method.startswith("input") else None
        ffn = sparse.SparseFFN(th, num_layers=n_layers, target=target, inputs=ins,
                               attention=_attention(store, target, n_layers, method))
        e = Engine(store, policy=resident, sparsity=ffn)
        ppl, top = sparse.perplexity(e, eval_ids)
        e.close()
        tf_sparsity = ffn.reads.summary()["token_sparsity"]
        reader = BundleReader(store) if method == "gate" else ChannelReader(store)
        dec = sparse.SparseFFN(th, num_layers=n_layers, target=target, inputs=ins,
                               **({"bundles": reader} if method == "gate" else {"channels": reader}),
                               attention=_attention(store, target, n_layers, method, AttnChannelReader(store)))
        out = greedy(store, chats, args.new, dec)
        dec.close()
        attn = dec.attention.summary()["decode"]["attn_read_fraction"] if dec.attention is not None else 1.0
        d = dec.reads.summary()["decode"]
        frac = d["ffn_read_fraction"]
        gate = d["ffn_bytes_per_layer_token_dense"] / 3 if method == "gate" else 0  # CATS reads the gate whole
        measured = (gate + d["bundle_bytes_per_layer_token"]) / d["ffn_bytes_per_layer_token_dense"]
        rows.append({"sparsity": target, "method": method, "allocation": alloc, "ppl": ppl,
                     "ppl_increase_pct": 100 * (ppl / dense_ppl - 1),
                     "top1_agreement": float((top == dense_top).float().mean()), "token_sparsity": tf_sparsity,
                     "greedy_prefix": sum(prefix_match(d, s) for d, s in zip(dense_out, out)) / len(chats),
                     "greedy_identical": sum(d == s for d, s in zip(dense_out, out)), "ffn_read_fraction": frac,
                     "layer_read_fraction": (layer - ffn_bytes * (1 - frac) - attn_bytes * (1 - attn)) / layer,
                     "attn_read_fraction": attn,
                     "runs_per_layer_call": d["runs_per_layer_call"], "ffn_read_fraction_measured": measured,
                     "bundle_bytes_per_layer_token": d["bundle_bytes_per_layer_token"]})
        print(f"  target {target} {method} {alloc}: done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(rows, len(chats), args.new))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "eval_tokens": len(eval_ids), "cal_tokens": len(cal_ids),
                                         "layer_bytes": layer, "ffn_bytes": ffn_bytes}, indent=1))
    return 0


def table(rows, n_prompts: int, new: int) -> str:
    head = ("| target | method | allocation | perplexity | vs dense | top-1 = dense | dropped activations | "
            "greedy prefix = dense | "
            f"greedy identical (of {n_prompts} x {new}) | FFN bytes / token (counted) | FFN bytes / token (read "
            "from bundles) | reads / layer | attention bytes / token | layer bytes / token |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        t = r["sparsity"] if isinstance(r["sparsity"], str) else f"{r['sparsity']:.2f}"
        lines.append(f"| {t} | {r['method']} | {r.get('allocation', '-')} | {r['ppl']:.3f} | {r['ppl_increase_pct']:+.2f}% | "
                     f"{100 * r['top1_agreement']:.1f}% | "
                     f"{100 * r['token_sparsity']:.1f}% | {100 * r['greedy_prefix']:.1f}% | {r['greedy_identical']} | "
                     f"{100 * r['ffn_read_fraction']:.1f}% | {100 * r['ffn_read_fraction_measured']:.1f}% | "
                     f"{r['runs_per_layer_call']} | {100 * r.get('attn_read_fraction', 1.0):.1f}% | "
                     f"{100 * r['layer_read_fraction']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
