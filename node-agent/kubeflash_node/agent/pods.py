"""What the agent needs from a pod on its node, read from the pod as a dict; pure.

The operator's pods carry label kubeflash.io/job=<name>, annotations kubeflash.io/disk and
kubeflash.io/model-id, and mount the job directory by hostPath (docs/contract.md). Nothing from a pod is used
as a path unless it is a valid Kubernetes name or a model id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .config import JobWant
from .devices import Disk

JOB_LABEL = "kubeflash.io/job"
DISK_ANNOTATION = "kubeflash.io/disk"
MODEL_ANNOTATION = "kubeflash.io/model-id"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")


def job_from_pod(pod: Mapping[str, Any], disks: Sequence[Disk]) -> JobWant | None:
    """The job a pod belongs to, on which disk, reading which model; None for a pod that is not a job's."""
    meta = pod.get("metadata") or {}
    ns, name = meta.get("namespace") or "", (meta.get("labels") or {}).get(JOB_LABEL) or ""
    if not (_NAME.match(ns) and _NAME.match(name)):
        return None
    spec = pod.get("spec") or {}
    ann = meta.get("annotations") or {}
    uid, gid = _user(spec)
    phase = (pod.get("status") or {}).get("phase", "")
    return JobWant(namespace=ns, name=name, disk=_disk(ann, spec, disks, ns, name), model_id=_model(ann, spec),
                   uid=uid, gid=gid, running=phase in ("Pending", "Running") and not meta.get("deletionTimestamp"))


def _disk(ann: Mapping, spec: Mapping, disks: Sequence[Disk], ns: str, name: str) -> str:
    names = {d.name for d in disks}
    if ann.get(DISK_ANNOTATION) in names:
        return ann[DISK_ANNOTATION]
    for vol in spec.get("volumes") or []:
        host = ((vol or {}).get("hostPath") or {}).get("path", "")
        for d in disks:
            if host.rstrip("/") == f"{str(d.path).rstrip('/')}/jobs/{ns}/{name}":
                return d.name
    return ""


def _model(ann: Mapping, spec: Mapping) -> str:
    mid = ann.get(MODEL_ANNOTATION, "")
    if not mid:
        for c in spec.get("containers") or []:
            for env in c.get("env") or []:
                if env.get("name") == "KUBEFLASH_MODEL_DIR" and str(env.get("value", "")).startswith("/models/"):
                    mid = env["value"][len("/models/"):]
    return mid if _ID.match(mid or "") else ""


def _user(spec: Mapping) -> tuple[int | None, int | None]:
    """The uid/gid the job's container runs as (container securityContext first), for its directory's owner."""
    pod_sc = spec.get("securityContext") or {}
    containers = spec.get("containers") or [{}]
    c_sc = (containers[0] or {}).get("securityContext") or {}
    uid = c_sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = c_sc.get("runAsGroup", pod_sc.get("runAsGroup", pod_sc.get("fsGroup")))
    ok = lambda v: v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None  # noqa: E731
    return ok(uid), ok(gid)


def quota_of(job: Mapping[str, Any], default: int) -> int:
    """InferenceJob spec.resources.kvDisk in bytes (the operator's default when absent or unreadable)."""
    from .config import ConfigError, parse_bytes

    raw = ((job.get("spec") or {}).get("resources") or {}).get("kvDisk")
    if raw is None:
        return default
    try:
        return parse_bytes(raw, "spec.resources.kvDisk")
    except ConfigError:
        return default
