"""Names and paths: DNS-1123 names, model ids, and the rules that keep a user's string inside its root.

No user string ever becomes a path component on a node: models are stored under `model_id(...)`, jobs under
`<namespace>/<name>` after both are checked as DNS-1123 labels, and relative paths a user gives are resolved
(symlinks included) and must stay inside the root they are relative to.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from kubeflash_api.errors import SpecError, show

LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # DNS-1123 label
SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # DNS-1123 subdomain
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")  # a ConfigMap key
MODEL_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,60})-[0-9a-f]{16}$")
MAX_JOB_NAME = 56  # <name>-<attempt> stays a 63-character label value
_SLUG = re.compile(r"[^a-z0-9]+")


def check_label(value: object, path: str, *, max_len: int = 63) -> str:
    """`value` if it is a DNS-1123 label of at most `max_len` characters."""
    if not isinstance(value, str) or not value:
        raise SpecError(path, f"must be a non-empty string, got {show(value)}")
    if len(value) > max_len or not LABEL.fullmatch(value):
        raise SpecError(path, f"must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending "
                              f"with a letter or digit, at most {max_len} characters), got {value!r}")
    return value


def check_subdomain(value: object, path: str) -> str:
    """`value` if it is a DNS-1123 subdomain (the names of ConfigMaps and PersistentVolumeClaims)."""
    if not isinstance(value, str) or not value:
        raise SpecError(path, f"must be a non-empty string, got {show(value)}")
    if len(value) > 253 or not SUBDOMAIN.fullmatch(value):
        raise SpecError(path, f"must be a Kubernetes object name (DNS-1123 subdomain), got {value!r}")
    return value


def model_id(uri: str, *, dtype: str = "float16", quantization: str = "none", revision: str = "") -> str:
    """A stable, path-safe id: a readable slug of the source's last part plus a hash of everything."""
    key = "\n".join([uri.strip(), revision, dtype, quantization])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    # the query may hold a token: never in the readable part
    tail = uri.split("#", 1)[0].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    slug = _SLUG.sub("-", tail).strip("-")[:40].strip("-") or "model"
    return f"{slug}-{digest}"


def is_model_id(value: object) -> bool:
    return isinstance(value, str) and bool(MODEL_ID.fullmatch(value))


def job_dir_name(namespace: str, name: str) -> str:
    """`<namespace>/<name>`, the relative directory of a job's space; both parts checked as DNS-1123 labels."""
    check_label(namespace, "metadata.namespace")
    check_label(name, "metadata.name")
    return f"{namespace}/{name}"


def check_relative(value: object, path: str) -> str:
    """A relative path a user gives (`results/out.jsonl`) naming a file: no '..', not absolute, no control
    characters, normalized."""
    if not isinstance(value, str) or not value.strip():
        raise SpecError(path, f"must be a non-empty relative path, got {show(value)}")
    if len(value) > 1024 or "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SpecError(path, f"must be a relative path of at most 1024 characters without control characters (NUL, "
                              f"newline, ...) or '\\', got {value!r}")
    parts = value.split("/")
    if value.startswith("/") or ".." in parts:
        raise SpecError(path, f"must be a path relative to its root without '..', got {value!r}")
    clean = [p for p in parts if p not in ("", ".")]
    if not clean or parts[-1] in ("", "."):  # 'results/' names a folder
        raise SpecError(path, f"must name a file, got {value!r}")
    if any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in clean):  # NAME_MAX: its first write would fail
        raise SpecError(path, f"must have no part longer than 255 bytes, got {value!r}")
    return "/".join(clean)


def resolve_within(root: Path, relative: str, path: str) -> Path:
    """`root/relative` with every symlink resolved; SpecError naming `path` if that leaves `root`."""
    rel = check_relative(relative, path)
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / rel))
    if target != base and base not in target.parents:
        raise SpecError(path, f"{relative!r} resolves to {target}, outside {base} (symlinks are followed)")
    return target
