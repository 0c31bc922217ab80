"""The decode path with fewer operators (issue 18): resident layers run Q/K/V and gate/up as one matmul each, Q and
K are rotated together in place, and an X-cache layer projects every
slot once. Checked against transformers on every KV tier with the weights resident (the fused path), against the
streamed (unfused) path token for token, and by counting the operators one decode layer dispatches."""

from __future__ import annotations

import pytest
import torch
from hf_random import greedy, save_random_model
from torch.utils._python_dispatch import TorchDispatchMode

from kubeflash_node.engine import model as M
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.kvcache import DeviceKV
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.rope import Rope, apply_rope
from kubeflash_node.store.convert import convert
from kubeflash_node.store.modelconfig import ModelConfig

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=256)
TIERS = {"device": {}, "device-xcache": dict(x_cache_percent=50), "cpu": dict(kv="cpu"),
         "cpu-attention": dict(kv="cpu", cpu_attention=True), "disk-writeback": dict(kv="disk", kv_write_back=True),
         "cpu-xcache": dict(kv="cpu", x_cache_percent=100)}


def _config(name):
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    return {"llama-gqa": LlamaConfig(**SMALL, num_key_value_heads=2, rope_scaling=llama3, rope_theta=500000.0),
            "qwen2-qkv-bias": Qwen2Config(**SMALL, num_key_value_heads=2, use_sliding_window=False),
            "opt": OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=64)}[name]


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2-qkv-bias", "opt"])
def random_model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = save_random_model(_config(request.param), root / "hf")
    convert(str(root / "hf"), root / "store", dtype="float32")
    return request.param, model, root / "store"


# left padded (decode steps take the masked path), and of equal lengths (one group: no mask at all)
PROMPTS = {"padded": [list(range(5, 25)), list(range(40, 47)), list(range(100, 131))],
           "equal": [list(range(5, 25)), list(range(40, 60)), list(range(100, 120))]}
NEW = 8


def _tokens(store, policy, job_dir, prompts) -> tuple[list[list[int]], Engine]:
    engine = Engine(store, policy=policy, job_dir=job_dir)
    try:
        return [c.tokens for c in engine.generate(prompts, GenParams(max_new_tokens=NEW))], engine
    finally:
        engine.close()


@pytest.mark.parametrize("lengths", list(PROMPTS))
@pytest.mark.parametrize("tier", list(TIERS))
def test_resident_fused_layers_match_transformers(random_model, tier, lengths, tmp_path):
    """Weights resident (fused Q/K/V and gate/up) on every KV tier: greedy tokens equal transformers' and the
    streamed, unfused layers' token for token."""
    name, model, store = random_model
    prompts = PROMPTS[lengths]
    ref = greedy(model, prompts, NEW)
    fused, engine = _tokens(store, Policy(gpu_batch_size=3, weights_gpu_percent=100, **TIERS[tier]), tmp_path / "a",
                            prompts)
    assert "fused_qkv" in engine.streamer.resident[1]
    streamed, engine = _tokens(store, Policy(gpu_batch_size=3, **TIERS[tier]), tmp_path / "b", prompts)
    assert not engine.streamer.resident.get(1)
    assert fused == ref
    assert streamed == fused


def test_fuse_projections_views_and_no_shared_buffer():
    """The parts become row views of the fused matrix; nothing keeps the stage buffer they came from alive."""
    buf = torch.arange(4 * 8 * 3 + 8, dtype=torch.float32)  # one stage file: wq, wk, wv, then a norm
    w = {"wq": buf[:32].view(4, 8), "wk": buf[32:64].view(4, 8), "wv": buf[64:96].view(4, 8), "attn_norm": buf[96:]}
    out = M.fuse_projections(w)
    assert torch.equal(out["fused_qkv"], buf[:96].view(12, 8))
    for i, p in enumerate(("wq", "wk", "wv")):
        assert out[p].data_ptr() == out["fused_qkv"].data_ptr() + i * 32 * 4 and torch.equal(out[p], w[p])
    assert all(t.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() for t in out.values())
    assert "fused_gate_up" not in out  # no gate/up in this layer
    assert M.fuse_projections({"wq": w["wq"], "wk": w["wk"], "wv": w["wv"], "bq": buf[:4]}).get("fused_qkv") is None


@pytest.mark.parametrize("layout", ["head-major", "token-major"])
def test_rotary_equals_apply_rope_bit_for_bit(layout):
    c = ModelConfig(architecture="llama", hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=1,
                    intermediate_size=128, vocab_size=10)
    pos = torch.arange(12).view(2, 6)
    cos, sin = Rope(c)(pos, torch.float32)  # [B, 1, S, D]
    x = torch.randn(2, 3, 6, c.head_dim)  # [B, N, S, D]
    want = apply_rope(x, cos, sin)
    rot = M.Rotary.of(cos, sin)
    if layout == "token-major":
        got = rot.token_major.in_place(x.transpose(1, 2).contiguous()).transpose(1, 2)
    else:
        got = rot(x)
    assert torch.equal(got, want)


class _Count(TorchDispatchMode):
    KERNEL_FREE = {"_unsafe_view", "lift_fresh", "split", "split_with_sizes", "unbind", "detach", "empty"}

    def __init__(self):
        super().__init__()
        self.kernels: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self.KERNEL_FREE:
            self.kernels[name] = self.kernels.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch, bound", [("llama", 27), ("opt", 12)])
def test_decode_layer_operator_count(arch, bound):
    """One decode step of one resident layer over the device cache: four matmuls (Q/K/V, output, the MLP's two),
    two copies into the cache (K, V), no cat, and at most `bound` kernels in all on the CPU (it was 36 and 15)."""
    h, nh, nk = 64, 4, 2 if arch == "llama" else 4
    c = ModelConfig(architecture=arch, hidden_size=h, num_heads=nh, num_kv_heads=nk, num_layers=1,
                    intermediate_size=128, vocab_size=10, **({"attention_bias": True, "o_bias": True, "mlp_bias": True}
                                                            if arch == "opt" else {}))
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    d, f = c.head_dim, c.intermediate_size
    if arch == "opt":
        w = {"attn_norm_w": 1 + r(h), "attn_norm_b": r(h), "mlp_norm_w": 1 + r(h), "mlp_norm_b": r(h), "wo": r(h, h),
             "bo": r(h), "fc1_w": r(f, h), "fc1_b": r(f), "fc2_w": r(h, f), "fc2_b": r(h)}
        w |= {n: r(h, h) for n in ("wq", "wk", "wv")} | {n: r(h) for n in ("bq", "bk", "bv")}
    else:
        w = {"attn_norm": 1 + r(h), "mlp_norm": 1 + r(h), "wq": r(nh * d, h), "wk": r(nk * d, h), "wv": r(nk * d, h),
             "wo": r(h, nh * d), "w_gate": r(f, h), "w_up": r(f, h), "w_down": r(h, f)}
    w = M.fuse_projections(w)
    kv = DeviceKV(device="cpu", dtype=torch.float32, num_kv_heads=nk, head_dim=d)
    kv.allocate(0, 0, 2, 10)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[:, :8] = 1
    rope = Rope(c) if arch == "llama" else None
    layer = M.LAYERS[arch]
    for start, new in ((0, 7), (7, 1)):
        b = M.make_batch(mask, start, new, "cpu")
        cos_sin = None
        if rope is not None:
            cos_sin = rope(b.positions, torch.float32)
            b.rope_at = lambda pos: rope(pos, torch.float32)
            b.rotary(cos_sin)  # once per step for every layer, as the engine's steps build it
        x = r(2, new, h)
        with _Count() as count:
            layer(c, w, x, b, kv.load(0, 0, start), cos_sin)
    k = count.kernels
    assert k.get("mm", 0) + k.get("addmm", 0) == 4
    assert k.get("copy_") == 2 and "cat" not in k
    assert sum(k.values()) <= bound, k
