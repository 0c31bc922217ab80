"""Accuracy cost of weight and KV compression on SmolLM2-135M-Instruct, against the uncompressed float32 run.

    .venv/bin/python bench/accuracy.py [--work /tmp/kubeflash-accuracy] [--markdown] [--json FILE]

Per variant: last-position logits after prefill on five chat prompts (max and mean |error|, the max error
relative to the largest reference logit, top-1 agreement), perplexity on a fixed text, and greedy
continuations (prompts identical, mean matching prefix). Perplexity is teacher forced twice: by prefill (one
prefill per prefix, batched) and by decode (one token a step through the KV cache, so KV compression
counts). CPU only; the engine computes in float32, so every difference comes from the compression.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

from kubeflash_node.engine import generate as gen_mod
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.kvcache import make_kv
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.convert import convert
from kubeflash_node.store.format import load_manifest

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea and the moon in autumn, please.",
    "Name three primary colors.",
    "Explain in one sentence why the sky is blue.",
    "Give me a short tip for learning to cook.",
]
TEXT = ("The water cycle describes how water moves through the environment. The sun heats oceans, lakes and "
        "rivers, and some of the water evaporates into the air as vapour. As the vapour rises it cools and "
        "condenses into tiny droplets that form clouds. When the droplets grow heavy enough they fall back to "
        "the ground as rain or snow. Some of this water flows over the land into streams and rivers, some soaks "
        "into the soil to become groundwater, and plants take up part of it through their roots. Eventually "
        "most of the water returns to the sea, and the cycle begins again.")
WEIGHTS = [  # name, quantization, symmetric, group
    ("int8", "int8", False, 64), ("int8-sym", "int8", True, 64), ("int4", "int4", False, 64),
    ("int4-sym", "int4", True, 64), ("int4-g32", "int4", False, 32),
]
KV = [("kv8", 8), ("kv4", 4)]
NEW = 16


def build_stores(work: Path) -> dict[str, Path]:
    """The float32 store (from the GGUF) and each quantized variant (re-quantized from the float32 store)."""
    base = work / "float32"
    if not base.exists():
        convert("builtin:smollm2-135m", base, dtype="float32")
    out = {"float32": base}
    for name, q, sym, group in WEIGHTS:
        out[name] = work / name
        if not out[name].exists():
            convert(str(base), out[name], dtype="float32", quantization=q, symmetric=sym, group=group)
    return out


def chat_ids(tok) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for q in PROMPTS]


def kv_bits(bits: int):
    """Until generate.py hands Policy.kv_bits to make_kv, bind the bits here (the tiers themselves are real)."""
    gen_mod.make_kv = functools.partial(make_kv, bits=bits) if bits != 16 else make_kv


def measure(store: Path, tok, ids, text_ids, policy: Policy, job_dir: Path) -> dict:
    t0 = time.perf_counter()
    e = Engine(store, policy=policy, job_dir=job_dir)
    try:
        logits = e.prefill_logits(ids)  # [N, V]
        prefixes = [text_ids[:i] for i in range(1, len(text_ids))]
        lp = torch.log_softmax(e.prefill_logits(prefixes), dim=-1)  # [T-1, V]
        nll = -lp[torch.arange(len(prefixes)), torch.tensor(text_ids[1:])].mean().item()
        tokens = [c.tokens for c in e.generate(ids, GenParams(max_new_tokens=NEW))]
        nll_decode = decode_nll(e, text_ids)
    finally:
        e.close()
    return {"logits": logits, "ppl": math.exp(nll), "ppl_decode": math.exp(nll_decode), "tokens": tokens,
            "seconds": time.perf_counter() - t0}


def decode_nll(e: Engine, text_ids: list[int]) -> float:
    """Mean NLL of text_ids[1:] fed one token a step through the engine's own schedule and KV tier (the
    engine's step loop with its head collecting logits instead of sampling, the next token forced)."""
    params = GenParams(max_new_tokens=len(text_ids))
    mbs = e._make_block([text_ids[:1]], [0], params)
    nll = []
    for step in range(len(text_ids) - 1):
        logits: list[torch.Tensor] = []
        e._pass(mbs, step=step, params=params, gen=None, stop=None, collect=logits)  # logits [1, V]
        nll.append(-torch.log_softmax(logits[0][0], dim=-1)[text_ids[step + 1]].item())
        mbs[0].out[0].append(text_ids[step + 1])
        mbs[0].mask[:, 1 + step] = 1
    e.kv.close()
    return sum(nll) / len(nll)


def compare(ref: dict, got: dict) -> dict:
    d = (got["logits"] - ref["logits"]).abs()
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) / len(x)
              for x, y in zip(got["tokens"], ref["tokens"])]
    return {"logit_max_abs": d.max().item(), "logit_mean_abs": d.mean().item(),
            "logit_rel_max": d.max().item() / ref["logits"].abs().max().item(),
            "top1_agree": (got["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean().item(),
            "ppl": got["ppl"], "ppl_delta": got["ppl"] / ref["ppl"] - 1, "ppl_decode": got["ppl_decode"],
            "ppl_decode_delta": got["ppl_decode"] / ref["ppl_decode"] - 1,
            "greedy_identical": sum(a == b for a, b in zip(got["tokens"], ref["tokens"])) / len(PROMPTS),
            "greedy_prefix": sum(prefix) / len(prefix), "seconds": got["seconds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kubeflash-accuracy"), help="stores are kept here")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    stores = build_stores(args.work)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stores["float32"] / "tokenizer"))
    ids, text_ids = chat_ids(tok), tok(TEXT)["input_ids"]
    pol = Policy(gpu_batch_size=16, num_gpu_batches=8)
    kv_dir = args.work / "job"
    ref = measure(stores["float32"], tok, ids, text_ids, pol, kv_dir)
    rows = {"float32": compare(ref, ref)}
    for name, *_ in WEIGHTS:
        rows[name] = compare(ref, measure(stores[name], tok, ids, text_ids, pol, kv_dir))
    for name, bits in KV:  # decode reads the compressed cache; prefill (logits, perplexity) does not
        for tier in ("cpu", "disk"):
            kv_bits(bits)
            rows[f"{name}-{tier}"] = compare(ref, measure(stores["float32"], tok, ids, text_ids,
                                                          Policy(gpu_batch_size=16, kv=tier, kv_bits=bits), kv_dir))
            kv_bits(16)
    sizes = {k: load_manifest(v).total_bytes / 2**20 for k, v in stores.items()}
    _print(rows, sizes, len(text_ids), args.markdown)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "store_mib": sizes, "text_tokens": len(text_ids)}, indent=1))
    return 0


def _print(rows: dict, sizes: dict, n_text: int, markdown: bool) -> None:
    cols = ["variant", "store MiB", "logit max abs", "logit mean abs", "rel. max", "top-1",
            f"ppl prefill ({n_text} tok)", "change", "ppl decode", "change", "greedy identical", "greedy prefix",
            "s (CPU)"]
    lines = []
    for k, r in rows.items():
        kv = k.startswith("kv")  # prefill never reads the cache: those columns say nothing about KV compression
        na = "n/a"
        lines.append([k, f"{sizes[k]:.0f}" if k in sizes else na,
                      *([na] * 4 if kv else [f"{r['logit_max_abs']:.4f}", f"{r['logit_mean_abs']:.4f}",
                                             f"{r['logit_rel_max']:.4f}", f"{r['top1_agree']:.0%}"]),
                      *([na] * 2 if kv else [f"{r['ppl']:.3f}", f"{r['ppl_delta']:+.2%}"]),
                      f"{r['ppl_decode']:.3f}", f"{r['ppl_decode_delta']:+.2%}",
                      f"{r['greedy_identical']:.0%}", f"{r['greedy_prefix']:.0%}", f"{r['seconds']:.1f}"])
    if markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        print("\n".join("| " + " | ".join(line) + " |" for line in lines))
        return
    w = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(x) for c, x in zip(cols, w)))
    print("\n".join("  ".join(v.ljust(x) for v, x in zip(line, w)) for line in lines))


if __name__ == "__main__":
    sys.exit(main())
