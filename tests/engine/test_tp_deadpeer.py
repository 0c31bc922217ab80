"""Every tensor-parallel reduction ends when a peer is gone: none waits forever (issue 22, bad input).

Real processes (forked), the engine's own reductions: `init_gloo` + `gloo_reduce` (torch.distributed gloo on
loopback, the CPU path of `kubeflash run --tensor-parallel`) and `SSDRing` (one directory per rank). Each surviving
rank records how long its reduction took to fail and the error; the parent only joins them (a guard, far above
the timeouts under test).

- gloo, a peer killed with SIGKILL after one good reduction: the others' next all_reduce raises well within the
  group's timeout (the closed connection ends it).
- gloo, a peer that lives but never calls all_reduce (stopped with SIGSTOP): the others' all_reduce raises after
  the group's timeout, not later.
- ring, a peer stopped with SIGSTOP (alive, so its pid check passes; its heartbeat thread stopped with it): the
  others fail within `dead_after_s` naming that rank and "no heartbeat", long before the ring's 300 s timeout.
- ring, a peer killed with SIGKILL after one good reduction and before the next: the others fail naming it as
  dead (its pid is gone), long before the timeout.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kubeflash_node.engine.ssdring import RingConfig, SSDRing
from kubeflash_node.engine.tensorparallel import gloo_reduce, init_gloo

GUARD_S = 120  # the parent's join: a hang fails the test here instead of blocking the suite


def _record(tmp: str, rank: int, started: float, err: BaseException | None) -> None:
    out = {"elapsed": time.monotonic() - started, "error": f"{type(err).__name__}: {err}" if err else None}
    tmp_file = Path(tmp) / f".rank{rank}.json"
    tmp_file.write_text(json.dumps(out))
    tmp_file.rename(Path(tmp) / f"rank{rank}.json")  # the parent polls for the name: never a half-written file


def _gloo_rank(rank: int, world: int, tmp: str, how: str, timeout_s: float) -> None:
    torch.set_num_threads(1)  # forked: the parent's OpenMP pool hangs a child that enters it
    init_gloo(rank, world, f"file://{tmp}/pg", timeout_s=timeout_s)
    x = torch.full((1024,), float(rank + 1))
    gloo_reduce(x)  # one good reduction: every rank is connected
    assert torch.all(x == sum(range(1, world + 1)))
    if rank == world - 1:
        (Path(tmp) / "victim.pid").write_text(str(os.getpid()))
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGSTOP)  # the parent kills it once the others have recorded
        return
    time.sleep(0.5)  # let the victim stop first
    started, err = time.monotonic(), None
    try:
        gloo_reduce(torch.ones(1024))
    except Exception as e:  # noqa: BLE001 (recorded for the parent to check)
        err = e
    _record(tmp, rank, started, err)
    os._exit(0)  # no destroy_process_group: the group is broken


def _ring_rank(rank: int, world: int, tmp: str, how: str, dead_after_s: float) -> None:
    torch.set_num_threads(1)
    dirs = tuple(Path(tmp) / f"ssd{i}" for i in range(world))
    ring = SSDRing(rank, RingConfig(dirs=dirs, session="dead", timeout_s=300, dead_after_s=dead_after_s))
    x = torch.full((4099,), float(rank + 1))
    ring.all_reduce(x)
    assert torch.all(x == sum(range(1, world + 1)))
    if rank == world - 1:
        (Path(tmp) / "victim.pid").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        return
    time.sleep(0.5)
    started, err = time.monotonic(), None
    try:
        ring.all_reduce(torch.ones(4099))
    except Exception as e:  # noqa: BLE001
        err = e
    _record(tmp, rank, started, err)
    os._exit(0)


def _run(target, world: int, tmp: Path, how: str, limit: float) -> tuple[int, dict[int, dict]]:
    """Start the ranks, wait for the survivors' records, then kill the victim (stopped or dead) and reap all."""
    for i in range(world):
        (tmp / f"ssd{i}").mkdir()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=(r, world, str(tmp), how, limit)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + GUARD_S
    try:
        while time.monotonic() < end and not all((tmp / f"rank{r}.json").exists() for r in range(world - 1)):
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    victim = int((tmp / "victim.pid").read_text())
    records = {r: json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world - 1)
               if (tmp / f"rank{r}.json").exists()}
    assert len(records) == world - 1, f"ranks still waiting after {GUARD_S} s (a hang): got {sorted(records)}"
    return victim, records


@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"{w}-ranks")
def test_gloo_peer_killed_fails_the_others_within_the_timeout(world, tmp_path):
    """SIGKILL of the last rank: every other rank's next gloo all_reduce raises within the 30 s group timeout."""
    timeout = 30.0
    _, records = _run(_gloo_rank, world, tmp_path, "kill", timeout)
    for r, rec in records.items():
        assert rec["error"], f"rank {r}: all_reduce returned although a peer was killed"
        assert rec["elapsed"] < timeout + 5, f"rank {r}: failed after {rec['elapsed']:.1f} s, timeout {timeout} s"


def test_gloo_silent_peer_fails_the_others_at_the_timeout(tmp_path):
    """A stopped (SIGSTOP) rank never enters the all_reduce: the other raises after the 4 s group timeout (not
    before it: the peer is connected; not long after it: the timeout bounds the wait)."""
    timeout = 4.0
    _, records = _run(_gloo_rank, 2, tmp_path, "stop", timeout)
    rec = records[0]
    assert rec["error"], "all_reduce returned although the peer never joined it"
    assert timeout - 0.5 <= rec["elapsed"] < timeout + 10, f"failed after {rec['elapsed']:.1f} s, timeout {timeout} s"


@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"{w}-ranks")
def test_ring_stopped_peer_is_noticed_by_its_heartbeat(world, tmp_path):
    """SIGSTOP of the last rank (alive, its heartbeat frozen): the others fail after about dead_after_s (2 s), naming
    that rank and its pid ("no heartbeat", or the abort note of the rank that saw it first), never the 300 s
    timeout."""
    victim, records = _run(_ring_rank, world, tmp_path, "stop", 2.0)
    for r, rec in records.items():
        assert rec["error"] and f"rank {world - 1} (pid {victim}" in rec["error"], rec
        assert "no heartbeat" in rec["error"] and "timed out" not in rec["error"], rec
        assert rec["elapsed"] < 30, f"rank {r}: failed after {rec['elapsed']:.1f} s"


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"{w}-ranks")
def test_ring_killed_peer_between_reductions_is_named_dead(world, tmp_path):
    """SIGKILL of the last rank between two reductions: the others' next all_reduce fails within seconds naming it
    and its pid as died (the process is gone), not after the 300 s timeout."""
    victim, records = _run(_ring_rank, world, tmp_path, "kill", 10.0)
    for r, rec in records.items():
        assert rec["error"] and f"rank {world - 1} (pid {victim})" in rec["error"], rec
        assert "died" in rec["error"] and "timed out" not in rec["error"], rec
        assert rec["elapsed"] < 30, f"rank {r}: failed after {rec['elapsed']:.1f} s"
