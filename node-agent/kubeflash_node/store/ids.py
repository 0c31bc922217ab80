"""Model ids and on-SSD paths derived from a model's source; no user string ever becomes a path component.

Shared by the operator (torch-free) and the agent, so both name a staged model the same way.
"""

from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(r"[^a-z0-9]+")


def model_id(uri: str, *, dtype: str = "float16", quantization: str = "none", revision: str = "") -> str:
    """A stable, path-safe id: a readable slug of the source's last part plus a hash of everything."""
    key = "\n".join([uri.strip(), revision, dtype, quantization])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    tail = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    slug = _SAFE.sub("-", tail).strip("-")[:40] or "model"
    return f"{slug}-{digest}"


def job_dir_name(namespace: str, name: str) -> str:
    """Directory name of a job's KV/output space; Kubernetes names are already DNS-safe, checked anyway."""
    for part, what in ((namespace, "namespace"), (name, "name")):
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", part):
            raise ValueError(f"job {what} {part!r} is not a valid Kubernetes name")
    return f"{namespace}/{name}"
