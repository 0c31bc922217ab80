"""spec.offload.expertCache, and routing counts where the model directory is read-only.

The job spec sizes the MoE hot-expert cache (a quantity, or auto); bad values are refused naming the field. A job
run with the field set reads fewer expert bytes than the same job without it and gives the same tokens; `kubeflash
plan` prices the job's cache (its hit rate is no longer 0). Where the model directory cannot be written (a pod's
read-only model volume; here a read-only bind mount, or chmod when not root), the routing counts land in the job
directory, the report says so, and a later job seeded from that file starts warm.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from readonly_mount import read_only
from tiny_jobs import job_doc, plan_cli, run_tiny_job, tiny_job
from tiny_moe import VOCAB, qwen3_moe_store

from kubeflash_api import SpecError, from_canonical, parse_job, to_canonical
from kubeflash_node.engine.experts import JOB_ROUTING_FILE, ROUTING_FILE

BUDGET = 6 * 3 * 16 * 32 * 4  # room for 6 of the 2 x 16 float32 experts of the tiny model
JOB = dict(name="moe", count=2, prompt_length=6, new=10)  # two prompts, one at a time


def _doc(offload: dict) -> dict:
    return job_doc(offload, **JOB)


@pytest.mark.parametrize("value, want", [("2Gi", 2 << 30), (1000, 1000), ("auto", "auto"), (0, 0)])
def test_expert_cache_parses_and_round_trips(value, want):
    spec = parse_job(_doc({"expertCache": value}))
    assert spec.offload.expert_cache == want
    again = from_canonical(to_canonical(spec), name=spec.name, namespace=spec.namespace)
    assert again.offload.expert_cache == want
    assert parse_job(_doc({})).offload.expert_cache == 0  # absent: no cache


@pytest.mark.parametrize("value", ["lots", "-1Gi", True, 1.5, {"gpu": "1Gi"}, -3, "Auto"])
def test_bad_expert_cache_is_refused_naming_the_field(value):
    with pytest.raises(SpecError) as e:
        parse_job(_doc({"expertCache": value}))
    assert "spec.offload.expertCache" in str(e.value)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return qwen3_moe_store(tmp_path_factory.mktemp("moe"))[1]


def _run(store: Path, tmp: Path, name: str, offload: dict, **kw):
    """(report, the engine after close, tokens) of one job through run_job (the pod's and `kubeflash run`'s path)."""
    return run_tiny_job(tiny_job(offload, vocab=VOCAB, **JOB), store, tmp / name, **kw)


def _clear_routing(store: Path) -> None:
    (store / ROUTING_FILE).unlink(missing_ok=True)


def test_spec_expert_cache_reads_fewer_expert_bytes_same_tokens(store, tmp_path):
    """The same job without and with spec.offload.expertCache (each from no saved counts): the cached run reads
    fewer expert bytes (counted after the engine closed), hits its cache, and writes the same tokens."""
    _clear_routing(store)
    rep0, e0, rows0 = _run(store, tmp_path, "none", {})
    _clear_routing(store)
    rep1, e1, rows1 = _run(store, tmp_path, "cached", {"expertCache": BUDGET})
    _clear_routing(store)
    assert e0.policy.expert_cache_bytes == 0 and e1.policy.expert_cache_bytes == BUDGET
    b0, b1 = e0.timings.bytes["load_expert"], e1.timings.bytes["load_expert"]
    print(f"\nexpert bytes read: no cache {b0}, expertCache {BUDGET} B: {b1}; hits {rep1['expert_cache_hits']}")
    assert b1 < b0 and rep1["expert_cache_hits"] > 0 and rep0["expert_cache_hits"] == 0
    assert rows1 == rows0 and all(len(r) == 10 for r in rows0)


def test_run_flag_overrides_the_spec(store, tmp_path):
    """run_job's expert_cache (`kubeflash run --expert-cache`) wins over spec.offload.expertCache."""
    _clear_routing(store)
    _, e, _ = _run(store, tmp_path, "flag", {"expertCache": "1Gi"}, expert_cache=BUDGET)
    _clear_routing(store)
    assert e.policy.expert_cache_bytes == BUDGET


def test_read_only_model_dir_counts_land_in_job_dir_and_seed_a_warm_run(store, tmp_path):
    """Model dir read-only: the counts go to <job dir>/routing.json (the report says so) and not to the store; a
    later job seeded from that file (explicitly) reads its hot experts first and reads fewer expert bytes than the
    cold job, with the same tokens."""
    _clear_routing(store)
    with read_only(store):
        with pytest.raises(OSError):
            (store / "probe").write_text("x")
        cold, ec, rows_cold = _run(store, tmp_path, "cold", {"expertCache": BUDGET})
        saved = tmp_path / "cold" / JOB_ROUTING_FILE
        assert cold["routing"] == {"seeded_from": None, "saved_to": str(saved)}
        assert not (store / ROUTING_FILE).exists()
        data = json.loads(saved.read_text())
        assert data["format"] == "kubeflash-routing/1" and sum(sum(v.values()) for v in data["layers"].values()) > 0
        assert not list((tmp_path / "cold").glob("*.tmp*"))  # nothing half-written beside it
        warm, ew, rows_warm = _run(store, tmp_path, "warm", {"expertCache": BUDGET}, routing_seed=saved)
        assert warm["routing"]["seeded_from"] == str(saved)
        assert warm["routing"]["saved_to"] == str(tmp_path / "warm" / JOB_ROUTING_FILE)
    bc, bw = ec.timings.bytes["load_expert"], ew.timings.bytes["load_expert"]
    print(f"\nread-only model dir: expert bytes cold {bc}, seeded {bw}; hits cold {cold['expert_cache_hits']}, "
          f"seeded {warm['expert_cache_hits']}")
    assert bw < bc and warm["expert_cache_hits"] > cold["expert_cache_hits"]
    assert rows_warm == rows_cold


def _plan(tmp_path: Path, offload: str) -> tuple[str, dict]:
    proc, plan = plan_cli(tmp_path, "dummy:qwen3-30b-a3b", offload=offload)
    return proc.stdout, plan


def test_plan_prices_the_jobs_expert_cache(tmp_path):
    """A 2Gi cache of the float16 model's 54 GiB of experts (all layers): its share, 3.7%, is the hit rate the plan
    states and prices (a layer's expected read shrinks by it); auto is an eighth of gpuMemory (12Gi)."""
    out, plan = _plan(tmp_path, "{expertCache: 2Gi}")
    moe = plan["moe"]
    assert moe["expert_cache_bytes"] == 2 << 30
    m = re.search(r"hot-expert cache: 2\.00 GiB of ([0-9.]+) GiB of experts \(all layers\) -> assumed hit rate (\d+)%",
                  out)
    assert m and 53.5 < float(m[1]) < 54.5 and int(m[2]) == 4
    assert moe["assumed_hit_rate"] == pytest.approx(2 / float(m[1]), rel=1e-3)
    _, none = _plan(tmp_path, "{}")
    assert none["moe"]["assumed_hit_rate"] == 0
    assert moe["layer_read_bytes_decode"] < none["moe"]["layer_read_bytes_decode"]
    assert f"assumed hit rate {moe['assumed_hit_rate']:.0%}" in out and "hot-expert cache: 2.00 GiB" in out
    out, plan = _plan(tmp_path, "{expertCache: auto}")
    assert plan["moe"]["expert_cache_bytes"] == (12 << 30) // 8 and plan["moe"]["assumed_hit_rate"] > 0
