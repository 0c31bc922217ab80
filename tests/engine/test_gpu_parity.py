"""bench/gpu_parity.py, the one command a GPU session runs first, kept working on the CPU: a few of its cases (MoE
batch reads with the hot-expert cache, the disk KV tier with write-back, resident fused layers) run through the
script and pass against transformers; a reference that differs is reported as a FAIL at its first differing
position and turns the exit status non-zero."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_parity.py"


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("gpu_parity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_parity"] = mod  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules["gpu_parity"]


def test_first_difference(parity):
    assert parity.first_difference([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert parity.first_difference([[1, 2], [3, 5]], [[1, 2], [3, 4]]) == (1, 1)
    assert parity.first_difference([[1]], [[1, 2]]) == (0, 1)


def test_cases_pass_on_the_cpu(parity, tmp_path, capsys):
    only = ["w-device kv-device", "w-disk-posix kv-disk-writeback", "w-disk-posix kv-device experts-cache"]
    assert parity.main(["--device", "cpu", "--models", "qwen3-moe", "--new", "3", "--quick", "--work",
                        str(tmp_path), "--only", *only]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(("PASS cpu", "FAIL"))]
    assert [x.split(" (")[0] for x in lines] == [f"PASS cpu qwen3-moe {c}" for c in only]


def test_a_differing_reference_fails(parity, tmp_path, capsys, monkeypatch):
    real = parity.reference
    monkeypatch.setattr(parity, "reference", lambda *a: [[t + (i == 2) for i, t in enumerate(s)] for s in real(*a)])
    assert parity.main(["--device", "cpu", "--models", "opt", "--new", "3", "--work", str(tmp_path),
                        "--only", "w-device kv-device"]) == 1
    out = capsys.readouterr().out
    assert "FAIL cpu opt w-device kv-device first differing (sequence, position) (0, 2)" in out
    assert out.splitlines()[-1] == "FAIL: 1 case(s) failed"
