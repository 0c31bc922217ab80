"""KV tiers on the GPU with an MHA model (dummy OPT-125m, no tokenizer needed): the token-major host tier and the
X-cache (K, V recomputed on the GPU from the stored layer input) give the device tier's tokens; the 4-bit codec
gives the same tokens on the device, in host memory and on disk (one codec, three places)."""

from __future__ import annotations

import pytest

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy

PROMPTS = [[5 + i, 9, 13 + i, 2, 7] * (3 + i) for i in range(6)]


def _run(store, policy, tmp_path, device="cuda"):
    engine = Engine(store, policy=policy, device=device, job_dir=tmp_path)
    try:
        return [c.tokens for c in engine.generate(PROMPTS, GenParams(max_new_tokens=10))]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def device_tokens(opt_store, tmp_path_factory):
    return _run(opt_store, Policy(gpu_batch_size=2, num_gpu_batches=3, compute_dtype="float32"),
                tmp_path_factory.mktemp("d"))


@pytest.mark.parametrize("policy", [
    Policy(gpu_batch_size=2, num_gpu_batches=3, kv="cpu", compute_dtype="float32"),
    Policy(gpu_batch_size=2, num_gpu_batches=3, x_cache_percent=100, compute_dtype="float32"),
    Policy(gpu_batch_size=3, num_gpu_batches=2, kv="cpu", x_cache_percent=50, compute_dtype="float32"),
    Policy(gpu_batch_size=2, num_gpu_batches=3, kv="disk", kv_write_back=True, kv_write_back_bytes=64 << 10,
           x_cache_percent=100, compute_dtype="float32"),
], ids=["host-token-major", "x-cache-device", "x-cache-half-host", "x-cache-disk-write-back"])
def test_tiers_match_device_tier(opt_store, device_tokens, policy, tmp_path):
    assert _run(opt_store, policy, tmp_path) == device_tokens


def test_gpu_matches_cpu_engine(opt_store, device_tokens, tmp_path):
    cpu = _run(opt_store, Policy(gpu_batch_size=2, kv="cpu", x_cache_percent=50), tmp_path, device="cpu")
    assert cpu == device_tokens


def test_four_bit_kv_same_on_device_in_host_memory_and_on_disk(opt_store, tmp_path):
    got = [_run(opt_store, Policy(gpu_batch_size=2, num_gpu_batches=3, kv=tier, kv_bits=4, compute_dtype="float32"),
                tmp_path / tier) for tier in ("device", "cpu", "disk")]
    assert got[0] == got[1] == got[2] and len(got[0]) == len(PROMPTS)


def test_host_tier_serves_every_decode_load_from_a_prefetch(opt_store, device_tokens, tmp_path):
    """The schedule asks for the next (layer, micro-batch)'s prefix before computing the current one, so no
    decode load of the host tier waits for its copy on the compute stream; the tokens stay the device tier's."""
    engine = Engine(opt_store, policy=Policy(gpu_batch_size=2, num_gpu_batches=3, kv="cpu", compute_dtype="float32"),
                    device="cuda", job_dir=tmp_path)
    try:
        tokens = [c.tokens for c in engine.generate(PROMPTS, GenParams(max_new_tokens=10))]
        loads = engine.kv.loads
    finally:
        engine.close()
    assert tokens == device_tokens
    layers = engine.config.num_layers
    assert loads["waited"] == 0
    assert loads["prefetched"] > 0 and loads["prefetched"] % (layers * 3) == 0  # every layer, every micro-batch


def test_gpu_memory_of_the_manifest_caps_the_allocator(opt_store, tmp_path):
    """spec.resources.gpuMemory: run_job caps the CUDA caching allocator at it, so an allocation beyond it fails
    as out of memory; the job itself, far smaller, runs."""
    import torch

    from kubeflash_api import parse_job
    from kubeflash_node.engine.job import run_job
    from kubeflash_node.store.format import load_manifest

    spec = parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
                      "spec": {"model": {"uri": "dummy:opt-125m", "dtype": "float32"},
                               "input": {"synthetic": {"count": 2}}, "generation": {"maxNewTokens": 4},
                               "resources": {"gpuMemory": "2Gi"}}})
    try:
        report = run_job(spec, model_dir=opt_store, manifest=load_manifest(opt_store), output=tmp_path / "o.jsonl",
                         device="cuda", job_dir=tmp_path)
        assert report["generated_tokens"] > 0
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(3 << 30, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
