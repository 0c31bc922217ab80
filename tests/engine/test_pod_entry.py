"""`kubeflash engine` as the operator's pod runs it: env-configured, input from a mounted file, output copied."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _engine(env, tmp_path):
    full = {**os.environ, **env, "KUBEFLASH_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "engine"], env=full, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_pod_entry_runs_input_file_and_copies_output(opt_store, tmp_path):
    """Input from KUBEFLASH_INPUT_FILE (a configMap key mount), results in the job dir and the output dir."""
    inp = tmp_path / "input.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "body": {"prompt": "x", "max_tokens": 3}}) + "\n")
    spec = {"model": {"uri": "dummy:opt-125m"}, "input": {"configMap": {"name": "c", "key": "input.jsonl"}},
            "generation": {"maxNewTokens": 3}}
    env = {"KUBEFLASH_JOB_SPEC": json.dumps(spec), "KUBEFLASH_JOB_NAME": "j1", "KUBEFLASH_MODEL_DIR": str(opt_store),
           "KUBEFLASH_JOB_DIR": str(tmp_path / "job"), "KUBEFLASH_INPUT_FILE": str(inp),
           "KUBEFLASH_OUTPUT_DIR": str(tmp_path / "out")}
    r = _engine(env, tmp_path)
    assert r.returncode == 1 and "has no tokenizer" in r.stderr  # a text prompt cannot run on a dummy model
    spec["input"] = {"synthetic": {"count": 3, "promptLength": 8}}
    env.pop("KUBEFLASH_INPUT_FILE")
    env["KUBEFLASH_JOB_SPEC"] = json.dumps(spec)
    r = _engine(env, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "job" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in lines) == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert (tmp_path / "out" / "j1.results.jsonl").read_text().splitlines() == lines
    assert json.loads((tmp_path / "job" / "progress.json").read_text())["phase"] == "done"


def test_pod_entry_missing_env_named(tmp_path):
    """Without the operator's env the error names the missing variable."""
    env = {k: "" for k in ("KUBEFLASH_JOB_SPEC", "KUBEFLASH_JOB_NAME")}
    r = _engine(env, tmp_path)
    assert r.returncode == 1 and "KUBEFLASH_JOB_SPEC is required" in r.stderr


def test_probe_ceilings_from_the_agent_and_the_pod():
    """spec.offload.policy auto in a GPU pod plans with the agent's probe of the placed pair, completed by the
    pod's own PCIe/matmul figures; a bad probe names the key."""
    from kubeflash_node.engine.machine import probe_ceilings

    measured = {"h2d_pinned": 50.0, "h2d_pageable": 9.0, "d2h_pinned": 48.0, "matmul_tflops": 700.0}
    c = probe_ceilings({"diskReadGBps": 1.4, "diskWriteGBps": 2.1, "h2dGBps": 53.0}, measured)
    assert (c.disk_read_cold, c.disk_write, c.h2d_pinned, c.matmul_tflops) == (1.4, 2.1, 53.0, 700.0)
    assert c.disk_read_warm == 1.4  # no page-cache figure: no help from it assumed
    own = probe_ceilings({}, measured | {"disk_read_cold": 3.0, "disk_read_warm": 9.0, "disk_write": 2.0})
    assert (own.disk_read_cold, own.disk_read_warm, own.h2d_pinned) == (3.0, 9.0, 50.0)
    with pytest.raises(ValueError, match="unknown key 'readGBps'"):
        probe_ceilings({"readGBps": 1.0}, measured)
    with pytest.raises(ValueError, match=r"KUBEFLASH_PROBE.h2dGBps must be a positive number"):
        probe_ceilings({"h2dGBps": "fast"}, measured)
