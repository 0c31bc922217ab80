#!/usr/bin/env python3
"""Check that ZeRO-Inference, as bench/peers/zero_inference.py drives it, runs the model it is given: its
logits on a tiny OPT, Llama and Qwen3-MoE shape (CPU, parameters swapped to NVMe files through the async_io op) must match
transformers' on the same weights, gathered back from ZeRO, in the dtype ZeRO computes in (DeepSpeed's CPU accelerator
runs bfloat16), within 1% of the largest logit. Needs deepspeed (0.19.8) and libaio; CPU only.

    PYTHONPATH=node-agent:operator python3 bench/peers/zero_check.py --work /tmp/zerocheck
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from peer_common import timed_generate
from transformers import AutoModelForCausalLM
from zero_inference import peer_config, zero_model


def swap_in_bytes(model, ids: torch.Tensor) -> int:
    """Bytes ZeRO's NVMe parameter swapper reads back while `model` runs one forward over `ids`."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper as Swapper

    real, seen = Swapper.swap_in, [0]

    def counted(self, params, *args, **kwargs):
        seen[0] += sum(p.ds_tensor.ds_numel for p in params) * self.swap_element_size
        return real(self, params, *args, **kwargs)

    Swapper.swap_in = counted
    try:
        with torch.no_grad():
            model(ids)
    finally:
        Swapper.swap_in = real
    return seen[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the NVMe swap files")
    p.add_argument("--presets", nargs="+", default=["opt-tiny", "llama-tiny", "qwen3-moe-tiny"],
                   help="tiny shapes to check (default: %(default)s)")
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29513")):
        os.environ.setdefault(k, v)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    failed = 0
    for preset in a.presets:
        torch.manual_seed(0)
        config = peer_config(preset)
        (a.work / preset).mkdir(parents=True, exist_ok=True)
        model, _ = zero_model(config, a.work / preset, "cpu", torch.float32)
        swapped = sum(f.stat().st_size for f in (a.work / preset).rglob("*.swp"))  # ZeRO keeps tensors < 1 MiB in RAM
        ids = torch.randint(4, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        ours, _, _ = timed_generate(model, ids, 5, lambda: None)
        if config.model_type == "qwen3_moe":  # what one decode forward (one token) reads back from the swap files
            read = swap_in_bytes(model, ids[:1, :1])
            print(f"{preset}: one forward of one token (top-{config.num_experts_per_tok} of {config.num_experts} "
                  f"experts routed) swapped in {read} of the {swapped} bytes in NVMe swap files", flush=True)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        ref.load_state_dict(weights)
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                            do_sample=False)
        with torch.no_grad():
            got = model(ids).logits  # the dtype ZeRO computes in (bfloat16 on the CPU accelerator, fp16 on a GPU)
            exp = ref.to(got.dtype)(ids).logits
        rel = ((got - exp).abs().max() / exp.abs().max()).item()
        same = rel < 1e-2
        failed += not same
        print(f"{preset}: ZeRO-Inference logits over the prompts {'match' if same else 'DIFFER from'} transformers' in "
              f"{got.dtype} (max |diff| / max |logit| = {rel:.1e}, bound 1e-2); greedy tokens "
              f"{'equal' if torch.equal(ours, want) else 'differ (random tiny weights give near-tied logits)'}; "
              f"{swapped} bytes of parameters in NVMe swap files",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
