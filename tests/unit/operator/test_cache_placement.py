"""Cache-aware placement: among pairs that fit, a job with spec.cache.prefix goes where the node's prefix KV cache
already holds blocks of its model for its namespace (FlashNode status.kvCache), after "model Ready there" and
before SSD bandwidth; other namespaces' blocks, other models' blocks, a node without a cache and a job without
spec.cache.prefix change nothing. The FlashNode's kvCache summary parses into the NodeView."""

from __future__ import annotations

import pytest

from kubeflash_operator.scheduler import Request, node_view, place

from operator_factories import NOW, GiB, flashnode

MODEL = "smollm2-135m-0000"


def with_cache(body: dict, *entries: tuple[str, str, str, int], budget: int = 20 * GiB) -> dict:
    body["status"]["kvCache"] = {"budgetBytes": budget, "bytes": 0, "blocks": sum(e[3] for e in entries),
                                 "entries": [{"disk": d, "namespace": ns, "modelId": m, "blocks": n, "bytes": n << 20}
                                             for d, ns, m, n in entries]}
    return body


def ready(disk="nvme0"):
    return {"id": MODEL, "disk": disk, "state": "Ready", "bytes": 5 * GiB}


def place_on(*bodies, prefix=True, job="team-a/j"):
    found = place(Request(job=job, model_id=MODEL, kv_bytes=GiB, prefix_cache=prefix),
                  [node_view(b) for b in bodies], [], now=NOW)
    return found.node, found.disk


CASES = [
    # (cache entries of node "warm", its budget, the job's namespace, spec.cache.prefix, expected winner)
    ("blocks-win-over-bandwidth", [("nvme0", "team-a", MODEL, 12)], 20 * GiB, "team-a", True, "warm"),
    ("more-blocks-win", [("nvme0", "team-a", MODEL, 2)], 20 * GiB, "team-a", True, "fast"),  # fast holds 5
    ("other-namespace-ignored", [("nvme0", "team-b", MODEL, 12)], 20 * GiB, "team-a", True, "fast"),
    ("other-model-ignored", [("nvme0", "team-a", "other-0000", 12)], 20 * GiB, "team-a", True, "fast"),
    ("no-cache-on-node", [("nvme0", "team-a", MODEL, 12)], 0, "team-a", True, "fast"),
    ("job-without-prefix-cache", [("nvme0", "team-a", MODEL, 12)], 20 * GiB, "team-a", False, "fast"),
]


@pytest.mark.parametrize("entries,budget,ns,prefix,winner", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cached_blocks_of_the_jobs_model_and_namespace_beat_bandwidth(entries, budget, ns, prefix, winner):
    warm = with_cache(flashnode("warm", read=(3.0,), models=[ready()]), *entries, budget=budget)
    fast = flashnode("fast", read=(14.0,), models=[ready()])
    if winner == "fast" and entries[0][3] == 2:
        fast = with_cache(fast, ("nvme0", "team-a", MODEL, 5))
    assert place_on(warm, fast, prefix=prefix, job=f"{ns}/j")[0] == winner


def test_model_ready_still_beats_cached_blocks():
    """Staging a model costs minutes; a prefix is at most one prefill: the node holding the model wins."""
    warm = with_cache(flashnode("warm"), ("nvme0", "team-a", MODEL, 50))
    holder = flashnode("holder", models=[ready()])
    assert place_on(warm, holder)[0] == "holder"


def test_the_pairs_own_disk_counts():
    """Blocks on nvme1 make the GPU paired with nvme1 win on a node with two pairs."""
    body = with_cache(flashnode("n", pairs=((0, "nvme0"), (1, "nvme1")), read=(9.0, 3.0),
                                models=[ready("nvme0"), ready("nvme1")]), ("nvme1", "team-a", MODEL, 4))
    assert place_on(body) == ("n", "nvme1")
    assert place_on(body, prefix=False) == ("n", "nvme0")


def test_node_view_reads_the_kv_cache_summary():
    view = node_view(with_cache(flashnode("n"), ("nvme0", "team-a", MODEL, 7), budget=8 * GiB))
    assert view.kv_cache_budget == 8 * GiB and view.kv_cached == {("nvme0", "team-a", MODEL): 7}
    assert view.cached_blocks("nvme0", "team-a/j", MODEL) == 7 and view.cached_blocks("nvme0", "x/j", MODEL) == 0
    bare = node_view(flashnode("m"))
    assert bare.kv_cache_budget == 0 and bare.kv_cached == {}


def _prefixed(body: dict, prefixes: list[str], blocks: int = 3, ns: str = "team-a") -> dict:
    body = with_cache(body, ("nvme0", ns, MODEL, blocks))
    body["status"]["kvCache"]["entries"][0]["prefixes"] = prefixes
    return body


def test_the_node_holding_the_jobs_own_prefix_wins_over_more_blocks_and_bandwidth():
    """Two nodes cache blocks of the model for the namespace; the one whose cache holds this job's document (its
    fingerprints, kubeflash_api.prefixes) wins over one with more blocks of other documents and faster SSDs; the
    longer shared prefix wins between two that hold part of it; without spec.cache.prefix nothing changes."""
    from kubeflash_api.inferencejob import Prompt
    from kubeflash_api.prefixes import fingerprints, job_fingerprints

    doc = "A long shared document. " * 800  # 19,200 bytes: the 1, 4 and 16 KiB levels
    prompts = [Prompt(id=str(i), text=doc + f"Q{i}?") for i in range(4)]
    mine = job_fingerprints(prompts)
    other = fingerprints(Prompt(id="x", text="Another document entirely. " * 800))
    holder = _prefixed(flashnode("holder", read=(3.0,), models=[ready()]), list(mine[:2]), blocks=2)
    busy = _prefixed(flashnode("busy", read=(14.0,), models=[ready()]), list(other), blocks=40)

    def winner(*bodies, prefix=True, job="team-a/j", request=mine):
        found = place(Request(job=job, model_id=MODEL, kv_bytes=GiB, prefix_cache=prefix, prefixes=request),
                      [node_view(b) for b in bodies], [], now=NOW)
        return found.node

    assert winner(holder, busy) == "holder"
    assert winner(holder, busy, prefix=False) == "busy"  # bandwidth, as before
    assert winner(holder, busy, job="team-b/j") == "busy"  # another namespace's cache is not this job's
    assert winner(holder, busy, request=()) == "busy"  # no fingerprints (e.g. prompts read from a file): blocks
    short = [f for f in mine if f.startswith("1024-")]
    longer = _prefixed(flashnode("longer", read=(1.0,), models=[ready()]), [f for f in mine if f.startswith("16384-")])
    assert winner(_prefixed(flashnode("aaa", read=(14.0,), models=[ready()]), short), longer) == "longer"
    view = node_view(holder)
    assert view.kv_prefixes == {("nvme0", "team-a", MODEL): frozenset(mine[:2])}
    assert view.cached_prefix("nvme0", "team-a/j", MODEL, mine) == max(int(f.split("-")[0]) for f in mine[:2])
