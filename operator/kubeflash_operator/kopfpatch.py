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
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)
_installed = False


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


def install() -> bool:
    """Route kopf's finalizer-only patches through lean_ops (once per process); False if kopf's internals differ."""
    global _installed
    if _installed:
        return True
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
