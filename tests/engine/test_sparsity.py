"""Activation sparsity on the real SmolLM2 weights: `kubeflash calibrate` writes per-layer thresholds into the
model's store entry, a job with spec.offload.sparsity runs the sparse FFN through `kubeflash run`, `off` is the
dense path bit for bit, the sparse FFN computes exactly the dense FFN with the inactive neurons zeroed, and every
bad input (short text, target out of range, no or stale calibration) is refused naming the option or field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kubeflash_api import SpecError, parse_job
from kubeflash_api.names import model_id
from kubeflash_node.cli import main as kubeflash
from kubeflash_node.engine import sparse
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.model import ACTIVATIONS
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.modelconfig import ModelConfig

TEXT = Path(__file__).resolve().parents[1] / "data" / "GPL-3.txt"
URI = "builtin:smollm2-135m"


def _farm(src: Path, dest: Path) -> Path:
    """A model directory of symlinks to `src`'s files (manifest copied), so tests may write into it."""
    dest.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name == "manifest.json":
            (dest / entry.name).write_bytes(entry.read_bytes())
        elif not entry.name.startswith("."):
            os.symlink(entry, dest / entry.name)
    return dest


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, smol_store):
    """A local store (as `kubeflash run --store` reads it) holding SmolLM2 float32, calibrated on 512 tokens."""
    root = tmp_path_factory.mktemp("kfhome")
    model = _farm(smol_store, root / "models" / model_id(URI, dtype="float32", quantization="none"))
    rc = kubeflash(["calibrate", str(model), "--text", str(TEXT), "--sparsity", "0,0.5", "--max-tokens", "512",
                    "--device", "cpu", "--quiet"])
    assert rc == 0
    return root


def _model(root: Path) -> Path:
    return root / "models" / model_id(URI, dtype="float32", quantization="none")


def _job(tmp_path: Path, name: str, sparsity=None) -> Path:
    offload = {"policy": "explicit", "gpuBatchSize": 2, "weights": {"gpu": 100, "cpu": 0, "disk": 0},
               "kv": {"gpu": 100, "cpu": 0, "disk": 0}}
    if sparsity is not None:
        offload["sparsity"] = sparsity
    doc = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": name},
           "spec": {"model": {"uri": URI}, "input": {"prompts": ["What is the capital of France?",
                                                                "Name three primary colors."]},
                    "generation": {"maxNewTokens": 8}, "offload": offload}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(tmp_path: Path, root: Path, manifest: Path) -> tuple[int, dict, dict]:
    out = tmp_path / manifest.stem
    rc = kubeflash(["run", str(manifest), "--device", "cpu", "--quiet", "--store", str(root),
                    "--job-dir", str(out)])
    results = {}
    if (out / "results.jsonl").exists():
        for line in (out / "results.jsonl").read_text().splitlines():
            rec = json.loads(line)
            results[rec["custom_id"]] = rec["response"]["body"]
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return rc, results, report


def test_calibration_file_names_its_model_and_holds_thresholds(store_root):
    """sparsity.json records the model id and manifest digest, the tokens used, and one threshold per layer per
    target: 0 at target 0, positive and growing with the target."""
    model = _model(store_root)
    c = cal.load(model)
    assert c.model_id == model.name and c.manifest_sha256 == cal.manifest_sha256(model) and c.tokens == 512
    assert sorted(c.thresholds) == [0.0, 0.5]
    assert len(c.thresholds[0.5]) == 30 and set(c.thresholds[0.0]) == {0.0}
    assert all(t > 0 for t in c.thresholds[0.5])


def test_sparse_off_is_the_dense_path_bit_for_bit(tmp_path, store_root):
    """spec.offload.sparsity: off runs the dense engine: the same token ids and fingerprints as a manifest without
    the field, and the same logits as an engine built without sparsity (torch.equal, no tolerance)."""
    rc1, off, rep_off = _run(tmp_path, store_root, _job(tmp_path, "off", "off"))
    rc2, dense, rep_dense = _run(tmp_path, store_root, _job(tmp_path, "dense"))
    assert rc1 == rc2 == 0 and "sparsity" not in rep_off and "sparsity" not in rep_dense
    assert {k: (v["token_ids"], v["system_fingerprint"]) for k, v in off.items()} == \
           {k: (v["token_ids"], v["system_fingerprint"]) for k, v in dense.items()}
    spec = parse_job(yaml.safe_load(_job(tmp_path, "off2", "off").read_text()))
    assert spec.offload.sparsity is None
    ids = [[1, 504, 3458, 282, 4649, 314], [1, 1073, 2187]]
    e1, e2 = Engine(_model(store_root)), Engine(_model(store_root), sparsity=None)
    assert torch.equal(e1.prefill_logits(ids), e2.prefill_logits(ids))


def test_sparse_run_reads_fewer_ffn_bytes_and_stays_close(tmp_path, store_root):
    """A job at sparsity 0.5 runs end to end; its report counts about half the neuron activations dropped and
    decode FFN reads between a third (the gate alone) and all of the dense bytes; outputs carry another
    fingerprint than dense ones, so a dense result is never taken for a sparse one."""
    rc, res, report = _run(tmp_path, store_root, _job(tmp_path, "half", 0.5))
    assert rc == 0 and len(res) == 2
    sp = report["sparsity"]
    assert sp["target"] == 0.5 and sp["source"] == "calibrated"
    assert 0.35 < sp["token_sparsity"] < 0.65
    assert 1 / 3 < sp["decode"]["ffn_read_fraction"] < 0.95
    _, dense, _ = _run(tmp_path, store_root, _job(tmp_path, "dense2"))
    assert {v["system_fingerprint"] for v in res.values()}.isdisjoint(v["system_fingerprint"] for v in dense.values())


def test_sparse_ffn_is_the_dense_ffn_with_inactive_neurons_zeroed(store_root):
    """For a real layer's weights and random inputs of several tokens, the sparse FFN (gathered rows/columns of
    the union of active neurons) equals down(mask * act(gate) * up) computed with the full matrices; at threshold
    0 nothing but exact zeros is dropped and it equals the dense FFN."""
    model = _model(store_root)
    e = Engine(model, policy=Policy(weights_gpu_percent=100))
    c, w = e.config, e.streamer.get(5)
    h = torch.randn(2, 3, c.hidden_size, generator=torch.Generator().manual_seed(0))
    a = ACTIVATIONS[c.hidden_act](F.linear(h, w["w_gate"]))
    tau = float(a.abs().median())
    ffn = sparse.SparseFFN([tau] * c.num_layers, num_layers=c.num_layers)
    want = F.linear((a * (a.abs() > tau)) * F.linear(h, w["w_up"]), w["w_down"])
    torch.testing.assert_close(ffn.ffn(c, w, h, 4), want, rtol=1e-4, atol=1e-4)
    dense = F.linear(a * F.linear(h, w["w_up"]), w["w_down"])
    zero = sparse.SparseFFN([0.0] * c.num_layers, num_layers=c.num_layers)
    torch.testing.assert_close(zero.ffn(c, w, h, 4), dense, rtol=1e-4, atol=1e-4)
    s = ffn.reads.summary()
    assert 0.4 < s["token_sparsity"] < 0.6 and s["prefill"]["ffn_read_fraction"] <= 1


def test_relu_ffn_drops_only_zeros():
    """An OPT-style ReLU FFN at threshold 0 (its own sparsity, no calibration) equals the dense fc2(relu(fc1 h))
    and reads only the active neurons' fc2 columns."""
    g = torch.Generator().manual_seed(1)
    c = ModelConfig.from_dict({"architecture": "opt", "hidden_size": 16, "intermediate_size": 64, "num_layers": 1,
                               "num_heads": 2, "vocab_size": 32, "max_position_embeddings": 64})
    w = {"fc1_w": torch.randn(64, 16, generator=g), "fc1_b": torch.randn(64, generator=g),
         "fc2_w": torch.randn(16, 64, generator=g), "fc2_b": torch.randn(16, generator=g)}
    h = torch.randn(1, 1, 16, generator=g)
    ffn = sparse.SparseFFN([0.0], num_layers=1, source="relu")
    want = F.linear(F.relu(F.linear(h, w["fc1_w"], w["fc1_b"])), w["fc2_w"], w["fc2_b"])
    torch.testing.assert_close(ffn.ffn(c, w, h, 0), want)
    active = int((F.linear(h, w["fc1_w"], w["fc1_b"]) > 0).sum())
    assert ffn.reads.read_bytes["decode"] == (64 * 16 + active * 16) * 4


def test_calibrate_refuses_short_text_and_bad_targets(tmp_path, store_root, capsys):
    """Text under 512 tokens names --text; a target outside [0, 0.95] names --sparsity (argparse, exit 2)."""
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    assert kubeflash(["calibrate", str(_model(store_root)), "--text", str(short), "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--text" in err and "at least 512" in err
    with pytest.raises(SystemExit) as exit_:
        kubeflash(["calibrate", str(_model(store_root)), "--text", str(TEXT), "--sparsity", "0.97"])
    assert exit_.value.code == 2 and "--sparsity" in capsys.readouterr().err


def test_spec_unquoted_off_in_yaml_is_off():
    """`sparsity: off` unquoted is false in YAML 1.1 (what PyYAML and kubectl's go-yaml read): dense, like "off"."""
    doc = yaml.safe_load(f"""apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {{name: j}}
spec: {{model: {{uri: "{URI}"}}, input: {{prompts: [a]}}, offload: {{sparsity: off}}}}""")
    assert doc["spec"]["offload"]["sparsity"] is False
    assert parse_job(doc).offload.sparsity is None


@pytest.mark.parametrize("value", [1.2, -0.1, "on", True, "0.5"], ids=["above", "below", "word", "bool", "string"])
def test_spec_refuses_a_target_outside_the_range(value):
    """spec.offload.sparsity takes off or a number in [0, 0.95]; anything else is a SpecError naming the field."""
    doc = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
           "spec": {"model": {"uri": URI}, "input": {"prompts": ["a"]}, "offload": {"sparsity": value}}}
    with pytest.raises(SpecError, match=r"spec\.offload\.sparsity"):
        parse_job(doc)


def test_uncalibrated_target_and_uncalibrated_model_are_refused(tmp_path, store_root, smol_store, capsys):
    """A target the model was not calibrated for, or a model with no calibration at all, fails before any work,
    naming spec.offload.sparsity and the kubeflash calibrate command."""
    rc, res, _ = _run(tmp_path, store_root, _job(tmp_path, "notcal", 0.4))
    err = capsys.readouterr().err
    assert rc == 1 and not res and "spec.offload.sparsity 0.4" in err and "calibrated: 0, 0.5" in err
    bare = tmp_path / "bare"
    _farm(smol_store, bare / "models" / model_id(URI, dtype="float32", quantization="none"))
    rc, res, _ = _run(tmp_path, bare, _job(tmp_path, "nocal", 0.5))
    err = capsys.readouterr().err
    assert rc == 1 and not res and "no calibration data" in err and "kubeflash calibrate" in err


def test_stale_calibration_is_refused(tmp_path, store_root, smol_store):
    """A calibration made before the model changed (its manifest, which holds every file's sha256, differs) or
    copied from another model's directory is refused as stale, naming both."""
    model = _farm(smol_store, tmp_path / "m1")
    (model / cal.FILE).write_bytes((_model(store_root) / cal.FILE).read_bytes())  # another model id
    with pytest.raises(cal.CalibrationError, match="stale"):
        cal.thresholds_for(model, 0.5, num_layers=30, field="spec.offload.sparsity")
    mine = json.loads((model / cal.FILE).read_text()) | {"model_id": model.name}
    (model / cal.FILE).write_text(json.dumps(mine))
    assert len(cal.thresholds_for(model, 0.5, num_layers=30, field="f")) == 30  # now it is this model's
    m = json.loads((model / "manifest.json").read_text())
    m["source"] = "changed"
    (model / "manifest.json").write_text(json.dumps(m))  # the model changed after calibration
    with pytest.raises(cal.CalibrationError, match="stale"):
        cal.thresholds_for(model, 0.5, num_layers=30, field="spec.offload.sparsity")
    ffn = sparse.for_job(ModelConfig.from_dict(m["config"]), _model(store_root), 0.5)
    assert ffn.target == 0.5 and len(ffn.thresholds) == 30
    out = Engine(_model(store_root), sparsity=ffn).generate([[1, 504, 3458]], GenParams(max_new_tokens=3))
    assert len(out[0].tokens) == 3


def test_neuron_bundles_read_only_the_active_neurons(tmp_path, smol_store):
    """Bundled up rows and down columns give the same FFN output as the stage file's matrices, and the reader
    reads exactly one bundle (2H floats) per active neuron, in one read per run of consecutive neurons."""
    from kubeflash_node.store.bundles import BundleReader, runs, write_bundles

    model = _farm(smol_store, tmp_path / "m")
    write_bundles(model)
    e = Engine(model, policy=Policy(weights_gpu_percent=100))
    c, w = e.config, e.streamer.get(3)
    h = torch.randn(1, 1, c.hidden_size, generator=torch.Generator().manual_seed(2))
    tau = [0.1] * c.num_layers
    plain = sparse.SparseFFN(tau, num_layers=c.num_layers)
    reader = BundleReader(model)
    bundled = sparse.SparseFFN(tau, num_layers=c.num_layers, bundles=reader)
    streamed = {k: v for k, v in w.items() if k not in ("w_up", "w_down")}  # as the streamer hands a bundled layer
    torch.testing.assert_close(bundled.ffn(c, streamed, h, 2), plain.ffn(c, w, h, 2), rtol=1e-4, atol=1e-4)
    a = ACTIVATIONS[c.hidden_act](F.linear(h, w["w_gate"]))[0, 0]
    active = (a.abs() > 0.1).nonzero().squeeze(1).tolist()
    rows = torch.from_numpy(BundleReader(model).read(2, active))  # the same numbers as the stage file's, exactly
    ix = torch.tensor(active)
    assert torch.equal(rows[:, :c.hidden_size], w["w_up"][ix]) and torch.equal(rows[:, c.hidden_size:].T, w["w_down"][:, ix])
    assert 0 < len(active) < c.intermediate_size
    assert reader.bytes_read == len(active) * 2 * c.hidden_size * 4 and reader.reads == len(runs(active))
    assert bundled.reads.summary()["decode"]["runs_per_layer_call"] == reader.reads
    m = json.loads((model / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps(m | {"source": "changed"}))
    with pytest.raises(Exception, match="stale"):
        BundleReader(model)


def _streamed_job(tmp_path: Path, name: str, sparsity, cpu_memory: str | None = None) -> Path:
    doc = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": name},
           "spec": {"model": {"uri": URI}, "input": {"prompts": ["What is the capital of France?"]},
                    "generation": {"maxNewTokens": 8},
                    "offload": {"policy": "explicit", "gpuBatchSize": 1, "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                                "kv": {"gpu": 100, "cpu": 0, "disk": 0}, "sparsity": sparsity}}}
    if cpu_memory:
        doc["spec"]["resources"] = {"cpuMemory": cpu_memory}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("target", [0, 0.5], ids=["t0", "t50"])
def test_a_hot_set_of_input_channel_rows_saves_exactly_its_ssd_bytes(tmp_path, store_root, target):
    """SmolLM2 streamed from disk with input sparsity: a job with cpuMemory holds a quarter of it as hot channel
    rows (chosen from the calibration's keep frequencies) and reads from the channel files exactly the bytes it
    read without them less the bytes served from memory, with the same tokens; at target 0 those are the dense
    run's tokens."""
    _, plain, rep = _run(tmp_path, store_root, _streamed_job(tmp_path, f"plain{int(100 * target)}", target))
    _, hot, rep_hot = _run(tmp_path, store_root, _streamed_job(tmp_path, f"hot{int(100 * target)}", target, "300Mi"))
    s, h = rep["sparsity"], rep_hot["sparsity"]
    assert s["method"] == h["method"] == "input" and "channel_cache" not in s
    c = h["channel_cache"]
    assert 0 < c["hot_bytes"] <= 300 * 2**20 // 4 and c["window"] == 0 and c["hit_bytes"] > 0
    assert h["channel_bytes_read"] + c["hit_bytes"] == s["channel_bytes_read"]
    assert [v["token_ids"] for v in hot.values()] == [v["token_ids"] for v in plain.values()]
    if target == 0:
        _, dense, _ = _run(tmp_path, store_root, _streamed_job(tmp_path, "dense-streamed", "off"))
        assert [v["token_ids"] for v in hot.values()] == [v["token_ids"] for v in dense.values()]
