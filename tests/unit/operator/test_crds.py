"""The CRDs and the API agree: generated from kubeflash_api, every field described, defaults, enums, columns."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubeflash_api import JobSpec, parse_job_spec
from kubeflash_api import inferencejob as specmod
from kubeflash_api.contract import DEFAULT_KV_DISK
from kubeflash_api.crd import crds, render
from kubeflash_operator.status import PHASES

CRDS = Path(__file__).resolve().parents[3] / "crds"


def load(name):
    crd = yaml.safe_load((CRDS / name).read_text())
    (version,) = crd["spec"]["versions"]
    return crd, version, version["schema"]["openAPIV3Schema"]


def job_schema():
    return load("inferencejobs.kubeflash.io.yaml")[2]["properties"]["spec"]["properties"]


def defaults(schema):
    """The object the API server's defaulting makes from {} for one schema node."""
    out = {}
    for key, sub in schema.get("properties", {}).items():
        if "default" in sub:
            out[key] = sub["default"]
    return out


def test_names_scope_and_status_subresource():
    """InferenceJob is namespaced (ij), FlashNode cluster-scoped (fn); both have a status subresource."""
    for name, scope, short in (("inferencejobs.kubeflash.io.yaml", "Namespaced", "ij"),
                               ("flashnodes.kubeflash.io.yaml", "Cluster", "fn")):
        crd, version, _ = load(name)
        assert crd["spec"]["group"] == "kubeflash.io" and version["name"] == "v1alpha1"
        assert crd["spec"]["scope"] == scope and crd["spec"]["names"]["shortNames"] == [short]
        assert version["subresources"] == {"status": {}}


def test_printer_columns():
    """kubectl get ij shows Phase, Model, Node, Progress, Tokens/s, Age."""
    _, version, _ = load("inferencejobs.kubeflash.io.yaml")
    names = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert names == ["Phase", "Model", "Node", "Progress", "Tokens/s", "Age"]


def test_crd_defaults_equal_the_parsers_defaults():
    """A spec defaulted by the API server parses to the same JobSpec as the bare spec parsed locally."""
    schema = job_schema()
    bare = {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["a"]}}
    defaulted = {
        "model": {**defaults(schema["model"]), **bare["model"]},
        "input": bare["input"],
        **{k: defaults(schema[k]) for k in ("generation", "resources", "offload")},
        "backoffLimit": schema["backoffLimit"]["default"],
    }
    assert parse_job_spec(defaulted, name="j", namespace="d") == parse_job_spec(bare, name="j", namespace="d")
    assert schema["resources"]["properties"]["kvDisk"]["default"] == DEFAULT_KV_DISK


@pytest.mark.parametrize(("path", "values"), [
    (("model", "dtype"), specmod.DTYPES),
    (("model", "quantization"), specmod.QUANTIZATIONS),
    (("offload", "policy"), specmod.POLICIES),
    (("offload", "compression"), specmod.COMPRESSIONS),
], ids=["dtype", "quantization", "policy", "compression"])
def test_enums_match(path, values):
    """Every enum in the CRD lists exactly the values the parser accepts."""
    section, key = path
    assert tuple(job_schema()[section]["properties"][key]["enum"]) == values


def test_ranges_match_the_brief():
    """maxNewTokens 1..32768, gpus 1..8, backoffLimit 0..20, topP in (0, 1], temperature >= 0."""
    s = job_schema()
    gen = s["generation"]["properties"]
    assert (gen["maxNewTokens"]["minimum"], gen["maxNewTokens"]["maximum"]) == (1, 32768)
    assert (gen["topP"]["minimum"], gen["topP"]["exclusiveMinimum"], gen["topP"]["maximum"]) == (0, True, 1)
    assert gen["temperature"]["minimum"] == 0
    assert (s["resources"]["properties"]["gpus"]["minimum"], s["resources"]["properties"]["gpus"]["maximum"]) == (1, 8)
    assert (s["backoffLimit"]["minimum"], s["backoffLimit"]["maximum"]) == (0, 20)


def test_cross_field_rules_are_cel():
    """Input exclusivity, explicit-offload completeness and per-split sums are x-kubernetes-validations."""
    s = job_schema()
    rules = " ".join(r["rule"] for r in s["input"]["x-kubernetes-validations"])
    assert "has(self.prompts)" in rules and "has(self.configMap)" in rules
    assert any("== 100" in r["rule"] for r in s["offload"]["properties"]["kv"]["x-kubernetes-validations"])
    assert len(s["offload"]["x-kubernetes-validations"]) == 2


@pytest.mark.parametrize("name", sorted(crds()))
def test_crds_are_generated_from_the_api(name):
    """crds/ is exactly what kubeflash_api.crd renders (python -m kubeflash_api.crd --write crds/)."""
    assert (CRDS / name).read_text() == render(crds()[name])


@pytest.mark.parametrize("name", sorted(crds()))
def test_every_field_has_a_description(name):
    """kubectl explain explains every field: each schema node below the root carries a description."""
    _, _, root = load(name)
    missing = [path for path, schema in schemas(root, "") if ".anyOf" not in path and path != ".metadata"
               and not str(schema.get("description", "")).strip()]  # the API server forbids anything in metadata
    assert not missing, f"{name}: fields without a description: {missing}"


@pytest.mark.parametrize("name", sorted(crds()))
def test_bounds_survive_the_api_servers_float64(name):
    """The API server reads minimum/maximum/default as float64: an integer bound past 2**53 would come back as
    another number (2**63 - 1 became -2**63 and refused the seed default 0)."""
    _, _, root = load(name)
    for path, schema in schemas(root, ""):
        for key in ("minimum", "maximum", "default"):
            value = schema.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                assert abs(value) <= 2**53, (path, key, value)


def test_flashnode_printer_columns():
    """kubectl get fn shows GPUs, pairs, free SSD, models ready and the heartbeat's age."""
    _, version, schema = load("flashnodes.kubeflash.io.yaml")
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Node", "GPUs", "Pairs", "Free SSD", "Models Ready", "Heartbeat", "Age"]
    status = schema["properties"]["status"]["properties"]
    for col in version["additionalPrinterColumns"]:
        field = col["jsonPath"].split(".")
        if field[1] == "status":
            assert field[2] in status, col


def test_status_phases_and_conditions_shape():
    """status.phase lists the machine's phases; conditions are metav1.Condition-shaped list-map by type."""
    status = load("inferencejobs.kubeflash.io.yaml")[2]["properties"]["status"]["properties"]
    assert tuple(status["phase"]["enum"]) == PHASES
    cond = status["conditions"]
    assert cond["x-kubernetes-list-map-keys"] == ["type"]
    assert set(cond["items"]["required"]) == {"type", "status", "lastTransitionTime", "reason", "message"}
    assert cond["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def test_every_status_field_the_operator_writes_is_in_the_schema():
    """Fields missing from a structural schema are pruned silently; the reconcile's fields must all be declared."""
    status = load("inferencejobs.kubeflash.io.yaml")[2]["properties"]["status"]["properties"]
    written = {"phase", "reason", "message", "conditions", "observedGeneration", "node", "gpu", "gpus", "disk",
               "modelDisk", "staged", "modelId", "scheduledTime", "stagedTime", "startTime", "completionTime",
               "retryAt", "attempt", "pod", "attempts"}
    assert written <= set(status)


def test_flashnode_contract_fields():
    """FlashNode status carries what docs/contract.md lists (gpus, disks, pairs, models, kvAllocations, heartbeat)."""
    _, _, schema = load("flashnodes.kubeflash.io.yaml")
    status = schema["properties"]["status"]["properties"]
    assert {"gpus", "disks", "pairs", "models", "kvAllocations", "heartbeat", "conditions"} <= set(status)
    assert status["models"]["items"]["properties"]["state"]["enum"] == ["Pending", "Staging", "Ready", "Failed", "Evicted"]
    models = schema["properties"]["spec"]["properties"]["models"]
    assert set(models["items"]["required"]) == {"id", "uri"} and models["x-kubernetes-list-map-keys"] == ["id"]


def test_jobspec_is_frozen():
    """Specs are immutable values (the CRD also forbids spec changes)."""
    js = parse_job_spec({"model": {"uri": "dummy:x"}, "input": {"prompts": ["a"]}}, name="j", namespace="d")
    assert isinstance(js, JobSpec)
    with pytest.raises(AttributeError):
        js.backoff_limit = 5


# Every field of apiextensions.k8s.io/v1 JSONSchemaProps (k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1).
# An unquoted description with a comma inside a YAML flow mapping ({type: x, description: a, b}) splits into a
# bogus key ("b"), which the API server rejects on update ("strict decoding error: unknown field").
JSON_SCHEMA_PROPS_KEYS = frozenset({
    "id", "$schema", "$ref", "description", "type", "format", "title", "default", "maximum", "exclusiveMaximum",
    "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems",
    "multipleOf", "enum", "maxProperties", "minProperties", "required", "items", "allOf", "oneOf", "anyOf", "not",
    "properties", "additionalProperties", "patternProperties", "dependencies", "additionalItems", "definitions",
    "externalDocs", "example", "nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type", "x-kubernetes-map-type",
    "x-kubernetes-validations",
})
VALIDATION_RULE_KEYS = frozenset({"rule", "message", "messageExpression", "reason", "fieldPath", "optionalOldSelf"})
CRD_FILES = sorted(p.name for p in CRDS.glob("*.yaml"))


def schemas(node, path):
    """(path, schema) for `node` and every schema nested in it (properties, items, anyOf, …)."""
    yield path, node
    for key in ("properties", "patternProperties", "definitions"):
        for name, sub in (node.get(key) or {}).items():
            yield from schemas(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties", "not", "additionalItems"):
        if isinstance(node.get(key), dict):
            yield from schemas(node[key], f"{path}.{key}")
    for key in ("allOf", "oneOf", "anyOf"):
        for i, sub in enumerate(node.get(key) or []):
            yield from schemas(sub, f"{path}.{key}[{i}]")


@pytest.mark.parametrize("name", CRD_FILES)
def test_every_schema_has_only_json_schema_props_keys(name):
    """No bogus keys (e.g. from an unquoted comma in a flow-mapping description); descriptions are strings."""
    assert CRD_FILES == ["flashnodes.kubeflash.io.yaml", "inferencejobs.kubeflash.io.yaml"]
    _, version, root = load(name)
    seen = 0
    for path, schema in schemas(root, "openAPIV3Schema"):
        seen += 1
        assert isinstance(schema, dict), path
        unknown = set(schema) - JSON_SCHEMA_PROPS_KEYS
        assert not unknown, f"{name}: {path} has keys that are not JSONSchemaProps fields: {sorted(unknown)}"
        if "description" in schema:
            assert isinstance(schema["description"], str) and schema["description"].strip(), path
        for rule in schema.get("x-kubernetes-validations") or []:
            assert set(rule) <= VALIDATION_RULE_KEYS and isinstance(rule["rule"], str), (path, rule)
    assert seen > 20
    for col in version.get("additionalPrinterColumns") or []:
        assert set(col) <= {"name", "type", "format", "description", "priority", "jsonPath"}, col
