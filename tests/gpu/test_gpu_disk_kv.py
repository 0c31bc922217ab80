"""The disk KV tier on the GPU, through its staged path (prompt rows copied on a side stream into page-locked staging
buffers and written behind the next layer's compute, O_DIRECT where the file system takes it) and its page-locked read
slots (prefix copied to the device asynchronously, the slot reused after the copy): the device tier's tokens, plain
and with write-back, with the staging and read slots within their bounds."""

from __future__ import annotations

import pytest

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.kvcache import DiskKV
from kubeflash_node.engine.policy import Policy

PROMPTS = [[5 + i, 9, 13 + i, 2, 7] * (3 + i) for i in range(6)]
NEW = 10


def _run(store, policy, tmp_path):
    engine = Engine(store, policy=policy, device="cuda", job_dir=tmp_path)
    try:
        return [c.tokens for c in engine.generate(PROMPTS, GenParams(max_new_tokens=NEW))], engine
    finally:
        engine.close()


@pytest.mark.parametrize("write_back,backend", [(False, "auto"), (True, "auto"), (True, "posix")],
                         ids=["disk-direct", "write-back-direct", "write-back-buffered"])
def test_staged_disk_kv_matches_the_device_tier(opt_store, tmp_path, monkeypatch, write_back, backend):
    monkeypatch.setattr(DiskKV, "DIRECT_MIN", 4096)  # OPT-125m's prompt rows (~100-300 KB a layer) go staged
    base = dict(gpu_batch_size=2, num_gpu_batches=3, compute_dtype="float32")
    ref, _ = _run(opt_store, Policy(**base), tmp_path / "dev")
    got, engine = _run(opt_store, Policy(**base, kv="disk", kv_write_back=write_back, kv_write_back_bytes=64 << 10,
                                         io_backend=backend, io_threads=4, io_task_bytes=16384), tmp_path / "disk")
    assert got == ref
    kv, layers = engine.kv, engine.config.num_layers
    assert kv.staging.made <= DiskKV.WRITES_IN_FLIGHT and kv.read_slots.made <= DiskKV.READ_SLOTS + 1
    assert kv.loads == {"prefetched": layers * 3 * (NEW - 1), "waited": 0}
    if backend == "posix":
        assert kv.spans.direct == {"read": 0, "write": 0}
