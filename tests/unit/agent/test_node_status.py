"""FlashNode status pieces: conditions keep their transition time; labels; pod -> job reading."""

from pathlib import Path

from kubeflash_node.agent.devices import Disk, Pair
from kubeflash_node.agent.jobs import Allocation
from kubeflash_node.agent.pods import job_from_pod, quota_of
from kubeflash_node.agent.status import conditions, merge_conditions, node_labels


def test_conditions_report_failures_and_quota():
    """ModelsReady names the failed model and why; KVWithinQuota names the job over quota."""
    models = [{"id": "a", "state": "Ready"}, {"id": "b", "state": "Failed", "message": "does not fit"}]
    allocs = [Allocation("ns/j", "ssd0", quota=10, used=20, path=Path("/x"))]
    conds = {c["type"]: c for c in conditions(pairs=[Pair(0, "ssd0", "numa")], models=models, allocations=allocs)}
    assert conds["Ready"]["status"] == "True" and conds["Paired"]["status"] == "True"
    assert conds["ModelsReady"]["reason"] == "StagingFailed" and "b: does not fit" in conds["ModelsReady"]["message"]
    assert conds["KVWithinQuota"]["status"] == "False" and "ns/j" in conds["KVWithinQuota"]["message"]


def test_transition_time_moves_only_on_status_change():
    old = merge_conditions([], [{"type": "Ready", "status": "True", "reason": "A", "message": ""}], "T1")
    same = merge_conditions(old, [{"type": "Ready", "status": "True", "reason": "B", "message": "x"}], "T2")
    flipped = merge_conditions(same, [{"type": "Ready", "status": "False", "reason": "C", "message": ""}], "T3")
    assert [c["lastTransitionTime"] for c in (old[0], same[0], flipped[0])] == ["T1", "T1", "T3"]


def test_labels():
    pairs = [Pair(0, "a", "numa"), Pair(1, "a", "numa")]
    assert node_labels(pairs) == {"kubeflash.io/gpu-ssd-pairs": "2", "kubeflash.io/agent": "ready"}
    assert node_labels(pairs, running=False)["kubeflash.io/agent"] is None


DISKS = [Disk("ssd0", Path("/var/lib/kubeflash")), Disk("ssd1", Path("/mnt/nvme1/kubeflash"))]


def operator_pod(**over):
    pod = {
        "metadata": {"namespace": "team", "name": "run-1", "labels": {"kubeflash.io/job": "run"},
                     "annotations": {"kubeflash.io/disk": "ssd1",
                                     "kubeflash.io/model-id": "smollm2-135m-0123456789abcdef"}},
        "spec": {"securityContext": {"runAsUser": 1000, "fsGroup": 1000},
                 "containers": [{"securityContext": {"runAsUser": 1000}}],
                 "volumes": [{"name": "job", "hostPath": {"path": "/mnt/nvme1/kubeflash/jobs/team/run"}}]},
        "status": {"phase": "Running"},
    }
    pod["metadata"].update(over.pop("metadata", {}))
    pod.update(over)
    return pod


def test_pod_as_built_by_the_operator():
    """The operator's pod gives job name (label), disk and model (annotations), owner uid (securityContext)."""
    job = job_from_pod(operator_pod(), DISKS)
    assert (job.key, job.disk, job.model_id, job.uid, job.gid, job.running) == (
        "team/run", "ssd1", "smollm2-135m-0123456789abcdef", 1000, 1000, True)


def test_pod_without_annotations_uses_hostpath_and_env():
    pod = operator_pod(metadata={"annotations": {}})
    pod["spec"]["containers"][0]["env"] = [{"name": "KUBEFLASH_MODEL_DIR", "value": "/models/m-0123456789abcdef"}]
    job = job_from_pod(pod, DISKS)
    assert (job.disk, job.model_id) == ("ssd1", "m-0123456789abcdef")


def test_pod_with_unsafe_values_is_ignored_or_sanitized():
    """A label that is not a Kubernetes name is no job; a model id that is not an id is dropped."""
    assert job_from_pod(operator_pod(metadata={"labels": {"kubeflash.io/job": "../etc"}}), DISKS) is None
    bad_model = operator_pod(metadata={"annotations": {"kubeflash.io/model-id": "../../x"}})
    assert job_from_pod(bad_model, DISKS).model_id == ""


def test_finished_pod_is_not_running():
    assert not job_from_pod(operator_pod(status={"phase": "Succeeded"}), DISKS).running


def test_quota_from_inferencejob():
    assert quota_of({"spec": {"resources": {"kvDisk": "2Gi"}}}, 7) == 2 << 30
    assert quota_of({"spec": {}}, 7) == 7
    assert quota_of({"spec": {"resources": {"kvDisk": "huge"}}}, 7) == 7


def placed_job(phase="Running", node="gpu-1", **status):
    return {"metadata": {"namespace": "team", "name": "run"},
            "spec": {"resources": {"kvDisk": "3Gi"}},
            "status": {"phase": phase, "node": node, "disk": "ssd0", "modelId": "m-0123456789abcdef", **status}}


def test_inferencejob_placed_here():
    """A job the operator placed on this node (Scheduled/Staging/Running) gets its space and holds its model,
    even before its pod exists."""
    from kubeflash_node.agent.pods import job_from_inferencejob

    job = job_from_inferencejob(placed_job("Staging"), "gpu-1", DISKS, default_quota=1)
    assert (job.key, job.disk, job.quota, job.model_id, job.running) == (
        "team/run", "ssd0", 3 << 30, "m-0123456789abcdef", True)


def test_inferencejob_elsewhere_or_finished_is_not_ours():
    from kubeflash_node.agent.pods import job_from_inferencejob

    assert job_from_inferencejob(placed_job(node="gpu-2"), "gpu-1", DISKS, default_quota=1) is None
    assert job_from_inferencejob(placed_job("Succeeded"), "gpu-1", DISKS, default_quota=1) is None
    assert job_from_inferencejob(placed_job(disk="/etc"), "gpu-1", DISKS, default_quota=1).disk == ""


def test_pod_and_inferencejob_views_merge():
    """The pod knows the uid, the InferenceJob the quota: the merged job has both."""
    from kubeflash_node.agent.pods import job_from_inferencejob, merge

    pod = job_from_pod(operator_pod(metadata={"annotations": {}}), DISKS)
    ij = job_from_inferencejob(placed_job(), "gpu-1", DISKS, default_quota=1)
    both = merge(pod, ij)
    assert (both.uid, both.quota, both.model_id, both.disk) == (1000, 3 << 30, "m-0123456789abcdef", "ssd1")
