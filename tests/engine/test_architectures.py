"""Every supported architecture, random weights: our last-position logits match transformers' in float32."""

from __future__ import annotations

import pytest
import torch
from hf_random import left_padded, save_random_model

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.convert import convert

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=256)


def _configs():
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    return {
        "llama-gqa-llama3-rope": LlamaConfig(**SMALL, num_key_value_heads=2, rope_scaling=llama3, rope_theta=500000.0),
        "llama-mha-tied": LlamaConfig(**SMALL, num_key_value_heads=4, tie_word_embeddings=True),
        "qwen2-qkv-bias": Qwen2Config(**SMALL, num_key_value_heads=2, use_sliding_window=False),
        "mistral": MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=None),
        "opt": OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64),
    }


def _random_model(name, tmp_path):
    """A transformers model with random weights (norms and biases perturbed too), saved as safetensors."""
    hf_dir = tmp_path / "hf"
    return save_random_model(_configs()[name], hf_dir), hf_dir


@pytest.mark.parametrize("name", ["llama-gqa-llama3-rope", "llama-mha-tied", "qwen2-qkv-bias", "mistral", "opt"])
def test_logits_match_transformers(name, tmp_path):
    """Left-padded batch of mixed lengths: last-position logits within float32 tolerance of transformers."""
    model, hf_dir = _random_model(name, tmp_path)
    convert(str(hf_dir), tmp_path / "store", dtype="float32")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 11, 40)]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        kw = {} if name == "opt" else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        ref = model(input_ids=ids, attention_mask=mask, **kw).logits[:, -1]
    engine = Engine(tmp_path / "store", policy=Policy(gpu_batch_size=3))
    try:
        ours = engine.prefill_logits(prompts)
    finally:
        engine.close()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa-llama3-rope", "opt"])
def test_greedy_matches_transformers_generate(name, tmp_path):
    """Multi-step greedy decoding (KV cache path) equals transformers generate for the random models."""
    model, hf_dir = _random_model(name, tmp_path)
    convert(str(hf_dir), tmp_path / "store", dtype="float32")
    prompt = list(range(5, 25))
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    engine = Engine(tmp_path / "store")
    try:
        [c] = engine.generate([prompt], GenParams(max_new_tokens=10))
    finally:
        engine.close()
    assert c.tokens == ref
