"""`kubeflash bench` refuses a --model that names nothing and a --store or --json it cannot write before torch is
imported and before any ceiling is measured, naming the flag; its --json result is written crash-safely.

Found by trying the product as a newcomer: `bench --model dummy:nosuch` imported torch and then failed (tens of
seconds on a loaded machine), and `bench --ceilings-only --json /sys/x.json` measured the disk first and then
printed a bare "[Errno 13] Permission denied" naming no flag. Each case runs the real dispatcher in a fresh
interpreter.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cli_probe import dispatch


def _bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    return dispatch(tmp_path, "bench", *args)


def test_unknown_preset_refused_before_torch(tmp_path):
    result, err = _bench(tmp_path, "--model", "dummy:no-such-preset", "--store", str(tmp_path / "s"))
    assert result == {"code": 1, "torch": False}, err
    assert "kubeflash bench: error: --model dummy:no-such-preset: unknown dummy preset 'no-such-preset'" in err


def test_directory_that_is_no_model_refused_before_torch(tmp_path):
    (tmp_path / "notamodel").mkdir()
    result, err = _bench(tmp_path, "--model", str(tmp_path / "notamodel"), "--store", str(tmp_path / "s"))
    assert result == {"code": 1, "torch": False}, err
    assert f"--model {tmp_path / 'notamodel'}: " in err and "manifest.json" in err


def test_store_that_is_a_file_refused_before_measuring(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    result, err = _bench(tmp_path, "--ceilings-only", "--store", str(afile))
    assert result == {"code": 1, "torch": False}, err
    assert f"kubeflash bench: error: --store {afile}: {afile} is a file; expected a directory" in err


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs mounted at /sys")
def test_unwritable_json_refused_before_measuring(tmp_path):
    result, err = _bench(tmp_path, "--ceilings-only", "--store", str(tmp_path / "s"), "--json", "/sys/kf-bench.json")
    assert result == {"code": 1, "torch": False}, err
    assert "kubeflash bench: error: --json /sys/kf-bench.json: /sys is not writable" in err
    assert not (tmp_path / "s" / "probe").exists()  # nothing measured


def test_json_written_whole_and_readable(tmp_path):
    out = tmp_path / "res" / "c.json"
    result, err = _bench(tmp_path, "--ceilings-only", "--no-ceilings", "--store", str(tmp_path / "s"),
                         "--json", str(out))
    assert result["code"] == 0, err
    assert "ceilings" in json.loads(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["c.json"]  # no temp file left beside it
