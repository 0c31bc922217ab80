"""`kubeflash convert` refuses, before any work and naming the flag, options it would otherwise ignore or fail on
late: --quant-group / --symmetric without quantization, an odd or tiny group, an --out below a file, and --overwrite
of a folder that is not a model."""

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


def test_overwrite_of_a_folder_that_is_not_a_model_is_refused_before_converting(tmp_path):
    """--out <folder of other files> --overwrite was refused only after the whole model was converted (7.6 s for
    SmolLM2); now before the source is read, the folder untouched and no scratch left beside it."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("precious")
    proc = convert("builtin:smollm2-135m", "--out", str(notes), "--overwrite", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"kubeflash convert: error: {notes}: exists and is not a kubeflash model (no manifest.json)" in proc.stderr
    assert "converting" not in proc.stderr  # no stage was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"] and (notes / "keep.txt").read_text() == "precious"
