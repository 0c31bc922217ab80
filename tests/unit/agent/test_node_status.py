"""FlashNode status pieces: conditions keep their transition time; labels (the jobs a node holds: test_ledger_jobs.py)."""

from pathlib import Path

from kubeflash_node.agent.devices import Pair
from kubeflash_node.agent.jobs import Allocation
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
