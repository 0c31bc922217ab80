"""The cost model prices prefill and decode apart: the phases add up to the run, each names the resource that
bounds it and by how many times the next resource's time, and `kubeflash plan` prints and writes both (issue 18,
item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubeflash_node.engine.ceilings import Ceilings
from kubeflash_node.engine.costmodel import Budget, Candidate, JobShape, predict, stage_sizes
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.modelconfig import preset

ROOT = Path(__file__).resolve().parents[2]
LLAMA = preset("llama-3-8b")


CEIL = Ceilings(disk_read_cold=1.5, disk_read_warm=14.0, disk_write=2.0, h2d_pinned=55.0, matmul_tflops=750.0)


def _pred(policy: Policy, job: JobShape, budget=Budget(1 << 50, 1 << 50)):
    return predict(Candidate(policy), config=LLAMA, ceil=CEIL, job=job, budget=budget,
                   sizes=stage_sizes(LLAMA, 2))


@pytest.mark.parametrize("policy, job", [
    (Policy(gpu_batch_size=8), JobShape(8, 512, 32)),  # every layer from disk
    (Policy(weights_gpu_percent=100, gpu_batch_size=8, num_gpu_batches=4), JobShape(64, 2048, 3)),  # resident
    (Policy(weights_gpu_percent=30, weights_cpu_percent=10, kv="cpu", gpu_batch_size=16), JobShape(16, 512, 4)),
], ids=["disk-decode", "resident-prefill", "mixed-kv-cpu"])
def test_phases_add_up_to_the_run(policy, job):
    pr = _pred(policy, job)
    assert set(pr.phases) == {"prefill", "decode"}
    assert pr.phase_s("prefill") + pr.phase_s("decode") == pytest.approx(pr.run_s, rel=1e-9)
    for ph, (res, bound) in pr.phases.items():
        assert all(v >= 0 for v in res.values()) and all(v >= 0 for v in bound.values()), (ph, res, bound)
        assert sum(bound.values()) <= sum(res.values()) + 1e-9  # a stage's slowest resource is one of its resources
    for k in pr.resource_s:  # the phases split the run's summed resource time
        assert pr.phases["prefill"][0][k] + pr.phases["decode"][0][k] == pytest.approx(pr.resource_s[k], abs=1e-9)


def test_a_prefill_only_job_has_no_decode_phase():
    pr = _pred(Policy(gpu_batch_size=16, num_gpu_batches=4), JobShape(64, 1024, 1))
    assert list(pr.phases) == ["prefill"] and pr.phase_s("prefill") == pytest.approx(pr.run_s)
    assert "decode" not in pr.why()


def test_each_phase_names_its_bound_and_the_margin():
    """Streaming every layer from disk: decode (one token a step) is disk-bound by far; a long resident prefill is
    compute-bound. The margin is the bound resource's time over the next one's."""
    disk = _pred(Policy(gpu_batch_size=8), JobShape(8, 512, 32))
    top, margin = disk.phase_bound("decode")
    res = disk.phases["decode"][0]
    assert top == "disk" and margin == pytest.approx(res["disk"] / max(res["pcie"], res["compute"]))
    assert margin > 10  # 16 GB a step at 1.5 GB/s against ~0.3 s of PCIe
    resident = _pred(Policy(weights_gpu_percent=100, gpu_batch_size=8, num_gpu_batches=4), JobShape(64, 2048, 3))
    assert resident.phase_bound("prefill")[0] == "compute"
    why = disk.why()
    assert "prefill" in why and "decode" in why and f"decode {disk.phase_s('decode'):.3g} s disk-bound" in why
    summary = disk.phase_summary()
    assert summary["decode"]["bound"] == "disk" and summary["decode"]["times_next"] == pytest.approx(margin)


def test_page_locking_prefill_does_not_hide_counts_in_decode():
    """A block's host KV cache is page-locked behind its prefill; what the prefill does not hide delays the first
    decode step, so it is decode's time."""
    pr = _pred(Policy(weights_gpu_percent=100, kv="cpu", gpu_batch_size=64), JobShape(64, 64, 4000),
               budget=Budget(1 << 50, 1 << 50))
    assert pr.lock_s > 0
    assert pr.phase_s("decode") == pytest.approx(sum(pr.phases["decode"][1].values()) + pr.lock_s)


def test_plan_cli_states_each_phase_bound(tmp_path):
    """`kubeflash plan` says which resource bounds prefill and which bounds decode, and by how much (issue 18 item 4):
    the opt-13b job of session 11 on its recorded ceilings."""
    job = tmp_path / "job.yaml"
    job.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: p}\nspec:\n"
                   "  model: {uri: 'dummy:opt-13b'}\n  input: {synthetic: {count: 16, promptLength: 512}}\n"
                   "  generation: {maxNewTokens: 4}\n")
    out = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "plan", str(job), "--ceilings",
                          str(ROOT / "docs/bench-results/s11/ours-opt13-fp16-gen4.json"), "--gpu-memory", "12GiB",
                          "--cpu-memory", "10GiB", "--store", str(tmp_path), "--json", str(tmp_path / "plan.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    why = next(line for line in out.stdout.splitlines() if line.strip().startswith("why:"))
    assert "; prefill " in why and "; decode " in why and why.count("disk-bound") == 3, why
    assert "x compute" in why or "x pcie" in why, why
    phases = json.loads((tmp_path / "plan.json").read_text())["best"]["phases"]
    assert set(phases) == {"prefill", "decode"}
    for ph in phases.values():
        assert ph["bound"] == "disk" and ph["times_next"] > 1 and ph["s"] > 0
