"""Remote model sources through store.fetch against real HTTP servers on loopback addresses: a redirect to
another loopback address or to the link-local metadata address is refused on that hop (the target is never
contacted), names resolving to private addresses are refused after DNS, the size cap holds with and without
Content-Length, the #sha256 pin is checked, and credentials never show in a message. Plus the agent's config
keys (allowHttp off by default, httpSources) and the early allowlist refusal in resolve_source."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubeflash_node.agent.config import ConfigError, from_mapping
from kubeflash_node.agent.paths import SourceRejected, resolve_source
from kubeflash_node.store.fetch import FetchPolicy, FetchRefused, download, redact

BODY = b"GGUF" + bytes(range(256)) * 64


class Server:
    """A real HTTP server on `host`: /m.gguf the body, /nolen.gguf the body without Content-Length,
    /go?to=URL a 302 to URL; every request path is recorded."""

    def __init__(self, host: str, body: bytes = BODY):
        self.requests: list[str] = []
        srv = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def do_GET(self):
                srv.requests.append(self.path)
                if self.path.startswith("/go?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/go?to="):])
                    self.end_headers()
                    return
                self.send_response(200)
                if not self.path.startswith("/nolen"):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    a, b = Server("127.0.0.1"), Server("127.0.0.2")
    yield a, b
    a.close()
    b.close()


LOCAL = FetchPolicy(allow_hosts=("127.0.0.1",), private_hosts=("127.0.0.1",))


def fetch(url, policy=LOCAL, **kw):
    out = io.BytesIO()
    digest = download(url, out, policy, **kw)
    return out.getvalue(), digest


def test_allowed_host_downloads(servers):
    a, _ = servers
    data, digest = fetch(f"{a.url}/m.gguf")
    assert data == BODY and digest == hashlib.sha256(BODY).hexdigest()


def test_redirect_to_another_loopback_host_is_refused(servers):
    """127.0.0.1 is allowed (and may be private); its redirect to 127.0.0.2 is checked on that hop."""
    a, b = servers
    with pytest.raises(FetchRefused, match="host '127.0.0.2' is not in this node's httpSources.allowHosts"):
        fetch(f"{a.url}/go?to={b.url}/m.gguf")
    # allowlisted, but not allowed to be private: refused by the address check after resolution
    policy = FetchPolicy(allow_hosts=("127.0.0.1", "127.0.0.2"), private_hosts=("127.0.0.1",))
    with pytest.raises(FetchRefused, match="127.0.0.2 is a loopback, private or cluster address"):
        fetch(f"{a.url}/go?to={b.url}/m.gguf", policy)
    assert b.requests == [] and len(a.requests) == 2


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/m.gguf", "http://[fe80::1]/m.gguf",
                                    "http://0.0.0.0/m.gguf", "http://[::ffff:169.254.169.254]/m.gguf"])
def test_redirect_to_link_local_is_refused_even_when_listed(servers, target):
    """Link-local (cloud metadata) is refused even for a host on both lists; nothing is connected to."""
    a, _ = servers
    host = target.split("//")[1].split("/")[0].strip("[]")
    policy = FetchPolicy(allow_hosts=("127.0.0.1", host), private_hosts=("127.0.0.1", host), timeout=30)
    t = time.monotonic()
    with pytest.raises(FetchRefused, match="link-local or unspecified"):
        fetch(f"{a.url}/go?to={target}", policy)
    assert time.monotonic() - t < 5


def test_private_after_dns_resolution(servers):
    """`localhost` is allowlisted but resolves to loopback: refused before connecting."""
    a, _ = servers
    port = a.url.rsplit(":", 1)[1]
    with pytest.raises(FetchRefused, match="'localhost' resolves to .* loopback, private or cluster"):
        fetch(f"http://localhost:{port}/m.gguf", FetchPolicy(allow_hosts=("localhost",)))
    with pytest.raises(FetchRefused, match="loopback, private or cluster"):  # no allowlist: any host, public only
        fetch(f"{a.url}/m.gguf", FetchPolicy())
    assert a.requests == []


def test_size_cap_with_and_without_content_length(servers):
    a, _ = servers
    small = FetchPolicy(allow_hosts=("127.0.0.1",), private_hosts=("127.0.0.1",), max_bytes=1000)
    with pytest.raises(FetchRefused, match=f"{len(BODY)} bytes announced, over this node's limit"):
        fetch(f"{a.url}/m.gguf", small)
    out = io.BytesIO()
    with pytest.raises(FetchRefused, match="passed this node's limit"):
        download(f"{a.url}/nolen.gguf", out, small)
    assert len(out.getvalue()) <= 1000
    assert fetch(f"{a.url}/nolen.gguf")[0] == BODY


def test_sha256_pin(servers):
    a, _ = servers
    good = hashlib.sha256(BODY).hexdigest()
    assert fetch(f"{a.url}/m.gguf", sha256=good)[1] == good
    with pytest.raises(FetchRefused, match="the URL's #sha256 pin says " + "0" * 64):
        fetch(f"{a.url}/m.gguf", sha256="0" * 64)


def test_credentials_never_shown(servers):
    a, _ = servers
    url = f"http://user:hunter2@127.0.0.2:1/m.gguf?token=s3cr3t&X-Amz-Signature=abc#sha256={'a' * 64}"
    assert redact(url) == f"http://***@127.0.0.2:1/m.gguf?token=***&X-Amz-Signature=***#sha256={'a' * 64}"
    with pytest.raises(FetchRefused) as e:
        fetch(url)
    assert "hunter2" not in str(e.value) and "s3cr3t" not in str(e.value) and "abc" not in str(e.value)
    with pytest.raises(SourceRejected) as e:
        resolve_source(url, allowed_roots=(), allow_http=True, http_hosts=("example.com",))
    assert "not in this node's httpSources.allowHosts" in str(e.value)
    assert "hunter2" not in str(e.value) and "s3cr3t" not in str(e.value)


def test_agent_config_keys():
    cfg = from_mapping({"nodeName": "n"})
    assert cfg.allow_http is False and cfg.http_allow_hosts == ()
    cfg = from_mapping({"nodeName": "n", "allowHttp": True,
                        "httpSources": {"allowHosts": ["huggingface.co", "*.hf.co"], "maxBytes": "10Gi"}})
    assert cfg.http_allow_hosts == ("huggingface.co", "*.hf.co") and cfg.http_max_bytes == 10 << 30
    with pytest.raises(ConfigError, match=r"httpSources.allowHosts\[0\] must be a host name"):
        from_mapping({"nodeName": "n", "httpSources": {"allowHosts": ["https://x/"]}})
    with pytest.raises(ConfigError, match="allowHttp must be true or false"):
        from_mapping({"nodeName": "n", "allowHttp": "yes"})
    with pytest.raises(ConfigError, match="httpSources"):
        from_mapping({"nodeName": "n", "httpSources": {"allowHost": []}})
    s = resolve_source("https://cdn.hf.co/m.gguf", allowed_roots=(), allow_http=True, http_hosts=("*.hf.co",))
    assert s.kind == "http"


def test_kubeflash_run_download(servers, tmp_path):
    """store.cache.fetch_url (`kubeflash run`, the user's own machine): a LAN/loopback host is fine, the #sha256
    pin is checked, a redirect to the metadata address is refused and leaves nothing behind."""
    from kubeflash_node.store.cache import fetch_url

    a, _ = servers
    good = hashlib.sha256(BODY).hexdigest()
    out = fetch_url(f"{a.url}/m.gguf#sha256={good}", tmp_path / "dl" / "m.gguf")
    assert out.read_bytes() == BODY
    with pytest.raises(FetchRefused, match="pin says"):
        fetch_url(f"{a.url}/m.gguf#sha256={'0' * 64}", tmp_path / "dl" / "bad.gguf")
    with pytest.raises(FetchRefused, match="link-local"):
        fetch_url(f"{a.url}/go?to=http://169.254.169.254/m.gguf", tmp_path / "dl" / "meta.gguf")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["m.gguf"]
