"""Tensor parallelism on two GPUs (issue 22): `kubeflash run --device cuda --tensor-parallel 2`, rank R on cuda:R.

Needs 2 CUDA GPUs (skipped otherwise; nvidia-h200-x2 or nvidia-h100-x2). The tiny random GQA Llama of
tests/engine/test_tp_run.py (4 query / 2 K/V heads), float32 weights so greedy tokens are comparable: one GPU,
2 ranks over NCCL and 2 ranks over the SSD ring (ring directories in two tmp directories) write the same token ids.
kill -9 of rank 1 mid-run with NCCL fails the run naming rank 1 and its pid within the 120 s collective timeout,
and no rank is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_tp_run import store_root, tiny_llama  # noqa: E402, F401 (fixtures)

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nvidia-h200-x2)")


def _job(path: Path, uri: str, *, count: int = 5, max_new: int = 8, **offload) -> Path:
    spec = {"model": {"uri": uri, "dtype": "float32"}, "input": {"synthetic": {"count": count, "promptLength": 7}},
            "generation": {"maxNewTokens": max_new},
            "offload": {"policy": "explicit", "gpuBatchSize": 2, "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                        "kv": {"gpu": 100, "cpu": 0, "disk": 0}, **offload}}
    path.write_text(yaml.safe_dump({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob",
                                    "metadata": {"name": "tpgpu"}, "spec": spec}))
    return path


def _cmd(job: Path, store: Path, job_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kubeflash_node.cli", "run", str(job), "--device", "cuda", "--quiet",
            "--store", str(store), "--job-dir", str(job_dir), *extra]


def _tokens(path: Path) -> dict[str, list[int]]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["custom_id"]] = rec["response"]["body"]["token_ids"]
    return out


def test_two_gpus_nccl_and_ring_match_one_gpu(tmp_path, tiny_llama, store_root):  # noqa: F811
    """One GPU, 2 ranks over NCCL, 2 ranks over the SSD ring: the same greedy token ids (float32)."""
    job = _job(tmp_path / "j.yaml", str(tiny_llama))
    runs = {"one": [], "nccl": ["--tensor-parallel", "2"],
            "ring": ["--tensor-parallel", "2", "--reduce", "ring", "--ring-dir", str(tmp_path / "ssd0"),
                     "--ring-dir", str(tmp_path / "ssd1")]}
    got = {}
    for name, extra in runs.items():
        r = subprocess.run(_cmd(job, store_root, tmp_path / name, *extra), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (name, r.stderr)
        got[name] = _tokens(tmp_path / name / "results.jsonl")
    assert len(got["one"]) == 5 and got["nccl"] == got["one"] and got["ring"] == got["one"]
    report = json.loads((tmp_path / "nccl" / "report.json").read_text())
    assert report["tensor_parallel"]["reduce"] == "nccl"


def test_killed_rank_with_nccl_fails_the_run_naming_it(tmp_path, tiny_llama, store_root):  # noqa: F811
    """kill -9 of rank 1 once rank 0 wrote results: exit 1 naming rank 1 and its pid, within the timeout."""
    job = _job(tmp_path / "j.yaml", str(tiny_llama), count=200, max_new=64, gpuBatchSize=1)
    jd = tmp_path / "jd"
    proc = subprocess.Popen(_cmd(job, store_root, jd, "--tensor-parallel", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    results, ranks = jd / "results.jsonl", jd / "tp" / "ranks.json"
    while proc.poll() is None and not (results.exists() and results.stat().st_size > 0 and ranks.exists()):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    pids = json.loads(ranks.read_text())["pids"]
    started = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    assert f"rank 1 (pid {pids[1]}) was killed by SIGKILL" in err, err
    assert time.monotonic() - started < 130
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
