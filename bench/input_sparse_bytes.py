"""Bytes and reads per decode token: dense, gate-activation sparsity (CATS) and input sparsity (TEAL), CPU.

    .venv/bin/python bench/input_sparse_bytes.py --model smollm2 --work /tmp/isb            # real weights, real text
    .venv/bin/python bench/input_sparse_bytes.py --model llama-3-8b-2l --work /tmp/isb      # llama-3-8b layer shape
    .venv/bin/python bench/input_sparse_bytes.py --model llama-3-8b-2l --methods input,input+attn --batches 1,4

`smollm2`: SmolLM2-135M's real weights (float32), calibrated on the first 2,048 tokens of tests/data/GPL-3.txt,
decoding prompts cut from later in the same text. `llama-3-8b-2l`: two decoder layers of llama-3-8b's shape
(hidden 4096, intermediate 14336, 32/8 heads; random weights, vocabulary 2,048: the bytes, not the accuracy),
calibrated and prompted with random ids. The store gets neuron bundles (the gate method reads them) and
input-channel files (the input method reads them) and attention channel files (method "input+attn": the input
method with the attention's inputs thresholded too, engine/attnsparse.py). Every stage is streamed from disk each
step; for each --batch and method, --new tokens are decoded and the engine's own counts are printed per decode
token: the FFN matrix bytes needed (engine/sparse.py FFNReads: gate whole + an up row and down column per active
neuron; or the kept input channels' gate/up columns + the kept neurons' down columns), the same over one decoder
layer (attention read whole, or with input+attn the kept channels' q/k/v columns + o columns; norms whole), the
bytes the bundle / channel readers' preadv calls returned, and the reads (runs) per layer call. No sparse method
keeps a hot set or a window here (--window 0): bytes needed, not cached.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kubeflash_node.engine.cli_calibrate import calibrate
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.sparse import for_job
from kubeflash_node.store.bundles import write_bundles
from kubeflash_node.store.channels import write_attn_channels, write_channels
from kubeflash_node.store.convert import convert
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "GPL-3.txt"


def make_store(model: str, work: Path) -> tuple[Path, list[int], list[int]]:
    """(store with calibration, bundles and channel files; calibration ids; ids prompts are cut from)."""
    if model == "smollm2":
        sys.path.insert(0, str(ROOT / "bench"))
        from sparsity_accuracy import smollm2_float32

        store, tok = smollm2_float32(work)
        ids = tok(TEXT.read_text())["input_ids"]
        return store, ids[:2048], ids[4096:]
    store = work / "llama-3-8b-2l"
    if not store.exists():
        from transformers import LlamaConfig

        sys.path.insert(0, str(ROOT / "tests" / "engine"))
        from hf_random import save_random_model

        cfg = LlamaConfig(vocab_size=2048, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                          rope_theta=500000.0)
        save_random_model(cfg, work / "hf-llama-3-8b-2l")
        convert(str(work / "hf-llama-3-8b-2l"), store, dtype="float32")
    g = torch.Generator().manual_seed(1)
    return store, torch.randint(0, 2048, (1024,), generator=g).tolist(), torch.randint(0, 2048, (4096,), generator=g).tolist()


def measure(store: Path, c: ModelConfig, method: str, target: float | None, batch: int, prompts, new: int) -> dict:
    ffn = None if method == "dense" else for_job(c, store, target, window=0, gap=0, method=method.split("+")[0],
                                                 attention=method == "input+attn")
    e = Engine(store, policy=Policy(gpu_batch_size=batch), sparsity=ffn)
    try:
        e.generate(prompts, GenParams(max_new_tokens=new))
    finally:
        e.close()
    m = load_manifest(store)
    layer = m.files["layer_000.bin"]
    ffn_dense = sum(layer.tensors[k].nbytes for k in ("w_gate", "w_up", "w_down"))
    attn_dense = sum(layer.tensors[k].nbytes for k in ("wq", "wk", "wv", "wo"))
    steps = e.stats["decode_passes"]
    out = {"method": method, "target": target, "batch": batch,
           "weights_read_per_token": e.stats["decode_weight_bytes"] / (steps * batch)}
    if ffn is None:
        return out | {"ffn_per_token": ffn_dense / batch, "layer_per_token": layer.size / batch,
                      "attn_per_token": attn_dense / batch, "attn_dropped": 0.0,
                      "read_from_files_per_layer_token": 0, "runs_per_layer_call": 1, "dropped": 0.0}
    s = ffn.reads.summary()
    d = s["decode"]
    need = d["ffn_bytes_per_layer_token_sparse"]
    files, runs = d.get("bundle_bytes_per_layer_token", 0), d["runs_per_layer_call"]
    attn = {"attn_per_token": attn_dense / batch, "attn_dropped": 0.0}
    if ffn.attention is not None:
        a = ffn.attention.summary()
        ad = a["decode"]
        attn = {"attn_per_token": ad["attn_bytes_per_layer_token_sparse"], "attn_dropped": a["token_sparsity"]}
        files += ad.get("channel_bytes_per_layer_token", 0)
        runs += ad["runs_per_layer_call"]
        assert ad["attn_bytes_per_layer_token_dense"] == attn_dense / batch
    ffn.close()
    return out | attn | {"ffn_per_token": need, "read_from_files_per_layer_token": files, "runs_per_layer_call": runs,
                         "layer_per_token": (layer.size - ffn_dense - attn_dense) / batch + need
                         + attn["attn_per_token"], "dropped": s["token_sparsity"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "llama-3-8b-2l"], default="smollm2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kubeflash-isb"))
    ap.add_argument("--targets", default="0.4,0.5,0.6")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--methods", default="gate,input",
                    help="sparse methods, comma-separated, beside dense: gate, input (FFN only), input+attn (FFN and "
                         "attention inputs; writes the attention channel files)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=5, help="tokens generated (the first is prefill)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    store, cal_ids, text = make_store(a.model, a.work)
    targets = [float(t) for t in a.targets.split(",")]
    c = ModelConfig.from_dict(load_manifest(store).config)
    _, freq = calibrate(store, cal_ids, tuple(targets), window=512)
    write_bundles(store, freq)
    write_channels(store)
    methods = a.methods.split(",")
    if not set(methods) <= {"gate", "input", "input+attn"}:
        ap.error(f"--methods {a.methods}: expected gate, input and/or input+attn")
    if "input+attn" in methods:
        write_attn_channels(store)
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        prompts = [text[i * a.prompt:(i + 1) * a.prompt] for i in range(b)]
        rows.append(measure(store, c, "dense", None, b, prompts, a.new))
        for t in targets:
            for method in methods:
                rows.append(measure(store, c, method, t, b, prompts, a.new))
                print(f"  batch {b} {method} {t}: done", file=sys.stderr)
    print(table(rows, a.model))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


def table(rows, model: str) -> str:
    dense = {r["batch"]: r for r in rows if r["method"] == "dense"}
    lines = [f"{model}: per decode token, MiB (and share of dense)",
             "| batch | method | target | dropped (FFN / attn) | FFN bytes / layer | attention bytes / layer "
             "| layer bytes / layer | read from files / layer | reads / layer call | weights read / token (engine) |",
             "|" + "---|" * 10]
    for r in rows:
        d = dense[r["batch"]]
        mib = 2 ** 20
        lines.append(f"| {r['batch']} | {r['method']} | {r['target'] if r['target'] is not None else '-'} | "
                     f"{100 * r['dropped']:.1f}% / {100 * r['attn_dropped']:.1f}% | {r['ffn_per_token'] / mib:.2f} "
                     f"({100 * r['ffn_per_token'] / d['ffn_per_token']:.0f}%) | {r['attn_per_token'] / mib:.2f} "
                     f"({100 * r['attn_per_token'] / d['attn_per_token']:.0f}%) | {r['layer_per_token'] / mib:.2f} "
                     f"({100 * r['layer_per_token'] / d['layer_per_token']:.0f}%) | "
                     f"{r['read_from_files_per_layer_token'] / mib:.2f} | {r['runs_per_layer_call']:g} | "
                     f"{r['weights_read_per_token'] / mib:.1f} "
                     f"({100 * r['weights_read_per_token'] / d['weights_read_per_token']:.0f}%) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
