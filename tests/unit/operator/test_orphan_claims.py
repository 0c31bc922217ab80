"""Claims of jobs that are gone are taken back (handlers._orphans): a recorded claim whose job has no coroutine here
and whose uid its namespace's job list does not show, in two sweeps in a row, is released with one conditional
ledger write of exactly that entry; a claim whose job is still listed (e.g. deleted, its finalizer waiting for its
pods) or has a coroutine stays, and with no suspect at all no job list is read.

The ledger is written through a stand-in for the API's FlashNode and job list (an in-memory object with the same
resourceVersion precondition), not through a cluster: tests/cluster covers the real calls."""

from __future__ import annotations

import asyncio
import copy
import json

import kopf

from kubeflash_operator import handlers
from kubeflash_operator.bookkeeping import CLAIMS_ANNOTATION, ClaimBook, ledger_annotation, node_record
from kubeflash_operator.kube import Conflict
from kubeflash_operator.metrics import Metrics
from kubeflash_operator.scheduler import Claim

from operator_factories import flashnode

LIVE = Claim("ns/live", "n1", (0,), "nvme0", 0, uid="u-live")
DELETING = Claim("ns/deleting", "n1", (1,), "nvme0", 0, uid="u-deleting")
GONE = Claim("ns/gone", "n1", (2,), "nvme0", 0, uid="u-gone")


class FakeApi:
    """One FlashNode and the job uids of namespace "ns", as the API server would answer."""

    def __init__(self, body: dict, uids: set[str]) -> None:
        self.body, self.uids, self.lists, self.writes = body, uids, 0, 0

    def job_uids(self, namespace: str) -> set[str]:
        assert namespace == "ns"
        self.lists += 1
        return set(self.uids)

    def write_ledger(self, name: str, rv: str, annotation: str, ended: str | None = None) -> dict:
        if rv != self.body["metadata"]["resourceVersion"]:
            raise Conflict(name)
        self.writes += 1
        self.body = copy.deepcopy(self.body)
        self.body["metadata"]["resourceVersion"] = str(int(rv) + 1)
        self.body["metadata"]["annotations"][CLAIMS_ANNOTATION] = annotation
        return self.body

    def read_flashnode(self, name: str) -> dict:
        return self.body


def test_a_gone_jobs_claim_is_released_after_two_sweeps_and_nothing_else():
    body = flashnode("n1", pairs=((0, "nvme0"), (1, "nvme0"), (2, "nvme0")))
    body["metadata"]["resourceVersion"] = "10"
    body["metadata"]["annotations"] = {CLAIMS_ANNOTATION: ledger_annotation(
        {c.job: c for c in (LIVE, DELETING, GONE)})}
    api = FakeApi(body, uids={"u-live", "u-deleting"})  # u-gone: deleted while no operator ran
    memo = kopf.Memo()
    memo.book, memo.node_states, memo.metrics, memo.kube = ClaimBook(), {}, Metrics(), api
    memo.book.watch(node_record(body))
    memo.wakeups = {"u-live": asyncio.Event()}  # a live job's coroutine; the deleting one's has stopped

    async def sweeps() -> tuple[set, set]:
        first = await handlers._orphans(memo, set())
        writes_after_first = api.writes
        second = await handlers._orphans(memo, first)
        assert writes_after_first == 0  # one sweep only suspects
        return first, second

    first, second = asyncio.run(sweeps())
    assert first == {("n1", GONE)}
    assert second == set()
    assert api.lists == 2 and api.writes == 1
    ledger = json.loads(api.body["metadata"]["annotations"][CLAIMS_ANNOTATION])
    assert set(ledger) == {"ns/live", "ns/deleting"}
    assert handlers._placement_view(memo.book, {}, claims=False)[3].of("ns/gone") is None

    api.lists = 0
    assert asyncio.run(handlers._orphans(memo, second)) == set()  # u-deleting is listed: kept
    memo.wakeups["u-deleting"] = asyncio.Event()
    assert asyncio.run(handlers._orphans(memo, set())) == set()
    assert api.lists == 1  # with every claim's job alive here, no list at all
