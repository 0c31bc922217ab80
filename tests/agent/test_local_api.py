"""The local HTTP API: health, inventory and Prometheus metrics on loopback or a Unix socket, nowhere else."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys

from agent_harness import ENV, REPO, model_id


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def test_loopback_endpoints(tmp_path, tiny_models, agents):
    """/healthz, /v1/inventory and /metrics answer on 127.0.0.1 with what the agent knows."""
    uri = str(tiny_models / "tiny-c")
    agent = agents({"disks": [{"name": "ssd0", "path": str(tmp_path / "ssd0")}],
                    "gpus": [{"index": 0, "name": "fake", "memory": "16Gi", "pciRoot": "0000:00"}],
                    "allowedSourceRoots": [str(tiny_models)], "models": [uri]}).start()
    assert agent.api.startswith("http://127.0.0.1:")
    assert agent.get("/healthz") == (200, "ok\n")
    agent.wait_model(model_id(uri))
    inv = agent.inventory()
    assert inv["node"] == "test-node" and inv["mode"] == "local"
    assert [(p["gpu"], p["disk"]) for p in inv["pairs"]] == [(0, "ssd0")]  # reason depends on this machine
    assert inv["status"]["heartbeat"] and inv["labels"] == {"kubeflash.io/gpu-ssd-pairs": "1",
                                                             "kubeflash.io/agent": "ready"}
    metrics = agent.get("/metrics")[1]
    for name in ("kubeflash_agent_disk_free_bytes{disk=\"ssd0\"}", "kubeflash_agent_gpu_ssd_pairs 1.0",
                 "kubeflash_agent_models{state=\"Ready\"} 1.0", "kubeflash_agent_heartbeat_timestamp_seconds"):
        assert name in metrics
    assert agent.get("/nope")[0] == 404


def test_heartbeat_advances(tmp_path, agents):
    """status.json is rewritten every pass with a newer heartbeat."""
    import time

    agents({"disks": [{"name": "ssd0", "path": str(tmp_path / "ssd0")}], "interval": 0.5}).start()
    first = json.loads((tmp_path / "ssd0" / "status.json").read_text())["heartbeat"]
    time.sleep(2.2)
    assert json.loads((tmp_path / "ssd0" / "status.json").read_text())["heartbeat"] > first


def test_unix_socket(tmp_path, agents):
    """With listen: unix:/path the API is a socket file only the node can reach."""
    sock = tmp_path / "run" / "agent.sock"
    agent = agents({"disks": [{"name": "ssd0", "path": str(tmp_path / "ssd0")}], "listen": f"unix:{sock}"})
    agent.start(wait=False)

    def healthy():
        try:
            c = UnixConnection(str(sock))
            c.request("GET", "/healthz")
            return c.getresponse().status == 200
        except OSError:
            return False

    from agent_harness import wait_for

    wait_for(healthy, 30, what="unix socket API", log=agent.log)
    c = UnixConnection(str(sock))
    c.request("GET", "/v1/inventory")
    assert json.loads(c.getresponse().read())["node"] == "test-node"
    assert oct(sock.stat().st_mode & 0o777) == "0o660"


def test_refuses_non_loopback_listen(tmp_path):
    """Binding the API to all interfaces is a config error: exit code 2 and a message naming the field."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"kube: false\nlisten: 0.0.0.0:9477\ndisks: [{{path: {tmp_path}/d}}]\n")
    r = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "agent", "-c", str(cfg)], env=ENV, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "listen must be 127.0.0.1:PORT" in r.stderr


def test_second_agent_on_same_store_refused(tmp_path, agents):
    """Two agents never manage one store: the second exits saying the lock is held."""
    disks = [{"name": "ssd0", "path": str(tmp_path / "ssd0")}]
    agents({"disks": disks}).start()
    second = agents({"disks": disks})
    assert second.run_once(timeout=60) == 1
    assert "another agent is running" in second.log()
