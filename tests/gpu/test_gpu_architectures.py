"""On the GPU: the newer families (Qwen3, Phi-3, Gemma 2/3, Mixtral, Qwen3-MoE) compute on CUDA what the CPU engine
computes (the CPU engine is checked against transformers in tests/engine/test_config_parity.py).

Each real-size dummy preset is shrunk to a few MB (same family options: q/k norms, soft caps, local RoPE, sliding
layers, experts) and stored in float16; the CUDA run (float16: flash kernels with Gemma's attention scale, the
masked soft-capped path, routed experts read from disk onto the device) must give the CPU run's logits (float32
over the same float16 weights) within float16 error, with routed and with every expert read.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import modelconfig
from kubeflash_node.store.convert import convert

PRESETS = ["qwen3-8b", "qwen3-30b-a3b", "mixtral-8x7b", "phi-3-mini-4k", "gemma-2-9b", "gemma-3-4b"]


def _small(c: modelconfig.ModelConfig) -> modelconfig.ModelConfig:
    return replace(c, vocab_size=512, hidden_size=256, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                   head_dim=64, num_experts=min(c.num_experts, 8), num_experts_per_tok=min(c.num_experts_per_tok, 2),
                   sliding_window=min(c.sliding_window, 16), window_layers=[j for j in c.window_layers if j < 4],
                   eos_token_id=[], bos_token_id=None, pad_token_id=None, embed_scale=16.0 if c.embed_scale else 0.0)


def _logits(store, device: str, **policy) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (7, 40, 93)]
    engine = Engine(store, policy=Policy(gpu_batch_size=3, **policy), device=device)
    try:
        return engine.prefill_logits(prompts).float().cpu()
    finally:
        engine.close()


@pytest.mark.parametrize("name", PRESETS)
def test_cuda_matches_cpu(name, tmp_path, monkeypatch):
    monkeypatch.setitem(modelconfig.PRESETS, "tiny", _small(modelconfig.PRESETS[name]))
    convert("dummy:tiny", tmp_path / "store", dtype="float16")
    cpu = _logits(tmp_path / "store", "cpu")
    scale = cpu.abs().max()
    for every in (False, True):
        gpu = _logits(tmp_path / "store", "cuda", all_experts=every)
        assert (gpu - cpu).abs().max() <= 2e-2 * scale, (name, every, float((gpu - cpu).abs().max()), float(scale))
    tokens = []
    for every in (False, True):  # decode steps on CUDA (one-row masks, soft caps, routed experts per step)
        engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=2, all_experts=every), device="cuda")
        try:
            tokens.append([c.tokens for c in engine.generate([[5, 6, 7] * 9, [9] * 30], GenParams(max_new_tokens=8))])
        finally:
            engine.close()
    assert tokens[0] == tokens[1] and all(len(t) == 8 for t in tokens[0])
