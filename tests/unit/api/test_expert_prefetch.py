"""spec.offload.expertPrefetch: auto (default) | on | off, in the one parser and the generated CRDs.

Unquoted `on` / `off` reach the parser as booleans from YAML 1.1 loaders (PyYAML here, go-yaml in kubectl) and mean
on / off; anything else is refused with the field's path; the canonical form the operator hands the pod keeps it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubeflash_api import SpecError, from_canonical, parse_job_spec, to_canonical

ROOT = Path(__file__).resolve().parents[3]
BASE = """
model: {uri: "dummy:tiny"}
input: {prompts: [Hello]}
"""


def _parse(offload: str):
    raw = yaml.safe_load(BASE + (f"offload: {offload}\n" if offload else ""))
    return parse_job_spec(raw, name="j", namespace="default")


@pytest.mark.parametrize("offload, want", [("", "auto"), ("{expertPrefetch: auto}", "auto"),
                                           ("{expertPrefetch: on}", "on"), ("{expertPrefetch: off}", "off"),
                                           ("{expertPrefetch: 'on'}", "on"), ("{expertPrefetch: true}", "on"),
                                           ("{expertPrefetch: false}", "off")],
                         ids=["absent", "auto", "on-unquoted", "off-unquoted", "on-quoted", "true", "false"])
def test_expert_prefetch_parses_and_round_trips(offload, want):
    s = _parse(offload)
    assert s.offload.expert_prefetch == want
    canon = to_canonical(s)
    assert canon["offload"]["expertPrefetch"] == want
    assert from_canonical(canon, name="j", namespace="default").offload.expert_prefetch == want


@pytest.mark.parametrize("value", ["yes please", "Auto", "'ON'", 1, 0, 0.5, "[on]", "{gpu: on}", "''"],
                         ids=["words", "Auto", "ON", "one", "zero", "half", "list", "map", "empty"])
def test_bad_expert_prefetch_is_refused_naming_the_field(value):
    with pytest.raises(SpecError) as e:
        _parse(f"{{expertPrefetch: {value}}}")
    assert "spec.offload.expertPrefetch" in str(e.value) and "auto, on or off" in str(e.value)


@pytest.mark.parametrize("path", ["crds/inferencejobs.kubeflash.io.yaml",
                                  "helm/kubeflash/files/crds/inferencejobs.kubeflash.io.yaml"])
def test_crds_carry_the_field_with_its_default(path):
    """The CRDs as generated (kubeflash_api.crd) and copied into the chart: the API server keeps the field and
    defaults it to auto; any value passes it (on / off arrive as booleans), the operator's parser checks it."""
    crd = yaml.safe_load((ROOT / path).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["offload"]
    field = schema["properties"]["expertPrefetch"]
    assert field["default"] == "auto" and field.get("x-kubernetes-preserve-unknown-fields") is True
    assert "mispredicted" in field["description"]
