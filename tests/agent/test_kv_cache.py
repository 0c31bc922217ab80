"""The node's prefix KV cache as a real agent serves it: blocks written by "pods" (KVBlockStore on the directories
the CSI driver publishes) and the counters each engine leaves show up in FlashNode status.kvCache and on
/metrics; the totals survive a SIGKILLed agent; past kvCache.budget the least recently used blocks of any
namespace go first, and the newest stay."""

from __future__ import annotations

import os

from kubeflash_node.store.kvblocks import KVBlockStore, scoped_root

from agent_harness import wait_for

MODEL = "tiny-0123456789abcdef"
BLOCK = 1 << 20


def _key(i: int) -> str:
    return f"{i:064x}"


def _cache(agent) -> dict:
    return agent.inventory()["status"].get("kvCache") or {}


def test_status_metrics_totals_and_budget(tmp_path, agents):
    disk = tmp_path / "ssd0"
    agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}], "kvCache": {"budget": "6Mi"}}).start()
    a = KVBlockStore(scoped_root(disk, "team-a", MODEL), budget_bytes=1 << 30)
    b = KVBlockStore(scoped_root(disk, "team-b", MODEL), budget_bytes=1 << 30)
    for i in range(3):
        assert a.put(_key(i), os.urandom(BLOCK), {"i": i})
    assert b.put(_key(10), os.urandom(BLOCK), {"i": 10})
    assert a.record_usage({"hits": 5, "misses": 3, "prefill_tokens_saved": 1280})
    assert b.record_usage({"hits": 1, "misses": 1, "prefill_tokens_saved": 256, "bogus": 7})

    wait_for(lambda: _cache(agent).get("blocks") == 4 and _cache(agent).get("hits") == 6, 10,
             what="kvCache in status", log=agent.log)
    st = _cache(agent)
    assert st["budgetBytes"] == 6 << 20 and st["misses"] == 4 and st["prefillTokensSaved"] == 1536
    assert st["bytes"] == a.scan_bytes() + b.scan_bytes()
    entries = {(e["namespace"], e["modelId"], e["disk"]): e["blocks"] for e in st["entries"]}
    assert entries == {("team-a", MODEL, "ssd0"): 3, ("team-b", MODEL, "ssd0"): 1}
    assert not list((a.root / "usage").iterdir())  # folded into the node's totals, then removed
    metrics = agent.get("/metrics")[1]
    assert "kubeflash_agent_kv_cache_hits_total 6.0" in metrics
    assert "kubeflash_agent_kv_cache_misses_total 4.0" in metrics
    assert "kubeflash_agent_kv_cache_blocks 4.0" in metrics

    agent.kill9()  # the totals outlive the agent
    agent.start()
    wait_for(lambda: _cache(agent).get("blocks") == 4, 10, what="kvCache after restart", log=agent.log)
    assert (_cache(agent)["hits"], _cache(agent)["misses"]) == (6, 4)

    # past the budget: team-a's oldest blocks go first, whichever namespace wrote the new ones
    for i, p in enumerate(sorted(a.blocks.rglob("*.kvb"))):
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    for i in range(20, 23):
        assert b.put(_key(i), os.urandom(BLOCK), {"i": i})
    wait_for(lambda: _cache(agent).get("blocksEvicted", 0) >= 1, 10, what="eviction", log=agent.log)
    st = _cache(agent)
    assert st["bytes"] <= 6 << 20
    assert all(b.contains(_key(i)) for i in (10, 20, 21, 22))  # the recently used blocks stay
    assert not a.contains(_key(0))
    assert "kubeflash_agent_kv_cache_evicted_blocks_total" in agent.get("/metrics")[1]


def test_prefix_fingerprints_published_newest_first_and_dropped_with_their_blocks(tmp_path, agents):
    """The fingerprints engines leave in their usage records reach status.kvCache.entries[].prefixes: newest job
    first, at most MAX_PER_ENTRY, malformed ones (a pod wrote them) dropped; they survive a SIGKILLed agent and go
    when every block of that cache is gone."""
    from kubeflash_api.prefixes import MAX_PER_ENTRY

    disk = tmp_path / "ssd0"
    agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}], "kvCache": {"budget": "64Mi"}}).start()
    a = KVBlockStore(scoped_root(disk, "team-a", MODEL), budget_bytes=1 << 30)
    assert a.put(_key(1), os.urandom(BLOCK), {"i": 1})
    old = [f"1024-{i:016x}" for i in range(MAX_PER_ENTRY)]
    assert a.record_usage({"hits": 0, "misses": 1}, prefixes=old)

    def prefixes() -> list[str] | None:
        return next((e.get("prefixes") for e in _cache(agent).get("entries", []) if e["namespace"] == "team-a"), None)

    wait_for(lambda: prefixes() == old, 10, what="prefixes in status", log=agent.log)
    new = ["4096-" + "ab" * 8, "1024-" + "0" * 16, "../../etc", 7, "1024-XYZ", "999-" + "a" * 16]
    assert a.record_usage({"hits": 1, "misses": 0}, prefixes=new)
    want = ["4096-" + "ab" * 8, "1024-" + "0" * 16] + old[1:MAX_PER_ENTRY - 1]  # old[0] moved up, the last dropped
    wait_for(lambda: prefixes() == want, 10, what="newest prefixes first", log=agent.log)

    agent.kill9()
    agent.start()
    wait_for(lambda: prefixes() == want, 10, what="prefixes after restart", log=agent.log)
    for p in a.blocks.rglob("*.kvb"):
        p.unlink()
    wait_for(lambda: not _cache(agent).get("entries"), 10, what="entry gone", log=agent.log)
    agent.kill9()
    agent.start()  # not brought back from the state file either
    assert a.put(_key(2), os.urandom(BLOCK), {"i": 2})
    wait_for(lambda: _cache(agent).get("blocks") == 1, 10, what="a new block", log=agent.log)
    assert prefixes() is None
