"""Guarded http(s) downloads of model sources: allowlisted hosts, no private or cluster addresses, a size cap.

The URL comes from whoever may create an InferenceJob, and the download runs from the node's network, so a
plain `urlopen` would be a server-side request forgery tool. Here:
- the host must be on the allowlist (empty list: any host) before anything is resolved;
- every address the name resolves to is checked, and the connection goes to that checked address (no second
  lookup a rebinding DNS server could answer differently): loopback, private (RFC 1918, ULA), shared
  (100.64/10), link-local (169.254/16, fe80::/10: cloud metadata), multicast, reserved and unspecified
  addresses are refused unless the host is also listed in `private_hosts` (an in-cluster mirror, say);
  link-local and unspecified are refused even then;
- redirects are followed by hand (at most MAX_REDIRECTS), each hop checked as above; https -> http refused;
- a Content-Length over the cap is refused before reading, and a body without one is cut off at the cap;
- credentials in a URL (user:pass@, query values) never appear in a message: see redact().
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit, urlunsplit

MAX_REDIRECTS = 5
DEFAULT_MAX_BYTES = 200 << 30
_ALWAYS_REFUSED = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
                   ipaddress.ip_network("0.0.0.0/8"), ipaddress.ip_network("::/128"))
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, often a cluster's pod or service range


class FetchRefused(Exception):
    """A download the policy forbids or a response that breaks it; str() is safe to show (credentials redacted)."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_hosts: tuple[str, ...] = ()  # exact host names or IP literals, or "*.example.com"; empty: any host
    private_hosts: tuple[str, ...] = ()  # hosts allowed to resolve to loopback/private/shared addresses; "*": any
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = 60.0


def redact(url: str) -> str:
    """The URL with user:password@ replaced by ***@ and every query value by ***; the #sha256 pin stays."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if not p.scheme or not p.netloc:
        return url
    netloc = p.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{kv.split('=', 1)[0]}=***" if "=" in kv else "***" for kv in p.query.split("&")) \
        if p.query else ""
    return urlunsplit((p.scheme, netloc, p.path, query, p.fragment))


def host_allowed(host: str, allow: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for pat in allow:
        pat = pat.lower().rstrip(".")
        if pat == "*" or host == pat or (pat.startswith("*.") and host.endswith(pat[1:]) and len(host) > len(pat) - 1):
            return True
    return not allow


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, *, private_ok: bool) -> str:
    """Why a connection to `ip` is refused, or "" where it is allowed."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if any(ip in n for n in _ALWAYS_REFUSED if n.version == ip.version):
        return f"{ip} is a link-local or unspecified address (cloud metadata lives there)"
    if ip.is_multicast or ip.is_reserved:
        return f"{ip} is a multicast or reserved address"
    inside = ip.is_loopback or ip.is_private or (ip.version == 4 and ip in _SHARED) or not ip.is_global
    if inside and not private_ok:
        return f"{ip} is a loopback, private or cluster address"
    return ""


def check_url(url: str, policy: FetchPolicy) -> tuple[str, str, int, str]:
    """(scheme, host, port, checked address) of a URL the policy allows; raises FetchRefused."""
    p = urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise FetchRefused(f"{redact(url)}: only http(s) URLs with a host are fetched")
    host = p.hostname
    if not host_allowed(host, policy.allow_hosts):
        raise FetchRefused(f"{redact(url)}: host {host!r} is not in this node's httpSources.allowHosts")
    port = p.port or (443 if p.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchRefused(f"{redact(url)}: cannot resolve {host!r} ({e})") from None
    private_ok = host_allowed(host, policy.private_hosts) if policy.private_hosts else False
    addrs = list(dict.fromkeys(i[4][0] for i in infos))
    for a in addrs:  # every answer, so a name with one public and one private address is refused
        why = address_refusal(ipaddress.ip_address(a.split("%", 1)[0]), private_ok=private_ok)
        if why:
            raise FetchRefused(f"{redact(url)}: {host!r} resolves to {why}; refused")
    return p.scheme, host, port, addrs[0]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, addr: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._addr = addr

    def connect(self) -> None:
        self.sock = socket.create_connection((self._addr, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, addr: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._addr = addr

    def connect(self) -> None:
        sock = socket.create_connection((self._addr, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def open_checked(url: str, policy: FetchPolicy) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    """A 200 response for `url`, redirects followed by hand with every hop checked; caller closes the
    connection. Raises FetchRefused, or http.client/OSError for transport failures."""
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, addr = check_url(url, policy)
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(host, port, addr, policy.timeout)
        p = urlsplit(url)
        target = (p.path or "/") + (f"?{p.query}" if p.query else "")
        headers = {"User-Agent": "kubeflash-agent", "Accept-Encoding": "identity"}
        if p.username is not None:  # never sent on to a redirect target: it is only in this hop's URL
            import base64

            token = base64.b64encode(f"{p.username}:{p.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        conn.request("GET", target, headers=headers)
        r = conn.getresponse()
        if r.status in (301, 302, 303, 307, 308):
            loc = r.getheader("Location")
            conn.close()
            if not loc:
                raise FetchRefused(f"{redact(url)}: HTTP {r.status} without a Location")
            nxt = urljoin(url, loc)
            if scheme == "https" and urlsplit(nxt).scheme != "https":
                raise FetchRefused(f"{redact(url)}: redirect from https to {redact(nxt)} refused")
            url = nxt
            continue
        if r.status != 200:
            conn.close()
            raise FetchRefused(f"{redact(url)}: HTTP {r.status} {r.reason}")
        return r, conn
    raise FetchRefused(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")


def download(url: str, out: BinaryIO, policy: FetchPolicy, *, sha256: str = "",
             on_length: Callable[[int], None] | None = None,
             progress: Callable[[int, int], None] | None = None) -> str:
    """Stream `url` into `out` under `policy`; returns the sha256 hex of the body. `on_length(n)` is called
    with the announced length (0 when none) before the body is read; `sha256` (when given) must match."""
    r, conn = open_checked(url, policy)
    try:
        length = r.getheader("Content-Length")
        total = int(length) if length and length.isdigit() else 0
        if total > policy.max_bytes:
            raise FetchRefused(f"{redact(url)}: {total} bytes announced, over this node's limit "
                               f"(httpSources.maxBytes: {policy.max_bytes})")
        if on_length:
            on_length(total)
        h, done = hashlib.sha256(), 0
        while block := r.read(1 << 20):
            done += len(block)
            if done > policy.max_bytes:
                raise FetchRefused(f"{redact(url)}: the download passed this node's limit "
                                   f"(httpSources.maxBytes: {policy.max_bytes}) and was stopped")
            out.write(block)
            h.update(block)
            if progress:
                progress(done, total)
        if total and done != total:
            raise FetchRefused(f"{redact(url)}: the download ended after {done} of {total} bytes")
    finally:
        conn.close()
    digest = h.hexdigest()
    if sha256 and digest != sha256.lower():
        raise FetchRefused(f"{redact(url)}: sha256 of the download is {digest}, the URL's #sha256 pin says "
                           f"{sha256.lower()}")
    return digest
