"""Attention input sparsity (TEAL on q/k/v and o) on a tiny random Llama with GQA (CPU, float32), beside the FFN's
input sparsity: the attention input's small entries are dropped before q/k/v and the attention output's before o.
The engine's logits and greedy tokens equal transformers' with the same masks applied densely, streamed (layers
read without their seven matrices, the kept columns read from the channel files) and resident; at target 0 they
are transformers' plain tokens; sparsity off never touches the hook; the bytes counted per decode step are the
bytes read from the attention channel files; the calibration records the thresholds; bad choices are refused
naming the option."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_sparse_stream import PROMPT, STREAM, TARGET, _generate, _reference, tiny  # noqa: F401  (the fixture)

from kubeflash_node.engine import sparse
from kubeflash_node.engine.generate import Engine
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.channels import AttnChannelReader, write_attn_channels, write_channels
from kubeflash_node.store.format import StoreError, load_manifest, tensor_view
from kubeflash_node.store.modelconfig import ModelConfig

RESIDENT = Policy(weights_gpu_percent=100)


@pytest.fixture(scope="module")
def both(tiny):  # noqa: F811
    """(transformers model, the tiny store with its FFN and attention channel files written)."""
    model, store = tiny
    write_channels(store)
    write_attn_channels(store)
    return model, store


def _ffn(store, target: float, attention: bool | None = None) -> sparse.SparseFFN:
    c = ModelConfig.from_dict(load_manifest(store).config)
    return sparse.for_job(c, store, target, gap=0, method="input", attention=attention)


def _masked(model, inputs, attention):
    """transformers' model with the FFN masks of input sparsity and, on every layer's attention, |x| <= tin zeroed
    before q/k/v and |o| <= tout zeroed before o (forward pre-hooks on the projections: the dense computation)."""
    def mask(t):
        return lambda _, args: (args[0] * (args[0].abs() > t),)

    def mlp_forward(mlp, t_in, t_mid):
        def forward(x):
            x = x * (x.abs() > t_in)
            m = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            return mlp.down_proj(m * (m.abs() > t_mid))
        return forward
    for layer, (t_in, t_mid), (a_in, a_out) in zip(model.model.layers, inputs, attention):
        layer.mlp.forward = mlp_forward(layer.mlp, t_in, t_mid)
        at = layer.self_attn
        for proj in (at.q_proj, at.k_proj, at.v_proj):
            proj.register_forward_pre_hook(mask(a_in))
        at.o_proj.register_forward_pre_hook(mask(a_out))
    return model


def test_calibration_holds_attention_thresholds_and_auto_needs_the_files(both, tmp_path):
    _, store = both
    got = cal.load(store)
    assert set(got.attention) == {0.0, TARGET} and set(got.attention[0.0]) == {(0.0, 0.0)}
    assert all(a > 0 and b > 0 for a, b in got.attention[TARGET])
    auto = _ffn(store, TARGET)
    assert auto.attention is not None and auto.attention.channels is not None
    assert auto.skip_tensors(1) == {"w_gate", "w_up", "w_down", "wq", "wk", "wv", "wo"}
    auto.close()
    off = _ffn(store, TARGET, attention=False)
    assert off.attention is None and off.skip_tensors(1) == {"w_gate", "w_up", "w_down"}
    off.close()
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(store, bare / store.name, ignore=shutil.ignore_patterns("attn_channels"))
    ffn = _ffn(bare / store.name, TARGET)  # auto without the files: the attention stays dense
    assert ffn.attention is None
    ffn.close()


@pytest.mark.parametrize("target", [0.0, TARGET, 0.8], ids=["t0", "t50", "t80"])
def test_logits_and_tokens_equal_transformers_with_the_same_masks(both, target):
    """Streamed (q/k/v/o and gate/up/down columns read from the channel files) and resident (gathered from the
    layer's own, fused, matrices): prefill logits and greedy tokens equal the dense computation on the masked
    tensors; at 0 they are transformers' plain tokens."""
    model, store = both
    ffn = _ffn(store, min(target, TARGET), attention=True)
    if target > TARGET:  # an uncalibrated target: the calibrated thresholds scaled by hand
        ffn.input_th = [(2 * a, 2 * b) for a, b in ffn.input_th]
        ffn.attention.th = [(1.6 * a, 1.6 * b) for a, b in ffn.attention.th]
    ref = _masked(copy.deepcopy(model), ffn.input_th, ffn.attention.th)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[:, -1]
    for policy in (STREAM, RESIDENT):
        before = ffn.attention.channels.bytes_read
        e = Engine(store, policy=policy, sparsity=ffn)
        try:
            logits = e.prefill_logits([PROMPT])
        finally:
            e.close()
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        assert (ffn.attention.channels.bytes_read > before) == (policy is STREAM)
    if target > 0:
        assert ffn.attention.summary()["token_sparsity"] > 0.2
    for policy in (STREAM, RESIDENT):
        again = _ffn(store, min(target, TARGET), attention=True)
        again.input_th, again.attention.th = ffn.input_th, ffn.attention.th
        tokens, _ = _generate(store, again, new=6, policy=policy)
        again.close()
        assert tokens == _reference(ref, 6)
        if target == 0.0:
            assert tokens == _reference(model, 6)
    ffn.close()


def test_sparsity_off_is_the_dense_engine(both):
    """No sparsity: no hook in the weights, nothing read from the channel files, transformers' tokens."""
    model, store = both
    tokens, e = _generate(store, None)
    assert tokens == _reference(model, 6) and e.timings.bytes["load_neurons"] == 0


def test_decode_counts_the_bytes_read_and_the_layer_reads_fewer(both):
    """Per decode step the attention bytes counted (Q + 2KV a kept input channel, H a kept output channel) are the
    bytes read from the attention channel files; streamed layers skip all seven matrices; the whole layer's
    matrix bytes fall below the FFN-only run's at the same target."""
    _, store = both
    m = load_manifest(store)
    t = m.files["layer_000.bin"].tensors
    ffn = _ffn(store, TARGET, attention=True)
    _, e = _generate(store, ffn, new=5)
    a = ffn.attention.summary()["decode"]
    n = ffn.attention.count["decode"]
    assert n["file"] == n["read"] > 0
    assert a["attn_bytes_per_layer_token_dense"] == sum(t[k].nbytes for k in ("wq", "wk", "wv", "wo"))
    assert 0.2 < a["attn_read_fraction"] < 0.8
    seven = sum(t[k].nbytes for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    k = e.timings.count["load_weight_skipped"]
    assert k * seven <= e.timings.bytes["load_weight_skipped"] < k * (seven + 7 * 4096)
    assert "attention inputs" in ffn.line() and "attention" in ffn.describe()
    ffn.close()
    only = _ffn(store, TARGET, attention=False)
    _, e2 = _generate(store, only, new=5)
    only.close()
    assert e.timings.weight_bytes() < e2.timings.weight_bytes()


def test_attention_channel_files_hold_the_columns_and_refuse_a_changed_model(both, tmp_path):
    """Row c of the input part is q column c | k column c | v column c, row j of the output part o column j; files
    cut from another version of the model are refused, naming the command that writes them."""
    _, store = both
    m = load_manifest(store)
    buf = np.memmap(store / "layer_002.bin", dtype=np.uint8, mode="r")
    q, k, v, o = (tensor_view(buf, m.files["layer_002.bin"].tensors[n]) for n in ("wq", "wk", "wv", "wo"))
    r = AttnChannelReader(store)
    np.testing.assert_array_equal(r.inputs(2, [0, 1, 30]), np.concatenate([q.T, k.T, v.T], 1)[[0, 1, 30]])
    np.testing.assert_array_equal(r.down(2, [5, 63]), o.T[[5, 63]])
    assert r.reads == 4
    r.close()
    import shutil

    other = tmp_path / "copy"
    shutil.copytree(store, other)
    (other / "manifest.json").write_text((other / "manifest.json").read_text() + " ")
    with pytest.raises(StoreError, match="stale.*--attention"):
        AttnChannelReader(other)


def test_bad_choices_are_refused_naming_the_option(both, tmp_path):
    """Attention sparsity with the gate method, or asked of a calibration without attention thresholds."""
    import json
    import shutil

    _, store = both
    c = ModelConfig.from_dict(load_manifest(store).config)
    with pytest.raises(ValueError, match="spec.offload.sparsity: attention sparsity .* input method"):
        sparse.for_job(c, store, TARGET, method="gate", attention=True)
    old = tmp_path / store.name
    shutil.copytree(store, old)
    data = json.loads((old / cal.FILE).read_text())
    for e in data["targets"]:
        e.pop("attention")
    (old / cal.FILE).write_text(json.dumps(data))
    with pytest.raises(cal.CalibrationError, match="no attention thresholds.*--attention"):
        sparse.for_job(c, old, TARGET, method="input", attention=True)
    ffn = sparse.for_job(c, old, TARGET, method="input")  # auto: FFN only
    assert ffn.attention is None
    ffn.close()


def test_the_cost_model_prices_the_attention_columns_and_the_plan_says_so(both):
    """With attention the cost model reads ahead the layer without its seven matrices and prices the kept q/k/v and
    o columns as the engine counts them per decode layer call; a llama-3-8b-shaped plan at batch 1 predicts it
    faster than FFN-only input sparsity where reads are cheap, slower where a read costs 20 us, and says what it
    reads."""
    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.costmodel import Budget, JobShape, SparseCost, describe, input_layer_bytes, plan, stage_sizes
    from kubeflash_node.store.modelconfig import preset

    _, store = both
    c = ModelConfig.from_dict(load_manifest(store).config)
    layer = load_manifest(store).files["layer_000.bin"]
    ffn = _ffn(store, TARGET, attention=True)
    _generate(store, ffn, new=9)
    ffn.close()
    steps = 8 * c.num_layers
    s = SparseCost(TARGET, gap=0, method="input", attention=True)
    ahead, demand, runs = input_layer_bytes(c, layer.size, s, 1, 4, op_s=2e-5, gbps=3.0)
    seven = sum(layer.tensors[k].nbytes for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    assert ahead == layer.size - seven
    counted = ffn.reads.bundle_bytes["decode"] + ffn.attention.count["decode"]["file"]
    assert counted / steps == pytest.approx(demand, rel=0.2)
    assert (ffn.reads.runs["decode"] + ffn.attention.count["decode"]["runs"]) / steps == pytest.approx(runs, rel=0.3)

    big = preset("llama-3-8b")

    def best(attention: bool, gbps: float, op_s: float):
        ceil = Ceilings(disk_read_cold=gbps, disk_read_warm=gbps, disk_write=3.0, h2d_pinned=25.0,
                        matmul_tflops=700.0, disk_read_op_s=op_s)
        return plan(sparsity=SparseCost(0.5, method="input", attention=attention), job=JobShape(1, 64, 32),
                    config=big, ceil=ceil, sizes={"none": stage_sizes(big, 2)}, budget=Budget(6 << 30, 8 << 30)).best

    fast = best(True, 3.0, 1e-6)  # cheap reads: half the attention's bytes are worth its columns read on demand
    assert fast.candidate.sparse.attention and fast.total_s < best(False, 3.0, 1e-6).total_s
    assert "q/k/v/o columns likewise" in describe(fast)
    # 20 us a read at 6 GB/s: a q|k|v row (12 KiB) costs a tenth of a read's overhead, runs are read through, and
    # the attention no longer read ahead with the layer makes the step slower than FFN-only (docs/sparsity.md)
    assert best(True, 6.0, 20e-6).total_s > best(False, 6.0, 20e-6).total_s


def test_calibrate_refuses_attention_without_the_channel_files(tmp_path):
    """`kubeflash calibrate --attention --no-channels` is refused before any work, naming both options."""
    import subprocess
    import sys

    text = tmp_path / "t.txt"
    text.write_text("a few words\n")
    r = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "calibrate", "builtin:smollm2-135m", "--text",
                        str(text), "--attention", "--no-channels"], capture_output=True, text=True)
    assert r.returncode == 1 and "--attention with --no-channels" in r.stderr


@pytest.mark.parametrize("policy", [Policy(gpu_batch_size=1, x_cache_percent=100),
                                    Policy(gpu_batch_size=1, x_cache_percent=100, weights_gpu_percent=100)],
                         ids=["streamed", "resident"])
def test_an_x_cache_layer_recomputes_the_sparse_k_and_v(both, policy):
    """With the X-cache (the layer's input stored, K and V recomputed from it each step) the layer stores the masked
    input and recomputes through the same hook, so the greedy tokens are those of the masked reference."""
    model, store = both
    ffn = _ffn(store, TARGET, attention=True)
    ref = _masked(copy.deepcopy(model), ffn.input_th, ffn.attention.th)
    tokens, _ = _generate(store, ffn, new=6, policy=policy)
    ffn.close()
    assert tokens == _reference(ref, 6)


def test_recording_the_attention_leaves_the_ffn_thresholds_as_they_were(both, monkeypatch):
    """The calibration pass samples the attention's magnitudes with its own random generator: the FFN's thresholds
    of the same text are those of a pass that records no attention (a call's entries sampled, as a large model's
    are: at most 1,000 kept a call here)."""
    _, store = both
    monkeypatch.setattr(sparse, "RECORD_PER_CALL", 1000)
    n = ModelConfig.from_dict(load_manifest(store).config).num_layers
    ids = torch.randint(0, 97, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    got = []
    for attention in (True, False):
        rec = sparse.SparseFFN.recorder(n)
        if not attention:
            rec.attention = None
        e = Engine(store, policy=RESIDENT, sparsity=rec)
        try:
            for part in sparse.windows(ids, 256):
                sparse.sequence_logits(e, part)
        finally:
            e.close()
        got.append((rec.thresholds_at((0.5,)), rec.input_thresholds_at((0.5,))))
    assert got[0] == got[1]
    assert rec.attention is None and len(sparse.SparseFFN.recorder(n).attention.layers) == n
