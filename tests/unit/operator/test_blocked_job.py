"""A job that an object in its namespace cannot serve (reconcile.Job.blocked: its input ConfigMap missing, its
output ConfigMap someone else's) stays Pending with the reason on its Scheduled condition, takes no pair and
creates no pod; once unblocked the same step places it."""

from __future__ import annotations

from dataclasses import replace

from test_reconcile import CFG, admitted, apply, holder, world

from kubeflash_operator.reconcile import step

WHY = ("InputNotFound", "spec.input.configMap.name: ConfigMap ns/p not found; the job waits for it")


def test_blocked_job_waits_with_the_reason_and_claims_nothing():
    """Blocked: Scheduled=False with the reason and message (also status.reason/message), one Warning, no claim."""
    job = replace(admitted(), blocked=WHY)
    plan = step(job, world(holder()), CFG)
    assert plan.claim is None and plan.create is None
    cond = next(c for c in plan.status["conditions"] if c["type"] == "Scheduled")
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", *WHY)
    assert (plan.status["reason"], plan.status["message"]) == WHY
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "InputNotFound")]
    again = step(replace(apply(job, plan.status), blocked=WHY), world(holder()), CFG)
    assert not again.status and not again.events  # unchanged: no rewrite, no repeated Warning


def test_unblocked_job_is_placed():
    """The blocking object fixed: the next step places the job and creates its pod."""
    job = replace(admitted(), blocked=WHY)
    waiting = apply(job, step(job, world(holder()), CFG).status)
    plan = step(replace(waiting, blocked=None), world(holder()), CFG)
    assert plan.claim is not None and plan.create is not None
