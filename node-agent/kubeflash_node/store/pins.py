"""Pins: a model directory in use by a mounted volume is not evicted while a pin file names it.

`<disk>/pins/<model-id>/<holder>`: one empty file per holder (the CSI driver uses a hash of the volume id
and target). Written crash-safely; the agent's eviction treats a model with any pin as in use. Lives in the
store layer because both the CSI driver (writer) and the agent (reader) need the same layout.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kubeflash_api.names import is_model_id

from .format import atomic_write_bytes, fsync_dir

PINS = "pins"


def holder_name(*parts: str) -> str:
    """A path-safe name for whoever holds a pin (a volume id and target path are arbitrary strings)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _checked(model_id: str) -> str:
    if not is_model_id(model_id):
        raise ValueError(f"{model_id!r} is not a model id")
    return model_id


def pin(disk: Path, model_id: str, holder: str) -> Path:
    path = Path(disk) / PINS / _checked(model_id) / holder
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, b"")
    return path


def unpin(disk: Path, model_id: str, holder: str) -> None:
    folder = Path(disk) / PINS / _checked(model_id)
    (folder / holder).unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when no other holder is left
    except OSError:
        return
    fsync_dir(folder.parent)


def pinned(disk: Path) -> set[str]:
    """Model ids with at least one pin on this disk."""
    root = Path(disk) / PINS
    try:
        folders = list(os.scandir(root))
    except FileNotFoundError:
        return set()
    out = set()
    for f in folders:
        if f.is_dir(follow_symlinks=False) and any(not n.startswith(".") for n in os.listdir(f.path)):
            out.add(f.name)
    return out
