"""The agent's local HTTP API, on loopback TCP or a Unix socket only (never reachable from off the node).

GET  /healthz              200 "ok" while reconcile passes keep completing, else 503 with the reason
GET  /v1/inventory         devices, pairs, probes, models, jobs: the FlashNode status and more, as JSON
GET  /metrics              Prometheus text format
--no-kube mode only (the desired state comes from FlashNode.spec in a cluster):
POST   /v1/models                 {"uri", "dtype"?, "quantization"?, "disk"?} -> 202 {"id"}
DELETE /v1/models/<id>
PUT    /v1/jobs/<ns>/<name>       {"disk"?, "quota"?, "model"?, "dtype"?, "uid"?, "gid"?} -> 202
DELETE /v1/jobs/<ns>/<name>
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


class View(Protocol):
    """What the API reads from and writes to (the Agent)."""

    def health(self) -> tuple[bool, str]: ...
    def inventory(self) -> dict[str, Any]: ...
    def metrics_text(self) -> bytes: ...
    def local(self): ...  # the LocalSide in --no-kube mode, else None


class _Handler(BaseHTTPRequestHandler):
    server_version = "kubeflash-agent"
    view: View  # set on the subclass made per server

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
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ConfigError(f"request body over {MAX_BODY} bytes")
        try:
            return json.loads(self.rfile.read(n) or b"{}")
        except ValueError as e:
            raise ConfigError(f"request body is not JSON ({e})") from e

    def do_GET(self) -> None:
        if self.path == "/healthz":
            ok, why = self.view.health()
            self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
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
        except ConfigError as e:
            self._send(400, {"error": str(e)})


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

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
            cls = type("Server6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6}) if ":" in host \
                else ThreadingHTTPServer
            self.httpd = cls((host, int(port)), handler)
            self.address = f"{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("local API listening", extra={"address": self.address})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
