"""Sparse row reads (neuron bundles, input-channel columns) keep several reads in flight, as the weight streamer does
(issue 20: on the H100 the input-channel reads ran at under half the dense rate, one or four preadv at a time): a
large set is cut into tasks read by `threads` threads at once (the engine hands the readers its policy's io_threads
and io_task_bytes; O_DIRECT where asked and aligned), the rows are the same bytes whatever the thread count, the
engine's tokens do not change, and the cost model and the per-layer choice price a read's fixed cost overlapped by
that many reads in flight (within one read call: a layer's gate|up and down reads wait on each other)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from test_sparse_stream import PROMPT, TARGET, tiny  # noqa: F401  (the fixture)

from kubeflash_node.engine import sparse
from kubeflash_node.engine.costmodel import SparseCost, input_layer_bytes, input_layer_calls, row_reads_s
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.layerreads import choose_layers
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store import bundles
from kubeflash_node.store.bundles import _RowFiles, runs, tasks_of
from kubeflash_node.store.channels import write_channels
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig, preset

ROW = 8192  # llama-3-8b's down column in float16


class _Rows(_RowFiles):
    """One file of ROW-byte rows, read as the store's row readers read theirs."""

    def __init__(self, path):
        self.fds, self.row_elems, self.dtype = [os.open(path, os.O_RDONLY)], ROW, np.dtype(np.uint8)
        self.bytes_read, self.reads = 0, 0


def _kept(n: int, seed: int = 0) -> list[int]:
    return np.flatnonzero(np.random.default_rng(seed).random(n) < 0.5).tolist()


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.bin"
    data = np.random.default_rng(1).integers(0, 255, (2048, ROW), dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data


def test_a_large_set_is_read_by_threads_at_once_into_the_same_rows(rows_file, monkeypatch):
    """2048 rows of 8 KiB, about half kept: with 4 threads the reads of one call are in flight on 4 threads at once
    (each thread's first preadv waits at a barrier of 4, which breaks unless 4 run together), and the rows, bytes
    and read count equal those of one thread; with one thread every read is on the calling thread."""
    path, data = rows_file
    ids = _kept(2048)
    one, four = _Rows(path), _Rows(path)
    one.io(threads=1, task_bytes=16 << 20)
    four.io(threads=4, task_bytes=16 << 20)
    serial = one._read(0, ids, 0, "rows")
    orig, seen, lock = os.preadv, set(), threading.Lock()
    barrier = threading.Barrier(4, timeout=20)

    def preadv(fd, bufs, offset):
        me = threading.get_ident()
        with lock:
            first = me not in seen
            seen.add(me)
        if first:
            barrier.wait()  # BrokenBarrierError unless 4 threads are reading at the same time
        return orig(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    parallel = four._read(0, ids, 0, "rows")
    monkeypatch.setattr(os, "preadv", orig)
    assert len(seen) == 4
    assert np.array_equal(parallel, serial) and np.array_equal(serial, data[ids])
    assert four.bytes_read == one.bytes_read == len(ids) * ROW and four.reads == one.reads == len(runs(ids))
    assert one.read_s <= one.wait_s  # one thread: at most one read in flight
    one.close(), four.close()


def test_direct_reads_bypass_the_page_cache_where_aligned_and_read_the_same_rows(rows_file, monkeypatch):
    """io(direct=True): an aligned set (8 KiB rows from offset 0) is read through an O_DIRECT fd into page-aligned
    memory, the same rows as buffered reads; a set whose rows are not 4 KiB multiples stays buffered."""
    import fcntl

    path, data = rows_file
    ids = _kept(2048, seed=3)
    r = _Rows(path)
    r.io(threads=4, task_bytes=1 << 20, direct=True)
    orig, flags = os.preadv, []

    def preadv(fd, bufs, offset):
        flags.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        return orig(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    got = r._read(0, ids, 0, "rows")
    if r._direct_fds[0] is None:
        pytest.skip("this file system refuses O_DIRECT")
    assert np.array_equal(got, data[ids]) and got.ctypes.data % 4096 == 0
    assert flags and all(flags)
    flags.clear()
    odd = r._read(0, ids[:64], 0, "rows", elems=ROW - 512)  # rows of 7.5 KiB: not aligned, read buffered
    assert np.array_equal(odd, data.reshape(-1)[:len(data) * ROW // (ROW - 512) * (ROW - 512)]
                          .reshape(-1, ROW - 512)[ids[:64]])
    assert flags and not any(flags)
    r.close()


def test_tasks_cut_long_reads_and_keep_small_sets_on_the_caller():
    """A run longer than a task is cut into pieces (at least MIN_TASK_BYTES, at most task_bytes); a set of a few
    small reads stays one task; every byte is read exactly once, in file order."""
    buf = np.zeros(64 << 20, dtype=np.uint8)
    whole = [(buf, 0, buf.size)]
    got = tasks_of(whole, threads=4, task_bytes=8 << 20)
    pieces = [p for t in got for p in t]
    assert len(got) == 8 and all(n == 8 << 20 for _, _, n in pieces)
    assert [o for _, o, _ in pieces] == list(range(0, 64 << 20, 8 << 20))
    small = [(buf[i * ROW:(i + 1) * ROW], i * ROW, ROW) for i in range(0, 16, 2)]
    assert tasks_of(small, threads=4, task_bytes=8 << 20) == [small]
    assert len(tasks_of(whole, threads=1, task_bytes=8 << 20)) == 1


@pytest.fixture(scope="module")
def chan(tiny):  # noqa: F811
    _, store = tiny
    write_channels(store)
    return store


@pytest.mark.parametrize("threads", [1, 4], ids=["one-thread", "four-threads"])
def test_the_engine_reads_columns_with_its_policys_threads_and_the_same_tokens(chan, threads, monkeypatch):
    """Input sparsity streamed from disk, every set cut into tasks (MIN_TASK_BYTES and SERIAL_READS lowered so the
    tiny model's sets are cut too): the readers take the policy's io_threads and io_task_bytes, the greedy tokens
    and the column bytes equal a run that reads one run at a time on the compute thread, and the mean reads in flight
    while the engine waited (read_s / wait_s) is above 0 and at most the thread count."""
    c = ModelConfig.from_dict(load_manifest(chan).config)

    def run(io_threads: int):
        ffn = sparse.for_job(c, chan, TARGET, gap=0, method="input")
        e = Engine(chan, policy=Policy(gpu_batch_size=1, io_threads=io_threads, io_task_bytes=1 << 16), sparsity=ffn)
        try:
            [got] = e.generate([PROMPT], GenParams(max_new_tokens=5))
        finally:
            e.close()
        return got.tokens, ffn

    want, ref = run(1)
    monkeypatch.setattr(bundles, "MIN_TASK_BYTES", 4096)
    monkeypatch.setattr(bundles, "SERIAL_READS", 0)
    tokens, ffn = run(threads)
    assert ffn.method == "input" and ffn.channels.threads == threads and ffn.channels.task_bytes == 1 << 16
    assert tokens == want and ffn.channels.bytes_read == ref.channels.bytes_read > 0
    assert ffn.describe()["reads_in_flight_mean"] == round(ffn.reads_in_flight()["mean"], 2)
    assert 0 < ffn.reads_in_flight()["mean"] <= threads + 1e-6  # each reader's busy time is within the wait


def test_the_cost_model_overlaps_a_reads_fixed_cost_by_the_reads_in_flight():
    """row_reads_s: bytes at the disk's rate plus op_s per read over min(threads, reads) in flight; the per-layer
    choice prices the same: a layer of many small runs reads dense one read at a time and sparse with 16 in flight."""
    assert row_reads_s(2e6, 100, op_s=50e-6, gbps=2.0, threads=4) == pytest.approx(1e-3 + 100 * 50e-6 / 4)
    assert row_reads_s(0, 2, op_s=50e-6, gbps=2.0, threads=16) == pytest.approx(50e-6)  # 2 reads: 2 in flight
    assert row_reads_s(0, 0.5, op_s=50e-6, gbps=2.0, threads=4) == pytest.approx(0.5 * 50e-6)
    hidden, inter = 64, 256
    freq = np.tile([1.0, 0.0], (hidden + inter) // 2)[None, :].astype(np.float32)  # every other row: runs of one
    kw = dict(hidden=hidden, in_row_bytes=512, down_row_bytes=128, tokens=1, op_s=1e-6, gbps=1.0)
    serial, overlapped = choose_layers(freq, **kw), choose_layers(freq, threads=16, **kw)
    assert serial.sparse == (False,) and overlapped.sparse == (True,)
    bytes_s = (hidden // 2 * 512 + inter // 2 * 128) / 1e9
    assert overlapped.sparse_s[0] == pytest.approx(bytes_s + (hidden // 2 + inter // 2) * 1e-6 / 16)
    assert serial.sparse_s[0] == pytest.approx(bytes_s + (hidden // 2 + inter // 2) * 1e-6)


def test_a_layers_read_calls_are_priced_one_after_the_other():
    """A llama-3-8b layer at 0.5 with the attention's inputs thresholded too makes four read calls (gate|up, down,
    q|k|v, o), each waiting on the compute before it: input_layer_calls splits input_layer_bytes's bytes and reads
    among them, and each call's reads overlap only among themselves (a call of 1.5 reads: no overlap at all)."""
    c = preset("llama-3-8b")
    s = SparseCost(TARGET, method="input", attention=True)
    kw = dict(op_s=47.6e-6, gbps=1.84)
    _, demand, reads = input_layer_bytes(c, 436 << 20, s, 1, 2, **kw)
    calls = input_layer_calls(c, 436 << 20, s, 1, 2, **kw)
    assert len(calls) == 4
    assert sum(b for b, _ in calls) == pytest.approx(demand) and sum(r for _, r in calls) == pytest.approx(reads)
    each = [row_reads_s(b, r, threads=4, **kw) for b, r in calls]
    assert each[0] == pytest.approx(calls[0][0] / 1.84e9 + calls[0][1] * 47.6e-6 / 4) and calls[0][1] > 100
    assert each[3] == pytest.approx(calls[3][0] / 1.84e9 + calls[3][1] * 47.6e-6 / 1.5) and calls[3][1] == 1.5
    assert sum(each) > row_reads_s(demand, reads, threads=4, **kw)  # pooling the calls' reads would under-price


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "odirect"])
def test_reads_through_gaps_drop_the_rows_between_as_they_are_read(rows_file, direct):
    """Runs at most `gap` rows apart are one preadv (as neurons.merged reads them) whose rows between land in a
    discard buffer: the rows equal the file's kept rows, the reads and bytes are the merged runs' (what the merged
    read counted before, when the extra rows were read into the result and gathered out after)."""
    from kubeflash_node.engine.neurons import merged

    path, data = rows_file
    ids = _kept(2048, seed=5)
    r = _Rows(path)
    r.io(threads=4, task_bytes=1 << 20, direct=direct)
    got = r._read_gapped(0, ids, 0, "rows", ROW, 3)
    span = merged(np.asarray(ids), 3)
    assert np.array_equal(got, data[ids])
    assert r.reads == len(runs(span.tolist())) < len(runs(ids)) and r.bytes_read == len(span) * ROW
    r.close()
