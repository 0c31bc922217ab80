"""The disk KV tier's I/O threads: a prefix read waits for the writes queued before it, a read split into many pieces
returns the bytes written (buffered and O_DIRECT, at page-aligned and unaligned offsets), host copies in flight stay
bounded, and a failed write (ENOSPC) is raised to the engine naming the file, never lost on the writer thread."""

from __future__ import annotations

import errno
import os
from concurrent.futures import wait

import pytest
import torch

from kubeflash_node.engine.kvcache import DiskKV, LayerKV
from kubeflash_node.engine.kvnear import WriteBackDiskKV


def _kv(tmp_path, cls=DiskKV, **kw):
    return cls(device="cpu", dtype=torch.float32, num_kv_heads=2, head_dim=4, directory=tmp_path, **kw)


def _layer(k, v, start):
    kv = LayerKV(None, None, in_place=False)
    kv.new = (k, v, start)
    return kv


@pytest.mark.parametrize("backend,batch", [("posix", 3), ("odirect", 3), ("odirect", 64)],
                         ids=["buffered", "direct-unaligned-rows", "direct-page-rows"])
def test_reads_see_every_queued_write_across_pieces(tmp_path, monkeypatch, backend, batch):
    monkeypatch.setattr(DiskKV, "DIRECT_MIN", 4096)  # the prompt's rows go through a staging slot
    kv = _kv(tmp_path, io_threads=3, io_task_bytes=4096, io_backend=backend)  # many pieces for a small prefix
    kv.allocate(0, 0, batch=batch, capacity=140)
    rows = []
    for step in range(10):  # prefill of 100 tokens, then 9 one-token steps, each queued behind the last
        s = 100 if step == 0 else 1
        k, v = torch.randn(batch, 2, s, 4), torch.randn(batch, 2, s, 4)
        start = sum(r[0].shape[2] for r in rows)
        kv.store(0, 0, _layer(k, v, start))
        rows.append((k, v))
        kv.prefetch(0, 0, start + s)
        got = kv.load(0, 0, start + s)
        assert torch.equal(got.k, torch.cat([r[0] for r in rows], dim=2))
        assert torch.equal(got.v, torch.cat([r[1] for r in rows], dim=2))
        assert len(kv.writing) <= DiskKV.WRITES_IN_FLIGHT
    direct, refused = kv.spans.direct, kv.files[0, 0].dfd is None
    kv.close()
    if backend == "posix":
        assert direct == {"read": 0, "write": 0}
    elif refused:
        pytest.skip("this file system refused O_DIRECT")
    else:  # the prompt's whole pages went direct, both ways
        row = batch * 2 * 2 * 4 * 4
        assert direct["write"] >= 100 * row - 2 * 4096 and direct["read"] >= 100 * row - 4096


def test_write_back_merges_buffered_rows_after_the_file_prefix(tmp_path):
    """Write-back: the file's rows and the rows still buffered in host memory load as one prefix, in order."""
    kv = _kv(tmp_path, WriteBackDiskKV, flush_bytes=1024, io_backend="odirect")
    kv.allocate(0, 0, batch=2, capacity=64)
    ks, vs = [], []
    for step in range(12):
        s = 20 if step == 0 else 1
        k, v = torch.randn(2, 2, s, 4), torch.randn(2, 2, s, 4)
        kv.store(0, 0, _layer(k, v, sum(x.shape[2] for x in ks)))
        ks.append(k), vs.append(v)
        t = sum(x.shape[2] for x in ks)
        kv.prefetch(0, 0, t)
        got = kv.load(0, 0, t)
        assert torch.equal(got.k, torch.cat(ks, dim=2)) and torch.equal(got.v, torch.cat(vs, dim=2))
    assert 0 < kv.flushed[0, 0] < 31  # some rows in the file, the last ones still buffered
    kv.close()


@pytest.mark.parametrize("rows", [2, 1 << 14], ids=["host-copy", "staged"])
def test_a_failed_write_is_raised_naming_the_file(tmp_path, rows):
    """A write that fails on the writer thread (ENOSPC, as on a full disk) raises at the next store, with the
    errno and the KV file's path; close raises it too when no store came after."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    kv = _kv(tmp_path)
    kv.allocate(0, 0, batch=1, capacity=2 * rows)
    f = kv.files[0, 0]
    os.close(f.fd)
    f.fd = os.open("/dev/full", os.O_WRONLY)  # every write gets ENOSPC
    kv.store(0, 0, _layer(torch.ones(1, 2, rows, 4), torch.ones(1, 2, rows, 4), 0))
    assert (kv.staging.made == 1) == (rows * 64 >= DiskKV.DIRECT_MIN)  # 64 bytes a row
    wait([w for _, w in kv.writing])  # the writer runs on its own thread: let it fail
    with pytest.raises(OSError) as err:
        kv.store(0, 0, _layer(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), rows))
    assert err.value.errno == errno.ENOSPC and "kv_l000_m000.bin" in str(err.value)
    with pytest.raises(OSError) as err:
        kv.close()
    assert err.value.errno == errno.ENOSPC and "kv_l000_m000.bin" in str(err.value)
