"""Placement: filter by heartbeat, free pairs and SSD room; score model-on-SSD >> bandwidth > free space."""

from __future__ import annotations

import pytest

from kubeflash_operator.scheduler import Claim, NoFit, Placement, Request, claim_of, node_view, place

from operator_factories import NOW, GiB, flashnode

MODEL = "smollm2-135m-0000"


def ready(disk="nvme0", bytes_=5 * GiB, state="Ready"):
    return {"id": MODEL, "disk": disk, "state": state, "bytes": bytes_}


def nodes(*bodies):
    return [node_view(b) for b in bodies]


def request(gpus=1, kv=10 * GiB, job="ns/j"):
    return Request(job=job, model_id=MODEL, gpus=gpus, kv_bytes=kv)


def test_prefers_node_that_already_holds_the_model():
    """A slower node with the model Ready on its SSD beats a faster, emptier node without it."""
    found = place(request(), nodes(
        flashnode("fast", read=(14.0,), free=(900 * GiB,)),
        flashnode("holder", read=(3.0,), free=(50 * GiB,), models=[ready()]),
    ), [], now=NOW)
    assert found == Placement("holder", 0, "nvme0", True, (0,))


def test_model_on_another_disk_of_the_node_does_not_count_as_staged_there():
    """The score looks at the pair's own SSD: a copy on nvme1 makes the GPU paired with nvme1 win."""
    found = place(request(), nodes(
        flashnode("n", pairs=((0, "nvme0"), (1, "nvme1")), models=[ready(disk="nvme1")]),
    ), [], now=NOW)
    assert (found.gpu, found.disk, found.staged) == (1, "nvme1", True)


def test_model_being_staged_beats_bandwidth_but_is_not_staged():
    """A copy still staging is preferred over a faster SSD, yet the placement says staged=False."""
    found = place(request(), nodes(
        flashnode("fast", read=(14.0,)),
        flashnode("staging", read=(3.0,), models=[ready(state="Staging")]),
    ), [], now=NOW)
    assert (found.node, found.staged) == ("staging", False)


@pytest.mark.parametrize(("a", "b", "winner"), [
    ({"read": (7.0,), "free": (100 * GiB,)}, {"read": (12.0,), "free": (50 * GiB,)}, "b"),
    ({"read": (7.0,), "free": (100 * GiB,)}, {"read": (7.0,), "free": (300 * GiB,)}, "b"),
    ({"read": (7.0,), "free": (100 * GiB,)}, {"read": (7.0,), "free": (100 * GiB,)}, "a"),
], ids=["bandwidth-wins", "free-space-breaks-tie", "name-breaks-tie"])
def test_without_the_model_bandwidth_then_space_then_name(a, b, winner):
    """Among nodes without the model: higher SSD read bandwidth, then more free space, then lower name."""
    found = place(request(), nodes(flashnode("a", **a), flashnode("b", **b)), [], now=NOW)
    assert found.node == winner


def test_busy_pairs_spread_jobs():
    """A pair held by a placed job is skipped: the next job lands on the node's other pair, then elsewhere."""
    two = flashnode("n1", pairs=((0, "nvme0"), (1, "nvme1")), models=[ready(), ready(disk="nvme1")])
    other = flashnode("n2")
    first = place(request(job="ns/a"), nodes(two, other), [], now=NOW)
    held = [first.claim("ns/a", 10 * GiB)]
    second = place(request(job="ns/b"), nodes(two, other), held, now=NOW)
    held.append(second.claim("ns/b", 10 * GiB))
    third = place(request(job="ns/c"), nodes(two, other), held, now=NOW)
    assert {(first.node, first.gpu), (second.node, second.gpu)} == {("n1", 0), ("n1", 1)}
    assert (third.node, third.staged) == ("n2", False)


def test_own_claim_is_ignored():
    """Re-placing a job does not see its own previous claim as an obstacle."""
    held = [Claim(job="ns/j", node="n1", gpus=(0,), disk="nvme0", kv_bytes=10 * GiB)]
    found = place(request(job="ns/j"), nodes(flashnode("n1")), held, now=NOW)
    assert isinstance(found, Placement) and found.node == "n1"


def test_nothing_fits_says_why_for_each_node():
    """NoFit names every node and its reason: busy pairs, stale heartbeat, too little SSD space."""
    found = place(request(kv=10 * GiB), nodes(
        flashnode("busy"),
        flashnode("stale", heartbeat_age=600),
        flashnode("full", free=(8 * GiB,)),
        flashnode("silent", heartbeat_age=None),
    ), [Claim("ns/x", "busy", (0,), "nvme0")], now=NOW)
    assert isinstance(found, NoFit)
    assert found.reason.startswith("0/4 nodes fit: ")
    assert "busy: 0 free GPU<->SSD pairs, needs 1" in found.reason
    assert "stale: heartbeat stale" in found.reason
    assert "silent: heartbeat stale (last never)" in found.reason
    assert "full: disk nvme0 has 8.0Gi free, needs 10.0Gi" in found.reason


def test_cordoned_node_gets_no_job_even_when_it_holds_the_model():
    """A Node with spec.unschedulable (kubectl cordon/drain) is filtered out; the job goes to another node."""
    found = place(request(), [
        node_view(flashnode("holder", read=(14.0,), models=[ready()]), cordoned=True),
        node_view(flashnode("other", read=(3.0,))),
    ], [], now=NOW)
    assert (found.node, found.staged) == ("other", False)


def test_only_cordoned_nodes_means_wait_and_say_so():
    """With every fitting node cordoned nothing fits, and the reason names the cordon."""
    found = place(request(), [node_view(flashnode("holder", models=[ready()]), cordoned=True)], [], now=NOW)
    assert found == NoFit("0/1 nodes fit: holder: node cordoned (spec.unschedulable)")


def test_node_view_is_not_cordoned_by_default():
    """The cordon comes from the Node, not the FlashNode: node_view assumes schedulable unless told."""
    assert node_view(flashnode("n")).cordoned is False
    assert node_view(flashnode("n"), cordoned=True).usable(NOW) is False


def test_no_flashnodes():
    """An empty cluster gives a NoFit that says no node reports pairs."""
    assert place(request(), [], [], now=NOW) == NoFit("no FlashNode reports GPU<->SSD pairs yet")


def test_space_counts_model_bytes_known_from_another_node():
    """A model staged elsewhere has a known size; a node without it needs room for model + KV."""
    holder = flashnode("holder", models=[ready(bytes_=40 * GiB)])
    small = flashnode("small", free=(45 * GiB,), read=(20.0,))
    found = place(request(kv=10 * GiB), nodes(small, holder), [Claim("ns/x", "holder", (0,), "nvme0")], now=NOW)
    assert isinstance(found, NoFit)
    assert "small: disk nvme0 has 45.0Gi free, needs 50.0Gi" in found.reason


def test_unreserved_kv_of_placed_jobs_is_subtracted_until_the_agent_reserves_it():
    """KV promised to a placed job counts against free space only while the agent has not reserved it."""
    body = flashnode("n", pairs=((0, "nvme0"), (1, "nvme0")), free=(15 * GiB,))
    held = [Claim("ns/x", "n", (0,), "nvme0", kv_bytes=10 * GiB)]
    assert isinstance(place(request(kv=10 * GiB), nodes(body), held, now=NOW), NoFit)
    reserved = flashnode("n", pairs=((0, "nvme0"), (1, "nvme0")), free=(15 * GiB,), kv_jobs=["ns/x"])
    assert place(request(kv=10 * GiB), nodes(reserved), held, now=NOW).gpu == 1


def test_multi_gpu_job_takes_that_many_pairs():
    """gpus: 2 needs two free pairs on one node; the placement lists both GPUs, the best pair first."""
    body = flashnode("n", pairs=((0, "nvme0"), (1, "nvme1"), (2, "nvme2")), models=[ready(disk="nvme2")])
    found = place(request(gpus=2), nodes(body), [], now=NOW)
    assert (found.gpu, found.gpus) == (2, (2, 0))
    assert isinstance(place(request(gpus=4), nodes(body), [], now=NOW), NoFit)


def test_node_view_tolerates_a_fresh_flashnode_without_status():
    """A FlashNode the agent has not filled in yet parses to a node with no pairs and no heartbeat."""
    view = node_view({"metadata": {"name": "n"}, "spec": {"nodeName": "n"}})
    assert (view.name, view.pairs, view.heartbeat) == ("n", (), None)
    assert not view.fresh(NOW)


def test_node_view_reads_models_and_desired_state():
    """Copies, desired model ids and KV reservations come through from status and spec."""
    view = node_view(flashnode("n", models=[ready()], desired=[MODEL], kv_jobs=["ns/a"]))
    assert view.model(MODEL).state == "Ready" and view.model(MODEL, "nvme9") is None
    assert view.desired == {MODEL} and view.kv_jobs == {"ns/a"}
    assert view.disks["nvme0"].path == "/mnt/nvme0/kubeflash"


@pytest.mark.parametrize(("status", "expected"), [
    ({"phase": "Running", "node": "n", "gpus": [1, 2], "disk": "d"}, Claim("ns/j", "n", (1, 2), "d", 5)),
    ({"phase": "Scheduled", "node": "n", "gpu": 3, "disk": "d"}, Claim("ns/j", "n", (3,), "d", 5)),
    ({"phase": "Pending"}, None),
    ({"phase": "Succeeded", "node": "n", "gpu": 0, "disk": "d"}, None),
], ids=["running", "scheduled-single-gpu", "pending", "finished"])
def test_claim_of_job_status(status, expected):
    """Only placed, unfinished jobs hold a claim on their node's GPUs."""
    body = {"metadata": {"namespace": "ns", "name": "j"}, "status": status}
    assert claim_of(body, kv_bytes=5) == expected
