"""kopfpatch's finalizer shortcut gives exactly the JSON-patch ops kopf's own whole-object diff gives (adding the
finalizer to a job with none or with others, removing it with and without others left), and leaves any other
patch to kopf."""

from __future__ import annotations

import asyncio
import copy
import functools
import types

import jsonpatch
import pytest
from kopf._cogs.structs import bodies, finalizers, patches

from kubeflash_operator import kopfpatch

FIN = "kubeflash.io/release-kv"
_KOPF_AS_JSON_PATCH = patches.Patch.as_json_patch  # kopf's own, unless install() ran before this module loaded


def _job(finalizer_list: list[str] | None) -> dict:
    meta = {"name": "j", "namespace": "default", "uid": "u1", "resourceVersion": "42",
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:model": {}}}}]}
    if finalizer_list is not None:
        meta["finalizers"] = finalizer_list
    return {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": meta,
            "spec": {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["Hello"] * 20}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


def _patch(body: dict, fn) -> patches.Patch:
    p = patches.Patch(body=bodies.Body(body))
    p.fns.append(functools.partial(fn, finalizer=FIN))
    return p


@pytest.mark.parametrize(("existing", "fn"), [
    (None, finalizers.block_deletion),
    ([], finalizers.block_deletion),
    (["other.io/x"], finalizers.block_deletion),
    ([FIN], finalizers.block_deletion),  # already there: no ops
    ([FIN], finalizers.allow_deletion),
    (["other.io/x", FIN], finalizers.allow_deletion),
    ([FIN, "other.io/x", FIN], finalizers.allow_deletion),
    (None, finalizers.allow_deletion),  # nothing to remove: no ops
])
def test_lean_ops_equal_kopfs_own(existing, fn):
    body = _job(copy.deepcopy(existing))
    patch = _patch(body, fn)
    own = _KOPF_AS_JSON_PATCH(patch) if not kopfpatch._installed else _kopf_ops(patch, body)
    lean = kopfpatch.lean_ops(patch, patch._original, finalizers, jsonpatch)
    assert lean == own
    # applying them gives the same object kopf intends
    want = copy.deepcopy(body)
    fn(want, finalizer=FIN)
    assert jsonpatch.apply_patch(body, lean) == want


def _kopf_ops(patch: patches.Patch, body: dict) -> list:
    """kopf's own algorithm: deep copy, apply the functions, diff the whole object."""
    after = copy.deepcopy(body)
    for f in patch.fns:
        f(after)
    return jsonpatch.JsonPatch.from_diff(body, after).patch


def test_other_patches_are_left_to_kopf():
    body = _job([FIN])
    merge = patches.Patch(body=bodies.Body(body))
    merge["status"] = {"phase": "Failed"}
    assert kopfpatch.lean_ops(merge, body, finalizers, jsonpatch) is None
    mixed = _patch(body, finalizers.allow_deletion)
    mixed["metadata"] = {"annotations": {"a": "b"}}
    assert kopfpatch.lean_ops(mixed, body, finalizers, jsonpatch) is None
    foreign = patches.Patch(body=bodies.Body(body))
    foreign.fns.append(lambda b: b["metadata"].setdefault("labels", {}).update(x="y"))
    assert kopfpatch.lean_ops(foreign, body, finalizers, jsonpatch) is None


def test_installed_patch_answers_like_kopf():
    assert kopfpatch.install()
    for existing, fn in ((None, finalizers.block_deletion), ([FIN], finalizers.allow_deletion)):
        body = _job(existing)
        patch = _patch(body, fn)
        assert patch.as_json_patch() == _kopf_ops(patch, body)
    merge = patches.Patch(body=bodies.Body(_job([FIN])))
    merge["status"] = {"phase": "Failed"}
    assert merge.as_json_patch() == [{"op": "replace", "path": "/status/phase", "value": "Failed"}]


def test_body_repr_is_short_unless_debug_is_logged():
    """After install(), a Body's repr (kopf formats one into a debug line per event) names the object; with kopf's
    object logger at debug it is the whole body again."""
    import logging

    assert kopfpatch.install()
    body = bodies.Body(_job([FIN]))
    objects = logging.getLogger("kopf.objects")
    level = objects.level
    try:
        objects.setLevel(logging.INFO)
        assert repr(body) == "<InferenceJob default/j>"
        objects.setLevel(logging.DEBUG)
        assert repr(body) == repr(_job([FIN]))
    finally:
        objects.setLevel(level)


def test_readiness_gate_wakes_its_waiters_only_when_it_flips():
    """kopf's ToggleSet after install() (its readiness gate): N workers waiting for the set to be on while N toggles
    are dropped one by one go on only after the last drop, all of them, and the set's state is computed O(N) times
    in all (kopf's own Condition wakes every waiter on every change: N^2 evaluations, minutes at 5,000 objects)."""
    import asyncio

    from kopf._cogs.aiokits import aiotoggles

    assert kopfpatch.install()
    n, calls = 300, [0]

    def counted_all(states) -> bool:
        calls[0] += 1
        return all(states)

    async def run() -> tuple[list[int], list[int]]:
        gate = aiotoggles.ToggleSet(counted_all)
        toggles = [await gate.make_toggle(name=str(i)) for i in range(n)]
        released: list[int] = []

        async def worker(i: int) -> None:
            await gate.wait_for(True)
            released.append(i)

        tasks = [asyncio.create_task(worker(i)) for i in range(n)]
        for t in toggles[:-1]:
            await gate.drop_toggle(t)
            await asyncio.sleep(0)  # the waiters and the refresh get their turn
        before = list(released)
        await gate.drop_toggle(toggles[-1])
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return before, sorted(released)

    before, after = asyncio.run(run())
    assert before == [] and after == list(range(n))
    assert calls[0] < 10 * n, calls[0]


def test_watch_events_reach_kopf_without_managed_fields():
    """lean_events wraps a watch stream (here a stand-in module with kopf's infinite_watch signature): objects lose
    metadata.managedFields and nothing else; bookmarks and odd events pass unchanged; wrapping twice wraps once."""
    events = [{"type": "ADDED", "object": _job(["x"])}, "LISTED", {"type": "ERROR", "object": "gone"},
              {"type": "MODIFIED", "object": {"metadata": None}}]
    want = copy.deepcopy(events[0])
    del want["object"]["metadata"]["managedFields"]

    async def infinite_watch(*, settings, resource, namespace):
        for e in events:
            yield e

    module = types.SimpleNamespace(infinite_watch=infinite_watch)
    kopfpatch.lean_events(module)
    wrapped = module.infinite_watch
    kopfpatch.lean_events(module)
    assert module.infinite_watch is wrapped and wrapped is not infinite_watch

    async def collect():
        return [e async for e in module.infinite_watch(settings=None, resource="r", namespace=None)]

    got = asyncio.run(collect())
    assert got[0] == want and got[1:] == events[1:]
