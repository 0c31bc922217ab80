"""The one InferenceJob parser: defaults, every section's values, and every mistake named by its field path."""

from __future__ import annotations

import copy
import math

import pytest

from kubeflash_api import SpecError, from_canonical, parse_job, parse_job_spec, to_canonical

BASE = {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["Hello", "World"]}}


def spec(**overrides):
    out = copy.deepcopy(BASE)
    out.update(overrides)
    return out


def parse(raw):
    return parse_job_spec(raw, name="j", namespace="default")


def test_minimal_spec_gets_the_defaults():
    """Only model.uri and prompts: every other field takes the default the CRD documents."""
    s = parse(spec())
    assert (s.model.dtype, s.model.quantization) == ("float16", "none")
    assert [p.messages[0]["content"] for p in s.input.prompts] == ["Hello", "World"]
    assert [p.id for p in s.input.prompts] == ["prompt-0", "prompt-1"]
    g = s.generation
    assert (g.max_new_tokens, g.temperature, g.top_p, g.seed, g.stop) == (32, 0.0, 1.0, 0, ())
    assert s.resources.gpus == 1 and s.resources.kv_disk == 10 << 30 and s.resources.gpu_memory is None
    assert s.offload.policy == "auto" and s.offload.kv.gpu == 100
    assert s.output.path is None and s.backoff_limit == 3 and s.image is None


def test_full_spec_reads_every_section():
    """Every documented field is read into the dataclasses with its value and unit."""
    s = parse(spec(
        model={"uri": "https://example.com/m.gguf", "dtype": "bfloat16", "quantization": "int4"},
        input={"file": "batches/in.jsonl", "pvc": {"claimName": "prompts"}},
        generation={"maxNewTokens": 64, "temperature": 0.7, "topP": 0.9, "seed": 7, "stop": ["\n\n"]},
        resources={"gpus": 2, "gpuMemory": "20Gi", "cpuMemory": "64Gi", "kvDisk": "1.5G"},
        offload={"policy": "explicit", "weights": {"gpu": 20, "cpu": 30, "disk": 50}, "kv": {"disk": 100},
                 "activations": {"gpu": 100}, "kvWriteBack": True, "compression": "int8"},
        output={"pvc": {"claimName": "results"}, "path": "run1/out.jsonl"}, backoffLimit=0,
        image="registry.local/kubeflash:dev"))
    assert s.input.file == "batches/in.jsonl" and s.input.pvc == "prompts" and s.input.prompts == ()
    assert s.generation.seed == 7 and s.generation.stop == ("\n\n",)
    assert s.resources.gpu_memory == 20 << 30 and s.resources.cpu_memory == 64 << 30
    assert s.resources.kv_disk == 1_500_000_000
    assert s.offload.weights.disk == 50 and s.offload.kv.disk == 100 and s.offload.kv_write_back
    assert s.output.pvc == "results" and s.output.path == "run1/out.jsonl"
    assert s.backoff_limit == 0 and s.image == "registry.local/kubeflash:dev"


def test_explicit_policy_without_activations_defaults_them_to_the_gpu():
    """The README's manifest gives weights and kv only: activations default to the GPU (both entry points)."""
    s = parse(spec(offload={"policy": "explicit", "weights": {"disk": 100}, "kv": {"disk": 100}}))
    assert s.offload.activations.gpu == 100


@pytest.mark.parametrize("raw", [
    spec(),
    spec(input={"synthetic": {"count": 3, "promptLength": 5}}, model={"uri": "dummy:opt-125m@zeros"}),
    spec(input={"configMap": {"name": "batch", "key": "in.jsonl"}}, output={"configMap": {"name": "out"}}),
    spec(offload={"policy": "explicit", "weights": {"gpu": 10, "cpu": 20, "disk": 70}, "kv": {"cpu": 100},
                  "cpuAttention": True, "gpuBatchSize": 8, "numGpuBatches": 2},
         resources={"gpuMemory": 123, "cpuMemory": "1Ki"}, image="x:1"),
], ids=["minimal", "synthetic", "configmap", "explicit"])
def test_canonical_round_trip(raw):
    """What the operator hands the pod (to_canonical) reads back as the same JobSpec, and is a fixed point."""
    s = parse(raw)
    canon = to_canonical(s)
    assert from_canonical(canon, name="j", namespace="default") == s
    assert to_canonical(from_canonical(canon, name="j", namespace="default")) == canon


BAD = [
    ("no-model", {"model": None}, "spec.model is required"),
    ("no-uri", {"model": {"dtype": "float16"}}, "spec.model.uri is required"),
    ("ftp-uri", {"model": {"uri": "ftp://host/m"}}, "spec.model.uri scheme 'ftp' is not supported"),
    ("s3-uri", {"model": {"uri": "s3://bucket/m"}}, "spec.model.uri scheme 's3' is not supported"),
    ("relative-uri", {"model": {"uri": "models/m"}}, "spec.model.uri must be builtin:<name>"),
    ("builtin-caps", {"model": {"uri": "builtin:SmolLM"}}, "spec.model.uri must be builtin:<name> with a lowercase"),
    ("dummy-empty", {"model": {"uri": "dummy:"}}, "spec.model.uri must be dummy:<preset>"),
    ("uri-dotdot", {"model": {"uri": "/srv/../etc"}}, "spec.model.uri must be an absolute path without '..'"),
    ("uri-credentials", {"model": {"uri": "https://u:p@h/m"}}, "spec.model.uri must be http(s)://<host>/<path> "
                                                              "without credentials"),
    ("uri-int", {"model": {"uri": 5}}, "spec.model.uri must be a string, got int 5"),
    ("bad-dtype", {"model": {"uri": "dummy:x", "dtype": "fp8"}}, "spec.model.dtype must be one of"),
    ("bad-quant", {"model": {"uri": "dummy:x", "quantization": "int3"}}, "spec.model.quantization must be one of"),
    ("two-inputs", {"input": {"prompts": ["a"], "configMap": {"name": "c", "key": "k"}}},
     "spec.input needs exactly one of prompts, file, configMap or synthetic"),
    ("no-input", {"input": {}}, "spec.input needs exactly one"),
    ("file-absolute", {"input": {"file": "/a.jsonl"}}, "spec.input.file must be a path relative"),
    ("file-dotdot", {"input": {"file": "a/../../b.jsonl"}}, "spec.input.file must be a path relative"),
    ("pvc-without-file", {"input": {"prompts": ["a"], "pvc": {"claimName": "p"}}}, "spec.input.pvc is only used"),
    ("empty-prompt", {"input": {"prompts": ["a", ""]}}, "spec.input.prompts[1] must have at least 1 characters"),
    ("prompt-not-string", {"input": {"prompts": [{"role": "user"}]}}, "spec.input.prompts[0] must be a string"),
    ("no-prompts", {"input": {"prompts": []}}, "spec.input.prompts must have at least 1 items"),
    ("cm-no-key", {"input": {"configMap": {"name": "c"}}}, "spec.input.configMap.key is required"),
    ("cm-bad-name", {"input": {"configMap": {"name": "Bad_Name", "key": "k"}}},
     "spec.input.configMap.name must be a Kubernetes object name"),
    ("cm-key-slash", {"input": {"configMap": {"name": "c", "key": "../k"}}}, "spec.input.configMap.key must be a "
                                                                             "ConfigMap key"),
    ("top-p-high", {"generation": {"topP": 2}}, "spec.generation.topP must be > 0 and <= 1, got 2"),
    ("top-p-zero", {"generation": {"topP": 0}}, "spec.generation.topP must be > 0 and <= 1, got 0"),
    ("temp-nan", {"generation": {"temperature": math.nan}}, "spec.generation.temperature must be a finite number"),
    ("temp-inf", {"generation": {"temperature": math.inf}}, "spec.generation.temperature must be a finite number"),
    ("temp-negative", {"generation": {"temperature": -0.1}}, "spec.generation.temperature must be >= 0"),
    ("temp-huge", {"generation": {"temperature": 1e300}}, "spec.generation.temperature must be >= 0 and <= 100"),
    ("temp-string", {"generation": {"temperature": "0.5"}}, "spec.generation.temperature must be a number"),
    ("max-tokens-zero", {"generation": {"maxNewTokens": 0}}, "spec.generation.maxNewTokens must be >= 1"),
    ("max-tokens-huge", {"generation": {"maxNewTokens": 10**30}}, "spec.generation.maxNewTokens must be >= 1 and "
                                                                  "<= 32768"),
    ("max-tokens-str", {"generation": {"maxNewTokens": "10"}}, "spec.generation.maxNewTokens must be an integer"),
    ("max-tokens-float", {"generation": {"maxNewTokens": 2.5}}, "spec.generation.maxNewTokens must be an integer"),
    ("max-tokens-bool", {"generation": {"maxNewTokens": True}}, "spec.generation.maxNewTokens must be an integer"),
    ("seed-negative", {"generation": {"seed": -1}}, "spec.generation.seed must be >= 0"),
    ("seed-float", {"generation": {"seed": 1.5}}, "spec.generation.seed must be an integer"),
    ("stop-string", {"generation": {"stop": "x"}}, "spec.generation.stop must be a list"),
    ("stop-int", {"generation": {"stop": [1]}}, "spec.generation.stop[0] must be a string"),
    ("stop-empty", {"generation": {"stop": [""]}}, "spec.generation.stop[0] must have at least 1 characters"),
    ("synthetic-zero", {"input": {"synthetic": {"count": 0}}}, "spec.input.synthetic.count must be >= 1"),
    ("batch-size-zero", {"offload": {"gpuBatchSize": 0}}, "spec.offload.gpuBatchSize must be >= 1"),
    ("gpus-nine", {"resources": {"gpus": 9}}, "spec.resources.gpus must be >= 1 and <= 8"),
    ("kv-disk-words", {"resources": {"kvDisk": "lots"}}, "spec.resources.kvDisk must be a quantity"),
    ("kv-disk-float", {"resources": {"kvDisk": 1.5e9}}, "spec.resources.kvDisk must be a quantity"),
    ("kv-disk-huge", {"resources": {"kvDisk": "9e40"}}, "spec.resources.kvDisk must be at most"),
    ("gpu-memory-zero", {"resources": {"gpuMemory": 0}}, "spec.resources.gpuMemory must be at least 1 B"),
    ("split-sum", {"offload": {"policy": "explicit", "weights": {"gpu": 50}, "kv": {"disk": 100}}},
     "spec.offload.weights gpu + cpu + disk must sum to 100"),
    ("split-float", {"offload": {"policy": "explicit", "weights": {"gpu": 50.5, "disk": 49.5}, "kv": {"disk": 100}}},
     "spec.offload.weights.gpu must be an integer"),
    ("split-missing", {"offload": {"policy": "explicit", "weights": {"gpu": 100}}},
     "spec.offload.kv is required when spec.offload.policy is explicit"),
    ("kv-split-across", {"offload": {"policy": "explicit", "weights": {"gpu": 100}, "kv": {"gpu": 50, "disk": 50}}},
     "spec.offload.kv must put 100 on one of gpu, cpu or disk"),
    ("cpu-attention-needs-cpu", {"offload": {"policy": "explicit", "weights": {"gpu": 100}, "kv": {"disk": 100},
                                             "cpuAttention": True}}, "spec.offload.cpuAttention needs the KV cache"),
    ("write-back-needs-disk", {"offload": {"policy": "explicit", "weights": {"gpu": 100}, "kv": {"gpu": 100},
                                           "kvWriteBack": True}}, "spec.offload.kvWriteBack needs the KV cache on disk"),
    ("split-with-auto", {"offload": {"kv": {"disk": 100}}}, "spec.offload.kv needs spec.offload.policy: explicit"),
    ("bad-policy", {"offload": {"policy": "manual"}}, "spec.offload.policy must be one of auto, explicit"),
    ("bad-compression", {"offload": {"compression": "zstd"}}, "spec.offload.compression must be one of"),
    ("write-back-str", {"offload": {"kvWriteBack": "yes"}}, "spec.offload.kvWriteBack must be true or false"),
    ("two-outputs", {"output": {"pvc": {"claimName": "a"}, "configMap": {"name": "b"}}},
     "spec.output takes at most one of pvc or configMap"),
    ("output-dotdot", {"output": {"path": "../x"}}, "spec.output.path must be a path relative"),
    ("output-absolute", {"output": {"path": "/etc/passwd"}}, "spec.output.path must be a path relative"),
    ("output-nul", {"output": {"path": "a\0b"}}, "spec.output.path must not contain NUL"),
    ("output-pvc-path", {"output": {"pvc": {"claimName": "a", "path": "x"}}}, "spec.output.pvc.path is not a known "
                                                                               "field"),
    ("backoff-high", {"backoffLimit": 21}, "spec.backoffLimit must be >= 0 and <= 20"),
    ("unknown-field", {"generation": {"max_tokens": 5}}, "spec.generation.max_tokens is not a known field"),
    ("unknown-top", {"priority": 1}, "spec.priority is not a known field"),
    ("section-not-object", {"generation": [1]}, "spec.generation must be an object"),
    ("key-not-string", {"generation": {1: 2}}, "spec.generation has a key that is not a string"),
]


@pytest.mark.parametrize(("overrides", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_names_the_field(overrides, expected):
    """Each malformed spec raises SpecError whose message starts with the offending field's path."""
    with pytest.raises(SpecError) as err:
        parse(spec(**overrides))
    assert expected in str(err.value)
    assert str(err.value).startswith(err.value.path)


MANIFEST = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"}, "spec": BASE}

BAD_MANIFESTS = [
    ("api-version", {"apiVersion": "v1"}, "apiVersion must be kubeflash.io/v1alpha1"),
    ("kind", {"kind": "Job"}, "kind must be InferenceJob"),
    ("no-metadata", {"metadata": None}, "metadata.name is required"),
    ("no-name", {"metadata": {"labels": {}}}, "metadata.name is required"),
    ("name-traversal", {"metadata": {"name": "../../x"}}, "metadata.name must be a DNS-1123 label"),
    ("name-upper", {"metadata": {"name": "Job"}}, "metadata.name must be a DNS-1123 label"),
    ("name-dot", {"metadata": {"name": "a.b"}}, "metadata.name must be a DNS-1123 label"),
    ("name-long", {"metadata": {"name": "a" * 57}}, "at most 56 characters"),
    ("namespace-bad", {"metadata": {"name": "j", "namespace": "../kube-system"}}, "metadata.namespace must be a "
                                                                                   "DNS-1123 label"),
    ("metadata-unknown", {"metadata": {"name": "j", "nmae": "x"}}, "metadata.nmae is not a known field"),
    ("labels-not-strings", {"metadata": {"name": "j", "labels": {"a": 1}}}, "metadata.labels.a must be a string"),
    ("top-unknown", {"specs": {}}, "specs is not a known top-level field"),
    ("no-spec", {"spec": None}, "spec is required"),
]


@pytest.mark.parametrize(("overrides", "expected"), [b[1:] for b in BAD_MANIFESTS], ids=[b[0] for b in BAD_MANIFESTS])
def test_bad_manifest_names_the_field(overrides, expected):
    """Mistakes outside spec (top level, metadata) are named too; metadata.name never reaches a path unchecked."""
    with pytest.raises(SpecError) as err:
        parse_job({**MANIFEST, **overrides})
    assert expected in str(err.value)


def test_metadata_from_kubectl_get_is_accepted():
    """An object saved with `kubectl get -o yaml` (uid, resourceVersion, creationTimestamp...) re-runs as it is."""
    meta = {"name": "j", "namespace": "team-a", "uid": "u", "resourceVersion": "5", "generation": 1,
            "creationTimestamp": "2025-01-01T00:00:00Z", "labels": {"a": "b"}, "annotations": {"c": "d"}}
    s = parse_job({**MANIFEST, "metadata": meta, "status": {"phase": "Succeeded"}})
    assert (s.name, s.namespace) == ("j", "team-a")
