"""What the operator needs to know about an engine pod, read from its status (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubeflash_operator.timefmt import parse_time

IMAGE_ERRORS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
FATAL_IMAGE_ERRORS = frozenset({"InvalidImageName", "ErrImageNeverPull"})  # retrying cannot help
STARTING = frozenset({"ContainerCreating", "PodInitializing"})  # the kubelet's usual way to a running container


@dataclass(frozen=True)
class PodView:
    name: str
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed | Unknown
    node: str = ""
    deleting: bool = False
    unschedulable: str | None = None  # the scheduler's message while PodScheduled=False/Unschedulable
    waiting: tuple[str, str] | None = None  # (reason, message) of a waiting container
    reason: str = ""  # pod-level reason (Evicted, NodeLost, DeadlineExceeded, …)
    message: str = ""
    exit_code: int | None = None
    terminated_reason: str = ""  # container-level (Error, OOMKilled, Completed, …)
    created: datetime | None = None
    unschedulable_since: datetime | None = None
    started: datetime | None = None  # status.startTime: the kubelet took the pod; its container waits from here

    @property
    def failure(self) -> tuple[str, str]:
        """(reason, message) explaining why a Failed pod failed, most specific first."""
        if self.reason:
            return self.reason, self.message or f"pod {self.name} {self.reason.lower()}"
        reason = self.terminated_reason or "Error"
        detail = f"exit code {self.exit_code}" if self.exit_code is not None else "no exit code"
        return reason, f"{self.message or 'engine container failed'} ({detail})"

    @property
    def image_error(self) -> tuple[str, str] | None:
        return self.waiting if self.waiting and self.waiting[0] in IMAGE_ERRORS else None


def pod_view(body: Mapping[str, Any]) -> PodView:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {})
    unschedulable = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "the scheduler found no node for the pod"
    waiting, terminated = None, {}
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if state.get("waiting") and waiting is None:
            w = state["waiting"]
            waiting = (w.get("reason") or "Waiting", w.get("message") or "")
        if state.get("terminated") and not terminated:
            terminated = state["terminated"]
    return PodView(
        name=meta.get("name", ""),
        phase=status.get("phase") or "Pending",
        node=spec.get("nodeName") or "",
        deleting=bool(meta.get("deletionTimestamp")),
        unschedulable=unschedulable,
        waiting=waiting,
        reason=status.get("reason") or "",
        message=status.get("message") or terminated.get("message") or "",
        exit_code=terminated.get("exitCode"),
        terminated_reason=terminated.get("reason") or "",
        created=parse_time(meta.get("creationTimestamp")),
        unschedulable_since=parse_time(scheduled.get("lastTransitionTime")) if unschedulable else None,
        started=parse_time(status.get("startTime")),
    )
