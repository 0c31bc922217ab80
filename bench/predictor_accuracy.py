"""The low-rank activation predictor against the threshold rule on SmolLM2-135M-Instruct (real weights, float32, CPU).

    .venv/bin/python bench/predictor_accuracy.py [--work /tmp/kubeflash-predictor] [--targets 0.2,0.25]
        [--ranks 128,256,384] [--recalls 0.99,0.95] [--json FILE]

Calibrates as `kubeflash calibrate` does on the calibration text packaged with kubeflash (engine/data/
calibration.txt, up to --cal-tokens tokens; thresholds and up to 4,096 FFN inputs a layer), then measures on
held-out text of another kind (tests/data/GPL-3.txt, its first --eval-tokens tokens, windows of 512):

- per target, the threshold rule alone (the gate read whole): perplexity against dense, and the share of neuron
  activations dropped;
- per target, rank and recall (the share of active neurons the cut is set to keep, on calibration tokens the fit
  did not see): per layer, the recall of the truly active neurons and the share of neurons the predictor selects,
  on the held-out text; the layers the calibration rule would use it in; and perplexity with the predictor
  deciding in every layer (a neuron computed only where predicted and above the threshold).

"FFN bytes / token" is what a decode step at batch 1 reads of the FFN matrices, over dense: the gate rows of the
selected neurons (all of them for the threshold rule) plus an up row and a down column per computed neuron.
"Predictor / gate" is the predictor's resident size (A and B, r x (H + I) numbers) over the gate matrix's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sparsity_accuracy import smollm2_float32

from kubeflash_node.engine import predictor, sparse
from kubeflash_node.engine.autocalib import TEXT as CAL_TEXT
from kubeflash_node.engine.cli_calibrate import calibrate, gate_matrices
from kubeflash_node.engine.generate import Engine
from kubeflash_node.engine.model import ACTIVATIONS
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
EVAL_TEXT = ROOT / "tests" / "data" / "GPL-3.txt"
RESIDENT = Policy(weights_gpu_percent=100)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def ppl(store: Path, ids: list[int], ffn=None) -> float:
    e = Engine(store, policy=RESIDENT, sparsity=ffn)
    try:
        return sparse.perplexity(e, ids)[0]
    finally:
        e.close()


def held_inputs(store: Path, ids: list[int], layers: int) -> list[torch.Tensor]:
    """Each layer's FFN inputs [N, H] over the held-out tokens (every one while N <= sparse.PRED_TOKENS)."""
    rec = sparse.SparseFFN.recorder(layers)
    e = Engine(store, policy=RESIDENT, sparsity=rec)
    try:
        for part in sparse.windows(ids, 512):
            sparse.sequence_logits(e, part)
    finally:
        e.close()
    return [torch.cat(v).float() for v in rec.inputs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kubeflash-predictor"))
    ap.add_argument("--cal-tokens", type=int, default=16384, help="of the packaged calibration text (it has ~8.8K)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--targets", type=floats, default=[0.2, 0.25])
    ap.add_argument("--ranks", type=lambda t: [int(v) for v in t.split(",")], default=[128, 256, 384])
    ap.add_argument("--recalls", type=floats, default=[0.99, 0.95])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    store, tok = smollm2_float32(args.work)
    cal_ids = tok(CAL_TEXT.read_text())["input_ids"][:args.cal_tokens]
    eval_ids = tok(EVAL_TEXT.read_text())["input_ids"][:args.eval_tokens]
    c = ModelConfig.from_dict(load_manifest(store).config)
    act, gates = ACTIVATIONS[c.hidden_act], gate_matrices(store)
    t0 = time.perf_counter()
    _, rec = calibrate(store, cal_ids, tuple(args.targets), window=512, recorder=True)
    inputs = [torch.cat(v) for v in rec.inputs]
    held = held_inputs(store, eval_ids, c.num_layers)
    dense = ppl(store, eval_ids)
    print(f"calibrated on {len(cal_ids)} tokens ({inputs[0].shape[0]} FFN inputs a layer), held out {len(eval_ids)}; "
          f"dense perplexity {dense:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    gate_share = c.intermediate_size * c.hidden_size
    rows = []
    for target in args.targets:
        th = rec.thresholds_at((target,))[target]
        ffn = sparse.SparseFFN(th, num_layers=c.num_layers, target=target)
        p = ppl(store, eval_ids, ffn)
        kept = 1 - ffn.reads.summary()["token_sparsity"]
        rows.append({"target": target, "rule": "threshold", "ppl": p, "ppl_increase_pct": 100 * (p / dense - 1),
                     "kept": kept, "selected": 1.0, "recall": 1.0, "ffn_bytes": 1 / 3 + 2 / 3 * kept,
                     "predictor_over_gate": 0.0})
        print(line(rows[-1]), file=sys.stderr)
        for rank in args.ranks:
            for want in args.recalls:
                pred = predictor.fit(inputs, gates, th, act, rank=rank, recall=want)
                got = [predictor.measure(held[j], torch.from_numpy(gates[j]), torch.from_numpy(pred.a[j]),
                                         torch.from_numpy(pred.b[j]), th[j], float(pred.cut[j]), act)
                       for j in range(c.num_layers)]
                recall, share = (np.array(v) for v in zip(*got))
                used = int(pred.use.sum())
                pred.use[:] = True  # deciding in every layer, for the perplexity
                ffn = sparse.SparseFFN(th, num_layers=c.num_layers, target=target).with_predictor(pred, None)
                p = ppl(store, eval_ids, ffn)
                kept = 1 - ffn.reads.summary()["token_sparsity"]
                rows.append({"target": target, "rule": f"rank {rank}, cut at recall {want:g}", "rank": rank,
                             "cut_recall": want, "ppl": p, "ppl_increase_pct": 100 * (p / dense - 1), "kept": kept,
                             "selected": float(share.mean()), "recall": float(recall.mean()),
                             "recall_min": float(recall.min()), "ffn_bytes": float(share.mean()) / 3 + 2 / 3 * kept,
                             "predictor_over_gate": rank * (c.hidden_size + c.intermediate_size) / gate_share,
                             "layers_used_by_rule": used, "calibration_recall": pred.recall.tolist(),
                             "calibration_share": pred.share.tolist(), "held_recall": recall.tolist(),
                             "held_share": share.tolist()})
                print(line(rows[-1]), file=sys.stderr)
    print(f"dense perplexity {dense:.3f} on {len(eval_ids)} held-out tokens")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"dense_ppl": dense, "cal_tokens": len(cal_ids), "eval_tokens": len(eval_ids),
                                         "rows": rows}, indent=1))
    return 0


def line(r: dict) -> str:
    return (f"  {r['target']:g} {r['rule']}: ppl {r['ppl']:.3f} ({r['ppl_increase_pct']:+.2f}%), recall "
            f"{100 * r['recall']:.1f}%, selected {100 * r['selected']:.1f}%, FFN bytes {100 * r['ffn_bytes']:.1f}%")


def table(rows) -> str:
    lines = ["| target | selection | held-out recall (layer mean, min) | neurons selected | neurons computed | "
             "FFN bytes / token | predictor / gate | layers the rule uses | perplexity | vs dense |",
             "|" + "---|" * 10]
    for r in rows:
        rec = f"{100 * r['recall']:.1f}%" + (f", {100 * r['recall_min']:.1f}%" if "recall_min" in r else "")
        used = str(r.get("layers_used_by_rule", "-"))
        lines.append(f"| {r['target']:g} | {r['rule']} | {rec} | {100 * r['selected']:.1f}% | {100 * r['kept']:.1f}% | "
                     f"{100 * r['ffn_bytes']:.1f}% | {100 * r['predictor_over_gate']:.0f}% | {used} | "
                     f"{r['ppl']:.3f} | {r['ppl_increase_pct']:+.2f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
