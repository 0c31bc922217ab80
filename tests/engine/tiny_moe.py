"""The tiny random Qwen3-MoE the MoE engine tests run: 2 layers, hidden 32, 2 of `experts` (16) experts of 16
neurons routed per token, a 97-token vocabulary, transformers' own initialisation (seed 0), saved as config.json +
safetensors under <dir>/hf, and the same converted into the layer store at <dir>/store (float32)."""

from __future__ import annotations

from pathlib import Path

import torch

from kubeflash_node.store.convert import convert

VOCAB = 97


def qwen3_moe(tmp: Path, experts: int = 16, **shape):
    """(model, its directory tmp/hf); `shape` overrides Qwen3MoeConfig fields."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_experts=experts,
                                   num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True), **shape})
    model = Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(tmp / "hf", safe_serialization=True)
    return model, tmp / "hf"


def qwen3_moe_store(tmp: Path, experts: int = 16):
    """(model, the layer store tmp/store it was converted into)."""
    model, hf = qwen3_moe(tmp, experts)
    convert(str(hf), tmp / "store", dtype="float32")
    return model, tmp / "store"
