"""A MoE model's measured routing profile persists in its store entry and prices the next plan.

Every routed run of the tiny random Qwen3-MoE through run_job (the path of `kubeflash run` and the pod) adds its
routing by read shape to the entry's .routing-profile.json (store/routingprofile.py), tied to the entry's model id and
manifest; `kubeflash plan` and run_job's policy: auto then price with it and say so ("routing: measured in N runs"),
and say "routing: uniform (no measured profile)" where there is none. A profile copied into another model's entry,
one of an earlier version of the model, and a corrupt file are ignored with the reason, naming the file (the run then
starts the profile over); the node agent's publish step takes a pod's profile only for the same model and with more
runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from readonly_mount import read_only
from tiny_jobs import CEILINGS, KUBEFLASH, job_doc, plan_cli, run_tiny_job, tiny_job
from tiny_moe import VOCAB, qwen3_moe

from kubeflash_api import parse_job
from kubeflash_node.engine.bench import Ceilings
from kubeflash_node.engine.costmodel import RoutingProfile
from kubeflash_node.engine.machine import Machine
from kubeflash_node.engine.moeplan import stored_routing
from kubeflash_node.store import routingprofile as rp
from kubeflash_node.store.cache import ensure_model
from kubeflash_node.store.modelconfig import ModelConfig


@pytest.fixture()
def entry(tmp_path):
    """(HF dir, the store root, the model's entry in it) for the tiny Qwen3-MoE, float32."""
    _, hf = qwen3_moe(tmp_path)
    model_dir, _ = ensure_model(str(hf), dtype="float32", root=tmp_path / "root", progress_bar=False)
    return hf, tmp_path / "root", model_dir


def _routed(tmp: Path, model_dir: Path, name: str, **kw):
    """One routed run (weights streamed from disk, expert prefetch off) of 2 prompts x (6 + 4) at batch 2."""
    spec = tiny_job({"expertPrefetch": "off"}, vocab=VOCAB, name=name, count=2, prompt_length=6, new=4, batch=2)
    report, engine, _ = run_tiny_job(spec, model_dir, tmp / name, **kw)
    return report, engine


def _plan(tmp: Path, hf: Path, root: Path) -> tuple[subprocess.CompletedProcess, dict]:
    return plan_cli(tmp, hf, dtype="float32", count=2, prompt_length=6, new=4, store=root)


def _line(out: str) -> str:
    [line] = [x for x in out.splitlines() if x.startswith("routing: ")]
    return line


def test_routed_runs_write_the_profile_and_the_next_plan_uses_it(entry, tmp_path):
    hf, root, model_dir = entry
    path = model_dir / rp.PROFILE_FILE
    before, p0 = _plan(tmp_path, hf, root)
    assert _line(before.stdout) == "routing: uniform (no measured profile)"
    assert p0["moe"]["routing"]["measured"] is False

    report, engine = _routed(tmp_path, model_dir, "one")
    assert report["routing_profile_saved_to"] == str(path)
    got, why = rp.load(model_dir)
    assert why is None and got.runs == 1 and got.model_id == model_dir.name
    assert got.manifest_sha256 == rp.manifest_sha256(model_dir)
    # the stored means are the run report's routing_profile: 2 sequences x 6 prompt tokens, then 2 x 1 per step
    assert [x for pt in got.points() for x in pt] == pytest.approx([x for pt in report["routing_profile"] for x in pt])
    assert {(s, t) for s, t, _ in got.points()} == {(2, 6), (2, 1)}
    first = got.shapes

    _routed(tmp_path, model_dir, "two")  # a second run adds its sums: same shapes, twice the layer reads
    got, _ = rp.load(model_dir)
    assert got.runs == 2
    assert [x[3] for x in got.shapes] == [2 * x[3] for x in first]

    after, p1 = _plan(tmp_path, hf, root)
    c = ModelConfig.from_dict(json.loads((model_dir / "manifest.json").read_text())["config"])
    pol = p1["best"]["policy"]
    block = pol["gpu_batch_size"] * pol["num_gpu_batches"]
    measured = RoutingProfile(got.points())
    line = _line(after.stdout)
    assert line.startswith(f"routing: measured in 2 runs ({path}), {measured.distinct(c, block, 1):.1f} distinct "
                           f"experts per layer at batch {block}"), line
    moe = p1["moe"]
    assert moe["routing"]["measured"] and moe["routing"]["runs"] == 2 and moe["routing"]["source"] == str(path)
    assert moe["expected_experts_decode"] == pytest.approx(measured.distinct(c, block, 1))
    assert moe["expected_experts_prefill"] == pytest.approx(measured.distinct(c, block, 6))
    assert "routing as measured (the store entry's profile)" in after.stdout
    print(f"\nbefore any run: {_line(before.stdout)}\nafter two routed runs: {line}")

    # policy: auto through run_job on the GPU machine's ceilings prices with it and says so in the report
    doc = job_doc({}, name="auto", count=2, prompt_length=6, new=4)
    doc["spec"]["offload"] = {"policy": "auto", "expertPrefetch": "off"}
    spec = parse_job(doc)
    prompts = tuple(replace(p, token_ids=tuple(t % VOCAB for t in p.token_ids)) for p in spec.input.prompts)
    spec = replace(spec, input=replace(spec.input, prompts=prompts))  # ids within the tiny vocabulary
    gpu = Machine(Ceilings.load(CEILINGS), 80 << 30, 64 << 30)
    report, engine, _ = run_tiny_job(spec, model_dir, tmp_path / "auto", machine=gpu)
    assumed = report["routing_assumed"]
    assert "plan" in report and assumed["measured"] and assumed["runs"] == 2
    assert assumed["line"].startswith(f"routing: measured in 2 runs ({path}), ")
    print(f"policy auto (run_job): {report['plan']['chosen']}\n  {assumed['line']}")


def test_another_models_profile_is_ignored(entry, tmp_path):
    """A profile copied into the entry of another model (its id differs), or one of an earlier version of the same
    entry (its manifest differs), is not used: uniform routing, and the plan says why, naming the file."""
    hf, root, model_dir = entry
    _routed(tmp_path, model_dir, "one")
    _, hf8 = qwen3_moe(tmp_path / "eight", experts=8)
    other, _ = ensure_model(str(hf8), dtype="float32", root=root, progress_bar=False)
    assert other.name != model_dir.name
    shutil.copy(model_dir / rp.PROFILE_FILE, other / rp.PROFILE_FILE)
    c8 = ModelConfig.from_dict(json.loads((other / "manifest.json").read_text())["config"])
    r = stored_routing(c8, other)
    assert r.profile is None and f"measured on model {model_dir.name!r}, not {other.name!r}" in r.note
    proc, plan = _plan(tmp_path, hf8, root)
    line = _line(proc.stdout)
    assert line.startswith(f"routing: uniform (no measured profile; {other / rp.PROFILE_FILE}: ignored, measured on "
                           f"model {model_dir.name!r}"), line
    assert plan["moe"]["routing"]["measured"] is False

    stale = json.loads((model_dir / rp.PROFILE_FILE).read_text()) | {"manifest_sha256": "0" * 64}
    (model_dir / rp.PROFILE_FILE).write_text(json.dumps(stale))
    c = ModelConfig.from_dict(json.loads((model_dir / "manifest.json").read_text())["config"])
    r = stored_routing(c, model_dir)
    assert r.profile is None and "another version" in r.note and str(model_dir / rp.PROFILE_FILE) in r.note


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "kubeflash-routing-profile/1", "model_id": 3}',
                                     b'{"format": "kubeflash-routing-profile/1", "model_id": "m", '
                                     b'"manifest_sha256": "x", "runs": 1, "shapes": [[2, 6, -1, 4]]}'],
                         ids=["not-json", "no-manifest", "negative-count"])
def test_a_corrupt_profile_is_ignored_with_a_warning_naming_it(entry, tmp_path, content, capfd):
    """Ignored, not refused: a profile only prices reads. The plan prices uniform routing and names the file and
    what is wrong; the next routed run starts the profile over (one run) and says the old file was replaced."""
    hf, root, model_dir = entry
    path = model_dir / rp.PROFILE_FILE
    path.write_bytes(content)
    proc, plan = _plan(tmp_path, hf, root)
    line = _line(proc.stdout)
    assert line.startswith(f"routing: uniform (no measured profile; {path}") and "(ignored)" in line, line
    assert plan["moe"]["routing"]["measured"] is False and str(path) in plan["moe"]["routing"]["note"]
    capfd.readouterr()
    _routed(tmp_path, model_dir, "one")
    assert f"kubeflash: {path}" in capfd.readouterr().err
    got, why = rp.load(model_dir)
    assert why is None and got.runs == 1


def test_read_only_model_dir_writes_the_job_dir_and_the_agent_publishes_it(entry, tmp_path):
    """Where the model directory cannot be written (a pod's model volume), the run writes the model's profile plus
    its run to <job dir>/routing-profile.json; publish_profile (the node agent's step) makes it the model's when it
    is this model's and counts more runs, and refuses one of another model by name."""
    hf, root, model_dir = entry
    _routed(tmp_path, model_dir, "one")  # the model's profile: 1 run
    with read_only(model_dir):
        report, _ = _routed(tmp_path, model_dir, "pod")
    job_file = tmp_path / "pod" / rp.JOB_PROFILE_FILE
    assert report["routing_profile_saved_to"] == str(job_file)
    assert rp.load(model_dir)[0].runs == 1
    raw = job_file.read_bytes()
    assert rp.publish_profile(model_dir, raw, where="ns/pod/routing-profile.json")
    assert rp.load(model_dir)[0].runs == 2
    assert not rp.publish_profile(model_dir, raw, where="ns/pod/routing-profile.json")  # not more runs: kept
    foreign = json.loads(raw) | {"model_id": "other-0123456789abcdef", "runs": 9}
    with pytest.raises(ValueError, match="ns/x/routing-profile.json: measured on model 'other-0123456789abcdef'"):
        rp.publish_profile(model_dir, json.dumps(foreign).encode(), where="ns/x/routing-profile.json")


def test_bench_records_the_profile_and_plans_with_it(entry, tmp_path):
    """`kubeflash bench --policy auto` (weights pinned to the disk, so its MoE layers are routed) on a store entry: the
    first run plans under uniform routing and writes the profile, the second plans with it and says so."""
    _, root, model_dir = entry

    def bench(n: int) -> tuple[subprocess.CompletedProcess, dict]:
        out = tmp_path / f"bench{n}.json"
        proc = subprocess.run(KUBEFLASH + ["bench", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu",
                                           "--store", str(root), "--prompts", "2", "--prompt-len", "6", "--gen-len",
                                           "4", "--ceilings", str(CEILINGS), "--policy", "auto", "--weights", "disk",
                                           "--json", str(out)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc, json.loads(out.read_text())

    first, r1 = bench(1)
    assert r1["routing_assumed"]["measured"] is False and "routing: uniform (no measured profile)" in first.stderr
    assert r1["routing_profile_saved_to"] == str(model_dir / rp.PROFILE_FILE)
    second, r2 = bench(2)
    assert r2["routing_assumed"]["measured"] and r2["routing_assumed"]["runs"] == 1
    assert f"routing: measured in 1 run ({model_dir / rp.PROFILE_FILE}), " in second.stderr
    assert rp.load(model_dir)[0].runs == 2
