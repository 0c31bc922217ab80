"""GPU tests run only where CUDA is present (the lent GPU machine); elsewhere they skip with the reason."""

from __future__ import annotations

import pytest

try:
    import torch

    HAVE_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAVE_CUDA = False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)
            if not HAVE_CUDA:
                item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (run `make test-gpu` there)"))
