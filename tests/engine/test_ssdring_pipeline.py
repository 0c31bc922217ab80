"""The pipelined SSD ring: segments move on as soon as they are reduced, with the same sums, and a rank killed
with SIGKILL in the middle of a reduction stops the others with an error naming it, long before the timeout.

Real forked processes, one directory per rank standing for its paired SSD. With segments far smaller than a chunk
(many files per step, writes on the writer thread overlapping reads) the ring's sums equal gloo's all_reduce in
float32 with 2 and 3 ranks and equal the one-segment ring bit for bit (the order of additions is the ring's in
both). A rank killed in the middle of its second reduction (after some of its segments were received) makes every
other rank raise SSDRingError naming rank 1 and its pid, while their timeout is 300 s: the message says "died",
not "timed out", so the heartbeat check, not the timeout, ended the wait.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kubeflash_node.engine.ssdring import RingConfig, SSDRing, SSDRingError


def _matches(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)  # forked: the parent's OpenMP pool hangs a child that enters it
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        dirs = tuple(Path(tmp) / f"ssd{i}" for i in range(world))
        small = SSDRing(rank, RingConfig(dirs=dirs, session="seg", timeout_s=60, segment_bytes=256))
        whole = SSDRing(rank, RingConfig(dirs=dirs, session="one", timeout_s=60, segment_bytes=1 << 30))
        g = torch.Generator().manual_seed(7 + rank)
        for n in (5, 4099, 30001):  # up to ~40 segments per chunk
            x = torch.randn(n, generator=g) * (rank + 1)
            want, got, ref = x.clone(), x.clone(), x.clone()
            dist.all_reduce(want)
            small.all_reduce(got)
            whole.all_reduce(ref)
            assert torch.equal(got, ref), f"rank {rank} n={n}: segmented ring differs from the one-segment ring"
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            if world == 2:
                assert torch.equal(got, want)
        for _ in range(3):  # back-to-back calls: sequence numbers keep their segments apart
            y = torch.full((1000,), float(rank + 1))
            small.all_reduce(y)
            assert torch.equal(y, torch.full((1000,), float(sum(range(1, world + 1)))))
        small.close()
        whole.close()
        assert not list(dirs[rank].iterdir()), f"rank {rank} left files behind"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"{w}-ranks")
def test_segmented_ring_matches_gloo(world, tmp_path):
    for i in range(world):
        (tmp_path / f"ssd{i}").mkdir()
    mp.start_processes(_matches, args=(world, str(tmp_path)), nprocs=world, join=True, start_method="fork")


def _killed(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dirs = tuple(Path(tmp) / f"ssd{i}" for i in range(world))
    ring = SSDRing(rank, RingConfig(dirs=dirs, session="k", timeout_s=300, segment_bytes=64))
    out = Path(tmp) / f"out{rank}.json"
    try:
        ring.all_reduce(torch.ones(4000))  # one whole reduction first: everyone is up
        if rank == 1:
            recv, got = ring._recv, [0]

            def recv_then_die(*a):  # the harness's kill: SIGKILL after 5 segments of the second reduction
                got[0] += 1
                if got[0] > 5:
                    os.kill(os.getpid(), signal.SIGKILL)
                return recv(*a)
            ring._recv = recv_then_die
        ring.all_reduce(torch.ones(4000))
        out.write_text(json.dumps({"ok": True}))
    except SSDRingError as e:
        out.write_text(json.dumps({"ok": False, "error": str(e)}))


@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"{w}-ranks")
def test_killed_rank_stops_the_others(world, tmp_path):
    for i in range(world):
        (tmp_path / f"ssd{i}").mkdir()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_killed, args=(r, world, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)  # a guard only: the ring's timeout is 300 s
    assert all(p.exitcode is not None for p in procs), "a rank is still waiting: the ring hung"
    assert procs[1].exitcode == -signal.SIGKILL
    for r in range(world):
        if r == 1:
            continue
        res = json.loads((tmp_path / f"out{r}.json").read_text())
        assert not res["ok"], f"rank {r} finished a reduction its peer never took part in"
        err = res["error"]
        assert "timed out" not in err, err
        assert (f"rank 1 (pid {procs[1].pid}) died during the all-reduce" in err
                or "the ring was stopped by another rank" in err and f"pid {procs[1].pid}" in err), err
