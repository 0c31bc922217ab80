"""One reconcile step of an InferenceJob: from the job and what the cluster looks like, a Plan of what to do.

Pure: the kopf handlers gather a World (FlashNodes, other jobs' claims, this job's pods), call `step`, then
carry the Plan out (status patch, FlashNode model request, pod create/delete, events, metrics). Every value
in the status patch is absolute, derived from what was observed, so running a step twice on a stale view
writes the same thing again instead of counting twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from kubeflash_api import JobSpec, SpecError, parse_job_spec
from kubeflash_api.flashnode import ModelEntry
from kubeflash_api.inferencejob import check_cluster
from kubeflash_api.prefixes import job_fingerprints
from kubeflash_operator import status as st
from kubeflash_operator.builder import PodTarget, image_refusal, pod_name
from kubeflash_operator.config import OperatorConfig
from kubeflash_operator.pods import FATAL_IMAGE_ERRORS, STARTING, PodView
from kubeflash_operator.scheduler import Claim, ModelCopy, NodeView, NoFit, Request, ShardCopy, as_claims, place, reuse
from kubeflash_operator.timefmt import format_time, parse_time

_PLACEMENT_FIELDS = ("node", "gpu", "gpus", "disk", "modelDisk", "staged")


@dataclass(frozen=True)
class Job:
    namespace: str
    name: str
    uid: str
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    created: datetime
    generation: int | None = None
    prefixes: tuple[str, ...] | None = None  # fingerprints of prompts not in the spec (its input ConfigMap's)
    blocked: tuple[str, str] | None = None  # (reason, message naming the field): an object it needs cannot serve it

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @cached_property
    def parsed(self) -> JobSpec | SpecError:
        """The spec parsed once for this view of the job (kubeflash_api), or why it cannot run in a cluster."""
        try:
            return _tp_gpus(check_cluster(parse_job_spec(self.spec, name=self.name, namespace=self.namespace)))
        except SpecError as e:
            return e


def _tp_gpus(spec: JobSpec) -> JobSpec:
    """One rank per GPU<->SSD pair. spec.offload.tensorParallel N needs N pairs: resources.gpus left at 1 becomes N,
    another value is refused naming the field. resources.gpus N > 1 with tensorParallel at 1 (left out: the CRD
    writes the default 1, so "left out" and 1 look alike) becomes tensorParallel N, so every GPU the pod holds
    streams its own shard from its own pair's disk instead of one process using one GPU of N."""
    tp = spec.offload.tensor_parallel
    if tp == 1 and spec.resources.gpus > 1:
        return replace(spec, offload=replace(spec.offload, tensor_parallel=spec.resources.gpus))
    if tp <= 1 or spec.resources.gpus == tp:
        return spec
    if spec.resources.gpus != 1:
        raise SpecError("spec.resources.gpus", f"must be {tp} (or left out) with spec.offload.tensorParallel {tp}: "
                                               f"one GPU<->SSD pair per rank, got {spec.resources.gpus}")
    return replace(spec, resources=replace(spec.resources, gpus=tp))


@dataclass(frozen=True)
class World:
    now: datetime
    nodes: Mapping[str, NodeView]  # by node name
    claims: Iterable[Claim] = ()  # placed jobs (this one's own claim is ignored); a scheduler.Claims once built
    pods: Mapping[str, PodView] = field(default_factory=dict)  # this job's pods by name
    not_ready: frozenset[str] = frozenset()  # Nodes NotReady (condition or taint): no new jobs, no retries
    place_memo: dict[Any, Any] | None = field(default=None, compare=False)  # scheduler.place(memo=), kept across steps

    def __post_init__(self) -> None:
        object.__setattr__(self, "claims", as_claims(self.claims))

    @property
    def ready_nodes(self) -> dict[str, NodeView]:
        return {name: n for name, n in self.nodes.items() if name not in self.not_ready}


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class StageModel:
    """Add this entry to FlashNode(node).spec.models (the agent stages it)."""

    node: str
    entry: Mapping[str, str]


@dataclass(frozen=True)
class CreatePod:
    attempt: int
    target: PodTarget


@dataclass
class Plan:
    status: dict[str, Any] = field(default_factory=dict)  # merge patch for .status (None deletes a key)
    events: list[Event] = field(default_factory=list)
    stage: StageModel | None = None
    create: CreatePod | None = None
    delete_pods: list[str] = field(default_factory=list)
    claim: Claim | None = None  # a new placement, to count before the watch shows it
    release: bool = False  # the job's placement is gone
    observe: list[tuple[str, float | str]] = field(default_factory=list)  # ("scheduling", s), ("failed_attempt", reason)
    invalid: SpecError | None = None


# ------------------------------------------------------------------------------------------- entry points


def admit(job: Job, *, now: datetime) -> Plan:
    """First look at a new job: Pending if its spec is valid, Failed naming the field if not."""
    plan = Plan()
    if job.status.get("phase") is not None:
        return plan
    if isinstance(job.parsed, SpecError):
        e = plan.invalid = job.parsed
        plan.status = st.transition(job.status, st.FAILED, reason="InvalidSpec", message=str(e), now=now,
                                    generation=job.generation)
        plan.events.append(Event("Warning", "InvalidSpec", str(e)))
        return plan
    plan.status = st.transition(job.status, st.PENDING, reason="Accepted", message="waiting for a GPU<->SSD pair",
                                now=now, generation=job.generation)
    plan.events.append(Event("Normal", "Accepted", "job accepted; waiting for a GPU<->SSD pair"))
    return plan


def step(job: Job, world: World, cfg: OperatorConfig) -> Plan:
    """Advance the job as far as the world allows (a few phases at most); an empty Plan means nothing to do."""
    phase = job.status.get("phase")
    if phase in st.TERMINAL:
        return _results_refused(job, world) if phase == st.SUCCEEDED else Plan()
    if phase is None:  # a new job: admitted and, in the same step (one status write), placed as far as it goes
        plan = admit(job, now=world.now)
        if plan.invalid:
            return plan
    else:
        plan = Plan()
    spec = job.parsed
    if isinstance(spec, SpecError):
        plan.invalid = spec
        _to(plan, job, st.FAILED, world, reason="InvalidSpec", message=str(spec))
        return plan
    refused = image_refusal(spec.image, cfg.engine_image, cfg.allowed_images)  # checked before any pod exists
    if refused is not None and phase in (None, st.PENDING):
        _to(plan, job, st.FAILED, world, reason="ImageNotAllowed", message=refused)
        plan.events.append(Event("Warning", "ImageNotAllowed", refused))
        return plan
    for _ in range(4):
        view = _view(job, plan)
        before = view.get("phase")
        handler = _PHASES.get(before)
        if handler is None:
            break
        handler(plan, job, spec, view, world, cfg)
        if plan.create or _view(job, plan).get("phase") == before:
            break  # a new pod is observed on the next tick, not assumed
    return plan


# ------------------------------------------------------------------------------------------------- phases


def _pending(plan: Plan, job: Job, spec: JobSpec, view: Mapping, world: World, cfg: OperatorConfig) -> None:
    retry_at = parse_time(view.get("retryAt"))
    if retry_at and world.now < retry_at:
        return
    if job.blocked:  # e.g. its input ConfigMap is missing: no pair is taken for a pod that could not start
        reason, message = job.blocked
        cond = st.condition(view, "Scheduled") or {}
        if cond.get("reason") != reason or cond.get("message") != message:
            _set(plan, job, view, world, "Scheduled", "False", reason, message, top=True)
            plan.events.append(Event("Warning", reason, message))
        return
    request = Request(job.key, spec.model.id, gpus=spec.resources.gpus, kv_bytes=spec.resources.kv_disk,
                      prefix_cache=spec.cache.prefix, tensor_parallel=spec.offload.tensor_parallel,
                      prefixes=(job.prefixes if job.prefixes is not None else job_fingerprints(spec.input.prompts))
                      if spec.cache.prefix else ())
    own = world.claims.of(job.key)  # recorded before a crash, status not written
    nodes = world.ready_nodes
    found = reuse(own, request, nodes, now=world.now, heartbeat_timeout=cfg.heartbeat_timeout) if own else None
    found = found or place(request, nodes.values(), world.claims, now=world.now,
                           heartbeat_timeout=cfg.heartbeat_timeout, memo=world.place_memo)
    if isinstance(found, NoFit):
        cond = st.condition(view, "Scheduled") or {}
        if cond.get("reason") != "Unschedulable" or cond.get("message") != found.reason:
            _set(plan, job, view, world, "Scheduled", "False", "Unschedulable", found.reason, top=True)
            plan.events.append(Event("Warning", "Unschedulable", found.reason))
        return
    message = f"placed on {found.node}: GPU {found.gpu} <-> disk {found.disk}" + ("" if found.staged else " (model not staged)")
    first = not view.get("scheduledTime")
    _to(plan, job, st.SCHEDULED, world, reason="Placed", message=message, fields={
        "node": found.node, "gpu": found.gpu, "gpus": list(found.gpus), "disk": found.disk,
        "staged": found.staged, "modelId": spec.model.id, "scheduledTime": format_time(world.now), "retryAt": None,
    })
    plan.claim = found.claim(job.key, spec.resources.kv_disk, model_id=spec.model.id, uid=job.uid,
                             output=spec.output.config_map or "")  # the agent learns the job from the ledger alone
    plan.events.append(Event("Normal", "Scheduled", message))
    if first:
        plan.observe.append(("scheduling", (world.now - job.created).total_seconds()))


def _scheduled(plan: Plan, job: Job, spec: JobSpec, view: Mapping, world: World, cfg: OperatorConfig) -> None:
    node = _placed_node(plan, job, view, world, cfg)
    if node is None:
        return
    retry_at = parse_time(view.get("retryAt"))
    if retry_at and world.now < retry_at:
        return
    copy = _ready_copy(node, spec.model.id, view.get("disk"))
    if copy is not None and _shards(copy, spec) is not None:
        _create_pod(plan, job, spec, view, world, node, copy.disk, _shards(copy, spec))
        return
    message = f"staging {spec.model.uri} on {node.name} (disk {view.get('disk')})"
    _to(plan, job, st.STAGING, world, reason="Staging", message=message, fields={"staged": False})
    plan.events.append(Event("Normal", "Staging", message))
    _request_model(plan, spec, node, view)


def _staging(plan: Plan, job: Job, spec: JobSpec, view: Mapping, world: World, cfg: OperatorConfig) -> None:
    node = _placed_node(plan, job, view, world, cfg)
    if node is None:
        return
    copy = _ready_copy(node, spec.model.id, view.get("disk"))
    if copy is not None and _shards(copy, spec) is not None:
        placed = parse_time(view.get("scheduledTime")) or world.now
        plan.observe.append(("staging", (world.now - placed).total_seconds()))
        plan.status["stagedTime"] = format_time(world.now)
        plan.events.append(Event("Normal", "Staged", f"model {spec.model.id} is Ready on {node.name}/{copy.disk}"))
        _create_pod(plan, job, spec, _view(job, plan), world, node, copy.disk, _shards(copy, spec))
        return
    tp = spec.offload.tensor_parallel
    ready = copy
    copy = copy or node.model(spec.model.id, view.get("disk")) or node.model(spec.model.id)
    why = _shard_failure(ready, tp) if ready is not None and tp > 1 else None
    if why:
        message = f"model {spec.model.uri} failed to stage on {node.name} ({why})"
        _to(plan, job, st.FAILED, world, reason="StagingFailed", message=message)
        plan.events.append(Event("Warning", "StagingFailed", message))
        plan.release = True
        return
    if copy is not None and copy.state == "Failed":
        message = f"model {spec.model.uri} failed to stage on {node.name}: {copy.message or 'no reason given'}"
        _to(plan, job, st.FAILED, world, reason="StagingFailed", message=message)
        plan.events.append(Event("Warning", "StagingFailed", message))
        plan.release = True
        return
    if (spec.model.id not in node.desired or (copy is not None and copy.state == "Evicted")
            or (tp > 1 and node.desired_tp.get(spec.model.id, 1) != tp)):
        _request_model(plan, spec, node, view)
    progress = f"{copy.state.lower()} {copy.progress:.0f}%" if copy is not None else "requested"
    if ready is not None and tp > 1:
        shards = ready.shard_set(tp) or ()
        done = sum(sh.state == "Ready" for sh in shards)
        progress = f"model ready; shards {done}/{tp} Ready" + "".join(
            f", shard {sh.rank} {sh.state.lower()} {sh.progress:.0f}%" for sh in shards if sh.state != "Ready")
    message = f"staging {spec.model.uri} on {node.name} (disk {view.get('disk')}): {progress}"
    if (st.condition(view, "Staged") or {}).get("message") != message:
        _set(plan, job, view, world, "Staged", "False", "Staging", message, top=True)


def _running(plan: Plan, job: Job, spec: JobSpec, view: Mapping, world: World, cfg: OperatorConfig) -> None:
    name = view.get("pod") or ""
    pod = world.pods.get(name)
    node = view.get("node") or ""
    if pod is None:
        _attempt_failed(plan, job, spec, view, world, cfg, reason="PodLost", replace=True,
                        message=f"pod {name} disappeared (deleted, or its node is gone)")
    elif pod.phase == "Succeeded":
        _finish(plan, job, view, world, pod)
    elif pod.phase == "Failed":
        reason, message = pod.failure
        _attempt_failed(plan, job, spec, view, world, cfg, reason=reason, message=message)
    elif node not in world.nodes:  # no agent serves its volumes any more; the ledger holding its pair is gone too
        _attempt_failed(plan, job, spec, view, world, cfg, reason="NodeLost", delete_pod=True, replace=True,
                        message=f"FlashNode {node} is gone (its agent no longer serves the node)")
    elif node in world.not_ready:  # Kubernetes evicts its pods after their toleration (300 s by default): PodLost
        _ready(plan, job, view, world, "False", "NodeNotReady", f"pod {name}: node {node} is NotReady")
    elif pod.phase == "Running":
        _ready(plan, job, view, world, "True", "PodRunning", f"pod {name} is running on {pod.node or view.get('node')}")
    elif pod.unschedulable:
        _stuck(plan, job, spec, view, world, cfg, reason="Unschedulable", message=f"pod {name}: {pod.unschedulable}",
               since=pod.unschedulable_since or pod.created, timeout=cfg.unschedulable_timeout_s, replace=True)
    elif pod.image_error:
        reason, detail = pod.image_error
        timeout = 0.0 if reason in FATAL_IMAGE_ERRORS else cfg.image_pull_timeout_s
        _stuck(plan, job, spec, view, world, cfg, reason=reason, message=f"pod {name}: {detail or reason}",
               since=pod.created, timeout=timeout)
    elif pod.phase == "Unknown":
        _ready(plan, job, view, world, "False", "NodeUnreachable", f"pod {name}: its node stopped reporting")
    elif pod.waiting:  # its container never started: a volume that does not mount, CreateContainerError, …
        reason, detail = pod.waiting
        detail = detail or (f"{reason} (its container has not started; `kubectl -n {job.namespace} describe pod "
                            f"{name}` shows why in its events, e.g. FailedMount)")
        _stuck(plan, job, spec, view, world, cfg, reason=reason, message=f"pod {name}: {detail}",
               since=pod.started or pod.created, timeout=cfg.container_start_timeout_s, warn=reason not in STARTING)


_PHASES = {st.PENDING: _pending, st.SCHEDULED: _scheduled, st.STAGING: _staging, st.RUNNING: _running}


# ------------------------------------------------------------------------------------------------ helpers


def _placed_node(plan: Plan, job: Job, view: Mapping, world: World, cfg: OperatorConfig) -> NodeView | None:
    """The job's node if it still reports and is not cordoned; otherwise drop the placement (back to Pending) and
    say why. Only called before the attempt's pod exists: a cordon leaves running pods alone (a drain evicts them,
    which fails the attempt)."""
    node = world.ready_nodes.get(view.get("node") or "")
    if node is not None and node.usable(world.now, cfg.heartbeat_timeout) and view.get("disk") in node.disks:
        return node
    if view.get("node") in world.not_ready:
        reason = "NodeNotReady"
        message = f"node {view.get('node')} is NotReady (Ready condition or taint); placing the job again"
    elif node is not None and node.cordoned:
        reason = "NodeCordoned"
        message = f"node {view.get('node')} is cordoned (spec.unschedulable); placing the job again"
    else:
        reason = "NodeLost"
        message = f"node {view.get('node')} stopped reporting (FlashNode stale or gone); placing the job again"
    _to(plan, job, st.PENDING, world, reason=reason, message=message, fields=_unplaced())
    plan.events.append(Event("Warning", reason, message))
    plan.release = True
    return None


def _ready_copy(node: NodeView, model_id: str, disk: str | None):
    """A Ready copy of the model on this node, on the pair's disk if there is one there."""
    copy = node.model(model_id, disk)
    if copy is not None and copy.state == "Ready":
        return copy
    copy = node.model(model_id)
    return copy if copy is not None and copy.state == "Ready" else None


def _request_model(plan: Plan, spec: JobSpec, node: NodeView, view: Mapping) -> None:
    entry = ModelEntry(uri=spec.model.uri, dtype=spec.model.dtype, quantization=spec.model.quantization,
                       disk=view.get("disk") or "", tensor_parallel=spec.offload.tensor_parallel,
                       sparsity=() if spec.offload.sparsity is None else (spec.offload.sparsity,)).to_dict()  # at staging
    plan.stage = StageModel(node=node.name, entry=entry)


def _shard_failure(copy: ModelCopy, tp: int) -> str | None:
    """Why the agent cannot cut the Ready copy into `tp` shards: a Failed shard's message, or the row's message when
    it refused the cut itself (e.g. fewer pairs than ranks, so no shard is reported); None while it may still come."""
    shards = copy.shard_set(tp)
    bad = next((sh for sh in shards or () if sh.state == "Failed"), None)
    if bad is not None:
        return f"shard {bad.rank} on disk {bad.disk}: {bad.message or 'no reason given'}"
    if shards is None and copy.tensor_parallel == tp and copy.message:
        return f"tensorParallel {tp}: {copy.message}"
    return None


def _shards(copy: ModelCopy, spec: JobSpec) -> tuple[ShardCopy, ...] | None:
    """The Ready copy's shards when the job is tensor-parallel and all N are Ready (() for one rank); None: wait."""
    tp = spec.offload.tensor_parallel
    if tp <= 1:
        return ()
    shards = copy.shard_set(tp)
    return shards if shards is not None and all(sh.state == "Ready" for sh in shards) else None


def _create_pod(plan: Plan, job: Job, spec: JobSpec, view: Mapping, world: World, node: NodeView, model_disk: str,
                shards: tuple[ShardCopy, ...] = ()) -> None:
    attempt = int(view.get("attempt") or 0) + 1
    disk = node.disks[view["disk"]]
    gpus = tuple(view.get("gpus") or [view.get("gpu")])
    target = PodTarget(
        node=node.name, gpus=gpus, disk=disk.name, disk_path=disk.path,
        model_id=spec.model.id, model_disk=model_disk, model_disk_path=node.disks[model_disk].path,
        probe=tuple(sorted(node.probe(gpus[0], model_disk).items())) if gpus[0] is not None else (),
        kv_cache_budget=node.kv_cache_budget,
        shard_disks=tuple(sh.disk for sh in shards),
        kv_disks=tuple(dict(node.pairs).get(g, disk.name) for g in gpus) if shards else (),  # one per rank's pair
    )
    name = pod_name(job.name, attempt)
    message = f"pod {name} created on {node.name} (attempt {attempt} of {spec.backoff_limit + 1})"
    fields = {"attempt": attempt, "pod": name, "staged": True, "modelDisk": model_disk, "retryAt": None}
    if not view.get("startTime"):
        fields["startTime"] = format_time(world.now)
    _to(plan, job, st.RUNNING, world, reason="PodCreated", message=message, fields=fields)
    plan.create = CreatePod(attempt=attempt, target=target)
    plan.events.append(Event("Normal", "PodCreated", message))


def _refused_message(view: Mapping) -> str | None:
    """What the agent refused to read of the job's directory (status.refused: results.jsonl, progress.json, kv
    replaced by a link, a FIFO, …), for a Failed job's message; None when nothing is refused."""
    refused = {f: why for f, why in (view.get("refused") or {}).items() if why}
    if not refused:
        return None
    return ("the node agent refused the job's " + ", ".join(sorted(refused)) + " (nothing is read through what the "
            "pod planted, so its output is not trusted): " + "; ".join(refused[f] for f in sorted(refused)))


def _results_refused(job: Job, world: World) -> Plan:
    """A Succeeded job whose files the agent refused after the pod ended (a link or FIFO planted in place of
    results.jsonl, status.refused): Failed, so nobody takes the missing output for a result."""
    plan = Plan()
    message = _refused_message(job.status)
    if message:
        _to(plan, job, st.FAILED, world, reason="ResultsRefused", message=message)
        plan.events.append(Event("Warning", "ResultsRefused", message))
    return plan


def _finish(plan: Plan, job: Job, view: Mapping, world: World, pod: PodView) -> None:
    refused = _refused_message(view)
    if refused:
        attempts = _record(view, world, result="Failed", reason="ResultsRefused", message=refused)
        _to(plan, job, st.FAILED, world, reason="ResultsRefused", message=refused, fields={"attempts": attempts})
        plan.events.append(Event("Warning", "ResultsRefused", refused))
        plan.release = True
        return
    attempts = _record(view, world, result="Succeeded", reason="Completed", message=f"pod {pod.name} succeeded")
    message = f"pod {pod.name} succeeded"
    _to(plan, job, st.SUCCEEDED, world, reason="Succeeded", message=message, fields={"attempts": attempts})
    plan.events.append(Event("Normal", "Succeeded", message))
    plan.release = True


def _stuck(plan: Plan, job: Job, spec: JobSpec, view: Mapping, world: World, cfg: OperatorConfig, *, reason: str,
           message: str, since: datetime | None, timeout: float, replace: bool = False, warn: bool = True) -> None:
    """A pod that cannot start: surface it at once (a Warning unless not `warn`), fail the attempt once it has lasted
    `timeout` seconds, saying how long it waited."""
    waited = (world.now - since).total_seconds() if since is not None else 0.0
    if timeout <= 0 or (since is not None and waited >= timeout):
        if timeout > 0:
            message += f" (waited {waited:.0f} s, limit {timeout:g} s)"
        _attempt_failed(plan, job, spec, view, world, cfg, reason=reason, message=message,
                        delete_pod=True, replace=replace)
        return
    if warn and (st.condition(view, "Ready") or {}).get("reason") != reason:
        plan.events.append(Event("Warning", reason, message))
    _ready(plan, job, view, world, "False", reason, message)


def _attempt_failed(plan: Plan, job: Job, spec: JobSpec, view: Mapping, world: World, cfg: OperatorConfig, *,
                    reason: str, message: str, delete_pod: bool = False, replace: bool = False) -> None:
    attempts = _record(view, world, result="Failed", reason=reason, message=message)
    failures = sum(1 for a in attempts if a.get("result") == "Failed")
    if len(attempts) > len(view.get("attempts") or []):
        plan.observe.append(("failed_attempt", reason))
    attempt = int(view.get("attempt") or 0)
    if delete_pod and view.get("pod"):
        plan.delete_pods.append(view["pod"])
    if failures > spec.backoff_limit:
        text = f"attempt {attempt} failed ({reason}: {message}); backoffLimit {spec.backoff_limit} reached"
        _to(plan, job, st.FAILED, world, reason="BackoffLimitExceeded", message=text, fields={"attempts": attempts})
        plan.events.append(Event("Warning", "BackoffLimitExceeded", text))
        plan.release = True
        return
    delay = cfg.backoff(failures)
    text = f"attempt {attempt} failed ({reason}: {message}); retry {failures}/{spec.backoff_limit} in {delay:g}s"
    fields: dict[str, Any] = {"attempts": attempts, "retryAt": format_time(world.now + timedelta(seconds=delay))}
    node = world.ready_nodes.get(view.get("node") or "")
    if replace or node is None or not node.usable(world.now, cfg.heartbeat_timeout):
        fields.update(_unplaced())
        plan.release = True
        _to(plan, job, st.PENDING, world, reason="BackOff", message=text, fields=fields)
    else:
        _to(plan, job, st.SCHEDULED, world, reason="BackOff", message=text, fields=fields)
    plan.events.append(Event("Warning", "AttemptFailed", text))


def _record(view: Mapping, world: World, *, result: str, reason: str, message: str) -> list[dict[str, Any]]:
    """The attempts list with the current attempt's outcome (once; a second look at the same pod is a no-op)."""
    attempts = [dict(a) for a in view.get("attempts") or []]
    attempt = int(view.get("attempt") or 0)
    if not any(a.get("attempt") == attempt for a in attempts):
        attempts.append({"attempt": attempt, "pod": view.get("pod") or "", "result": result, "reason": reason,
                         "message": message, "finishedAt": format_time(world.now)})
    return attempts


def _unplaced() -> dict[str, Any]:
    return dict.fromkeys(_PLACEMENT_FIELDS)


def _ready(plan: Plan, job: Job, view: Mapping, world: World, value: str, reason: str, message: str) -> None:
    cond = st.condition(view, "Ready") or {}
    if (cond.get("status"), cond.get("reason"), cond.get("message")) != (value, reason, message):
        _set(plan, job, view, world, "Ready", value, reason, message, top=False)


def _set(plan: Plan, job: Job, view: Mapping, world: World, ctype: str, value: str, reason: str, message: str,
         *, top: bool) -> None:
    """Update one condition within the same phase; `top` also mirrors it into status.reason/message."""
    plan.status["conditions"] = st.set_condition(view.get("conditions") or [], ctype, value, reason=reason,
                                                 message=message, now=world.now, generation=job.generation)
    if top:
        plan.status.update({"reason": reason, "message": message})


def _to(plan: Plan, job: Job, phase: str, world: World, *, reason: str, message: str,
        fields: Mapping[str, Any] | None = None) -> None:
    plan.status.update(st.transition(_view(job, plan), phase, reason=reason, message=message, now=world.now,
                                     generation=job.generation, fields=fields))


def _view(job: Job, plan: Plan) -> dict[str, Any]:
    """The job's status as it will be once the plan's patch is applied."""
    merged = {**job.status, **plan.status}
    return {k: v for k, v in merged.items() if v is not None}
