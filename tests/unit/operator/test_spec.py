"""Spec parsing: defaults match the CRD, and every mistake names its field path."""

from __future__ import annotations

import pytest

from operator_factories import job_spec
from kubeflash_operator.spec import SpecError, parse_job_spec, parse_quantity


def test_minimal_spec_gets_crd_defaults():
    """A spec with only model.uri and prompts is filled with the same defaults the CRD applies."""
    spec = parse_job_spec(job_spec())
    assert spec.model.dtype == "float16" and spec.model.quantization == "none"
    assert spec.input.prompts == ("Hello", "World")
    assert (spec.generation.max_new_tokens, spec.generation.temperature, spec.generation.top_p) == (32, 0.0, 1.0)
    assert spec.resources.gpus == 1 and spec.resources.kv_disk == 10 * 2**30
    assert spec.offload.policy == "auto" and spec.offload.weights is None
    assert spec.output is None and spec.backoff_limit == 3 and spec.image is None


def test_full_spec_round_trips_every_section():
    """Every documented field is read into the dataclasses with its value and unit."""
    spec = parse_job_spec(job_spec(
        model={"uri": "https://example.com/m.gguf", "dtype": "bfloat16", "quantization": "int4"},
        input={"file": "batches/in.jsonl", "pvc": {"claimName": "prompts"}},
        generation={"maxNewTokens": 64, "temperature": 0.7, "topP": 0.9, "seed": 7, "stop": ["\n\n"]},
        resources={"gpus": 2, "gpuMemory": "20Gi", "cpuMemory": "64Gi", "kvDisk": "1.5G"},
        offload={"policy": "explicit", "weights": {"gpu": 20, "cpu": 30, "disk": 50},
                 "kv": {"disk": 100}, "activations": {"gpu": 100}, "kvWriteBack": True, "compression": "int8"},
        output={"pvc": {"claimName": "results", "path": "run1"}},
        backoffLimit=0,
        image="registry.local/kubeflash:dev",
    ))
    assert spec.input.file == "batches/in.jsonl" and spec.input.pvc == "prompts"
    assert spec.generation.seed == 7 and spec.generation.stop == ("\n\n",)
    assert spec.resources.gpu_memory == 20 * 2**30 and spec.resources.kv_disk == 1_500_000_000
    assert spec.resources.cpu_memory_quantity == "64Gi"
    assert spec.offload.weights.disk == 50 and spec.offload.kv.disk == 100 and spec.offload.kv_write_back
    assert spec.output.pvc == "results" and spec.output.path == "run1"
    assert spec.backoff_limit == 0 and spec.image == "registry.local/kubeflash:dev"


def test_synthetic_input_and_micro_batches():
    """Benchmark jobs: synthetic token prompts and FlexGen's micro-batch knobs, as the engine reads them."""
    spec = parse_job_spec(job_spec(model={"uri": "dummy:opt-1.3b"}, input={"synthetic": {"count": 8}},
                                   offload={"gpuBatchSize": 4, "numGpuBatches": 2}))
    assert (spec.input.synthetic.count, spec.input.synthetic.prompt_length) == (8, 32)
    assert (spec.offload.gpu_batch_size, spec.offload.num_gpu_batches) == (4, 2)


def test_model_id_is_the_agents():
    """The operator names a model exactly as kubeflash_node.store.ids.model_id does."""
    from kubeflash_node.store.ids import model_id

    spec = parse_job_spec(job_spec(model={"uri": "dummy:llama-7b", "dtype": "float32"}))
    assert spec.model.id == model_id("dummy:llama-7b", dtype="float32", quantization="none")


BAD = [
    ("no-model", {"model": None}, "spec.model is required"),
    ("no-uri", {"model": {"dtype": "float16"}}, "spec.model.uri is required"),
    ("ftp-uri", {"model": {"uri": "ftp://host/m"}}, "spec.model.uri must be builtin:<name>"),
    ("relative-uri", {"model": {"uri": "models/m"}}, "spec.model.uri must be builtin:<name>"),
    ("builtin-caps", {"model": {"uri": "builtin:SmolLM"}}, "spec.model.uri must be builtin:<name> with a lowercase"),
    ("dummy-empty", {"model": {"uri": "dummy:"}}, "spec.model.uri must name a config"),
    ("uri-dotdot", {"model": {"uri": "/srv/../etc"}}, "spec.model.uri must not contain '..'"),
    ("bad-dtype", {"model": {"uri": "dummy:x", "dtype": "fp8"}}, "spec.model.dtype must be one of"),
    ("bad-quant", {"model": {"uri": "dummy:x", "quantization": "int3"}}, "spec.model.quantization must be one of"),
    ("two-inputs", {"input": {"prompts": ["a"], "configMap": {"name": "c", "key": "k"}}},
     "spec.input needs exactly one of prompts, file, configMap or synthetic"),
    ("no-input", {"input": {}}, "spec.input needs exactly one"),
    ("file-no-pvc", {"input": {"file": "a.jsonl"}}, "spec.input.pvc.claimName is required"),
    ("file-absolute", {"input": {"file": "/a.jsonl", "pvc": {"claimName": "p"}}}, "spec.input.file must be a path"),
    ("pvc-without-file", {"input": {"prompts": ["a"], "pvc": {"claimName": "p"}}}, "spec.input.pvc is only used"),
    ("empty-prompt", {"input": {"prompts": ["a", ""]}}, "spec.input.prompts[1] must be a non-empty string"),
    ("cm-no-key", {"input": {"configMap": {"name": "c"}}}, "spec.input.configMap.key is required"),
    ("cm-bad-name", {"input": {"configMap": {"name": "Bad_Name", "key": "k"}}},
     "spec.input.configMap.name must be a Kubernetes object name"),
    ("top-p-high", {"generation": {"topP": 2}}, "spec.generation.topP must be in (0, 1], got 2"),
    ("top-p-zero", {"generation": {"topP": 0}}, "spec.generation.topP must be in (0, 1], got 0"),
    ("temp-negative", {"generation": {"temperature": -0.1}}, "spec.generation.temperature must be in"),
    ("max-tokens-zero", {"generation": {"maxNewTokens": 0}}, "spec.generation.maxNewTokens must be in 1..32768"),
    ("max-tokens-huge", {"generation": {"maxNewTokens": 40000}}, "spec.generation.maxNewTokens must be in 1..32768"),
    ("max-tokens-str", {"generation": {"maxNewTokens": "10"}}, "spec.generation.maxNewTokens must be an integer"),
    ("synthetic-zero", {"input": {"synthetic": {"count": 0}}}, "spec.input.synthetic.count must be in 1..100000"),
    ("batch-size-zero", {"offload": {"gpuBatchSize": 0}}, "spec.offload.gpuBatchSize must be in 1..4096"),
    ("gpus-nine", {"resources": {"gpus": 9}}, "spec.resources.gpus must be in 1..8"),
    ("kv-disk-words", {"resources": {"kvDisk": "lots"}}, "spec.resources.kvDisk must be a quantity"),
    ("split-sum", {"offload": {"policy": "explicit", "weights": {"gpu": 50}, "kv": {"disk": 100},
                               "activations": {"gpu": 100}}}, "spec.offload.weights gpu + cpu + disk must sum to 100"),
    ("split-missing", {"offload": {"policy": "explicit", "weights": {"gpu": 100}}},
     "spec.offload.kv is required when spec.offload.policy is explicit"),
    ("split-with-auto", {"offload": {"kv": {"disk": 100}}}, "spec.offload.kv needs spec.offload.policy: explicit"),
    ("bad-policy", {"offload": {"policy": "manual"}}, "spec.offload.policy must be one of auto, explicit"),
    ("bad-compression", {"offload": {"compression": "zstd"}}, "spec.offload.compression must be one of"),
    ("write-back-str", {"offload": {"kvWriteBack": "yes"}}, "spec.offload.kvWriteBack must be true or false"),
    ("two-outputs", {"output": {"pvc": {"claimName": "a"}, "configMap": {"name": "b"}}},
     "spec.output needs exactly one of pvc or configMap"),
    ("output-dotdot", {"output": {"pvc": {"claimName": "a", "path": "../x"}}}, "spec.output.pvc.path must be a path"),
    ("backoff-high", {"backoffLimit": 21}, "spec.backoffLimit must be in 0..20"),
    ("unknown-field", {"generation": {"max_tokens": 5}}, "spec.generation.max_tokens is not a known field"),
    ("section-not-object", {"generation": [1]}, "spec.generation must be an object"),
]


@pytest.mark.parametrize(("overrides", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_names_the_field(overrides, expected):
    """Each malformed spec raises SpecError whose message starts with the offending field's path."""
    with pytest.raises(SpecError) as err:
        parse_job_spec(job_spec(**overrides))
    assert expected in str(err.value)
    assert str(err.value).startswith(err.value.path)


QUANTITIES = [
    ("binary", "10Gi", 10 * 2**30),
    ("decimal", "2G", 2_000_000_000),
    ("fraction", "1.5Ki", 1536),
    ("exponent", "1e3", 1000),
    ("plain", "4096", 4096),
    ("int", 123, 123),
    ("rounds-up", "0.5", 1),
]


@pytest.mark.parametrize(("value", "expected"), [q[1:] for q in QUANTITIES], ids=[q[0] for q in QUANTITIES])
def test_parse_quantity(value, expected):
    """Kubernetes quantities become whole bytes, rounded up."""
    assert parse_quantity(value, path="x") == expected


@pytest.mark.parametrize("value", ["10GB", "-1Gi", "1m", "", True, 1.5], ids=["GB", "negative", "milli", "empty",
                                                                            "bool", "float"])
def test_parse_quantity_rejects(value):
    """Units Kubernetes does not know, negatives, millis and non-strings are errors naming the field."""
    with pytest.raises(SpecError, match=r"^x "):
        parse_quantity(value, path="x")
