"""Greedy sparsity allocation (TEAL, engine/allocate.py) on a tiny random Llama (CPU, float32): `calibrate` with
allocation "greedy" writes per-layer, per-input thresholds whose byte-weighted mean level meets each target in every
layer ("greedy-global": over all layers; over the FFN's inputs alone, or the attention's too), each the
calibration's quantile at its level; a greedy-calibrated store
runs streamed from the channel files and gives the dense computation on the masked tensors; target 0 is the dense
model token for token; calibrations written before the option load as uniform; bad choices are refused naming the
option."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from hf_random import tiny_llama_store
from test_sparse_attention import _masked
from test_sparse_stream import PROMPT, STREAM, _generate, _reference

from kubeflash_node.engine import allocate, sparse
from kubeflash_node.engine.cli_calibrate import calibrate
from kubeflash_node.engine.generate import Engine
from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.channels import write_attn_channels, write_channels
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig

TARGETS = (0.0, 0.25, 0.5)


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """(transformers model, store calibrated greedily over all four inputs with its channel files, the recorder)."""
    model, store, ids = tiny_llama_store(tmp_path_factory.mktemp("alloc"))
    _, rec = calibrate(store, ids, TARGETS, window=256, recorder=True, allocation="greedy", attention=True)
    write_channels(store)
    write_attn_channels(store)
    return model, store, rec


def _config(store) -> ModelConfig:
    return ModelConfig.from_dict(load_manifest(store).config)


def test_levels_meet_each_target_and_thresholds_are_their_quantiles(greedy):
    """Each layer's byte-weighted mean level over its four inputs reaches the target within one step (TEAL's
    block-wise allocation); the inputs do not all get the target (greedy spends it unevenly); each threshold is the
    recorded quantile at its input's level."""
    _, store, rec = greedy
    got = cal.load(store)
    sizes = allocate.input_bytes(_config(store))
    assert got.allocation == "greedy" and set(got.levels) == set(TARGETS)
    for t in TARGETS:
        for lv in got.levels[t]:
            mean = allocate.average([lv], sizes, (0, 1, 2, 3))
            assert t - 1e-9 <= mean < t + allocate.STEP, (t, mean)
        for j, lv in enumerate(got.levels[t]):
            assert got.inputs[t][j] == (rec.input_thresholds_at([lv[2]])[lv[2]][j][0],
                                        rec.input_thresholds_at([lv[3]])[lv[3]][j][1])
            assert got.attention[t][j] == (rec.attention.thresholds_at([lv[0]])[lv[0]][j][0],
                                           rec.attention.thresholds_at([lv[1]])[lv[1]][j][1])
    assert len({v for lv in got.levels[0.5] for v in lv}) > 1
    assert set(got.inputs[0.0]) == {(0.0, 0.0)} and set(got.attention[0.0]) == {(0.0, 0.0)}


@pytest.mark.parametrize("per_layer", [True, False], ids=["greedy", "greedy-global"])
def test_ffn_only_allocation_leaves_the_attention_uniform(greedy, per_layer):
    """Without the attention (`--allocation greedy` without --attention) only the FFN's inputs are shared out: their
    byte-weighted mean meets the target (each layer's, or over all layers for greedy-global, within a step), the
    attention levels stay 0 and its thresholds are the uniform ones."""
    _, store, rec = greedy
    c = _config(store)
    errors = allocate.measure(store, rec, [i % 97 for i in range(allocate.EVAL_TOKENS)], attention=False)
    ffn, attn, levels = allocate.greedy(rec, errors, c, (0.25,), attention=False, per_layer=per_layer)
    for part in ([[lv] for lv in levels[0.25]] if per_layer else [levels[0.25]]):
        assert 0.25 - 1e-9 <= allocate.average(part, allocate.input_bytes(c), (2, 3)) < 0.25 + allocate.STEP
    assert all(lv[0] == lv[1] == 0 for lv in levels[0.25])
    assert attn[0.25] == rec.attention.thresholds_at([0.25])[0.25]


def test_a_greedy_store_runs_and_equals_the_masked_dense_computation(greedy):
    """Streamed from the channel files with the greedy thresholds: prefill logits equal transformers' with the same
    per-layer masks, and the run drops entries (its decode reads fewer attention bytes than dense)."""
    model, store, _ = greedy
    ffn = sparse.for_job(_config(store), store, 0.5, gap=0, method="input", attention=True)
    ref = _masked(copy.deepcopy(model), ffn.input_th, ffn.attention.th)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[:, -1]
    e = Engine(store, policy=STREAM, sparsity=ffn)
    try:
        logits = e.prefill_logits([PROMPT])
    finally:
        e.close()
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    again = sparse.for_job(_config(store), store, 0.5, gap=0, method="input", attention=True)
    tokens, _ = _generate(store, again, new=6)
    again.close()
    assert tokens == _reference(ref, 6)
    assert again.attention.summary()["decode"]["attn_read_fraction"] < 1
    ffn.close()


def test_target_zero_is_the_dense_model(greedy):
    """Greedy target 0 (every level 0, every threshold 0) and sparsity off give transformers' tokens."""
    model, store, _ = greedy
    ffn = sparse.for_job(_config(store), store, 0.0, gap=0, method="input", attention=True)
    tokens, _ = _generate(store, ffn, new=6)
    ffn.close()
    dense, _ = _generate(store, None, new=6)
    assert tokens == dense == _reference(model, 6)


def test_old_calibrations_load_as_uniform(greedy):
    """A sparsity.json written before the option (no allocation, no levels) loads as uniform, thresholds intact."""
    _, store, _ = greedy
    data = cal.load(store).to_json()
    del data["allocation"]
    for e in data["targets"]:
        del e["levels"]
    old = cal.Calibration.from_json(data, where="old")
    assert old.allocation == "uniform" and old.levels == {} and old.inputs == cal.load(store).inputs


def test_allocate_spends_where_error_per_byte_is_least():
    """Two layers, the FFN input only: over all layers the one whose error grows slower takes the steps until the
    mean is met; per layer each takes the target; within a layer the input of least error per byte goes first; a
    target past every input's highest level is refused."""
    flat, steep = [0.01 * i for i in range(len(allocate.LEVELS))], [1.0 * i for i in range(len(allocate.LEVELS))]
    zero = [0.0] * len(allocate.LEVELS)
    errors = [[zero, zero, flat, zero], [zero, zero, steep, zero]]
    levels = allocate.allocate(errors, (1, 1, 1, 1), 0.3, inputs=(2,))
    assert [lv[2] for lv in levels] == [0.6, 0.0]
    assert [lv[2] for lv in allocate.allocate(errors, (1, 1, 1, 1), 0.3, inputs=(2,), per_layer=True)] == [0.3, 0.3]
    [one] = allocate.allocate([[zero, zero, steep, flat]], (1, 1, 1, 1), 0.3, inputs=(2, 3), per_layer=True)
    assert one[2:] == [0.0, 0.6]
    with pytest.raises(ValueError, match="target sparsity 0.9"):
        allocate.allocate(errors, (1, 1, 1, 1), 0.9, inputs=(2,))


@pytest.mark.parametrize("extra, says", [(["--allocation", "even"], "argument --allocation: invalid choice: 'even'"),
                                         (["--allocation", "greedy", "--no-channels"],
                                          "--allocation greedy with --no-channels")], ids=["bad-value", "no-channels"])
def test_bad_allocation_choices_are_refused(tmp_path, extra, says):
    text = tmp_path / "t.txt"
    text.write_text("a few words\n")
    r = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "calibrate", "builtin:smollm2-135m", "--text",
                        str(text), *extra], capture_output=True, text=True)
    assert r.returncode in (1, 2) and says in r.stderr, r.stderr
