"""The claims ledger and book: what a FlashNode records, which view wins, and that a held claim blocks its pair.

These are the pure parts of "one consistent view for placement": a claim decided but not yet written counts at
once; an answer to our own write overrides an older watch event (and not a newer one); a malformed ledger entry
is never trusted; two decisions for one pair clash.
"""

from __future__ import annotations

import json

import pytest

from kubeflash_operator.bookkeeping import (
    CLAIMS_ANNOTATION,
    ClaimBook,
    Release,
    apply_changes,
    clashes,
    ledger_annotation,
    node_record,
    parse_ledger,
    record_for,
    stale_entries,
)
from kubeflash_operator.scheduler import Claim, Request, place

from operator_factories import NOW, flashnode

A = Claim("ns/a", "n1", (0,), "nvme0", 5)
B = Claim("ns/b", "n1", (1,), "nvme1", 0)


def body(name="n1", rv="10", ledger=None, **kw):
    b = flashnode(name, pairs=((0, "nvme0"), (1, "nvme1")), **kw)
    b["metadata"]["resourceVersion"] = rv
    if ledger is not None:
        b["metadata"]["annotations"] = {CLAIMS_ANNOTATION: ledger_annotation(ledger)}
    return b


def test_ledger_round_trip_is_stable():
    """The annotation written for a ledger parses back to the same claims, and the bytes do not depend on order."""
    text = ledger_annotation({"ns/b": B, "ns/a": A})
    assert text == ledger_annotation({"ns/a": A, "ns/b": B})
    assert parse_ledger("n1", {"metadata": {"annotations": {CLAIMS_ANNOTATION: text}}}) == {"ns/a": A, "ns/b": B}


@pytest.mark.parametrize("raw", ["not json", "[1,2]", json.dumps({"ns/x": {"gpus": "zero", "disk": "d"}}),
                                 json.dumps({"ns/x": {"disk": "d"}})], ids=["garbage", "list", "bad-gpus", "no-gpus"])
def test_malformed_ledger_entries_are_skipped(raw):
    """Someone else's bad annotation never turns into a claim (and never crashes the operator)."""
    assert parse_ledger("n1", {"metadata": {"annotations": {CLAIMS_ANNOTATION: raw}}}) == {}


def test_clashes_names_the_other_holder_only():
    """A job's own entry is not a clash; another job on one of its GPUs is."""
    assert clashes(A, {"ns/a": A, "ns/b": B}) == []
    assert clashes(Claim("ns/c", "n1", (1,), "nvme1"), {"ns/a": A, "ns/b": B}) == ["ns/b"]


def test_held_claim_blocks_its_pair_for_the_next_placement():
    """A claim decided but not written yet is in claims(): the next placement takes the other pair."""
    book = ClaimBook()
    records = book.current([node_record(body())])
    first = place(Request("ns/a", "m"), [r.view for r in records.values()], book.claims(records), now=NOW)
    book.held["ns/a"] = first.claim("ns/a", 0)
    second = place(Request("ns/b", "m"), [r.view for r in records.values()], book.claims(records), now=NOW)
    assert (first.node, first.gpu) != (second.node, second.gpu)
    book.held["ns/b"] = second.claim("ns/b", 0)
    third = place(Request("ns/c", "m"), [r.view for r in records.values()], book.claims(records), now=NOW)
    assert not hasattr(third, "node")  # NoFit: both pairs held


def test_our_write_answer_overrides_an_older_watch_event_but_not_a_newer_one():
    """After our write (rv 12) the watch may still show rv 10; the book keeps 12. A later rv 15 from the watch
    (an agent heartbeat after our write) wins again."""
    book = ClaimBook()
    book.note(body(rv="12", ledger={"ns/a": A}))
    records = book.current([node_record(body(rv="10"))])
    assert records["n1"].rv == "12" and tuple(book.claims(records)) == (A,)
    records = book.current([node_record(body(rv="15", ledger={"ns/a": A, "ns/b": B}))])
    assert records["n1"].rv == "15" and set(book.claims(records)) == {A, B}


def test_a_flashnode_the_watch_no_longer_shows_is_gone():
    """A deleted FlashNode's written record is dropped with it; its claims no longer count."""
    book = ClaimBook()
    book.note(body(rv="12", ledger={"ns/a": A}))
    assert tuple(book.claims(book.current([]))) == ()
    assert book.written == {}


def test_record_for_maps_the_kubernetes_node_name():
    """A FlashNode named differently from its node (spec.nodeName) is still found by the node's name."""
    b = body(name="fn-1")
    b["spec"]["nodeName"] = "node-1"
    records = ClaimBook().current([node_record(b)])
    assert record_for(records, "node-1").name == "fn-1"
    assert record_for(records, "fn-1") is None


C = Claim("ns/c", "n1", (0,), "nvme0", 0)


@pytest.mark.parametrize("changes, ledger, accepted", [
    ({"ns/c": C}, {"ns/a": A}, {"ns/c": False}),  # GPU 0 is ns/a's
    ({"ns/c": C, "ns/d": Claim("ns/d", "n1", (0,), "nvme0")}, {}, {"ns/c": True, "ns/d": False}),  # one batch, one GPU
    ({"ns/a": Claim("ns/a", "n1", (1,), "nvme1")}, {"ns/a": A}, {"ns/a": False}),  # a second entry for one job
    ({"ns/a": A}, {"ns/a": A}, {"ns/a": True}),  # the same entry again: accepted, nothing changes
    ({"ns/a": Release()}, {"ns/a": A}, {"ns/a": True}),
    ({"ns/a": Release(Claim("ns/a", "n1", (1,), "nvme1"))}, {"ns/a": A}, {"ns/a": True}),  # not that entry: kept
], ids=["taken", "same-batch", "second-entry", "same-again", "release", "release-other"])
def test_apply_changes(changes, ledger, accepted):
    """A claim is refused when another job holds its GPU (also within one batch) or the job already holds a
    different entry; a release given an entry removes only that entry."""
    out, got = apply_changes(ledger, changes)
    assert got == accepted
    for job, ok in accepted.items():
        change = changes[job]
        if isinstance(change, Release):
            assert (job in out) == (change.claim is not None and change.claim != ledger.get(job))
        elif ok:
            assert out[job] == change
        else:
            assert out.get(job) == ledger.get(job)


def test_stale_entries_are_those_that_do_not_match_the_job_status():
    """An entry elsewhere than the job's status placement is stale; with no placement every entry is."""
    other = Claim("ns/a", "n2", (3,), "nvme3")
    records = ClaimBook().current([node_record(body(ledger={"ns/a": A})),
                                   node_record(body(name="n2", ledger={"ns/a": other}))])
    assert stale_entries(records, "ns/a", A) == [("n2", other)]
    assert sorted(n for n, _ in stale_entries(records, "ns/a", None)) == ["n1", "n2"]
    assert stale_entries(records, "ns/b", None) == []
