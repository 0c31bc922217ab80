"""`kubeflash convert` refuses, before any work and naming the flag, options it would otherwise ignore or fail on
late: --quant-group / --symmetric without quantization, an odd or tiny group, and an --out below a file."""

from __future__ import annotations

import subprocess
import sys

import pytest


def convert(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "convert", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize("flags,message", [
    (["--quant-group", "32"], "--quant-group 32: applies only with --quantization int8 or int4"),
    (["--quantization", "int8", "--quant-group", "3"], "--quant-group 3: expected an even number >= 2"),
    (["--quantization", "int4", "--quant-group", "0"], "--quant-group 0: expected an even number >= 2"),
    (["--symmetric"], "--symmetric: applies only with --quantization int8 or int4"),
], ids=["group-without-quant", "odd-group", "zero-group", "symmetric-without-quant"])
def test_flags_that_would_be_ignored_are_refused(tmp_path, flags, message):
    proc = convert("dummy:smollm2-135m", "--out", str(tmp_path / "m"), *flags, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"kubeflash convert: error: {message}" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_out_below_a_file_names_the_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = convert("dummy:smollm2-135m", "--out", str(tmp_path / "afile" / "m"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--out {tmp_path / 'afile' / 'm'}: {tmp_path / 'afile'} is a file" in proc.stderr
