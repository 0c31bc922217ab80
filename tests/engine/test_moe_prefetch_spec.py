"""spec.offload.expertPrefetch reaches the engine: a tiny random Qwen3-MoE job run through run_job (the path of
`kubeflash run` and the inference pod) with prefetch off, on, and auto (priced on the GPU machine's ceilings, and
with no ceilings at all) writes the same tokens in every case, equal to transformers' greedy ones; the engine's policy
has the switch the choice names, the run report says what was chosen and why, and only a run with prefetch on has
prefetch reads. `kubeflash plan` states its choice and puts it in the offload YAML to pin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_random import greedy
from tiny_jobs import run_tiny_job, tiny_job
from tiny_moe import VOCAB, qwen3_moe_store

from kubeflash_node.engine.bench import Ceilings
from kubeflash_node.engine.experts import ROUTING_FILE
from kubeflash_node.engine.machine import Machine
from kubeflash_node.engine.planning import needs_ceilings
from kubeflash_node.store.format import load_manifest

ROOT = Path(__file__).resolve().parents[2]
CEILINGS = ROOT / "docs" / "bench-results" / "ceilings.json"
KUBEFLASH = [str(Path(sys.executable).parent / "kubeflash")]
NEW = 10


def _job(offload: dict):
    return tiny_job(offload, vocab=VOCAB, name="moe", count=2, prompt_length=6, new=NEW, batch=2)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return qwen3_moe_store(tmp_path_factory.mktemp("moe"))


def _run(store: Path, tmp: Path, name: str, offload: dict, machine: Machine | None = None):
    """(report, engine after close, token rows, prompts) of one job through run_job, from no saved routing counts."""
    spec = _job(offload)
    (store / ROUTING_FILE).unlink(missing_ok=True)
    report, engine, rows = run_tiny_job(spec, store, tmp / name, machine=machine)
    (store / ROUTING_FILE).unlink(missing_ok=True)
    return report, engine, rows, [list(p.token_ids) for p in spec.input.prompts]


def test_every_setting_writes_transformers_tokens_and_runs_as_chosen(moe, tmp_path):
    model, store = moe
    gpu = Machine(Ceilings.load(CEILINGS), 80 << 30, 64 << 30)
    runs = {"off": _run(store, tmp_path, "off", {"expertPrefetch": "off"}),
            "on": _run(store, tmp_path, "on", {"expertPrefetch": True}),  # an unquoted YAML `on`
            "auto-priced": _run(store, tmp_path, "auto-priced", {}, machine=gpu),
            "auto-unpriced": _run(store, tmp_path, "auto-unpriced", {"expertPrefetch": "auto"})}
    prompts = runs["off"][3]
    ref = [greedy(model, [p], NEW)[0] for p in prompts]
    for name, (report, engine, rows, _) in runs.items():
        assert rows == ref, name
        choice = report["expert_prefetch_choice"]
        assert engine.policy.expert_prefetch is choice["on"], name
        assert ("expert_prefetch" in report) is choice["on"], name  # the prefetch stats: reads were predicted
        assert choice["lines"][0].startswith(f"expert prefetch: {'on' if choice['on'] else 'off'} "), name
    assert not runs["off"][0]["expert_prefetch_choice"]["on"] and runs["on"][0]["expert_prefetch_choice"]["on"]
    assert runs["on"][0]["expert_prefetch"]["reads_issued"] > 0
    # the tiny model's layers read their non-expert part in microseconds, far less than attention lasts, and a
    # read routes to most of its 16 experts: the cost model turns prefetch on
    priced = runs["auto-priced"][0]["expert_prefetch_choice"]
    assert priced["on"] and priced["on_s"] < priced["off_s"] and priced["attention_s"] > priced["nonexpert_read_s"]
    unpriced = runs["auto-unpriced"][0]["expert_prefetch_choice"]
    assert not unpriced["on"] and unpriced["why"] == "no measured ceilings to price it against reads after the router"


def test_an_explicit_moe_job_with_auto_prefetch_is_priced(moe):
    """`kubeflash run` and the pod measure (or load) the ceilings for an explicit policy too when a MoE model's
    expertPrefetch is auto, so that auto can be priced on a GPU; not when it is on or off."""
    _, store = moe
    manifest = load_manifest(store)
    assert needs_ceilings(_job({}), manifest)
    assert not needs_ceilings(_job({"expertPrefetch": "off"}), manifest)
    assert not needs_ceilings(_job({"expertPrefetch": "on"}), manifest)


def test_plan_states_its_choice_and_pins_it(tmp_path):
    """The documented Qwen3-30B-A3B job on the GPU machine's ceilings: the disk is busy reading each layer's
    non-expert part for longer than attention lasts, so auto is off; the plan says so, with the numbers, in --json too."""
    job = tmp_path / "job.yaml"
    job.write_text("""apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {name: moe}
spec:
  model: {uri: "dummy:qwen3-30b-a3b", dtype: float16, quantization: int8}
  input: {synthetic: {count: 4, promptLength: 64}}
  generation: {maxNewTokens: 32}
  resources: {gpuMemory: 12Gi, cpuMemory: 16Gi}
""")
    env = os.environ | {"KUBEFLASH_HOME": str(tmp_path / "home")}
    proc = subprocess.run(KUBEFLASH + ["plan", str(job), "--ceilings", str(CEILINGS), "--json", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    pf = json.loads((tmp_path / "p.json").read_text())["moe"]["expert_prefetch"]
    assert pf["setting"] == "auto" and not pf["on"] and pf["on_s"] > pf["off_s"]
    assert pf["attention_s"] < pf["nonexpert_read_s"] and pf["wasted_bytes"] > pf["overlapped_bytes"]
    out = proc.stdout
    assert "  expert prefetch: off (spec.offload.expertPrefetch: auto): the cost model predicts the " in out
    assert "the disk has no idle window for expert reads" in out and "assumed: the router applied to" in out
    assert "    expertPrefetch: off\n" in out  # in the offload YAML to pin
