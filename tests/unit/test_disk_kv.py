"""The disk KV tier's I/O threads: a prefix read waits for the writes queued before it, a multi-chunk read
returns the bytes written, host copies in flight stay bounded, and a failed write (ENOSPC) is raised to the
engine, never lost on the writer thread."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from kubeflash_node.engine.kvcache import DiskKV, LayerKV


def _kv(tmp_path, **kw):
    return DiskKV(device="cpu", dtype=torch.float32, num_kv_heads=2, head_dim=4, directory=tmp_path, **kw)


def _layer(k, v, start):
    kv = LayerKV(None, None, in_place=False)
    kv.new = (k, v, start)
    return kv


def test_reads_see_every_queued_write_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(DiskKV, "READ_CHUNK", 64)  # many chunks for a small prefix
    kv = _kv(tmp_path)
    kv.allocate(0, 0, batch=3, capacity=40)
    rows = []
    for step in range(10):  # prefill of 4 tokens, then 9 one-token steps, each queued behind the last
        s = 4 if step == 0 else 1
        k, v = torch.randn(3, 2, s, 4), torch.randn(3, 2, s, 4)
        start = sum(r[0].shape[2] for r in rows)
        kv.store(0, 0, _layer(k, v, start))
        rows.append((k, v))
        kv.prefetch(0, 0, start + s)
        got = kv.load(0, 0, start + s)
        assert torch.equal(got.k, torch.cat([r[0] for r in rows], dim=2))
        assert torch.equal(got.v, torch.cat([r[1] for r in rows], dim=2))
        assert len(kv.writing) <= DiskKV.WRITES_IN_FLIGHT
    kv.close()


def test_a_failed_write_is_raised(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    kv = _kv(tmp_path)
    kv.allocate(0, 0, batch=1, capacity=8)
    fd, b = kv.files[0, 0]
    os.close(fd)
    kv.files[0, 0] = (os.open("/dev/full", os.O_WRONLY), b)  # every write gets ENOSPC, as on a full disk
    kv.store(0, 0, _layer(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4), 0))
    with pytest.raises(OSError) as err:
        kv.close()
    assert err.value.errno == errno.ENOSPC
