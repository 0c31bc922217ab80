"""The disk KV tier with its prompt rows staged and written behind the next layer's compute, split over the I/O
threads and through O_DIRECT, gives the tokens of the device tier (plain and with write-back, two micro-batches);
the staging stays within its bound and every decode load finds its prefix already read."""

from __future__ import annotations

import pytest

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.kvcache import DiskKV
from kubeflash_node.engine.policy import Policy

PROMPTS = [[5 + i, 9, 13 + i, 2, 7] * (3 + i) for i in range(4)]
NEW = 6


def _tokens(store, policy, job_dir):
    engine = Engine(store, policy=policy, job_dir=job_dir)
    try:
        return [c.tokens for c in engine.generate(PROMPTS, GenParams(max_new_tokens=NEW))], engine
    finally:
        engine.close()


@pytest.mark.parametrize("write_back", [False, True], ids=["disk", "disk-write-back"])
def test_staged_direct_writes_keep_the_device_tokens(opt_store, tmp_path, monkeypatch, write_back):
    monkeypatch.setattr(DiskKV, "DIRECT_MIN", 4096)  # OPT-125m's prompt rows (~100-300 KB a layer) go staged
    base = dict(gpu_batch_size=2, num_gpu_batches=2)
    ref, _ = _tokens(opt_store, Policy(**base), tmp_path / "dev")
    disk = Policy(**base, kv="disk", kv_write_back=write_back, kv_write_back_bytes=64 << 10, io_backend="odirect",
                  io_threads=3, io_task_bytes=8192)
    got, engine = _tokens(opt_store, disk, tmp_path / "disk")
    assert got == ref
    kv, layers = engine.kv, engine.config.num_layers
    assert kv.staging.made <= DiskKV.WRITES_IN_FLIGHT  # staging: at most two stores' bytes at any time
    assert kv.loads == {"prefetched": layers * 2 * (NEW - 1), "waited": 0}
    if kv.spans.direct["write"] == 0:
        pytest.skip("this file system refused O_DIRECT (the buffered path gave the same tokens)")
    assert kv.spans.direct["read"] > 0
