"""Fixtures for the real-node tests: one real cluster per run, made by kind/realnode.py (control plane of
tests/cluster, a real kubelet + kube-proxy + containerd on this machine, images built offline, the chart
installed with pullPolicy Never).

Fixtures:
  node_cluster    session: a Node handle (the interface tests/e2e_cases.py documents); a cluster already
                  running (`make cluster`) is brought up to date (images, chart) and left running, or with
                  KUBEFLASH_NODE_REUSE=1 used as it is; otherwise one is brought up and taken down afterwards
                  (unless KEEP=1).
  node_namespace  function: a fresh namespace; its jobs are deleted with it afterwards.
Skipped, with the reason, without root or Linux; under KUBEFLASH_REQUIRE_CLUSTER (CI, which runs as root) a
harness that cannot start is a failure. A failing test's report carries the kubelet, containerd, control plane,
operator and agent logs and the cluster's warning events.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import e2e_cases as cases

REPO = Path(__file__).resolve().parents[2]
REALNODE = REPO / "kind" / "realnode.py"
sys.path.insert(0, str(REPO / "kind"))

import realnode  # noqa: E402

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            if Path(item.path).resolve().is_relative_to(_HERE):
                item.add_marker(pytest.mark.node)
        except (OSError, ValueError):
            pass


def _required() -> bool:
    return os.environ.get("KUBEFLASH_REQUIRE_CLUSTER", "") not in ("", "0", "false", "no")


def problem() -> str | None:
    """Why a real node cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "a real node needs Linux"
    if os.geteuid() != 0:
        return "a real node needs root (kubelet, containerd, iptables, sysctls): run as root or `sudo make cluster`"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup file system at /sys/fs/cgroup"
    return None


class Node(cases.Kubectl):
    """kubectl against the real cluster; the node's file system is this machine's."""

    def on_node(self, node: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        assert node == realnode.NODE_NAME, f"unknown node {node}"
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"on {node}: {' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc


_USED: dict = {}


@pytest.fixture(scope="session")
def node_cluster():
    why = problem()
    if why:
        if _required() and os.geteuid() == 0:
            pytest.fail(f"KUBEFLASH_REQUIRE_CLUSTER is set but {why}")
        pytest.skip(why)
    was_running = realnode.cluster_running()
    reuse = was_running and os.environ.get("KUBEFLASH_NODE_REUSE", "0") == "1"  # as it is: no image rebuild
    proc = subprocess.run([sys.executable, str(REALNODE), "status" if reuse else "up"], text=True, timeout=3600)
    if proc.returncode != 0:
        logs = subprocess.run([sys.executable, str(REALNODE), "logs"], capture_output=True, text=True).stdout
        if not was_running and os.environ.get("KEEP", "0") != "1":
            subprocess.run([sys.executable, str(REALNODE), "down"], timeout=600)
        pytest.fail(f"kind/realnode.py up failed (exit {proc.returncode}); see its output above\n{logs[-20000:]}")
    try:
        _USED["up"] = Node(realnode.STATE / "kubeconfig", realnode.KUBECTL)
        yield _USED["up"]
    finally:
        _USED.pop("up", None)
        if not was_running and os.environ.get("KEEP", "0") != "1":
            subprocess.run([sys.executable, str(REALNODE), "down"], timeout=600)


@pytest.fixture
def node_namespace(node_cluster):
    with cases.namespace(node_cluster, "node") as name:
        yield name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    cases.attach_logs(outcome.get_result(), item, _USED.get("up"),
                      "real node: component, operator, agent and pod logs", lambda: realnode.component_logs(80))
