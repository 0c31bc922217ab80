"""The on-SSD KV block store (store/kvblocks.py) against real files and real processes: chained keys scoped by
model/dtype/compression, round trips, corrupt and truncated blocks read as misses, a writer killed with SIGKILL
mid-write leaves nothing a reader can half-read, LRU eviction by bytes that skips a block being read, a full or
broken disk meaning "not cached", and two processes writing and reading one root at once."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubeflash_node.store.kvblocks import LOW_WATER, KVBlockStore, Scope, chain_keys

SCOPE = Scope(model_id="m1", dtype="float32", block_tokens=4, layout="2x2x1x4")


def _payload(i: int, n: int = 1000) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(n))


def test_keys_are_chained_and_scoped():
    toks = list(range(10))
    keys = chain_keys(SCOPE, toks)
    assert len(keys) == 2  # two full blocks of 4; the 2 trailing tokens make no block
    assert keys == chain_keys(SCOPE, toks + [99, 98])[:2]  # a longer prompt with the same prefix: same keys
    assert chain_keys(SCOPE, toks, limit=1) == keys[:1]
    # the same second block after a different first block is another key
    other = chain_keys(SCOPE, [9, 9, 9, 9] + toks[4:8])
    assert other[1] != keys[1]
    for scope in (Scope("m2", "float32", block_tokens=4, layout="2x2x1x4"),
                  Scope("m1", "float16", block_tokens=4, layout="2x2x1x4"),
                  Scope("m1", "float32", "int8", block_tokens=4, layout="2x2x1x4")):
        assert chain_keys(scope, toks)[0] != keys[0], scope


def test_round_trip_and_miss(tmp_path):
    store = KVBlockStore(tmp_path, budget_bytes=1 << 20)
    key = chain_keys(SCOPE, range(4))[0]
    assert store.get(key) is None
    assert store.put(key, _payload(1), {"tokens": 4})
    meta, payload = store.get(key)
    assert meta == {"tokens": 4} and bytes(payload) == _payload(1)
    again = KVBlockStore(tmp_path, budget_bytes=1 << 20)  # another process opening the same root
    assert bytes(again.get(key)[1]) == _payload(1)
    assert store.stats["hits"] == 1 and store.stats["misses"] == 1 and store.stats["blocks_written"] == 1
    assert again.usage == store.usage == store.path(key).stat().st_size


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "empty", "swap_key"])
def test_corrupt_or_truncated_block_is_a_miss(tmp_path, damage):
    store = KVBlockStore(tmp_path, budget_bytes=1 << 20)
    k0, k1 = chain_keys(SCOPE, range(8))
    store.put(k0, _payload(1), {"tokens": 4})
    store.put(k1, _payload(2), {"tokens": 4})
    p = store.path(k0)
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "flip_payload":
        data[-10] ^= 0xFF
    elif damage == "flip_header":
        data[20] ^= 0x01
    elif damage == "empty":
        data = bytearray()
    else:  # a whole valid block under the wrong name
        data = bytearray(store.path(k1).read_bytes())
    p.write_bytes(bytes(data))
    assert store.get(k0) is None
    assert store.stats["corrupt"] == 1
    assert not p.exists()  # removed, so the next writer recomputes it
    assert bytes(store.get(k1)[1]) == _payload(2)


_WRITER = textwrap.dedent("""
    import sys
    from kubeflash_node.store.kvblocks import KVBlockStore
    store = KVBlockStore(sys.argv[1], budget_bytes=1 << 40)
    payload = bytes(range(256)) * (1 << 18)  # 64 MiB, written in 64 MiB os.write calls after the header
    i = 0
    while True:
        store.put(format(i, "064x"), payload, {"i": i})
        i += 1
""")


def test_kill_9_mid_write_leaves_nothing_half_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    tmp = tmp_path / "tmp"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill while a temp file exists: the writer is mid-write
            if tmp.is_dir() and any(tmp.iterdir()):
                break
            time.sleep(0.001)
        else:
            pytest.fail("the writer never started a block")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    leftovers = list(tmp.iterdir())
    store = KVBlockStore(tmp_path, budget_bytes=1 << 40)  # the next store on the root cleans the dead temp files
    assert not list(tmp.iterdir())
    assert all(p.name.split(".")[1] == str(proc.pid) for p in leftovers)
    blocks = sorted(p for p in (tmp_path / "blocks").rglob("*.kvb"))
    for p in blocks:  # every block that is visible is whole
        key = p.name[:-4]
        meta, payload = store.get(key)
        assert payload.nbytes == 64 << 20 and meta["i"] == int(key, 16)
    assert store.stats["corrupt"] == 0


def test_lru_eviction_by_bytes_skips_a_block_being_read(tmp_path):
    one = KVBlockStore(tmp_path, budget_bytes=1 << 30).put(format(0, "064x"), _payload(0), {})
    size = (tmp_path / "blocks" / "00" / (format(0, "064x") + ".kvb")).stat().st_size
    assert one
    store = KVBlockStore(tmp_path, budget_bytes=int(size * 5.5))
    keys = [format(i, "064x") for i in range(6)]
    for i, k in enumerate(keys[1:5], 1):
        assert store.put(k, _payload(i), {})
        os.utime(store.path(k), (1000 + i, 1000 + i))  # an unambiguous LRU order
    os.utime(store.path(keys[0]), (2000, 2000))  # key 0 used most recently
    # a reader of the oldest block holds its shared lock: eviction must skip it
    fd = os.open(store.path(keys[1]), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        assert store.put(keys[5], _payload(5), {})  # 6 blocks > 5.5: evict down to LOW_WATER * budget
    finally:
        os.close(fd)
    present = [k for k in keys if store.path(k).exists()]
    assert keys[1] in present and keys[0] in present and keys[5] in present
    assert keys[2] not in present  # the least recently used block nobody reads
    assert store.usage <= store.budget * LOW_WATER + 1 and store.usage == store.scan_bytes()
    assert store.stats["blocks_evicted"] >= 1 and store.stats["bytes_evicted"] == store.stats["blocks_evicted"] * size


def test_failed_write_is_not_cached_never_raises(tmp_path):
    store = KVBlockStore(tmp_path, budget_bytes=1 << 20)
    assert not store.put(format(1, "064x"), b"x" * (2 << 20), {})  # larger than the budget
    (tmp_path / "tmp").rmdir()
    (tmp_path / "tmp").write_bytes(b"")  # the temp directory is gone (a broken disk): the open fails
    assert not store.put(format(2, "064x"), b"y" * 100, {})
    assert store.stats["write_failures"] == 2 and store.get(format(2, "064x")) is None


def test_full_filesystem_is_not_cached(tmp_path):
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full")
    store = KVBlockStore(tmp_path, budget_bytes=1 << 20)
    tmpdir = tmp_path / "tmp"
    real_open = os.open

    # the temp file is /dev/full: every write fails with ENOSPC, as on a full SSD
    def to_full(path, flags, mode=0o777, **kw):
        if Path(path).parent == tmpdir:
            return real_open(full, os.O_WRONLY)
        return real_open(path, flags, mode, **kw)

    os.open = to_full
    try:
        assert not store.put(format(3, "064x"), b"z" * 1000, {})
    finally:
        os.open = real_open
    assert store.stats["write_failures"] == 1 and not store.contains(format(3, "064x"))


_RACER = textwrap.dedent("""
    import sys
    from kubeflash_node.store.kvblocks import KVBlockStore
    store = KVBlockStore(sys.argv[1], budget_bytes=int(sys.argv[2]))
    bad = 0
    for round in range(40):
        for i in range(12):
            key = format(i, "064x")
            got = store.get(key)
            if got is not None and bytes(got[1]) != bytes([i % 256]) * 20000:
                bad += 1
            store.put(key, bytes([i % 256]) * 20000, {"i": i})
    print(bad, store.stats["corrupt"])
""")


def test_two_processes_share_one_root_under_eviction(tmp_path):
    budget = 6 * 20500  # about half the working set: both processes evict while the other reads
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(budget)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [["0", "0"], ["0", "0"]]  # never a wrong or corrupt payload
    # one evicts at a time; a writer that found the other evicting may overshoot by its own block
    assert KVBlockStore(tmp_path, budget_bytes=budget).scan_bytes() <= budget + 2 * 20500
