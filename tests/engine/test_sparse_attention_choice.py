"""Attention input sparsity is priced, not assumed: where a store has the attention channel files and the job did
not ask for it, run_job compares FFN-only input sparsity against FFN+attention with the cost model on the
machine's ceilings (a read's cost from disk_read_op_s) and takes the faster. On a tiny random Llama (CPU): with a
per-read cost that makes the attention's column reads expensive the run stays FFN-only and its line says so with
both predicted times; with cheap reads on a slow disk it thresholds the attention too. The greedy tokens equal the
masked transformers reference of the choice made. An explicit request is kept and said to be slower."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_sparse_attention import _ffn, _masked, both  # noqa: F401  (the fixture)
from test_sparse_stream import TARGET, tiny  # noqa: F401  (the fixture)
from tiny_jobs import job_doc, run_tiny_job, tiny_job

from kubeflash_api import parse_job
from kubeflash_node.engine.bench import Ceilings
from kubeflash_node.engine.costmodel import attention_choice
from kubeflash_node.engine.machine import Machine

# one read costs 50 ms on a fast disk: the attention's extra runs of columns cost more than its bytes save
DEAR = Ceilings(disk_read_cold=5.0, disk_read_warm=5.0, disk_write=5.0, h2d_pinned=10.0, matmul_tflops=1.0,
                disk_read_op_s=50e-3)
# a read costs 1 ns on a slow disk: every byte not read is time saved
CHEAP = Ceilings(disk_read_cold=0.01, disk_read_warm=0.01, disk_write=0.01, h2d_pinned=10.0, matmul_tflops=1.0,
                 disk_read_op_s=1e-9)


def _auto_job():
    """tiny_job's job with `offload: {policy: auto, sparsity: TARGET}` (the plan picks the split)."""
    doc = job_doc({})
    doc["spec"]["offload"] = {"policy": "auto", "sparsity": TARGET}
    spec = parse_job(doc)
    prompts = tuple(dataclasses.replace(p, token_ids=tuple(t % 97 for t in p.token_ids)) for p in spec.input.prompts)
    return dataclasses.replace(spec, input=dataclasses.replace(spec.input, prompts=prompts))


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


@pytest.mark.parametrize(("auto", "ceil", "attention"), [(False, DEAR, False), (False, CHEAP, True), (True, CHEAP, False)],
                         ids=["dear-reads", "cheap-reads", "auto-resident"])
def test_the_run_takes_the_faster_of_ffn_only_and_ffn_with_attention(both, tmp_path, auto, ceil, attention):  # noqa: F811
    """The given policy (weights on disk) priced both ways: FFN-only where reads are dear, FFN+attention where they
    are cheap. Under policy auto both are planned: the ~800 KiB model fits the GPU, nothing is streamed, the plans
    tie and FFN-only (which drops less) is kept."""
    model, store = both
    spec = _auto_job() if auto else tiny_job({"sparsity": TARGET})
    rep, _, rows = run_tiny_job(spec, store, tmp_path / "j", machine=Machine(ceil, 2 << 30, 4 << 30))
    s = rep["sparsity"]
    assert ("attention" in s) == attention
    want = "FFN+attention input sparsity: predicted" if attention else "FFN-only input sparsity (attention read whole)"
    assert s["attention_why"].startswith(want) and s["attention_why"] in s["line"]
    a, b = (float(x.split()[0]) for x in s["attention_why"].split("predicted ")[1].split(" against ")[:2])
    assert a == b if auto else a < b  # the taken one predicted faster than the other (auto: resident, a tie)
    assert ("plan" in rep) == auto and (not auto or "disk=0)" in rep["plan"]["chosen"])  # auto: nothing streamed
    assert ("attention inputs:" in s["line"]) == attention
    prompt = list(spec.input.prompts[0].token_ids)
    assert rows[0] == _reference(model, store, prompt, len(rows[0]), attention)


def test_an_asked_for_attention_sparsity_is_kept_and_said_slower():
    assert attention_choice(1.2, 1.0, asked=True) == (
        True, "FFN+attention input sparsity (asked for): predicted 1.2 s against 1 s FFN-only (+20.0%), slower than FFN-only")
    assert attention_choice(1.2, 1.0)[0] is False and attention_choice(0.9, 1.0)[0] is True
    assert attention_choice(0.995, 1.0)[0] is False  # within the margin: FFN-only, which drops less


@pytest.mark.parametrize(("gbps", "op_s", "attention"), [(6.0, 20e-6, False), (3.0, 1e-6, True)],
                         ids=["20us-reads", "1us-reads"])
def test_the_plan_takes_the_faster_and_says_so(tmp_path, capsys, gbps, op_s, attention):
    """`kubeflash plan` of a llama-3-8b job at batch 1 whose store entry has the attention channel files: at 20 us a
    read it plans FFN-only input sparsity, at 1 us FFN+attention (as test_sparse_attention's cost-model test
    predicts), printing which with both predicted times, also in --json."""
    import json

    import yaml

    from kubeflash_node.cli import main
    from kubeflash_node.store.channels import ATTN_DIR, INDEX
    from kubeflash_node.store.ids import model_id

    uri = "dummy:llama-3-8b"
    entry = tmp_path / "store" / "models" / model_id(uri, dtype="float16", quantization="none")
    (entry / ATTN_DIR).mkdir(parents=True)
    (entry / ATTN_DIR / INDEX).write_text("{}")  # what attn_present looks for (the plan reads no column)
    job = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
           "spec": {"model": {"uri": uri, "dtype": "float16"}, "input": {"prompts": ["hello"]},
                    "generation": {"maxNewTokens": 32}, "offload": {"policy": "auto", "sparsity": 0.5}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    ceil = Ceilings(disk_read_cold=gbps, disk_read_warm=gbps, disk_write=3.0, h2d_pinned=25.0, matmul_tflops=700.0,
                    disk_read_op_s=op_s)
    (tmp_path / "ceil.json").write_text(json.dumps(ceil.to_dict()))
    rc = main(["plan", str(tmp_path / "job.yaml"), "--store", str(tmp_path / "store"), "--ceilings",
               str(tmp_path / "ceil.json"), "--gpu-memory", "6GiB", "--cpu-memory", "8GiB", "--prompt-len", "64",
               "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert rc == 0
    want = "FFN+attention input sparsity: predicted" if attention else "FFN-only input sparsity (attention read whole)"
    assert f"sparsity 0.5: {want}" in out
    assert ("q/k/v/o columns likewise" in out.split("chosen:")[1].split("\n")[0]) == attention
    assert json.loads((tmp_path / "plan.json").read_text())["attention_why"].startswith(want)
