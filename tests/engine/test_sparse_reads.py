"""Cheaper bundle reads and the run following the cost model, on the tiny calibrated Llama of
test_sparse_stream.py: runs of missing neurons a few inactive ones apart are read as one (fewer reads, the extra
rows dropped, the same tokens), and the cost model predicts the merged bytes; `run_job` reads sparse where the
cost model predicts sparse faster for the job's batch and dense (even with bundles) where it predicts dense, says
which and why in the report, and both give the same tokens."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_sparse_stream import TARGET, _ffn, _generate, _Logged, tiny  # noqa: F401  (the fixture)
from tiny_jobs import run_tiny_job, tiny_job

from kubeflash_node.engine.costmodel import SparseCost, sparse_layer_bytes
from kubeflash_node.engine.neurons import merged
from kubeflash_node.store.bundles import runs
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig


def test_merged_fills_only_short_gaps():
    ids = np.array([1, 2, 5, 9, 30, 31, 33])
    assert merged(ids, 0).tolist() == ids.tolist()
    assert merged(ids, 3).tolist() == [*range(1, 10), 30, 31, 32, 33]
    assert merged(ids, 1).tolist() == [1, 2, 5, 9, 30, 31, 32, 33]
    assert merged(ids[:1], 5).tolist() == [1]


def test_merged_reads_are_fewer_give_the_same_tokens_and_match_the_cost_model(tiny):  # noqa: F811
    """With gap 4 the decode steps make fewer reads than one per run, read the active bundles plus the inactive
    ones between runs at most 4 apart (never a run closer than that left apart), and the tokens do not change."""
    _, store = tiny
    c = ModelConfig.from_dict(load_manifest(store).config)
    plain = _ffn(store, TARGET, window=0)
    plain.bundles = _Logged(store)
    t0, e0 = _generate(store, plain, new=9)
    ffn = _ffn(store, TARGET, window=0, gap=4)
    ffn.bundles = _Logged(store)
    t1, e1 = _generate(store, ffn, new=9)
    assert t1 == t0
    for (_, want), (_, got) in zip(plain.bundles.log, ffn.bundles.log):
        assert set(want) <= set(got)
        r = runs(got)
        assert all(b[0] - (a[0] + a[1]) > 4 for a, b in zip(r, r[1:]))  # the runs left apart are far apart
        assert len(r) <= len(runs(want))
    assert ffn.bundles.reads < 0.7 * plain.bundles.reads
    assert e1.timings.bytes["load_neurons"] > e0.timings.bytes["load_neurons"]
    layer = load_manifest(store).files["layer_000.bin"].size
    steps = 8 * c.num_layers  # decode layer calls after the first token
    for f, gap in ((plain, 0), (ffn, 4)):
        _, bundle, _ = sparse_layer_bytes(c, layer, SparseCost(TARGET), 1, 4, gap=gap)
        assert f.reads.bundle_bytes["decode"] / steps == pytest.approx(bundle, rel=0.1)


def _job(count: int, batch: int):
    return tiny_job({"sparsity": TARGET}, count=count, new=4, batch=batch)


def test_run_reads_as_the_cost_model_predicts_faster(tiny, tmp_path):  # noqa: F811
    """On a slow disk (50 MB/s) one prompt at a time reads sparsely; sixteen prompts in one micro-batch (the union of
    their active neurons is nearly all of them) read dense although the bundles are there, and so does one prompt
    on a fast disk; the report names the reads and the predictions; the tokens of a prompt do not depend on it."""
    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.machine import Machine

    _, store = tiny

    def run(name, disk, count, batch):
        ceil = Ceilings(disk_read_cold=disk, disk_read_warm=disk, disk_write=disk, h2d_pinned=10.0,
                        matmul_tflops=0.1)
        rep, _, rows = run_tiny_job(_job(count, batch), store, tmp_path / name, machine=Machine(ceil, 1 << 30, 4 << 30))
        return rep["sparsity"], rows

    slow, one = run("slow1", 0.05, 1, 1)
    assert slow["reads"] == "sparse" and slow["reads_why"].startswith("sparse FFN reads: predicted")
    assert slow["bundle_bytes_read"] > 0 and slow["weights_bytes_read"] < slow["weights_bytes_dense"]
    assert "micro-batch 1" in slow["reads_why"]
    wide, many = run("slow16", 0.05, 16, 16)
    assert wide["reads"] == "dense" and "micro-batch 16" in wide["reads_why"], wide["reads_why"]
    assert "bundle_bytes_read" not in wide
    fast, same = run("fast1", 50.0, 1, 1)
    assert fast["reads"] == "dense" and "bundle_bytes_read" not in fast
    assert same == one and many[0] == one[0]


def test_the_plan_follows_the_measured_per_read_cost(tiny, tmp_path):  # noqa: F811
    """The per-read cost is measured (bench.measure_read_op: buffered reads of two sizes from a real file, its pages
    dropped first; kubeflash bench records it as the ceilings' disk_read_op_s) and is what the plan prices a bundle
    read at: a llama-3-8b-shaped job at 0.5, one prompt, one read per run, on a 6 GB/s disk reads sparsely where a
    read costs 1 us and dense where it costs 200 us (the calibration's assumed 20 us untouched); the merge gap grows
    with the cost; `run_job` on the tiny model from a 50 MB/s disk merges by the machine's measured cost at 50 us a
    read and reads dense at 5 ms a read."""
    from kubeflash_node.engine.bench import Ceilings, measure_read_op
    from kubeflash_node.engine.costmodel import Budget, JobShape, merge_gap, plan, read_op_s, stage_sizes
    from kubeflash_node.engine.machine import Machine
    from kubeflash_node.store.modelconfig import preset

    probe = tmp_path / "probe.bin"
    probe.write_bytes(np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
    op = measure_read_op(probe, reads=64)
    assert 0 < op < 1
    ceil = Ceilings(disk_read_cold=6.0, disk_read_warm=6.0, disk_write=3.0, h2d_pinned=25.0, matmul_tflops=700.0,
                    disk_read_op_s=op)
    (tmp_path / "ceil.json").write_text(json.dumps(ceil.to_dict()))
    assert Ceilings.load(tmp_path / "ceil.json").disk_read_op_s == op

    c = preset("llama-3-8b")

    def picked(op_s: float) -> str:
        p = plan(job=JobShape(1, 64, 32), sparsity=SparseCost(TARGET, gap=0), config=c,
                 ceil=dataclasses.replace(ceil, disk_read_op_s=op_s), sizes={"none": stage_sizes(c, 2)},
                 budget=Budget(6 << 30, 8 << 30))
        return "sparse" if p.best.candidate.sparse else "dense"

    assert picked(1e-6) == "sparse" and picked(200e-6) == "dense"
    row = 2 * c.hidden_size * 2
    assert merge_gap(row, read_op_s(ceil), 6.0) < merge_gap(row, 200e-6, 6.0)
    assert read_op_s(Ceilings(disk_read_cold=6.0)) == 20e-6  # not measured: the assumed cost

    _, store = tiny
    row = 2 * ModelConfig.from_dict(load_manifest(store).config).hidden_size * 4  # a bundle: 2H float32

    def run(op_s: float) -> dict:
        slow = Ceilings(disk_read_cold=0.05, disk_read_warm=0.05, disk_write=0.05, h2d_pinned=10.0,
                        matmul_tflops=0.1, disk_read_op_s=op_s)
        rep, _, _ = run_tiny_job(_job(1, 1), store, tmp_path / f"j{op_s:g}", machine=Machine(slow, 1 << 30, 4 << 30))
        return rep["sparsity"]

    cheap, dear = run(50e-6), run(5e-3)
    assert cheap["reads"] == "sparse" and cheap["merge_gap"] == merge_gap(row, 50e-6, 0.05) > merge_gap(row, 20e-6, 0.05)
    assert dear["reads"] == "dense"
