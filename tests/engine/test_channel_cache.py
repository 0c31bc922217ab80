"""Input sparsity's hot set and window (engine/channelcache.py) on a tiny random Llama (CPU, float32), every layer
streamed: the calibration writes each channel's and neuron's keep frequency beside the channel files; the hot set
takes the most frequent rows within its byte budget; rows held (hot or in the window) are never read from the
SSD, and the SSD bytes saved are exactly the held rows' bytes; no output changes, and at target 0 the tokens are
transformers' own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_random import tiny_llama_store
from test_sparse_stream import PROMPT, STREAM, TARGET

from kubeflash_node.engine import sparse
from kubeflash_node.engine.channelcache import ChannelCache, hot_rows
from kubeflash_node.engine.cli_calibrate import calibrate
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.store import channels
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, store calibrated at 0 and TARGET with input-channel files and their frequencies)."""
    root = tmp_path_factory.mktemp("chcache")
    model, store, ids = tiny_llama_store(root)
    _, rec = calibrate(store, ids, (0.0, TARGET), window=256, recorder=True)
    ins = rec.input_thresholds_at((0.0, TARGET))
    channels.write_channels(store, {t: rec.input_frequency_at(v) for t, v in ins.items()})
    return model, store


def _ffn(store, target: float, *, hot: int = 0, window: int = 0) -> sparse.SparseFFN:
    c = ModelConfig.from_dict(load_manifest(store).config)
    return sparse.for_job(c, store, target, gap=0, method="input", hot_bytes=hot, channel_window=window)


def _generate(store, ffn, new: int = 6) -> list[int]:
    e = Engine(store, policy=STREAM, sparsity=ffn)
    try:
        [c] = e.generate([PROMPT], GenParams(max_new_tokens=new))
    finally:
        e.close()
    return c.tokens


def _ffn_total(store) -> int:
    m = load_manifest(store)
    return sum(e.nbytes for s in m.stages if s.startswith("layer_")
               for n, e in m.files[s].tensors.items() if n in ("w_gate", "w_up", "w_down"))


def _planned_job(store, tmp_path):
    """(the tiny model's config, a job at TARGET whose cpuMemory holds a hot set of about a third of the FFN bytes: a
    quarter of it), the store entry linked under tmp_path/models where `kubeflash plan --store tmp_path` finds it."""
    from dataclasses import replace

    from tiny_jobs import tiny_job

    from kubeflash_api.names import model_id

    c = ModelConfig.from_dict(load_manifest(store).config)
    spec = tiny_job({"sparsity": TARGET})
    spec = replace(spec, resources=replace(spec.resources, cpu_memory=4 * _ffn_total(store) // 3))
    (tmp_path / "models").mkdir()
    m = spec.model
    (tmp_path / "models" / model_id(m.uri, dtype=m.dtype, quantization=m.quantization)).symlink_to(store)
    return c, spec


def _ceilings():
    """A 3 GB/s disk at 20 us a read, written by hand for the pricing tests."""
    from kubeflash_node.engine.bench import Ceilings

    return Ceilings(disk_read_cold=3.0, disk_read_warm=3.0, disk_write=3.0, h2d_pinned=25.0, matmul_tflops=1.0,
                    disk_read_op_s=2e-5)


def test_calibration_writes_keep_frequencies_that_match_the_thresholds(tiny):
    """At 0 every nonzero entry is kept (frequency about 1); at TARGET the mean frequency is about 1 - TARGET."""
    _, store = tiny
    c = ModelConfig.from_dict(load_manifest(store).config)
    f0, f = channels.frequency(store, 0.0), channels.frequency(store, TARGET)
    assert f.shape == (c.num_layers, c.hidden_size + c.intermediate_size)
    assert f0.min() > 0.99  # (the samples are kept as float16: an entry below its smallest step reads as 0)
    assert 0.35 < float(f.mean()) < 0.65 and f.min() >= 0 and f.max() <= 1
    assert channels.frequency(store, 0.4) is None


def test_hot_rows_take_the_most_frequent_rows_of_both_kinds_within_the_budget():
    freq = np.array([[0.9, 0.1, 0.8, 0.2, 0.95], [0.5, 0.99, 0.0, 0.7, 0.3]], dtype=np.float32)  # H = 2, I = 3
    got = hot_rows(freq, hidden=2, in_row_bytes=100, down_row_bytes=10, budget_bytes=230)
    # by frequency: L1 ch1 (100 bytes), L0 n2 (10), L0 ch0 (100), L0 n0 (10), L1 n1 (10): 230; L1 ch0 overflows
    assert got == [([0], [0, 2]), ([1], [1])]
    assert hot_rows(freq, hidden=2, in_row_bytes=100, down_row_bytes=10, budget_bytes=0) == [([], []), ([], [])]


@pytest.mark.parametrize("window", [0, 1, 3], ids=["w0", "w1", "w3"])
def test_held_rows_are_not_read_and_change_no_token(tiny, window):
    """With a hot set of a third of the FFN bytes (and a window), the tokens are those without either, and the SSD
    bytes of the channel reads fall by exactly the bytes of the rows served from memory."""
    _, store = tiny
    plain = _ffn(store, TARGET)
    want = _generate(store, plain)
    hot = _ffn_total(store) // 3
    ffn = _ffn(store, TARGET, hot=hot, window=window)
    assert isinstance(ffn.channels, ChannelCache) and 0 < ffn.channels.hot_bytes <= hot
    assert _generate(store, ffn) == want
    cache = ffn.channels
    assert cache.hit_bytes > 0 and cache.bytes_read + cache.hit_bytes == plain.channels.bytes_read
    assert cache.peak_held_bytes >= cache.hot_bytes
    if window:
        assert cache.peak_held_bytes > cache.hot_bytes
    assert ffn.describe()["channel_cache"]["hot_bytes"] == cache.hot_bytes and "rows held" in ffn.line()


def test_a_window_serves_rows_kept_in_the_previous_decode_step(tiny):
    """Window only (no hot set): the decode steps read fewer bytes than without it; prefill keeps nothing."""
    _, store = tiny
    plain, win = _ffn(store, TARGET), _ffn(store, TARGET, window=2)
    assert _generate(store, win) == _generate(store, plain)
    assert win.channels.hot_bytes == 0 and win.channels.hit_bytes > 0
    assert win.channels.bytes_read < plain.channels.bytes_read


def test_a_hot_set_holding_every_row_reads_no_channel_row_and_target_0_is_transformers(tiny):
    model, store = tiny
    ffn = _ffn(store, 0.0, hot=2 * _ffn_total(store), window=2)
    tokens = _generate(store, ffn)
    assert ffn.channels.bytes_read == 0 and ffn.channels.misses == 0
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert tokens == out[0, len(PROMPT):].tolist()


def test_per_layer_choice_reads_dense_where_the_union_of_kept_rows_approaches_all():
    """A layer whose rows are kept on 99.9% of tokens reads dense, one kept on 10% sparse; at 64 tokens a call both
    read dense; rows the hot set holds are not priced."""
    from kubeflash_node.engine.layerreads import choose_layers

    hidden, inter = 8, 32
    freq = np.stack([np.full(hidden + inter, 0.999), np.full(hidden + inter, 0.1)]).astype(np.float32)
    kw = dict(hidden=hidden, in_row_bytes=2 * inter * 4, down_row_bytes=hidden * 4, op_s=1e-10, gbps=3.0)
    one = choose_layers(freq, tokens=1, **kw)
    assert one.sparse == (False, True) and one.dense_layers == {0}
    assert choose_layers(freq, tokens=64, **kw).sparse == (False, False)
    every = [(list(range(hidden)), list(range(inter))), ([], [])]
    assert choose_layers(freq, tokens=1, held=every, **kw).sparse == (True, True)  # nothing left to read in layer 0
    assert "1 of 2 layers read sparse, 1 dense" in one.line()


def test_a_layer_read_dense_gives_the_same_tokens_and_reads_no_channel_row(tiny):
    """The engine streams a dense-priced layer with its FFN matrices and takes the same kept columns from them."""
    _, store = tiny
    from kubeflash_node.engine.layerreads import LayerReads

    plain = _ffn(store, TARGET)
    want = _generate(store, plain)
    mixed = _ffn(store, TARGET).per_layer(LayerReads((False, True, False), (1.0, 0.1, 1.0), 0.5, 1))
    assert mixed.skip_tensors(1) == frozenset() and mixed.skip_tensors(2) == {"w_gate", "w_up", "w_down"}
    assert _generate(store, mixed) == want
    assert 0 < mixed.channels.bytes_read < plain.channels.bytes_read
    assert mixed.describe()["dense_layers"] == [0, 2] and "1 of 3 layers read sparse, 2 dense" in mixed.line()


def test_a_capped_window_holds_at_most_its_bytes_and_changes_no_token(tiny):
    """window_bytes: the window's rows (hot set excluded) never exceed the cap; fewer rows are served than uncapped."""
    _, store = tiny
    want = _generate(store, _ffn(store, TARGET))
    free, capped = _ffn(store, TARGET, window=3), _ffn(store, TARGET, window=3)
    cap = _ffn_total(store) // 10
    capped.channels.window_bytes = cap
    assert _generate(store, free) == want and _generate(store, capped) == want
    assert 0 < capped.channels.peak_held_bytes <= cap < free.channels.peak_held_bytes
    assert 0 < capped.channels.hit_bytes < free.channels.hit_bytes


@pytest.mark.parametrize("batch", [1, 16], ids=["b1", "b16"])
def test_a_job_prices_every_layer_and_reads_dense_where_the_batch_keeps_almost_every_row(tiny, tmp_path, batch):
    """run_job with the machine's ceilings (reads nearly free, a slow disk) at one sequence reads sparsely and then
    prices each layer from the keep frequencies: every layer sparse; at 16 in one micro-batch (the union of their
    kept rows is nearly all) the run already reads dense, so no layer is priced; the tokens equal those of the same
    job run without ceilings (every layer sparse from the channel files: the same kept columns)."""
    from tiny_jobs import run_tiny_job, tiny_job

    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.machine import Machine

    _, store = tiny
    disk = Ceilings(disk_read_cold=0.05, disk_read_warm=0.05, disk_write=0.05, h2d_pinned=10.0, matmul_tflops=0.1,
                    disk_read_op_s=1e-12)
    spec = tiny_job({"sparsity": TARGET}, count=batch, batch=batch)
    rep, _, rows = run_tiny_job(spec, store, tmp_path / "m", machine=Machine(disk, 1 << 30, 4 << 30))
    s = rep["sparsity"]
    n = ModelConfig.from_dict(load_manifest(store).config).num_layers
    if batch == 1:
        assert s["reads"] == "sparse" and s["layers_why"].startswith("per layer at micro-batch 1: 3 of 3 layers")
        assert s["dense_layers"] == [] and n == 3
    else:
        assert s["reads"] == "dense" and "layers_why" not in s
    rep2, _, rows2 = run_tiny_job(spec, store, tmp_path / "n")
    assert "dense_layers" not in rep2["sparsity"] and rows == rows2


def test_the_cost_model_prices_the_hot_set_as_the_engine_reads_it(tiny, tmp_path):
    """A job whose cpuMemory holds a hot set (a quarter of it, about a third of the FFN bytes): kubeflash plan's
    pricing from the store entry's keep frequencies (cli_plan._sparse_cost) is the run's own (job._sparse_cost, the
    same rows), its predicted channel-file bytes per decode layer call are the engine's measured ones within 15%,
    below the prediction without a hot set by exactly the expected hits, and the plan's host memory (memory, predict,
    the chosen line) holds the hot set's bytes."""
    from dataclasses import replace

    from kubeflash_node.engine.cli_plan import _entry_frequency
    from kubeflash_node.engine.cli_plan import _sparse_cost as plan_cost
    from kubeflash_node.engine.costmodel import (
        Budget,
        Candidate,
        JobShape,
        SparseCost,
        describe,
        input_layer_bytes,
        memory,
        predict,
        stage_sizes,
    )
    from kubeflash_node.engine.job import _sparse_cost as run_cost
    from kubeflash_node.engine.sparse import hot_budget

    _, store = tiny
    c, spec = _planned_job(store, tmp_path)
    ffn = sparse.for_job(c, store, TARGET, gap=0, method="input", channel_hot_bytes=hot_budget(spec.resources, "cpu"))
    cost = plan_cost(spec, c, 4, tmp_path, _entry_frequency(spec, c, tmp_path))
    assert cost == run_cost(ffn, c, 4) and cost.channel_hot_bytes == ffn.channels.hot_bytes > 0
    assert 0.2 < cost.channel_hit < 1

    _generate(store, ffn, new=9)
    steps = 8 * c.num_layers  # decode layer calls
    layer = load_manifest(store).files["layer_000.bin"].size
    kw = dict(op_s=2e-5, gbps=3.0)
    hot = input_layer_bytes(c, layer, replace(cost, gap=0), 1, 4, **kw)[1]
    plain = input_layer_bytes(c, layer, SparseCost(TARGET, gap=0, method="input"), 1, 4, **kw)[1]
    measured = ffn.reads.bundle_bytes["decode"] / steps
    assert hot == pytest.approx(measured, rel=0.15)
    assert hot == pytest.approx(plain - cost.channel_saved(1) / c.num_layers)
    # the hit share is of the frequencies' expected bytes, equal to the uniform model's in expectation at one token
    assert cost.channel_saved(1) == pytest.approx(cost.channel_hit * c.num_layers * plain, rel=0.05)

    job, sizes, none = JobShape(1, 8, 9), stage_sizes(c, 4), SparseCost(TARGET, method="input")
    with_hot = memory(Candidate(STREAM, sparse=cost), config=c, job=job, sizes=sizes)
    without = memory(Candidate(STREAM, sparse=none), config=c, job=job, sizes=sizes)
    assert with_hot[1] - without[1] == cost.channel_hot_bytes and with_hot[0] == without[0]
    ceil = _ceilings()
    pr = predict(Candidate(STREAM, sparse=cost), config=c, ceil=ceil, job=job, budget=Budget(1 << 30, 1 << 30),
                 sizes=sizes)
    assert pr.cpu_bytes == with_hot[1] and "hot channel rows" in describe(pr)


def test_hot_tiers_take_the_most_frequent_rows_for_the_device_and_the_next_for_host_memory():
    """hot_tiers: the device tier is hot_rows of its budget, the host tier the rows next in frequency within its own;
    a device tier of 0 bytes leaves the host tier as hot_rows alone chooses it."""
    from kubeflash_node.engine.channelcache import hot_tiers

    freq = np.array([[0.9, 0.1, 0.8, 0.2, 0.95], [0.5, 0.99, 0.0, 0.7, 0.3]], dtype=np.float32)  # H = 2, I = 3
    kw = dict(hidden=2, in_row_bytes=100, down_row_bytes=10)
    dev, host = hot_tiers(freq, **kw, budgets=(110, 120))
    # by frequency: L1 ch1 (100), L0 n2 (10) | L0 ch0 (100), L0 n0 (10), L1 n1 (10); L1 ch0 overflows
    assert dev == [([], [2]), ([1], [])] and host == [([0], [0]), ([], [1])]
    assert dev == hot_rows(freq, **kw, budget_bytes=110)
    assert hot_tiers(freq, **kw, budgets=(0, 230))[1] == hot_rows(freq, **kw, budget_bytes=230)


def _held(store, *, device_bytes: int, host_bytes: int) -> sparse.SparseFFN:
    """The input-sparse FFN with a hot set split by sparse.hold_on_device (from a job's host hot set, or from the
    bare channel reader where it has none), its device tier on the CPU (the compute device of these tests: the tier
    is where its tensors are placed and what is counted)."""
    ffn = _ffn(store, TARGET, hot=host_bytes)
    assert sparse.hold_on_device(ffn, device_bytes=device_bytes, host_bytes=host_bytes, device="cpu")
    return ffn


def test_rows_held_on_the_device_are_neither_read_nor_copied_and_change_no_token(tiny):
    """A hot set of a third of the FFN bytes in host memory, the same rows on the compute device, and split half and
    half: the same tokens; the device's rows are never read from the SSD (the SSD bytes equal the host-held run's)
    and never copied host->device (held_h2d_bytes 0; h2d_bytes less by exactly their bytes), the host's cross once
    per use (held_h2d_bytes = their hit bytes); every kept row is read, copied or on the device exactly once."""
    _, store = tiny
    plain = _ffn(store, TARGET)
    want = _generate(store, plain)
    kept = plain.channels.bytes_read  # gap 0: every kept row's bytes, read from the SSD
    hot = _ffn_total(store) // 3
    host = _ffn(store, TARGET, hot=hot)
    dev = _held(store, device_bytes=hot, host_bytes=0)
    split = _held(store, device_bytes=hot // 2, host_bytes=hot - hot // 2)
    for ffn in (host, dev, split):
        assert _generate(store, ffn) == want
    h, d, s = host.channels, dev.channels, split.channels
    assert h.device_bytes == 0 and h.h2d_bytes == kept and h.held_h2d_bytes == h.hit_bytes > 0
    assert d.device_bytes == h.hot_bytes > 0 and d.hot_bytes == 0  # the same rows, on the device
    assert d.bytes_read == h.bytes_read and d.device_hit_bytes == d.hit_bytes == h.hit_bytes
    assert d.held_h2d_bytes == 0 and d.h2d_bytes == kept - d.device_hit_bytes
    assert 0 < s.device_bytes <= hot // 2 and 0 < s.hot_bytes <= hot - hot // 2
    assert 0 < s.device_hit_bytes < s.hit_bytes and s.held_h2d_bytes == s.hit_bytes - s.device_hit_bytes
    assert s.bytes_read + s.hit_bytes == kept and s.h2d_bytes + s.device_hit_bytes == kept
    assert all(t is None or t.device.type == "cpu" for layer in s.on_device for t in layer)
    c = split.describe()["channel_cache"]
    assert c["device_bytes"] == s.device_bytes and c["held_h2d_bytes"] == s.held_h2d_bytes
    assert "MiB on the compute device" in split.line()


def test_the_plan_holds_the_hot_set_in_the_gpu_room_and_grows_its_gpu_memory_by_exactly_those_bytes(tiny, tmp_path):
    """kubeflash plan (cli_plan._device_tier): with GPU room after the chosen plan's predicted use, the hot set's
    most frequent rows are priced on the GPU (the run's own pricing after sparse.hold_on_device with that room), the
    next within a quarter of cpuMemory in host memory; the plan's GPU bytes grow by exactly the device tier's bytes.
    The same rows on the GPU instead of host memory: the same disk time, less PCIe time, GPU + and CPU - their bytes."""
    from dataclasses import replace

    from kubeflash_node.engine.cli_plan import _device_tier, _entry_frequency
    from kubeflash_node.engine.cli_plan import _sparse_cost as plan_cost
    from kubeflash_node.engine.costmodel import Budget, Calibration, Candidate, JobShape, Plan, describe, predict, stage_sizes
    from kubeflash_node.engine.job import _sparse_cost as run_cost
    from kubeflash_node.engine.sparse import hot_budget

    _, store = tiny
    c, spec = _planned_job(store, tmp_path)
    freq = _entry_frequency(spec, c, tmp_path)
    cost = plan_cost(spec, c, 4, tmp_path, freq)
    job, sizes, cal = JobShape(1, 8, 9), {"none": stage_sizes(c, 4)}, Calibration()
    ceil = _ceilings()
    kw = dict(config=c, ceil=ceil, job=job, sizes=sizes["none"], cal=cal, itemsize=4)
    pr = predict(Candidate(STREAM, sparse=cost), budget=Budget(1 << 40, 1 << 40), **kw)
    room = _ffn_total(store) // 4
    budget = Budget(pr.gpu_bytes + cal.gpu_reserve_bytes + room, 1 << 30)
    plan = _device_tier(Plan(pr, None, 1, 1), spec, c, 4, freq, budget=budget, ceil=ceil, job=job, sizes=sizes,
                        cal=cal)
    tiered = plan.best.candidate.sparse
    assert 0 < tiered.channel_gpu_bytes <= room and 0 < tiered.channel_hot_bytes <= hot_budget(spec.resources, "cpu")
    assert plan.best.gpu_bytes == pr.gpu_bytes + tiered.channel_gpu_bytes
    assert plan.best.cpu_bytes == pr.cpu_bytes - cost.channel_hot_bytes + tiered.channel_hot_bytes
    assert tiered.channel_hit > cost.channel_hit and "on the GPU" in describe(plan.best)
    ffn = _ffn(store, TARGET, hot=hot_budget(spec.resources, "cpu"))
    sparse.hold_on_device(ffn, device_bytes=room, host_bytes=hot_budget(spec.resources, "cpu"), device="cpu")
    assert run_cost(ffn, c, 4) == tiered and ffn.channels.device_bytes == tiered.channel_gpu_bytes
    # the host hot set's rows moved to the GPU: not read either way, no longer copied over PCIe
    moved = replace(cost, channel_hot_bytes=0, channel_hot=(), channel_gpu_bytes=cost.channel_hot_bytes,
                    channel_gpu=cost.channel_hot)
    on = predict(Candidate(STREAM, sparse=moved), budget=Budget(1 << 40, 1 << 40), **kw)
    assert on.gpu_bytes - pr.gpu_bytes == pr.cpu_bytes - on.cpu_bytes == cost.channel_hot_bytes
    assert on.resource_s["disk"] == pytest.approx(pr.resource_s["disk"]) and on.resource_s["pcie"] < pr.resource_s["pcie"]


def _row_bytes(c, rows) -> int:
    return sum(len(a) * c.in_row_bytes + len(b) * c.down_row_bytes for a, b in rows)


def test_the_device_tier_reads_each_hot_row_from_the_ssd_once_at_start(tiny):
    """A job's host hot set, then its GPU tier (sparse.hold_on_device, as a GPU run starts): the rebuilt channel cache
    takes the rows the job's cache already holds from memory, so the channel files give each row of either hot set
    exactly once (the reader's bytes are those of the union of the first hot set and both tiers), and the tokens
    are the same as without any hot set."""
    _, store = tiny
    want = _generate(store, _ffn(store, TARGET))
    hot = _ffn_total(store) // 3
    ffn = _ffn(store, TARGET, hot=hot)
    first, reader = ffn.channels.held_rows(), ffn.channels.reader
    assert reader.bytes_read == _row_bytes(reader, first) > 0
    assert sparse.hold_on_device(ffn, device_bytes=hot // 2, host_bytes=hot, device="cpu")
    c = ffn.channels
    tiers = c.held_rows()
    union = [(sorted(set(a) | set(x)), sorted(set(b) | set(y))) for (a, b), (x, y) in zip(first, tiers)]
    assert c.reader is reader and 0 < c.device_bytes and 0 < c.hot_bytes
    assert reader.bytes_read == _row_bytes(reader, union) < _row_bytes(reader, first) + _row_bytes(reader, tiers)
    assert c.resident_bytes == _row_bytes(reader, union) - _row_bytes(reader, first) and c.bytes_read == 0
    assert _generate(store, ffn) == want


_OPENED: list[str] | None = None  # while a list: the paths open() was called with (the audit hook below)


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, __import__("os").PathLike)):
        _OPENED.append(str(args[0]))


def _audit_once() -> None:
    """Install _audit, once per process: an audit hook cannot be removed, and a second one would count each open twice
    (in every test that counts opens after the first)."""
    import sys

    if not getattr(_audit, "installed", False):
        sys.addaudithook(_audit)
        _audit.installed = True


def test_a_job_start_reads_the_keep_frequency_file_once(tiny, tmp_path):
    """The per-row keep frequencies are loaded once per job and passed on: run_job with the machine's ceilings and a
    host hot set (the hot set's choice and the per-layer pricing both need them) opens the frequency file once, and a
    GPU start (sparse.for_job, sparse.hold_on_device, job._layer_reads) opens it once too (counted by the
    interpreter's own audit events for open())."""
    from tiny_jobs import run_tiny_job

    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.job import _layer_reads
    from kubeflash_node.engine.machine import Machine
    from kubeflash_node.engine.sparse import hot_budget

    global _OPENED
    _, store = tiny
    c, spec = _planned_job(store, tmp_path)
    freq = str(store / channels.DIR / f"freq_{TARGET:g}.npy")
    disk = Ceilings(disk_read_cold=0.05, disk_read_warm=0.05, disk_write=0.05, h2d_pinned=10.0, matmul_tflops=0.1,
                    disk_read_op_s=1e-12)  # a slow disk, reads nearly free: sparse reads
    machine = Machine(disk, 1 << 30, 4 << 30)
    _audit_once()
    try:
        _OPENED = []
        rep, engine, _ = run_tiny_job(spec, store, tmp_path / "job", machine=machine)
        at_run, _OPENED = _OPENED.count(freq), []
        ffn = sparse.for_job(c, store, TARGET, hot_bytes=hot_budget(spec.resources, "cpu"))
        assert sparse.hold_on_device(ffn, device_bytes=_ffn_total(store) // 4,
                                     host_bytes=hot_budget(spec.resources, "cpu"), device="cpu")
        _layer_reads(ffn, engine.policy, machine)
        at_gpu_start = _OPENED.count(freq)
    finally:
        _OPENED = None
    assert rep["sparsity"]["channel_cache"]["hot_bytes"] > 0 and "layers_why" in rep["sparsity"]
    assert (at_run, at_gpu_start) == (1, 1) and ffn.layers_why is not None


def _tier_job(store, tmp_path):
    """(ceilings, job.yaml, `kubeflash plan` arguments with --json tmp_path/plan.json) of a job whose GPU budget leaves
    room for the hot set's GPU tier after the chosen plan (gpuMemory: the 1 GiB reserve + 1.5 MiB; a slow disk, so
    the plan streams sparsely), the store entry linked under tmp_path/models."""
    import json

    from kubeflash_api.names import model_id
    from kubeflash_node.engine.bench import Ceilings

    ceil = Ceilings(disk_read_cold=0.05, disk_read_warm=0.05, disk_write=0.05, h2d_pinned=10.0, matmul_tflops=100.0,
                    disk_read_op_s=1e-12)
    (tmp_path / "ceilings.json").write_text(json.dumps(ceil.__dict__))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / model_id("dummy:tiny", dtype="float32", quantization="none")).symlink_to(store)
    manifest_yaml = tmp_path / "job.yaml"
    manifest_yaml.write_text(f"""apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {{name: tier}}
spec:
  model: {{uri: "dummy:tiny", dtype: float32}}
  input: {{synthetic: {{count: 1, promptLength: 8}}}}
  generation: {{maxNewTokens: 9}}
  resources: {{gpuMemory: "{(1 << 30) + (3 << 19)}", cpuMemory: "{(2 << 30) + (2 << 20)}"}}
  offload: {{policy: auto, sparsity: {TARGET}}}
""")
    return ceil, manifest_yaml, ["plan", str(manifest_yaml), "--ceilings", str(tmp_path / "ceilings.json"),
                                 "--store", str(tmp_path), "--json", str(tmp_path / "plan.json")]


def test_the_run_reports_the_plan_priced_with_the_gpu_tier_as_kubeflash_plan_does(tiny, tmp_path):
    """A job whose GPU budget leaves room for the hot set's GPU tier after the chosen plan (gpuMemory: the 1 GiB
    reserve + 1.5 MiB; a slow disk, so the plan streams sparsely): `kubeflash plan --json` in its own process prices
    the chosen plan with both tiers; the run's steps (job._sparsity, _auto_plan, _follow_reads, then _device_tier as a
    GPU start takes it, its tier placed on the CPU here) report (job._plan_report: report.json's "plan" and the run
    line's "policy auto:") the same chosen line and predicted time, with the tier's bytes on the GPU."""
    import json
    import subprocess

    from tiny_jobs import KUBEFLASH

    from kubeflash_api.local import load_job_file
    from kubeflash_node.engine import job as run
    from kubeflash_node.engine.costmodel import JobShape
    from kubeflash_node.engine.machine import Machine, within_resources

    _, store = tiny
    ceil, manifest_yaml, plan_args = _tier_job(store, tmp_path)
    proc = subprocess.run(KUBEFLASH + plan_args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    planned = json.loads((tmp_path / "plan.json").read_text())["best"]
    [line] = [x.removeprefix("chosen:    ") for x in proc.stdout.splitlines() if x.startswith("chosen:")]

    spec, manifest = load_job_file(manifest_yaml), load_manifest(store)
    c = ModelConfig.from_dict(manifest.config)
    machine = within_resources(spec, Machine(ceil, 1 << 40, 1 << 40), "cpu")
    shape = JobShape(1, 8, 9)
    sparsity = run._sparsity(spec, c, store, "cpu")
    chosen = run._auto_plan(spec, sparsity, config=c, itemsize=4, manifest=manifest, job=shape, machine=machine,
                            expert_cache=0, routing=None)
    untiered = chosen.best
    run._follow_reads(sparsity, spec, chosen, chosen.best.candidate.policy, config=c, manifest=manifest, job=shape,
                      machine=machine, itemsize=4)
    chosen = run._device_tier(sparsity, spec, chosen, device="cpu", machine=machine, manifest=manifest, job=shape)
    reported = run._plan_report(chosen)
    assert sparsity.channels.device_bytes > 0 and "on the GPU" in line
    assert untiered.gpu_bytes < planned["gpu_bytes"] == chosen.best.gpu_bytes
    assert reported["chosen"] == line and reported["predicted_s"] == pytest.approx(planned["run_s"], rel=1e-12)
    assert chosen.best.total_s == pytest.approx(planned["total_s"], rel=1e-12) != untiered.total_s


def test_a_plan_reads_the_keep_frequency_file_once(tiny, tmp_path, capsys, monkeypatch):
    """`kubeflash plan` of a job that uses the keep frequencies three times (the host hot set's pricing, the hot set's
    GPU tier, the per-layer sparse or dense reads) read the frequency file three times; it reads it once now, as a run
    does (counted by the interpreter's own audit events for open(), the plan run in this process)."""
    import os

    from kubeflash_node import cli

    global _OPENED
    _, store = tiny
    _, _, plan_args = _tier_job(store, tmp_path)
    # cli.main gives the process ALLOC_CONF where none is set: set here, so that monkeypatch takes it back after
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", cli.ALLOC_CONF))
    _audit_once()
    try:
        _OPENED = []
        assert cli.main(plan_args) == 0, capsys.readouterr().err
        opened = [p for p in _OPENED if p.endswith(f"freq_{TARGET:g}.npy")]
    finally:
        _OPENED = None
    out = capsys.readouterr().out
    assert "on the GPU" in out and f"sparsity {TARGET:g}: per layer at micro-batch" in out, out  # all three used it
    assert len(opened) == 1, opened
