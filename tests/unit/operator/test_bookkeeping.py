"""In-flight placements: counted until the watch confirms them, dropped on release, expired if never seen."""

from __future__ import annotations

from kubeflash_operator.bookkeeping import Bookkeeping
from kubeflash_operator.scheduler import Claim

A = Claim("ns/a", "n1", (0,), "nvme0")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_held_claim_counts_until_the_watch_shows_it():
    """A just-made placement is added to the observed claims; once observed it is no longer needed."""
    book = Bookkeeping(clock=Clock())
    book.hold(A)
    assert book.claims([]) == (A,)
    assert book.claims([A]) == (A,)
    assert book.claims([]) == ()  # confirmed once, then the watch is the source of truth


def test_newer_placement_overrides_a_stale_observed_one():
    """If the watch still shows the job's old node, the book's newer placement wins."""
    book = Bookkeeping(clock=Clock())
    old = Claim("ns/a", "n2", (3,), "nvme1")
    book.hold(A)
    assert book.claims([old]) == (A,)


def test_dropped_and_expired_claims_disappear():
    """drop() forgets a claim at once; an unconfirmed claim expires after the ttl."""
    clock = Clock()
    book = Bookkeeping(ttl=60, clock=clock)
    book.hold(A)
    book.drop("ns/a")
    assert book.claims([]) == ()
    book.hold(A)
    clock.t = 61
    assert book.claims([]) == ()
