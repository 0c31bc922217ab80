"""A job pod is hostile: it owns its job directory and may plant symlinks, FIFOs and huge sparse files there.

Attacks against a real `kubeflash agent` process (and, for the ConfigMap export that needs a cluster, against
the agent's own KubeSide export code on the same real files): results.jsonl, progress.json and kv replaced by
symlinks to a token file outside the store, to another job's directory and to the store itself. Checked:
nothing of a target reaches what the agent reports (inventory, relayed progress, the ConfigMap payload),
nothing outside the job is chowned or deleted, the refusal is named per job, and a 10 GiB sparse
results.jsonl / progress.json does not slow the reconcile passes or their heartbeats."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent_harness import wait_for

ROOT = os.geteuid() == 0
VICTIM_PROGRESS = {"promptsDone": 7, "promptsTotal": 9, "tokens": 4242}
SECRET = "eyJhbGciOiJSUzI1NiJ9.SECRET-SERVICE-ACCOUNT-TOKEN"


@pytest.fixture
def scene(tmp_path, agents):
    """A running agent with two jobs on one disk: team/victim (uid 2000) and evil/attacker (uid 1000), and a
    token file outside the store."""
    disk = tmp_path / "ssd0"
    token = tmp_path / "secrets" / "token"
    token.parent.mkdir()
    token.write_text(SECRET)
    agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}]}).start()
    assert agent.request("PUT", "/v1/jobs/team/victim", {"uid": 2000, "gid": 2000})[0] == 202
    assert agent.request("PUT", "/v1/jobs/evil/attacker", {"uid": 1000, "gid": 1000})[0] == 202
    victim, attacker = disk / "jobs" / "team" / "victim", disk / "jobs" / "evil" / "attacker"
    wait_for(lambda: (victim / "kv").is_dir() and (attacker / "kv").is_dir(), 10, what="job dirs", log=agent.log)
    (victim / "progress.json").write_text(json.dumps(VICTIM_PROGRESS))
    (victim / "results.jsonl").write_text('{"custom_id": "victim-1", "text": "PRIVATE ANSWER"}\n')
    wait_for(lambda: job(agent, "team/victim").get("progress", {}).get("progress", {}).get("summary") == "7/9",
             10, what="victim progress relayed", log=agent.log)
    return agent, disk, token, victim, attacker


def job(agent, key) -> dict:
    return agent.inventory()["jobs"].get(key, {})


def owners(*paths: Path) -> list[tuple[int, int]]:
    return [(os.lstat(p).st_uid, os.lstat(p).st_gid) for p in paths]


def passes(agent, seconds: float) -> list[float]:
    """Heartbeat timestamps (end of each reconcile pass) seen over `seconds`, from /metrics."""
    seen: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for line in agent.get("/metrics")[1].splitlines():
            if line.startswith("kubeflash_agent_heartbeat_timestamp_seconds "):
                v = float(line.split()[1])
                if not seen or v != seen[-1]:
                    seen.append(v)
        time.sleep(0.05)
    return seen


def plant(path: Path, target: Path) -> None:
    """What the pod does: replace a name in its directory with a symlink."""
    if path.is_dir() and not path.is_symlink():
        os.rmdir(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.symlink(target, path)


@pytest.mark.parametrize("target", ["token", "victim-progress", "victim-dir", "store"])
def test_progress_symlink_leaks_nothing(scene, target):
    agent, disk, token, victim, attacker = scene
    to = {"token": token, "victim-progress": victim / "progress.json", "victim-dir": victim,
          "store": disk / "catalog.json"}[target]
    plant(attacker / "progress.json", to)
    wait_for(lambda: "progress.json" in job(agent, "evil/attacker").get("problems", {}), 10,
             what="progress.json refusal reported", log=agent.log)
    why = job(agent, "evil/attacker")["problems"]["progress.json"]
    assert why.endswith("progress.json: is a symlink; expected a regular file (links are never followed)")
    time.sleep(1)  # a few more passes
    inv = json.dumps(agent.inventory())
    assert job(agent, "evil/attacker").get("progress", {}) == {}
    assert SECRET not in inv and '"tokens": 4242' not in json.dumps(job(agent, "evil/attacker"))
    assert "refused" in agent.log() and SECRET not in agent.log()
    os.unlink(attacker / "progress.json")  # the pod stops: the note goes away with the link
    wait_for(lambda: "problems" not in job(agent, "evil/attacker") or not job(agent, "evil/attacker")["problems"],
             10, what="refusal cleared", log=agent.log)


@pytest.mark.skipif(not ROOT, reason="the agent chowns job directories only as root")
@pytest.mark.parametrize("target", ["token", "victim-dir", "store"])
def test_kv_symlink_is_not_chowned_through(scene, target):
    agent, disk, token, victim, attacker = scene
    to = {"token": token, "victim-dir": victim, "store": disk}[target]
    before = owners(to, token, victim, victim / "kv", disk)
    assert owners(attacker / "kv") == [(1000, 1000)] and owners(victim)[0] == (2000, 2000)
    plant(attacker / "kv", to)
    wait_for(lambda: "kv" in job(agent, "evil/attacker").get("problems", {}), 10, what="kv refusal reported",
             log=agent.log)
    assert job(agent, "evil/attacker")["problems"]["kv"].endswith("kv: is a symlink; expected a directory "
                                                                   "(links are never followed)")
    time.sleep(1)
    assert owners(to, token, victim, victim / "kv", disk) == before
    assert os.path.islink(attacker / "kv")  # left as the pod made it: the agent never acts through it
    assert job(agent, "team/victim").get("problems", {}) == {}


def test_removal_does_not_follow_links(scene):
    """Deleting the attacker's job removes its directory, not what its links point to."""
    agent, disk, token, victim, attacker = scene
    plant(attacker / "kv", victim)
    plant(attacker / "progress.json", token)
    os.symlink(disk / "catalog.json", attacker / "results.jsonl")
    assert agent.request("DELETE", "/v1/jobs/evil/attacker")[0] == 200
    wait_for(lambda: not attacker.exists(), 10, what="attacker removed", log=agent.log)
    assert token.read_text() == SECRET and (victim / "kv").is_dir() and (disk / "catalog.json").is_file()
    assert json.loads((victim / "progress.json").read_text()) == VICTIM_PROGRESS


def test_fifo_does_not_block_the_agent(scene):
    agent, disk, token, victim, attacker = scene
    os.mkfifo(attacker / "progress.json")
    wait_for(lambda: "FIFO" in job(agent, "evil/attacker").get("problems", {}).get("progress.json", ""), 10,
             what="FIFO refused", log=agent.log)
    beats = passes(agent, 2.0)
    assert len(beats) >= 3, beats


def test_sparse_10gib_files_do_not_stall_passes(scene):
    """results.jsonl and progress.json truncated to 10 GiB: refused by size after one fstat; reconcile passes
    (interval 0.3 s) keep their pace. The measured gaps between heartbeats are printed."""
    agent, disk, token, victim, attacker = scene
    quiet = passes(agent, 3.0)
    for name in ("results.jsonl", "progress.json"):
        with open(attacker / name, "wb") as f:
            f.truncate(10 << 30)
    wait_for(lambda: "10737418240 bytes" in job(agent, "evil/attacker").get("problems", {}).get("progress.json", ""),
             10, what="oversized progress.json refused", log=agent.log)
    loaded = passes(agent, 3.0)
    gap = lambda b: max(y - x for x, y in zip(b, b[1:]))  # noqa: E731
    print(f"heartbeat gaps: quiet max {gap(quiet):.3f}s over {len(quiet)} passes; with 10 GiB sparse files "
          f"max {gap(loaded):.3f}s over {len(loaded)} passes")
    assert len(loaded) >= len(quiet) - 2 and gap(loaded) < gap(quiet) + 1.0
    assert job(agent, "evil/attacker")["usedBytes"] < 1 << 20  # sparse: allocated blocks, not the size


# ------------------------------------------------------------------ the ConfigMap export (cluster side)


class ConfigMapRecorder:
    """Stands in for the Kubernetes API's ConfigMap calls (the thing under test is what the agent reads and
    puts into the payload, not the API client): records every patch body."""

    def __init__(self):
        self.patches: list[tuple[str, str, dict]] = []

    def patch_namespaced_config_map(self, name, ns, body, **kw):
        self.patches.append((ns, name, body))


def kube_side(key: str):
    from kubeflash_api.ledger import PlacedJob
    from kubeflash_node.agent.kube import KubeSide

    side = KubeSide.__new__(KubeSide)  # no cluster: only the export path is exercised
    side._placed = {key: PlacedJob(key=key, output="out", end="Succeeded")}  # the job ledger on its FlashNode
    side._exported, side._refused = {}, {}
    side.core = ConfigMapRecorder()
    side.ApiException = type("ApiException", (Exception,), {"status": 0})
    return side


@pytest.fixture
def spaces(tmp_path):
    """The agent's JobSpaces on a real disk directory, with the attacker's and the victim's directories."""
    from kubeflash_node.agent.catalog import Catalog
    from kubeflash_node.agent.config import JobWant
    from kubeflash_node.agent.devices import Disk
    from kubeflash_node.agent.jobs import JobSpaces

    disk_path = tmp_path / "ssd0"
    disk = Disk(name="ssd0", path=disk_path)
    disk_path.mkdir()
    js = JobSpaces((disk,), {"ssd0": Catalog(disk_path / "catalog.json")})
    js.startup()
    for ns, name in (("team", "victim"), ("evil", "attacker")):
        js.ensure(JobWant(namespace=ns, name=name), "ssd0", 1 << 20)
    token = tmp_path / "token"
    token.write_text(SECRET)
    (disk_path / "jobs" / "team" / "victim" / "results.jsonl").write_text('{"text": "PRIVATE ANSWER"}\n')
    return js, disk_path, token


def export(js, key="evil/attacker"):
    from kubeflash_node.agent.agent import Agent

    agent = Agent.__new__(Agent)  # only its results reader, on the real JobSpaces
    agent.jobs = js
    side = kube_side(key)
    side.export_results(key, js.path(key, "ssd0"), agent._results_reader(key, "ssd0"))
    return side.core.patches


@pytest.mark.parametrize("target", ["token", "victim-results", "victim-dir", "store"])
def test_results_symlink_never_reaches_the_configmap(spaces, target):
    js, disk, token = spaces
    victim = disk / "jobs" / "team" / "victim"
    to = {"token": token, "victim-results": victim / "results.jsonl", "victim-dir": victim,
          "store": disk / "catalog.json"}[target]
    os.symlink(to, disk / "jobs" / "evil" / "attacker" / "results.jsonl")
    [(ns, name, body)] = export(js)
    assert (ns, name) == ("evil", "out")
    assert body["data"]["results.jsonl"] is None
    assert body["data"]["error"] == ("results.jsonl refused: is a symlink; expected a regular file (links are never "
                                     "followed)")
    payload = json.dumps(body)
    assert SECRET not in payload and "PRIVATE ANSWER" not in payload and "jobs" not in body["data"]["error"]
    assert "results.jsonl" in js.problems["evil/attacker"]


def test_results_sparse_10gib_is_refused_unread(spaces):
    js, disk, _ = spaces
    with open(disk / "jobs" / "evil" / "attacker" / "results.jsonl", "wb") as f:
        f.truncate(10 << 30)
    t = time.monotonic()
    [(_, _, body)] = export(js)
    took = time.monotonic() - t
    print(f"export of a 10 GiB sparse results.jsonl: {took * 1000:.1f} ms")
    assert took < 1.0
    assert body["data"]["results.jsonl"] is None and "10737418240 bytes" in body["data"]["error"]


def test_results_regular_file_is_exported(spaces):
    js, disk, _ = spaces
    (disk / "jobs" / "evil" / "attacker" / "results.jsonl").write_text('{"custom_id": "a", "text": "mine"}\n')
    [(_, _, body)] = export(js)
    assert body["data"] == {"results.jsonl": '{"custom_id": "a", "text": "mine"}\n', "error": None}
    assert "evil/attacker" not in js.problems


# ------------------------------------------------------------------------- remote model sources (SSRF)


class Redirector:
    """A real HTTP server on 127.0.0.1 that answers every GET with a 302 to `location`."""

    def __init__(self, location: str):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits: list[str] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.hits.append(self.path)
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("location,why", [
    ("http://127.0.0.2:{port}/m.gguf", "host '127.0.0.2' is not in this node's httpSources.allowHosts"),
    ("http://169.254.169.254/latest/meta-data/iam/m.gguf", "169.254.169.254 is a link-local or unspecified address"),
])
def test_redirect_from_allowed_host_is_refused(tmp_path, agents, location, why):
    """The allowlist permits 127.0.0.1 (and lets it be private); its redirect to another loopback address or to
    the metadata address is refused on that hop, shown as the model's message with the query token redacted."""
    srv = Redirector(location.format(port=1))
    try:
        disk = tmp_path / "ssd0"
        extra = {"allowHosts": ["127.0.0.1", "169.254.169.254"], "privateHosts": ["127.0.0.1", "169.254.169.254"]} \
            if "169.254" in location else {"allowHosts": ["127.0.0.1"], "privateHosts": ["127.0.0.1"]}
        agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}], "allowHttp": True, "httpSources": extra,
                        "retryInterval": 3600}).start()
        uri = f"http://127.0.0.1:{srv.port}/m.gguf?token=s3cr3t-value"
        code, body = agent.request("POST", "/v1/models", {"uri": uri})
        assert code == 202, body
        row = agent.wait_model(body["id"], states=("Failed",), timeout=60)
        assert why in row["message"] and row["message"].startswith("download refused:")
        assert row["uri"] == f"http://127.0.0.1:{srv.port}/m.gguf?token=***"
        inv = json.dumps(agent.inventory())
        assert "s3cr3t" not in inv, inv[max(0, inv.find("s3cr3t") - 300):inv.find("s3cr3t") + 50]
        assert "s3cr3t" not in agent.log()
        assert len(srv.hits) == 1 and not list((disk / "models").glob("*/manifest.json"))
    finally:
        srv.close()


def test_http_sources_are_off_by_default(tmp_path, agents):
    agent = agents({"disks": [{"name": "ssd0", "path": str(tmp_path / "ssd0")}], "retryInterval": 3600}).start()
    srv = Redirector("http://127.0.0.1:1/x")
    try:
        code, body = agent.request("POST", "/v1/models", {"uri": f"http://127.0.0.1:{srv.port}/m.gguf"})
        row = agent.wait_model(body["id"], states=("Failed",), timeout=30)
        assert "http(s) sources are disabled on this node (allowHttp: false)" in row["message"]
        assert srv.hits == []
    finally:
        srv.close()
