"""On the GPU: float32 generations token-identical to the CPU engine and to transformers on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "2+2=",
             "Explain why the sky is blue in one long sentence for a curious child."]
NEW = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from kubeflash_node.store.convert import convert

    out = tmp_path_factory.mktemp("gpu") / "smol"
    convert("builtin:smollm2-135m", out, dtype="float32")
    return out


@pytest.fixture(scope="module")
def prompts(store):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(store / "tokenizer"))
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for q in QUESTIONS]


def _run(store, prompts, policy, device, tmp_path):
    engine = Engine(store, policy=policy, device=device, job_dir=tmp_path)
    try:
        return [c.tokens for c in engine.generate(prompts, GenParams(max_new_tokens=NEW))]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def cpu_tokens(store, prompts, tmp_path_factory):
    return _run(store, prompts, Policy(gpu_batch_size=2), "cpu", tmp_path_factory.mktemp("cpu"))


@pytest.mark.parametrize("policy", [
    Policy(gpu_batch_size=2, compute_dtype="float32"),
    Policy(gpu_batch_size=1, num_gpu_batches=4, kv="cpu", compute_dtype="float32"),
    Policy(gpu_batch_size=4, kv="disk", weights_cpu_percent=50, compute_dtype="float32"),
    Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu_percent=100, compute_dtype="float32"),
    Policy(gpu_batch_size=4, io_backend="odirect", prefetch=3, compute_dtype="float32"),
    Policy(gpu_batch_size=2, num_gpu_batches=2, kv="cpu", cpu_attention=True, compute_dtype="float32"),
    Policy(gpu_batch_size=2, kv="disk", kv_write_back=True, kv_write_back_bytes=64 << 10, compute_dtype="float32"),
], ids=["stream-disk", "zigzag-kv-cpu", "half-cpu-kv-disk", "resident", "odirect-prefetch3", "cpu-attention",
        "kv-write-back"])
def test_gpu_matches_cpu_engine(store, prompts, cpu_tokens, policy, tmp_path):
    """The GPU pipeline (any placement, any KV tier) produces the CPU engine's tokens in float32."""
    assert _run(store, prompts, policy, "cuda", tmp_path) == cpu_tokens


def test_gpu_matches_transformers(store, prompts, cpu_tokens, tmp_path):
    """transformers on the same GGUF, on the GPU in float32, generates the same greedy tokens."""
    from transformers import AutoModelForCausalLM

    from kubeflash_node.store.convert import builtin_gguf

    g = builtin_gguf("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).cuda().eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            gen = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                               eos_token_id=None, pad_token_id=2)
        out.append(gen[0, len(p):].tolist())
    assert _run(store, prompts, Policy(gpu_batch_size=4, compute_dtype="float32"), "cuda", tmp_path) == out
    assert out == cpu_tokens


def test_streaming_bounds_gpu_memory(store, prompts, tmp_path):
    """Streaming weights keeps peak GPU memory far below the model size (a ring of prefetch+1 stage slots)."""
    import gc

    gc.collect()  # engines of earlier tests may still hold their resident tensors until collected
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _run(store, prompts, Policy(gpu_batch_size=4, prefetch=2, compute_dtype="float32"), "cuda", tmp_path)
    model_bytes = sum(f.stat().st_size for f in store.glob("*.bin"))
    assert torch.cuda.max_memory_allocated() - baseline < 0.5 * model_bytes


def test_int8_weights_dequantized_on_gpu_match_cpu(store, prompts, tmp_path):
    """An int8 store dequantized on the GPU gives the CPU engine's tokens for the same int8 store."""
    from kubeflash_node.store.convert import convert

    q = tmp_path / "int8"
    convert(str(store), q, dtype="float32", quantization="int8")
    cpu = _run(q, prompts, Policy(gpu_batch_size=2), "cpu", tmp_path / "c")
    gpu = _run(q, prompts, Policy(gpu_batch_size=2, compute_dtype="float32"), "cuda", tmp_path / "g")
    assert gpu == cpu
