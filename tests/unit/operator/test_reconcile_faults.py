"""The reconcile step when nodes fail: a NotReady Node takes no jobs (those placed there without a pod go elsewhere,
a Running one says why it waits), and a job Running where the FlashNode is gone loses its attempt and moves."""

from __future__ import annotations

from datetime import timedelta

from kubeflash_api import parse_job_spec
from kubeflash_operator.config import OperatorConfig
from kubeflash_operator.pods import PodView
from kubeflash_operator.reconcile import Job, World, admit, step
from kubeflash_operator.scheduler import node_view

from operator_factories import NOW, GiB, flashnode, job_spec

CFG = OperatorConfig(backoff_base_s=10, backoff_cap_s=60)
MODEL = parse_job_spec(job_spec(), name="j", namespace="default").model.id


def _job(status=None) -> Job:
    return Job("ns", "j", "uid-1", job_spec(), dict(status or {}), created=NOW - timedelta(seconds=3), generation=1)


def _apply(job: Job, patch: dict) -> Job:
    merged = {**job.status, **patch}
    return Job(job.namespace, job.name, job.uid, job.spec, {k: v for k, v in merged.items() if v is not None},
               job.created, job.generation)


def _node(name: str):
    return flashnode(name, models=[{"id": MODEL, "disk": "nvme0", "state": "Ready", "bytes": GiB}])


def _world(*names, not_ready=(), pods=()) -> World:
    views = {n: node_view(_node(n)) for n in names}
    return World(now=NOW, nodes=views, pods={p.name: p for p in pods}, not_ready=frozenset(not_ready))


def _running_on_n1() -> Job:
    job = _job()
    job = _apply(job, admit(job, now=NOW).status)
    plan = step(job, _world("n1"), CFG)
    assert plan.status["node"] == "n1" and plan.create is not None
    return _apply(job, plan.status)


def test_not_ready_node_takes_no_new_job():
    """Two nodes hold the model; n1 (first by name) is NotReady, so the job goes to n2."""
    job = _job()
    job = _apply(job, admit(job, now=NOW).status)
    plan = step(job, _world("n1", "n2", not_ready={"n1"}), CFG)
    assert (plan.status["phase"], plan.status["node"]) == ("Running", "n2")


def test_only_not_ready_nodes_leave_the_job_pending_with_a_reason():
    """Nothing usable: the job stays Pending and its status says why."""
    job = _job()
    job = _apply(job, admit(job, now=NOW).status)
    plan = step(job, _world("n1", not_ready={"n1"}), CFG)
    assert plan.status.get("phase", job.status["phase"]) == "Pending" and plan.claim is None
    assert plan.status["reason"] == "Unschedulable" and plan.status["message"]


def test_placed_on_a_node_that_turns_not_ready_before_its_pod_is_placed_again():
    """Scheduled on n1 (model staging there), n1 goes NotReady: the placement is dropped and made on n2."""
    job = _job()
    job = _apply(job, admit(job, now=NOW).status)
    staging = _apply(job, step(job, World(now=NOW, nodes={"n1": node_view(flashnode("n1"))}), CFG).status)
    assert staging.status["phase"] == "Staging"
    plan = step(staging, _world("n1", "n2", not_ready={"n1"}), CFG)
    assert [e.reason for e in plan.events][:2] == ["NodeNotReady", "Scheduled"]
    assert plan.status["node"] == "n2" and plan.claim is not None and plan.claim.node == "n2"


def test_running_on_a_not_ready_node_says_so():
    """The pod on a NotReady node is left to Kubernetes' eviction; the job's Ready condition names the reason."""
    job = _running_on_n1()
    pod = PodView(name="j-1", phase="Running", node="n1")
    plan = step(job, _world("n1", "n2", not_ready={"n1"}, pods=[pod]), CFG)
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NodeNotReady") and "n1" in ready["message"]
    assert not plan.delete_pods and not plan.release


def test_running_where_the_flashnode_is_gone_loses_the_attempt_and_moves():
    """The FlashNode of a Running job's node is deleted: its pod is deleted, the attempt fails as NodeLost and the
    job goes back to Pending (its ledger went with the FlashNode) to be placed again after the backoff."""
    job = _running_on_n1()
    pod = PodView(name="j-1", phase="Running", node="n1")
    plan = step(job, _world("n2", pods=[pod]), CFG)
    assert plan.status["phase"] == "Pending" and plan.status["node"] is None and plan.release
    assert plan.delete_pods == ["j-1"]
    assert [a["reason"] for a in plan.status["attempts"]] == ["NodeLost"]
