"""Greedy generations on the real SmolLM2 weights are token-identical to transformers `generate`."""

from __future__ import annotations

import pytest
import torch

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea and the moon in autumn, please.",
    "2+2=",
    "Name three primary colors.",
    "Explain in one sentence why the sky is blue to a five year old child who keeps asking questions.",
]
NEW = 12


def _chat_ids(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                   return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def reference_tokens(smol_reference, smol_tokenizer):
    """transformers greedy continuation of each prompt, run one prompt at a time (no padding involved)."""
    out = []
    for q in QUESTIONS:
        ids = torch.tensor([_chat_ids(smol_tokenizer, q)])
        with torch.no_grad():
            gen = smol_reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                          do_sample=False, eos_token_id=None, pad_token_id=2)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize(
    "policy",
    [Policy(gpu_batch_size=1), Policy(gpu_batch_size=2, num_gpu_batches=3), Policy(gpu_batch_size=5),
     Policy(gpu_batch_size=2, num_gpu_batches=2, kv="disk"), Policy(gpu_batch_size=3, kv="cpu", prefetch=1),
     Policy(gpu_batch_size=2, num_gpu_batches=2, kv="cpu", cpu_attention=True),
     Policy(gpu_batch_size=3, kv="disk", kv_write_back=True, kv_write_back_bytes=32 << 10),
     Policy(gpu_batch_size=2, num_gpu_batches=2, x_cache_percent=50),
     Policy(gpu_batch_size=3, kv="cpu", x_cache_percent=100),
     Policy(gpu_batch_size=2, num_gpu_batches=2, kv="disk", kv_write_back=True, kv_write_back_bytes=32 << 10,
            x_cache_percent=50)],
    ids=["bs1", "bs2x3-zigzag", "bs5-mixed-lengths", "bs2x2-kv-disk", "bs3-kv-cpu-prefetch1", "cpu-attention",
         "kv-write-back", "x-cache-half-device", "x-cache-all-cpu", "x-cache-disk-write-back"],
)
def test_greedy_matches_transformers(smol_store, smol_tokenizer, reference_tokens, policy, tmp_path):
    """Every prompt's greedy tokens equal transformers' for batches of mixed lengths and each KV tier."""
    ids = [_chat_ids(smol_tokenizer, q) for q in QUESTIONS]
    assert len({len(i) for i in ids}) > 1, "prompts must have mixed lengths so padding is exercised"
    engine = Engine(smol_store, policy=policy, job_dir=tmp_path)
    try:
        got = engine.generate(ids, GenParams(max_new_tokens=NEW))
    finally:
        engine.close()
    assert [c.tokens for c in got] == reference_tokens


def test_answer_contains_paris(smol_store, smol_tokenizer):
    """The ready example's question gets an answer naming Paris."""
    engine = Engine(smol_store)
    try:
        [c] = engine.generate([_chat_ids(smol_tokenizer, QUESTIONS[0])], GenParams(max_new_tokens=16, eos_token_ids=(2,)))
    finally:
        engine.close()
    assert "Paris" in smol_tokenizer.decode(c.tokens)
    assert c.finish_reason == "stop"


def test_prefill_logits_match_transformers(smol_store, smol_tokenizer, smol_reference):
    """Last-position logits after prefill agree with transformers within float32 tolerance, padded batch."""
    texts = [smol_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True) for q in QUESTIONS[:3]]
    enc = smol_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = smol_reference(**enc).logits[:, -1].float()
    ids = [_chat_ids(smol_tokenizer, q) for q in QUESTIONS[:3]]
    engine = Engine(smol_store, policy=Policy(gpu_batch_size=3))
    try:
        ours = engine.prefill_logits(ids)
    finally:
        engine.close()
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_weights_resident_bounded(smol_store):
    """The streamer never holds more than prefetch+1 streamed stages: its slot ring is that size."""
    engine = Engine(smol_store, policy=Policy(prefetch=2))
    try:
        assert len(engine.streamer.slots) == 3
        assert engine.placement.count("disk") == len(engine.manifest.stages) - 1  # all but the tied embedding
        engine.generate([[1, 2, 3, 4]], GenParams(max_new_tokens=3))
        assert engine.timings.count["load_weight"] >= 3 * (len(engine.manifest.stages) - 1)
    finally:
        engine.close()
