"""InferenceJobs for the engine tests that drive run_job on a tiny random model (CPU): the manifest as a user writes
it (synthetic prompts, explicit offload with weights on disk and KV on the device), its parsed form with the
synthetic prompt ids folded into the model's vocabulary, and one run that keeps the engine and returns the result
rows' tokens."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from kubeflash_api import parse_job
from kubeflash_node.engine.generate import Engine
from kubeflash_node.engine.job import run_job
from kubeflash_node.store.format import load_manifest


def job_doc(offload: dict, *, name: str = "j", count: int = 1, prompt_length: int = 8, new: int = 3,
            batch: int = 1) -> dict:
    """The InferenceJob manifest: `offload` adds to (or overrides) the explicit weights-on-disk policy."""
    return {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": name},
            "spec": {"model": {"uri": "dummy:tiny", "dtype": "float32"},
                     "input": {"synthetic": {"count": count, "promptLength": prompt_length}},
                     "generation": {"maxNewTokens": new},
                     "offload": {"policy": "explicit", "gpuBatchSize": batch,
                                 "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                                 "kv": {"gpu": 100, "cpu": 0, "disk": 0}} | offload}}


def tiny_job(offload: dict, *, vocab: int = 97, **doc):
    """job_doc(offload, **doc) parsed, each synthetic prompt id taken modulo `vocab` (the tiny model's vocabulary)."""
    spec = parse_job(job_doc(offload, **doc))
    r = dataclasses.replace
    prompts = tuple(r(p, token_ids=tuple(t % vocab for t in p.token_ids)) for p in spec.input.prompts)
    return r(spec, input=r(spec.input, prompts=prompts))


def run_tiny_job(spec, store: Path, job_dir: Path, **kw) -> tuple[dict, Engine, list[list[int]]]:
    """(report, the engine after close, each result row's token ids) of `spec` through run_job (the pod's and
    `kubeflash run`'s path) on the CPU, with no tokenizer (the prompts are token ids); `job_dir` is created and
    holds the output, out.jsonl; `kw` goes to run_job."""
    engines = []

    def factory(*a, **k):
        engines.append(Engine(*a, **k))
        return engines[-1]

    job_dir.mkdir()
    manifest = dataclasses.replace(load_manifest(store), tokenizer=None)
    report = run_job(spec, model_dir=store, manifest=manifest, output=job_dir / "out.jsonl", device="cpu",
                     job_dir=job_dir, engine_factory=factory, **kw)
    rows = [json.loads(x)["response"]["body"]["token_ids"] for x in (job_dir / "out.jsonl").read_text().splitlines()]
    return report, engines[0], rows


CEILINGS = Path(__file__).resolve().parents[2] / "docs" / "bench-results" / "ceilings.json"  # the H100's
KUBEFLASH = [str(Path(sys.executable).parent / "kubeflash")]


def plan_cli(tmp: Path, uri, *, dtype: str = "float16", count: int = 4, prompt_length: int = 64, new: int = 32,
             offload: str | None = None, store: Path | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`kubeflash plan` in its own process (KUBEFLASH_HOME under `tmp`, run from `tmp`) of a job of `count` synthetic
    prompts on `uri`, with the GPU/CPU budgets 12Gi/16Gi, against CEILINGS, and `offload` (flow YAML) and `--store`
    when given: (the process, asserted to exit 0, the plan's --json)."""
    job, out = tmp / "plan-job.yaml", tmp / "plan.json"
    job.write_text(f"""apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {{name: moe}}
spec:
  model: {{uri: "{uri}", dtype: {dtype}}}
  input: {{synthetic: {{count: {count}, promptLength: {prompt_length}}}}}
  generation: {{maxNewTokens: {new}}}
  resources: {{gpuMemory: 12Gi, cpuMemory: 16Gi}}
""" + (f"  offload: {offload}\n" if offload is not None else ""))
    out.unlink(missing_ok=True)
    env = os.environ | {"KUBEFLASH_HOME": str(tmp / "home")}
    proc = subprocess.run(KUBEFLASH + ["plan", str(job), "--ceilings", str(CEILINGS), "--json", str(out)]
                          + (["--store", str(store)] if store is not None else []),
                          capture_output=True, text=True, timeout=600, cwd=tmp, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())
