"""The jobs a node's agent knows come only from the job ledger the operator writes on its own FlashNode (issue 17).

The agent reads no pod and no InferenceJob, so the two annotations the operator's ledger write carries
(kubeflash.io/claims, kubeflash.io/ended) must give it everything: which jobs are placed here, their disk, KV
bytes, model, uid and output ConfigMap, which attempts ended in what phase, and when a job is deleted. These tests
write the annotations with the operator's own code (bookkeeping.py) and read them with the agent's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeflash_api.ledger import CLAIMS_ANNOTATION, ENDED_ANNOTATION, placed_jobs
from kubeflash_node.agent.devices import Disk
from kubeflash_node.agent.pods import job_from_ledger
from kubeflash_operator.bookkeeping import Release, apply_changes, apply_ended, ended_annotation, ledger_annotation
from kubeflash_operator.scheduler import Claim

DISKS = [Disk("ssd0", Path("/var/lib/kubeflash")), Disk("ssd1", Path("/mnt/nvme1/kubeflash"))]
MODEL = "smollm2-135m-0123456789abcdef"
RUN = Claim("team/run", "gpu-1", (1,), "ssd1", 3 << 30, model_id=MODEL, uid="u-run", output="run-out")
OTHER = Claim("team/other", "gpu-1", (0,), "ssd0", 0, model_id=MODEL, uid="u-other")


def annotations(ledger, ended) -> dict[str, str | None]:
    return {CLAIMS_ANNOTATION: ledger_annotation(ledger), ENDED_ANNOTATION: ended_annotation(ended)}


def write(ledger, ended, changes):
    """One ledger write of the operator: (claims after, ended records after)."""
    after, accepted = apply_changes(ledger, changes)
    return after, apply_ended(ended, ledger, changes, accepted)


def test_a_placed_job_carries_everything_the_agent_used_to_read_from_pods_and_jobs():
    """Disk, KV quota, model (held while placed), uid and output ConfigMap, from the claim the operator wrote."""
    ledger, ended = write({}, {}, {RUN.job: RUN, OTHER.job: OTHER})
    jobs = placed_jobs(annotations(ledger, ended))
    run = jobs["team/run"]
    assert (run.live, run.disk, run.kv, run.model, run.uid, run.output) == (True, "ssd1", 3 << 30, MODEL, "u-run",
                                                                            "run-out")
    want = job_from_ledger(run, DISKS, default_quota=7, uid=1000, gid=1000)
    assert (want.key, want.disk, want.quota, want.model_id, want.uid, want.running) == (
        "team/run", "ssd1", 3 << 30, MODEL, 1000, True)
    assert job_from_ledger(jobs["team/other"], DISKS, default_quota=7).quota == 7  # no KV bytes: the default


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "Pending"])
def test_a_released_claim_stays_listed_as_ended_until_the_job_is_deleted(phase):
    """The release at the end of an attempt (same write) keeps the job listed with its phase, holding nothing;
    only the deletion's release drops it, and a stale-entry release never does."""
    ledger, ended = write({}, {}, {RUN.job: RUN})
    ledger, ended = write(ledger, ended, {RUN.job: Release(end=phase)})
    assert RUN.job not in ledger  # the pair is free for placement
    run = placed_jobs(annotations(ledger, ended))["team/run"]
    assert (run.live, run.end, run.terminal, run.output, run.disk, run.kv) == (
        False, phase, phase != "Pending", "run-out", "ssd1", 3 << 30)
    assert job_from_ledger(run, DISKS, default_quota=7) is None  # no live job: its model is not held
    assert write(ledger, ended, {RUN.job: Release(RUN)})[1] == ended
    ledger, ended = write(ledger, ended, {RUN.job: Release()})
    assert placed_jobs(annotations(ledger, ended)) == {} and annotations(ledger, ended)[ENDED_ANNOTATION] is None


def test_placed_again_the_job_is_live_again():
    """A job sent back to Pending and placed on the same node again: one live entry, no ended record."""
    ledger, ended = write({}, {}, {RUN.job: RUN})
    ledger, ended = write(ledger, ended, {RUN.job: Release(end="Pending")})
    ledger, ended = write(ledger, ended, {RUN.job: RUN})
    assert ended == {} and placed_jobs(annotations(ledger, ended))["team/run"].live


def test_same_hold_with_new_facts_replaces_the_entry():
    """An entry recorded without the agent's facts (an older operator) is replaced by the same hold with them;
    a different hold for the job is still refused."""
    bare = Claim("team/run", "gpu-1", (1,), "ssd1", 3 << 30)
    after, accepted = apply_changes({bare.job: bare}, {RUN.job: RUN})
    assert accepted == {RUN.job: True} and after[RUN.job] == RUN
    moved = Claim("team/run", "gpu-1", (0,), "ssd0", 3 << 30, uid="u-run")
    assert apply_changes({RUN.job: RUN}, {RUN.job: moved})[1] == {RUN.job: False}


@pytest.mark.parametrize(("claims", "expected"), [
    ({"../etc/run": {"gpus": [0], "disk": "ssd0"}}, []),
    ({"team/Run_": {"gpus": [0], "disk": "ssd0"}}, []),
    ({"team": {"gpus": [0], "disk": "ssd0"}}, []),
    ({"team/run": {"gpus": [0], "disk": "/etc", "model": "../../x", "kv": 5}}, [("team/run", "", "", 5)]),
], ids=["dotdot", "bad-name", "no-slash", "bad-disk-model"])
def test_entries_that_could_become_bad_paths_are_dropped_or_sanitized(claims, expected):
    """A key that is not <namespace>/<name> gives no job; a disk the node lacks or a model that is not an id is
    dropped (the directory goes to the emptiest paired disk, no model is held)."""
    jobs = [job_from_ledger(p, DISKS, default_quota=1) for p in placed_jobs({CLAIMS_ANNOTATION: json.dumps(claims)})
            .values()]
    jobs = [j for j in jobs if j is not None]
    assert [(j.key, j.disk, j.model_id, j.quota) for j in jobs] == expected


@pytest.mark.parametrize("raw", ["not json", "[1]", json.dumps({"team/x": {"kv": "lots"}}),
                                 json.dumps({"team/x": {"end": 3}})], ids=["garbage", "list", "bad-kv", "bad-end"])
def test_malformed_annotations_list_no_job(raw):
    assert placed_jobs({CLAIMS_ANNOTATION: raw if "end" not in raw else "{}", ENDED_ANNOTATION: raw}) == {}
