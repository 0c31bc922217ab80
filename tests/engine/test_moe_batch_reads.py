"""Routed experts read as a batch: the experts one layer routes to are coalesced into runs (experts adjacent in the
layer file, or apart by alignment padding, share one run), the runs cut into reads of at most the streamer's task
size, and every read is issued at once on the reader pool.

What must hold: `expert_runs` joins exactly the experts within the gap; a real store's routed set is read in as many
reads as its runs need at the task size (each starting where its run or the previous cut ends), every expert's
tensors equal what the one-read-per-expert path reads from the same file, through posix and O_DIRECT reads and with
runs cut inside experts; and greedy tokens through the engine (hot-expert cache off and on) equal transformers'.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hf_random import greedy
from tiny_moe import qwen3_moe_store

from kubeflash_node.engine import stream as stream_mod
from kubeflash_node.engine.experts import expert_runs
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.io import odirect_supported
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.stream import WeightStreamer
from kubeflash_node.store.format import load_manifest

PROMPT = [3, 14, 15, 92, 65, 35]


def test_expert_runs_join_only_experts_within_the_gap():
    ranges = {0: (0, 100), 1: (4096, 4196), 2: (8192, 8292), 3: (20480, 20580), 4: (24576, 24676)}
    assert expert_runs(ranges, [4, 0, 1, 3], gap=4096) == [(0, 4196, [0, 1]), (20480, 24676, [3, 4])]
    assert expert_runs(ranges, [0, 1, 2], gap=3996) == [(0, 8292, [0, 1, 2])]
    assert expert_runs(ranges, [0, 1, 2], gap=3995) == [(0, 100, [0]), (4096, 4196, [1]), (8192, 8292, [2])]
    assert expert_runs(ranges, [], gap=1 << 20) == []


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return qwen3_moe_store(tmp_path_factory.mktemp("moe"))


def _backends(path):
    return ["posix"] + (["odirect"] if odirect_supported(path) else [])


@pytest.mark.parametrize("task", [16 << 20, 8192])
def test_routed_set_is_read_in_runs_with_the_files_bytes(moe, task, monkeypatch):
    _, store = moe
    m = load_manifest(store)
    reads: list[tuple[int, int]] = []
    for backend in _backends(store / m.stages[0]):
        n = len(m.stages)
        s = WeightStreamer(store, m, device=torch.device("cpu"), dtype=torch.float32, placement=["disk"] * n,
                           order=itertools.cycle(range(n)), threads=3, task_bytes=task, backend=backend)
        real = s.reader_host.read_into

        def traced(path, offset, dest, real=real):
            reads.append((offset, dest.numel()))
            real(path, offset, dest)

        monkeypatch.setattr(s.reader_host, "read_into", traced)
        try:
            layer = min(s.routed)
            for stage in range(layer):
                s.get(stage)
            w = s.get(layer)
            for _, _, fut in s.inflight:
                fut.result()  # the stages read ahead are in: only expert reads are traced below
            ranges = s.routed[layer][1]
            want = [1, 2, 3, 7, 12]  # three runs: 1-3, 7, 12
            reads.clear()
            w.want(want)
            got = {j: {k: w[k] for k in m.files[m.stages[layer]].tensors if k.startswith(f"e{j}.")} for j in want}
            runs = expert_runs(ranges, want, stream_mod.EXPERT_GAP)
            assert [r[2] for r in runs] == [[1, 2, 3], [7], [12]]
            starts = sorted(off for off, _ in reads)
            assert starts[:1] == [ranges[1][0]] and {ranges[7][0], ranges[12][0]} <= set(starts)
            if task >= 1 << 20:
                assert len(reads) == len(runs)  # one read per run
            else:  # each run cut into task-sized reads, back to back, the cuts inside experts
                assert len(reads) > len(runs) and all(n <= task for _, n in reads)
                for start, end, _ in runs:
                    mine = sorted(r for r in reads if start <= r[0] < end)
                    assert mine[0][0] == start and all(a + n == b for (a, n), (b, _) in zip(mine, mine[1:]))
                    assert mine[-1][0] + mine[-1][1] >= end
            for j in want:  # what the one-read-per-expert path reads from the same file
                one = s._fetch_expert(layer, j)
                assert one.keys() == got[j].keys() and len(one) == 3
                for k in one:
                    assert torch.equal(one[k], got[j][k]), (backend, j, k)
        finally:
            s.close()


@pytest.mark.parametrize("cache", [0, 6 * 3 * 16 * 32 * 4])
def test_engine_tokens_equal_transformers_through_batch_reads(moe, cache):
    """Every backend, task size cutting runs inside experts, hot-expert cache off and on: transformers' tokens."""
    model, store = moe
    new = 10
    [ref] = greedy(model, [PROMPT], new)
    for backend in _backends(store / "manifest.json"):
        engine = Engine(store, policy=Policy(gpu_batch_size=1, expert_cache_bytes=cache, io_backend=backend,
                                             io_task_bytes=8192, io_threads=3))
        try:
            [c] = engine.generate([PROMPT], GenParams(max_new_tokens=new))
        finally:
            engine.close()
        assert c.tokens == ref, backend
        assert engine.timings.count["load_expert"] > 0
