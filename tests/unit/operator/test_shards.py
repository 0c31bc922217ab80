"""shards.py without a cluster: shard job names and bodies (spec without parallelism, spec.shard, the output
ConfigMap renamed, a controller owner reference to the parent) parse as valid shard specs; the aggregate status
is a bounded summary with summed progress and the right phase (a failed shard fails the parent only once every
shard is terminal); unchanged status gives no patch; a tick creates a bounded batch of shards and never twice."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from kubeflash_api import parse_job_spec
from kubeflash_operator.shards import (
    PARENT_LABEL,
    aggregate,
    child_body,
    child_name,
    merge_results,
    missing,
    owned,
    owner_uids,
    shard_view,
    sync,
    with_merge,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["a", "b"]}, "parallelism": 3,
        "output": {"configMap": {"name": "res"}}}


def test_child_body_is_a_valid_shard_owned_by_the_parent():
    body = child_body(namespace="ns", parent="big", uid="u1", spec=SPEC, index=2, count=3)
    meta = body["metadata"]
    assert (meta["name"], meta["namespace"], meta["labels"][PARENT_LABEL]) == ("big-s2", "ns", "big")
    ref = meta["ownerReferences"][0]
    assert (ref["uid"], ref["name"], ref["kind"], ref["controller"], ref["blockOwnerDeletion"]) == \
        ("u1", "big", "InferenceJob", True, True)
    spec = parse_job_spec(body["spec"], name=meta["name"], namespace="ns")
    assert (spec.parallelism, spec.shard.index, spec.shard.count, spec.output.config_map) == (1, 2, 3, "res-s2")
    assert SPEC["output"]["configMap"]["name"] == "res" and SPEC["parallelism"] == 3  # the parent's untouched
    assert owned(body, "u1") and not owned(body, "u2") and owner_uids(body) == ["u1"]
    assert owner_uids({"metadata": {"ownerReferences": meta["ownerReferences"]}}) == []  # no parent label


def test_missing_is_what_is_not_there():
    assert missing("j", 4, [child_name("j", 1), child_name("j", 3), "other"]) == [0, 2]
    assert missing("j", 2, ["j-s0", "j-s1"]) == []


def child(phase: str | None, done: int = 0, total: int = 0, name: str = "j-s0", message: str = "") -> dict:
    status = {"progress": {"promptsDone": done, "promptsTotal": total}, "message": message}
    if phase:
        status["phase"] = phase
    return {"metadata": {"name": name}, "status": status}


@pytest.mark.parametrize("phases,want", [
    ([], "Pending"),
    ([None, "Scheduled", "Staging"], "Pending"),
    (["Running", "Pending"], "Running"),
    (["Succeeded", "Pending", "Pending"], "Running"),
    (["Succeeded"] * 3, "Succeeded"),
    (["Succeeded", "Failed", "Running"], "Running"),
    (["Failed", "Pending"], "Running"),
    (["Succeeded", "Failed", "Succeeded"], "Failed"),
], ids=["none-created", "all-waiting", "one-running", "one-done", "all-done", "one-failed-others-running",
        "one-failed-one-not-created", "all-terminal-one-failed"])
def test_aggregate_phase(phases, want):
    patch = aggregate([child(p) for p in phases], count=3, status={}, now=NOW)
    assert patch["phase"] == want
    assert sum(patch["shards"][k] for k in ("pending", "running", "succeeded", "failed")) == 3
    assert ("completionTime" in patch) == (want in ("Succeeded", "Failed"))


def test_aggregate_sums_progress_and_stays_bounded():
    kids = [child("Running", 2, 5), child("Succeeded", 5, 5), child("Failed", 1, 4, name="j-s2", message="OOM")]
    patch = aggregate(kids, count=1000, status={}, now=NOW, generation=1)
    assert patch["shards"] == {"total": 1000, "pending": 997, "running": 1, "succeeded": 1, "failed": 1}
    assert patch["progress"] == {"promptsDone": 8, "promptsTotal": 14, "summary": "8/14"}
    assert (patch["phase"], patch["reason"]) == ("Running", "ShardsFailing")  # 998 shards not terminal yet
    assert "1 of 1000 shards failed" in patch["message"] and "j-s2" in patch["message"] and "OOM" in patch["message"]
    assert "completionTime" not in patch
    assert len(str(patch)) < 1000  # five numbers for any count, not a list of shards


def test_parent_keeps_summing_after_a_failure_then_fails_naming_the_failed_shards():
    kids = [child("Failed", name=f"j-s{k}", message=f"OOM {k}") if k % 3 == 0 else child("Running", name=f"j-s{k}")
            for k in range(40)]
    failing = aggregate(kids, count=40, status={}, now=NOW)
    assert (failing["phase"], failing["reason"], failing["shards"]["failed"]) == ("Running", "ShardsFailing", 14)
    later = [child("Succeeded", 3, 3, name=k["metadata"]["name"]) if k["status"].get("phase") == "Running" else k
             for k in kids]
    assert aggregate(later[:-1], count=40, status=failing, now=NOW)["phase"] == "Running"  # j-s39 not there
    final = aggregate(sorted(later, key=lambda c: c["metadata"]["name"]), count=40, status=failing, now=NOW)
    assert (final["phase"], final["reason"]) == ("Failed", "ShardsFailed") and "completionTime" in final
    assert final["shards"] == {"total": 40, "pending": 0, "running": 0, "succeeded": 26, "failed": 14}
    named = ", ".join(f"j-s{k}" for k in range(0, 30, 3))  # the first ten by index, not by name order
    assert f"14 of 40 shards failed ({named} and 4 more; first: OOM 0)" in final["message"]
    assert "j-s30" not in final["message"] and final["progress"]["promptsDone"] == 78


def test_the_shard_index_view_sums_as_the_whole_bodies_do():
    bodies = []
    for k, phase in enumerate(["Running", "Failed", "Succeeded"]):
        body = child_body(namespace="ns", parent="j", uid="u1", spec=SPEC, index=k, count=3)
        body["status"] = {"phase": phase, "message": f"m{k}", "progress": {"promptsDone": k, "promptsTotal": 3}}
        bodies.append(body)
    views = [shard_view(b) for b in bodies]
    assert aggregate(views, count=3, status={}, now=NOW) == aggregate(bodies, count=3, status={}, now=NOW)
    assert all(owned(v, "u1") for v in views) and "spec" not in views[0]  # not the parent's prompts again
    assert len(json.dumps(views[0])) < 300


def test_unchanged_status_gives_no_patch():
    kids = [child("Running", 1, 2)]
    patch = aggregate(kids, count=2, status={}, now=NOW)
    assert aggregate(kids, count=2, status=patch, now=NOW) == {}
    assert aggregate([child("Succeeded", 2, 2)], count=2, status=patch, now=NOW)["shards"]["succeeded"] == 1


def line(cid: str) -> str:
    return '{"custom_id": "%s", "response": {}}' % cid


def test_merge_results_in_input_order():
    order = [f"prompt-{i}" for i in range(5)]
    parts = [line("prompt-3") + "\n" + line("prompt-0") + "\n", line("extra") + "\n" + line("prompt-4") + "\n",
             line("prompt-1") + "\n" + line("prompt-2") + "\n"]
    merged = merge_results(parts, order)
    assert [json.loads(x)["custom_id"] for x in merged.splitlines()] == [*order, "extra"]
    assert merged.endswith("\n") and merge_results(["", "\n"], order) == ""


def test_succeeded_is_held_until_the_results_are_merged():
    done = aggregate([child("Succeeded", 1, 1)], count=1, status={}, now=NOW)
    assert with_merge(done, {}, None) == done
    held = with_merge(done, {}, "waiting for shard results in ConfigMap res-s0")
    assert (held["phase"], held["reason"], "completionTime" in held) == ("Running", "MergingResults", False)
    assert with_merge(done, held, "waiting for shard results in ConfigMap res-s0") == {}
    failed = with_merge(done, {}, "!the merged results are 2000000 bytes")
    assert (failed["phase"], failed["reason"], failed["message"]) == ("Failed", "ResultsNotMerged",
                                                                       "the merged results are 2000000 bytes")


class RecordingApi:
    """Stands in for the API server's InferenceJob endpoints (create: 409 for a name it holds) and the status
    patch; what sync sends is recorded."""

    def __init__(self) -> None:
        self.custom, self.names, self.patches = self, set(), []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        from kubernetes.client.exceptions import ApiException

        if body["metadata"]["name"] in self.names:
            raise ApiException(status=409)
        self.names.add(body["metadata"]["name"])

    def patch_job_status(self, namespace, name, version, patch):
        self.patches.append(patch)
        return str(len(self.patches))


def test_sync_creates_a_bounded_batch_per_tick_and_asks_to_come_back():
    from kubeflash_operator import shards

    api, created = RecordingApi(), set()
    spec = {**SPEC, "parallelism": 250, "output": None}
    ticks = []
    while True:  # the index shows nothing yet: the names it created are remembered, never created twice
        written, soon = sync(api, namespace="ns", name="j", uid="u1", spec=spec, status={}, version="1",
                             generation=1, now=NOW, children=[], created=created)
        ticks.append(len(api.names))
        if not soon:
            break
    assert ticks == [shards.CREATE_BATCH, 2 * shards.CREATE_BATCH, 250] and written == str(len(api.patches))
    assert api.names == {child_name("j", k) for k in range(250)} == created
    indexed = [shard_view(child_body(namespace="ns", parent="j", uid="u1", spec=spec, index=k, count=250))
               for k in range(250)]
    sync(api, namespace="ns", name="j", uid="u1", spec=spec, status={}, version="1", generation=1, now=NOW,
         children=indexed, created=created)
    assert created == set()  # the index says from now on: a shard deleted by hand is created again
    api.names.discard("j-s7")
    sync(api, namespace="ns", name="j", uid="u1", spec=spec, status={}, version="1", generation=1, now=NOW,
         children=[v for v in indexed if v["metadata"]["name"] != "j-s7"], created=created)
    assert "j-s7" in api.names
