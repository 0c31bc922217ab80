"""Weight and KV compression: group-wise quantization round trips within their error bounds, quantized stores
have the documented layout, and SmolLM2 stays accurate (int8 greedy tokens identical to float32, int4 logits
within the bound measured in docs/compression.md, 8-bit KV greedy tokens identical)."""

from __future__ import annotations

import pytest
import torch

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.kvcache import make_kv
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.quant import KVCodec, dequantize
from kubeflash_node.store.cache import ensure_model
from kubeflash_node.store.convert import SourceError, convert
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.ids import model_id
from kubeflash_node.store.quantformat import QuantSpec, _pack4, _unpack4, quantize, quantize_named

QUESTIONS = ["What is the capital of France?", "Name three primary colors."]
NEW = 8
INT4_REL_BOUND = 0.5  # measured 0.366 (max |error| / max |logit|) on these prompts: docs/compression.md


def _bound(w: torch.Tensor, p: dict, spec: QuantSpec) -> torch.Tensor:
    """Per-value error bound: half a step, plus float16 rounding of the scale (and zero) over the code range."""
    g = spec.group
    scale = p["scale"].float().repeat_interleave(g, dim=-1)
    top = 2 ** spec.bits - 1
    zero = p["zero"].float().abs().repeat_interleave(g, dim=-1) if "zero" in p else 0.0
    return 0.5 * scale + 2 ** -10 * (top * scale + zero) + 1e-6


@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_quantize_round_trip_within_bound(bits, symmetric):
    """Every dequantized value lies within half a quantization step (+ float16 rounding) of the original."""
    g = torch.Generator().manual_seed(bits + symmetric)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[3] *= 40  # an outlier row: its groups get their own, larger scales
    w[5, :64] = 0.0  # a constant group
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    p = quantize(w, spec)
    assert p["q"].dtype == torch.uint8 and p["q"].shape == (48, 256 * bits // 8)
    assert p["scale"].dtype == torch.float16 and p["scale"].shape == (48, 4)
    assert ("zero" in p) != symmetric
    back = dequantize(p["q"], p["scale"], p.get("zero"), spec, torch.float32)
    assert back.shape == w.shape
    assert bool(((back - w).abs() <= _bound(w, p, spec)).all())
    assert back[5, :64].abs().max() < 1e-6


def test_pack4_is_lossless_and_rejects_ragged_groups():
    """Two 4-bit codes a byte round trip exactly; a dim that is not whole groups is refused (and left float)."""
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    assert torch.equal(_unpack4(_pack4(codes)), codes)
    with pytest.raises(ValueError, match="multiple of the group size 64"):
        quantize(torch.randn(4, 100), QuantSpec(bits=4))
    out = quantize_named({"wq": torch.randn(4, 100), "w_up": torch.randn(4, 128), "attn_norm": torch.ones(128)},
                         QuantSpec(bits=8))
    assert set(out) == {"wq", "w_up.q", "w_up.scale", "w_up.zero", "attn_norm"}


@pytest.mark.parametrize("bits", [8, 4], ids=["kv8", "kv4"])
def test_kv_codec_round_trip(bits):
    """A KV row [.., D] packs into codes | scale | zero bytes and decodes within half a step."""
    codec = KVCodec(bits, head_dim=64)
    x = torch.randn(2, 3, 5, 64)
    raw = codec.encode(x)
    assert raw.dtype == torch.uint8 and raw.shape == (2, 3, 5, 64 * bits // 8 + 4)
    back = codec.decode(raw, torch.float32)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2 ** bits - 1)
    assert bool(((back - x).abs() <= 0.5 * step * 1.01 + 2 ** -10 * (x.abs().amax(-1, keepdim=True) + 15 * step)).all())


@pytest.mark.parametrize("tier", ["device", "cpu", "disk"])
def test_kv_tiers_store_compressed_and_load_back(tier, tmp_path):
    """Device, host and disk tiers at 8 bits hold about half the bytes of float16 and give back the rows they
    stored."""
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, num_kv_heads=3, head_dim=64)
    kv, plain = make_kv(tier, bits=8, directory=tmp_path / "kv8", **kw), make_kv(tier, directory=tmp_path / "kv", **kw)
    for c in (kv, plain):
        c.allocate(0, 0, 2, 10)
    k, v = torch.randn(2, 3, 6, 64), torch.randn(2, 3, 6, 64)
    lk = kv.load(0, 0, 0)
    lk.update(k[:, :, :5], v[:, :, :5], 0)
    kv.store(0, 0, lk)
    lk = kv.load(0, 0, 5)
    k_all, v_all = lk.update(k[:, :, 5:], v[:, :, 5:], 5)
    assert k_all.shape == (2, 3, 6, 64)
    assert (k_all - k).abs().max() < 0.05 and (v_all - v).abs().max() < 0.05
    assert kv.nbytes() < 0.3 * plain.nbytes()  # float32 compute dtype: 68 bytes a row instead of 256
    kv.close(), plain.close()


def test_policy_kv_bits_validated():
    """Only 16, 8 and 4 bits are KV options."""
    assert Policy(kv="cpu", kv_bits=8).kv_bits == 8
    with pytest.raises(ValueError, match="kv_bits 5"):
        Policy(kv_bits=5)


# ------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def int8_store(smol_store, tmp_path_factory):
    """int8 SmolLM2 staged through ensure_model (quantization is part of the id), from the float32 store."""
    root = tmp_path_factory.mktemp("cache")
    path, manifest = ensure_model(str(smol_store), dtype="float32", quantization="int8", root=root, progress_bar=False)
    assert path.name == model_id(str(smol_store), dtype="float32", quantization="int8")
    return path


@pytest.fixture(scope="module")
def int4_store(smol_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "smollm2-int4"
    convert(str(smol_store), out, dtype="float32", quantization="int4")
    return out


@pytest.fixture(scope="module")
def ids(smol_tokenizer):
    return [smol_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
            for q in QUESTIONS]


def _run(store, ids, policy=Policy(gpu_batch_size=2), job_dir=None):
    e = Engine(store, policy=policy, job_dir=job_dir)
    try:
        return e.prefill_logits(ids), [c.tokens for c in e.generate(ids, GenParams(max_new_tokens=NEW))]
    finally:
        e.close()


@pytest.fixture(scope="module")
def reference(smol_store, ids):
    """float32 logits and greedy tokens, uncompressed."""
    return _run(smol_store, ids)


def test_quantized_store_layout(int8_store, smol_store):
    """Layer matrices are stored as w.q (uint8) + w.scale/w.zero (float16); norms and embeddings stay float."""
    m, f = load_manifest(int8_store), load_manifest(smol_store)
    assert m.extra["quant"] == {"bits": 8, "group": 64, "symmetric": False}
    layer = m.files[m.stages[1]].tensors
    assert {layer["wq.q"].dtype, layer["wq.scale"].dtype, layer["wq.zero"].dtype} == {"uint8", "float16"}
    assert layer["wq.q"].shape == (576, 576) and layer["wq.scale"].shape == (576, 9)
    assert layer["attn_norm"].dtype == "float32" and "wq" not in layer
    assert m.files["embed.bin"].tensors["tok_embed"].dtype == "float32"
    assert m.files[m.stages[1]].size < 0.3 * f.files[f.stages[1]].size
    with pytest.raises(SourceError, match="already quantized"):
        convert(str(int8_store), int8_store.parent / "again", quantization="int4")


def test_streamer_dequantizes_to_compute_dtype(int8_store, smol_store):
    """The weight views a layer receives are float32 matrices close to the float store's, no packed names."""
    e, ref = Engine(int8_store), Engine(smol_store)
    try:
        e.streamer.get(0), ref.streamer.get(0)
        w, wr = e.streamer.get(1), ref.streamer.get(1)
        assert set(w) == set(wr)
        assert w["w_up"].dtype == torch.float32 and w["w_up"].shape == wr["w_up"].shape
        assert (w["w_up"] - wr["w_up"]).abs().max() < 0.01 * wr["w_up"].abs().max()
    finally:
        e.close(), ref.close()


def test_int8_greedy_tokens_identical(int8_store, ids, reference):
    """int8 weights: the same greedy tokens as float32 for every prompt."""
    logits, tokens = _run(int8_store, ids)
    assert tokens == reference[1]
    assert (logits.argmax(-1) == reference[0].argmax(-1)).all()


def test_int4_logits_close(int4_store, ids, reference):
    """int4 weights: last-position logits within the measured relative bound, same top-1 token."""
    logits, _ = _run(int4_store, ids)
    rel = (logits - reference[0]).abs().max() / reference[0].abs().max()
    assert rel < INT4_REL_BOUND
    assert (logits.argmax(-1) == reference[0].argmax(-1)).all()


@pytest.mark.parametrize("tier", ["device", "cpu", "disk"])
def test_kv8_greedy_tokens_identical(smol_store, ids, reference, tier, tmp_path):
    """8-bit KV on the device, in the host or on disk: the same greedy tokens as the uncompressed run."""
    _, tokens = _run(smol_store, ids, Policy(gpu_batch_size=2, kv=tier, kv_bits=8), job_dir=tmp_path)
    assert tokens == reference[1]
