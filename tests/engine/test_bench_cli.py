"""`kubeflash bench` end to end on CPU with a small dummy OPT: the auto policy plans from recorded ceilings and keeps
the placement flags given with it (pins), and the result records the model's predictions beside the measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(tmp_path, *args):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "kubeflash_node.cli", "bench", "--model", "dummy:opt-125m", "--dtype", "float32",
           "--device", "cpu", "--store", str(tmp_path / "store"), "--prompts", "4", "--prompt-len", "16",
           "--gen-len", "4", "--ceilings", str(ROOT / "docs/bench-results/ceilings.json"), "--json", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_auto_keeps_pinned_flags_and_plans_the_rest(tmp_path):
    proc, r = _bench(tmp_path, "--policy", "auto", "--kv", "cpu", "--gpu-batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    w = r["workload"]
    assert (w["policy_mode"], w["kv"], w["gpu_batch_size"]) == ("auto", "cpu", 2)  # the pins
    assert w["num_gpu_batches"] in (1, 2) and w["quantization"] == "none"  # planned, no compression unasked
    assert r["predicted_s"] > 0 and r["predicted_gpu_gib"] > 0 and r["report"]["generated_tokens"] == 16
    assert "policy auto:" in proc.stderr and "kv cpu" in proc.stderr
    phases = r["predicted_phases"]  # prefill and decode predicted apart, beside the measured ones
    assert set(phases) == {"prefill", "decode"} and sum(p["s"] for p in phases.values()) == pytest.approx(r["predicted_s"])
    assert "cost model per phase: prefill" in proc.stdout and "; decode" in proc.stdout
    assert r["roofline"]["disk_read_gbps"] >= r["roofline"]["disk_read_probe_gbps"]


def test_auto_with_an_impossible_pin_says_so(tmp_path):
    proc, r = _bench(tmp_path, "--policy", "auto", "--kv", "cpu", "--gpu-memory", "1MiB")
    assert proc.returncode == 1 and r is None
    assert "no candidate policy fits" in proc.stderr
