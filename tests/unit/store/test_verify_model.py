"""verify_model: every file the manifest vouches for (stages and tokenizer files) is hashed on first load, the
verdict is cached in a stamp keyed by the manifest and each file's stat, and any change re-runs the check."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kubeflash_node.store.format import (
    STAMP,
    Manifest,
    ModelWriter,
    StoreError,
    _read_manifest,
    _stamp_key,
    load_manifest,
    verify_model,
)


def _model(out, *, tokenizer: bool = True):
    rng = np.random.default_rng(0)
    w = ModelWriter(out)
    for name in ("embed.bin", "layer_000.bin", "head.bin"):
        w.add_stage(name, [("w", rng.standard_normal((64, 64)).astype(np.float32), "float32")])
    if tokenizer:
        (w.tmp / "tokenizer").mkdir()
        (w.tmp / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab": {"hello": 0, "world": 1}}))
    m = Manifest(architecture="llama", config={}, dtype="float32", files=dict(w.files),
                 stages=["embed.bin", "layer_000.bin", "head.bin"], tokenizer="tokenizer" if tokenizer else None)
    w.publish(m)
    return out


def _flip(path, at: int) -> None:
    """Corrupt one byte in place: same size, same inode (what a bad disk or a stray write does)."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_first_load_stamps_and_corruption_at_same_size_is_named(tmp_path):
    """The first load writes the stamp; a byte flipped later (same size) is caught on the next load, by name."""
    m = _model(tmp_path / "m")
    verify_model(m)
    stamp = json.loads((m / STAMP).read_text())
    assert set(stamp["files"]) == {"embed.bin", "layer_000.bin", "head.bin", "tokenizer/tokenizer.json"}
    assert oct((m / STAMP).stat().st_mode & 0o777) == "0o644"  # the engine's unprivileged user reads it
    size = (m / "layer_000.bin").stat().st_size
    _flip(m / "layer_000.bin", 5000)
    assert (m / "layer_000.bin").stat().st_size == size
    load_manifest(m)  # sizes alone cannot see it
    with pytest.raises(StoreError, match=r"layer_000\.bin: sha256 .* does not match"):
        verify_model(m)


def test_restored_mtime_does_not_hide_a_change(tmp_path):
    """Corrupting a file and putting its mtime back (touch -d) still re-verifies: the key holds ctime too."""
    m = _model(tmp_path / "m")
    verify_model(m)
    st = (m / "head.bin").stat()
    _flip(m / "head.bin", 100)
    os.utime(m / "head.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoreError, match=r"head\.bin"):
        verify_model(m)


def test_tokenizer_files_are_checksummed(tmp_path):
    """Files beside the stages (the tokenizer) get a sha256 in the manifest at conversion and are verified."""
    m = _model(tmp_path / "m")
    other = json.loads((m / "manifest.json").read_text())["extra"]["other_files"]
    assert set(other) == {"tokenizer/tokenizer.json"}
    _flip(m / "tokenizer" / "tokenizer.json", 12)
    with pytest.raises(StoreError, match=r"tokenizer/tokenizer\.json: sha256"):
        verify_model(m)


def test_a_matching_stamp_is_trusted_and_an_edited_manifest_is_not(tmp_path):
    """The cached verdict is used while the key matches (no re-read), and the manifest's own digest is part of
    the key: a stamp for another manifest does not vouch for this one."""
    m = _model(tmp_path / "m")
    verify_model(m)
    _flip(m / "embed.bin", 7)
    manifest, raw = _read_manifest(m)
    (m / STAMP).write_text(json.dumps(_stamp_key(m, manifest, raw)))  # as if verified after the flip
    verify_model(m)  # trusted: the check is not repeated
    data = json.loads(raw)
    data["source"] = "edited"
    (m / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(StoreError, match=r"embed\.bin"):
        verify_model(m)


def test_missing_and_truncated_files_are_named(tmp_path):
    """A missing tokenizer file and a truncated stage are refused before any hashing, naming the file."""
    m = _model(tmp_path / "m")
    (m / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(StoreError, match=r"tokenizer/tokenizer\.json: missing"):
        verify_model(m)
    m2 = _model(tmp_path / "m2")
    os.truncate(m2 / "layer_000.bin", 4096)
    with pytest.raises(StoreError, match=r"layer_000\.bin: 4096 bytes, expected"):
        verify_model(m2)


def test_read_only_model_is_verified_without_a_stamp(tmp_path):
    """Where the stamp cannot be written (a read-only volume) the check still runs and still catches damage."""
    m = _model(tmp_path / "m")
    os.chmod(m, 0o555)
    try:
        if os.access(m, os.W_OK):  # root ignores the mode: make the stamp's name unwritable instead
            (m / STAMP).mkdir()
        verify_model(m)
        assert not (m / STAMP).is_file()
        _flip(m / "layer_000.bin", 42)
        with pytest.raises(StoreError, match=r"layer_000\.bin"):
            verify_model(m)
        assert [p.name for p in m.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        os.chmod(m, 0o755)


def test_manifest_paths_cannot_leave_the_model(tmp_path):
    """An other_files entry pointing outside the model directory is a malformed manifest, not a read."""
    m = _model(tmp_path / "m")
    data = json.loads((m / "manifest.json").read_text())
    data["extra"]["other_files"] = {"../secret": {"size": 1, "sha256": "0" * 64}}
    (m / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(StoreError, match="leaves the model directory"):
        verify_model(m)
