"""The phase machine: allowed moves, the conditions each phase implies, metav1.Condition timing rules."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kubeflash_operator import status as st

from operator_factories import NOW

ALLOWED = [
    (None, "Pending"), ("Pending", "Scheduled"), ("Scheduled", "Staging"), ("Scheduled", "Running"),
    ("Staging", "Running"), ("Running", "Succeeded"), ("Running", "Failed"), ("Running", "Scheduled"),
    ("Running", "Pending"), ("Staging", "Pending"), ("Pending", "Failed"),
    ("Succeeded", "Failed"),  # the one way out of a terminal phase: the agent refused the job's results
]
FORBIDDEN = [
    (None, "Running"), ("Pending", "Running"), ("Pending", "Succeeded"), ("Failed", "Succeeded"),
    ("Failed", "Pending"), ("Staging", "Succeeded"), ("Succeeded", "Running"),
]


@pytest.mark.parametrize(("src", "dst"), ALLOWED, ids=[f"{a}-{b}" for a, b in ALLOWED])
def test_allowed_transitions(src, dst):
    """Moves of the documented machine produce a patch with the new phase."""
    assert st.transition({"phase": src} if src else {}, dst, reason="R", now=NOW)["phase"] == dst


@pytest.mark.parametrize(("src", "dst"), FORBIDDEN, ids=[f"{a}-{b}" for a, b in FORBIDDEN])
def test_forbidden_transitions(src, dst):
    """Skipping placement, or leaving a terminal phase, is a programming error."""
    with pytest.raises(st.InvalidTransition):
        st.transition({"phase": src} if src else {}, dst, reason="R", now=NOW)


def conds(patch):
    return {c["type"]: (c["status"], c["reason"]) for c in patch["conditions"]}


def test_each_phase_sets_the_four_conditions():
    """Walking the happy path flips Scheduled, Staged, Ready, Complete as documented."""
    s = st.transition({}, "Pending", reason="Accepted", now=NOW)
    assert conds(s) == {"Scheduled": ("False", "Accepted"), "Staged": ("Unknown", "NotPlaced"),
                        "Ready": ("False", "Accepted"), "Complete": ("False", "NotFinished")}
    s = st.transition(s, "Scheduled", reason="Placed", now=NOW)
    assert conds(s)["Scheduled"] == ("True", "Placed") and conds(s)["Staged"][0] == "Unknown"
    s = st.transition(s, "Staging", reason="Staging", now=NOW)
    assert conds(s)["Staged"] == ("False", "Staging")
    s = st.transition(s, "Running", reason="PodCreated", now=NOW)
    assert conds(s)["Staged"] == ("True", "ModelReady") and conds(s)["Ready"] == ("False", "PodCreated")
    s = st.transition(s, "Succeeded", reason="Succeeded", now=NOW)
    assert conds(s)["Complete"] == ("True", "Succeeded") and conds(s)["Ready"][0] == "False"
    assert s["completionTime"] == "2025-06-01T12:00:00Z"


def test_failed_keeps_reason_and_message_on_complete():
    """Failed sets Complete=False with the failure's reason and message, and status.message mirrors it."""
    s = st.transition({"phase": "Running"}, "Failed", reason="BackoffLimitExceeded", message="boom", now=NOW)
    c = st.condition(s, "Complete")
    assert (c["status"], c["reason"], c["message"]) == ("False", "BackoffLimitExceeded", "boom")
    assert (s["reason"], s["message"]) == ("BackoffLimitExceeded", "boom")


def test_last_transition_time_moves_only_with_status():
    """Changing a condition's reason keeps lastTransitionTime; changing its status moves it."""
    later = NOW + timedelta(minutes=5)
    first = st.set_condition([], "Ready", "False", reason="A", message="a", now=NOW)
    same = st.set_condition(first, "Ready", "False", reason="B", message="b", now=later)
    flipped = st.set_condition(same, "Ready", "True", reason="C", message="c", now=later)
    assert same[0]["lastTransitionTime"] == "2025-06-01T12:00:00Z" and same[0]["reason"] == "B"
    assert flipped[0]["lastTransitionTime"] == "2025-06-01T12:05:00Z"


def test_condition_shape_is_metav1():
    """Every condition carries type, status, reason, message, lastTransitionTime and observedGeneration."""
    s = st.transition({}, "Pending", reason="Accepted", now=NOW, generation=4)
    for c in s["conditions"]:
        assert set(c) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
        assert c["status"] in ("True", "False", "Unknown") and c["observedGeneration"] == 4
    assert s["observedGeneration"] == 4


def test_fields_are_merged_into_the_patch():
    """Extra fields (placement, times) ride along, None meaning 'delete'."""
    s = st.transition({"phase": "Running"}, "Pending", reason="NodeLost", now=NOW, fields={"node": None})
    assert s["node"] is None and s["phase"] == "Pending"
