"""The agent's local API server (agent/api.py) under hostile local clients, on a real socket: a negative,
non-numeric or oversized Content-Length is refused without reading, a silent client is dropped after the
socket timeout, no more than MAX_CLIENTS requests hold threads at once (the rest get 503 and the server keeps
answering afterwards), and /healthz never carries the agent's error text."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from kubeflash_node.agent import api
from kubeflash_node.agent.config import ConfigError


class FakeLocal:
    def __init__(self):
        self.bodies = []

    def add_model(self, body):
        if not isinstance(body, dict):
            raise ConfigError("body must be a JSON object")
        self.bodies.append(body)
        return "m1"


class View:
    """What the server reads (the Agent's part); health says something secret when unhealthy."""

    def __init__(self):
        self.ok = True
        self.loc = FakeLocal()

    def health(self):
        return (True, "ok") if self.ok else (False, "ApiException: token /var/run/secrets/x rejected by 10.0.0.1")

    def inventory(self):
        return {"node": "n"}

    def metrics_text(self):
        return b"m 1\n"

    def local(self):
        return self.loc


@pytest.fixture
def server():
    view = View()
    srv = api.Server("127.0.0.1:0", view)
    srv.start()
    host, port = srv.address.rsplit(":", 1)
    yield view, (host, int(port)), srv
    srv.stop()


def raw(addr, data: bytes, timeout=5.0) -> bytes:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def post(cl: str, body: bytes = b"") -> bytes:
    return (f"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {cl}\r\n\r\n").encode() + body


@pytest.mark.parametrize("cl,code", [("-1", b"400"), ("-99999", b"400"), ("abc", b"400"), ("1e3", b"400"),
                                     ("99999999999999999999", b"400"), (str(api.MAX_BODY + 1), b"413")])
def test_bad_content_length_refused_unread(server, cl, code):
    view, addr, _ = server
    t = time.monotonic()
    reply = raw(addr, post(cl))  # no body follows: a server that tried to read it would wait for the timeout
    assert reply.split(b" ")[1] == code, reply
    assert time.monotonic() - t < 3
    assert view.loc.bodies == []


def test_short_body_and_good_body(server):
    view, addr, _ = server
    # a body shorter than announced, the client waiting: answered 408 after the timeout, nothing applied
    assert raw(addr, post("20", b'{"uri": "x"}'), timeout=api.CLIENT_TIMEOUT + 5).split(b" ")[1] == b"408"
    body = json.dumps({"uri": "builtin:x"}).encode()
    assert raw(addr, post(str(len(body)), body)).split(b" ")[1] == b"202"
    assert view.loc.bodies == [{"uri": "builtin:x"}]


def test_silent_client_is_dropped(server):
    _, addr, _ = server
    with socket.create_connection(addr) as s:
        s.settimeout(api.CLIENT_TIMEOUT + 10)
        t = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        assert s.recv(100) == b""  # the server hung up
        took = time.monotonic() - t
    assert api.CLIENT_TIMEOUT - 1 < took < api.CLIENT_TIMEOUT + 5


def test_threads_are_bounded(server):
    _, addr, srv = server
    before = threading.active_count()
    idle = [socket.create_connection(addr) for _ in range(api.MAX_CLIENTS)]
    time.sleep(0.5)
    try:
        assert threading.active_count() - before <= api.MAX_CLIENTS
        extra = [raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n") for _ in range(20)]  # all answered at once: busy
        assert all(r.startswith(b"HTTP/1.0 503") and r.endswith(b"busy\n") for r in extra), extra[:2]
        assert threading.active_count() - before <= api.MAX_CLIENTS
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n")
        if b" 200 " in reply.split(b"\r\n")[0] + b" ":
            break
        time.sleep(0.2)
    assert reply.endswith(b"ok\n")


def test_healthz_carries_no_error_text(server):
    view, addr, _ = server
    view.ok = False
    reply = raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 503") and reply.endswith(b"\r\n\r\nunhealthy\n")
    assert b"token" not in reply and b"10.0.0.1" not in reply
