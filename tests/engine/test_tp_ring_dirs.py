"""`kubeflash run --reduce ring` with a bad ring directory fails in one line naming the rank and the path, never a hang.

Real processes on CPU, the tiny GQA Llama of test_tp_run (2 ranks). Rank 1's `--ring-dir` is (a) in a file system
that takes no new directory (/sys: root writes through mode bits, so a chmod'ed directory would not do), and (b) on
a full 8 KiB tmpfs (needs mount rights: skipped without): the run exits 1 within seconds (the collectives' timeout
is 120 s) with one line naming rank 1 and the directory or the file and the OS's reason; no rank is left running
and no ring message is left behind in the good directory.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from test_tp_run import _job, _run, store_root, tiny_llama  # noqa: F401 (fixtures)

SYN = {"count": 4, "promptLength": 7}


def test_unwritable_ring_dir_is_refused_naming_rank_and_path(tmp_path, tiny_llama, store_root):  # noqa: F811
    """Rank 1's ring directory cannot be made (/sys): refused before any rank starts, one line naming rank 1 and the
    path; no results, no rank directory."""
    bad = "/sys/kubeflash-ring-test"
    job = _job(tmp_path / "j.yaml", str(tiny_llama), synthetic=SYN, tp=2)
    started = time.monotonic()
    r = _run([str(job), "--job-dir", str(tmp_path / "jd"), "--reduce", "ring", "--ring-dir", str(tmp_path / "ssd0"),
              "--ring-dir", bad], tmp_path, store_root)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "rank 1" in r.stderr and bad in r.stderr, r.stderr
    assert time.monotonic() - started < 100
    assert "ring directory" in r.stderr and not (tmp_path / "jd" / "results.jsonl").exists()
    assert not (tmp_path / "jd" / "tp" / "ranks.json").exists()


@pytest.mark.parametrize("filler", [8192, 4096], ids=["full-at-start", "full-after-the-heartbeat"])
def test_full_ring_dir_fails_the_run_naming_the_file_and_rank(tmp_path, tiny_llama, store_root, filler):  # noqa: F811
    """Rank 1's ring directory on an 8 KiB tmpfs, full from the start (its heartbeat cannot be written) or with one
    page left (taken by the heartbeat or the first message; the next write fails): the run exits 1 naming rank 1,
    its ring directory's file and 'No space left on device' (the cause, not the other rank the launcher stopped
    because of it), long before the 120 s timeout."""
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (full / "filler").write_bytes(b"\0" * filler)
        good = tmp_path / "ssd0"
        job = _job(tmp_path / "j.yaml", str(tiny_llama), synthetic=SYN, tp=2)
        started = time.monotonic()
        r = _run([str(job), "--job-dir", str(tmp_path / "jd"), "--reduce", "ring", "--ring-dir", str(good),
                  "--ring-dir", str(full)], tmp_path, store_root)
        took = time.monotonic() - started
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "rank 1" in r.stderr and str(full) in r.stderr, r.stderr
        assert "No space left on device" in r.stderr, r.stderr
        assert took < 100, f"took {took:.1f} s"
        assert not [p for p in good.iterdir() if p.name.endswith(".bin")], list(good.iterdir())
    finally:
        subprocess.run(["umount", str(full)], check=True)
