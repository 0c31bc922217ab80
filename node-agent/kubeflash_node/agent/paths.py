"""Where things go on a store disk, and which model sources are acceptable: no user string becomes a path.

Model directories are named by the agent's own model id; job directories by validated Kubernetes names. A
local source must be an absolute path whose real location (symlinks resolved, for the directory and every
entry in it) is under one of the configured allowed roots; `..` is refused outright.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from kubeflash_node.store.fetch import host_allowed, redact
from kubeflash_node.store.ids import job_dir_name

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
ARCHIVES = {".tar": "source.tar", ".tar.gz": "source.tar.gz", ".tgz": "source.tar.gz"}


class SourceRejected(ValueError):
    """A model source the agent refuses to read; the message says why and what is accepted."""


@dataclass(frozen=True)
class Source:
    """A checked model source, in the form the staging worker receives it."""

    kind: str  # builtin | dummy | http | local
    ref: str  # builtin:NAME, dummy:NAME, the URL, or the resolved absolute path
    fetch_name: str = ""  # http only: the agent-chosen file name of the download (source.gguf, source.tar…)
    sha256: str = ""  # http only: expected digest of the download, from a `#sha256=<hex>` URL fragment


def resolve_source(uri: str, *, allowed_roots: tuple[Path, ...], allow_http: bool = False,
                   allow_dummy: bool = True, http_hosts: tuple[str, ...] = ()) -> Source:
    """Check a model uri and say how to read it; raises SourceRejected."""
    uri = uri.strip()
    if not uri or any(ord(c) < 32 for c in uri):
        raise SourceRejected("model uri is empty or contains control characters")
    for prefix, allowed in (("builtin:", True), ("dummy:", allow_dummy)):
        if uri.startswith(prefix):
            name = uri[len(prefix):]
            if not allowed:
                raise SourceRejected(f"{prefix} sources are disabled on this node (allowDummy: false)")
            if not _NAME.match(name):
                raise SourceRejected(f"{uri!r}: the name after {prefix!r} must be lowercase letters, digits, '.', '-'")
            return Source(prefix[:-1], f"{prefix}{name}")
    if uri.startswith(("http://", "https://")):
        return _http(uri, allow_http, http_hosts)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif m := _SCHEME.match(uri):
        raise SourceRejected(f"{uri!r}: scheme {m.group(1)!r} is not supported; expected builtin:, dummy:, "
                             "http(s):// or an absolute path under an allowed root")
    return Source("local", str(confine(uri, allowed_roots)))


def _http(uri: str, allow_http: bool, hosts: tuple[str, ...]) -> Source:
    """An http(s) source's form and host; addresses and redirects are checked by store.fetch when it runs."""
    shown = redact(uri)  # user:pass@ and query tokens never reach a status message or a log
    if not allow_http:
        raise SourceRejected(f"{shown}: http(s) sources are disabled on this node (allowHttp: false)")
    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        raise SourceRejected(f"{shown}: not a valid URL") from None
    if not host:
        raise SourceRejected(f"{shown}: the URL has no host")
    if not host_allowed(host, hosts):
        raise SourceRejected(f"{shown}: host {host!r} is not in this node's httpSources.allowHosts")
    sha = ""
    if parts.fragment:
        m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", parts.fragment)
        if not m:
            raise SourceRejected(f"{shown}: the only URL fragment understood is #sha256=<64 hex digits>")
        sha = m.group(1).lower()
    path = parts.path.lower()
    url = uri.split("#", 1)[0]
    if path.endswith(".gguf"):
        return Source("http", url, "source.gguf", sha)
    for suffix, name in ARCHIVES.items():
        if path.endswith(suffix):
            return Source("http", url, name, sha)
    raise SourceRejected(f"{shown}: expected a URL ending in .gguf (a GGUF file) or .tar/.tar.gz/.tgz "
                         "(a Hugging Face model directory)")


def confine(path: str, allowed_roots: tuple[Path, ...]) -> Path:
    """The real path of a local source, if it lies under an allowed root; raises SourceRejected."""
    p = PurePosixPath(path)
    if not p.is_absolute():
        raise SourceRejected(f"{path!r}: a local model source must be an absolute path")
    if ".." in p.parts:
        raise SourceRejected(f"{path!r}: '..' is not allowed in a model source path")
    if not allowed_roots:
        raise SourceRejected(f"{path!r}: local model sources are disabled on this node (allowedSourceRoots is empty)")
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(r)) for r in allowed_roots]
    if not any(_under(real, r) for r in roots):
        shown = ", ".join(str(r) for r in allowed_roots)
        raise SourceRejected(f"{path!r} is outside the allowed source roots ({shown})")
    if real.is_dir():
        for entry in real.iterdir():
            target = Path(os.path.realpath(entry))
            if not any(_under(target, r) for r in roots):
                raise SourceRejected(f"{path!r}: {entry.name} links outside the allowed source roots")
    return real


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# ------------------------------------------------------------------------------------- store layout


def check_id(model_id: str) -> str:
    if not _ID.match(model_id):
        raise ValueError(f"{model_id!r} is not a model id")
    return model_id


def models_dir(disk_path: Path) -> Path:
    return disk_path / "models"


def model_dir(disk_path: Path, model_id: str) -> Path:
    return models_dir(disk_path) / check_id(model_id)


def jobs_dir(disk_path: Path) -> Path:
    return disk_path / "jobs"


def job_dir(disk_path: Path, namespace: str, name: str) -> Path:
    return jobs_dir(disk_path) / job_dir_name(namespace, name)


def catalog_path(disk_path: Path) -> Path:
    return disk_path / "catalog.json"
