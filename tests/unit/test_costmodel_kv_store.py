"""The cost model prices the host KV tier's stores as the engine runs them (issue 18): HostKV copies a layer's new
rows (K, V or the X-cache's X) to host memory on a store stream of its own, after the compute that made them, so
the copy overlaps the next layer's compute. A kv cpu prefill's compute then adds nothing for the ~0.5 GB a layer of
a 16 x 8K OPT-1.3B prompt, and the stored bytes count on the link; the disk tier, whose load still crosses on the
compute stream, keeps pricing its copies there."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kubeflash_node.engine.ceilings import Ceilings
from kubeflash_node.engine.costmodel import Budget, Candidate, JobShape, predict, stage_sizes
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.modelconfig import preset

OPT = preset("opt-1.3b-32k")
JOB = JobShape(16, 8192, 32)  # the ourslcc run: 16 x 8K prompts, 32 new tokens
CEIL = Ceilings(disk_read_cold=2.8, disk_read_warm=22.0, disk_write=3.2, h2d_pinned=55.5, matmul_tflops=765.0)
BASE = Policy(weights_gpu_percent=100, gpu_batch_size=16, num_gpu_batches=1, x_cache_percent=100)


def _prefill(kv: str, ceil=CEIL) -> dict[str, float]:
    pr = predict(Candidate(replace(BASE, kv=kv)), config=OPT, ceil=ceil, job=JOB,
                 budget=Budget(80 << 30, 200 << 30), sizes=stage_sizes(OPT, 2))
    return pr.phases["prefill"][0]


def test_kv_cpu_prefill_compute_leaves_the_store_out():
    """The store runs beside the compute: a kv cpu prefill's compute does not depend on the link, and it exceeds the
    device tier's by its per-call overhead only (a resident layer over a device cache hides that), far less than the
    store's own time (0.23 s: once added to the compute, as if serialized)."""
    slow = replace(CEIL, h2d_pinned=CEIL.h2d_pinned / 4)
    assert _prefill("cpu", slow)["compute"] == pytest.approx(_prefill("cpu")["compute"], rel=1e-12)
    stored_s = OPT.num_layers * JOB.prompts * JOB.prompt_len * OPT.hidden_size * 2 / (CEIL.h2d_pinned * 1e9)
    assert 0 <= _prefill("cpu")["compute"] - _prefill("device")["compute"] < stored_s / 4


def test_kv_cpu_prefill_counts_the_stored_x_on_the_link():
    """The prompt's X (every layer, every sequence: H values a token in float16) is what crosses PCIe."""
    stored = OPT.num_layers * JOB.prompts * JOB.prompt_len * OPT.hidden_size * 2
    assert _prefill("cpu")["pcie"] == pytest.approx(stored / (CEIL.h2d_pinned * 1e9), rel=1e-9)
    assert _prefill("device")["pcie"] == 0.0


def test_kv_disk_still_prices_its_copies_on_the_compute_stream():
    """The disk tier's rows cross on the compute stream (its prefix load): a slower link lengthens its compute."""
    slow = replace(CEIL, h2d_pinned=CEIL.h2d_pinned / 4)
    assert _prefill("disk", slow)["compute"] > _prefill("disk")["compute"] > _prefill("device")["compute"]


def test_kv_cpu_prefill_memory_holds_the_stored_rows_in_flight():
    """The rows a layer stores live on the GPU until their copy out has run, beside the next layer's compute: a
    kv cpu prefill's GPU peak is one micro-batch's prompt K and V (16 x 8K x 2 x 2048 fp16: 1 GiB) above CPU
    attention's, whose host rows are written as they are made."""
    def gpu(**kw):
        pol = replace(BASE, kv="cpu", x_cache_percent=0, **kw)
        return predict(Candidate(pol), config=OPT, ceil=CEIL, job=JOB, budget=Budget(80 << 30, 200 << 30),
                       sizes=stage_sizes(OPT, 2)).gpu_bytes
    rows = JOB.prompts * JOB.prompt_len * 2 * OPT.kv_dim * 2
    assert gpu() - gpu(cpu_attention=True) == pytest.approx(rows, abs=16)
