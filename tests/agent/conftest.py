"""Fixtures for the agent tests: tiny real models on disk and real agent processes, always stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_harness import AgentProc, write_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A source root holding three distinct tiny llama HF directories: tiny-a, tiny-b, tiny-c."""
    root = tmp_path_factory.mktemp("sources")
    for i, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
        write_tiny_llama(root / name, seed=i)
    return root


@pytest.fixture
def agents(tmp_path):
    """Factory of AgentProc; every agent started through it is stopped at the end of the test."""
    made: list[AgentProc] = []

    def make(config: dict, **kw) -> AgentProc:
        a = AgentProc(tmp_path, config, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the requested size (MiB) at a fresh directory; unmounted afterwards."""
    mounts: list[Path] = []

    def mount(size_mb: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
        mounts.append(where)
        return where

    yield mount
    for m in mounts:
        subprocess.run(["umount", "-l", str(m)], check=False)
