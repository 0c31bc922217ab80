"""What the agent needs from a job pod or an InferenceJob placed on its node, read from dicts; pure.

The operator's pods carry label kubeflash.io/job=<name>, annotations kubeflash.io/disk and
kubeflash.io/model-id, and mount the job directory by hostPath; a placed InferenceJob names the node, disk and
model in its status (docs/contract.md). Nothing read here becomes a path unless it is a valid Kubernetes name
or a model id.
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
ACTIVE = ("Scheduled", "Staging", "Running")  # phases in which a job holds its pair and its model


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


def job_from_inferencejob(job: Mapping[str, Any], node: str, disks: Sequence[Disk], *, default_quota: int,
                          uid: int | None = None, gid: int | None = None) -> JobWant | None:
    """A job placed on `node` (status.node) and not finished; None otherwise. Its directory goes to uid/gid
    (the engine's user) until its pod says otherwise."""
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    ns, name = meta.get("namespace") or "", meta.get("name") or ""
    if status.get("node") != node or not (_NAME.match(ns) and _NAME.match(name)):
        return None
    if status.get("phase") not in ACTIVE or meta.get("deletionTimestamp"):
        return None
    disk = status.get("disk") if status.get("disk") in {d.name for d in disks} else ""
    model = status.get("modelId") or ""
    return JobWant(namespace=ns, name=name, disk=disk, quota=quota_of(job, default_quota),
                   model_id=model if _ID.match(model) else "", uid=uid, gid=gid, running=True)


def merge(a: JobWant, b: JobWant) -> JobWant:
    """Two views of one job (its pod, its InferenceJob): every field from whichever knows it."""
    return JobWant(namespace=a.namespace, name=a.name, disk=a.disk or b.disk, quota=max(a.quota, b.quota),
                   model_id=a.model_id or b.model_id, uid=a.uid if a.uid is not None else b.uid,
                   gid=a.gid if a.gid is not None else b.gid, running=a.running or b.running)


def quota_of(job: Mapping[str, Any], default: int) -> int:
    """InferenceJob spec.resources.kvDisk in bytes (the operator's default when absent or unreadable)."""
    from kubeflash_api import SpecError
    from kubeflash_api.inferencejob import kv_disk_bytes

    if ((job.get("spec") or {}).get("resources") or {}).get("kvDisk") is None:
        return default
    try:
        return kv_disk_bytes(job.get("spec"))
    except SpecError:
        return default  # the operator fails such a job; it is never placed
