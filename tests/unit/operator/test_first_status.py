"""A new job's first status patch goes on the newest version seen with kopf's finalizer on it, without a read:
handlers._first_seen keeps that version per job (from the answer to kopf's finalizer patch, handed over by
kopfpatch.answered_patches, or from the watch), never lets an older event delivered later replace it, wakes the
job's step once the finalizer is on, and forgets the job once it has a status."""

from __future__ import annotations

import asyncio
import types

import kopf

from kubeflash_operator import handlers, kopfpatch


def _job(version: str, *, finalizer: bool, status: dict | None = None, generation: int = 1) -> dict:
    meta = {"name": "j", "namespace": "default", "uid": "u1", "resourceVersion": version, "generation": generation}
    if finalizer:
        meta["finalizers"] = [handlers.FINALIZER]
    return {"metadata": meta, "spec": {}, "status": status or {}}


def test_patch_answer_then_late_events_keep_the_newest_version_and_wake_once():
    memo = kopf.Memo()
    wake = asyncio.Event()
    memo.wakeups = {"u1": wake}
    handlers._first_seen(memo, _job("100", finalizer=False))  # ADDED, from the watch
    assert memo.first_seen["u1"] == ("100", 1, False) and not wake.is_set()
    handlers._first_seen(memo, _job("101", finalizer=True))  # kopf's finalizer patch answered
    assert memo.first_seen["u1"] == ("101", 1, True) and wake.is_set()
    wake.clear()
    handlers._first_seen(memo, _job("100", finalizer=False))  # the ADDED event, processed late
    assert memo.first_seen["u1"] == ("101", 1, True)
    handlers._first_seen(memo, _job("101", finalizer=True))  # the finalizer's own event: no second wake-up
    assert not wake.is_set()
    handlers._first_seen(memo, _job("120", finalizer=True, status={"phase": "Running"}))  # placed: forgotten
    assert "u1" not in memo.first_seen


def test_kopfs_patch_answers_reach_the_hook_and_a_failing_hook_breaks_nothing():
    answered = _job("101", finalizer=True)

    async def patch_obj(**kwargs):  # kopf's patch client's shape: (the object it was answered with, what is left)
        return answered, None

    client = types.SimpleNamespace(patch_obj=patch_obj)
    kopfpatch.answered_patches(client)
    kopfpatch.answered_patches(client)  # once only
    seen = []
    kopfpatch.on_patched("test-seen", lambda plural, body: seen.append((plural, body["metadata"]["resourceVersion"])))
    kopfpatch.on_patched("test-broken", lambda plural, body: 1 / 0)
    try:
        jobs = types.SimpleNamespace(plural="inferencejobs")
        result = asyncio.run(client.patch_obj(resource=jobs, namespace="default", name="j", patch=None))
    finally:
        kopfpatch._patched_hooks.pop("test-seen", None)
        kopfpatch._patched_hooks.pop("test-broken", None)
    assert result == (answered, None)
    assert seen == [("inferencejobs", "101")]  # one wrapper, one call
