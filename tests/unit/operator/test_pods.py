"""Reading engine pod status: failure reasons, image errors, unschedulable pods."""

from __future__ import annotations

from kubeflash_operator.pods import pod_view


def test_failed_container_reason_and_exit_code():
    """A failed container's terminated state gives the reason and exit code."""
    view = pod_view({"metadata": {"name": "p"}, "status": {"phase": "Failed", "containerStatuses": [
        {"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}})
    assert view.failure == ("OOMKilled", "engine container failed (exit code 137)")


def test_pod_level_reason_wins():
    """An eviction (pod-level reason) is reported over the container's reason."""
    view = pod_view({"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted",
                                                            "message": "low disk"}})
    assert view.failure == ("Evicted", "low disk")


def test_unschedulable_and_image_errors():
    """PodScheduled=False/Unschedulable and waiting image errors are picked out with their messages and times."""
    view = pod_view({"metadata": {"name": "p", "creationTimestamp": "2025-06-01T12:00:00Z"}, "status": {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/3 nodes", "lastTransitionTime": "2025-06-01T12:00:05Z"}],
        "containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]}})
    assert view.unschedulable == "0/3 nodes" and view.unschedulable_since.second == 5
    assert view.image_error == ("ErrImagePull", "not found") and view.created.second == 0


def test_deleting_pod_is_flagged():
    """A deletionTimestamp marks the pod as going away."""
    assert pod_view({"metadata": {"name": "p", "deletionTimestamp": "2025-06-01T12:00:00Z"}}).deleting


def test_waiting_container_and_the_kubelets_start_time():
    """A container that has not started (not an image error) is waiting with its reason; startTime is read."""
    view = pod_view({"metadata": {"name": "p", "creationTimestamp": "2025-06-01T12:00:00Z"}, "status": {
        "phase": "Pending", "startTime": "2025-06-01T12:00:07Z",
        "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}})
    assert view.waiting == ("ContainerCreating", "") and view.image_error is None
    assert (view.created.second, view.started.second) == (0, 7)
    assert pod_view({"metadata": {"name": "p"}}).started is None
