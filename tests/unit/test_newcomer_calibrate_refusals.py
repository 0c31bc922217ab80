"""`kubeflash calibrate` refuses a --text that is no file, a MODEL that does not exist, is an unknown builtin or a
corrupt GGUF, and a --store that is a file before torch is imported, in one line naming the argument and what was
expected.

Found by trying the product as a newcomer: both checks ran only after the engine's modules (and torch) were
imported, several seconds on a loaded machine for a typo. Each case runs the real dispatcher in a fresh interpreter.
"""

from __future__ import annotations

from pathlib import Path

from cli_probe import dispatch


def _calibrate(tmp_path: Path, *args: str) -> tuple[dict, str]:
    return dispatch(tmp_path, "calibrate", *args, "--store", str(tmp_path / "store"))


def test_missing_text_refused_before_torch(tmp_path):
    result, err = _calibrate(tmp_path, "builtin:smollm2-135m", "--text", str(tmp_path / "prose.txt"))
    assert result == {"code": 1, "torch": False}, err
    assert f"kubeflash calibrate: error: --text {tmp_path / 'prose.txt'}: no such file" in err
    assert not (tmp_path / "store").exists()


def test_missing_model_path_refused_before_torch(tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("Some prose.\n")
    result, err = _calibrate(tmp_path, str(tmp_path / "nowhere"), "--text", str(text))
    assert result == {"code": 1, "torch": False}, err
    assert f"kubeflash calibrate: error: MODEL {tmp_path / 'nowhere'}: no such file or directory; expected" in err
    assert not (tmp_path / "store").exists()


def test_unknown_builtin_corrupt_gguf_and_a_store_file_refused_before_torch(tmp_path):
    """These three came after torch and the store (3-5 s; the store one as a bare 'models: Not a directory')."""
    text = tmp_path / "prose.txt"
    text.write_text("Some prose.\n" * 100)
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"\xf3junk" * 100)
    (tmp_path / "afile").write_text("x")
    for args, expected in [
        (["builtin:smollm2-136m"], "MODEL builtin:smollm2-136m: builtin model 'smollm2-136m' is unknown"),
        ([str(bad)], f"MODEL {bad}: {bad}: not a readable GGUF file: at byte 0, the magic"),
    ]:
        result, err = _calibrate(tmp_path, *args, "--text", str(text))
        assert result == {"code": 1, "torch": False}, err
        assert f"kubeflash calibrate: error: {expected}" in err
    result, err = dispatch(tmp_path, "calibrate", "builtin:smollm2-135m", "--text", str(text), "--store",
                           str(tmp_path / "afile"))
    assert result == {"code": 1, "torch": False}, err
    assert f"kubeflash calibrate: error: --store {tmp_path / 'afile'}: is a file" in err
    assert not (tmp_path / "store").exists()
