"""Eviction: least recently used first, never a model a running job reads, unwanted models before wanted."""

import pytest

from kubeflash_node.agent.space import Candidate, eviction_order, plan_eviction

MB = 1 << 20


def c(mid, size_mb, last_used, wanted=False, in_use=False):
    return Candidate(mid, size_mb * MB, last_used, wanted, in_use)


def test_order_lru_unwanted_first_in_use_never():
    """The order is: unwanted by age, then wanted by age; in-use models are not candidates at all."""
    cands = [c("new", 1, 30), c("old", 1, 10), c("wanted-old", 1, 5, wanted=True), c("busy", 1, 1, in_use=True),
             c("mid", 1, 20)]
    assert [x.id for x in eviction_order(cands)] == ["old", "mid", "new", "wanted-old"]


@pytest.mark.parametrize(
    "need_mb,free_mb,expected",
    [
        pytest.param(5, 10, [], id="fits-without-eviction"),
        pytest.param(12, 10, ["a"], id="one-victim-is-enough"),
        pytest.param(14, 10, ["a", "b"], id="two-victims"),
        pytest.param(40, 10, None, id="cannot-fit-even-evicting-all"),
    ],
)
def test_plan(need_mb, free_mb, expected):
    """plan_eviction takes the shortest prefix of the eviction order that makes room, or says it can't."""
    cands = [c("a", 3, 1), c("b", 3, 2), c("c", 3, 3, wanted=True), c("d", 50, 0, in_use=True)]
    assert plan_eviction(need_mb * MB, free_mb * MB, cands) == expected


def test_restage_after_eviction_may_only_evict_unwanted():
    """A model that was evicted may not push a wanted model out in turn (no ping-pong between two wanted)."""
    cands = [c("wanted", 10, 1, wanted=True), c("unwanted", 2, 5)]
    assert plan_eviction(8 * MB, 1 * MB, cands, only_unwanted=True) is None
    assert plan_eviction(3 * MB, 1 * MB, cands, only_unwanted=True) == ["unwanted"]
