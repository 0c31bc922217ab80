"""Placement at scale reads claims by node and reuses each node's best pair while nothing of that node changed
(scheduler.Claims, place(memo=)): a burst placed with the memo gives the very same pairs as placing from scratch,
a node whose view or claims change is scored afresh, a job's own claim is never counted against it, and claims held
while their ledger write is in flight replace the job's recorded one (as the merged dict did)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

import kopf
import pytest

from kubeflash_operator import handlers
from kubeflash_operator.bookkeeping import ClaimBook, ledger_annotation, node_record
from kubeflash_operator.scheduler import Claim, Claims, NoFit, Request, node_view, place

from operator_factories import NOW, GiB, flashnode

MODEL = "m"
PAIRS = tuple((g, f"nvme{g}") for g in range(4))


def views(n: int, rng: random.Random) -> list:
    out = []
    for i in range(n):
        models = [{"id": MODEL, "disk": f"nvme{d}", "state": rng.choice(["Ready", "Staging", "Failed"]),
                   "bytes": 2 * GiB} for d in range(4) if rng.random() < 0.5]
        out.append(node_view(flashnode(f"n{i:02d}", pairs=PAIRS, free=(rng.choice([20, 40, 80]) * GiB,),
                                       read=(rng.choice([3.0, 7.0]),), models=models)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2], ids=["seed0", "seed1", "seed2"])
def test_a_burst_with_the_memo_places_exactly_as_from_scratch(seed):
    rng = random.Random(seed)
    nodes = views(12, rng)
    memo, claims, plain = {}, Claims(), []
    for j in range(60):
        request = Request(f"ns/j{j}", MODEL, gpus=rng.choice([1, 1, 2]), kv_bytes=rng.choice([0, 5, 15]) * GiB)
        if j % 7 == 3:  # a FlashNode event: that node's view is a new object (its disk's free space moved)
            k = rng.randrange(len(nodes))
            disk = nodes[k].disks["nvme0"]
            nodes[k] = replace(nodes[k], disks={**nodes[k].disks, "nvme0": replace(disk, free_bytes=disk.free_bytes
                                                                                     - GiB)})
        got = place(request, nodes, claims, now=NOW, memo=memo)
        want = place(request, nodes, plain, now=NOW)
        assert got == want
        if not isinstance(got, NoFit):
            claim = got.claim(request.job, request.kv_bytes)
            claims = claims.with_held({claim.job: claim})
            plain.append(claim)
    assert len(plain) > 20 and memo  # the burst placed jobs, and the memo was used


def test_a_node_that_changed_is_scored_afresh_and_a_stale_heartbeat_is_checked_every_time():
    a = node_view(flashnode("a", pairs=PAIRS, models=[{"id": MODEL, "disk": "nvme0", "state": "Ready"}]))
    b = node_view(flashnode("b", pairs=PAIRS))
    memo = {}
    assert place(Request("ns/x", MODEL), [a, b], (), now=NOW, memo=memo).node == "a"
    a2 = node_view(flashnode("a", pairs=PAIRS, models=[{"id": MODEL, "disk": "nvme0", "state": "Failed"}],
                             read=(1.0,)))
    assert place(Request("ns/x", MODEL), [a2, b], (), now=NOW, memo=memo).node == "b"  # model lost on a
    later = NOW + timedelta(seconds=600)  # both agents silent since: the memo never hides a stale heartbeat
    found = place(Request("ns/x", MODEL), [a2, b], (), now=later, memo=memo)
    assert isinstance(found, NoFit) and "heartbeat stale" in found.reason


def test_own_claim_is_never_counted_and_held_claims_replace_recorded_ones():
    one = node_view(flashnode("n1", pairs=((0, "nvme0"),)))
    own = Claim("ns/j", "n1", (0,), "nvme0")
    memo = {}
    other = place(Request("ns/other", MODEL), [one], Claims([own]), now=NOW, memo=memo)
    assert isinstance(other, NoFit)  # the only pair is ns/j's
    assert place(Request("ns/j", MODEL), [one], Claims([own]), now=NOW, memo=memo).gpu == 0  # its own
    moved = Claim("ns/j", "n2", (0,), "nvme0")  # ns/j's newer decision, its ledger write in flight
    held = Claims([own]).with_held({"ns/j": moved})
    assert held.on("n1") == () and held.on("n2") == (moved,) and held.of("ns/j") == moved
    assert place(Request("ns/other", MODEL), [one], held, now=NOW, memo=memo).gpu == 0  # n1's pair is free now


def _rec(name, rv, ledger):
    body = flashnode(name, pairs=PAIRS)
    body["metadata"].update(resourceVersion=rv, annotations={"kubeflash.io/claims": ledger_annotation(ledger)})
    return node_record(body)


def test_book_groups_claims_by_ledger_and_a_job_in_two_ledgers_is_noticed():
    a, b = Claim("ns/a", "n1", (0,), "nvme0"), Claim("ns/b", "n2", (1,), "nvme1")
    book = ClaimBook()
    recs = {"n1": _rec("n1", "1", {"ns/a": a}), "n2": _rec("n2", "2", {"ns/b": b})}
    claims = book.claims(recs, held=False)
    assert claims.single and claims.on("n1") is recs["n1"].claims  # the ledger's own tuple: memo hits by it
    stray = Claim("ns/a", "n2", (2,), "nvme2")  # a lost decision left ns/a in n2's ledger too
    recs["n2"] = _rec("n2", "3", {"ns/b": b, "ns/a": stray})
    claims = book.claims(recs, held=False)
    assert not claims.single and claims.of("ns/a") == stray  # the last ledger's entry wins, as before
    assert set(claims.on("n2")) == {b, stray} and claims.on("n1") == ()


def test_stray_entries_are_found_in_the_job_ledger_and_in_every_ledger_once_a_job_is_in_two():
    a, b = Claim("ns/a", "n1", (0,), "nvme0"), Claim("ns/b", "n2", (1,), "nvme1")
    memo = kopf.Memo()
    memo.book, memo.node_states = ClaimBook(), {}
    memo.book.watch(_rec("n1", "1", {"ns/a": a}))
    memo.book.watch(_rec("n2", "2", {"ns/b": b}))
    assert handlers._stray_entries(memo, "ns/a", a) == []  # where its status says: nothing stray
    assert handlers._stray_entries(memo, "ns/a", None) == [("n1", a)]  # it holds no pair: n1's entry is stray
    assert handlers._stray_entries(memo, "ns/c", None) == []
    stray = Claim("ns/a", "n2", (2,), "nvme2")
    memo.book.watch(_rec("n2", "3", {"ns/b": b, "ns/a": stray}))
    assert handlers._stray_entries(memo, "ns/a", a) == [("n2", stray)]
