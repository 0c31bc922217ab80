"""Attention input sparsity is priced, not assumed: where a store has the attention channel files and the job did
not ask for it, run_job compares FFN-only input sparsity against FFN+attention with the cost model on the
machine's ceilings (a read's cost from disk_read_op_s) and takes the faster. On a tiny random Llama (CPU): with a
per-read cost that makes the attention's column reads expensive the run stays FFN-only and its line says so with
both predicted times; with cheap reads on a slow disk it thresholds the attention too. The greedy tokens equal the
masked transformers reference of the choice made. An explicit request is kept and said to be slower."""

from __future__ import annotations

import copy

import pytest
import torch
from test_sparse_attention import _ffn, _masked, both  # noqa: F401  (the fixture)
from test_sparse_stream import TARGET, tiny  # noqa: F401  (the fixture)
from tiny_jobs import run_tiny_job, tiny_job

from kubeflash_node.engine.bench import Ceilings
from kubeflash_node.engine.costmodel import attention_choice
from kubeflash_node.engine.machine import Machine

# one read costs 50 ms on a fast disk: the attention's extra runs of columns cost more than its bytes save
DEAR = Ceilings(disk_read_cold=5.0, disk_read_warm=5.0, disk_write=5.0, h2d_pinned=10.0, matmul_tflops=1.0,
                disk_read_op_s=50e-3)
# a read costs 1 ns on a slow disk: every byte not read is time saved
CHEAP = Ceilings(disk_read_cold=0.01, disk_read_warm=0.01, disk_write=0.01, h2d_pinned=10.0, matmul_tflops=1.0,
                 disk_read_op_s=1e-9)


def _reference(model, store, prompt: list[int], new: int, attention: bool) -> list[int]:
    """transformers' greedy tokens with the FFN masks of input sparsity and, with `attention`, the attention's."""
    ffn = _ffn(store, TARGET, attention=True)
    th = ffn.attention.th if attention else [(0.0, 0.0)] * len(ffn.attention.th)  # 0: drops exact zeros only
    ref = _masked(copy.deepcopy(model), ffn.input_th, th)
    ffn.close()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("ceil", "attention"), [(DEAR, False), (CHEAP, True)], ids=["dear-reads", "cheap-reads"])
def test_the_run_takes_the_faster_of_ffn_only_and_ffn_with_attention(both, tmp_path, ceil, attention):  # noqa: F811
    model, store = both
    spec = tiny_job({"sparsity": TARGET})
    rep, _, rows = run_tiny_job(spec, store, tmp_path / "j", machine=Machine(ceil, 1 << 30, 4 << 30))
    s = rep["sparsity"]
    assert ("attention" in s) == attention
    want = "FFN+attention input sparsity: predicted" if attention else "FFN-only input sparsity (attention read whole)"
    assert s["attention_why"].startswith(want) and s["attention_why"] in s["line"]
    a, b = (float(x.split()[0]) for x in s["attention_why"].split("predicted ")[1].split(" against ")[:2])
    assert a < b  # the taken one predicted faster than the other
    assert ("attention inputs:" in s["line"]) == attention
    prompt = list(spec.input.prompts[0].token_ids)
    assert rows[0] == _reference(model, store, prompt, len(rows[0]), attention)


def test_an_asked_for_attention_sparsity_is_kept_and_said_slower():
    assert attention_choice(1.2, 1.0, asked=True) == (
        True, "FFN+attention input sparsity (asked for): predicted 1.2 s against 1 s FFN-only (+20.0%), slower than FFN-only")
    assert attention_choice(1.2, 1.0)[0] is False and attention_choice(0.9, 1.0)[0] is True
    assert attention_choice(0.995, 1.0)[0] is False  # within the margin: FFN-only, which drops less
