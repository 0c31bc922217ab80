"""Sparse decode from the SSD on tiny random Llama models (CPU, float32): with neuron bundles, a streamed layer is
read without its up/down matrices and the FFN reads only its active neurons' bundles. Sparsity off is token for
token transformers' dense output; sparsity on gives the logits of transformers with the same neurons masked;
the bytes a decode step reads are the layer minus its up/down plus one bundle per active neuron; a hot set and a
window of recently active neurons are never read again and change no output; the cost model predicts the
bytes the engine reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_random import tiny_llama_store

from kubeflash_node.engine import sparse
from kubeflash_node.engine.cli_calibrate import calibrate
from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.bundles import BundleReader, frequency, write_bundles
from kubeflash_node.store.convert import convert
from kubeflash_node.store.format import load_manifest
from kubeflash_node.store.modelconfig import ModelConfig

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
TARGET = 0.5
STREAM = Policy(gpu_batch_size=1)  # every stage read from disk each step


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, store dir calibrated at 0 and TARGET with bundles and frequencies)."""
    root = tmp_path_factory.mktemp("sparse")
    model, store, ids = tiny_llama_store(root)
    _, freq = calibrate(store, ids, (0.0, TARGET), window=256)
    write_bundles(store, freq)
    return model, store


def _ffn(store: Path, target: float, **kw) -> sparse.SparseFFN:
    """The job's sparse FFN; one read per run of missing neurons unless `gap` is given (merging: its own test)."""
    c = ModelConfig.from_dict(load_manifest(store).config)
    return sparse.for_job(c, store, target, **{"gap": 0, **kw})


def _generate(store: Path, ffn, new: int = 6, policy: Policy = STREAM):
    e = Engine(store, policy=policy, sparsity=ffn)
    try:
        [c] = e.generate([PROMPT], GenParams(max_new_tokens=new))
    finally:
        e.close()  # joins the streamer's read-ahead: the counters below are final
    return c.tokens, e


def _masked(model, thresholds):
    """transformers' model whose MLPs drop the neurons with |act(gate(x))| <= their layer's threshold."""
    def forward_of(mlp, tau):
        def forward(x):
            a = mlp.act_fn(mlp.gate_proj(x))
            return mlp.down_proj((a * (a.abs() > tau)) * mlp.up_proj(x))
        return forward
    for layer, tau in zip(model.model.layers, thresholds):
        layer.mlp.forward = forward_of(layer.mlp, tau)
    return model


def _reference(model, new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def _assert_prefill_matches(store, ffn, ref) -> None:
    """The streamed sparse engine's last-position prefill logits equal the masked transformers reference's."""
    e = Engine(store, policy=STREAM, sparsity=ffn)
    try:
        logits = e.prefill_logits([PROMPT])
    finally:
        e.close()
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[:, -1]
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_sparsity_off_and_zero_are_the_dense_tokens(tiny):
    """Without sparsity the streamed engine gives transformers' greedy tokens; at target 0 (every non-zero
    activation kept) the bundles replace the skipped up/down matrices and the tokens are the same."""
    model, store = tiny
    ref = _reference(model, 6)
    dense, e_dense = _generate(store, None)
    zero, e_zero = _generate(store, _ffn(store, 0.0))
    assert dense == ref and zero == ref
    assert e_dense.timings.bytes["load_neurons"] == 0 and e_zero.timings.bytes["load_neurons"] > 0
    assert e_zero.timings.bytes["load_weight"] < e_dense.timings.bytes["load_weight"]


def test_sparse_logits_equal_transformers_with_the_same_neurons_masked(tiny):
    """At TARGET the engine (layers streamed without up/down, bundles of the active neurons read) gives the
    prefill logits and the greedy tokens of transformers whose MLPs mask the neurons below the thresholds."""
    import copy

    model, store = tiny
    ffn = _ffn(store, TARGET)
    ref = _masked(copy.deepcopy(model), ffn.thresholds)
    _assert_prefill_matches(store, ffn, ref)
    tokens, _ = _generate(store, _ffn(store, TARGET), new=6)
    assert tokens == _reference(ref, 6)


def test_a_decode_step_reads_the_layer_without_up_down_plus_the_active_bundles(tiny):
    """The bytes one decode step adds are, per layer, the stage file minus its up/down matrices plus one bundle
    (2H floats) per active neuron: about half the FFN's up/down bytes at TARGET 0.5, far fewer than dense."""
    _, store = tiny
    m = load_manifest(store)
    c = ModelConfig.from_dict(m.config)
    read = {}
    for new in (1, 2):
        _, e = _generate(store, _ffn(store, TARGET), new=new)
        read[new] = (e.timings.bytes["load_weight"], e.timings.bytes["load_neurons"], e.sparsity)
    (_, n1, f1), (_, n2, f2) = read[1], read[2]
    layer = m.files["layer_000.bin"]
    updown = sum(layer.tensors[k].nbytes for k in ("w_up", "w_down"))
    runs, _ = e.streamer.partial[1]  # layer 0: everything but up/down, in one run here (they come last)
    assert runs == [(0, layer.size - updown)]
    t = e.timings  # every layer read skipped exactly its up/down bytes
    assert t.count["load_weight_skipped"] >= 2 * c.num_layers
    assert t.bytes["load_weight_skipped"] == t.count["load_weight_skipped"] * updown
    decode = f2.reads.bundle_bytes["decode"]
    active = f2.reads.read_bytes["decode"] - c.num_layers * c.intermediate_size * c.hidden_size * 4  # minus gates
    assert decode == active  # counted (one up row + down column per active neuron) = read from the bundles
    assert 0.3 * c.num_layers * updown < decode < 0.7 * c.num_layers * updown
    assert n2 - n1 == decode and f1.reads.bundle_bytes["decode"] == 0


class _Logged(BundleReader):
    """The real reader, remembering which neurons each read asked for."""

    def __init__(self, model_dir):
        super().__init__(model_dir)
        self.log: list[tuple[int, list[int]]] = []

    def read(self, layer, active):
        self.log.append((layer, list(active)))
        return super().read(layer, active)

    def read_into(self, layer, active, out):  # the CPU neuron cache's reads, straight into its buffer
        self.log.append((layer, list(active)))
        return super().read_into(layer, active, out)


def _logged(store: Path, **kw) -> sparse.SparseFFN:
    ffn = _ffn(store, TARGET, **kw)
    ffn.bundles = _Logged(store)
    return ffn


def test_window_keeps_recent_neurons_and_changes_nothing(tiny):
    """With a window longer than the run, no neuron's bundle is read twice in decode; the tokens are those of a
    run without a window, which reads more bytes."""
    _, store = tiny
    plain, e0 = _generate(store, _logged(store, window=0), new=8)
    ffn = _logged(store, window=16)
    kept, e1 = _generate(store, ffn, new=8)
    assert kept == plain
    seen: dict[int, set[int]] = {}
    _, e_prefill = _generate(store, _logged(store, window=16), new=1)
    decode = ffn.bundles.log[len(e_prefill.sparsity.bundles.log):]  # the prefill's reads (as many) come first
    for layer, ids in decode:
        again = seen.setdefault(layer, set()) & set(ids)
        assert not again, (layer, sorted(again))
        seen[layer] |= set(ids)
    assert e1.timings.bytes["load_neurons"] < e0.timings.bytes["load_neurons"]
    assert ffn.neurons.hits > 0


def test_hot_neurons_are_read_once_and_change_nothing(tiny):
    """A hot set (the calibration's most frequently active neurons, sized by the byte budget) is read at start
    and never again; tokens are unchanged and later reads fall."""
    _, store = tiny
    reader = BundleReader(store)
    budget = 3 * 100 * reader.row_bytes  # 100 neurons a layer on average
    plain, e0 = _generate(store, _logged(store, window=0), new=6)
    ffn = _logged(store, window=0, hot_bytes=budget)
    hot_tokens, e1 = _generate(store, ffn, new=6)
    assert hot_tokens == plain
    hot = ffn.hot
    assert sum(len(h) for h in hot) == 300
    freq = frequency(store, TARGET)  # the most frequent over all layers: none left out beats one kept
    flat = torch.from_numpy(freq).reshape(-1)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    for j, ids in enumerate(hot):
        kept[torch.tensor(ids, dtype=torch.long) + j * freq.shape[1]] = True
    assert flat[~kept].max() <= flat[kept].min()
    first = 3  # the hot set's reads at start, one per layer
    for layer, ids in ffn.bundles.log[first:]:
        assert not set(ids) & set(hot[layer]), layer
    assert e1.timings.bytes["load_neurons"] < e0.timings.bytes["load_neurons"]
    assert e1.timings.bytes["load_neurons_resident"] == 300 * reader.row_bytes


def test_cost_model_predicts_the_bytes_a_sparse_decode_step_reads(tiny):
    """At batch 1 a decode step reads, per streamed layer, the layer without up/down ahead of compute and a
    bundle per active neuron (about 1 - target of them): what costmodel.sparse_layer_bytes predicts; with the
    hot set's hit rate the predicted bundle bytes fall as the engine's do."""
    from kubeflash_node.engine.costmodel import SparseCost, sparse_layer_bytes

    _, store = tiny
    m = load_manifest(store)
    c = ModelConfig.from_dict(m.config)
    layer = m.files["layer_000.bin"].size
    new = 9
    _, e = _generate(store, _ffn(store, TARGET, window=0), new=new)
    ahead = sum(b - a for a, b in e.streamer.partial[1][0])  # what each layer read streams
    per_layer = ahead + e.sparsity.reads.bundle_bytes["decode"] / ((new - 1) * c.num_layers)
    pa, pd, _ = sparse_layer_bytes(c, layer, SparseCost(TARGET), 1, 4)
    assert pa == ahead
    assert per_layer == pytest.approx(pa + pd, rel=0.05)
    assert pa + pd < 0.8 * layer  # and far below a dense read of the layer
    budget = 3 * 64 * BundleReader(store).row_bytes  # a quarter of the neurons hot
    _, eh = _generate(store, _ffn(store, TARGET, window=0, hot_bytes=budget), new=new)
    hot = eh.sparsity.reads.bundle_bytes["decode"] / ((new - 1) * c.num_layers)
    freq = frequency(store, TARGET)
    kept = sum(float(freq[j][ids].sum()) for j, ids in enumerate(eh.sparsity.hot))
    _, pdh, _ = sparse_layer_bytes(c, layer, SparseCost(TARGET, budget, kept / float(freq.sum())), 1, 4)
    assert hot == pytest.approx(pdh, rel=0.15) and pdh < pd


def test_plan_weighs_sparse_against_dense_reads():
    """The plan prices both reads of a llama-3-8b-shaped model from a 6 GB/s disk: at batch 1 and target 0.9 the
    sparse reads win and the dense alternative is shown; at target 0.5 the many small bundle reads (one per run of
    active neurons, on the compute thread, the policy's four in flight) cost more than they save at 80 us a read
    unless nearby runs are merged into one read, and less at the assumed 20 us (5 us a read with four in flight;
    one at a time, as the engine read them before, dense won there); at batch 256 the union of active neurons is
    nearly all of them and dense reads win whatever the cost of a read."""
    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.costmodel import Budget, Calibration, JobShape, SparseCost, plan, stage_sizes
    from kubeflash_node.store.modelconfig import preset

    c = preset("llama-3-8b")
    ceil = Ceilings(disk_read_cold=6.0, disk_read_warm=6.0, disk_write=3.0, h2d_pinned=25.0, matmul_tflops=700.0)
    kw = dict(config=c, ceil=ceil, sizes={"none": stage_sizes(c, 2)}, budget=Budget(6 << 30, 8 << 30))

    def picked(target, prompts, gap=0, **cal):
        p = plan(job=JobShape(prompts, 64, 32), sparsity=SparseCost(target, gap=gap), cal=Calibration(**cal), **kw)
        assert p.other_reads is not None and (p.other_reads.candidate.sparse is None) != (p.best.candidate.sparse is None)
        assert p.best.total_s <= p.other_reads.total_s
        return "sparse" if p.best.candidate.sparse else "dense"

    assert picked(0.9, 1) == "sparse"
    assert picked(0.5, 1, neuron_read_op_s=80e-6) == "dense" and picked(0.5, 1) == "sparse"
    assert picked(0.5, 1, neuron_read_op_s=0.0) == "sparse"
    assert picked(0.5, 256, neuron_read_op_s=0.0) == "dense"
    # runs up to merge_gap apart read as one (29 bundles at 80 us and 6 GB/s): fewer reads, and sparse wins again
    assert picked(0.5, 1, gap=None, neuron_read_op_s=80e-6) == "sparse" and picked(0.5, 256, gap=None) == "dense"


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny):
    """The tiny model in a store of its own, calibrated at TARGET with a full-rank predictor (exact: it names
    every neuron the gate would, plus those its cut lets through)."""
    from kubeflash_node.engine.cli_calibrate import fit_predictor

    model, _ = tiny
    root = tmp_path_factory.mktemp("pred")
    model.save_pretrained(root / "hf", safe_serialization=True)
    store = root / "store"
    convert(str(root / "hf"), store, dtype="float32")
    ids = torch.randint(0, 97, (768,), generator=torch.Generator().manual_seed(1)).tolist()
    path, rec = calibrate(store, ids, (TARGET,), window=256, recorder=True)
    write_bundles(store, {TARGET: rec.frequency_at(rec.thresholds_at((TARGET,))[TARGET])})
    p = fit_predictor(store, rec, rec.thresholds_at((TARGET,))[TARGET], rank=64, target=TARGET)
    return model, store, p


def test_predictor_reads_only_predicted_gate_rows_and_matches_its_mask(predicted):
    """Where the predictor is used the streamed layer comes without its gate too: only the predicted neurons' gate
    rows are read (fewer bytes than the gate), and the logits are transformers' with the neurons masked that are
    below the threshold or not predicted."""
    import copy

    from kubeflash_node.engine.model import ACTIVATIONS

    model, store, p = predicted
    assert p.use.all() and (p.recall >= 0.95).all() and (p.share < 0.85).all()
    ffn = _ffn(store, TARGET)
    assert ffn.predictor is not None
    ref = copy.deepcopy(model)
    act = ACTIVATIONS["silu"]

    def forward_of(mlp, tau, j):
        def forward(x):
            a = mlp.act_fn(mlp.gate_proj(x))
            keep = (a.abs() > tau) & p.predict(j, x, act)
            return mlp.down_proj((a * keep) * mlp.up_proj(x))
        return forward
    for j, (layer, tau) in enumerate(zip(ref.model.layers, ffn.thresholds)):
        layer.mlp.forward = forward_of(layer.mlp, tau, j)
    _assert_prefill_matches(store, ffn, ref)
    tokens, e2 = _generate(store, _ffn(store, TARGET, window=0), new=6)
    assert tokens == _reference(ref, 6)
    c = ModelConfig.from_dict(load_manifest(store).config)
    gate = c.intermediate_size * c.hidden_size * 4
    assert "low-rank predictor decides in 3 of 3 layers" in e2.sparsity.line()
    assert e2.sparsity.describe()["predictor_layers"] == [0, 1, 2]
    steps = e2.sparsity.reads.steps["decode"] + c.num_layers  # layer calls: decode steps and the prefill
    assert 0 < e2.sparsity.gates.bytes_read < 0.9 * steps * gate  # the predicted rows, not the whole gate
    assert e2.timings.bytes["load_weight_skipped"] >= e2.timings.count["load_weight_skipped"] * 3 * gate  # + padding
