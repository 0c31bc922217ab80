"""Every I/O backend returns the same bytes, into host and device buffers, aligned or not."""

from __future__ import annotations

import os

import pytest
import torch

from kubeflash_node.engine.io import BACKENDS, make_reader


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "blob.bin"
    data = os.urandom((48 << 20) + 3 * 4096)
    path.write_bytes(data)
    return path, torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _backends():
    names = ["posix", "odirect"]
    try:
        import kvikio  # noqa: F401

        names.append("kvikio")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("offset, size", [(0, 16 << 20), (4096 * 5, 8 << 20), (32 << 20, (16 << 20) + 3 * 4096)],
                         ids=["start", "aligned-mid", "tail"])
def test_backend_bytes_identical(blob, name, offset, size):
    """Reads into pinned host memory (and device memory where the backend can) equal the file's bytes."""
    path, ref = blob
    reader = make_reader(name, cuda=True)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    reader.read_into(path, offset, host)
    assert torch.equal(host, ref[offset:offset + size])
    if getattr(reader, "device_capable", False):
        dev = torch.empty(size, dtype=torch.uint8, device="cuda")
        reader.read_into(path, offset, dev)
        assert torch.equal(dev.cpu(), ref[offset:offset + size])


def test_auto_picks_a_backend_and_names_it(blob):
    """auto on CUDA picks kvikio when importable, else O_DIRECT; the choice is reported by name."""
    path, _ = blob
    reader = make_reader("auto", cuda=True, probe=path)
    assert reader.name in BACKENDS
