"""What the cost model overlaps: the disk KV tier's writes (a prefill writes the whole prompt's K and V) run on their
own thread, so they are priced on the disk at the ceilings' disk_write rate and a stage takes the larger of them and
its compute, never the sum; a resident layer over a device cache takes the larger of its per-call overhead and its
GPU work (the CPU launches ahead), a streamed one their sum (issue 18, items 2 and 4)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kubeflash_node.engine.ceilings import Ceilings
from kubeflash_node.engine.costmodel import Budget, Calibration, Candidate, JobShape, predict, stage_sizes
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.modelconfig import preset

LLAMA32K = preset("llama-3-8b-32k")
OPT = preset("opt-1.3b")
JOB32K = JobShape(4, 32736, 4)  # the session-13 long-context run: 4 x 32K prompts, KV on the SSD
KV_DISK = Policy(weights_gpu_percent=100, kv="disk", kv_write_back=True, gpu_batch_size=4)


# the H100's of session 13, rounded
CEIL = Ceilings(disk_read_cold=1.6, disk_read_warm=13.8, disk_write=2.4, h2d_pinned=55.0, matmul_tflops=770.0)


def _pred(policy=KV_DISK, job=JOB32K, ceil=CEIL, c=LLAMA32K, cal=Calibration()):
    # 10 GiB of host memory: the 17 GB cache does not fit the page cache
    return predict(Candidate(policy), config=c, ceil=ceil, job=job, budget=Budget(80 << 30, 10 << 30),
                   sizes=stage_sizes(c, 2), cal=cal)


def test_a_kv_disk_prefill_prices_writing_the_prompts_cache():
    """The prefill's disk time is the whole prompt's K and V (every layer, every sequence) at disk_write; a device
    cache writes nothing."""
    pr = _pred()
    written = JOB32K.prompts * JOB32K.prompt_len * LLAMA32K.kv_bytes_per_token(2)  # 17.2 GB
    assert pr.phases["prefill"][0]["disk"] == pytest.approx(written / 2.4e9, rel=1e-9)
    slower = _pred(ceil=replace(CEIL, disk_write=1.2))
    assert slower.phases["prefill"][0]["disk"] == pytest.approx(2 * pr.phases["prefill"][0]["disk"], rel=1e-9)
    assert _pred(replace(KV_DISK, kv="device", kv_write_back=False)).phases["prefill"][0]["disk"] == 0.0
    # decode writes one row a sequence per step: its disk time is the prefix reads plus those few bytes
    reads = sum(JOB32K.prompts * (JOB32K.prompt_len + s) * LLAMA32K.kv_bytes_per_token(2)
                for s in range(JOB32K.gen_len - 1)) / 1.6e9
    rows = (JOB32K.gen_len - 1) * JOB32K.prompts * LLAMA32K.kv_bytes_per_token(2) / 2.4e9
    assert pr.phases["decode"][0]["disk"] == pytest.approx(reads + rows, rel=1e-6)


def test_kv_writes_overlap_the_prefill_compute():
    """Writes shorter than a layer's compute hide behind it (the prefill takes as long as with a free disk) and
    leave it compute-bound; writes longer than it make the prefill disk-bound and take the larger, not the sum."""
    free = _pred(ceil=replace(CEIL, disk_write=1e9))
    compute = free.phases["prefill"][0]["compute"]
    written = JOB32K.prompts * JOB32K.prompt_len * LLAMA32K.kv_bytes_per_token(2)
    hidden = _pred(ceil=replace(CEIL, disk_write=written / (0.5 * compute) / 1e9))  # writes take half the compute
    assert hidden.phases["prefill"][0]["disk"] == pytest.approx(0.5 * compute, rel=1e-9)
    assert hidden.phase_s("prefill") == pytest.approx(free.phase_s("prefill"), rel=1e-12)
    top, margin = hidden.phase_bound("prefill")
    assert top == "compute" and margin == pytest.approx(2.0, rel=1e-6)
    slow = _pred(ceil=replace(CEIL, disk_write=written / (3 * compute) / 1e9))  # writes take 3x the compute
    res, bound = slow.phases["prefill"]
    assert slow.phase_bound("prefill") == ("disk", pytest.approx(3.0, rel=1e-6))
    assert bound["disk"] == pytest.approx(res["disk"])  # every layer waits for its writes ...
    assert slow.phase_s("prefill") < res["disk"] + res["compute"]  # ... while computing: not the sum
    assert slow.phase_s("prefill") == pytest.approx(res["disk"] + bound["compute"] + bound["pcie"])
    assert "prefill" in slow.why() and f"prefill {slow.phase_s('prefill'):.3g} s disk-bound" in slow.why()


def test_the_plan_says_a_slow_disk_write_bounds_the_kv_disk_prefill():
    """phase_summary (what `kubeflash plan --json` writes) names the disk for a prefill whose writes outlast its
    compute, and compute where they do not."""
    assert _pred(ceil=replace(CEIL, disk_write=0.5)).phase_summary()["prefill"]["bound"] == "disk"
    assert _pred(ceil=replace(CEIL, disk_write=20.0)).phase_summary()["prefill"]["bound"] == "compute"
    assert _pred().phase_summary()["decode"]["bound"] == "disk"  # 4 x 32K of K and V read back every step


def test_a_resident_layer_over_a_device_cache_takes_the_larger_of_overhead_and_gpu_work():
    """Decode of a small resident job over a device cache: the GPU's work is under the per-call overhead, so a faster
    GPU changes nothing; the same job streaming its weights from host memory pays both, so it does."""
    job = JobShape(4, 256, 16)
    resident = Policy(weights_gpu_percent=100, gpu_batch_size=4)
    streamed = Policy(weights_gpu_percent=0, weights_cpu_percent=100, gpu_batch_size=4)

    def decode_compute(policy, tflops):
        return _pred(policy, job, replace(CEIL, matmul_tflops=tflops), c=OPT).phases["decode"][0]["compute"]

    assert decode_compute(resident, 770.0) == pytest.approx(decode_compute(resident, 1540.0), rel=1e-12)
    assert decode_compute(streamed, 770.0) > decode_compute(streamed, 1540.0)
    overhead = Calibration().layer_overhead_s
    calls = OPT.num_layers * (job.gen_len - 1)  # one micro-batch
    assert decode_compute(resident, 770.0) == pytest.approx(calls * overhead * (1 + 0.75 / OPT.num_layers))


def test_x_cache_recompute_past_the_overhead_is_the_call_time():
    """Where a resident X-cache layer's recompute of K, V outlasts the overhead (ourslc: 8 x 8K tokens, ~1.7 ms), the
    call takes the GPU's time, so halving the overhead only speeds up the other layers' calls."""
    job, p = JobShape(16, 8192, 32), Policy(weights_gpu_percent=100, gpu_batch_size=8, x_cache_percent=50.0)

    def decode(overhead):
        return _pred(p, job, c=OPT, cal=Calibration(layer_overhead_s=overhead)).phase_s("decode")

    full, half = decode(1.5e-3), decode(0.75e-3)
    x_layers = len(p.x_layers(OPT.num_layers))
    calls = (OPT.num_layers - x_layers + 0.75) * 2 * (job.gen_len - 1)  # the others, the embedding and the head
    assert full - half == pytest.approx(calls * 0.75e-3, rel=1e-6)
