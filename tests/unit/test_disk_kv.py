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


def _fallocate_works(path) -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        return libc.fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(1 << 20)) == 0
    finally:
        os.close(fd)
        os.unlink(path)


def test_a_kv_files_blocks_are_allocated_when_it_is_made(tmp_path):
    """allocate() lays the whole file's blocks out (fallocate) before any write, so the I/O threads' pieces, which
    finish in any order, land in extents already in file order; the bytes still read back as written."""
    if not _fallocate_works(tmp_path / "probe"):
        pytest.skip("this file system has no fallocate: KV files stay sparse")
    kv = _kv(tmp_path, io_threads=4, io_task_bytes=4096)
    kv.allocate(0, 0, batch=64, capacity=200)  # 64 x 64 bytes a row: 800 KiB
    size = 200 * kv._row(64)
    st = os.stat(kv.files[0, 0].path)
    assert st.st_size == size and st.st_blocks * 512 >= size
    k, v = torch.randn(64, 2, 150, 4), torch.randn(64, 2, 150, 4)
    kv.store(0, 0, _layer(k, v, 0))
    got = kv.load(0, 0, 150)
    assert torch.equal(got.k, k) and torch.equal(got.v, v)
    kv.close()


def test_a_kv_file_without_room_is_refused_when_made_naming_it(tmp_path):
    """A KV file the disk (here: the process's file size limit) cannot hold is refused at allocate, naming the file
    and its size, and nothing is left of it; not at a write in the middle of the prefill."""
    import resource
    import signal

    if not _fallocate_works(tmp_path / "probe"):
        pytest.skip("this file system has no fallocate")
    kv = _kv(tmp_path)
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old[1]))
    try:
        with pytest.raises(OSError) as err:
            kv.allocate(0, 0, batch=64, capacity=1000)  # 4 MB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert err.value.errno == errno.EFBIG and "kv_l000_m000.bin" in str(err.value) and "4096000 bytes" in str(err.value)
    assert not (tmp_path / "kv_l000_m000.bin").exists()
    kv.close()


def test_the_next_prefix_is_queued_behind_the_current_ones_pieces(tmp_path):
    """prefetch queues a prefix's pieces on the I/O threads and returns: with every I/O thread still busy (standing
    in for the current prefix's last pieces), two prefixes are both queued, neither waiting for the other's bytes,
    and each loads what was stored once the threads free up."""
    import threading

    kv = _kv(tmp_path, io_threads=1, io_task_bytes=4096, io_backend="odirect")
    data = {}
    for layer in (0, 1):
        kv.allocate(layer, 0, batch=64, capacity=100)
        data[layer] = torch.randn(64, 2, 90, 4), torch.randn(64, 2, 90, 4)
        kv.store(layer, 0, _layer(*data[layer], 0))
    kv._writes_of(None, wait=True)
    busy = threading.Event()
    blocker = kv.spans.pool.submit(busy.wait, 30)  # the only I/O thread is taken
    kv.prefetch(0, 0, 90)
    kv.prefetch(1, 0, 90)
    queued = [kv.ahead[layer, 0, 90, 90] for layer in (0, 1)]
    wait(queued, timeout=10)
    assert all(q.done() for q in queued)  # both reads handed to the I/O threads, none of their bytes read yet
    assert all(not p.done() for q in queued for p in q.result()[1]) and kv.io["reads"] == 0
    busy.set()
    blocker.result()
    for layer in (0, 1):
        got = kv.load(layer, 0, 90)
        assert torch.equal(got.k, data[layer][0]) and torch.equal(got.v, data[layer][1])
    assert kv.loads == {"prefetched": 2, "waited": 0} and kv.io["reads"] == 2
    kv.close()
