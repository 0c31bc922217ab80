"""InferenceJob manifest parsing: good manifests parse; each malformed field gives an error naming its path."""

from __future__ import annotations

import copy
import json

import pytest

from kubeflash_node.jobspec import SpecError, load_job, parse_job

GOOD = {
    "apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
    "spec": {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["hi", "there"]},
             "generation": {"maxNewTokens": 8, "temperature": 0.7, "topP": 0.9, "seed": 3, "stop": ["\n"]}},
}


def _with(path: str, value):
    doc = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    d = doc
    for p in parents:
        d = d.setdefault(p, {})
    if value is _DELETE:
        d.pop(leaf, None)
    else:
        d[leaf] = value
    return doc


_DELETE = object()


def test_good_manifest_parses():
    """Defaults fill in; prompts get ids; generation values carry through."""
    job = parse_job(GOOD)
    assert [p.id for p in job.input.prompts] == ["prompt-0", "prompt-1"]
    assert job.model.dtype == "float16" and job.generation.top_p == 0.9 and job.generation.stop == ("\n",)
    assert job.offload.policy == "auto" and job.backoff_limit == 3


@pytest.mark.parametrize("path, value, message", [
    ("apiVersion", "v1", "apiVersion must be kubeflash.io/v1alpha1"),
    ("kind", "Job", "kind must be InferenceJob"),
    ("metadata.name", _DELETE, "metadata.name is required"),
    ("spec.model", _DELETE, "spec.model is required"),
    ("spec.model.uri", 5, "spec.model.uri must be a non-empty string"),
    ("spec.model.dtype", "float8", "spec.model.dtype must be one of"),
    ("spec.input.prompts", [], "spec.input.prompts must be a non-empty list"),
    ("spec.input.prompts", ["ok", ""], r"spec.input.prompts\[1\] must be a non-empty string"),
    ("spec.input.file", "x.jsonl", "spec.input needs exactly one of"),
    ("spec.generation.maxNewTokens", 0, "spec.generation.maxNewTokens must be >= 1"),
    ("spec.generation.maxNewTokens", 2.5, "spec.generation.maxNewTokens must be an integer"),
    ("spec.generation.temperature", -1, "spec.generation.temperature must be >= 0"),
    ("spec.generation.topP", 0, r"spec.generation.topP must be > 0"),
    ("spec.generation.topP", 1.5, "spec.generation.topP must be <= 1"),
    ("spec.generation.stop", [""], "spec.generation.stop must be a list of non-empty strings"),
    ("spec.generation.bogus", 1, "spec.generation.bogus is not a known field"),
    ("spec.offload", {"policy": "explicit", "weights": {"gpu": 50, "cpu": 20, "disk": 20}},
     "spec.offload.weights: gpu \\+ cpu \\+ disk must sum to 100"),
    ("spec.offload", {"policy": "sometimes"}, "spec.offload.policy must be one of auto, explicit"),
    ("spec.offload", {"weights": {"gpu": 100}}, "spec.offload.policy is auto"),
    ("spec.backoffLimit", -1, "spec.backoffLimit must be >= 0"),
], ids=lambda v: v if isinstance(v, str) and v.startswith(("spec", "api", "kind", "meta")) else None)
def test_malformed_field_named(path, value, message):
    """The error message names the field path and what was expected."""
    with pytest.raises(SpecError, match=message):
        parse_job(_with(path, value))


def test_openai_batch_file(tmp_path):
    """A JSONL file in the OpenAI batch format gives one prompt per line, keyed by custom_id."""
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once"}},
    ]) + "\n")
    doc = _with("spec.input", {"file": "in.jsonl"})
    m = tmp_path / "job.yaml"
    import yaml

    m.write_text(yaml.safe_dump(doc))
    job = load_job(m)
    assert [(p.id, p.max_tokens) for p in job.input.prompts] == [("a", 4), ("b", None)]
    assert job.input.prompts[1].text == "Once"


@pytest.mark.parametrize("line, message", [
    ("{oops", "in.jsonl:1: not valid JSON"),
    (json.dumps({"body": {"prompt": "x"}}), r"in.jsonl:1.custom_id is required"),
    (json.dumps({"custom_id": "a", "body": {}}), r"in.jsonl:1.body needs messages"),
], ids=["bad-json", "no-custom-id", "no-messages"])
def test_bad_batch_lines_named(tmp_path, line, message):
    """A bad batch line is reported with file and line number."""
    (tmp_path / "in.jsonl").write_text(line + "\n")
    import yaml

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_with("spec.input", {"file": "in.jsonl"})))
    with pytest.raises(SpecError, match=message):
        load_job(tmp_path / "job.yaml")


def test_yaml_errors(tmp_path):
    """Unreadable YAML and a file with no InferenceJob are named."""
    (tmp_path / "a.yaml").write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="a.yaml: not valid YAML"):
        load_job(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("kind: ConfigMap\n")
    with pytest.raises(SpecError, match="holds no InferenceJob"):
        load_job(tmp_path / "b.yaml")


def test_kv_disk_quota_parses_and_bad_values_name_the_field():
    """spec.resources.kvDisk is a Kubernetes quantity (default 10Gi, as the CRD); the engine enforces it."""
    assert parse_job(GOOD).resources.kv_disk == 10 << 30
    assert parse_job(_with("spec.resources", {"kvDisk": "2Gi", "gpus": 1})).resources.kv_disk == 2 << 30
    assert parse_job(_with("spec.resources", {"kvDisk": "500M"})).resources.kv_disk == 500_000_000
    with pytest.raises(SpecError, match="spec.resources.kvDisk must be a byte count like 10Gi"):
        parse_job(_with("spec.resources", {"kvDisk": "lots"}))
    with pytest.raises(SpecError, match="spec.resources.disk is not a known field"):
        parse_job(_with("spec.resources", {"disk": "1Gi"}))


def test_synthetic_input_rejects_unknown_fields():
    """A misspelt synthetic field is an error naming it, not a silently ignored length."""
    doc = _with("spec.input", {"synthetic": {"count": 2, "promptLength": 5}})
    assert [len(p.token_ids) for p in parse_job(doc).input.prompts] == [5, 5]
    with pytest.raises(SpecError, match="spec.input.synthetic.promptTokens is not a known field"):
        parse_job(_with("spec.input", {"synthetic": {"count": 2, "promptTokens": 5}}))


def test_memory_budgets_parse_and_bad_values_name_the_field():
    """spec.resources.gpuMemory / cpuMemory are optional quantities the engine plans within."""
    r = parse_job(_with("spec.resources", {"gpuMemory": "12Gi", "cpuMemory": "64Gi"})).resources
    assert (r.gpu_memory, r.cpu_memory, r.kv_disk) == (12 << 30, 64 << 30, 10 << 30)
    assert parse_job(GOOD).resources.gpu_memory is None
    with pytest.raises(SpecError, match="spec.resources.gpuMemory must be more than 0"):
        parse_job(_with("spec.resources", {"gpuMemory": 0}))
    with pytest.raises(SpecError, match="spec.resources.cpuMemory must be a byte count"):
        parse_job(_with("spec.resources", {"cpuMemory": "much"}))
