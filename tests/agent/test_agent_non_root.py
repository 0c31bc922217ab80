"""The agent as the chart runs it by default: uid/gid 1000 (the inference pods' user), no capabilities, no
new privileges, over a store handed to that user. A real `kubeflash agent` process started that way (setpriv)
stages a model, probes the disk, relays progress from a pod's 0600 file, refuses a planted `kv` link without
changing any owner, keeps its passes going and names the directory when the pod makes its whole job directory
mode 000, measures and removes a job directory whose pod locked its own subdirectories (mode 000 / 0500), and
never touches a root-owned file outside the store. Needs root (to start the agent as another user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent_harness import ENV, REPO, AgentProc, model_id, wait_for

UID = 1000
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="starting the agent as uid 1000 needs root and setpriv")


def reachable_python(where: Path) -> Path:
    """An interpreter uid 1000 can run (the agent's stage workers run its sys.executable too): this test venv's
    python lives under root's 0700 home, so a venv-shaped copy (the same interpreter binary, the same
    site-packages through a link) under `where`."""
    exe = Path(os.path.realpath(sys.executable))
    if (where / "bin" / "python").exists():
        return where / "bin" / "python"
    (where / "bin").mkdir(parents=True)
    (where / "lib" / "python3.11").mkdir(parents=True)
    shutil.copy2(exe, where / "bin" / "python")
    (where / "pyvenv.cfg").write_text(f"home = {exe.parent}\ninclude-system-site-packages = false\n")
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (where / "lib" / "python3.11" / "site-packages").symlink_to(site)
    return where / "bin" / "python"


class NonRootAgent(AgentProc):
    """AgentProc started as UID:UID with every capability dropped, as the chart's securityContext does."""

    def start(self, *, wait: bool = True) -> "NonRootAgent":
        self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--no-new-privs",
             "--inh-caps=-all", "--bounding-set=-all",
             str(reachable_python(self.workdir / "venv")), "-m", "kubeflash_node.cli", "agent", "-c", str(self.config_path)],
            env=ENV, stdout=log, stderr=log, cwd=REPO)
        if wait:
            self.wait_ready()
        return self


def heartbeats(agent: AgentProc, count: int) -> list[float]:
    """The next `count` distinct end-of-pass heartbeats from /metrics (raises after 30 s without them)."""
    seen: list[float] = []

    def more():
        for line in agent.get("/metrics")[1].splitlines():
            if line.startswith("kubeflash_agent_heartbeat_timestamp_seconds "):
                v = float(line.split()[1])
                if not seen or v != seen[-1]:
                    seen.append(v)
        return len(seen) > count

    wait_for(more, 30, what=f"{count} more agent passes", log=agent.log, every=0.05)
    return seen[1:count + 1]


def status_of(pid: int) -> dict[str, str]:
    rows = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (r.partition(":") for r in rows)}


@pytest.fixture
def open_dir():
    """A directory uid 1000 can reach (pytest's tmp_path is under a root-only 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="kf-nonroot-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def non_root_agents():
    """Factory of NonRootAgent; every agent it made is stopped at the end of the test, passed or not."""
    made: list[NonRootAgent] = []

    def make(workdir: Path, config: dict) -> NonRootAgent:
        made.append(NonRootAgent(workdir, config))
        return made[-1]

    yield make
    for a in made:
        a.stop()


def as_pod(path: Path, mode: int) -> None:
    os.chown(path, UID, UID, follow_symlinks=False)
    path.chmod(mode)


def test_non_root_agent_stages_measures_refuses_and_removes(open_dir, tiny_models, non_root_agents):
    src = shutil.copytree(tiny_models / "tiny-a", open_dir / "src" / "tiny-a")
    for p in (src.parent, src, *src.iterdir()):  # copied with pytest's 0700 modes
        p.chmod(0o755 if p.is_dir() else 0o644)
    disk = open_dir / "ssd0"
    disk.mkdir()
    os.chown(disk, UID, UID)  # what the chart's store-owner init container leaves
    secret = open_dir / "secret"  # root's, outside the store
    secret.mkdir(mode=0o700)
    (secret / "token").write_text("TOKEN")
    uri = str(src)
    agent = non_root_agents(open_dir, {"disks": [{"name": "ssd0", "path": str(disk)}], "models": [uri],
                                       "allowedSourceRoots": [str(open_dir / "src")],
                                       "probe": {"enabled": True, "maxBytes": 4 << 20, "maxSeconds": 1}}).start()

    st = status_of(agent.proc.pid)
    assert st["Uid"].split() == [str(UID)] * 4 and st["Gid"].split() == [str(UID)] * 4
    assert {st[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert st["NoNewPrivs"] == "1"

    row = agent.wait_model(model_id(uri), timeout=60)
    assert row["bytes"] > 0
    assert {p.stat().st_uid for p in (disk / "models" / model_id(uri)).rglob("*")} == {UID}
    row = wait_for(lambda: (agent.inventory()["status"]["disks"] or [{}])[0].get("readGBps"), 15,
                   what="disk probed", log=agent.log)
    assert row > 0 and (disk / "probe.json").stat().st_uid == UID  # the probe ran as uid 1000

    assert agent.request("PUT", "/v1/jobs/team/run-1", {"quota": "1Mi", "uid": UID, "gid": UID})[0] == 202
    job = disk / "jobs" / "team" / "run-1"
    wait_for(lambda: (job / "kv").is_dir(), 10, what="job dir", log=agent.log)
    # the pod: a 0600 progress file, 3 MiB in a subdirectory it then locks (000), a 0500 directory with a file
    (job / "progress.json").write_text(json.dumps({"promptsDone": 2, "promptsTotal": 5, "tokens": 11}))
    as_pod(job / "progress.json", 0o600)
    locked, readonly = job / "kv" / "locked", job / "kv" / "readonly"
    for d in (locked, readonly):
        d.mkdir()
        (d / "blob").write_bytes(os.urandom(3 << 20 if d is locked else 4096))
        as_pod(d / "blob", 0o600)
    as_pod(locked, 0o000)
    as_pod(readonly, 0o500)

    def seen():
        j = agent.inventory()["jobs"].get("team/run-1", {})
        return (j.get("progress") or {}).get("progress", {}).get("summary") == "2/5" and j.get("overQuota")

    # over its 1 MiB quota: the 3 MiB its pod locked away (mode 000) are counted
    wait_for(seen, 15, what="progress relayed and the locked 3 MiB counted", log=agent.log)

    # the pod takes all access to its whole directory away: the agent's passes go on (no pass dies on EACCES)
    as_pod(job, 0o000)
    beats = heartbeats(agent, 3)
    assert len(beats) == 3, agent.log()
    why = wait_for(lambda: agent.inventory()["jobs"].get("team/run-1", {}).get("problems", {}).get("kv"), 10,
                   what="the locked directory named", log=agent.log)
    assert why.endswith("run-1: is a directory with mode 0 the agent may not open; expected a directory its owner "
                        "can read"), why
    as_pod(job, 0o755)

    # kv replaced by a link to root's directory: refused, nothing chowned (the agent could not, and did not try)
    os.rename(job / "kv", job / "kv-old")
    os.symlink(secret, job / "kv")
    assert agent.request("PUT", "/v1/jobs/team/run-1", {"quota": "1Mi", "uid": UID, "gid": UID})[0] == 202
    wait_for(lambda: "symlink" in agent.inventory()["jobs"].get("team/run-1", {}).get("problems", {}).get("kv", ""),
             10, what="kv link refused", log=agent.log)
    assert (secret.stat().st_uid, (secret / "token").stat().st_uid, secret.stat().st_mode & 0o777) == (0, 0, 0o700)

    assert agent.request("DELETE", "/v1/jobs/team/run-1")[0] == 200
    wait_for(lambda: not (disk / "jobs" / "team").exists(), 15, what="job dir removed", log=agent.log)
    assert [p.name for p in (disk / "jobs").iterdir()] == [], "no .trash-* left behind"
    assert (secret / "token").read_text() == "TOKEN" and secret.stat().st_uid == 0
