"""The SSD ring all-reduce sums like torch.distributed's gloo all_reduce, and fails loudly instead of hanging.

Real processes (torch.multiprocessing, forked: a spawned child re-imports torch, ~10 s on a loaded machine),
one directory per rank standing for its paired SSD; each rank runs
gloo's all_reduce and the ring on the same random tensors (float32 and bfloat16, sizes not divisible by the
number of ranks, including fewer elements than ranks) and compares. Bad input: a missing directory, one that
cannot take files, a full disk, a peer that never writes (the error names the rank and the file).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kubeflash_node.engine.ssdring import RingConfig, SSDRing, SSDRingError, clear

SIZES = (1, 7, 4099)  # fewer elements than ranks, not divisible by 2, 3 or 4


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)  # forked: the parent's OpenMP pool hangs a child that enters it (seen with 2 threads)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        dirs = tuple(Path(tmp) / f"ssd{i}" for i in range(world))
        ring = SSDRing(rank, RingConfig(dirs=dirs, session="t", timeout_s=60))
        g = torch.Generator().manual_seed(100 + rank)
        for dtype in (torch.float32, torch.bfloat16):
            for n in SIZES:
                x = torch.randn(n, generator=g).to(dtype) * (rank + 1)
                want, got = x.clone(), x.clone()
                dist.all_reduce(want)
                assert ring.all_reduce(got) is got
                tol = {} if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
                torch.testing.assert_close(got, want, **tol, msg=lambda m, d=dtype, n=n: f"rank {rank} {d} n={n}: {m}")
                if world == 2 and dtype == torch.float32:  # two addends: the same sum bit for bit
                    assert torch.equal(got, want)
        x = torch.arange(12, dtype=torch.float32).view(3, 4) + rank  # any shape: reduced in place
        ring.all_reduce(x)
        assert torch.equal(x, world * torch.arange(12.0).view(3, 4) + sum(range(world)))
        ring.close()  # removes its heartbeat file
        assert not list(dirs[rank].iterdir()), f"rank {rank} left messages behind"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4], ids=lambda w: f"{w}-ranks")
def test_ring_matches_gloo(world, tmp_path):
    """Every rank's ring sum equals gloo's all_reduce (bit for bit with two float32 addends)."""
    for i in range(world):
        (tmp_path / f"ssd{i}").mkdir()
    mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, join=True, start_method="fork")


def test_missing_directory_names_the_rank(tmp_path):
    """A rank whose neighbour's directory is absent is refused at start-up, naming that rank and the path."""
    (tmp_path / "a").mkdir()
    with pytest.raises(SSDRingError, match=r"rank 1's ring directory .*/b does not exist"):
        SSDRing(0, RingConfig(dirs=(tmp_path / "a", tmp_path / "b"), session="s"))


def test_unwritable_directory_is_refused(tmp_path):
    """A directory that cannot take a file is refused at start-up, naming the rank."""
    if os.geteuid() == 0:  # root writes through any mode bits: use a directory no one may create files in
        bad = Path("/sys")
        try:
            (bad / ".kf-probe").write_bytes(b"")
            pytest.skip("/sys accepts files here: no unwritable directory for root")
        except OSError:
            pass
    else:
        bad = tmp_path / "ro"
        bad.mkdir(mode=0o555)
    (tmp_path / "ok").mkdir()
    with pytest.raises(SSDRingError, match=r"rank 1's ring directory .* is not writable"):
        SSDRing(0, RingConfig(dirs=(tmp_path / "ok", bad), session="s"))


def test_silent_peer_times_out_naming_rank_and_file(tmp_path):
    """Rank 0 of a 2-ring whose peer never writes fails after its timeout with rank 1 and the awaited file named;
    the chunk it had sent is in rank 1's directory, whole, under its final name."""
    dirs = (tmp_path / "a", tmp_path / "b")
    for d in dirs:
        d.mkdir()
    ring = SSDRing(0, RingConfig(dirs=dirs, session="job7", timeout_s=0.2))
    with pytest.raises(SSDRingError, match=r"rank 0: timed out after 0.2 s waiting for .*/a/kfring-job7-00000000-rs000"
                                           r"-00000-from1\.bin \(to be written by rank 1\)"):
        ring.all_reduce(torch.ones(10))
    ring.close()
    sent = sorted(dirs[1].iterdir())  # the chunk, and the abort note that stops the peer at once
    assert [p.name for p in sent] == ["kfring-job7-00000000-rs000-00000-from0.bin", "kfring-job7-abort"]
    assert sent[0].stat().st_size == 5 * 4  # chunk 0 of two: 5 float32
    assert "timed out" in sent[1].read_text()
    assert clear(dirs[1], "job7") == 2 and not list(dirs[1].iterdir())


def test_truncated_message_is_an_error(tmp_path):
    """A message of the wrong size (a peer with another tensor shape) is named, not silently misread."""
    dirs = (tmp_path / "a", tmp_path / "b")
    for d in dirs:
        d.mkdir()
    (dirs[0] / "kfring-s-00000000-rs000-00000-from1.bin").write_bytes(b"\0" * 3)
    with pytest.raises(SSDRingError, match=r"from rank 1 holds 3 bytes, expected 20"):
        SSDRing(0, RingConfig(dirs=dirs, session="s", timeout_s=5)).all_reduce(torch.ones(10))


def test_full_disk_names_the_file_and_rank(tmp_path):
    """A neighbour's directory on a full file system (an 8 KiB tmpfs) fails the write with the file, the rank whose
    directory it is and the OS's reason, and leaves no temporary file there. Needs mount rights (root)."""
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (tmp_path / "a").mkdir()
        ring = SSDRing(0, RingConfig(dirs=(tmp_path / "a", full), session="s", timeout_s=5))
        with pytest.raises(SSDRingError, match=r"rank 0: cannot write .*/full/kfring-s-00000000-rs000-00000-from0\.bin into "
                                               r"rank 1's ring directory \(No space left on device\)"):
            ring.all_reduce(torch.ones(1 << 16))  # 128 KiB per chunk
        ring.close()
        assert [p.name for p in full.iterdir()] in ([], ["kfring-s-abort"])  # no temporary file left
    finally:
        subprocess.run(["umount", str(full)], check=True)
