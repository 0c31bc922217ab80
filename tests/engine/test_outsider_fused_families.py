"""An outsider's check of the fused decode path (issue 18) on the families its own tests leave out.

test_decode_fused.py runs resident (fused Q/K/V and gate/up) layers for Llama, Qwen2 and OPT only, and
test_config_parity.py runs every family with its layers streamed (unfused) and greedy on one unpadded prompt. Here
one config of each other family (Phi-3's split fused weights, Gemma 2's soft caps and sliding layers, Gemma 3's local
RoPE, Qwen3's q/k norms, SmolLM3's no-RoPE layers, Mistral with one K/V head, Mixtral's experts, OPT post-LN with
project_in/out) runs with its layers resident in host memory, KV on the device, in host memory with CPU attention,
and as an X-cache, on a left-padded batch: greedy tokens must equal transformers' generate on the same padded batch.
The resident layers' tensors must hold no more bytes than the stage files (the copy-out of the stage buffer in
fuse_projections keeps nothing twice).
"""

from __future__ import annotations

import pytest
import torch
from hf_random import greedy
from test_config_parity import CASES, _prompts, _random_model

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.convert import convert

PICK = ("phi3-2-longropeTrue-window7", "gemma2-0-cap50.0-final30.0", "gemma3-1-pattern3-rope-linear",
        "qwen3-1-biasTrue-windowTrue-mwl1", "smollm3-nope[0, 1, 0]-window8", "mistral-window-7",
        "mixtral-1-e8-top1-window6", "opt-6-gelu-postLN-proj-noaffine-nofinal")
POLICIES = {"kv-device": dict(weights_cpu_percent=100),
            "kv-cpu-attention": dict(weights_cpu_percent=100, kv="cpu", cpu_attention=True),
            "x-cache": dict(weights_gpu_percent=100, x_cache_percent=100)}
NEW = 6


BY_ID = {c.id: c.values for c in CASES}


@pytest.fixture(scope="module", params=PICK)
def case(request, tmp_path_factory):
    family, kw, _ = BY_ID[request.param]
    root = tmp_path_factory.mktemp("outsider")
    model, hf_dir = _random_model(family, kw, root)
    convert(str(hf_dir), root / "store", dtype="float32")
    prompts = _prompts()
    return root / "store", prompts, greedy(model, prompts, NEW)


def test_the_picks_exist():
    assert set(PICK) <= set(BY_ID)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_resident_fused_layers_match_transformers_padded(case, policy, tmp_path):
    """Every layer resident (fused where it can be), a padded batch of three: transformers' greedy tokens."""
    store, prompts, ref = case
    engine = Engine(store, policy=Policy(gpu_batch_size=3, **POLICIES[policy]), job_dir=tmp_path)
    try:
        assert any("fused_gate_up" in w or "fused_qkv" in w for w in engine.streamer.resident.values()) \
            or engine.config.num_experts  # (a MoE layer has no gate/up of its own to fuse)
        got = [c.tokens for c in engine.generate(prompts, GenParams(max_new_tokens=NEW))]
    finally:
        engine.close()
    assert got == ref


def test_fused_resident_layers_hold_no_more_bytes_than_their_files(case, tmp_path):
    """Resident layers' distinct storages (fused matrices included) add up to at most the stage files' bytes: the
    stage buffers are freed, not kept alongside the fused copies."""
    store, _, _ = case
    engine = Engine(store, policy=Policy(weights_gpu_percent=100), job_dir=tmp_path)
    try:
        storages = {}
        for w in engine.streamer.resident.values():
            for t in w.values():
                if isinstance(t, torch.Tensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        files = sum(engine.manifest.files[engine.manifest.stages[s]].size for s in engine.streamer.resident)
    finally:
        engine.close()
    assert sum(storages.values()) <= files
