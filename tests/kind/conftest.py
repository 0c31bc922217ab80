"""Fixtures for the kind end-to-end tests: one kind cluster per run, made by kind/e2e.sh.

Fixture:
  kind_cluster  session: a Kind handle (kubectl/docker helpers) for a cluster with fake GPUs, both images
                loaded and the chart installed (`kind/e2e.sh up`); deleted afterwards unless KEEP=1.
The cluster is named $KUBEFLASH_KIND_CLUSTER (default kubeflash-pytest); a running one of that name is
reused. Tests that need it skip, with the reason, when `kind` is not on PATH or `docker info` fails. A failing
test's report carries the operator, agent and pod logs and the cluster's warning events (e2e_cases.attach_logs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import e2e_cases as cases

REPO = Path(__file__).resolve().parents[2]
E2E = REPO / "kind" / "e2e.sh"


def pytest_configure(config):
    config.addinivalue_line("markers", "kind: needs Docker and kind (full images, a local kind cluster)")


def docker_problem() -> str | None:
    """Why a kind cluster cannot be made here, or None."""
    if shutil.which("kind") is None:
        return "kind is not on PATH (https://kind.sigs.k8s.io)"
    if shutil.which("docker") is None:
        return "docker is not on PATH"
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`docker info` failed: {e}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`docker info` failed (no Docker engine?): {last}"
    return None


class Kind(cases.Kubectl):
    """kubectl and docker against the kind cluster."""

    def __init__(self, name: str, kubeconfig: Path):
        super().__init__(kubeconfig)
        self.name = name

    def on_node(self, node: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside a kind node (its container is named after the node)."""
        proc = subprocess.run(["docker", "exec", node, *cmd], capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"on {node}: {' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc


_USED: dict = {}


@pytest.fixture(scope="session")
def kind_cluster():
    problem = docker_problem()
    if problem:
        pytest.skip(f"kind e2e needs Docker and kind: {problem}")
    name = os.environ.get("KUBEFLASH_KIND_CLUSTER", "kubeflash-pytest")
    kubeconfig = Path(f"/tmp/kubeflash-{name}.kubeconfig")
    env = dict(os.environ, CLUSTER=name, KUBECONFIG_FILE=str(kubeconfig))
    subprocess.run(["bash", str(E2E), "up"], env=env, check=True, timeout=3600)
    try:
        _USED["up"] = Kind(name, kubeconfig)
        yield _USED["up"]
    finally:
        _USED.pop("up", None)
        if os.environ.get("KEEP", "0") != "1":
            subprocess.run(["bash", str(E2E), "down"], env=env, check=False, timeout=600)


@pytest.fixture
def kind_namespace(kind_cluster):
    """A fresh namespace in the kind cluster; its jobs are deleted with it afterwards."""
    with cases.namespace(kind_cluster, "e2e") as name:
        yield name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    cases.attach_logs(outcome.get_result(), item, _USED.get("up"), "kind: operator, agent and pod logs")
