"""Scratch directories: a live owner's directory survives a cleanup from another process, a dead owner's
(kill -9) and an unlocked leftover of an older version are removed; ModelWriter cleans its own on the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kubeflash_node.store.format import Manifest, ModelWriter, load_manifest
from kubeflash_node.store.scratch import STAGING, Scratch, clean_stale

OWNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kubeflash_node.store.scratch import Scratch
    s = Scratch(Path(sys.argv[1]), ".staging-model-")
    (s.path / "half-written.bin").write_bytes(b"x" * 4096)
    print(s.path, flush=True)
    time.sleep(120)
""")


def _owner(parent: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(parent)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_live_owner_is_spared_and_dead_owner_is_cleaned(tmp_path):
    """Another process's locked scratch dir is left alone; after that process is killed -9 it is removed."""
    proc, path = _owner(tmp_path)
    try:
        assert path.is_dir() and path.name.startswith(STAGING)
        assert clean_stale(tmp_path) == []
        assert (path / "half-written.bin").is_file()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert clean_stale(tmp_path) == [path.name]
    assert list(tmp_path.iterdir()) == []


def test_unlocked_leftovers_are_removed_and_other_names_kept(tmp_path):
    """A staging dir nobody locks (left by an older version) goes; other entries of the parent stay."""
    (tmp_path / ".staging-old-abc").mkdir()
    (tmp_path / ".staging-old-abc" / "f").write_bytes(b"1")
    (tmp_path / "model-1").mkdir()
    (tmp_path / "keep.txt").write_text("x")
    assert clean_stale(tmp_path) == [".staging-old-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "model-1"]


def test_own_scratch_is_locked_until_removed(tmp_path):
    """While this process holds a scratch dir a cleanup skips it; remove() deletes it and drops the lock."""
    s = Scratch(tmp_path, f"{STAGING}m-")
    assert clean_stale(tmp_path) == [] and s.path.is_dir()
    s.remove()
    assert list(tmp_path.iterdir()) == []


def test_model_writer_cleans_a_killed_conversion_of_the_same_model(tmp_path):
    """A conversion killed mid-way leaves its staging dir; the next ModelWriter for that model removes it,
    publishes, and leaves no staging dir behind (and none of another, live model is touched)."""
    proc, live_other = _owner(tmp_path)  # a live conversion of another model beside it
    try:
        dead = tmp_path / ".staging-m-dead1234"
        dead.mkdir()
        (dead / "layer_000.bin").write_bytes(b"\0" * 100)
        w = ModelWriter(tmp_path / "m")
        w.add_stage("layer_000.bin", [("a", np.ones(4, np.float32), "float32")])
        w.publish(Manifest(architecture="llama", config={}, dtype="float32", files=dict(w.files),
                           stages=["layer_000.bin"]))
        load_manifest(tmp_path / "m")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live_other.name])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_an_entry_lock_refuses_a_second_writer_and_hands_over_to_a_waiting_one(tmp_path):
    """entry_lock: while held, a non-waiting taker gets EntryBusy naming the lock file; a waiting one (a thread, its
    own open file) gets the lock when the holder lets go, although the holder removed the file it had locked; once
    both are done no lock file is left."""
    import threading

    from kubeflash_node.store.scratch import EntryBusy, entry_lock, entry_lock_path

    entry = tmp_path / "m"
    got: list[str] = []

    def waiter() -> None:
        with entry_lock(entry):
            got.append("held")
            try:  # the waiter's lock is a real one: a third taker is refused
                with entry_lock(entry, wait=False):
                    pass
            except EntryBusy:
                got.append("third refused")

    with entry_lock(entry):
        with pytest.raises(EntryBusy) as e:
            with entry_lock(entry, wait=False):
                pass
        assert e.value.lock == entry_lock_path(entry) == tmp_path / ".m.lock" and e.value.lock.exists()
        t = threading.Thread(target=waiter)
        t.start()
        t.join(0.3)
        assert t.is_alive() and got == []  # waiting on the lock
    t.join(10)
    assert got == ["held", "third refused"] and list(tmp_path.iterdir()) == []
