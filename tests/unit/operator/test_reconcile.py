"""The reconcile step: a job walks Pending -> Scheduled -> (Staging) -> Running -> Succeeded | Failed, as Plans."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kubeflash_api import parse_job_spec
from kubeflash_operator.config import OperatorConfig
from kubeflash_operator.pods import PodView
from kubeflash_operator.reconcile import Job, World, admit, step
from kubeflash_operator.scheduler import Claim, node_view

from operator_factories import NOW, GiB, flashnode, job_spec, rfc

CFG = OperatorConfig(backoff_base_s=10, backoff_cap_s=60, unschedulable_timeout_s=120, image_pull_timeout_s=60,
                     container_start_timeout_s=90)
MODEL = parse_job_spec(job_spec(), name="j", namespace="default").model.id


def make_job(status=None, **spec_overrides) -> Job:
    return Job("ns", "j", "uid-1", job_spec(**spec_overrides), dict(status or {}), created=NOW - timedelta(seconds=3),
               generation=1)


def apply(job: Job, patch: dict) -> Job:
    """The job as the API server would hold it after a merge patch of .status."""
    merged = {**job.status, **patch}
    return Job(job.namespace, job.name, job.uid, job.spec, {k: v for k, v in merged.items() if v is not None},
               job.created, job.generation)


def world(*bodies, now=NOW, claims=(), pods=(), cordoned=()):
    views = {b["metadata"]["name"]: node_view(b, cordoned=b["metadata"]["name"] in cordoned) for b in bodies}
    return World(now=now, nodes=views, claims=tuple(claims), pods={p.name: p for p in pods})


def admitted(**spec_overrides) -> Job:
    job = make_job(**spec_overrides)
    return apply(job, admit(job, now=NOW).status)


def holder(state="Ready", **kw):
    return flashnode("n1", models=[{"id": MODEL, "disk": "nvme0", "state": state, "bytes": GiB}], **kw)


def running(job=None, now=NOW):
    """A job whose attempt-1 pod was created on n1 (model staged)."""
    job = job or admitted()
    plan = step(job, world(holder(), now=now), CFG)
    assert plan.create is not None
    return apply(job, plan.status)


def test_admit_valid_job_goes_pending():
    """A valid spec is accepted: phase Pending with an Accepted event."""
    plan = admit(make_job(), now=NOW)
    assert plan.status["phase"] == "Pending" and plan.invalid is None
    assert [e.reason for e in plan.events] == ["Accepted"]


def test_admit_invalid_job_fails_naming_the_field():
    """A malformed spec fails the job at once; the message and the event name the field path."""
    plan = admit(make_job(generation={"topP": 2}), now=NOW)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert plan.status["message"] == "spec.generation.topP must be > 0 and <= 1, got 2"
    assert plan.invalid is not None and plan.events[0].type == "Warning"


def test_admit_is_a_no_op_for_admitted_jobs():
    """Resuming a job that already has a phase changes nothing."""
    assert admit(admitted(), now=NOW).status == {}


def test_staged_model_goes_straight_to_running_with_a_pod():
    """Model Ready on the chosen SSD: one step places the job and creates pod j-1 there."""
    plan = step(admitted(), world(holder()), CFG)
    s = plan.status
    assert (s["phase"], s["node"], s["gpu"], s["disk"], s["pod"], s["attempt"]) == ("Running", "n1", 0, "nvme0", "j-1", 1)
    assert plan.create.attempt == 1 and plan.create.target.disk_path == "/mnt/nvme0/kubeflash"
    assert plan.claim == Claim("ns/j", "n1", (0,), "nvme0", 10 * GiB, model_id=MODEL, uid="uid-1")
    assert [e.reason for e in plan.events] == ["Scheduled", "PodCreated"]
    assert plan.observe == [("scheduling", 3.0)]


def test_a_sparse_job_asks_the_model_calibrated_for_its_target():
    """A job with spec.offload.sparsity asks the agent for the model with that target in the entry (calibrated while
    it is staged, docs/sparsity.md); a dense job's entry names none."""
    plan = step(admitted(offload={"sparsity": 0.5}), world(flashnode("n1")), CFG)
    assert plan.stage.entry["sparsity"] == [0.5]
    assert "sparsity" not in step(admitted(), world(flashnode("n1")), CFG).stage.entry


def test_unstaged_model_is_requested_and_job_waits_in_staging():
    """No copy anywhere: the job is placed, asks the agent for the model, and waits in Staging."""
    job = admitted()
    plan = step(job, world(flashnode("n1")), CFG)
    assert plan.status["phase"] == "Staging" and plan.create is None
    assert plan.stage.node == "n1"
    assert plan.stage.entry == {"id": MODEL, "uri": "builtin:smollm2-135m", "dtype": "float16",
                                "quantization": "none", "disk": "nvme0"}
    job = apply(job, plan.status)
    staging = holder(state="Staging", desired=[MODEL])
    plan = step(job, world(staging), CFG)
    assert plan.stage is None and plan.create is None  # already desired: nothing to ask again
    assert "staging 0%" in plan.status["conditions"][1]["message"]
    plan = step(job, world(holder(desired=[MODEL]), now=NOW + timedelta(seconds=30)), CFG)
    assert plan.status["phase"] == "Running" and plan.create.attempt == 1
    assert ("staging", 30.0) in plan.observe and plan.status["stagedTime"] == "2025-06-01T12:00:30Z"


def test_staging_failure_fails_the_job_with_the_agents_message():
    """The agent reporting Failed for the model ends the job with StagingFailed and its message."""
    job = apply(admitted(), step(admitted(), world(flashnode("n1")), CFG).status)
    failed = flashnode("n1", models=[{"id": MODEL, "disk": "nvme0", "state": "Failed", "message": "404 from hub"}],
                       desired=[MODEL])
    plan = step(job, world(failed), CFG)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "StagingFailed"
    assert "404 from hub" in plan.status["message"] and plan.release


def test_no_fit_surfaces_once_and_waits():
    """With nothing free the job stays Pending with Scheduled=False/Unschedulable; the event is not repeated."""
    job = admitted()
    busy = [Claim("ns/other", "n1", (0,), "nvme0")]
    plan = step(job, world(holder(), claims=busy), CFG)
    assert "phase" not in plan.status and plan.status["reason"] == "Unschedulable"
    assert "n1: 0 free GPU<->SSD pairs, needs 1" in plan.status["message"]
    assert [e.reason for e in plan.events] == ["Unschedulable"]
    job = apply(job, plan.status)
    assert step(job, world(holder(), claims=busy), CFG).status == {}
    assert step(job, world(holder()), CFG).status["phase"] == "Running"  # capacity freed


def test_pod_running_then_succeeded():
    """Running pod sets Ready=True; a Succeeded pod completes the job, records the attempt, frees the pair."""
    job = running()
    plan = step(job, world(holder(), pods=[PodView("j-1", phase="Running", node="n1")]), CFG)
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "PodRunning")
    job = apply(job, plan.status)
    plan = step(job, world(holder(), pods=[PodView("j-1", phase="Succeeded")]), CFG)
    assert plan.status["phase"] == "Succeeded" and plan.release
    assert plan.status["attempts"][0]["result"] == "Succeeded"


def test_refused_results_fail_the_job_at_completion_or_after():
    """status.refused naming a file of the job (the agent found a link or FIFO there): the job ends Failed with
    reason ResultsRefused and the agent's words, whether the agent said so before the pod ended or after."""
    why = "/var/lib/kubeflash/jobs/ns/j/results.jsonl: is a symlink; expected a regular file"
    job = apply(running(), {"refused": {"results.jsonl": why}})
    plan = step(job, world(holder(), pods=[PodView("j-1", phase="Succeeded")]), CFG)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "ResultsRefused" and plan.release
    assert why in plan.status["message"] and plan.status["attempts"][0]["result"] == "Failed"
    assert any(e.reason == "ResultsRefused" for e in plan.events)
    done = apply(running(), step(running(), world(holder(), pods=[PodView("j-1", phase="Succeeded")]), CFG).status)
    assert done.status["phase"] == "Succeeded"
    assert step(done, world(holder()), CFG).status == {}  # nothing refused: stays Succeeded
    late = step(apply(done, {"refused": {"results.jsonl": why}}), world(holder()), CFG)
    assert late.status["phase"] == "Failed" and late.status["reason"] == "ResultsRefused"
    progress = step(apply(done, {"refused": {"progress.json": "is a FIFO; expected a regular file"}}), world(holder()), CFG)
    assert progress.status["phase"] == "Failed" and "progress.json" in progress.status["message"]
    cleared = apply(done, {"refused": {"progress.json": None}})
    assert step(cleared, world(holder()), CFG).status == {}  # a refusal withdrawn (null) is no refusal


def failed_pod(name, exit_code=1):
    return PodView(name, phase="Failed", exit_code=exit_code, terminated_reason="Error")


def test_failed_pod_retries_with_backoff_then_fails_after_the_limit():
    """Each failure waits base*2^(n-1) on the same pair; failure backoffLimit+1 fails the job naming the reason."""
    job = running(admitted(backoffLimit=2))
    t = NOW
    for attempt, delay in ((1, 10), (2, 20)):
        plan = step(job, world(holder(), now=t, pods=[failed_pod(f"j-{attempt}")]), CFG)
        assert plan.status["phase"] == "Scheduled" and plan.status["reason"] == "BackOff"
        assert plan.status["retryAt"] == rfc(t + timedelta(seconds=delay))
        job = apply(job, plan.status)
        assert job.status["node"] == "n1"  # same pair, so a resumable engine finds its results
        assert step(job, world(holder(), now=t + timedelta(seconds=delay - 1)), CFG).status == {}  # still waiting
        t += timedelta(seconds=delay)
        plan = step(job, world(holder(), now=t), CFG)
        assert plan.create.attempt == attempt + 1 and plan.status["pod"] == f"j-{attempt + 1}"
        job = apply(job, plan.status)
    plan = step(job, world(holder(), now=t, pods=[failed_pod("j-3", exit_code=137)]), CFG)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "BackoffLimitExceeded"
    assert "exit code 137" in plan.status["message"] and "backoffLimit 2 reached" in plan.status["message"]
    assert [a["attempt"] for a in plan.status["attempts"]] == [1, 2, 3] and plan.release


def test_backoff_limit_zero_fails_on_first_failure():
    """backoffLimit 0 means no retries."""
    job = running(admitted(backoffLimit=0))
    plan = step(job, world(holder(), pods=[failed_pod("j-1")]), CFG)
    assert plan.status["phase"] == "Failed"


def test_seeing_the_same_failed_pod_twice_counts_once():
    """A stale view (status patch not yet visible) recomputes the same patch; it never double-counts."""
    job = running()
    pods = [failed_pod("j-1")]
    first = step(job, world(holder(), pods=pods), CFG)
    again = step(job, world(holder(), pods=pods), CFG)
    assert first.status["attempts"] == again.status["attempts"] and len(first.status["attempts"]) == 1
    assert ("failed_attempt", "Error") in first.observe


def test_evicted_pod_reason_is_kept():
    """A pod-level reason such as Evicted is what the attempt records."""
    job = running()
    pod = PodView("j-1", phase="Failed", reason="Evicted", message="node low on ephemeral storage")
    plan = step(job, world(holder(), pods=[pod]), CFG)
    assert plan.status["attempts"][0]["reason"] == "Evicted"
    assert "node low on ephemeral storage" in plan.status["message"]


def test_vanished_pod_is_a_failed_attempt_and_placement_is_dropped():
    """A pod that is gone (deleted, node removed) fails the attempt and the job is placed anew."""
    job = running()
    plan = step(job, world(holder()), CFG)
    assert plan.status["phase"] == "Pending" and plan.status["node"] is None and plan.release
    assert plan.status["attempts"][0]["reason"] == "PodLost"


def test_image_pull_error_is_surfaced_then_fails_the_attempt():
    """ImagePullBackOff shows at once on Ready (with a Warning); after the timeout the pod is deleted and retried."""
    job = running()
    pod = PodView("j-1", waiting=("ImagePullBackOff", "Back-off pulling image \"nope\""), created=NOW)
    plan = step(job, world(holder(), pods=[pod]), CFG)
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ImagePullBackOff") and "nope" in ready["message"]
    assert [e.type for e in plan.events] == ["Warning"]
    job = apply(job, plan.status)
    assert step(job, world(holder(), pods=[pod], now=NOW + timedelta(seconds=30)), CFG).status == {}
    plan = step(job, world(holder(), pods=[pod], now=NOW + timedelta(seconds=61)), CFG)
    assert plan.delete_pods == ["j-1"] and plan.status["phase"] == "Scheduled"
    assert plan.status["attempts"][0]["reason"] == "ImagePullBackOff"


def test_invalid_image_name_fails_the_attempt_at_once():
    """InvalidImageName cannot heal: the attempt fails without waiting."""
    job = running()
    plan = step(job, world(holder(), pods=[PodView("j-1", waiting=("InvalidImageName", "bad"), created=NOW)]), CFG)
    assert plan.status["attempts"][0]["reason"] == "InvalidImageName" and plan.delete_pods == ["j-1"]


def test_container_that_never_starts_times_out_from_the_kubelets_start_time():
    """ContainerCreating (a volume that keeps failing to mount) names the reason on Ready at once (no Warning: every
    pod starts that way), writes nothing more while it waits, and fails the attempt 90 s after the kubelet took the
    pod (status.startTime, not the pod's creation nor the first step that saw it), saying how long it waited."""
    job = running()
    started = NOW + timedelta(seconds=20)  # bound and taken by its kubelet 20 s after the create
    pod = PodView("j-1", waiting=("ContainerCreating", ""), created=NOW, started=started)
    plan = step(job, world(holder(), pods=[pod], now=started + timedelta(seconds=2)), CFG)
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ContainerCreating") and plan.events == []
    assert "kubectl -n ns describe pod j-1" in ready["message"] and "FailedMount" in ready["message"]
    job = apply(job, plan.status)
    for later in (30, 89):
        plan = step(job, world(holder(), pods=[pod], now=started + timedelta(seconds=later)), CFG)
        assert (plan.status, plan.events, plan.delete_pods) == ({}, [], [])
    plan = step(job, world(holder(), pods=[pod], now=started + timedelta(seconds=90)), CFG)
    assert plan.delete_pods == ["j-1"] and plan.status["phase"] == "Scheduled" and plan.status["retryAt"]
    attempt = plan.status["attempts"][0]
    assert attempt["reason"] == "ContainerCreating" and attempt["message"].endswith("(waited 90 s, limit 90 s)")
    assert "attempt 1 failed (ContainerCreating: pod j-1: ContainerCreating (its container has not started" in \
        plan.status["message"]


@pytest.mark.parametrize("reason", ["CreateContainerError", "CreateContainerConfigError"])
def test_container_create_errors_warn_at_once_then_fail_the_attempt(reason):
    """A create error shows on Ready with its message and one Warning; without a start time the pod's creation
    counts; after the timeout the pod is deleted and backoffLimit 0 fails the job with the reason and the wait."""
    job = running(admitted(backoffLimit=0))
    pod = PodView("j-1", waiting=(reason, "failed to prepare subPath for volumeMount \"kv\""), created=NOW)
    plan = step(job, world(holder(), pods=[pod], now=NOW + timedelta(seconds=5)), CFG)
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], ready["message"]) == (reason, 'pod j-1: failed to prepare subPath for volumeMount "kv"')
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", reason)]
    job = apply(job, plan.status)
    assert step(job, world(holder(), pods=[pod], now=NOW + timedelta(seconds=60)), CFG).events == []
    plan = step(job, world(holder(), pods=[pod], now=NOW + timedelta(seconds=95)), CFG)
    assert plan.delete_pods == ["j-1"] and plan.release
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert f'({reason}: pod j-1: failed to prepare subPath for volumeMount "kv" (waited 95 s, limit 90 s))' in \
        plan.status["message"]


def test_unschedulable_pod_times_out_and_is_placed_again():
    """A pod the scheduler cannot fit is surfaced; after the timeout the job is re-placed (Pending) and retried."""
    job = running()
    since = NOW
    pod = PodView("j-1", unschedulable="0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                  unschedulable_since=since, created=since)
    plan = step(job, world(holder(), pods=[pod], now=since + timedelta(seconds=5)), CFG)
    assert next(c for c in plan.status["conditions"] if c["type"] == "Ready")["reason"] == "Unschedulable"
    job = apply(job, plan.status)
    plan = step(job, world(holder(), pods=[pod], now=since + timedelta(seconds=121)), CFG)
    assert plan.status["phase"] == "Pending" and plan.delete_pods == ["j-1"] and plan.release
    assert "Insufficient nvidia.com/gpu" in plan.status["message"]


def test_node_lost_before_the_pod_sends_the_job_back_to_pending():
    """A placed job whose FlashNode went stale is placed again instead of waiting forever."""
    job = apply(admitted(), step(admitted(), world(flashnode("n1")), CFG).status)  # Staging on n1
    plan = step(job, world(flashnode("n1", heartbeat_age=900), flashnode("n2")), CFG)
    assert (plan.status["phase"], plan.status["node"]) == ("Staging", "n2")
    assert plan.stage.node == "n2"
    assert [e.reason for e in plan.events][:2] == ["NodeLost", "Scheduled"]


def test_cordoned_model_holder_is_skipped_and_the_job_stages_elsewhere():
    """The only node holding the model is cordoned: the job is placed on the other node and stages there."""
    plan = step(admitted(), world(holder(), flashnode("n2"), cordoned={"n1"}), CFG)
    assert (plan.status["phase"], plan.status["node"]) == ("Staging", "n2") and plan.stage.node == "n2"


def test_cordoned_everywhere_waits_pending():
    """Nothing but a cordoned node: the job waits (Pending, Unschedulable) and runs once it is uncordoned."""
    job = admitted()
    plan = step(job, world(holder(), cordoned={"n1"}), CFG)
    assert "phase" not in plan.status and plan.status["reason"] == "Unschedulable"
    assert "n1: node cordoned" in plan.status["message"]
    job = apply(job, plan.status)
    assert step(job, world(holder()), CFG).status["phase"] == "Running"


def test_cordon_before_the_pod_exists_places_the_job_again():
    """A job placed (Staging) on a node that is then cordoned goes elsewhere instead of making a pod there."""
    job = apply(admitted(), step(admitted(), world(flashnode("n1")), CFG).status)  # Staging on n1
    plan = step(job, world(flashnode("n1"), flashnode("n2"), cordoned={"n1"}), CFG)
    assert (plan.status["phase"], plan.status["node"]) == ("Staging", "n2") and plan.create is None
    assert [e.reason for e in plan.events][:2] == ["NodeCordoned", "Scheduled"]


def test_cordon_leaves_a_running_pod_alone():
    """Cordoning does not evict: a running attempt on a cordoned node keeps running."""
    job = running()
    plan = step(job, world(holder(), pods=[PodView("j-1", phase="Running", node="n1")], cordoned={"n1"}), CFG)
    assert "phase" not in plan.status and not plan.delete_pods and not plan.release


def test_retry_after_a_failure_on_a_cordoned_node_goes_elsewhere():
    """A failed attempt normally retries on the same pair; on a cordoned node the job is placed again."""
    job = running()
    plan = step(job, world(holder(), flashnode("n2"), pods=[failed_pod("j-1")], cordoned={"n1"}), CFG)
    assert plan.status["phase"] == "Pending" and plan.status["node"] is None and plan.release
    job = apply(job, plan.status)
    plan = step(job, world(holder(), flashnode("n2"), now=NOW + timedelta(seconds=10), cordoned={"n1"}), CFG)
    assert (plan.status["phase"], plan.status["node"]) == ("Staging", "n2")


def test_terminal_jobs_are_left_alone():
    """Succeeded and Failed jobs produce empty plans."""
    for phase in ("Succeeded", "Failed"):
        assert step(make_job({"phase": phase}), world(holder()), CFG).status == {}


def test_new_job_is_admitted_and_placed_in_one_step():
    """A job without a phase is admitted, placed and given its pod in one step: one status write, one claim."""
    plan = step(make_job(), world(holder()), CFG)
    assert plan.status["phase"] == "Running" and plan.create is not None
    assert plan.claim == Claim("ns/j", "n1", (0,), "nvme0", 10 * GiB, model_id=MODEL, uid="uid-1")
    assert [e.reason for e in plan.events] == ["Accepted", "Scheduled", "PodCreated"]


def test_new_invalid_job_fails_without_a_claim():
    """A bad spec on a new job: Failed naming the field, nothing placed."""
    plan = step(make_job(generation={"maxNewTokens": -1}), world(holder()), CFG)
    assert plan.status["phase"] == "Failed" and plan.invalid is not None and plan.claim is None
    assert "spec.generation.maxNewTokens" in plan.status["message"]


def test_own_recorded_claim_is_reused_after_a_restart():
    """The ledger says this job holds GPU 1 (recorded, then the operator died before the status write): the job
    keeps that pair even though GPU 0 would score the same, so no entry is left behind."""
    body = flashnode("n1", pairs=((0, "nvme0"), (1, "nvme1")),
                     models=[{"id": MODEL, "disk": "nvme0", "state": "Ready", "bytes": GiB}])
    own = Claim("ns/j", "n1", (1,), "nvme1", 10 * GiB)
    plan = step(admitted(), world(body, claims=[own]), CFG)
    assert plan.claim.hold == own.hold and plan.status["gpu"] == 1


def test_pod_target_carries_the_agents_probe():
    """The agent's measured disk read/write and host->GPU rates of the placed pair travel to the pod (for
    spec.offload.policy auto); values the agent has not measured are left out."""
    body = holder()
    body["status"]["disks"][0]["writeGBps"] = 2.5
    body["status"]["gpus"][0]["h2dGBps"] = 51.0
    plan = step(admitted(), world(body), CFG)
    assert dict(plan.create.target.probe) == {"diskReadGBps": 7.0, "diskWriteGBps": 2.5, "h2dGBps": 51.0}
    plan = step(admitted(), world(holder(read=(0.0,))), CFG)  # the agent's probe skipped: nothing measured
    assert plan.create.target.probe == ()


def test_prefix_cache_job_is_placed_where_its_inline_prompts_prefix_is_cached():
    """A job with spec.cache.prefix and inline prompts carries their fingerprints into placement: of two nodes
    holding the model, it runs on the one whose node cache lists its prompts' prefix (FlashNode
    status.kvCache.entries[].prefixes), not on the faster one."""
    from kubeflash_api.prefixes import job_fingerprints

    doc = "Section 1. The parties agree as follows. " * 120
    spec = {"input": {"prompts": [doc + "Who agrees?", doc + "On what?"]}, "cache": {"prefix": True}}
    job = admitted(**spec)
    fps = job_fingerprints(parse_job_spec(job.spec, name="j", namespace="ns").input.prompts)
    assert fps  # 4,920 bytes: the 1 and 4 KiB levels

    def node(name, read, prefixes):
        body = flashnode(name, read=(read,), models=[{"id": MODEL, "disk": "nvme0", "state": "Ready", "bytes": GiB}])
        body["status"]["kvCache"] = {"budgetBytes": 8 * GiB, "entries": [
            {"disk": "nvme0", "namespace": "ns", "modelId": MODEL, "blocks": 3, "prefixes": prefixes}]}
        return body

    plan = step(job, world(node("fast", 14.0, []), node("cached", 2.0, list(fps))), CFG)
    assert plan.status["node"] == "cached"
    plain = admitted(input=spec["input"])  # no spec.cache.prefix: bandwidth decides
    assert step(plain, world(node("fast", 14.0, []), node("cached", 2.0, list(fps))), CFG).status["node"] == "fast"
