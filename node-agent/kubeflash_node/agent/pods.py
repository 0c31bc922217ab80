"""What the agent needs of a job placed on its node, from the job ledger on its own FlashNode; pure.

The operator lists each job placed here in the FlashNode's ledger (kubeflash_api/ledger.py): its disk, KV bytes,
model, uid and output ConfigMap. The agent reads no pod and no InferenceJob. Nothing read here becomes a path
unless it is a valid Kubernetes name or a model id (the annotation is the operator's, but checked all the same).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kubeflash_api.ledger import PlacedJob

from .config import JobWant
from .devices import Disk

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")


def job_from_ledger(job: PlacedJob, disks: Sequence[Disk], *, default_quota: int, uid: int | None = None,
                    gid: int | None = None) -> JobWant | None:
    """The directory a job placed here needs (a live claim); None for an ended record or a key that is not
    "<namespace>/<name>" of valid names. Its directory goes to uid/gid (the engine pod's user)."""
    ns, _, name = job.key.partition("/")
    if not job.live or not (_NAME.match(ns) and _NAME.match(name)) or len(ns) > 63 or len(name) > 253:
        return None
    disk = job.disk if job.disk in {d.name for d in disks} else ""
    return JobWant(namespace=ns, name=name, disk=disk, quota=job.kv or default_quota,
                   model_id=job.model if _ID.match(job.model) else "", uid=uid, gid=gid, running=True)


def merge(a: JobWant, b: JobWant) -> JobWant:
    """Two views of one job: every field from whichever knows it."""
    return JobWant(namespace=a.namespace, name=a.name, disk=a.disk or b.disk, quota=max(a.quota, b.quota),
                   model_id=a.model_id or b.model_id, uid=a.uid if a.uid is not None else b.uid,
                   gid=a.gid if a.gid is not None else b.gid, running=a.running or b.running)
