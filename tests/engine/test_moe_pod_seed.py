"""A MoE pod starts its hot-expert cache from the routing counts an earlier job left on the node.

The cluster path of `kubeflash run --routing-from`: a pod's model volume is read-only, so its engine writes the routing
counts to `<job dir>/routing.json`; the node agent (one pass) folds them into the model's `.routing.json` in the store
(store/routing.py), and the next pod of that model, reading its read-only model volume, seeds its cache from that file.
Here a real `kubeflash agent --once` stages a tiny Qwen3-MoE and makes both jobs' directories, and two real
`kubeflash engine` processes run with the env the operator's pod gets (model dir read-only while they run): the second
reads fewer expert bytes, hits its cache more, says where it was seeded from, and writes the same tokens. A job's
routing file that is not valid for the model is refused naming the entry, and nothing is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))

from readonly_mount import read_only  # noqa: E402

from kubeflash_node.store.routing import JOB_ROUTING_FILE, ROUTING_FILE, publish_routing  # noqa: E402
from kubeflash_node.store.routingprofile import JOB_PROFILE_FILE, PROFILE_FILE  # noqa: E402
from kubeflash_node.store.routingprofile import load as load_profile  # noqa: E402

from agent_harness import AgentProc, model_id  # noqa: E402

VOCAB = 1024  # synthetic prompts use token ids below 1003
BUDGET = 6 * 3 * 16 * 32 * 4  # room for 6 of the 2 x 16 float32 experts


def _qwen3_moe(out: Path) -> Path:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=2,
                         moe_intermediate_size=16, norm_topk_prob=True)
    Qwen3MoeForCausalLM(cfg).eval().save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink()  # tokenizer-free: the jobs' prompts are synthetic token ids
    return out


def _pod(model_dir: Path, job_dir: Path, name: str, cwd: Path) -> tuple[dict, list]:
    """`kubeflash engine` with the operator's env (builder._env): the job's canonical spec, its name, the model and
    job directories. Returns (report.json, the result rows' token ids)."""
    spec = {"model": {"uri": "dummy:qwen3-30b-a3b", "dtype": "float32"},
            "input": {"synthetic": {"count": 2, "promptLength": 6}}, "generation": {"maxNewTokens": 10},
            "offload": {"policy": "explicit", "gpuBatchSize": 1, "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                        "kv": {"gpu": 100, "cpu": 0, "disk": 0}, "expertCache": BUDGET}}
    env = {**os.environ, "KUBEFLASH_JOB_SPEC": json.dumps(spec), "KUBEFLASH_JOB_NAME": name,
           "KUBEFLASH_JOB_NAMESPACE": "team", "KUBEFLASH_MODEL_DIR": str(model_dir), "KUBEFLASH_JOB_DIR": str(job_dir),
           "KUBEFLASH_DEVICE": "cpu"}
    with read_only(model_dir):
        r = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "engine"], env=env, cwd=cwd,
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x)["response"]["body"]["token_ids"] for x in (job_dir / "results.jsonl").read_text().splitlines()]
    return json.loads((job_dir / "report.json").read_text()), rows


@pytest.mark.skipif(sys.platform != "linux", reason="a real agent and bind mounts")
def test_second_pod_of_a_moe_model_starts_from_the_first_jobs_routing_counts(tmp_path):
    src = _qwen3_moe(tmp_path / "src" / "tiny-moe")
    disk = tmp_path / "ssd0"
    disk.mkdir()
    uri = str(src)
    jobs = [{"namespace": "team", "name": n, "model": uri, "dtype": "float32", "quota": "64Mi"} for n in ("moe-1", "moe-2")]
    agent = AgentProc(tmp_path, {"disks": [{"name": "ssd0", "path": str(disk)}], "allowedSourceRoots": [str(src.parent)],
                                 "models": [{"uri": uri, "dtype": "float32"}], "jobs": jobs})
    assert agent.run_once() == 0, agent.log()  # stages the model, makes both job directories
    model_dir = disk / "models" / model_id(uri, "float32")
    job1, job2 = disk / "jobs" / "team" / "moe-1", disk / "jobs" / "team" / "moe-2"
    assert (model_dir / "manifest.json").is_file() and job1.is_dir() and job2.is_dir(), agent.log()

    cold, rows1 = _pod(model_dir, job1, "moe-1", tmp_path)
    assert cold["routing"] == {"seeded_from": None, "saved_to": str(job1 / JOB_ROUTING_FILE)}
    assert not (model_dir / ROUTING_FILE).exists()
    # the routed run's routing profile (store/routingprofile.py) goes the same way: the job dir, then the model's
    assert cold["routing_profile_saved_to"] == str(job1 / JOB_PROFILE_FILE)
    assert not (model_dir / PROFILE_FILE).exists()

    assert agent.run_once() == 0, agent.log()  # publishes moe-1's counts next to the model
    published = json.loads((model_dir / ROUTING_FILE).read_text())
    assert published == json.loads((job1 / JOB_ROUTING_FILE).read_text())
    assert (model_dir / ROUTING_FILE).stat().st_mode & 0o044 == 0o044  # the pod's user can read it
    assert "routing counts published" in agent.log()
    assert "routing profile published" in agent.log()
    assert (model_dir / PROFILE_FILE).read_bytes() == (job1 / JOB_PROFILE_FILE).read_bytes()
    assert load_profile(model_dir)[0].runs == 1

    warm, rows2 = _pod(model_dir, job2, "moe-2", tmp_path)
    assert warm["routing"] == {"seeded_from": str(model_dir / ROUTING_FILE), "saved_to": str(job2 / JOB_ROUTING_FILE)}
    assert rows2 == rows1
    assert warm["weight_bytes_read"] < cold["weight_bytes_read"]
    assert warm["expert_cache_hits"] > cold["expert_cache_hits"]
    print(f"\npod seeded from the node's routing counts: weight bytes cold {cold['weight_bytes_read']}, seeded "
          f"{warm['weight_bytes_read']}; cache hits cold {cold['expert_cache_hits']}, seeded {warm['expert_cache_hits']}")

    assert agent.run_once() == 0, agent.log()  # moe-2's counts include moe-1's: per expert the larger count
    again = json.loads((model_dir / ROUTING_FILE).read_text())
    mine = json.loads((job2 / JOB_ROUTING_FILE).read_text())
    assert again == mine and all(again["layers"][k][j] >= n for k, v in published["layers"].items()
                                 for j, n in v.items())
    assert not publish_routing(model_dir, (job2 / JOB_ROUTING_FILE).read_bytes(), where="again")  # idempotent
    assert load_profile(model_dir)[0].runs == 2  # moe-2's profile: the model's (moe-1's run) plus its own


def test_bad_routing_file_is_refused_naming_the_entry(tmp_path):
    """Counts for a layer the model does not have, an expert id out of range, a count that is not a positive integer
    or a foreign format: refused naming where, and the model's file is left as it was."""
    from kubeflash_node.store.convert import convert

    src = _qwen3_moe(tmp_path / "hf")
    store = tmp_path / "store"
    convert(str(src), store, dtype="float32")
    good = {"format": "kubeflash-routing/1", "layers": {"layer_000.bin": {"3": 5}}}
    assert publish_routing(store, json.dumps(good).encode(), where="team/a/routing.json")
    before = (store / ROUTING_FILE).read_bytes()
    for layers, msg in [({"embed.bin": {"0": 1}}, "layers.embed.bin: not a MoE layer"),
                        ({"layer_000.bin": {"16": 1}}, "layers.layer_000.bin.16: expected an expert id below 16"),
                        ({"layer_001.bin": {"2": -1}}, "layers.layer_001.bin.2: expected a count"),
                        ({"layer_001.bin": {"2": 1.5}}, "layers.layer_001.bin.2: expected a count")]:
        with pytest.raises(ValueError, match=f"team/b/routing.json: {msg}"):
            publish_routing(store, json.dumps({"format": "kubeflash-routing/1", "layers": layers}).encode(),
                            where="team/b/routing.json")
    with pytest.raises(ValueError, match="expected a JSON object with format 'kubeflash-routing/1'"):
        publish_routing(store, b'{"layers": {}}', where="team/b/routing.json")
    assert (store / ROUTING_FILE).read_bytes() == before
    assert not [p for p in store.iterdir() if p.name.endswith(".tmp")]
