"""Input sparsity (TEAL, method "input") on a tiny random Llama (CPU, float32), with the store's input-channel files:
the FFN input's small entries are dropped before gate/up and the intermediate's before down, and a streamed
layer is read without its three FFN matrices, only the kept channels' columns read from the files. The engine's
logits and greedy tokens equal transformers' with the same masks applied densely; at target 0 they are the dense
tokens; sparsity off still never touches the hook; the bytes counted per decode step are exactly the columns
read, below the gate-activation (CATS) method's at the same target; the calibration records the thresholds."""

from __future__ import annotations

import copy

import pytest
import torch
from test_sparse_stream import PROMPT, STREAM, TARGET, _generate, _reference, tiny  # noqa: F401  (the fixture)
from tiny_jobs import run_tiny_job, tiny_job

from kubeflash_node.engine import sparse
from kubeflash_node.engine.generate import Engine
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.channels import ChannelReader, write_channels
from kubeflash_node.store.format import StoreError, load_manifest
from kubeflash_node.store.modelconfig import ModelConfig


@pytest.fixture(scope="module")
def chan(tiny):  # noqa: F811
    """(transformers model, the tiny store with its input-channel files written)."""
    model, store = tiny
    write_channels(store)
    return model, store


def _ffn(store, target: float, method: str = "auto", gap: int = 0) -> sparse.SparseFFN:
    c = ModelConfig.from_dict(load_manifest(store).config)
    return sparse.for_job(c, store, target, gap=gap, method=method)


def _masked(model, inputs):
    """transformers' model whose MLPs zero |x| <= tin before gate/up and |act(gate) * up| <= tmid before down."""
    def forward_of(mlp, t_in, t_mid):
        def forward(x):
            x = x * (x.abs() > t_in)
            m = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            return mlp.down_proj(m * (m.abs() > t_mid))
        return forward
    for layer, (t_in, t_mid) in zip(model.model.layers, inputs):
        layer.mlp.forward = forward_of(layer.mlp, t_in, t_mid)
    return model


def test_calibration_holds_input_thresholds_and_auto_picks_input(chan):
    _, store = chan
    got = cal.load(store)
    assert set(got.inputs) == {0.0, TARGET}
    assert all(a > 0 and b > 0 for a, b in got.inputs[TARGET]) and set(got.inputs[0.0]) == {(0.0, 0.0)}
    ffn = _ffn(store, TARGET)
    assert ffn.method == "input" and ffn.channels is not None
    assert ffn.skip_tensors(1) == {"w_gate", "w_up", "w_down"} and ffn.skip_tensors(0) == frozenset()
    assert _ffn(store, TARGET, method="gate").method == "gate"
    ffn.close()


@pytest.mark.parametrize("target", [0.0, TARGET, 0.8], ids=["t0", "t50", "t80"])
def test_logits_and_tokens_equal_transformers_with_the_same_masks(chan, target):
    """Streamed (layers without gate/up/down, kept columns read from the channel files): prefill logits and greedy
    tokens equal the dense computation on the masked tensors; at 0 they are transformers' plain tokens."""
    model, store = chan
    ffn = _ffn(store, target) if target in (0.0, TARGET) else None
    if ffn is None:  # an uncalibrated target: thresholds from the same recorder quantiles, written by hand
        ffn = _ffn(store, TARGET)
        ffn.input_th = [(2 * a, 2 * b) for a, b in ffn.input_th]
    ref = _masked(copy.deepcopy(model), ffn.input_th)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[:, -1]
    for policy in (STREAM, Policy(weights_gpu_percent=100)):  # columns read from the files / gathered in memory
        e = Engine(store, policy=policy, sparsity=ffn)
        try:
            logits = e.prefill_logits([PROMPT])
        finally:
            e.close()
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        assert (e.timings.bytes["load_neurons"] > 0) == (policy is STREAM)
    again = _ffn(store, TARGET)
    again.input_th = ffn.input_th
    tokens, _ = _generate(store, again, new=6)
    assert tokens == _reference(ref, 6)
    if target == 0.0:
        assert tokens == _reference(model, 6)


def test_sparsity_off_never_calls_the_hook(chan):
    model, store = chan
    tokens, e = _generate(store, None)
    assert tokens == _reference(model, 6) and e.timings.bytes["load_neurons"] == 0


def test_decode_reads_only_the_kept_columns_fewer_than_the_gate_method(chan):
    """Per decode step the bytes counted (2I a kept input channel, H a kept neuron) are the bytes read from the
    channel files, the streamed layers skip all three FFN matrices, and at the same target the FFN needs fewer
    bytes than the gate method (which reads the gate whole)."""
    _, store = chan
    c = ModelConfig.from_dict(load_manifest(store).config)
    ffn = _ffn(store, TARGET)
    _, e = _generate(store, ffn, new=5)
    d = ffn.reads.summary()["decode"]
    assert ffn.reads.bundle_bytes["decode"] == ffn.reads.read_bytes["decode"]
    layer = load_manifest(store).files["layer_000.bin"]
    ffn_bytes = sum(layer.tensors[k].nbytes for k in ("w_gate", "w_up", "w_down"))
    n = e.timings.count["load_weight_skipped"]  # every streamed layer skipped its FFN (and the 4 KiB padding)
    assert n >= 5 * c.num_layers and n * ffn_bytes <= e.timings.bytes["load_weight_skipped"] < n * (ffn_bytes + 12288)
    assert d["ffn_bytes_per_layer_token_dense"] == ffn_bytes
    gate = _ffn(store, TARGET, method="gate")
    _generate(store, gate, new=5)
    assert d["ffn_read_fraction"] < gate.reads.summary()["decode"]["ffn_read_fraction"]
    assert 0.3 < d["ffn_read_fraction"] < 0.7
    assert d["runs_per_layer_call"] <= c.hidden_size // 2 + c.intermediate_size // 2 + 2
    assert "input sparsity" in ffn.line()


def test_channel_files_hold_the_columns_and_refuse_a_changed_model(chan, tmp_path):
    """Row c of the input part is gate column c | up column c, row i of the down part down column i; files cut
    from another version of the model are refused."""
    import numpy as np

    from kubeflash_node.store.format import tensor_view

    _, store = chan
    m = load_manifest(store)
    buf = np.memmap(store / "layer_001.bin", dtype=np.uint8, mode="r")
    g, u, d = (tensor_view(buf, m.files["layer_001.bin"].tensors[k]) for k in ("w_gate", "w_up", "w_down"))
    r = ChannelReader(store)
    np.testing.assert_array_equal(r.inputs(1, [3, 4, 9]), np.concatenate([g.T, u.T], 1)[[3, 4, 9]])
    np.testing.assert_array_equal(r.down(1, [0, 7]), d.T[[0, 7]])
    assert r.reads == 4  # inputs: a run of two channels and one single; down: two singles
    r.close()
    other = tmp_path / "copy"
    import shutil

    shutil.copytree(store, other)
    (other / "manifest.json").write_text((other / "manifest.json").read_text() + " ")
    with pytest.raises(StoreError, match="stale"):
        ChannelReader(other)


def test_the_cost_model_prices_the_column_reads_and_the_plan_weighs_them(chan):
    """The cost model's column bytes and reads per decode layer call are the engine's counts (independent channels
    at the target), and a llama-3-8b-shaped plan at batch 1 on a 6 GB/s disk picks input-sparse reads, predicted
    faster than the gate method's, and says so."""
    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.costmodel import Budget, JobShape, SparseCost, describe, input_layer_bytes, plan, stage_sizes
    from kubeflash_node.store.modelconfig import preset

    _, store = chan
    c = ModelConfig.from_dict(load_manifest(store).config)
    ffn = _ffn(store, TARGET)
    _generate(store, ffn, new=9)
    steps = 8 * c.num_layers
    layer = load_manifest(store).files["layer_000.bin"].size
    _, demand, runs = input_layer_bytes(c, layer, SparseCost(TARGET, gap=0, method="input"), 1, 4, op_s=2e-5,
                                        gbps=3.0)
    assert ffn.reads.bundle_bytes["decode"] / steps == pytest.approx(demand, rel=0.15)
    assert ffn.reads.runs["decode"] / steps == pytest.approx(runs, rel=0.25)

    big = preset("llama-3-8b")
    ceil = Ceilings(disk_read_cold=6.0, disk_read_warm=6.0, disk_write=3.0, h2d_pinned=25.0, matmul_tflops=700.0,
                    disk_read_op_s=20e-6)
    kw = dict(job=JobShape(1, 64, 32), config=big, ceil=ceil, sizes={"none": stage_sizes(big, 2)},
              budget=Budget(6 << 30, 8 << 30))
    teal, cats = plan(sparsity=SparseCost(0.5, method="input"), **kw), plan(sparsity=SparseCost(0.5), **kw)
    assert teal.best.candidate.sparse is not None and teal.best.candidate.sparse.method == "input"
    assert teal.best.total_s < cats.best.total_s < teal.other_reads.total_s
    assert "input-sparse FFN reads (target 0.5" in describe(teal.best)


def test_a_job_merges_column_reads_by_the_machines_measured_read_cost(chan, tmp_path):
    """run_job on a machine whose disk is slow per read sets the channel and down-row merge gaps from its measured
    per-read cost (costmodel.merge_gap), runs input sparsity, and reports them with the reads the cost model
    predicted faster."""
    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.costmodel import merge_gap
    from kubeflash_node.engine.machine import Machine

    _, store = chan
    slow = Ceilings(disk_read_cold=0.05, disk_read_warm=0.05, disk_write=0.05, h2d_pinned=10.0, matmul_tflops=0.1,
                    disk_read_op_s=50e-6)
    rep = run_tiny_job(tiny_job({"sparsity": TARGET}), store, tmp_path / "j",
                       machine=Machine(slow, 1 << 30, 4 << 30))[0]["sparsity"]
    c = ModelConfig.from_dict(load_manifest(store).config)
    want = [merge_gap(2 * c.intermediate_size * 4, 50e-6, 0.05), merge_gap(c.hidden_size * 4, 50e-6, 0.05)]
    assert rep["method"] == "input" and rep["channel_merge_gaps"] == want and want[1] > 0
    assert rep["reads"] in ("sparse", "dense") and "predicted" in rep["reads_why"]  # the cost model priced both
