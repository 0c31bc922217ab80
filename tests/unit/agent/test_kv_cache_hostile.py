"""The agent's pass over the prefix KV cache treats what pods wrote as hostile: links planted at any level are
never followed (blocks outside are neither counted nor evicted), oversized or linked usage files are refused,
junk names are ignored, and a malformed counter adds nothing. Real files, no agent process."""

from __future__ import annotations

import json
import os

from kubeflash_node.agent.devices import Disk
from kubeflash_node.agent.kvcache import NodeKVCache
from kubeflash_node.store.kvblocks import KVBlockStore, scoped_root

MODEL = "tiny-0123456789abcdef"


def _outside(tmp_path):
    """A directory outside the store with block-like files (what a link would lead the agent to)."""
    out = tmp_path / "victim"
    (out / "ab").mkdir(parents=True)
    for i in range(3):
        (out / "ab" / f"{i:064x}.kvb").write_bytes(b"x" * 4096)
    return out


def test_links_are_never_followed_nor_evicted_through(tmp_path):
    disk, victim = tmp_path / "ssd0", _outside(tmp_path)
    store = KVBlockStore(scoped_root(disk, "team-a", MODEL), budget_bytes=1 << 30)
    assert store.put("cd" * 32, b"y" * 4096, {})
    ns = disk / "kvcache" / "ns"
    (ns / "team-b").symlink_to(victim)  # a namespace that is a link
    (ns / "team-a" / "other-0123456789abcdef").symlink_to(victim)  # a model that is a link
    (store.blocks / "ab").symlink_to(victim / "ab")  # a key directory that is a link
    cache = NodeKVCache([Disk("ssd0", disk)], budget=1, state_dir=tmp_path)  # everything is over budget
    cache.refresh()
    assert len(list((victim / "ab").iterdir())) == 3
    assert cache.status()["blocks"] == 0 and not store.contains("cd" * 32)  # only the real block was evicted


def test_usage_files_are_capped_and_checked(tmp_path):
    disk = tmp_path / "ssd0"
    store = KVBlockStore(scoped_root(disk, "team-a", MODEL), budget_bytes=1 << 30)
    usage = store.root / "usage"
    usage.mkdir()
    (usage / f"1-{'a' * 12}.json").write_text(json.dumps({"hits": 2, "misses": "9", "prefill_tokens_saved": -5}))
    (usage / f"2-{'b' * 12}.json").write_bytes(b"{" + b" " * 10_000 + b"}")  # oversized
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"hits": 1000}))
    os.symlink(secret, usage / f"3-{'c' * 12}.json")  # a link to a file elsewhere
    (usage / "notes.txt").write_text("junk")
    cache = NodeKVCache([Disk("ssd0", disk)], budget=1 << 30, state_dir=tmp_path / "state")
    (tmp_path / "state").mkdir()
    cache.refresh()
    st = cache.status()
    assert (st["hits"], st["misses"], st["prefillTokensSaved"]) == (2, 0, 0)
    assert len(cache.problems) == 2 and secret.exists()
    assert sorted(p.name for p in usage.iterdir()) == ["notes.txt"]
    assert json.loads((tmp_path / "state" / "kvcache.json").read_text())["hits"] == 2
