"""kopf's finalizer patches, computed on the finalizer list instead of the whole object.

kopf adds and removes its finalizer as a function on a copy of the object, then diffs the whole object against
the original to get the JSON-patch ops (copy.deepcopy + jsonpatch.from_diff over spec, status, managedFields):
~4 ms of the event loop per job on the benchmark's machine, twice per job (add, remove), about a quarter of the
operator's CPU in a 500-job burst (bench/operator_scale.py with KUBEFLASH_BENCH_PROFILE). The finalizer functions
touch only metadata.finalizers, so the same ops come from diffing a body holding only the object's name and its
finalizer list. Any other patch (merge-patch content, another function) goes through kopf's own code unchanged;
so does everything if this kopf's internals are not the ones this was written against (install() then says so).

kopf also formats every changing cause's whole body into a debug line (an f-string, built whether or not debug is
logged): a job's body repr per event, 3 % of the operator's CPU in a 500-job burst (py-spy). A Body's repr is that
whole body only while kopf's object logger logs debug (`kubeflash operator -v`); otherwise its kind and name.

kopf's readiness gate (its ToggleSet of "indexed" toggles: one per object listed or first seen before every index
is filled) wakes every waiting object worker on each change of any toggle, through one asyncio.Condition, and
each woken worker re-takes the condition's lock in turn: N objects cost N^2 wake-ups. With 5,000 jobs arriving
while 500 FlashNodes and 500 Nodes are still being indexed (or an operator restarted beside 5,000 jobs and their
pods), the event loop did nothing else for minutes and placed no job (bench/operator_scale.py --jobs 5000
--nodes 500, py-spy: 70 % of the samples in ToggleSet.make_toggle/drop_toggle). `fast_toggle_sets` keeps the
same semantics (a waiter goes on only when the set is in the state it waits for, re-checked when it wakes) but
wakes the waiters only when the set's state flips: one asyncio.Event per state, refreshed once per loop
iteration in which toggles changed.

kopf keeps every watched object's newest body while a handler might read it: each job's (its daemon's live
body) for as long as the job lives, and every object's last event while its worker waits for the next one
(settings.queueing.idle_timeout). About half of an engine pod's JSON and a good part of a job's is
metadata.managedFields (server-side apply bookkeeping), which neither kopf nor this operator reads (kopf's
finalizer patches and its diff base do not use it). `lean_events` drops it from each watch event as it arrives:
tracemalloc of the operator with 500 jobs placed (bench/operator_scale.py, KUBEFLASH_BENCH_TRACEMALLOC) had the
decoded watch events as its largest holder of memory.

kopf's own patches (its finalizer's) answer with the patched object, which kopf uses only to check the patch;
`on_patched` hands that answer to the operator too, so a new job's first status patch can go on the version the
finalizer patch made as soon as it is answered, not one watch delivery later (a second trip through the API
server's watch cache and kopf's per-object queue, seconds on the loaded benchmark box).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)
_installed = False
_toggles_installed = False
_patched_hooks: dict[str, Any] = {}


def _finalizer_only(patch: Any, finalizers: Any) -> bool:
    fns = patch.fns
    return bool(fns) and not dict(patch) and all(
        isinstance(fn, functools.partial) and fn.func in (finalizers.block_deletion, finalizers.allow_deletion)
        and not fn.args for fn in fns)


def lean_ops(patch: Any, base: Any, finalizers: Any, jsonpatch: Any) -> list[dict[str, Any]] | None:
    """The JSON-patch ops of a finalizer-only kopf patch against `base`, from the finalizer list alone; None when
    this shortcut does not apply (kopf's own diff is used then)."""
    if base is None or not _finalizer_only(patch, finalizers):
        return None
    meta = dict(base).get("metadata") or {}
    if not meta.get("name"):  # allow_deletion drops an emptied metadata: keep a key that is always there
        return None
    before: dict[str, Any] = {"metadata": {"name": meta["name"]}}
    if "finalizers" in meta:
        before["metadata"]["finalizers"] = list(meta["finalizers"] or [])
    after = {"metadata": dict(before["metadata"])}
    if "finalizers" in after["metadata"]:
        after["metadata"]["finalizers"] = list(after["metadata"]["finalizers"])
    for fn in patch.fns:
        fn(after)
    return jsonpatch.JsonPatch.from_diff(before, after).patch


def short_repr(body: Any) -> str:
    """A kopf Body's repr: the whole body while debug is logged, else `<Kind ns/name>`."""
    if logging.getLogger("kopf.objects").isEnabledFor(logging.DEBUG):
        return repr(dict(body))
    meta = dict(body).get("metadata") or {}
    where = "/".join(x for x in (meta.get("namespace"), meta.get("name")) if x)
    return f"<{dict(body).get('kind', 'object')} {where}>"


def _events(ts: Any) -> dict[bool, asyncio.Event]:
    events = ts.__dict__.get("_kf_events")
    if events is None:
        events = ts._kf_events = {True: asyncio.Event(), False: asyncio.Event()}
        _refresh(ts)
    return events


def _refresh(ts: Any) -> None:
    """Set the event of the state the set is in now, clear the other."""
    ts.__dict__.pop("_kf_pending", None)
    events = ts.__dict__.get("_kf_events")
    if events is not None:
        on = ts.is_on()
        events[on].set()
        events[not on].clear()


def _changed(ts: Any) -> None:
    """A toggle of the set was made, dropped or turned: refresh the events once, soon (not per change)."""
    if ts is not None and "_kf_events" in ts.__dict__ and not ts.__dict__.get("_kf_pending"):
        ts._kf_pending = True
        asyncio.get_running_loop().call_soon(_refresh, ts)


def fast_toggle_sets(aiotoggles: Any) -> None:
    """Patch kopf's ToggleSet (and Toggle.turn_to for toggles made by a set) as the module docstring says (once)."""
    global _toggles_installed
    if _toggles_installed:
        return
    _toggles_installed = True
    toggle_set, toggle = aiotoggles.ToggleSet, aiotoggles.Toggle
    make, drop, drops, turn = toggle_set.make_toggle, toggle_set.drop_toggle, toggle_set.drop_toggles, toggle.turn_to

    async def wait_for(self: Any, state: bool) -> None:
        state = bool(state)
        events = _events(self)
        while self.is_on() != state:
            _refresh(self)  # the events say the state as of now, so the wait below suspends
            await events[state].wait()

    async def make_toggle(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = await make(self, *args, **kwargs)
        t._kf_set = self
        _changed(self)
        return t

    async def drop_toggle(self: Any, t: Any) -> None:
        await drop(self, t)
        _changed(self)

    async def drop_toggles(self: Any, ts: Any) -> None:
        await drops(self, ts)
        _changed(self)

    async def turn_to(self: Any, state: bool) -> None:
        await turn(self, state)
        _changed(self.__dict__.get("_kf_set"))

    toggle_set.wait_for, toggle_set.make_toggle = wait_for, make_toggle
    toggle_set.drop_toggle, toggle_set.drop_toggles, toggle.turn_to = drop_toggle, drop_toggles, turn_to


def drop_managed_fields(raw_event: Any) -> Any:
    """The watch event with its object's metadata.managedFields removed (in place); anything else unchanged."""
    if isinstance(raw_event, dict):
        obj = raw_event.get("object")
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if isinstance(meta, dict):
            meta.pop("managedFields", None)
    return raw_event


def lean_events(watching: Any) -> None:
    """Every event of kopf's watch streams passes drop_managed_fields before kopf queues and keeps it."""
    original = watching.infinite_watch
    if getattr(original, "kubeflash_lean", False):
        return

    async def infinite_watch(*args: Any, **kwargs: Any) -> Any:
        async for raw_event in original(*args, **kwargs):
            yield drop_managed_fields(raw_event)

    infinite_watch.kubeflash_lean = True  # type: ignore[attr-defined]
    watching.infinite_watch = infinite_watch


def on_patched(key: str, hook: Any) -> None:
    """Call hook(plural, body) with each object one of kopf's patches was answered with (before kopf goes on);
    a later hook under the same key replaces the earlier one (an operator started again in one process)."""
    _patched_hooks[key] = hook


def answered_patches(patching: Any) -> None:
    """kopf's patch_obj passes the object each patch was answered with to the on_patched hooks (once)."""
    original = patching.patch_obj
    if getattr(original, "kubeflash_answered", False):
        return

    async def patch_obj(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        body = result[0] if isinstance(result, tuple) and result else None
        if body:
            plural = getattr(kwargs.get("resource"), "plural", "")
            for hook in list(_patched_hooks.values()):
                try:
                    hook(plural, body)
                except Exception:  # noqa: BLE001 - a hook never breaks kopf's patching
                    log.exception("on_patched hook failed")
        return result

    patch_obj.kubeflash_answered = True  # type: ignore[attr-defined]
    patching.patch_obj = patch_obj


def install() -> bool:
    """Route kopf's finalizer-only patches through lean_ops, install fast_toggle_sets and lean_events (once per
    process); False if kopf's internals differ (then kopf's own code runs)."""
    global _installed
    if _installed:
        return True
    try:
        from kopf._cogs.clients import watching
        watching.infinite_watch  # noqa: B018
    except (ImportError, AttributeError) as e:
        log.warning("kopf's watch internals differ from what kubeflash expects (%s); watched objects keep their "
                    "managedFields in memory", e)
    else:
        lean_events(watching)
    try:
        from kopf._cogs.clients import patching
        patching.patch_obj  # noqa: B018
    except (ImportError, AttributeError) as e:
        log.warning("kopf's patch client differs from what kubeflash expects (%s); a new job's first status waits "
                    "for its finalizer patch to come back through the watch", e)
    else:
        answered_patches(patching)
    try:
        from kopf._cogs.aiokits import aiotoggles
        aiotoggles.ToggleSet.make_toggle, aiotoggles.ToggleSet.drop_toggles, aiotoggles.Toggle.turn_to  # noqa: B018
    except (ImportError, AttributeError) as e:
        log.warning("kopf's toggle internals differ from what kubeflash expects (%s); its readiness gate wakes "
                    "every object worker on every change", e)
    else:
        fast_toggle_sets(aiotoggles)
    try:
        import jsonpatch
        from kopf._cogs.structs import bodies, finalizers, patches
        original = patches.Patch.as_json_patch
        finalizers.block_deletion, finalizers.allow_deletion  # noqa: B018 - the functions the shortcut knows
    except (ImportError, AttributeError) as e:
        log.warning("kopf's patch internals differ from what kubeflash expects (%s); finalizer patches are "
                     "diffed over the whole object", e)
        return False

    def as_json_patch(self: Any, body: Any = None) -> Any:
        ops = lean_ops(self, body if body is not None else self._original, finalizers, jsonpatch)
        return ops if ops is not None else original(self, body)

    patches.Patch.as_json_patch = as_json_patch
    bodies.Body.__repr__ = short_repr
    _installed = True
    return True
