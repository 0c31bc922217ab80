"""The operator's blocking Kubernetes client (kube.Kube, and the Lease elector on the same client) gives every call a
connect and read timeout from one setting (OperatorConfig.api_timeout_s, KUBEFLASH_OPERATOR_API_TIMEOUT_S): against
a real API server address that accepts connections and never answers (a loopback socket), each kind of call (the
plain-JSON path, the metadata list, a generated call) fails within that timeout with an error naming the request."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from kubernetes import client

from kubeflash_operator.config import OperatorConfig
from kubeflash_operator.kube import Kube, RequestTimeout, api_client

TIMEOUT_S = 0.5


@pytest.fixture
def hung_server():
    """The port of a loopback server that accepts every connection and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held, stop = [], threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # kept open, never answered
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


CALLS = {
    "read_pod (GET, plain JSON)": (lambda k: k.read_pod("ns", "p"), "GET", "/api/v1/namespaces/ns/pods/p"),
    "create_pod (POST, plain JSON)": (
        lambda k: k.create_pod({"metadata": {"namespace": "ns", "name": "p", "labels": {}}, "spec": {}},
                               owner_uid="u"), "POST", "/api/v1/namespaces/ns/pods"),
    "job_uids (metadata list)": (lambda k: k.job_uids("ns"), "GET", "/apis/kubeflash.io/v1alpha1/namespaces/ns/"
                                                                     "inferencejobs"),
    "generated ConfigMap read": (lambda k: k.core.read_namespaced_config_map("cm", "ns"), "GET",
                                 "/api/v1/namespaces/ns/configmaps/cm"),
}


@pytest.mark.parametrize("name", list(CALLS), ids=list(CALLS))
def test_a_hung_api_server_fails_the_call_within_the_timeout_naming_the_request(hung_server, name):
    call, method, path = CALLS[name]
    kube = Kube(api_client(client.Configuration(host=f"http://127.0.0.1:{hung_server}"), timeout_s=TIMEOUT_S))
    got: list = []

    def run() -> None:
        t0 = time.monotonic()
        try:
            call(kube)
            got.append(("answered", time.monotonic() - t0))
        except Exception as e:  # noqa: BLE001 - the error itself is what is checked
            got.append((e, time.monotonic() - t0))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10 * TIMEOUT_S + 5)
    assert got, f"{name}: still waiting on the hung server after {10 * TIMEOUT_S + 5:g} s (no request timeout)"
    err, took = got[0]
    assert isinstance(err, RequestTimeout), err
    assert f"{method} http://127.0.0.1:{hung_server}{path}" in str(err) and f"{TIMEOUT_S:g} s" in str(err)
    assert TIMEOUT_S * 0.8 <= took < TIMEOUT_S + 1.0


def test_the_timeout_is_one_setting_read_from_the_environment():
    """KUBEFLASH_OPERATOR_API_TIMEOUT_S sets it (30 s by default); zero, negative or not a number is refused by name."""
    assert OperatorConfig().api_timeout_s == 30.0
    assert OperatorConfig.from_env({"KUBEFLASH_OPERATOR_API_TIMEOUT_S": "2.5"}).api_timeout_s == 2.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="KUBEFLASH_OPERATOR_API_TIMEOUT_S"):
            OperatorConfig.from_env({"KUBEFLASH_OPERATOR_API_TIMEOUT_S": bad})
