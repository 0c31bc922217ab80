"""Prefix KV reuse (engine/prefixcache.py over store/kvblocks.py) changes no token and saves real prefill work.

Real SmolLM2-135M weights, float32 on CPU, greedy: prompts sharing a prefix give the same tokens with no cache,
with the in-job shared-prefix tier only, with a cold node cache and with a warm one (a second engine, as a
second job on the node would be); the warm run prefills fewer tokens and reads blocks from the SSD. A corrupted
block is recomputed, never used; an unwritable cache is "not cached", never a failed job; policies the cache
does not support yet run without it and say why. Through run_job, spec.cache.prefix turns the node cache on.
"""

from __future__ import annotations

import json

import pytest

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.prefixcache import PrefixCache
from kubeflash_node.store.kvblocks import KVBlockStore

BT = 16  # small blocks, so short prompts span several
DOC = [(i * 37 + 11) % 4000 + 100 for i in range(40)]  # a shared "document": 2 full blocks + 8 tokens
PROMPTS = [DOC + [200 + i, 300 + 2 * i, 17] * (1 + i % 3) for i in range(5)] + [[900, 901, 902, 903, 904]]
POLICY = Policy(gpu_batch_size=2, num_gpu_batches=2)  # 2 blocks of 4 prompts, 2 prompts per micro-batch
NEW = 8


def _run(store_dir, cache, policy=POLICY, prompts=PROMPTS):
    engine = Engine(store_dir, policy=policy, prefix_cache=cache)
    try:
        out = [c.tokens for c in engine.generate(prompts, GenParams(max_new_tokens=NEW))]
    finally:
        if cache is not None:
            cache.close()
        engine.close()
    return out, engine


@pytest.fixture(scope="module")
def baseline(smol_store):
    return _run(smol_store, None)


def test_in_job_sharing_same_tokens_less_prefill(smol_store, baseline):
    base, e0 = baseline
    cache = PrefixCache(store=None, block_tokens=BT)
    out, e1 = _run(smol_store, cache)
    assert out == base
    r = cache.report()
    assert r["active"] and r["shared_prefixes"] == 1 and r["shared_prefill_tokens"] == 2 * BT
    # micro-batches (left padded): [43, 46] and [49, 43] tokens start their prefill at slot 32, so they skip
    # 29+32 and 32+26 tokens; [46, 5]: the DOC prompt skips 32, the unrelated one starts after slot 32 anyway
    assert r["prefill_tokens_saved"] == 29 + 32 + 32 + 26 + 32 and r["memory_blocks"] == 2
    assert e1.stats["prefill_tokens"] < e0.stats["prefill_tokens"]


def test_node_cache_cold_then_warm_same_tokens(smol_store, baseline, tmp_path):
    base, e0 = baseline
    cold = PrefixCache(store=KVBlockStore(tmp_path, budget_bytes=1 << 30), block_tokens=BT)
    out, _ = _run(smol_store, cold)
    assert out == base
    node = cold.report()["node"]
    assert node["blocks_written"] >= 2 and node["write_failures"] == 0
    assert len(list((tmp_path / "blocks").rglob("*.kvb"))) == node["blocks_written"]

    warm = PrefixCache(store=KVBlockStore(tmp_path, budget_bytes=1 << 30), block_tokens=BT)  # a second job
    out, e2 = _run(smol_store, warm)
    assert out == base
    r = warm.report()
    assert r["node"]["hits"] >= 2 and r["node"]["blocks_written"] == 0 and r["node"]["corrupt"] == 0
    assert r["shared_prefill_tokens"] == 0 and r["memory_blocks"] == 2  # the shared prefix was read from the SSD
    assert e2.stats["prefill_tokens"] < e0.stats["prefill_tokens"]
    # each run left its counters in usage/ for the node agent: the cold one missed what it wrote, the warm one hit
    usage = [json.loads(f.read_text()) for f in sorted((tmp_path / "usage").glob("*.json"), key=lambda f: f.stat().st_mtime)]
    assert len(usage) == 2
    assert usage[0]["misses"] == node["blocks_written"] and usage[0]["blocks_written"] == node["blocks_written"]
    assert usage[1]["hits"] == r["node"]["hits"] and usage[1]["misses"] == 0
    assert usage[1]["prefill_tokens_saved"] == r["prefill_tokens_saved"] > 0

    for p in (tmp_path / "blocks").rglob("*.kvb"):  # every block damaged: each is a miss, recomputed
        data = bytearray(p.read_bytes())
        data[-5] ^= 0x40
        p.write_bytes(bytes(data))
    hurt = PrefixCache(store=KVBlockStore(tmp_path, budget_bytes=1 << 30), block_tokens=BT)
    out, _ = _run(smol_store, hurt)
    assert out == base
    assert hurt.report()["node"]["corrupt"] >= 1


def test_unwritable_cache_is_not_cached(smol_store, baseline, tmp_path):
    store = KVBlockStore(tmp_path, budget_bytes=1 << 30)
    (tmp_path / "tmp").rmdir()
    (tmp_path / "tmp").write_bytes(b"")  # every block write fails (as on a full or broken SSD)
    cache = PrefixCache(store=store, block_tokens=BT)
    out, _ = _run(smol_store, cache)
    assert out == baseline[0]
    node = cache.report()["node"]
    assert node["write_failures"] >= 2 and node["blocks_written"] == 0


@pytest.mark.parametrize("policy, why", [
    (Policy(gpu_batch_size=2, num_gpu_batches=2, kv="cpu"), "'cpu' tier"),
    (Policy(gpu_batch_size=2, num_gpu_batches=2, kv_bits=8), "compressed to 8 bits"),
], ids=["kv-on-host", "kv-compressed"])
def test_unsupported_policy_runs_without_and_says_why(smol_store, tmp_path, policy, why):
    plain, _ = _run(smol_store, None, policy=policy)
    cache = PrefixCache(store=KVBlockStore(tmp_path, budget_bytes=1 << 30), block_tokens=BT)
    out, engine = _run(smol_store, cache, policy=policy)
    assert out == plain and engine.prefix is None
    r = cache.report()
    assert not r["active"] and why in r["reason"] and r["node"]["blocks_written"] == 0


def test_run_job_spec_cache_prefix(smol_store, tmp_path):
    """spec.cache.prefix: true writes the node cache and the report carries its counters; a second run of the
    same prompts (new output file) reads them back and gives the same answers."""
    from kubeflash_api import parse_job
    from kubeflash_node.engine.job import run_job
    from kubeflash_node.store.format import load_manifest

    doc = "The quick brown fox jumps over the lazy dog. " * 60  # > 256 tokens: one full default block
    prompts = [doc + f"Question {i}: what jumps?" for i in range(3)]  # chat messages: the template's prefix too
    spec = parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "pc"},
                      "spec": {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": prompts},
                               "generation": {"maxNewTokens": 4}, "cache": {"prefix": True}}})
    manifest = load_manifest(smol_store)
    reports, answers = [], []
    for run in range(2):
        out = tmp_path / f"out{run}.jsonl"
        reports.append(run_job(spec, model_dir=smol_store, manifest=manifest, output=out, job_dir=tmp_path / f"j{run}",
                               kv_cache_dir=tmp_path / "kvcache"))
        answers.append([json.loads(line)["response"]["body"]["token_ids"] for line in out.read_text().splitlines()])
    assert answers[0] == answers[1]
    first, second = (r["prefix_cache"] for r in reports)
    assert first["node"]["blocks_written"] >= 1 and first["shared_prefixes"] == 1
    assert second["node"]["hits"] >= 1 and second["node"]["blocks_written"] == 0
    assert second["prefill_tokens_saved"] >= 3 * 256
    # each run leaves the prompts' shared prefix fingerprint for the agent (placement by prefix): the 1 KiB one
    from kubeflash_api.prefixes import fingerprints, job_fingerprints

    left = [json.loads(p.read_text()).get("prefixes") for p in sorted((tmp_path / "kvcache" / "usage").iterdir())]
    shared = set.intersection(*(set(fingerprints(p)) for p in spec.input.prompts))
    assert len(left) == 2 and all(f == list(job_fingerprints(spec.input.prompts)) for f in left), left
    assert shared and shared <= set(left[0])
