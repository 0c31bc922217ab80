"""A shard job carries only its own inline prompts: the operator's child bodies of a parallelism job each hold
exactly the prompts sha256(custom_id) mod N gives them, with the parent's custom_ids kept (spec.shard.promptIndex),
so the shard jobs together hold every prompt once and the engine's shard filter keeps all of a shard's own; a
shard that owns no prompt carries one foreign prompt that the filter drops; file and ConfigMap inputs are left as
they are (the pod reads them and keeps its own lines); promptIndex is checked and survives the canonical spec."""

from __future__ import annotations

import json

import pytest

from kubeflash_api import SpecError, from_canonical, parse_job_spec, to_canonical
from kubeflash_api.sharding import inline_split, shard_of, shard_prompts
from kubeflash_operator.shards import child_body

PROMPTS = [f"question {i}" for i in range(40)]
SPEC = {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": PROMPTS}, "parallelism": 7}


def _children(spec, count):
    split = inline_split(len(spec["input"]["prompts"]), count)
    return [child_body(namespace="ns", parent="big", uid="u", spec=spec, index=k, count=count, split=split)
            for k in range(count)]


def test_each_shard_holds_only_its_own_prompts_with_the_parents_ids():
    parent = parse_job_spec(SPEC, name="big", namespace="ns")
    text = {p.id: p.messages[0]["content"] for p in parent.input.prompts}
    seen = []
    for k, body in enumerate(_children(SPEC, 7)):
        assert len(body["spec"]["input"]["prompts"]) < len(PROMPTS)
        child = parse_job_spec(body["spec"], name=f"big-s{k}", namespace="ns")
        ids = [p.id for p in child.input.prompts]
        assert all(shard_of(i, 7) == k for i in ids)
        assert [p.messages[0]["content"] for p in child.input.prompts] == [text[i] for i in ids]
        assert shard_prompts(child.input.prompts, child.shard) == child.input.prompts  # the engine keeps them all
        assert ids == sorted(ids, key=lambda i: int(i.split("-")[1]))  # input order
        seen += ids
    assert sorted(seen) == sorted(text) and len(seen) == len(set(seen))
    assert SPEC["input"]["prompts"] is PROMPTS and len(PROMPTS) == 40  # the parent's spec untouched


def test_the_shard_bodies_together_are_about_one_parent_spec_not_n():
    one = len(json.dumps(SPEC))
    total = sum(len(json.dumps(b["spec"])) for b in _children(SPEC, 7))
    assert total < 7 * one / 2, (total, one)


def test_a_shard_with_no_prompt_of_its_own_runs_none():
    spec = {**SPEC, "input": {"prompts": ["only one"]}, "parallelism": 4}
    owner = shard_of("prompt-0", 4)
    for k, body in enumerate(_children(spec, 4)):
        child = parse_job_spec(body["spec"], name=f"big-s{k}", namespace="ns")
        assert [p.id for p in child.input.prompts] == ["prompt-0"]
        assert len(shard_prompts(child.input.prompts, child.shard)) == (1 if k == owner else 0)


def test_file_and_configmap_inputs_are_left_whole():
    for inp in ({"configMap": {"name": "in", "key": "batch.jsonl"}},
                {"file": "batch.jsonl", "pvc": {"claimName": "data"}}):
        body = child_body(namespace="ns", parent="big", uid="u", spec={**SPEC, "input": inp}, index=1, count=3)
        assert body["spec"]["input"] == inp and "promptIndex" not in body["spec"]["shard"]


def test_prompt_index_is_checked_and_kept_in_the_canonical_spec():
    base = {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["x", "y"]}}
    spec = parse_job_spec({**base, "shard": {"index": 0, "count": 3, "promptIndex": [4, 9]}}, name="j",
                          namespace="ns")
    assert [p.id for p in spec.input.prompts] == ["prompt-4", "prompt-9"]
    assert from_canonical(to_canonical(spec), name="j", namespace="ns") == spec
    for bad, why in (([4], r"one entry per"), ([4, 4], r"repeat"), ([4, -1], r"promptIndex")):
        with pytest.raises(SpecError, match=r"spec\.shard\.promptIndex.*" + why if why != r"promptIndex" else why):
            parse_job_spec({**base, "shard": {"index": 0, "count": 3, "promptIndex": bad}}, name="j",
                           namespace="ns")
    with pytest.raises(SpecError, match=r"spec\.shard\.promptIndex.*inline"):
        parse_job_spec({**base, "input": {"synthetic": {"count": 2}},
                        "shard": {"index": 0, "count": 3, "promptIndex": [1]}}, name="j", namespace="ns")


def test_a_merged_configmap_over_1_mib_is_refused_naming_the_field_and_its_size():
    from datetime import UTC, datetime

    from kubeflash_operator.shards import CONFIGMAP_LIMIT, aggregate, too_large, with_merge

    def body(n):
        return {"metadata": {"name": "res", "namespace": "ns"}, "data": {"results.jsonl": "x" * n}}

    assert too_large(body(CONFIGMAP_LIMIT - 200), count=3) is None
    why = too_large(body(CONFIGMAP_LIMIT), count=3)
    size = len(json.dumps(body(CONFIGMAP_LIMIT), separators=(",", ":")))
    assert why.startswith("spec.output.configMap") and f"ConfigMap res would be {size} bytes" in why
    assert f"{CONFIGMAP_LIMIT} bytes" in why and "3 shards" in why
    done = aggregate([{"metadata": {"name": f"j-s{k}"}, "status": {"phase": "Succeeded"}} for k in range(3)],
                     count=3, status={}, now=datetime(2026, 1, 1, tzinfo=UTC))
    held = with_merge(done, {}, "!" + why, "OutputTooLarge")
    assert (held["phase"], held["reason"], held["message"]) == ("Failed", "OutputTooLarge", why)
