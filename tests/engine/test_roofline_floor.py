"""The roofline floor prices the disk at the rate the run's own reads reached when that beats the probe, so a floor
never exceeds the measured time (session 11's opt-13b run: the probe's 1.43 GB/s put the floor 16% above it); the
disk probe reads the way the engine does (page-aligned buffers, the pattern it is given)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kubeflash_node.engine.bench import Ceilings, Workload, aligned_buffer, measure_disk_files, roofline
from kubeflash_node.engine.costmodel import stage_sizes
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.modelconfig import preset

ROOT = Path(__file__).resolve().parents[2]
S11 = ROOT / "docs/bench-results/s11/ours-opt13-fp16-gen4.json"


def _s11_roof(phase_s=None):
    d = json.loads(S11.read_text())
    w, r = d["workload"], d["report"]
    c = preset("opt-13b")
    policy = Policy(**{k: v for k, v in r["policy"].items() if k in Policy.__dataclass_fields__})
    stored = stage_sizes(c, 2)[0]
    ceil = Ceilings(**{k: v for k, v in d["ceilings"].items() if k in Ceilings.__dataclass_fields__})
    return d, roofline(stage_bytes=stored, placement=policy.placement(len(stored)),
                       w=Workload(w["prompts"], w["prompt_len"], w["gen_len"], policy.block_size), c=c, ceil=ceil,
                       policy=policy, itemsize=2, phase_s=phase_s)


def test_probe_only_floor_is_the_recorded_one_and_above_the_run():
    d, roof = _s11_roof()
    assert roof["disk_bytes"] == pytest.approx(d["roofline"]["disk_bytes"], rel=0.01)  # sizes from the config
    assert roof["disk_bytes_prefill"] + roof["disk_bytes_decode"] == roof["disk_bytes"]
    assert roof["disk_bytes_decode"] == pytest.approx(3 * roof["disk_bytes_prefill"])  # 4 passes, KV in CPU memory
    assert roof["floor_s"] > d["measured_s"]  # the defect: 1.43 GB/s over 60.4 GB is 42.3 s against 36.5 s measured


def test_floor_uses_the_run_s_own_read_rate_and_stays_below_the_run():
    d = json.loads(S11.read_text())
    pre, dec = d["report"]["prefill_latency_s"], d["report"]["decode_latency_s"]
    _, roof = _s11_roof((pre, dec))
    decode_rate = roof["disk_bytes_decode"] / dec / 1e9
    assert roof["disk_read_run_gbps"] == pytest.approx(decode_rate)  # decode read faster (1.77) than prefill (1.44)
    assert 1.7 < decode_rate < 1.85 and roof["disk_read_gbps"] == roof["disk_read_run_gbps"]
    assert roof["bound"] == "disk" and roof["floor_s"] <= pre + dec <= d["measured_s"]
    assert roof["disk_read_probe_gbps"] == pytest.approx(d["ceilings"]["disk_read_cold"])


@pytest.mark.parametrize("pre, dec", [(10.0, 1000.0), (0.5, 25.0), (30.0, 2.0), (3.0, 0.0)],
                         ids=["slow-decode", "fast-prefill", "fast-decode", "no-decode-time"])
def test_disk_term_never_exceeds_the_phases(pre, dec):
    """Whatever the phase times, the disk term at max(probe, either phase's rate) fits inside them (each phase's
    bytes at a rate at least its own take at most its time), or is the probe's own floor."""
    _, probe = _s11_roof()
    _, roof = _s11_roof((pre, dec))
    assert roof["t_disk_s"] <= max(pre + dec, 0) + 1e-9 or roof["t_disk_s"] == pytest.approx(probe["t_disk_s"])
    assert roof["t_disk_s"] <= probe["t_disk_s"] + 1e-9  # never slower than the probe says


def test_aligned_buffer_is_page_aligned():
    for n in (4096, 16 << 20):
        b = aligned_buffer(n)
        assert b.numel() == n and b.data_ptr() % 4096 == 0


@pytest.mark.skipif(sys.platform != "linux", reason="O_DIRECT")
def test_disk_probe_reads_real_files_with_the_pattern_given(tmp_path):
    """The --cold probe is handed the run's pattern (reader threads + prefetched stages, task size) and reports it
    with the rate it reached over the files' bytes."""
    files = []
    for i in range(2):
        f = tmp_path / f"layer{i}.bin"
        f.write_bytes(os.urandom(3 << 20))
        files.append(f)
    got = measure_disk_files(files, thread_options=(3,), task_options=(1 << 20,))
    assert got["disk_read_threads"] == 3 and got["disk_read_task_bytes"] == 1 << 20
    assert got["disk_probe_bytes"] == 6 << 20 and got["disk_read_cold"] > 0


def test_no_recorded_gpu_run_has_a_floor_above_its_measured_time():
    """bench/costmodel_check.py over every recorded GPU run: the floor the current code computes (the run's own read
    rate where it beat the probe) is at most the measured time, and the predicted phases add up to the run."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from costmodel_check import check_run, default_files
    finally:
        sys.path.pop(0)
    rows = [check_run(d) for f in default_files() if "measured_s" in (d := json.loads(f.read_text()))
            and "workload" in d and d["measured_s"]]
    assert len(rows) >= 30
    for r in rows:
        assert r["efficiency"] <= 1.0 + 1e-9, r
        assert r["prefill_pred"] + r["decode_pred"] == pytest.approx(r["predicted_s"], rel=1e-6), r
