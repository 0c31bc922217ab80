"""`kubeflash convert --overwrite` replaces a model entry in one step (store/format.py ModelWriter.publish): a process
killed with SIGKILL before any file-system change of the swap leaves the name on one whole entry, the old or the
new, never none; the next conversion clears what the dead one left."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kubeflash_node.store.format import Manifest, ModelWriter, can_exchange, load_manifest, verify

# a child process: replace the entry argv[1] with a new model (config x = 2), SIGKILL itself at the argv[2]-th
# file-system change publish makes (audit events, raised before the change; 0: never), print how many it made
CHILD = r"""
import os, signal, sys
import numpy as np
from pathlib import Path
from kubeflash_node.store.format import Manifest, ModelWriter

out, kill_at, n = Path(sys.argv[1]), int(sys.argv[2]), 0
CHANGES = {"os.rename", "ctypes.call_function", "shutil.rmtree", "os.remove", "os.rmdir", "os.mkdir", "os.unlink"}
w = ModelWriter(out, overwrite=True)
w.add_stage("layer_000.bin", [("a", np.full(4, 2.0, np.float32), "float32")])
m = Manifest(architecture="llama", config={"x": 2}, dtype="float32", files=dict(w.files), stages=["layer_000.bin"])

def hook(event, args):
    global n
    if event in CHANGES:
        n += 1
        if n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
w.publish(m)
print(n)
"""


def _old(out) -> None:
    w = ModelWriter(out)
    w.add_stage("layer_000.bin", [("a", np.full(4, 1.0, np.float32), "float32")])
    w.publish(Manifest(architecture="llama", config={"x": 1}, dtype="float32", files=dict(w.files),
                       stages=["layer_000.bin"]))


def _child(out, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(out), str(kill_at)], capture_output=True, text=True,
                          timeout=120)


def test_overwrite_killed_at_every_step_of_the_swap_leaves_one_whole_entry(tmp_path):
    """The swap's file-system changes counted in one uninterrupted run; then, for each, a fresh old entry and a run
    killed (SIGKILL) just before that change: the name always loads and verifies as the old entry (x = 1) or the new
    (x = 2), old until the swap and new from then on; a later --overwrite conversion succeeds and leaves no scratch."""
    if not can_exchange():
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; publish falls back to two renames")
    out = tmp_path / "full" / "m"
    _old(out)
    done = _child(out, 0)
    assert done.returncode == 0, done.stderr
    changes = int(done.stdout)
    assert changes >= 2 and load_manifest(out).config == {"x": 2}
    seen = []
    for k in range(1, changes + 1):
        out = tmp_path / f"k{k}" / "m"
        _old(out)
        got = _child(out, k)
        assert got.returncode == -9, got.stderr
        verify(out)  # every file present with its recorded size and sha256
        seen.append(json.loads((out / "manifest.json").read_text())["config"]["x"])
        assert _child(out, 0).returncode == 0 and load_manifest(out).config == {"x": 2}
        assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
    assert seen == sorted(seen) and seen[0] == 1 and seen[-1] == 2, seen
