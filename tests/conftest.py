"""Shared test setup: CPU threads left for the reader pool, and a dummy OPT-125m store converted once per run
(the real SmolLM2 store is tests/engine/conftest.py's)."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    except ImportError:
        pass


@pytest.fixture(scope="session")
def opt_store(tmp_path_factory):
    """dummy:opt-125m in float32 (an MHA model, no tokenizer), converted once; tests only read it."""
    from kubeflash_node.store.convert import convert

    out = tmp_path_factory.mktemp("opt125m") / "opt"
    convert("dummy:opt-125m", out, dtype="float32")
    return out
