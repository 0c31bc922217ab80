"""`kubeflash run` in real processes on a dummy model (dummy:opt-125m, float32): the store verifies what it
loads, and killed conversions leave nothing behind.

- A layer file corrupted at the same size (bytes flipped) must fail the run with an error naming the file and
  write no results. Before store.format.verify_model this answered with exit 0 (the corrupt weights were
  used as they were).
- kill -9 of `kubeflash run` at several points of its conversion, then the same command again: it succeeds,
  and no `.staging` entry is left anywhere under the store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "node-agent"), str(ROOT / "operator")]))
URI = "dummy:opt-125m"


def _job(tmp_path: Path, name: str) -> Path:
    doc = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": name},
           "spec": {"model": {"uri": URI, "dtype": "float32"},
                    "input": {"synthetic": {"count": 2, "promptLength": 8}},
                    "generation": {"maxNewTokens": 3},
                    "offload": {"policy": "explicit", "gpuBatchSize": 1, "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                                "kv": {"gpu": 100, "cpu": 0, "disk": 0}}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cmd(job: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "kubeflash_node.cli", "run", str(job), "--device", "cpu", "--quiet",
            "--store", str(store)]


def _run(job: Path, store: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(job, store), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def _results(cwd: Path) -> list[Path]:
    return sorted(p for p in cwd.rglob("results.jsonl") if p.stat().st_size > 0)


def _staging(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if ".staging" in p.name)


def _flip_middle(path: Path, n: int = 64) -> None:
    """Overwrite n bytes in the middle of the file with their complement: same size, same inode."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    assert path.stat().st_size == size


def test_layer_corrupted_at_same_size_fails_naming_the_file(tmp_path):
    """A good run first (conversion + verified load); then bytes flipped in layer_005.bin: the next run exits
    non-zero, names the file and the checksum, and writes no results for its job."""
    store, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    first = _run(_job(tmp_path, "good"), store, work)
    assert first.returncode == 0, first.stderr[-3000:]
    [model] = [p for p in (store / "models").iterdir() if not p.name.startswith(".")]
    done = _results(work)
    assert done, "the good run wrote results"

    _flip_middle(model / "layer_005.bin")
    second = _run(_job(tmp_path, "after-corruption"), store, work)
    assert second.returncode != 0, f"a corrupt store was used (exit 0):\n{second.stdout[-2000:]}"
    assert "layer_005.bin" in second.stderr and "sha256" in second.stderr, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert _results(work) == done, "no results may be written from a corrupt store"


def _kill_during_conversion(job: Path, store: Path, cwd: Path, delay: float) -> None:
    """Start a run, wait until a new staging entry appears (its conversion began), wait `delay`, kill -9."""
    before = set(_staging(store))
    proc = subprocess.Popen(_cmd(job, store), cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not set(_staging(store)) - before:
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_conversions_leave_no_staging_after_the_next_run(tmp_path):
    """kill -9 at three random points after a conversion's staging dir appears (each new start first removes
    the previous one's leftovers), then run again: it succeeds on a verified model, no .staging entry remains."""
    rng = random.Random(14)
    store, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    job = _job(tmp_path, "resume")
    left_by_kills = []
    for span in ((0.0, 0.2), (0.2, 0.8), (0.5, 1.5)):
        before = set(_staging(store))
        _kill_during_conversion(job, store, work, rng.uniform(*span))
        now = set(_staging(store))
        assert not before & now, f"leftovers of the previous kill survived a new start: {sorted(before & now)}"
        left_by_kills.append(sorted(now))
    assert any(left_by_kills), "no kill landed during a conversion; the test proves nothing"
    r = _run(job, store, work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _staging(store) == []
    [model] = [p for p in (store / "models").iterdir() if not p.name.startswith(".")]
    from kubeflash_node.store.format import verify

    verify(model)
    assert _results(work)


def test_pod_entry_refuses_a_corrupt_staged_model(tmp_path):
    """`kubeflash engine` (the inference pod) on a model staged and stamped as the agent does: it runs; after
    bytes are flipped in a layer file it exits 1 naming the file, before any result is written."""
    import json

    from kubeflash_node.store.convert import convert
    from kubeflash_node.store.format import verify_model

    model = tmp_path / "models" / "opt"
    convert(URI, model, dtype="float32")
    verify_model(model)  # what the stage worker does before the agent publishes the model
    spec = {"model": {"uri": URI, "dtype": "float32"}, "input": {"synthetic": {"count": 1, "promptLength": 8}},
            "generation": {"maxNewTokens": 2}}

    def engine(job: str) -> subprocess.CompletedProcess:
        env = {**ENV, "KUBEFLASH_DEVICE": "cpu", "KUBEFLASH_JOB_SPEC": json.dumps(spec), "KUBEFLASH_JOB_NAME": job,
               "KUBEFLASH_MODEL_DIR": str(model), "KUBEFLASH_JOB_DIR": str(tmp_path / job)}
        return subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "engine"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    ok = engine("before")
    assert ok.returncode == 0, ok.stderr[-3000:]
    _flip_middle(model / "layer_007.bin")
    bad = engine("after")
    assert bad.returncode == 1, bad.stdout[-2000:]
    assert "layer_007.bin" in bad.stderr and "sha256" in bad.stderr, bad.stderr[-3000:]
    assert not (tmp_path / "after" / "results.jsonl").exists() or not (tmp_path / "after" / "results.jsonl").read_text()
