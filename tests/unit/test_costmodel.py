"""The cost model: stage sizes, memory-budget filtering, the bound it names, monotonic sanity, and its
predictions of the recorded H100 runs (docs/bench-results) staying within the error docs/costmodel.md states."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from kubeflash_node.engine.ceilings import Ceilings
from kubeflash_node.engine.costmodel import Budget, Candidate, JobShape, _steps, candidates, choose, memory, predict, stage_sizes
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.modelconfig import preset

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30
LLAMA = preset("llama-3-8b")


CEIL = Ceilings(disk_read_cold=2.0, disk_read_warm=14.0, disk_write=2.0, h2d_pinned=55.0, matmul_tflops=750.0)


def _pred(policy: Policy, job=JobShape(8, 512, 32), ceil=CEIL, quant="none", c=LLAMA):
    return predict(Candidate(policy, quant), config=c, ceil=ceil, job=job, budget=Budget(1 << 50, 1 << 50),
                   sizes=stage_sizes(c, 2, quant))


def test_stage_sizes_match_params_and_shrink_with_quantization():
    """Float sizes are params x itemsize; int8 and int4 shrink only the layers, int4 below int8."""
    none, _ = stage_sizes(LLAMA, 2)
    assert sum(none) == LLAMA.total_params() * 2
    i8, dense8 = stage_sizes(LLAMA, 2, "int8")
    i4, _ = stage_sizes(LLAMA, 2, "int4")
    assert i8[0] == none[0] and i8[-1] == none[-1] and i4[0] == none[0]  # embed and head stay float
    assert i4[1] < i8[1] < none[1] and dense8 == none
    assert 0.5 < i8[1] / none[1] < 0.56 and 0.26 < i4[1] / none[1] < 0.3  # 1.0625 and 0.5625 bytes a value


@pytest.mark.parametrize("gpu_gib, cpu_gib", [(5, 64), (8, 8), (24, 32), (80, 200)],
                         ids=["5g-gpu", "8g-both", "24g-gpu", "80g-gpu"])
def test_chosen_policy_fits_the_budgets(gpu_gib, cpu_gib):
    """Whatever is chosen fits both budgets (GPU with its reserve)."""
    job = JobShape(16, 512, 16)
    sizes = {"none": stage_sizes(LLAMA, 2)}
    plan = choose(candidates(job), config=LLAMA, ceil=CEIL, job=job, budget=Budget(gpu_gib * GIB, cpu_gib * GIB),
                  sizes=sizes)
    b = plan.best
    assert b.gpu_bytes + (1 << 30) <= gpu_gib * GIB and b.cpu_bytes <= cpu_gib * GIB
    assert plan.fitting <= plan.considered


def test_no_candidate_fits_a_tiny_budget():
    """A budget below the weights in flight gets an error saying which budgets were tried."""
    job = JobShape(8, 512, 8)
    with pytest.raises(ValueError, match="no candidate policy fits 1.5 GiB of GPU"):
        choose(candidates(job), config=LLAMA, ceil=CEIL, job=job, budget=Budget(int(1.5 * GIB), 64 * GIB),
               sizes={"none": stage_sizes(LLAMA, 2)})


def test_memory_counts_resident_weights_kv_and_slots():
    """Resident weights and device KV add to the GPU figure; cpu weights and cpu KV move it to the host."""
    job, sizes = JobShape(8, 512, 32), stage_sizes(LLAMA, 2)
    disk = memory(Candidate(Policy()), config=LLAMA, job=job, sizes=sizes)
    gpu = memory(Candidate(Policy(weights_gpu_percent=100)), config=LLAMA, job=job, sizes=sizes)
    cpu_kv = memory(Candidate(Policy(kv="cpu")), config=LLAMA, job=job, sizes=sizes)
    assert gpu[0] - disk[0] > sum(sizes[1]) * 0.75  # the whole model, minus the slots no longer needed
    assert cpu_kv[0] < disk[0] and cpu_kv[1] > disk[1]
    kv = 8 * (512 + 32) * LLAMA.kv_bytes_per_token(2)
    assert abs((cpu_kv[1] - disk[1]) - kv) < 0.01 * kv


@pytest.mark.parametrize("ceil, policy, bound", [
    (replace(CEIL, disk_read_cold=1.0), Policy(), "disk"),
    (replace(CEIL, h2d_pinned=1.0), Policy(weights_cpu_percent=100), "pcie"),
    (replace(CEIL, matmul_tflops=5.0), Policy(weights_gpu_percent=100), "compute"),
    (CEIL, Policy(weights_gpu_percent=100, gpu_batch_size=8), "compute"),
], ids=["slow-disk", "slow-pcie", "slow-gpu", "resident"])
def test_bound_names_the_slowest_resource(ceil, policy, bound):
    """The bound is the resource that is slowest in most of the run."""
    assert _pred(policy, ceil=ceil).bound == bound


def test_disk_bound_run_time_is_bytes_over_bandwidth():
    """A disk-streamed decode run costs (passes x model bytes) / disk bandwidth when the disk is the bottleneck."""
    job = JobShape(8, 128, 16)
    pr = _pred(Policy(gpu_batch_size=8), job=job, ceil=replace(CEIL, disk_read_cold=1.0))
    expect = job.gen_len * sum(stage_sizes(LLAMA, 2)[0]) / 1e9
    assert pr.bound == "disk" and pr.run_s == pytest.approx(expect, rel=0.01)


def test_monotonic_sanity():
    """More bandwidth never slows a run; more prompts or tokens never speed it up; resident beats streamed."""
    p = Policy(gpu_batch_size=8)
    base = _pred(p)
    assert _pred(p, ceil=replace(CEIL, disk_read_cold=4.0)).run_s <= base.run_s
    assert _pred(p, ceil=replace(CEIL, matmul_tflops=1500)).run_s <= base.run_s
    assert _pred(p, job=JobShape(16, 512, 32)).run_s >= base.run_s
    assert _pred(p, job=JobShape(8, 512, 64)).run_s >= base.run_s
    assert _pred(replace(p, weights_gpu_percent=100)).run_s <= _pred(replace(p, weights_cpu_percent=100)).run_s \
        <= base.run_s
    assert _pred(p, quant="int4").run_s < base.run_s  # disk-bound: a quarter of the bytes


def test_more_gpu_memory_never_slows_the_choice():
    """The best predicted time is non-increasing in the GPU budget."""
    job = JobShape(16, 256, 8)
    times = []
    for gib in (4, 8, 16, 32, 64):
        plan = choose(candidates(job, step=25), config=LLAMA, ceil=CEIL, job=job,
                      budget=Budget(gib * GIB, 64 * GIB), sizes={"none": stage_sizes(LLAMA, 2)})
        times.append(plan.best.total_s)
    assert times == sorted(times, reverse=True)


def test_candidates_are_valid_and_prefill_only_keeps_kv_on_device():
    """Every candidate is a valid policy whose micro-batches are all used; prefill-only jobs weigh no KV tier."""
    cs = candidates(JobShape(12, 64, 1), quantizations=("none", "int4"), kv_bits=(16, 8))
    assert {c.policy.kv for c in cs} == {"device"}
    assert all((c.policy.num_gpu_batches - 1) * c.policy.gpu_batch_size < 12 for c in cs)
    assert {c.quantization for c in cs} == {"none", "int4"}
    assert {c.policy.kv_bits for c in candidates(JobShape(4, 64, 4), kv_bits=(16, 8))} == {16, 8}


def test_sampled_decode_steps_match_every_step(monkeypatch):
    """Long generations are integrated over sampled steps: weights sum to the steps, and the time is close."""
    import kubeflash_node.engine.costmodel as cm

    assert sum(w for _, w in _steps(500)) == pytest.approx(500)
    job = JobShape(8, 256, 500)
    p = Policy(kv="cpu", gpu_batch_size=8, weights_gpu_percent=100)
    sampled = _pred(p, job=job).run_s
    monkeypatch.setattr(cm, "_steps", functools.partial(_steps, exact=10 ** 6))
    assert _pred(p, job=job).run_s == pytest.approx(sampled, rel=0.01)


def test_recorded_h100_runs_are_predicted_within_30_percent():
    """bench/validate_costmodel.py's predictions of docs/bench-results stay within 30% (docs/costmodel.md)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from validate_costmodel import predict_run
    finally:
        sys.path.pop(0)
    runs = [json.loads(f.read_text()) for f in sorted((ROOT / "docs" / "bench-results").glob("*.json"))]
    rows = [predict_run(d) for d in runs if "measured_s" in d]
    assert len(rows) >= 5
    for r in rows:
        assert abs(r["error"]) < 0.30, r
        assert r["bound"] == r["roofline_bound"], r
        assert r["gpu_gib"] == pytest.approx(r["gpu_gib_measured"], rel=0.15), r


def test_plan_cli_prints_the_choice(tmp_path):
    """`kubeflash plan` on a dummy model's job prints the chosen policy, why, the runner-up and a YAML snippet."""
    job = tmp_path / "job.yaml"
    job.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: p}\nspec:\n"
                   "  model: {uri: 'dummy:llama-3-8b'}\n  input: {synthetic: {count: 8, promptLength: 512}}\n"
                   "  generation: {maxNewTokens: 32}\n")
    out = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "plan", str(job), "--ceilings",
                          str(ROOT / "docs/bench-results/llama-decode-cold.json"), "--gpu-memory", "5GiB",
                          "--cpu-memory", "64GiB", "--store", str(tmp_path), "--json", str(tmp_path / "plan.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "chosen:" in out.stdout and "pcie-bound" in out.stdout and "runner-up:" in out.stdout
    assert "weights: {gpu: 0, cpu: 100, disk: 0}" in out.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["best"]["bound"] == "pcie" and plan["best"]["gpu_bytes"] + GIB <= 5 * GIB


def test_plan_cli_without_ceilings_says_how_to_get_them(tmp_path, capsys):
    """No ceilings file and no --measure: a one-line error naming both ways."""
    from kubeflash_node.cli import main

    job = tmp_path / "job.yaml"
    job.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: p}\nspec:\n"
                   "  model: {uri: 'dummy:opt-125m'}\n  input: {synthetic: {count: 2}}\n")
    assert main(["plan", str(job), "--gpu-memory", "4GiB", "--cpu-memory", "8GiB"]) == 1
    err = capsys.readouterr().err
    assert "kubeflash plan: error: no ceilings" in err and "--ceilings FILE" in err and "--measure" in err


def _plan_cli(tmp_path, offload: str, *extra):
    job = tmp_path / "job.yaml"
    job.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: p}\nspec:\n"
                   "  model: {uri: 'dummy:llama-3-8b'}\n  input: {prompts: ['one prompt']}\n"
                   "  generation: {maxNewTokens: 8}\n" + offload)
    return subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "plan", str(job), "--ceilings",
                           str(ROOT / "docs/bench-results/llama-decode-cold.json"), "--cpu-memory", "64GiB",
                           "--store", str(tmp_path), *extra], capture_output=True, text=True, timeout=120)


def test_plan_cli_predicts_an_explicit_policy_as_pinned(tmp_path):
    """An explicit spec.offload is predicted as written (a 4 x 2 block for one prompt too), said to fit or not with
    the numbers, and the automatic plan is shown beside it."""
    offload = ("  offload: {policy: explicit, weights: {gpu: 0, cpu: 0, disk: 100}, kv: {gpu: 0, cpu: 0, disk: 100},"
               " gpuBatchSize: 4, numGpuBatches: 2, kvWriteBack: true}\n")
    out = _plan_cli(tmp_path, offload, "--gpu-memory", "24GiB")
    assert out.returncode == 0, out.stderr
    assert "explicit (spec.offload, as the manifest pins it): weights gpu 0% cpu 0%" in out.stdout
    assert "micro-batch 4 x 2" in out.stdout and "fits the budgets" in out.stdout
    assert "policy auto instead" in out.stdout and "chosen:" in out.stdout
    tight = _plan_cli(tmp_path, offload.replace("disk: 100}, kv", "disk: 100}, kv").replace(
        "weights: {gpu: 0, cpu: 0, disk: 100}", "weights: {gpu: 100, cpu: 0, disk: 0}"), "--gpu-memory", "6GiB")
    assert tight.returncode == 0, tight.stderr
    assert "does NOT fit: GPU (with the 1 GiB reserve) needs" in tight.stdout and "the budget is 6.00 GiB" in tight.stdout


def test_plan_cli_names_a_pinned_batch_no_candidate_has(tmp_path):
    """Under policy auto, a pinned batch larger than the job names the pin instead of 'no candidate fits'."""
    out = _plan_cli(tmp_path, "  offload: {gpuBatchSize: 4, numGpuBatches: 2}\n", "--gpu-memory", "24GiB")
    assert out.returncode == 1
    assert "no candidate policy has what spec.offload pins" in out.stderr and "1 prompt(s)" in out.stderr


OPT13 = preset("opt-13b")


def test_x_cache_saves_bytes_only_for_multi_head_attention():
    """X is H values a token, K + V 2 x Nk x D: half for OPT (MHA), double for Llama-3-8B (GQA); candidates
    offer X-cache shares only where it saves bytes."""
    from kubeflash_node.engine.costmodel import x_cache_note, x_cache_saves

    assert x_cache_saves(OPT13) and not x_cache_saves(LLAMA)
    assert "saves bytes" in x_cache_note(OPT13) and "4096 values" in x_cache_note(LLAMA)
    job = JobShape(8, 512, 32)
    assert {c.policy.x_cache_percent for c in candidates(job, config=OPT13)} == {0.0, 50.0, 100.0}
    assert {c.policy.x_cache_percent for c in candidates(job, config=LLAMA)} == {0.0}


def test_x_cache_halves_the_offloaded_cache_and_adds_recompute():
    """For OPT-13B with KV in CPU memory, X-cache on every layer halves the host cache and the PCIe bytes of the
    cache, and adds GPU recompute; memory and time move in the stated directions."""
    from kubeflash_node.engine.costmodel import memory

    job = JobShape(32, 512, 32)
    sizes = stage_sizes(OPT13, 2)
    kv = Policy(gpu_batch_size=32, kv="cpu", weights_gpu_percent=100)  # no weight streaming to hide the cache
    x = replace(kv, x_cache_percent=100.0)
    host_kv = memory(Candidate(kv), config=OPT13, job=job, sizes=sizes)[1]
    host_x = memory(Candidate(x), config=OPT13, job=job, sizes=sizes)[1]
    base = memory(Candidate(replace(kv, kv="device")), config=OPT13, job=job, sizes=sizes)[1]
    assert (host_x - base) * 2 == pytest.approx(host_kv - base, rel=1e-6)
    slow_pcie = replace(CEIL, h2d_pinned=5.0)  # PCIe-starved: moving half the bytes wins despite the recompute
    assert _pred(x, job, slow_pcie, c=OPT13).run_s < _pred(kv, job, slow_pcie, c=OPT13).run_s
    fast_pcie = replace(CEIL, h2d_pinned=5000.0, matmul_tflops=50.0)  # compute-starved: recomputing K, V loses
    assert _pred(x, job, fast_pcie, c=OPT13).run_s > _pred(kv, job, fast_pcie, c=OPT13).run_s


def test_auto_plan_uses_a_technique_when_memory_is_tight():
    """A batch whose fp16 KV exceeds both budgets still gets a plan for OPT-13B, through X-cache or disk KV;
    the plan honours what the manifest pins (batch shape, switches)."""
    from kubeflash_node.engine.costmodel import plan

    job = JobShape(64, 512, 32)
    sizes = {"none": stage_sizes(OPT13, 2)}
    kv_total = 64 * 544 * OPT13.kv_bytes_per_token(2)
    budget = Budget(12 * GIB, int(kv_total * 0.7) + 4 * GIB)
    best = plan(config=OPT13, ceil=replace(CEIL, disk_read_cold=1.2), job=job, budget=budget, sizes=sizes).best
    p = best.candidate.policy
    assert best.gpu_bytes + (1 << 30) <= budget.gpu_bytes and best.cpu_bytes <= budget.cpu_bytes
    assert p.x_cache_percent > 0 or p.kv == "disk"
    pinned = plan(config=OPT13, ceil=CEIL, job=job, budget=budget, sizes=sizes,
                  keep=lambda q: q.gpu_batch_size == 8 and q.num_gpu_batches == 2).best.candidate.policy
    assert (pinned.gpu_batch_size, pinned.num_gpu_batches) == (8, 2)


def test_link_bytes_follow_the_kv_techniques():
    """What crosses PCIe per cached token (the roofline's count): X-cache reads X instead of K + V (half for
    OPT), CPU attention reads nothing back and writes float32 rows; 4-bit rows are about a quarter."""
    from kubeflash_node.engine.costmodel import kv_link_bytes

    plain = kv_link_bytes(OPT13, Policy(kv="cpu"), 2)
    assert plain[0] == plain[1] == OPT13.kv_bytes_per_token(2)
    x = kv_link_bytes(OPT13, Policy(kv="cpu", x_cache_percent=100.0), 2)
    assert x[0] * 2 == pytest.approx(plain[0])
    attn = kv_link_bytes(OPT13, Policy(kv="cpu", cpu_attention=True), 2)
    assert attn == (0, 2 * plain[1])
    q4 = kv_link_bytes(OPT13, Policy(kv="cpu", kv_bits=4), 2)
    assert 0.25 < q4[0] / plain[0] < 0.35


def test_page_locking_is_hidden_behind_the_prefill_until_it_outlasts_it():
    """A block's host cache is locked on a background thread while its prefill runs: only the excess counts."""
    from kubeflash_node.engine.costmodel import Calibration

    job, p = JobShape(32, 512, 32), Policy(gpu_batch_size=32, kv="cpu", weights_gpu_percent=100)
    sizes = stage_sizes(OPT13, 2)

    def pred(gbps):
        return predict(Candidate(p), config=OPT13, ceil=CEIL, job=job, budget=Budget(1 << 50, 1 << 50),
                       sizes=sizes, cal=Calibration(host_lock_gbps=gbps))

    fast, slow = pred(1000.0), pred(0.1)
    assert fast.lock_s == 0.0
    need = 32 * 544 * OPT13.kv_bytes_per_token(2) / 0.1e9
    assert 0 < slow.lock_s < need  # the prefill hid part of it
    assert slow.run_s - fast.run_s == pytest.approx(slow.lock_s)


@pytest.mark.parametrize("run", ["ours-opt30-cpu-32-s4", "ours-opt30-cpu-64-s4", "ours-opt30-cpu-96",
                                 "ours-opt30-cpu-128"])
def test_recorded_opt30_peer_runs_are_predicted_within_10_percent(run):
    """The session-4 opt-30b runs (docs/benchmarks.md): run time within 10%, PCIe-bound as the roofline says, and
    the GPU estimate at or above the measured peak (the plan must not overrun the cap), within 25%."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from validate_costmodel import predict_run
    finally:
        sys.path.pop(0)
    r = predict_run(json.loads((ROOT / "docs" / "bench-results" / "peers" / f"{run}.json").read_text()))
    assert abs(r["error"]) < 0.10, r
    assert r["bound"] == r["roofline_bound"] == "pcie", r
    assert r["gpu_gib_measured"] <= r["gpu_gib"] <= 1.25 * r["gpu_gib_measured"], r


def test_kv_disk_budget_keeps_the_plan_off_a_disk_cache_that_would_not_fit():
    """Budget.disk_bytes (spec.resources.kvDisk): a disk KV cache larger than it is never chosen; when nothing
    else fits either, the error names the KV disk budget."""
    from kubeflash_node.engine.costmodel import kv_disk_bytes, plan

    job = JobShape(64, 512, 32)
    sizes = {"none": stage_sizes(OPT13, 2)}
    kv_total = 64 * 544 * OPT13.kv_bytes_per_token(2)
    tight_cpu = Budget(12 * GIB, int(kv_total * 0.3) + 4 * GIB)
    roomy = plan(config=OPT13, ceil=CEIL, job=job, budget=tight_cpu, sizes=sizes)
    small = plan(config=OPT13, ceil=CEIL, job=job, budget=replace(tight_cpu, disk_bytes=GIB), sizes=sizes)
    for pr in (roomy, small):
        assert pr.best.gpu_bytes + GIB <= 12 * GIB
    assert kv_disk_bytes(small.best.candidate, config=OPT13, job=job) <= GIB
    assert kv_disk_bytes(Candidate(Policy(gpu_batch_size=8, num_gpu_batches=2, kv="disk")), config=OPT13, job=job) \
        == 16 * 544 * OPT13.kv_bytes_per_token(2)
    with pytest.raises(ValueError, match="and 0.0 GiB of KV disk"):
        plan(config=OPT13, ceil=CEIL, job=job, budget=Budget(2 * GIB, 3 * GIB, 0), sizes=sizes,
             keep=lambda q: q.kv == "disk")


@pytest.mark.parametrize("x_percent", [0.0, 50.0], ids=["kv", "x-cache-half"])
def test_disk_kv_charges_its_staging_and_read_buffers_to_the_host(x_percent):
    """The disk KV tier's host buffers are charged: 2 staging buffers of a micro-batch's prompt rows of one layer
    (kvcache.DiskKV.WRITES_IN_FLIGHT) and 2 prefix buffers of its rows (READ_SLOTS), each for the K/V tier and, with
    X-cache layers, the X tier beside it; write-back's buffered rows come on top; a prefill-only job holds none."""
    g, s, gen = 4, 32736, 4
    job, sizes = JobShape(4, s, gen), stage_sizes(LLAMA, 2)
    base = Policy(gpu_batch_size=g, weights_gpu_percent=100, x_cache_percent=x_percent)

    def host(job=job, **kw):
        return memory(Candidate(replace(base, **kw)), config=LLAMA, job=job, sizes=sizes)[1]

    kv_row = 2 * LLAMA.num_kv_heads * LLAMA.head_dim * 2  # K and V of one token of one layer, float16
    x_row = LLAMA.hidden_size * 2  # X as two halves
    rows = [kv_row] + ([x_row] if x_percent else [])
    buffers = sum(2 * g * s * r + 2 * g * (s + gen) * r for r in rows)
    assert host(kv="disk") - host(kv="device") == buffers
    buffered = LLAMA.num_layers * min(8 << 20, (s + gen) * g * kv_row)  # write-back's rows per (layer, micro-batch)
    assert host(kv="disk", kv_write_back=True) - host(kv="disk") == buffered
    one = JobShape(4, s, 1)
    assert host(job=one, kv="disk") == host(job=one, kv="device")
