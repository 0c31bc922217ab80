"""Shared test setup: CPU threads left for the reader pool, and the real SmolLM2 store built once per run."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    except ImportError:
        pass
