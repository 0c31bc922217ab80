"""The operator's placement view is built once per change, never stale: a FlashNode event, our own ledger write's
answer, a FlashNode deletion or a Node turning cordoned/NotReady shows in the very next step's view; a claim held
while its ledger write is in flight counts at once (without rebuilding the view); and a pod event that changes
nothing a step reads (same view, same owners) wakes no job coroutine, while one that does wakes its owner."""

from __future__ import annotations

import asyncio

import kopf

from kubeflash_operator import handlers
from kubeflash_operator.bookkeeping import CLAIMS_ANNOTATION, ClaimBook, ledger_annotation, node_record
from kubeflash_operator.scheduler import Claim

from operator_factories import flashnode

A = Claim("ns/a", "n1", (0,), "nvme0", 0)
B = Claim("ns/b", "n2", (1,), "nvme1", 0)


def fn(name: str, rv: str, ledger: dict | None = None) -> dict:
    b = flashnode(name, pairs=((0, "nvme0"), (1, "nvme1")))
    b["metadata"]["resourceVersion"] = rv
    if ledger:
        b["metadata"]["annotations"] = {CLAIMS_ANNOTATION: ledger_annotation(ledger)}
    return b


def test_view_follows_every_change_and_held_claims_count_at_once():
    book, states = ClaimBook(), {}
    book.watch(node_record(fn("n1", "1")))
    records, nodes, unready, claims = handlers._placement_view(book, states)
    assert set(nodes) == {"n1"} and tuple(claims) == () and unready == frozenset()
    assert handlers._placement_view(book, states)[1] is nodes  # no change: the same view, not rebuilt

    book.watch(node_record(fn("n2", "2")))  # a new FlashNode (watch)
    assert set(handlers._placement_view(book, states)[1]) == {"n1", "n2"}
    book.note(fn("n1", "3", {"ns/a": A}))  # the answer to our own ledger write
    assert tuple(handlers._placement_view(book, states)[3]) == (A,)
    assert handlers._placement_view(book, states)[0]["n1"].rv == "3"
    assert book.record("n1") == book.current(book.watched.values())["n1"]  # the one-node lookup agrees

    book.held["ns/b"] = B  # decided, write in flight: counts without a rebuild
    generation = book.generation
    assert set(handlers._placement_view(book, states)[3]) == {A, B}
    assert book.generation == generation
    del book.held["ns/b"]
    assert tuple(handlers._placement_view(book, states)[3]) == (A,)

    states["n2"] = "cordoned"  # node_index's handler sets the state and says so
    book.changed()
    assert handlers._placement_view(book, states)[1]["n2"].cordoned
    states["n1"] = "NotReady"
    book.changed()
    assert handlers._placement_view(book, states)[2] == frozenset({"n1"})

    book.unwatch("n1")  # the FlashNode is deleted: its node and its ledger leave the view
    _, nodes, _, claims = handlers._placement_view(book, states)
    assert set(nodes) == {"n2"} and tuple(claims) == () and book.record("n1") is None


def _pod(phase: str, node: str = "") -> dict:
    return {"metadata": {"name": "j-1", "namespace": "ns", "uid": "p1", "labels": {"kubeflash.io/job": "j"},
                         "ownerReferences": [{"uid": "job-uid"}], "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": node} if node else {}, "status": {"phase": phase}}


def test_pod_events_wake_the_owner_only_on_a_change():
    async def run() -> list[bool]:
        memo = kopf.Memo()
        wake = asyncio.Event()
        memo.wakeups = {"job-uid": wake}
        woken = []
        for body in (_pod("Pending"), _pod("Pending"), _pod("Pending", "gpu-1"), _pod("Pending", "gpu-1"),
                     _pod("Running", "gpu-1")):
            wake.clear()
            out = await handlers.pod_index(body=kopf.Body(body), namespace="ns", labels={"kubeflash.io/job": "j"},
                                           memo=memo)
            assert out[("ns", "j")][1].phase == body["status"]["phase"]
            woken.append(wake.is_set())
        return woken

    assert asyncio.run(run()) == [True, False, True, False, True]


def test_deleted_jobs_wait_for_their_pods_on_one_sweeper():
    """Deleted jobs waiting for their pods to go are woken by one sweeper task as each job's pods leave the index
    (not before), a job whose pods stay is let go at its timeout, and the sweeper ends when no one waits."""
    async def until(cond) -> None:
        while not cond():
            await asyncio.sleep(0.01)

    async def run() -> tuple[list[str], bool]:
        memo = kopf.Memo()
        index = {"a": ["pod-a"], "b": ["pod-b"], "c": ["pod-c"]}
        done: list[str] = []

        async def wait(job: str, timeout: float) -> None:
            await handlers._pods_gone(memo, lambda: index[job], timeout)
            done.append(job)

        tasks = [asyncio.create_task(wait(j, t)) for j, t in (("a", 60), ("b", 60), ("c", 0.5))]
        await until(lambda: "c" in done)  # its timeout; a and b keep waiting while their pods are there
        assert done == ["c"] and len(memo.pods_gone) == 2
        index["b"] = []
        await until(lambda: "b" in done)
        assert done == ["c", "b"]
        index["a"] = []
        await asyncio.gather(*tasks)
        await asyncio.wait_for(memo.pods_sweeper, 10)
        return done, memo.pods_gone == {}

    assert asyncio.run(run()) == (["c", "b", "a"], True)
