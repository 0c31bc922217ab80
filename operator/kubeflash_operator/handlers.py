"""kopf handlers: thin glue between watch events and the pure reconcile step.

Indices keep FlashNodes, cordoned Nodes, placed jobs and engine pods in memory; a timer per live InferenceJob
gathers them into a World, asks `reconcile.step` for a Plan and carries it out (FlashNode model request, pod
create/delete, then the status patch, events and metrics). Create/resume admit a job (Pending, or Failed naming
the bad field); the `kubeflash.io/release-kv` finalizer deletes a job's pods before the job goes away.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import kopf

from kubeflash_api import SpecError
from kubeflash_api.inferencejob import kv_disk_bytes
from kubeflash_operator import reconcile
from kubeflash_operator.bookkeeping import Bookkeeping
from kubeflash_operator.builder import JOB_LABEL, JobRef, build_pod
from kubeflash_operator.config import OperatorConfig
from kubeflash_operator.kube import Conflict, Kube, connection_info
from kubeflash_operator.metrics import Metrics
from kubeflash_operator.pods import PodView, pod_view
from kubeflash_operator.scheduler import claim_of, node_view
from kubeflash_operator.status import TERMINAL
from kubeflash_operator.timefmt import now, parse_time

JOBS = ("kubeflash.io", "v1alpha1", "inferencejobs")
FLASHNODES = ("kubeflash.io", "v1alpha1", "flashnodes")
FINALIZER = "kubeflash.io/release-kv"
TICK_S = 2.0  # how often a live job is reconciled (pod and FlashNode changes show up within one tick)
_ROUTINE = ("Timer 'reconcile_job' succeeded.", "Handler 'count_job_phase' succeeded.")


class _QuietRoutine(logging.Filter):
    """Drop kopf's per-tick success lines (one per job every TICK_S); failures and real news still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in _ROUTINE


# ------------------------------------------------------------------------------------------------ startup


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    cfg = memo.get("config") or OperatorConfig.from_env()
    memo.config = cfg
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubeflash.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubeflash.io")
    settings.posting.level = logging.INFO
    objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _QuietRoutine) for f in objects.filters):
        objects.addFilter(_QuietRoutine())
    memo.kube = Kube.connect()
    memo.book = Bookkeeping()
    memo.metrics = Metrics()
    if cfg.metrics_port:
        memo.metrics.serve(cfg.metrics_port)
    logger.info("kubeflash operator configured: %s", cfg)


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """Same credentials as the operator's own client (kopf's default login misses a late $KUBECONFIG)."""
    return kopf.ConnectionInfo(**connection_info(), trust_env=settings.networking.trust_env)


@kopf.on.cleanup()
def shutdown(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("metrics"):
        memo.metrics.close()


@kopf.on.probe(id="jobs")
def probe_jobs(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    return memo.metrics.phase_counts()


# ------------------------------------------------------------------------------------------------ indices


@kopf.index(*FLASHNODES)
def flashnode_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    view = node_view(body)
    return {view.name: view}


@kopf.index("v1", "nodes")
def cordon_index(name: str, spec: kopf.Spec, **_: Any) -> dict[str, bool]:
    """Cordoned Nodes (spec.unschedulable: kubectl cordon/drain) by name; they take no new jobs or retries."""
    return {name: True} if spec.get("unschedulable") else {}  # {} drops an uncordoned node


@kopf.index(*JOBS)
def claim_index(body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, Any]:
    try:
        kv = kv_disk_bytes(spec)
    except SpecError:
        kv = 0  # an invalid job is Failed, never placed
    claim = claim_of(body, kv_bytes=kv)
    return {claim.job: claim} if claim else {}  # {} (not None) removes a finished job's old claim


@kopf.index("pods", labels={JOB_LABEL: kopf.PRESENT})
def pod_index(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[tuple[str, str], Any]:
    owners = [o.get("uid") for o in body.get("metadata", {}).get("ownerReferences") or []]
    return {(namespace, labels[JOB_LABEL]): (tuple(owners), pod_view(body))}


# ------------------------------------------------------------------------------------------ job lifecycle


@kopf.on.create(*JOBS)
def admit_new_job(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _admit(body, patch)


@kopf.on.resume(*JOBS)
def admit_resumed_job(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _admit(body, patch)


def _live(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


@kopf.timer(*JOBS, interval=TICK_S, backoff=TICK_S, when=_live)
def reconcile_job(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, flashnode_index: kopf.Index,
                  claim_index: kopf.Index, pod_index: kopf.Index, cordon_index: kopf.Index, **_: Any) -> None:
    job = _job(body)
    pods = _pods(memo.kube, job, pod_index)
    views = (next(iter(store)) for store in flashnode_index.values())
    nodes = {v.name: replace(v, cordoned=True) if v.name in cordon_index else v for v in views}
    with memo.book.lock:
        claims = memo.book.claims(c for store in claim_index.values() for c in store)
        plan = reconcile.step(job, reconcile.World(now=now(), nodes=nodes, claims=claims, pods=pods), memo.config)
        if plan.claim:
            memo.book.hold(plan.claim)
        if plan.release:
            memo.book.drop(job.key)
    try:
        _carry_out(plan, job, memo)
    except Conflict as e:
        memo.book.drop(job.key)
        raise kopf.TemporaryError(str(e), delay=1) from e
    except Exception:
        memo.book.drop(job.key)  # nothing recorded: the next tick decides again from scratch
        raise
    patch.status.update(plan.status)
    _report(plan, body, memo)


@kopf.on.delete(*JOBS, timeout=120)
def release_job(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    memo.book.drop(f"{namespace}/{name}")
    left = memo.kube.delete_job_pods(namespace, name)
    if left:
        raise kopf.TemporaryError(f"waiting for pods {', '.join(left)} to terminate", delay=2)
    logger.info("pods deleted; the job's GPU<->SSD pair and KV space are released")


@kopf.on.event(*JOBS)
def count_job_phase(event: kopf.RawEvent, namespace: str, name: str, status: kopf.Status, memo: kopf.Memo,
                    **_: Any) -> None:
    gone = event.get("type") == "DELETED"
    memo.metrics.job_phase(f"{namespace}/{name}", None if gone else status.get("phase") or "Pending")


# ------------------------------------------------------------------------------------------------ helpers


def _admit(body: kopf.Body, patch: kopf.Patch) -> None:
    plan = reconcile.admit(_job(body), now=now())
    patch.status.update(plan.status)
    for ev in plan.events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)
    if plan.invalid:
        raise kopf.PermanentError(str(plan.invalid))


def _job(body: kopf.Body) -> reconcile.Job:
    meta = body.get("metadata", {})
    return reconcile.Job(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        spec=dict(body.get("spec") or {}),
        status=dict(body.get("status") or {}),
        created=parse_time(meta.get("creationTimestamp")) or now(),
        generation=meta.get("generation"),
    )


def _pods(kube: Kube, job: reconcile.Job, pod_index: kopf.Index) -> dict[str, PodView]:
    """This job's pods (this incarnation's: owned by its uid); the current one read directly if not indexed yet."""
    store = pod_index.get((job.namespace, job.name)) or []
    pods = {view.name: view for owners, view in store if job.uid in owners}
    current = job.status.get("pod")
    if job.status.get("phase") == "Running" and current and current not in pods:
        raw = kube.read_pod(job.namespace, current)
        owners = [o.get("uid") for o in (raw or {}).get("metadata", {}).get("ownerReferences") or []]
        if raw is not None and job.uid in owners:
            pods[current] = pod_view(raw)
    return pods


def _carry_out(plan: reconcile.Plan, job: reconcile.Job, memo: kopf.Memo) -> None:
    """The plan's effects on other objects; any failure leaves the job's status untouched for the next tick."""
    if plan.stage:
        memo.kube.request_model(plan.stage.node, plan.stage.entry)
    if plan.create:
        manifest = build_pod(JobRef(job.namespace, job.name, job.uid), job.parsed, plan.create.target, attempt=plan.create.attempt, default_image=memo.config.engine_image,
                             device=memo.config.engine_device)
        memo.kube.create_pod(manifest, owner_uid=job.uid)
        memo.metrics.pods.inc()
    for pod in plan.delete_pods:
        memo.kube.delete_pod(job.namespace, pod)


def _report(plan: reconcile.Plan, body: kopf.Body, memo: kopf.Memo) -> None:
    for ev in plan.events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)
    for name, value in plan.observe:
        memo.metrics.observe(name, value)
