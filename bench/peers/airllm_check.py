#!/usr/bin/env python3
"""Check that AirLLM, as bench/peers/airllm_peer.py drives it, runs the model it is given, both ways the script
serves the weights. On tiny OPT and Llama shapes (CPU):
- via a Hugging Face checkpoint that AirLLM splits itself: AirLLM's logits (fp16) are within 1% of the largest of
  transformers' (float32) and its greedy tokens equal transformers';
- via the split files airllm_peer.py writes directly: AirLLM accepts them without splitting anything (no file in
  the folder changes), they hold the same files, tensor names, shapes and dtypes as AirLLM's own split, and
  AirLLM's logits and greedy tokens agree with transformers' loading the same folder (the same tests; the direct
  values repeat per shape, so greedy tokens often repeat: the logits test is the sharp one there);
- AirLLM keeps a KV cache: the first forward takes the whole prompt, each later one a single position, and every
  forward reads the whole model's streamed files again.
With --fp16-shape PRESET (e.g. opt-13b) it also runs transformers in fp16 on CPU at that real shape with the direct
split's values (one buffer per shape, shared, so ~1 GB of memory) and checks the logits are finite.
Needs airllm (`pip install --no-deps --target DIR airllm==4.0.0`, DIR on PYTHONPATH).

    PYTHONPATH=node-agent:operator:DIR python3 bench/peers/airllm_check.py --work /tmp/aircheck [--fp16-shape opt-13b]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from airllm_peer import (
    SPLIT,
    airllm_model,
    airllm_split,
    dummy_values,
    empty_state,
    ensure_checkpoint,
    ensure_split,
    hf_config,
    layer_names,
    trace_forwards,
)
from peer_common import timed_generate
from transformers import AutoModelForCausalLM


def file_layout(split: Path) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """{split file: {tensor: (dtype, shape)}} read from each safetensors header."""
    out = {}
    for f in sorted(split.glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        out[f.name] = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under `folder`: what a split or a rewrite would change."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def greedy(preset: str, folder: Path, ids: torch.Tensor, records: list | None = None):
    """AirLLM's greedy 5 tokens over `folder` and transformers' (float32) on the same folder, then the largest
    difference of their logits over `ids` relative to the largest logit (AirLLM computes in fp16)."""
    model = airllm_model(preset, folder, "cpu")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(ids).logits
        gap = (model(ids).logits.float() - theirs).abs().max().item() / theirs.abs().max().item()
    if records is not None:
        trace_forwards(model, lambda: None, lambda line: None, records)
    ours, _, _ = timed_generate(model, ids, 5, lambda: None)
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                        do_sample=False)
    return ours, want, gap


def check_preset(preset: str, work: Path) -> int:
    failed = 0

    def report(ok: bool, what: str) -> None:
        nonlocal failed
        failed += not ok
        print(f"{preset}: {'ok  ' if ok else 'FAIL'} {what}")

    config = hf_config(preset)
    ids = torch.randint(4, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    hf = work / preset / "hf"
    ensure_checkpoint(config, hf)
    ours, want, gap = greedy(preset, hf, ids)
    report(gap < 0.01, f"via a HF checkpoint split by AirLLM: logits within {gap:.2%} of transformers' largest")
    report(torch.equal(ours, want), f"via a HF checkpoint split by AirLLM: greedy tokens equal transformers' "
                                    f"{want[:, 16:].tolist()}")

    direct = work / preset / "direct"
    ensure_split(config, preset, direct)
    before = snapshot(direct)
    airllm_split(preset, direct)
    records: list[dict] = []
    ours, want, gap = greedy(preset, direct, ids, records)
    report(snapshot(direct) == before, "direct split files: AirLLM accepted them, no file in the folder changed")
    report(file_layout(direct / SPLIT) == file_layout(hf / SPLIT),
           "direct split files: same files, tensor names, shapes and dtypes as AirLLM's own split")
    report(gap < 0.01, f"direct split files: logits within {gap:.2%} of transformers' largest")
    report(torch.equal(ours, want), f"direct split files: greedy tokens equal transformers' {want[:, 16:].tolist()}")

    streamed = sum(f.stat().st_size for f in (direct / SPLIT).glob("*.safetensors")
                   if f.name[:-len(".safetensors")] not in layer_names(preset).get("resident", []))
    shapes = [r["tokens"] for r in records]
    report(shapes == [[2, 16]] + [[2, 1]] * 4,
           f"KV cache: forward inputs {shapes} (the prompt once, then one position per token)")
    # each forward reads every streamed module's tensors again (the files less their headers)
    read = [r["read_bytes"] for r in records]
    report(all(streamed - 4096 * 50 < b <= streamed for b in read),
           f"every forward re-reads the whole model: {read} tensor bytes per forward, streamed files {streamed} B")
    return failed


def fp16_shape(preset: str, tokens: int) -> int:
    """transformers in fp16 on CPU at `preset`'s real shape with the direct split's values: finite logits?"""
    config = hf_config(preset)
    value = dummy_values(0)
    state = {name: value(name, t.shape) for name, t in empty_state(config).items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(state, assign=True)
    model.eval()
    ids = torch.randint(4, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    peak = max(h.abs().max().item() for h in out.hidden_states)
    finite = bool(torch.isfinite(out.logits).all())
    print(f"{preset} fp16 on CPU, {tokens} tokens ({time.perf_counter() - start:.0f} s): logits "
          f"{'finite' if finite else 'NOT FINITE'}, |logit| <= {out.logits.abs().max().item():.2f}, "
          f"largest hidden-state value {peak:.1f} (fp16 max 65504)")
    return 0 if finite else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the tiny models' weights")
    p.add_argument("--fp16-shape", metavar="PRESET", help="also check finite fp16 logits at this real shape, e.g. "
                                                          "opt-13b (CPU, minutes)")
    p.add_argument("--fp16-tokens", type=int, default=8, metavar="N", help="prompt tokens of that check (default 8)")
    a = p.parse_args()
    failed = sum(check_preset(preset, a.work) for preset in ("opt-tiny", "llama-tiny"))
    if a.fp16_shape:
        failed += fp16_shape(a.fp16_shape, a.fp16_tokens)
    print("all checks passed" if not failed else f"{failed} checks FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
