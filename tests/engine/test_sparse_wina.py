"""WINA's criterion for input sparsity (`kubeflash calibrate --criterion wina`) on a tiny random Llama with GQA (CPU,
float32): a thresholded input's entry x_i is kept when |x_i| * c_i exceeds the layer's calibrated threshold, c_i the
norm of the weight columns it multiplies (q|k|v and gate|up stacked, o and down alone). The engine keeps exactly those
entries (its dropped counts and logits are those of transformers with the same masks), the thresholds are the
quantiles of |x| * c, the calibration round-trips with its column norms and is refused by name where it cannot be
applied; magnitude (the default) writes the same file as before (format /1, no criterion) and applies |x| alone."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_random import tiny_llama_store

from kubeflash_node.engine import sparse
from kubeflash_node.engine.cli_calibrate import calibrate, column_norms
from kubeflash_node.engine.generate import Engine
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.channels import write_attn_channels, write_channels
from kubeflash_node.store.format import StoreError, load_manifest
from kubeflash_node.store.modelconfig import ModelConfig

TARGET = 0.5
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 5, 41, 7, 60]
STREAM = Policy(gpu_batch_size=1)  # every stage read from disk: the kept columns come from the channel files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, store calibrated with --criterion wina and its channel files, calibration ids)."""
    root = tmp_path_factory.mktemp("wina")
    model, store, ids = tiny_llama_store(root)
    calibrate(store, ids, (0.0, TARGET), window=256, criterion="wina")
    write_channels(store)
    write_attn_channels(store)
    return model, store, ids


def _ffn(store, target: float = TARGET) -> sparse.SparseFFN:
    c = ModelConfig.from_dict(load_manifest(store).config)
    return sparse.for_job(c, store, target, gap=0, method="input", attention=True)


def _norms(model) -> dict[str, torch.Tensor]:
    """From transformers' own weights: per layer the column norms WINA scales each thresholded input by."""
    def col(*ws):
        return torch.stack([w.weight.detach().pow(2).sum(0) for w in ws]).sum(0).sqrt()
    layers = model.model.layers
    return {"attn_in": torch.stack([col(la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj) for la in layers]),
            "attn_out": torch.stack([col(la.self_attn.o_proj) for la in layers]),
            "ffn_in": torch.stack([col(la.mlp.gate_proj, la.mlp.up_proj) for la in layers]),
            "ffn_mid": torch.stack([col(la.mlp.down_proj) for la in layers])}


def _masked(model, cal_, target):
    """transformers' model keeping an entry of each thresholded input where |x| * c > t (c from its own weights),
    counting the dropped entries per input kind: the dense computation on WINA's masks."""
    n = _norms(model)
    dropped = {"attn": 0, "ffn": 0}

    def mask(c, t, kind=None):
        def hook(_, args):
            keep = args[0].abs() * c > t
            if kind is not None:
                dropped[kind] += int((~keep).sum())
            return (args[0] * keep,)
        return hook

    for j, layer in enumerate(model.model.layers):
        (a_in, a_out), (f_in, f_mid) = cal_.attention[target][j], cal_.inputs[target][j]
        at, mlp = layer.self_attn, layer.mlp
        for k, proj in enumerate((at.q_proj, at.k_proj, at.v_proj)):  # one input, one mask: counted once
            proj.register_forward_pre_hook(mask(n["attn_in"][j], a_in, "attn" if k == 0 else None))
        at.o_proj.register_forward_pre_hook(mask(n["attn_out"][j], a_out, "attn"))
        mlp.gate_proj.register_forward_pre_hook(mask(n["ffn_in"][j], f_in, "ffn"))
        mlp.up_proj.register_forward_pre_hook(mask(n["ffn_in"][j], f_in))
        mlp.down_proj.register_forward_pre_hook(mask(n["ffn_mid"][j], f_mid, "ffn"))
    return model, dropped



def _record(store, recorder, ids) -> None:
    """Run the calibration text through an engine over `store` with `recorder` as its sparsity (it records)."""
    e = Engine(store, policy=Policy(gpu_batch_size=1), sparsity=recorder)
    try:
        for part in sparse.windows(ids, 256):
            sparse.sequence_logits(e, part)
    finally:
        e.close()

def test_the_calibration_holds_the_weights_column_norms_and_quantiles_of_the_score(tiny):
    model, store, ids = tiny
    got = cal.load(store)
    assert got.criterion == "wina"
    for k, want in _norms(model).items():  # stacked q|k|v and gate|up columns, o and down alone
        np.testing.assert_allclose(got.scales[k], want.numpy(), rtol=1e-5)
    assert set(got.inputs[0.0]) == {(0.0, 0.0)}
    # the thresholds are the quantiles of |x| * c: re-recorded through a recorder with those norms
    rec = sparse.SparseFFN.recorder(len(got.inputs[TARGET]), scales=got.scales)
    _record(store, rec, ids)
    assert rec.input_thresholds_at((TARGET,))[TARGET] == got.inputs[TARGET]
    assert rec.attention.thresholds_at((TARGET,))[TARGET] == got.attention[TARGET]
    # and each is the target's share of the recorded scores: half of them fall at or below it
    for samples, (t, _) in zip(rec.in_samples, got.inputs[TARGET]):
        assert abs(float((torch.cat(samples) <= t).float().mean()) - TARGET) < 0.01


@pytest.mark.parametrize("policy", [STREAM, Policy(weights_gpu_percent=100)], ids=["streamed", "resident"])
def test_the_engine_keeps_exactly_the_entries_whose_score_is_above_the_threshold(tiny, policy):
    """Prefill of one prompt: the engine's dropped entries (FFN input + intermediate, attention input + output) are
    exactly those with |x| * c at or below the threshold in transformers with the same masks, and its logits theirs;
    the same thresholds as magnitudes (|x| alone) would drop other entries, so the test tells the criteria apart."""
    model, store, _ = tiny
    got = cal.load(store)
    ref, dropped = _masked(copy.deepcopy(model), got, TARGET)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0, -1]
    ffn = _ffn(store)
    assert ffn.criterion == "wina" and ffn.attention.scales is not None
    e = Engine(store, policy=policy, sparsity=ffn)
    try:
        logits = e.prefill_logits([PROMPT])
    finally:
        e.close()
    torch.testing.assert_close(logits[0].float(), want, rtol=1e-4, atol=1e-4)
    assert ffn.reads.inactive == dropped["ffn"] > 0
    assert ffn.attention.dropped == dropped["attn"] > 0
    assert ffn.describe()["criterion"] == "wina" and "criterion wina" in ffn.line()
    mag = copy.deepcopy(model)
    _, plain = _masked_magnitude(mag, got)
    with torch.no_grad():
        mag(torch.tensor([PROMPT]))
    assert plain["ffn"] != dropped["ffn"]


def _masked_magnitude(model, cal_):
    dropped = {"ffn": 0}

    def mask(t):
        def hook(_, args):
            keep = args[0].abs() > t
            dropped["ffn"] += int((~keep).sum())
            return (args[0] * keep,)
        return hook
    for j, layer in enumerate(model.model.layers):
        f_in, f_mid = cal_.inputs[TARGET][j]
        layer.mlp.gate_proj.register_forward_pre_hook(mask(f_in))
        layer.mlp.down_proj.register_forward_pre_hook(mask(f_mid))
    return model, dropped


def test_magnitude_writes_the_file_it_wrote_before_and_masks_on_the_magnitude(tiny, tmp_path):
    """The default criterion: format /1 with exactly the keys it had, byte for byte the same file as asking for
    magnitude by name, no column norms anywhere in the job's sparse FFN."""
    _, store, ids = tiny
    mag = tmp_path / store.name
    import shutil

    shutil.copytree(store, mag, ignore=shutil.ignore_patterns("sparsity.json", "ffn_*", "attn_*"))
    calibrate(mag, ids, (0.0, TARGET), window=256)
    first = (mag / cal.FILE).read_bytes()
    calibrate(mag, ids, (0.0, TARGET), window=256, criterion="magnitude")
    assert (mag / cal.FILE).read_bytes() == first
    data = json.loads(first)
    assert data["format"] == "kubeflash-sparsity/1"
    assert set(data) == {"format", "method", "allocation", "model_id", "manifest_sha256", "tokens", "text_sha256",
                         "targets"}
    assert set(data["targets"][1]) == {"sparsity", "thresholds", "inputs", "attention"}
    write_channels(mag)
    write_attn_channels(mag)
    ffn = _ffn(mag)
    assert ffn.scales is None and ffn.attention.scales is None and ffn.criterion == "magnitude"
    assert "criterion" not in ffn.line()
    # wina's norms all 1 are the magnitude: the same recorded samples give the same thresholds, bit for bit
    ones = {k: np.ones_like(v) for k, v in cal.load(store).scales.items()}
    _, rec = calibrate(mag, ids, (TARGET,), window=256, recorder=True, write=False)
    _, rec1 = calibrate(mag, ids, (TARGET,), window=256, recorder=True, write=False, criterion="wina")
    assert rec.input_thresholds_at((TARGET,)) != rec1.input_thresholds_at((TARGET,))
    one = sparse.SparseFFN.recorder(len(ones["ffn_in"]), scales=ones)
    _record(mag, one, ids)
    assert one.input_thresholds_at((TARGET,)) == rec.input_thresholds_at((TARGET,))
    assert one.attention.thresholds_at((TARGET,)) == rec.attention.thresholds_at((TARGET,))


def test_a_wina_calibration_round_trips_and_is_refused_where_it_cannot_be_applied(tiny, tmp_path):
    _, store, _ = tiny
    got = cal.load(store)
    data = got.to_json()
    assert data["format"] == cal.FORMAT_SCALED != cal.FORMAT  # a reader of /1 refuses it by its format
    back = cal.Calibration.from_json(json.loads(json.dumps(data)), where="x")
    assert back.criterion == "wina" and back.inputs == got.inputs and back.attention == got.attention
    for k in cal.SCALES:
        assert back.scales[k].dtype == np.float32 and np.array_equal(back.scales[k], got.scales[k])
    np.testing.assert_array_equal(got.scales["ffn_in"], column_norms(store)["ffn_in"])
    bad = {**data, "criterion": "bogus"}
    with pytest.raises(StoreError, match=r"criterion 'bogus'.*--criterion magnitude\|wina"):
        cal.Calibration.from_json(bad, where="x")
    with pytest.raises(StoreError, match=r"criterion 'wina'.*--criterion"):  # /1 with a criterion: not misread
        cal.Calibration.from_json({**data, "format": cal.FORMAT}, where="x")
    # a caller that applies magnitudes only (the default) is refused, naming the criterion
    c = ModelConfig.from_dict(load_manifest(store).config)
    with pytest.raises(cal.CalibrationError, match="--criterion wina"):
        cal.input_thresholds_for(store, TARGET, num_layers=c.num_layers, field="target")


def test_calibrate_refuses_an_unknown_criterion_and_wina_with_greedy_naming_the_option(tiny, tmp_path):
    _, store, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("words " * 400)
    exe = [sys.executable, "-m", "kubeflash_node.cli", "calibrate", str(store), "--text", str(text)]
    r = subprocess.run([*exe, "--criterion", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "argument --criterion: invalid choice: 'bogus'" in r.stderr
    r = subprocess.run([*exe, "--criterion", "wina", "--allocation", "greedy"], capture_output=True, text=True)
    assert r.returncode == 1 and "--criterion wina with --allocation greedy" in r.stderr
    assert "magnitude|wina" not in r.stderr and set(cal.CRITERIA) == {"magnitude", "wina"}
