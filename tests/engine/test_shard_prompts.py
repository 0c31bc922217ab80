"""A shard job (spec.shard, set by the operator on a spec.parallelism job's children) runs exactly its share of
the prompts: two shards' results together are the unsharded run's results, prompt for prompt and token for token,
and neither shard runs a prompt of the other."""

from __future__ import annotations

import json

from kubeflash_api import parse_job
from kubeflash_api.sharding import shard_of
from kubeflash_node.engine.job import run_job
from kubeflash_node.store.format import load_manifest


def _spec(shard: dict | None):
    spec = {"model": {"uri": "dummy:opt-125m"}, "input": {"synthetic": {"count": 8, "promptLength": 6}},
            "generation": {"maxNewTokens": 3}}
    if shard is not None:
        spec["shard"] = shard
    return parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "sh"},
                      "spec": spec})


def _results(path) -> dict[str, list[int]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["custom_id"]: r["response"]["body"]["token_ids"] for r in lines}


def test_two_shards_together_are_the_unsharded_run(opt_store, tmp_path):
    manifest = load_manifest(opt_store)
    run_job(_spec(None), model_dir=opt_store, manifest=manifest, output=tmp_path / "all.jsonl", job_dir=tmp_path / "a")
    whole = _results(tmp_path / "all.jsonl")
    parts = []
    for k in range(2):
        out = tmp_path / f"s{k}.jsonl"
        run_job(_spec({"index": k, "count": 2}), model_dir=opt_store, manifest=manifest, output=out,
                job_dir=tmp_path / f"s{k}")
        parts.append(_results(out))
        assert all(shard_of(cid, 2) == k for cid in parts[-1])
    assert parts[0] and parts[1]  # 8 ids: both shards get some (a fixed, stable split)
    assert not set(parts[0]) & set(parts[1])
    assert {**parts[0], **parts[1]} == whole and len(whole) == 8
