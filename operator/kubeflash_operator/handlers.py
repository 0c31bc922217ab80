"""kopf handlers: thin glue between watch events and the pure reconcile step.

Indices keep FlashNodes (view + claims ledger), cordoned Nodes and engine pods in memory; a coroutine per live
InferenceJob (woken by its own and its pods' events) gathers them into a World, asks `reconcile.step` for a Plan
and carries it out: the claim first (a conditional write of the node's ledger, bookkeeping.py), then the
FlashNode model request and pod create/delete, then the status (a conditional write), events and metrics.
Everything runs on kopf's event loop (blocking API calls go to a thread), so no handler reads an index while it
changes. The `kubeflash.io/release-kv` finalizer deletes a job's pods and its ledger entry before the job goes
away (and a job seen gone never keeps a ledger entry).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import kopf

from kubeflash_api import SpecError
from kubeflash_operator import heap, kopfpatch, reconcile, shards
from kubeflash_operator.bookkeeping import (
    ClaimBook,
    NodeRecord,
    Release,
    apply_changes,
    apply_ended,
    ended_annotation,
    ledger_annotation,
    node_record,
    record_for,
    stale_entries,
)
from kubeflash_operator.builder import JOB_LABEL, JobRef, build_pod, pod_name
from kubeflash_operator.config import OperatorConfig
from kubeflash_operator.kube import Conflict, Gone, Kube, connection_info
from kubeflash_operator.metrics import Metrics
from kubeflash_operator.pods import PodView, pod_view
from kubeflash_operator.scheduler import Claim, Claims, claim_of
from kubeflash_operator.status import RUNNING, TERMINAL
from kubeflash_operator.timefmt import now, parse_time

JOBS = ("kubeflash.io", "v1alpha1", "inferencejobs")
FLASHNODES = ("kubeflash.io", "v1alpha1", "flashnodes")
FINALIZER = "kubeflash.io/release-kv"
PROGRESS_PREFIX = "kopf.kubeflash.io"  # the finalizer's retry state, while a deleted job waits for its pods
TICK_S = 2.0  # a job not Running yet is looked at this often (a freed pair or a staged model shows up then)
RUNNING_TICK_S = 600.0  # a job whose pod runs: looked at this often, besides whenever its pod, the job, a FlashNode's
# presence or a Node's state changes (each wakes it: nothing in a running job's step waits on the clock); a safety
# net only: 5,000 running jobs at 30 s were 167 steps a second, 5 % of a core with nothing happening
ERROR_DELAY_S = 5.0  # after an unexpected error in a step
STALE_S = 10.0  # how long a tick skips the job view our last status patch was decided on, when the patch's answer
# gave no resourceVersion to compare with (views older than that version are skipped until the watch catches up)
DELETE_POLL_S = 0.2  # a deleted job's finalizer looks at the pod index this often for its terminating pods ...
DELETE_WAIT_S = 60.0  # ... for this long before it lets kopf retry (a progress write per retry) instead
API_THREADS = 32  # threads for blocking API calls (and the client's connection pool: kube.POOL_SIZE)
LEDGER_GATHER_S = 0.05  # a FlashNode's first ledger change waits this long for others to go in the same write
LEDGER_RETRIES = 5  # conditional ledger writes tried (each after a fresh read) before the tick gives up
CONFLICT_DELAY_S = 0.5  # a tick whose decision was void (409) looks again this soon
CANCEL_AFTER_S = 1.0  # a stopped job coroutine (job deleted or ended) exits by itself (it is woken at once); kopf
# cancels it only after this long (0.1 s was too short for a loop busy with a 5,000-job delete-collection: ~1,000
# "Daemon 'run_job' is cancelled. Will escalate." warnings, one per job cancelled mid-step)
ORPHAN_SWEEP_S = 60.0  # how often recorded claims are checked for jobs that are gone (_orphans; no call if none)
GONE_KEEP_S = 60.0  # a deleted job's uid is remembered this long (a step's claim write that lands after its DELETED)
FINALIZER_WAIT_S = 10.0  # a new job's first step waits this long at most for kopf's finalizer patch to come back
_ROUTINE = ("Handler 'count_job_phase' succeeded.", "Handler 'flashnode_gone' succeeded.",
            # a deleted job: release_job's own line says what happened; kopf's three more were 6 % of the
            # operator's CPU in a 500-job delete-collection (py-spy)
            "Handler 'release_job' succeeded.", "Deletion is processed: 1 succeeded; 0 failed.",
            "Daemon 'run_job' succeeded.")


class _QuietRoutine(logging.Filter):
    """Drop kopf's success lines of the per-event handlers (one per job or FlashNode event); failures and real
    news still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in _ROUTINE


# ------------------------------------------------------------------------------------------------ startup


class _NoDiffBase(kopf.DiffBaseStorage):
    """Keeps no last-handled-configuration: the operator has no create/update handlers, only a timer and the
    deletion finalizer, so that annotation (one write per job) would serve nothing."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> None:
        return None

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


def tune(settings: kopf.OperatorSettings) -> None:
    """kopf's settings, each on purpose (docs/operator.md, "kopf settings", says why)."""
    settings.persistence.finalizer = FINALIZER
    kopfpatch.install()  # kopf's finalizer add/remove diffed over the finalizer list, not the whole job
    # a "kopf." prefix: kopf adds no kopf-managed marker annotation (one write per deleted job) next to it
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PROGRESS_PREFIX)
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.posting.level = logging.WARNING  # only our explicit Normal events and real warnings become Events
    settings.posting.loggers = False
    settings.background.cancellation_polling = 0.5  # a timer still running when its job is deleted: poll often
    settings.background.instant_exit_timeout = 0.5  # ... after giving it this long to exit by itself
    settings.watching.server_timeout = 300  # the API server ends each watch after 5 min; kopf re-lists from there
    settings.watching.client_timeout = 330  # ... and a watch that stalls silently is dropped shortly after
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30  # kopf's own calls (patches, events) never hang a worker for 5 min
    settings.networking.connect_timeout = 10
    settings.queueing.idle_timeout = 10  # an object's worker outlives a burst of its events (no task churn per
    # event), but not much longer: an idle worker keeps its last event (a pod's body) in memory
    settings.posting.idle_timeout = 10


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    cfg = memo.get("config") or OperatorConfig.from_env()
    memo.config = cfg
    tune(settings)
    # the blocking client's calls (pods, FlashNode writes) run here; the default pool (cores + 4) queues a burst
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api"))
    objects = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _QuietRoutine) for f in objects.filters):
        objects.addFilter(_QuietRoutine())
    memo.kube = Kube.connect(timeout_s=cfg.api_timeout_s)
    memo.book = ClaimBook()
    memo.sent = {}  # job uid -> (resourceVersion our last status patch was based on, the one it made, when)
    memo.wakeups = {}  # job uid -> the asyncio.Event that wakes its coroutine
    memo.node_states = {}  # Node name -> "cordoned" / "NotReady" / None, as node_index last saw it
    memo.metrics = Metrics()
    memo.trimmer = asyncio.create_task(_trim_heap())
    memo.orphan_sweep = asyncio.create_task(_sweep_orphans(memo))
    memo.first_seen = {}  # new job's uid -> (newest resourceVersion, generation, kopf's finalizer on it)
    kopfpatch.on_patched("first_seen", _finalizer_answered(memo))
    if cfg.metrics_port:
        memo.metrics.serve(cfg.metrics_port)
    logger.info("kubeflash operator configured: %s", cfg)


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """Same credentials as the operator's own client (kopf's default login misses a late $KUBECONFIG)."""
    return kopf.ConnectionInfo(**connection_info(), trust_env=settings.networking.trust_env)


async def _trim_heap() -> None:
    """Freed heap pages go back to the system every heap.TRIM_EVERY_S (a burst's memory, once it is freed)."""
    while True:
        await asyncio.sleep(heap.TRIM_EVERY_S)
        await asyncio.to_thread(heap.trim)


@kopf.on.cleanup()
def shutdown(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("trimmer"):
        memo.trimmer.cancel()
    if memo.get("orphan_sweep"):
        memo.orphan_sweep.cancel()
    if memo.get("metrics"):
        memo.metrics.close()


@kopf.on.probe(id="jobs")
def probe_jobs(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    return memo.metrics.phase_counts()


# ------------------------------------------------------------------------------------------------ indices
# Async, so kopf runs them on its event loop: the indices change only there, and the (async) handlers that read
# them run there too; nothing iterates an index from another thread.


@kopf.index(*FLASHNODES)
async def flashnode_index(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> dict[str, NodeRecord]:
    rec = node_record(body)
    if "book" in memo:  # the book's copy changes now (kopf's index a few awaits later): steps read the book's
        memo.book.watch(rec)
    return {name: rec}


@kopf.on.event(*FLASHNODES)
async def flashnode_gone(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A deleted FlashNode: every job looks now (those placed there are placed again)."""
    if event.get("type") == "DELETED":
        if "book" in memo:
            memo.book.unwatch(event.get("object", {}).get("metadata", {}).get("name", ""))
        _wake(memo, list(memo.get("wakeups", {})))


@kopf.index("v1", "nodes")
async def node_index(name: str, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo, **_: Any) -> dict[str, str]:
    """Nodes that take no new jobs or retries, by name: "cordoned" (spec.unschedulable: kubectl cordon/drain) or
    "NotReady" (condition Ready not True, or the node lifecycle controller's not-ready/unreachable taint)."""
    state = "cordoned" if spec.get("unschedulable") else "NotReady" if not_ready(spec, status) else None
    states = memo.setdefault("node_states", {})
    if states.get(name) != state:  # rare: every job looks now (those placed there react)
        states[name] = state
        if "book" in memo:
            memo.book.changed()
        _wake(memo, list(memo.get("wakeups", {})))
    return {name: state} if state else {}  # {} drops a node that is fine again


_NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def not_ready(spec: Any, status: Any) -> bool:
    """A Node whose Ready condition is not True, or that carries a not-ready/unreachable taint."""
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    tainted = any(t.get("key") in _NOT_READY_TAINTS for t in spec.get("taints") or [])
    return tainted or (ready is not None and ready.get("status") != "True")


@kopf.index(*JOBS, labels={shards.PARENT_LABEL: kopf.PRESENT})
async def shard_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
    """Shard jobs by their parent's uid, as the little `shards.aggregate` reads: a parent's tick sums its shards
    from memory instead of listing them all (each with the parent's whole spec) from the API."""
    return {parent: shards.shard_view(body) for parent in shards.owner_uids(body)}


@kopf.index("pods", labels={JOB_LABEL: kopf.PRESENT})
async def pod_index(body: kopf.Body, namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any
                    ) -> dict[tuple[str, str], Any]:
    meta = body.get("metadata", {})
    owners = tuple(o.get("uid") for o in meta.get("ownerReferences") or [])
    key, view, pod_uid = (namespace, labels[JOB_LABEL]), pod_view(body), meta.get("uid", "")
    seen = memo.setdefault("pod_seen", {}).setdefault(key, {})
    if seen.get(pod_uid) != (owners, view):  # the owning job's coroutine looks at the change now (a pod event
        seen[pod_uid] = (owners, view)  # that changes nothing it reads, e.g. the scheduler's binding, wakes none)
        _wake(memo, owners)
    return {key: (owners, view, pod_uid)}


# ------------------------------------------------------------------------------------------ job lifecycle


def _live(status: kopf.Status, **_: Any) -> bool:
    """A job that still needs steps: not ended, or Succeeded while the agent reports its results refused
    (status.refused, relayed after the pod ended): one more step fails it (reconcile.step)."""
    phase = status.get("phase")
    return phase not in TERMINAL or (phase == "Succeeded" and any((status.get("refused") or {}).values()))


@kopf.daemon(*JOBS, when=_live, cancellation_timeout=CANCEL_AFTER_S, initial_delay=None)
async def run_job(body: kopf.Body, uid: str, memo: kopf.Memo, logger: logging.Logger, flashnode_index: kopf.Index,
                  pod_index: kopf.Index, node_index: kopf.Index, shard_index: kopf.Index, stopped: kopf.DaemonStopped,
                  **_: Any) -> None:
    """One coroutine per live job: a reconcile step now, then again when woken (a change of the job or of one of
    its pods) or after TICK_S (not Running yet: waiting for a pair, a model, a backoff) or RUNNING_TICK_S (Running:
    its pod's events wake it; the tick is a safety net). A sleeping job costs no CPU, so thousands idle cheaply.
    kopf stops it (sets `stopped`, then cancels after CANCEL_AFTER_S) when the job ends or is deleted; a job
    marked for deletion or gone is never acted on again, even by a coroutine whose cancellation came late (a
    loaded event loop: kopf then leaves it orphaned, and `stopped` ends it)."""
    wake = memo.wakeups.setdefault(uid, asyncio.Event())
    on_stop = asyncio.create_task(_wake_when(stopped, wake))  # stopped (job deleted or ended): exit now, so kopf
    try:  # need not wait for its cancellation (deletion goes on as soon as the finalizer handler is done)
        while not stopped and not _deleting(body):
            wake.clear()
            delay = TICK_S
            try:
                delay = await reconcile_job(body, memo, flashnode_index, pod_index, node_index, shard_index)
                if delay is None:
                    return  # the job is gone
            except kopf.TemporaryError as e:
                logger.info("will look again in %ss: %s", e.delay, e)
                delay = e.delay or TICK_S
            except Exception:  # noqa: BLE001 - logged with its traceback; the job is looked at again later
                logger.exception("reconcile step failed; retrying in %ss", ERROR_DELAY_S)
                delay = ERROR_DELAY_S
            timer = asyncio.get_running_loop().call_later(delay, wake.set)  # no task per wait (wait_for's):
            try:  # a sleeping job is its coroutine and this handle
                await wake.wait()
            finally:
                timer.cancel()
    finally:
        on_stop.cancel()
        if memo.wakeups.get(uid) is wake:
            del memo.wakeups[uid]


async def _wake_when(stopped: kopf.DaemonStopped, wake: asyncio.Event) -> None:
    await stopped.wait()
    wake.set()


def _before(version: str | None, sent: tuple[str, str, float]) -> bool:
    """The view at `version` is the one our last status patch was decided on, or older than what that patch wrote
    (e.g. kopf's finalizer patch coming back after our status write)."""
    base, written, when = sent
    try:  # older than our write: however late the watch is (2,000 jobs at load 9: well past STALE_S)
        if written and int(version or 0) < int(written):
            return True
    except ValueError:
        pass
    return version == base and time.monotonic() - when < STALE_S


def _deleting(body: kopf.Body) -> bool:
    """The job is marked for deletion (kopf's live view): its finalizer owns it now."""
    return bool(body.get("metadata", {}).get("deletionTimestamp"))


async def reconcile_job(body: kopf.Body, memo: kopf.Memo, flashnode_index: kopf.Index, pod_index: kopf.Index,
                        node_index: kopf.Index, shard_index: kopf.Index | None = None) -> float | None:
    """Admit, place, stage, run and watch one job (a new job is admitted and placed in its first step); returns
    how long to sleep unless woken, None once the job is gone."""
    job = _job(body)
    parsed = memo.setdefault("parsed", {})
    cached = parsed.get(job.uid)
    if cached is not None and cached[0] == job.generation and job.generation is not None:
        job.__dict__["parsed"] = cached[1]  # Job.parsed is a cached_property: the spec is parsed once per generation
    else:
        parsed[job.uid] = (job.generation, job.parsed)
    blocked = await _objects_blocking(memo, job)  # a blocked job is not placed: its prefixes are not read
    prefixes = await _input_prefixes(memo, job) if blocked is None else None
    if prefixes is not None or blocked is not None:
        spec = job.parsed
        job = replace(job, prefixes=prefixes, blocked=blocked)
        job.__dict__["parsed"] = spec
    meta = body.get("metadata", {})
    version = meta.get("resourceVersion")
    early = False  # kopf's finalizer patch is on its way (its answer or its event wakes us): a status decided
    # before it lands meets a 409, here or in kopf's own patch (it tests the resourceVersion), and a pod must not
    # exist for a job that could vanish without the finalizer; the pair is claimed meanwhile (see below)
    if not job.status and (now() - job.created).total_seconds() < FINALIZER_WAIT_S:
        seen = memo.setdefault("first_seen", {}).get(job.uid)
        early = seen is None or not seen[2]
    sent = memo.sent.get(job.uid)
    if sent and _before(version, sent):
        return TICK_S  # our last status patch is not back from the watch yet: this view is older than what we wrote
    if not isinstance(job.parsed, SpecError) and job.parsed.parallelism > 1:  # never placed itself (shards.py)
        if early or (not job.status and FINALIZER not in (meta.get("finalizers") or []) and (
                now() - job.created).total_seconds() < FINALIZER_WAIT_S):
            return TICK_S  # its status write goes on this view's version: one with the finalizer (its event wakes us)
        return await _shard_parent(job, version, memo, shard_index)
    if early and (job.uid in memo.get("gone", {}) or _deleting(body)):
        return TICK_S
    pods = await _pods(memo.kube, job, pod_index, fresh=bool(sent) and time.monotonic() - sent[2] < STALE_S)
    if pods is None:
        return TICK_S  # the pod we just created is not indexed yet: its event wakes us (no read of it meanwhile)
    if _deleting(body):
        return TICK_S
    current = pods.get(job.status.get("pod") or "")
    steady = job.status.get("phase") == "Running" and current is not None and current.phase == "Running"
    idle = RUNNING_TICK_S if steady else TICK_S  # a pod not running yet has timeouts (unschedulable, image pull)
    # every claim (all ledgers merged) only where a step may place: a job whose pod runs needs none, unless a
    # failure there could send it to placement in this same step (no retry delay configured)
    _, nodes, unready, claims = _placement_view(memo.book, memo.node_states,
                                                claims=not (steady and memo.config.backoff(1) > 0))
    world = reconcile.World(now=now(), nodes=nodes, claims=claims, pods=pods, not_ready=unready,
                            place_memo=memo.book.place_memo)
    plan = reconcile.step(job, world, memo.config)
    # From here on the plan is carried out; no other placement ran since `claims` was read (no await in between).
    if early:
        # Before kopf's finalizer is back only the claim goes out (its conditional ledger write overlaps kopf's
        # patch instead of following it: one API round trip less on the way to Running); the pod and the status
        # wait for the finalizer, and the next step reuses the recorded claim (reconcile: claims.of). A job deleted
        # before its finalizer landed never reaches release_job: its DELETED event releases what is recorded or
        # in flight (_release), and a claim landing after that event is taken back here.
        if plan.claim and await _record_claim(memo, plan.claim, flashnode_index) and job.uid in memo.get("gone", {}):
            await _release(memo, job.key, flashnode_index)
        return TICK_S
    if plan.claim and not await _record_claim(memo, plan.claim, flashnode_index):
        return TICK_S  # the pair went to someone else (a write we had not seen): the next tick decides again
    if _deleting(body):  # marked while the claim was written: nothing more (the finalizer releases the claim)
        return TICK_S
    if plan.release:  # the claim becomes an ended record (same write): the agent keeps the job's directory
        await _release(memo, job.key, flashnode_index, end=_view_phase(job, plan))
    elif not plan.claim and (stale := _stray_entries(memo, job.key, claim_of(body, kv_bytes=0))):
        await _release(memo, job.key, flashnode_index, stale)  # a lost decision's entry (crash, other replica)
    seen = memo.get("first_seen", {}).get(job.uid) if plan.status and not job.status else None

    def effects() -> str | None:
        """The plan's effects, then its status patch, in one thread call (one hop from and back to the event loop
        per step, not one per call: under load each hop waited 0.3 s p50, 0.9-1.8 s p99 between the pod's create
        and the status patch, audit log of bench/operator_scale.py)."""
        _carry_out(plan, job, pods, memo)
        if not plan.status:  # conditional: a decision made on a view older than the job's status now is void
            return None
        if not job.status:  # a new job's first status: on the version kopf's finalizer patch made
            return _first_status(memo, job, plan.status, seen)
        return memo.kube.patch_job_status(job.namespace, job.name, version, plan.status)

    try:
        written = await asyncio.to_thread(effects)
        if plan.status and written is None:  # the status moved on (our earlier write, not back in this view yet)
            return TICK_S
    except Conflict as e:
        stale_view = "InferenceJob" in str(e)
        memo.metrics.conflict("job" if stale_view else "pod")
        # The job changed since this view: skip the view (as after our own write) until the watch brings a newer
        # one (its event wakes us) or STALE_S passes; not a doomed patch on it every CONFLICT_DELAY_S (5,000 jobs
        # at load 9-12, the watch lagging: ~150 jobs sent one every 0.5-5 s for 2 minutes, 1,147 409s).
        if stale_view:
            memo.sent[job.uid] = (version, "", time.monotonic())
        raise kopf.TemporaryError(str(e), delay=CONFLICT_DELAY_S) from e
    except Gone:
        return None
    if plan.status:
        memo.sent[job.uid] = (version, written, time.monotonic())  # views before `written` lack this write
    _report(plan, body, memo, direct=not job.status and (plan.status or {}).get("phase") == RUNNING)
    return idle


def _first_status(memo: kopf.Memo, job: reconcile.Job, status: dict[str, Any],
                  seen: tuple[str, Any, bool] | None) -> str | None:
    """A new job's first status patch, conditional on the newest version seen with its status still empty and the
    same generation (_first_seen: the answer to kopf's finalizer patch, or the watch; kopf's finalizer patch moved
    the version, and the daemon's view can keep the older one), so no read per job; if that version is not the
    job's any more (a 409), or none with the finalizer was seen, the job is read once and the patch goes on that
    version if its status and generation are still the view's. (Patching the daemon's view without a read left
    205 of 5,000 jobs retrying a 409 every 0.5 s on the same stale view: bench/operator_scale.py --jobs 5000
    --nodes 500 at b0272ac.) None: the status moved on (the decision is void). Blocking: runs in a thread, with
    `seen` (memo.first_seen's entry for the job) read on the event loop before."""
    if seen is not None and seen[2] and seen[1] == job.generation:
        try:
            return memo.kube.patch_job_status(job.namespace, job.name, seen[0], status)
        except Conflict:
            memo.metrics.conflict("job")
    target = memo.kube.unchanged_version(job.namespace, job.name, job.status, job.generation)
    if target is None:
        return None
    return memo.kube.patch_job_status(job.namespace, job.name, target, status)


async def _shard_parent(job: reconcile.Job, version: str, memo: kopf.Memo,
                        shard_index: kopf.Index | None) -> float | None:
    """A spec.parallelism job's tick (shards.py): its missing shard jobs created (a batch per tick), their sum
    (from the shard index, no API list) written to its status."""
    began = time.monotonic()
    children = None if shard_index is None else list(shard_index.get(job.uid) or [])
    created = memo.setdefault("shards_created", {}).setdefault(job.uid, set())
    try:
        written, merging = await asyncio.to_thread(shards.sync, memo.kube, namespace=job.namespace, name=job.name,
                                                   uid=job.uid, spec=job.spec, status=job.status, version=version,
                                                   generation=job.generation, now=now(), children=children,
                                                   created=created)
        logging.getLogger(__name__).debug("shard parent %s: tick %.3f s", job.key, time.monotonic() - began)
    except Conflict as e:
        raise kopf.TemporaryError(str(e), delay=CONFLICT_DELAY_S) from e
    except Gone:
        return None
    if written:
        memo.sent[job.uid] = (version, written, time.monotonic())
    return TICK_S if merging else RUNNING_TICK_S  # a shard's change wakes it (count_job_phase)


@kopf.on.delete(*JOBS, timeout=120)
async def release_job(namespace: str, name: str, uid: str, status: kopf.Status, memo: kopf.Memo,
                      flashnode_index: kopf.Index, pod_index: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    """Delete the job's pods, wait (in memory, on the pod index) until they are gone, then free its ledger entry.

    The pods to delete come from the pod index (one delete each, with the pod's uid as precondition); only a job
    whose status names a pod the index does not show yet (created a moment ago) is listed from the API."""

    def ours() -> list[Any]:  # a same-labelled pod someone else owns is never waited for (nor deleted)
        return [(view, pod_uid) for owners, view, pod_uid in pod_index.get((namespace, name)) or [] if uid in owners]

    indexed = ours()
    if indexed or not status.get("pod"):
        left = [view.name for view, _ in indexed]
        await asyncio.gather(*(asyncio.to_thread(memo.kube.delete_exact, namespace, view.name, pod_uid)
                               for view, pod_uid in indexed if not view.deleting))
    else:
        left = await asyncio.to_thread(memo.kube.delete_job_pods, namespace, name, uid)  # still there, by the API

    if left and ours():  # the watch drops them from the index once they are gone
        await _pods_gone(memo, ours, DELETE_WAIT_S)
    if left and ours():
        names = ", ".join(view.name for view, _ in ours())
        raise kopf.TemporaryError(f"waiting for pods {names} to terminate", delay=1)
    await _release(memo, f"{namespace}/{name}", flashnode_index)
    logger.info("pods deleted; the job's GPU<->SSD pair and KV space are released")


async def _pods_gone(memo: kopf.Memo, ours: Any, timeout: float) -> None:
    """Wait until ours() (a deleted job's pods in the pod index) is empty, or `timeout`. One sweeper task looks at
    every waiting job each DELETE_POLL_S and wakes those whose pods are gone (a delete-collection of 500 jobs: one
    task waking, not 500 coroutines polling 5 times a second each)."""
    waiting = memo.setdefault("pods_gone", {})
    gone = asyncio.Event()
    waiting[gone] = ours
    if memo.get("pods_sweeper") is None or memo.pods_sweeper.done():
        memo.pods_sweeper = asyncio.create_task(_sweep_pods_gone(waiting))
    try:
        await asyncio.wait_for(gone.wait(), timeout)
    except TimeoutError:
        pass
    finally:
        waiting.pop(gone, None)


async def _sweep_pods_gone(waiting: dict[asyncio.Event, Any]) -> None:
    while waiting:
        await asyncio.sleep(DELETE_POLL_S)
        for gone, ours in list(waiting.items()):
            if not ours():
                gone.set()
                waiting.pop(gone, None)


@kopf.on.event(*JOBS)
async def count_job_phase(event: kopf.RawEvent, namespace: str, name: str, uid: str, status: kopf.Status,
                          body: kopf.Body, memo: kopf.Memo, flashnode_index: kopf.Index, **_: Any) -> None:
    gone = event.get("type") == "DELETED"
    memo.metrics.job_phase(f"{namespace}/{name}", None if gone else status.get("phase") or "Pending")
    if gone:
        memo.sent.pop(uid, None)
        memo.get("parsed", {}).pop(uid, None)
        memo.get("input_prefixes", {}).pop(uid, None)
        memo.get("objects_ok", {}).pop(uid, None)
        memo.get("shards_created", {}).pop(uid, None)
        memo.get("pod_seen", {}).pop((namespace, name), None)
        memo.get("first_seen", {}).pop(uid, None)
        gone = memo.setdefault("gone", {})  # uids seen deleted, for a step's early claim that lands after this
        gone[uid] = time.monotonic()
        if len(gone) > 256:
            for old in [u for u, t in gone.items() if time.monotonic() - t > GONE_KEEP_S]:
                del gone[old]
        # normally the finalizer released it already (then this is a no-op); not if its handler timed out or the
        # finalizer was removed by hand: a gone job never keeps a pair
        await _release(memo, f"{namespace}/{name}", flashnode_index)
    else:  # e.g. our own status write is back: the next phase can start at once; a shard's parent sums it up
        _first_seen(memo, body)
        _wake(memo, [uid, *shards.owner_uids(body)])


def _first_seen(memo: kopf.Memo, body: Any) -> None:
    """Note a new job's newest version (from its watch event, or from the answer to kopf's finalizer patch), with
    its generation and whether kopf's finalizer is on it: its first status patch goes on that version. An older
    version than the one noted (an event delivered after the patch's answer) changes nothing."""
    meta = body.get("metadata", {})
    uid, first = meta.get("uid", ""), memo.setdefault("first_seen", {})
    if body.get("status"):  # placed (or failed): its first status patch is done
        first.pop(uid, None)
        return
    version, had = meta.get("resourceVersion"), first.get(uid)
    if had is not None and _older(version, had[0]):
        return
    finalized = FINALIZER in (meta.get("finalizers") or [])
    first[uid] = (version, meta.get("generation"), finalized)
    if finalized and not (had is not None and had[2]):  # the job's first step goes on now
        _wake(memo, [uid])


def _older(version: str | None, than: str | None) -> bool:
    try:
        return int(version or 0) < int(than or 0)
    except ValueError:
        return False


def _finalizer_answered(memo: kopf.Memo) -> Any:
    """kopfpatch.on_patched hook: kopf's patch of a job (its finalizer) answered with the job."""
    def hook(plural: str, body: Any) -> None:
        if plural == JOBS[2] and "first_seen" in memo:
            _first_seen(memo, body)
    return hook


def _wake(memo: kopf.Memo, uids: Any) -> None:
    for uid in uids:
        wake = memo.get("wakeups", {}).get(uid)
        if wake is not None:
            wake.set()


# ------------------------------------------------------------------------------------------------ claims


def _placement_view(book: ClaimBook, state: dict[str, str | None], *, claims: bool = True
                    ) -> tuple[dict[str, NodeRecord], dict[str, Any], frozenset[str], Claims]:
    """(FlashNode records, node views by name, NotReady nodes, every claim) as the book and the Node states
    (node_index's handler) show them now. The first three and the recorded claims (grouped by node, each ledger's
    tuple shared: placement memoizes by it) are built once per change (book.changed(): a FlashNode event, a
    ledger write's answer, a Node's state), not once per job step; the held claims go on top (once per change of
    them). Both are updated synchronously in the handlers that see the events, so the view is never older than
    its generation; no await here: a step sees one instant's view. claims=False: the recorded claims only (a step
    that places nothing)."""
    if book.view is None or book.view[0] != book.generation:
        records = book.current(book.watched.values())
        nodes = {r.view.name: replace(r.view, cordoned=True) if state.get(r.view.name) == "cordoned" else r.view
                 for r in records.values()}
        unready = frozenset(name for name, s in state.items() if s == "NotReady")
        ledgers: dict[str, list[NodeRecord]] = {}  # node -> the records whose ledger holds claims on it
        for r in records.values():
            if r.claims:
                ledgers.setdefault(r.claims[0].node, []).append(r)
        book.view = (book.generation, (records, nodes, unready, book.claims(records, held=False), ledgers), None)
    records, nodes, unready, recorded, _ = book.view[1]
    if not claims or not book.held:
        return records, nodes, unready, recorded
    overlay = book.view[2]  # (the held claims it was built from, the claims with them on top)
    if overlay is None or len(overlay[0]) != len(book.held) or any(book.held.get(c.job) is not c for c in overlay[0]):
        overlay = (tuple(book.held.values()), recorded.with_held(book.held))
        book.view = (*book.view[:2], overlay)
    return records, nodes, unready, overlay[1]


def _stray_entries(memo: kopf.Memo, job: str, placed: Claim | None) -> list[tuple[str, Claim]]:
    """bookkeeping.stale_entries over the ledgers that may hold `job`: the one its recorded claim is in when no job
    is in two ledgers (every ledger otherwise)."""
    records, _, _, recorded = _placement_view(memo.book, memo.node_states, claims=False)
    if recorded.single:
        entry = recorded.of(job)
        if entry is None:
            return []
        records = {r.name: r for r in memo.book.view[1][4].get(entry.node, ())}
    return stale_entries(records, job, placed)


async def _record_claim(memo: kopf.Memo, claim: Claim, flashnode_index: kopf.Index) -> bool:
    """Write `claim` into its node's ledger, conditional on the FlashNode's resourceVersion; False if the pair is
    taken in the newest ledger (someone else's write came first). Held in the book while the write is in flight,
    so placements decided meanwhile already count it."""
    book = memo.book
    rec = book.record(claim.node)
    if rec is not None and rec.view.name == claim.node and rec.ledger.get(claim.job) == claim and not any(
            claim.job in queue for queue in book.pending.values()):
        return True  # recorded already (a step before kopf's finalizer was back wrote it): no write, no wait
    book.held[claim.job] = claim
    try:
        return await _update_ledger(memo, claim.node, flashnode_index, claim.job, claim)
    finally:
        book.held.pop(claim.job, None)


async def _release(memo: kopf.Memo, job: str, flashnode_index: kopf.Index | None,
                   entries: list[tuple[str, Claim]] | None = None, *, end: str = "") -> None:
    """Remove `job` from every ledger that records it (or only the given entries, each if it is still there).
    With `end` (its phase now) each claim becomes an ended record; without, its ended records go too (deleted)."""
    if entries is None:
        records = _placement_view(memo.book, memo.node_states, claims=False)[0]
        changes = [(r.view.name, Release(end=end)) for r in records.values()
                   if job in r.ledger or (not end and job in r.ended)]
        if not end:  # a claim still being written (held, or queued for its node's next write) goes too
            book = memo.book
            held = book.held.get(job)
            queued = [name for name, queue in book.pending.items() if job in queue]
            nodes = [held.node] if held is not None else []
            nodes += [rec.view.name for name in queued if (rec := book.record(name)) is not None]
            for node in nodes:
                if all(node != other for other, _ in changes):
                    changes.append((node, Release(end=end)))
    else:
        changes = [(entry.node, Release(entry)) for _, entry in entries]
    for node, change in changes:
        await _update_ledger(memo, node, flashnode_index, job, change)


async def _update_ledger(memo: kopf.Memo, node: str, flashnode_index: kopf.Index, job: str,
                         claim: Claim | Release) -> bool:
    """Set (Claim) or remove (Release) `job` in node's ledger; False if the claim's pair is taken in the newest
    ledger (or the job holds a different entry there).

    Changes to one FlashNode queue up while its write is in flight and go out together in the next write, so a
    burst onto one node costs a few writes, not one per job, and this operator never races itself for a node."""
    book = memo.book
    rec = book.record(node)
    if rec is None or rec.view.name != node:  # a FlashNode not named after its node: look among all
        rec = record_for(book.current(book.watched.values()), node)
    if rec is None:
        return isinstance(claim, Release)
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    queue = book.pending.setdefault(rec.name, {})
    if job in queue:
        queue[job][1].set_result(False)  # superseded by this newer change
    queue[job] = (claim, done)
    if rec.name not in book.writers:
        book.writers[rec.name] = asyncio.create_task(_ledger_writer(memo, rec.name, flashnode_index))
    return await done


async def _ledger_writer(memo: kopf.Memo, name: str, flashnode_index: kopf.Index) -> None:
    book = memo.book
    try:
        await asyncio.sleep(LEDGER_GATHER_S)  # the placements of a burst onto this node join the first write
        while book.pending.get(name):
            batch = book.pending.pop(name)
            try:
                results = await _write_batch(memo, name, flashnode_index, batch)
            except Exception as e:  # noqa: BLE001 - handed to every waiting handler, which fails its tick
                for _, done in batch.values():
                    if not done.done():
                        done.set_exception(e)
                continue
            for job, (_, done) in batch.items():
                if not done.done():
                    done.set_result(results[job])
    finally:
        book.writers.pop(name, None)


async def _write_batch(memo: kopf.Memo, name: str, flashnode_index: kopf.Index,
                       batch: dict[str, tuple[Claim | Release, asyncio.Future[bool]]]) -> dict[str, bool]:
    """One conditional write of FlashNode `name`'s ledger with every change in `batch` that still fits; a 409 is
    retried on a fresh read (each claim checked again against the ledger as it now is)."""
    book = memo.book
    for _ in range(LEDGER_RETRIES):
        rec = book.record(name)
        if rec is None:
            return {job: isinstance(change, Release) for job, (change, _) in batch.items()}
        changes = {job: claim for job, (claim, _) in batch.items()}
        ledger, results = apply_changes(rec.ledger, changes)
        ended = apply_ended(rec.ended, rec.ledger, changes, results)
        if ledger == rec.ledger and ended == rec.ended:
            return results
        try:  # one write carries both: the agent's view of the node's jobs costs no write of its own
            body = await asyncio.to_thread(memo.kube.write_ledger, name, rec.rv, ledger_annotation(ledger),
                                           ended_annotation(ended))
        except Conflict:
            memo.metrics.conflict("flashnode")
            fresh = await asyncio.to_thread(memo.kube.read_flashnode, name)
            if fresh is None:
                return {job: isinstance(change, Release) for job, (change, _) in batch.items()}
            book.note(fresh)
            continue
        except Gone:
            return {job: isinstance(change, Release) for job, (change, _) in batch.items()}
        book.note(body)
        return results
    raise kopf.TemporaryError(f"FlashNode {name} kept changing while its claims were written", delay=1)


async def _sweep_orphans(memo: kopf.Memo) -> None:
    """Every ORPHAN_SWEEP_S: take back the recorded claims of jobs that no longer exist (see _orphans)."""
    suspects: set[tuple[str, Claim]] = set()
    while True:
        await asyncio.sleep(ORPHAN_SWEEP_S)
        try:
            suspects = await _orphans(memo, suspects)
        except Exception:  # noqa: BLE001 - logged; the next sweep tries again
            logging.getLogger(__name__).exception("orphan claim sweep failed; next in %ss", ORPHAN_SWEEP_S)


async def _orphans(memo: kopf.Memo, suspects: set[tuple[str, Claim]]) -> set[tuple[str, Claim]]:
    """A claim whose job has no coroutine here (a live job always has one; a deleted one keeps its claim only while
    its finalizer waits for its pods, and the job is still listed then) and whose uid the job list of its namespace
    (metadata only) does not show, in two sweeps in a row, is released (exactly that entry, conditional write).
    Such a claim is left where a job was deleted while the operator was down, between a claim written before
    kopf's finalizer landed (reconcile_job's early step) and that finalizer; or where the finalizer was removed by
    hand. Two sweeps, because a job created after one list was taken is missing from it; a uid is never reused.
    Returns the suspects for the next sweep. Nothing to do, no API call: the common case."""
    records = _placement_view(memo.book, memo.node_states, claims=False)[0]
    live = memo.get("wakeups", {})
    found = {(r.view.name, c) for r in records.values() for c in r.ledger.values() if c.uid and c.uid not in live}
    if not found:
        return set()
    uids: set[str] = set()
    for namespace in sorted({c.job.partition("/")[0] for _, c in found}):
        uids |= await asyncio.to_thread(memo.kube.job_uids, namespace)
    found = {(node, c) for node, c in found if c.uid not in uids}
    for node, c in sorted(found & suspects, key=lambda e: (e[0], e[1].job)):
        logging.getLogger(__name__).warning("job %s (uid %s) is gone: its claim on %s released", c.job, c.uid, node)
        await _release(memo, c.job, None, [(node, c)])
    return found - suspects


# ------------------------------------------------------------------------------------------------ helpers


def _view_phase(job: reconcile.Job, plan: reconcile.Plan) -> str:
    """The job's phase once the plan's status is written."""
    return str(plan.status.get("phase") or job.status.get("phase") or "Pending")


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


async def _input_prefixes(memo: kopf.Memo, job: reconcile.Job) -> tuple[str, ...] | None:
    """The prefix fingerprints of a waiting job's input ConfigMap (spec.cache.prefix placement), read once per
    generation once the ConfigMap could be read; None where placement needs none (no cache.prefix, inline prompts,
    placed already)."""
    if job.status.get("phase") not in (None, "Pending") or not job.spec.get("cache", {}).get("prefix"):
        return None
    spec = job.parsed
    if isinstance(spec, SpecError) or spec.input.config_map is None:
        return None
    seen = memo.setdefault("input_prefixes", {})
    hit = seen.get(job.uid)
    if hit is None or hit[0] != job.generation:
        cm = spec.input.config_map
        read = await asyncio.to_thread(memo.kube.input_prefixes, job.namespace, cm.name, cm.key)
        if read is None:  # not readable now (created after the job, a failed read): placed without, tried again
            return ()
        hit = seen[job.uid] = (job.generation, read)
    return hit[1]


async def _objects_blocking(memo: kopf.Memo, job: reconcile.Job) -> tuple[str, str] | None:
    """Why a job not placed yet cannot start (Kube.objects_problem: its input ConfigMap or key or a claim it names
    missing, its output ConfigMap someone else's), read each step until none is found, then not again for this
    generation."""
    spec = job.parsed
    if job.status.get("phase") not in (None, "Pending") or isinstance(spec, SpecError):
        return None
    cm_in, cm_out = spec.input.config_map, spec.output.config_map
    pvcs = {f: c for f, c in (("spec.input.pvc.claimName", spec.input.pvc),
                              ("spec.output.pvc.claimName", spec.output.pvc)) if c}
    checked = memo.setdefault("objects_ok", {})
    if (cm_in is None and cm_out is None and not pvcs) or checked.get(job.uid) == job.generation:
        return None
    problem = await asyncio.to_thread(memo.kube.objects_problem, job.namespace, job=job.name, uid=job.uid,
                                      input_cm=(cm_in.name, cm_in.key) if cm_in else None, output_cm=cm_out,
                                      pvcs=pvcs)
    if problem is None:
        checked[job.uid] = job.generation
    return problem


async def _pods(kube: Kube, job: reconcile.Job, pod_index: kopf.Index, *, fresh: bool = False
                ) -> dict[str, PodView] | None:
    """This job's pods (this incarnation's: owned by its uid); the current one read directly if not indexed yet,
    unless our status write naming it is `fresh` (less than STALE_S old: the pod's create was answered just before
    it, and the pod's watch event, which wakes the job, is on its way; 165 pod reads in one 500-job burst, when
    each job's status event came back before its pod's): None then, and the step waits for that event."""
    store = pod_index.get((job.namespace, job.name)) or []
    pods = {view.name: view for owners, view, _ in store if job.uid in owners}
    current = job.status.get("pod")
    if job.status.get("phase") == "Running" and current and current not in pods and fresh:
        return None
    if job.status.get("phase") == "Running" and current and current not in pods:
        raw = await asyncio.to_thread(kube.read_pod, job.namespace, current)
        owners = [o.get("uid") for o in (raw or {}).get("metadata", {}).get("ownerReferences") or []]
        if raw is not None and job.uid in owners:
            pods[current] = pod_view(raw)
    return pods


def _carry_out(plan: reconcile.Plan, job: reconcile.Job, pods: dict[str, PodView], memo: kopf.Memo) -> None:
    """The plan's effects on other objects (blocking calls: run in a thread); any failure leaves the job's status
    untouched for the next tick."""
    if plan.stage:
        memo.kube.request_model(plan.stage.node, plan.stage.entry)
    if plan.create and pod_name(job.name, plan.create.attempt) not in pods:  # an indexed pod of ours: nothing to do
        manifest = build_pod(JobRef(job.namespace, job.name, job.uid), job.parsed, plan.create.target,
                             attempt=plan.create.attempt, default_image=memo.config.engine_image,
                             device=memo.config.engine_device, allowed_images=memo.config.allowed_images,
                             limits=memo.config.pod_limits)
        if job.parsed.output.config_map:  # created, owned by the job, before the pod: the agent only fills it in
            memo.kube.ensure_output_configmap(job.namespace, job.parsed.output.config_map, job=job.name,
                                              owner_uid=job.uid, node=plan.create.target.node)
        memo.kube.create_pod(manifest, owner_uid=job.uid)
        memo.metrics.pods.inc()
    for pod in plan.delete_pods:
        memo.kube.delete_pod(job.namespace, pod, job=job.name, owner_uid=job.uid)


def _report(plan: reconcile.Plan, body: kopf.Body, memo: kopf.Memo, *, direct: bool = False) -> None:
    """Warnings one by one; a step's Normal news (Accepted, Scheduled, PodCreated, ...) as one Event, named by the
    last, so a job that goes from new to Running in one step costs one Event write, not three; none at all for
    such a `direct` step unless the config's normal_events is "all" (its status conditions say the same)."""
    normal = [ev for ev in plan.events if ev.type == "Normal"]
    for ev in plan.events:
        if ev.type != "Normal":
            kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)
    if normal and not (direct and memo.config.normal_events == "detours"):
        kopf.event(body, type="Normal", reason=normal[-1].reason, message="; ".join(ev.message for ev in normal))
    for name, value in plan.observe:
        memo.metrics.observe(name, value)
