"""Every InferenceJob users copy (each file in examples/ and the README's manifest under "## The manifest") is
read identically by both entry points: `kubeflash run` (kubeflash_api.local.load_job_file) and the operator
(reconcile.Job.parsed = parse_job_spec + check_cluster, then reconcile.admit), and reaches the engine pod
unchanged (to_canonical -> JSON -> from_canonical).

Where they differ it is by design, and asserted as such: a file input's prompts are read in only by kubeflash run;
a configMap input is refused by kubeflash run (spec.input.configMap named); a file input without a claim is Failed
by the operator (spec.input.pvc named); a file holding a ConfigMap and an InferenceJob is for kubectl, so kubeflash
run refuses it naming the document count.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from kubeflash_api import JobSpec, SpecError, from_canonical, parse_job_spec, to_canonical
from kubeflash_api.files import load_manifest
from kubeflash_api.inferencejob import parse_job
from kubeflash_api.local import load_job_file
from kubeflash_operator import reconcile

REPO = Path(__file__).resolve().parents[3]
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _readme_manifest() -> str:
    """The yaml block under "## The manifest" in README.md."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## The manifest\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```yaml\n(.*?)```", section, re.S)[1]


def _sources() -> list[tuple[str, Path | str]]:
    out = []
    for path in sorted((REPO / "examples").glob("*.y*ml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        if any(isinstance(d, dict) and d.get("kind") == "InferenceJob" for d in docs):
            out.append((path.name, path))
    return [*out, ("README.md", _readme_manifest())]


SOURCES = _sources()


def test_the_examples_are_found():
    """The collection itself: the examples the README points at are all here (a glob finding nothing would pass)."""
    names = {n for n, _ in SOURCES}
    assert {"capital-of-france.yaml", "batch-file.yaml", "cluster-batch-configmap.yaml", "cluster-smollm2.yaml",
            "cluster-offload-pvc.yaml", "kind-long-job.yaml", "README.md"} <= names


def test_every_example_file_is_read_by_a_test():
    """Nothing in examples/ goes untested: each file is an InferenceJob manifest (read above by both entry points),
    an agent config (agent-config*.yaml, parsed by tests/unit/agent/test_agent_config.py), or a prompts file in the
    OpenAI batch format (read here). A new kind of example has to be added to a test before this passes."""
    from kubeflash_api.batch import read_batch

    jobs = {n for n, _ in SOURCES}
    unread = []
    for path in sorted((REPO / "examples").iterdir()):
        if path.name in jobs or (path.name.startswith("agent-config") and path.suffix == ".yaml"):
            continue
        if path.suffix == ".jsonl":
            assert read_batch(path), path.name
            continue
        unread.append(path.name)
    assert unread == []


def _operator(doc: dict) -> reconcile.Job:
    meta = doc["metadata"]
    return reconcile.Job(namespace=meta.get("namespace", "default"), name=meta["name"], uid="uid-1",
                         spec=doc["spec"], status={}, created=NOW, generation=1)


def _same_fields(a: JobSpec, b: JobSpec, *, prompts_may_differ: bool) -> None:
    """Field by field, so a difference names its field."""
    for f in dataclasses.fields(JobSpec):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "input" and prompts_may_differ:
            x, y = dataclasses.replace(x, prompts=()), dataclasses.replace(y, prompts=())
        assert x == y, f"{f.name}: kubeflash run {x!r} != operator {y!r}"


@pytest.mark.parametrize(("name", "source"), SOURCES, ids=[n for n, _ in SOURCES])
def test_both_entry_points_agree(tmp_path, name, source):
    """kubeflash run and the operator read the same JobSpec; the pod gets it unchanged; admission is as designed."""
    if isinstance(source, str):  # the README's block, as a user would save it
        path = tmp_path / "job.yaml"
        path.write_text(source)
    else:
        path = tmp_path / source.name
        shutil.copytree(source.parent, tmp_path, dirs_exist_ok=True)
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    doc = next(d for d in docs if d.get("kind") == "InferenceJob")

    # the operator: what kopf hands it is the object's spec, name and namespace
    job = _operator(doc)
    spec = parse_job_spec(doc["spec"], name=job.name, namespace=job.namespace)
    plan = reconcile.admit(job, now=NOW)
    if spec.input.file and not spec.input.pvc:  # by design: only kubeflash run can read a file beside the manifest
        assert isinstance(job.parsed, SpecError) and job.parsed.path == "spec.input.pvc"
        assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
        assert plan.status["message"].startswith("spec.input.pvc is required in a cluster")
    else:
        assert job.parsed == spec
        assert plan.status["phase"] == "Pending", plan.status.get("message")
    # the engine pod: the canonical form, through JSON (an environment variable), reads back equal
    canon = json.loads(json.dumps(to_canonical(spec)))
    assert from_canonical(canon, name=job.name, namespace=job.namespace) == spec

    # kubeflash run
    if len(docs) > 1:
        with pytest.raises(SpecError) as err:
            load_job_file(path)
        assert err.value.path == str(path)
        assert f"holds {len(docs)} YAML documents" in str(err.value)
        assert "InferenceJob" in str(err.value)
        return
    assert parse_job(load_manifest(path)) == spec  # the manifest as parsed, before any file is read
    if spec.input.config_map:  # by design: a ConfigMap lives in a cluster
        with pytest.raises(SpecError) as err:
            load_job_file(path)
        assert err.value.path == "spec.input.configMap"
        return
    if spec.input.file:  # on one machine the manifest's folder stands for the claim's root
        batch = path.parent / spec.input.file
        if not batch.exists():
            with pytest.raises(SpecError) as err:
                load_job_file(path)
            assert err.value.path.startswith("spec.input.file") and "does not exist" in str(err.value)
            batch.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / "examples" / "prompts.jsonl", batch)
    local = load_job_file(path)
    _same_fields(local, spec, prompts_may_differ=bool(spec.input.file))
    if spec.input.file:
        lines = [ln for ln in batch.read_text().splitlines() if ln.strip()]
        assert [p.id for p in local.input.prompts] == [json.loads(ln)["custom_id"] for ln in lines]
        assert spec.input.prompts == ()
    else:
        assert local.input.prompts == spec.input.prompts and local.input.prompts


def test_the_readme_manifest_says_what_it_shows():
    """The README's manifest is read with the values it spells (so the comparison above is not of two defaults)."""
    spec = parse_job(yaml.safe_load(_readme_manifest()))
    assert spec.offload.policy == "explicit" and spec.offload.kv.disk == 100 and spec.offload.kv_write_back
    assert spec.offload.gpu_batch_size == 4 and spec.offload.num_gpu_batches == 2
    assert spec.output.path == "results.jsonl" and spec.generation.max_new_tokens == 24
