"""The InferenceJob phase machine and its conditions, as pure functions returning status patches.

Pending -> Scheduled -> Staging -> Running -> Succeeded | Failed. A retry goes back to Scheduled (same pair)
or Pending (placement dropped); any phase may fail. Each phase fixes the four conditions' statuses
(Scheduled, Staged, Ready, Complete, shaped like metav1.Condition); a condition's lastTransitionTime moves
only when its status changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from kubeflash_operator.timefmt import format_time

PENDING, SCHEDULED, STAGING, RUNNING = "Pending", "Scheduled", "Staging", "Running"
SUCCEEDED, FAILED = "Succeeded", "Failed"
PHASES = (PENDING, SCHEDULED, STAGING, RUNNING, SUCCEEDED, FAILED)
TERMINAL = frozenset({SUCCEEDED, FAILED})
ACTIVE = frozenset({SCHEDULED, STAGING, RUNNING})  # phases that hold a GPU<->SSD pair

CONDITION_TYPES = ("Scheduled", "Staged", "Ready", "Complete")

_ALLOWED: dict[str | None, frozenset[str]] = {
    None: frozenset({PENDING, FAILED}),
    PENDING: frozenset({SCHEDULED, FAILED}),
    SCHEDULED: frozenset({STAGING, RUNNING, PENDING, FAILED}),
    STAGING: frozenset({RUNNING, PENDING, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, SCHEDULED, PENDING}),
    SUCCEEDED: frozenset({FAILED}),  # only when the node agent refuses the job's results (reconcile.step)
    FAILED: frozenset(),
}

# Condition statuses each phase implies; None leaves the condition as it is.
_IMPLIED: dict[str, dict[str, str | None]] = {
    PENDING: {"Scheduled": "False", "Staged": "Unknown", "Ready": "False", "Complete": "False"},
    SCHEDULED: {"Scheduled": "True", "Staged": None, "Ready": "False", "Complete": "False"},
    STAGING: {"Scheduled": "True", "Staged": "False", "Ready": "False", "Complete": "False"},
    RUNNING: {"Scheduled": "True", "Staged": "True", "Ready": None, "Complete": "False"},
    SUCCEEDED: {"Scheduled": None, "Staged": None, "Ready": "False", "Complete": "True"},
    FAILED: {"Scheduled": None, "Staged": None, "Ready": "False", "Complete": "False"},
}

# The condition a phase's reason and message belong to.
_MAIN = {PENDING: "Scheduled", SCHEDULED: "Scheduled", STAGING: "Staged", RUNNING: "Ready",
         SUCCEEDED: "Complete", FAILED: "Complete"}


class InvalidTransition(ValueError):
    """The phase machine forbids this move (a bug in the caller, not a user error)."""


def can_transition(current: str | None, to: str) -> bool:
    return to == current or to in _ALLOWED.get(current, frozenset())


def transition(
    status: Mapping[str, Any],
    to: str,
    *,
    reason: str,
    message: str = "",
    now: datetime,
    generation: int | None = None,
    fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The status patch that moves a job from its current phase to `to`, with conditions to match."""
    current = status.get("phase")
    if not can_transition(current, to):
        raise InvalidTransition(f"cannot go from {current} to {to}")
    conditions = list(status.get("conditions") or [])
    main = _MAIN[to]
    for ctype in CONDITION_TYPES:
        implied = _IMPLIED[to][ctype]
        if ctype == main:
            value = implied or _status_of(conditions, ctype) or "Unknown"
            conditions = set_condition(conditions, ctype, value, reason=reason, message=message,
                                       now=now, generation=generation)
        elif implied is not None:
            conditions = set_condition(conditions, ctype, implied, reason=_default_reason(ctype, implied, reason),
                                       message=None, now=now, generation=generation)
    patch: dict[str, Any] = {"phase": to, "reason": reason, "message": message, "conditions": conditions}
    if generation is not None:
        patch["observedGeneration"] = generation
    if to in TERMINAL and "completionTime" not in (fields or {}):
        patch["completionTime"] = format_time(now)
    patch.update(fields or {})
    return patch


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    ctype: str,
    value: str,
    *,
    reason: str,
    message: str | None,
    now: datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A new conditions list with `ctype` set; lastTransitionTime changes only with the status value.

    message=None keeps the old message when the status does not change (an implied condition).
    """
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != ctype:
            out.append(dict(cond))
            continue
        found = True
        same = cond.get("status") == value
        new = {
            "type": ctype,
            "status": value,
            "reason": reason if not same or message is not None else cond.get("reason", reason),
            "message": (message if message is not None else cond.get("message", "")) if same else (message or ""),
            "lastTransitionTime": cond.get("lastTransitionTime") if same else format_time(now),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    if not found:
        new = {"type": ctype, "status": value, "reason": reason, "message": message or "",
               "lastTransitionTime": format_time(now)}
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    return out


def condition(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)


def _status_of(conditions: Sequence[Mapping[str, Any]], ctype: str) -> str | None:
    return next((c.get("status") for c in conditions if c.get("type") == ctype), None)


def _default_reason(ctype: str, value: str, phase_reason: str) -> str:
    """Reason for a condition implied by a phase: the phase's own reason when it explains the change."""
    return {
        ("Scheduled", "True"): "Placed",
        ("Scheduled", "False"): phase_reason,
        ("Staged", "True"): "ModelReady",
        ("Staged", "False"): "Staging",
        ("Staged", "Unknown"): "NotPlaced",
        ("Ready", "False"): phase_reason,
        ("Complete", "False"): "NotFinished",
        ("Complete", "True"): "Succeeded",
    }.get((ctype, value), phase_reason)
