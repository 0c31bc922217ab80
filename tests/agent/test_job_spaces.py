"""Job spaces by a real agent: created with kv/ and a quota, usage checked, progress relayed, removed when
the job is gone, including jobs removed while the agent was down."""

from __future__ import annotations

import json
import os

from agent_harness import wait_for


def write_progress(job_dir, **doc):
    tmp = job_dir / ".progress.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, job_dir / "progress.json")


def test_create_relay_quota_remove(tmp_path, agents):
    """PUT a job: its directory appears (owned by the pod's uid); progress.json is relayed; exceeding the
    quota is reported; DELETE: the directory goes."""
    disk = tmp_path / "ssd0"
    agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}]}).start()
    assert agent.request("PUT", "/v1/jobs/team/run-1", {"quota": "1Mi", "uid": 1000, "gid": 2000})[0] == 202
    job_dir = disk / "jobs" / "team" / "run-1"
    wait_for(lambda: (job_dir / "kv").is_dir(), 10, what="job dir", log=agent.log)
    if os.geteuid() == 0:
        assert (job_dir.stat().st_uid, job_dir.stat().st_gid) == (1000, 2000)
    write_progress(job_dir, phase="running", promptsDone=2, promptsTotal=8, tokens=100, tokensPerSecond=12.5,
                   timings={"load_weight": 0.5}, updated="2025-01-01T00:00:00Z")
    def job():  # the directory can appear before the job table that lists it is published: wait for both
        return agent.inventory()["jobs"].get("team/run-1", {})

    wait_for(lambda: (job().get("progress") or {}).get("progress", {}).get("summary") == "2/8",
             10, what="progress relayed", log=agent.log)
    alloc = agent.inventory()["status"]["kvAllocations"]
    assert alloc == [{"job": "team/run-1", "disk": "ssd0", "bytes": 1 << 20, "path": str(job_dir)}]

    (job_dir / "kv" / "layer0.kv").write_bytes(os.urandom(2 << 20))
    wait_for(lambda: job().get("overQuota"), 10, what="over quota", log=agent.log)

    def quota_condition():  # the status is rewritten after the job table, in the same pass: wait for both
        return {c["type"]: c for c in agent.inventory()["status"]["conditions"]}["KVWithinQuota"]

    wait_for(lambda: quota_condition()["status"] == "False", 10, what="KVWithinQuota False", log=agent.log)
    assert "team/run-1" in quota_condition()["message"]
    assert "kubeflash_agent_kv_over_quota_jobs 1.0" in agent.get("/metrics")[1]

    assert agent.request("DELETE", "/v1/jobs/team/run-1")[0] == 200
    # the namespace directory goes right after the job's (same pass): wait for both
    wait_for(lambda: not (disk / "jobs" / "team").exists(), 10, what="job dir removed", log=agent.log)
    assert json.loads((disk / "catalog.json").read_text())["jobs"] == {}


def test_job_removed_while_agent_down(tmp_path, agents):
    """A job dropped while the agent was not running has its space removed at the next start; the
    unrelated job's space (and its results) stay."""
    disk = tmp_path / "ssd0"
    jobs = [{"namespace": "a", "name": "keep", "quota": "1Mi"}, {"namespace": "a", "name": "gone", "quota": "1Mi"}]
    agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}], "jobs": jobs})
    assert agent.run_once() == 0, agent.log()
    (disk / "jobs" / "a" / "keep" / "results.jsonl").write_text('{"custom_id": "1"}\n')
    assert (disk / "jobs" / "a" / "gone" / "kv").is_dir()
    agent.config["jobs"] = jobs[:1]
    assert agent.run_once() == 0, agent.log()
    assert not (disk / "jobs" / "a" / "gone").exists()
    assert (disk / "jobs" / "a" / "keep" / "results.jsonl").read_text() == '{"custom_id": "1"}\n'


def test_interrupted_delete_is_finished_at_start(tmp_path, agents):
    """A `.trash-*` entry (a delete cut short by kill -9) is removed on the next start."""
    disk = tmp_path / "ssd0"
    (disk / "jobs" / ".trash-x-123" / "x" / "kv").mkdir(parents=True)
    (disk / "models" / ".staging-m-abc").mkdir(parents=True)
    agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}]})
    assert agent.run_once() == 0, agent.log()
    assert os.listdir(disk / "jobs") == [] and os.listdir(disk / "models") == []
