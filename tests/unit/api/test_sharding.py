"""spec.parallelism and spec.shard: parsed with their bounds, refused together, an output path without a claim refused naming the
field, carried through the canonical spec to the pod; the shard function is stable (sha256, not Python's hash)
and its shards partition any set of custom_ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeflash_api import SpecError, from_canonical, parse_job_spec, to_canonical
from kubeflash_api.inferencejob import ShardSpec, check_cluster
from kubeflash_api.sharding import shard_of, shard_prompts

BASE = {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["a", "b", "c"]}}


def parse(**extra):
    return parse_job_spec({**BASE, **extra}, name="j", namespace="ns")


def test_parallelism_default_and_bounds():
    assert parse().parallelism == 1 and parse().shard is None
    assert parse(parallelism=1000).parallelism == 1000
    for bad in (0, 1001, "3"):
        with pytest.raises(SpecError, match=r"spec\.parallelism"):
            parse(parallelism=bad)


def test_shard_parsed_and_checked():
    assert parse(shard={"index": 1, "count": 3}).shard == ShardSpec(1, 3)
    with pytest.raises(SpecError, match=r"spec\.shard\.index.*less than"):
        parse(shard={"index": 3, "count": 3})
    with pytest.raises(SpecError, match=r"spec\.shard\.count"):
        parse(shard={"index": 0})
    with pytest.raises(SpecError, match=r"spec\.shard.*parallelism"):
        parse(shard={"index": 0, "count": 2}, parallelism=2)


def test_canonical_round_trip_keeps_parallelism_and_shard():
    for spec in (parse(parallelism=4), parse(shard={"index": 2, "count": 4})):
        assert from_canonical(to_canonical(spec), name="j", namespace="ns") == spec
    assert "parallelism" not in to_canonical(parse()) and "shard" not in to_canonical(parse())


def test_cluster_refuses_an_output_path_without_a_claim_and_too_long_names():
    with pytest.raises(SpecError, match=r"spec\.output\.path.*spec\.output\.pvc"):
        check_cluster(parse(parallelism=2, output={"path": "r.jsonl"}))
    check_cluster(parse(parallelism=2, output={"pvc": {"claimName": "c"}}))  # part files, merged by a merge pod
    check_cluster(parse(parallelism=2, output={"configMap": {"name": "c"}}))
    long = parse_job_spec({**BASE, "parallelism": 100}, name="x" * 60, namespace="ns")
    with pytest.raises(SpecError, match=r"metadata\.name.*-s99"):
        check_cluster(long)


def test_shard_of_is_stable():
    # fixed values: any change of the function moves prompts between the shards of running jobs
    assert [shard_of(f"prompt-{i}", 3) for i in range(8)] == [1, 2, 1, 2, 2, 2, 1, 0]
    assert (shard_of("prompt-0", 1), shard_of("prompt-0", 1000), shard_of("synthetic-7", 7)) == (0, 776, 1)


@settings(max_examples=200, deadline=None)
@given(ids=st.sets(st.text(min_size=1, max_size=40), max_size=60), count=st.integers(1, 50))
def test_shards_partition_any_id_set(ids, count):
    spec = parse_job_spec({**BASE, "input": {"prompts": ["x"]}}, name="j", namespace="ns")
    prompts = tuple(type(spec.input.prompts[0])(id=i, text="t") for i in sorted(ids))
    shards = [shard_prompts(prompts, ShardSpec(k, count)) for k in range(count)]
    seen = [p.id for s in shards for p in s]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))  # every id once, in exactly one shard
    for s in shards:  # each shard keeps input order
        assert [p.id for p in s] == [p.id for p in prompts if p in s]
