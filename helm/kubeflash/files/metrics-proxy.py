"""Read-only window onto the kubeflash agent's loopback API for Prometheus: GET /metrics and /healthz only.

The agent serves its API on the node's loopback (127.0.0.1) so its mutating endpoints are never reachable from
off the pod; this sidecar shares the pod's network namespace and forwards just the two read-only paths.
Usage: python metrics-proxy.py LISTEN_PORT UPSTREAM_PORT
"""

import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ALLOWED = ("/metrics", "/healthz")


class Proxy(BaseHTTPRequestHandler):
    upstream = ""

    def do_GET(self) -> None:
        if self.path not in ALLOWED:
            return self._reply(404, b"only GET /metrics and /healthz\n", "text/plain")
        try:
            with urllib.request.urlopen(self.upstream + self.path, timeout=10) as r:
                self._reply(r.status, r.read(), r.headers.get("Content-Type", "text/plain"))
        except urllib.error.HTTPError as e:
            self._reply(e.code, e.read(), "text/plain")
        except OSError as e:
            self._reply(502, f"agent not reachable: {e}\n".encode(), "text/plain")

    def _reply(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # scrapes every few seconds: keep the log quiet
        pass


if __name__ == "__main__":
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    Proxy.upstream = f"http://127.0.0.1:{upstream}"
    ThreadingHTTPServer(("", listen), Proxy).serve_forever()
