"""Fixtures for tests against a real Kubernetes control plane (see controlplane.py).

Fixtures:
  control_plane  session: a started ControlPlane (built via kind/build-control-plane.sh)
  kubeconfig     session: path (str) of its admin kubeconfig
  k8s_api        session: kubernetes.client.ApiClient configured from that kubeconfig
  namespace      function: a fresh namespace name, deleted afterwards

When the binaries cannot be built (no Go, build failure) the tests are skipped, unless
KUBEFLASH_REQUIRE_CLUSTER is set (CI), in which case they fail.
Every test under tests/cluster gets the ``cluster`` marker.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import BuildError, ControlPlane, ControlPlaneError, build_control_plane  # noqa: E402

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            in_here = Path(item.path).resolve().is_relative_to(_HERE)
        except (OSError, ValueError):
            in_here = False
        if in_here:
            item.add_marker(pytest.mark.cluster)


_BUILD: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """Build the binaries before any test runs when a cluster test is selected.

    Done here rather than in the fixture so that a cold build (tens of minutes) is not
    counted against a test's pytest-timeout; its progress lines go to the terminal.
    """
    if session.config.option.collectonly or os.environ.get("KUBEFLASH_K8S_BIN"):
        return
    if not any(item.get_closest_marker("cluster") for item in session.items):
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    try:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                _BUILD["bin_dir"] = build_control_plane()
        else:
            _BUILD["bin_dir"] = build_control_plane()
    except (BuildError, OSError) as e:
        _BUILD["error"] = e


def _required() -> bool:
    return os.environ.get("KUBEFLASH_REQUIRE_CLUSTER", "") not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def control_plane():
    """A running etcd + kube-apiserver + controller-manager + scheduler + kwok, once per run."""
    try:
        if os.environ.get("KUBEFLASH_K8S_BIN"):
            bin_dir = Path(os.environ["KUBEFLASH_K8S_BIN"])
        elif "error" in _BUILD:
            raise _BUILD["error"]
        else:
            bin_dir = _BUILD.get("bin_dir") or build_control_plane()
    except (BuildError, OSError) as e:
        reason = getattr(e, "reason", str(e))
        if _required():
            pytest.fail(f"KUBEFLASH_REQUIRE_CLUSTER is set but the control plane could not be built: {e}")
        pytest.skip(f"control plane binaries unavailable: {reason} "
                    f"(set KUBEFLASH_REQUIRE_CLUSTER=1 to make this a failure)")
    try:
        cp = ControlPlane(bin_dir).start()
    except ControlPlaneError as e:
        # Built but does not start: that is a bug, never a skip.
        pytest.fail(f"control plane failed to start: {e}")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane) -> str:
    """Path of the admin kubeconfig (token auth, CA data embedded)."""
    return str(control_plane.kubeconfig)


@pytest.fixture(scope="session")
def k8s_api(kubeconfig):
    """kubernetes.client.ApiClient for the test cluster."""
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(control_plane):
    """A fresh namespace for one test; deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def k8s_bin_dir() -> Path:
    """The control plane binaries, for a test that starts its own ControlPlane (e.g. with an audit log)."""
    try:
        if os.environ.get("KUBEFLASH_K8S_BIN"):
            return Path(os.environ["KUBEFLASH_K8S_BIN"])
        if "error" in _BUILD:
            raise _BUILD["error"]
        return _BUILD.get("bin_dir") or build_control_plane()
    except (BuildError, OSError) as e:
        if _required():
            pytest.fail(f"KUBEFLASH_REQUIRE_CLUSTER is set but the control plane could not be built: {e}")
        pytest.skip(f"control plane binaries unavailable: {getattr(e, 'reason', str(e))}")
