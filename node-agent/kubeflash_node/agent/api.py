"""The agent's local HTTP API, on loopback TCP or a Unix socket only (never reachable from off the node).

GET  /healthz              200 "ok" while reconcile passes keep completing, else 503 "unhealthy" (the reason is
                           in the log and /v1/inventory's lastError, never in a probe's answer)
GET  /v1/inventory         devices, pairs, probes, models, jobs: the FlashNode status and more, as JSON
GET  /metrics              Prometheus text format
--no-kube mode only (the desired state comes from FlashNode.spec in a cluster):
POST   /v1/models                 {"uri", "dtype"?, "quantization"?, "disk"?} -> 202 {"id"}
DELETE /v1/models/<id>
PUT    /v1/jobs/<ns>/<name>       {"disk"?, "quota"?, "model"?, "dtype"?, "uid"?, "gid"?} -> 202
DELETE /v1/jobs/<ns>/<name>

Bounded: a body over MAX_BODY or a Content-Length that is not a non-negative integer is refused unread (413/400),
a client idle for CLIENT_TIMEOUT seconds is dropped, and at most MAX_CLIENTS requests are served at once (the
next gets 503 at once; no thread is started for it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from .config import ConfigError

log = logging.getLogger(__name__)
MAX_BODY = 64 << 10
CLIENT_TIMEOUT = 10.0  # seconds a client may stay silent (headers, body) before it is dropped
MAX_CLIENTS = 16  # requests served at once
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nbusy\n"


class _BodyError(ConfigError):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class View(Protocol):
    """What the API reads from and writes to (the Agent)."""

    def health(self) -> tuple[bool, str]: ...
    def inventory(self) -> dict[str, Any]: ...
    def metrics_text(self) -> bytes: ...
    def local(self): ...  # the LocalSide in --no-kube mode, else None


class _Handler(BaseHTTPRequestHandler):
    server_version = "kubeflash-agent"
    view: View  # set on the subclass made per server
    timeout = CLIENT_TIMEOUT  # StreamRequestHandler sets it on the socket: a slow client times out

    def log_message(self, fmt: str, *args) -> None:
        log.debug("http", extra={"request": fmt % args})

    def address_string(self) -> str:  # Unix sockets have no client address
        return str(self.client_address[0]) if self.client_address else "unix"

    def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else (json.dumps(body, indent=1) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not raw.isdigit() or len(raw) > 12:
            raise _BodyError(400, f"Content-Length must be a non-negative integer, got {raw[:20]!r}")
        n = int(raw)
        if n > MAX_BODY:
            raise _BodyError(413, f"request body over {MAX_BODY} bytes")
        try:
            data = self.rfile.read(n)
        except TimeoutError:
            raise _BodyError(408, f"request body not received within {CLIENT_TIMEOUT:g}s") from None
        if len(data) != n:
            raise _BodyError(400, f"request body ended after {len(data)} of {n} bytes")
        try:
            return json.loads(data or b"{}")
        except ValueError as e:
            raise ConfigError(f"request body is not JSON ({e})") from e

    def do_GET(self) -> None:
        if self.path == "/healthz":
            ok, _ = self.view.health()
            self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
        elif self.path == "/v1/inventory":
            self._send(200, self.view.inventory())
        elif self.path == "/metrics":
            self._send(200, self.view.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(404, {"error": f"no such endpoint: GET {self.path}"})

    def do_POST(self) -> None:
        self._mutate("POST")

    def do_PUT(self) -> None:
        self._mutate("PUT")

    def do_DELETE(self) -> None:
        self._mutate("DELETE")

    def _mutate(self, method: str) -> None:
        local = self.view.local()
        if local is None:
            self._send(409, {"error": "the agent runs against a cluster: change FlashNode.spec.models instead"})
            return
        parts = [p for p in self.path.split("/") if p]
        try:
            if method == "POST" and parts == ["v1", "models"]:
                self._send(202, {"id": local.add_model(self._body())})
            elif method == "DELETE" and len(parts) == 3 and parts[:2] == ["v1", "models"]:
                found = local.remove_model(parts[2])
                self._send(200 if found else 404, {"removed": found})
            elif method == "PUT" and len(parts) == 4 and parts[:2] == ["v1", "jobs"]:
                self._send(202, {"job": local.put_job(parts[2], parts[3], self._body())})
            elif method == "DELETE" and len(parts) == 4 and parts[:2] == ["v1", "jobs"]:
                found = local.delete_job(parts[2], parts[3])
                self._send(200 if found else 404, {"removed": found})
            else:
                self._send(404, {"error": f"no such endpoint: {method} {self.path}"})
        except _BodyError as e:
            self.close_connection = True  # the unread body must not be taken for the next request
            self._send(e.code, {"error": str(e)})
        except ConfigError as e:
            self._send(400, {"error": str(e)})


class _Bounded:
    """A ThreadingMixIn server that serves at most MAX_CLIENTS requests at once and answers the rest 503 from
    the accepting thread (a short send, its own timeout) instead of starting a thread for each."""

    daemon_threads = True
    max_clients = MAX_CLIENTS

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(self.max_clients)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _TCPServer(_Bounded, ThreadingHTTPServer):
    pass


class _TCPServer6(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(_Bounded, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)


class Server:
    """The API server on its own thread."""

    def __init__(self, listen: str, view: View):
        handler = type("Handler", (_Handler,), {"view": view})
        if listen.startswith("unix:"):
            path = Path(listen[len("unix:"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()
            self.httpd = _UnixServer(str(path), handler)
            os.chmod(path, 0o660)
            self.address = f"unix:{path}"
        else:
            host, _, port = listen.rpartition(":")
            host = host.strip("[]")
            cls = _TCPServer6 if ":" in host else _TCPServer
            self.httpd = cls((host, int(port)), handler)
            self.address = f"{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("local API listening", extra={"address": self.address})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
