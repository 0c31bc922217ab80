"""Long context (issue 18): attention without a dense [B, 1, S, T] mask computes what the dense-mask softmax
computes for every shape the engine runs (prefill, decode, a cached prefix, left padding, sliding windows,
grouped-query heads, the chunked fallback), make_batch holds O(B x T) numbers rather than an S x T mask, and a
job whose prompt passes the model's positions (after rope scaling) or whose one sequence's KV cannot fit its
tier's budget is refused before the engine starts, with the numbers that do not fit. Agreement with
transformers for every tier is test_architectures / test_config_parity / test_kv_techniques / test_compression."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from kubeflash_node.engine import model as M


def _reference(q, k, v, start, first, window):
    """Float64 softmax attention under the dense mask the engine used to build: key k visible to the query at
    slot s when first[r] <= k <= s and (window) s - k < window; a padding query sees itself."""
    b, nh, s, d = q.shape
    rep = nh // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    qs = torch.arange(start, start + s)[:, None]
    ks = torch.arange(k.shape[2])[None]
    seen = (ks <= qs)[None] & (ks >= torch.tensor(first)[:, None, None])
    if window:
        seen &= (qs - ks < window)[None]
    seen |= (ks == qs)[None]
    scores = (q.double() @ k.transpose(-1, -2)) / d ** 0.5
    return scores.masked_fill(~seen[:, None], float("-inf")).softmax(-1) @ v


def _check(q, k, v, span, out):
    ref = _reference(q, k, v, span.start, span.first, span.window)
    for r, f in enumerate(span.first):
        real = max(0, f - span.start)  # the row's first real query; padding queries' outputs are unused
        torch.testing.assert_close(out[r, :, real:].double(), ref[r, :, real:], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("heads, window, step, first", list(itertools.product(
    [(4, 4), (8, 2)], [0, 3, 64], ["prefill", "cached-prefix", "decode"], [(0, 0, 0), (0, 5, 2), (3, 3, 3)])))
def test_attention_matches_the_dense_mask(heads, window, step, first):
    torch.manual_seed(0)
    nh, nk = heads
    start, s = {"prefill": (0, 17), "cached-prefix": (20, 9), "decode": (24, 1)}[step]
    q = torch.randn(3, nh, s, 16)
    k, v = torch.randn(3, nk, start + s, 16), torch.randn(3, nk, start + s, 16)
    span = M.Span(start, first, window)
    _check(q, k, v, span, M.attention(q, k, v, span))
    if not window:  # the per-group causal path (prefill everywhere; a cached prefix or a decode step on CUDA)
        _check(q, k, v, span, M._causal_groups(q, k, v, span))


@pytest.mark.parametrize("window", [0, 5])
def test_chunked_fallback_is_exact_and_bounded(monkeypatch, window):
    """The masked path splits queries into chunks whose mask stays under _CHUNK_ELEMS elements."""
    monkeypatch.setattr(M, "_CHUNK_ELEMS", 2048)
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 8, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    span = M.Span(0, (0, 7), window)
    made = []
    real = span.chunk_mask
    monkeypatch.setattr(span, "chunk_mask", lambda *a: made.append(real(*a)) or made[-1])
    _check(q, k, v, span, M._masked_chunks(q, k, v, span))
    # [B, 1, C, K] per chunk, never [S, T]; the CPU kernel's scores (8 heads of it) stay within the budget too
    assert len(made) > 1 and max(m.numel() for m in made) * 8 <= 2048


def test_make_batch_holds_no_dense_mask():
    b, tp, new = 4, 4096, 8
    mask = torch.zeros(b, tp + new, dtype=torch.long)
    lengths = [4096, 4000, 1, 2500]
    for r, n in enumerate(lengths):
        mask[r, tp - n:tp] = 1
    batch = M.make_batch(mask, 0, tp, "cpu")
    tensors = [t for t in vars(batch).values() if isinstance(t, torch.Tensor)]
    assert max(t.numel() for t in tensors) <= b * tp  # positions: O(B x S); no S x T tensor anywhere
    assert batch.span.first == (0, 96, 4095, 1596) and batch.start == 0
    assert batch.positions[1, 96:].tolist() == list(range(4000))
    mask[:, tp] = 1
    step = M.make_batch(mask, tp, 1, "cpu")
    assert step.positions[:, 0].tolist() == lengths and step.mask_for(7).window == 7
    mask[2, tp - 3] = 1  # a hole before row 2's token: not a left-padded row
    with pytest.raises(ValueError, match="consecutive"):
        M.make_batch(mask, 0, tp, "cpu")


def test_make_batch_positions_and_refusals_over_random_masks():
    """Slot j of a row holds position (real slots up to j) - 1, at least 0, and a row whose real tokens are not
    consecutive up to the last slot is refused: the definitions, checked against masks drawn at random (rows with
    no real token, gaps, real tokens past the step's slots, which make_batch must ignore)."""
    g = torch.Generator().manual_seed(7)
    refused = accepted = 0
    for _ in range(2000):
        b, cap = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 13, (1,), generator=g))
        start = int(torch.randint(0, cap, (1,), generator=g))
        new = int(torch.randint(1, cap - start + 1, (1,), generator=g))
        t = start + new
        mask = torch.zeros(b, cap, dtype=torch.long)
        for r in range(b):
            if torch.rand(1, generator=g) < 0.8:
                n = int(torch.randint(0, t + 1, (1,), generator=g))
                mask[r, t - n:t] = 1
            else:
                mask[r] = torch.randint(0, 2, (cap,), generator=g)
            mask[r, t:] = torch.randint(0, 2, (cap - t,), generator=g)
        real = mask[:, :t].cumsum(-1)
        valid = all(bool((mask[r, t - int(real[r, -1]):t] == 1).all()) for r in range(b))
        if not valid:
            with pytest.raises(ValueError, match="consecutive"):
                M.make_batch(mask, start, new)
            refused += 1
            continue
        batch = M.make_batch(mask, start, new)
        expect = (real - 1).clamp(min=0)
        assert torch.equal(batch.all_positions, expect)
        assert torch.equal(batch.positions, expect[:, start:t])
        assert batch.span.first == tuple((t - real[:, -1]).tolist())
        accepted += 1
    assert refused > 100 and accepted > 1000


def test_context_limit_follows_rope_scaling():
    from kubeflash_node.engine.planning import context_limit
    from kubeflash_node.store.modelconfig import preset

    llama = preset("llama-2-7b")  # 4096 positions
    assert context_limit(llama) == 4096
    assert context_limit(preset("llama-3-8b")) == 131072  # llama3 scaling: the config already states the window
    assert context_limit(preset("llama-3-8b-32k")) == 32768
    assert context_limit(replace(llama, rope_scaling={"rope_type": "linear", "factor": 4.0})) == 16384
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert context_limit(replace(llama, rope_scaling=yarn)) == 16384


def _job(max_new=4, offload=None, resources=None, length=32):
    from kubeflash_api import parse_job

    return parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
                      "spec": {"model": {"uri": "dummy:opt-125m", "dtype": "float32"},
                               "input": {"synthetic": {"count": 2, "promptLength": length}},
                               "generation": {"maxNewTokens": max_new}, "resources": resources or {},
                               "offload": offload or {"policy": "auto"}}})


def _refused(opt_store, tmp_path, spec, monkeypatch):
    """run_job must refuse before the engine is built: Engine.__init__ is replaced by one that fails the test."""
    from kubeflash_node.engine import job
    from kubeflash_node.store.format import load_manifest

    def no_engine(*a, **k):
        raise AssertionError("the engine started for a job that had to be refused")

    monkeypatch.setattr(job, "Engine", no_engine)
    out = tmp_path / "out.jsonl"
    try:
        job.run_job(spec, model_dir=opt_store, manifest=load_manifest(opt_store), output=out, device="cpu",
                    job_dir=tmp_path)
    finally:
        assert not out.exists() or not out.read_text().strip()


def test_prompt_past_the_positions_is_refused_before_any_work(opt_store, tmp_path, monkeypatch):
    from kubeflash_api import SpecError

    # opt-125m has 2048 learned positions: 2040 + 16 = 2056
    with pytest.raises(SpecError, match=r"spec.input.synthetic\[0\] \(id synthetic-0\): 2040 tokens \+ "
                                        r"max_new_tokens 16 = 2056 tokens exceed the model's context window of 2048"):
        _refused(opt_store, tmp_path, _job(max_new=16, length=2040), monkeypatch)


def test_one_sequence_over_its_tiers_budget_is_refused(opt_store, tmp_path, monkeypatch):
    from kubeflash_api import SpecError

    cpu = {"policy": "explicit", "weights": {"gpu": 100, "cpu": 0, "disk": 0}, "kv": {"gpu": 0, "cpu": 100, "disk": 0}}
    # one sequence: (32 + 4) tokens x 12 layers x K, V of 768 float32 values = 2.5 MiB > 1 MiB
    with pytest.raises(SpecError, match=r"spec.resources.cpuMemory: one sequence of 32 prompt \+ 4 new tokens needs "
                                        r"2.5 MiB of KV cache \(cpu tier\), more than the 1.0 MiB budget"):
        _refused(opt_store, tmp_path, _job(offload=cpu, resources={"cpuMemory": "1Mi"}), monkeypatch)
    disk = dict(cpu, kv={"gpu": 0, "cpu": 0, "disk": 100})
    with pytest.raises(SpecError, match=r"spec.resources.kvDisk: .* one sequence alone needs 2.5 MiB"):
        _refused(opt_store, tmp_path, _job(offload=disk, resources={"kvDisk": "1Mi"}), monkeypatch)
