"""ObjectMeta as kubeflash reads it from a manifest file: the fields kubectl accepts, strictly checked."""

from __future__ import annotations

from typing import Any

from kubeflash_api import schema as s
from kubeflash_api.errors import SpecError, child
from kubeflash_api.names import check_label

_STRINGS = s.mapping("", s.string("", max_len=262144), max_len=256)
# What `kubectl get -o yaml` writes back is accepted too, so a saved object can be re-run with kubeflash run.
_FIELDS = {
    "name": s.string("", min_len=1), "namespace": s.string("", min_len=1), "generateName": s.string(""),
    "labels": _STRINGS, "annotations": _STRINGS, "uid": s.string(""), "resourceVersion": s.string(""),
    "generation": s.integer("", lo=0), "creationTimestamp": s.Node("any", ""),
    "deletionTimestamp": s.Node("any", ""), "deletionGracePeriodSeconds": s.integer("", lo=0),
    "finalizers": s.array("", s.string("")), "ownerReferences": s.array("", s.Node("any", "")),
    "managedFields": s.array("", s.Node("any", "")), "selfLink": s.string(""),
}
METADATA = s.obj("Standard object metadata; metadata.name is a DNS-1123 label.", preserve_unknown=True)


def parse_metadata(meta: Any, *, max_name: int) -> dict[str, Any]:
    """metadata of a manifest file: known keys only, a DNS-1123 `name` (and `namespace` when given)."""
    if meta is None:
        raise SpecError("metadata.name", "is required")
    if not isinstance(meta, dict):
        raise SpecError("metadata", f"must be an object, got {type(meta).__name__}")
    for key, value in meta.items():
        if key not in _FIELDS:
            raise SpecError(child("metadata", key), f"is not a known field (known fields: {', '.join(_FIELDS)})")
        if value is not None:
            s.parse(_FIELDS[key], value, child("metadata", key))
    if meta.get("name") is None:
        raise SpecError("metadata.name", "is required" + (" (generateName works only with kubectl create)"
                                                          if meta.get("generateName") else ""))
    out = {"name": check_label(meta["name"], "metadata.name", max_len=max_name)}
    if meta.get("namespace") is not None:
        out["namespace"] = check_label(meta["namespace"], "metadata.namespace")
    return out
