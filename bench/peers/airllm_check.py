#!/usr/bin/env python3
"""Check that AirLLM, as bench/peers/airllm_peer.py drives it, runs the model it is given: its greedy tokens on tiny
OPT and Llama dummy checkpoints must equal transformers' on the same checkpoint. Needs airllm installed
(`pip install --no-deps airllm==4.0.0`); CPU only.

    PYTHONPATH=node-agent:operator python3 bench/peers/airllm_check.py --work /tmp/aircheck
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from airllm_peer import airllm_model, ensure_checkpoint, hf_config
from peer_common import timed_generate
from transformers import AutoModelForCausalLM


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the tiny checkpoints")
    a = p.parse_args()
    failed = 0
    for preset in ("opt-tiny", "llama-tiny"):
        folder = a.work / preset
        config = hf_config(preset)
        ensure_checkpoint(config, folder)
        ids = torch.randint(4, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        ours, _, _ = timed_generate(airllm_model(preset, folder, "cpu"), ids, 5, lambda: None)
        ref = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                            do_sample=False)
        same = torch.equal(ours, want)
        failed += not same
        print(f"{preset}: AirLLM greedy tokens {'equal' if same else 'DIFFER from'} transformers'")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
