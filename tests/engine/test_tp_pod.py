"""`kubeflash engine` (the inference pod's entry point) with spec.offload.tensorParallel 2 starts two ranks, each
streaming its own shard from its own disk, and writes the same results as the one-process pod.

Real subprocesses on CPU: a random 2-layer Llama with GQA (4 query / 2 K/V heads) converted to a store on "ssd0"
(a tmp directory standing for pair 0's SSD), its two shards cut onto ssd0 and ssd1 as the node agent stages them
(`<disk>/shards/<id>.tp2/<k>`), the pod's environment as the operator would set it (KUBEFLASH_SHARD_DIRS, one
directory per rank; KUBEFLASH_RANK_DIRS for rank 1's files). Greedy float32 results (token ids, texts,
fingerprints) equal the one-process pod's; no shard is cut beside the store entry (the pod only reads what was
staged). With 3 ranks (one shard and one ring directory, KUBEFLASH_RING_DIRS, per disk) the SSD ring's results
equal gloo's. A missing shard or a missing KUBEFLASH_SHARD_DIRS is refused before any rank starts, naming the
rank and directory or the variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_random import save_random_model
from test_tp_run import _word_tokenizer

from kubeflash_node.store.convert import convert
from kubeflash_node.store.tpshards import shard_store


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The store on ssd0 and shard k on ssd<k>, as the agent leaves them."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("node")
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    save_random_model(cfg, root / "hf")
    _word_tokenizer(128).save_pretrained(root / "hf")  # a store needs a loadable tokenizer; prompts are token ids
    model = root / "ssd0" / "models" / "m"
    convert(str(root / "hf"), model, dtype="float32")
    shards = [root / f"ssd{k}" / "shards" / "m.tp2" / str(k) for k in range(2)]
    shard_store(model, shards)
    return model, shards


def _spec(tp: int) -> str:
    return json.dumps({"model": {"uri": "/models/tiny-llama", "dtype": "float32"},
                       "input": {"synthetic": {"count": 4, "promptLength": 7}}, "generation": {"maxNewTokens": 6},
                       "offload": {"policy": "explicit", "gpuBatchSize": 2, "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                                   "kv": {"gpu": 100, "cpu": 0, "disk": 0}, "tensorParallel": tp}})


def _engine(model: Path, job: Path, tp: int, **env):
    full = {**os.environ, "KUBEFLASH_DEVICE": "cpu", "KUBEFLASH_JOB_SPEC": _spec(tp), "KUBEFLASH_JOB_NAME": "j",
            "KUBEFLASH_MODEL_DIR": str(model), "KUBEFLASH_JOB_DIR": str(job), **env}
    return subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "engine"], env=full, cwd=job.parent,
                          capture_output=True, text=True, timeout=600)


def _results(job: Path) -> list[dict]:
    out = []
    for line in (job / "results.jsonl").read_text().splitlines():
        body = json.loads(line)["response"]["body"]
        out.append((json.loads(line)["custom_id"], body["system_fingerprint"], body["token_ids"], body["choices"]))
    return sorted(out)


def test_pod_runs_two_ranks_on_their_own_shards(staged, tmp_path):
    model, shards = staged
    one = _engine(model, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr
    base = _results(tmp_path / "one")
    assert len(base) == 4 and all(len(r[2]) == 6 for r in base)

    sep = os.pathsep
    rank1 = tmp_path / "pair1-kv"
    rank1.mkdir()
    gloo = _engine(model, tmp_path / "gloo", 2, KUBEFLASH_SHARD_DIRS=sep.join(map(str, shards)),
                   KUBEFLASH_RANK_DIRS=sep.join([str(tmp_path / "gloo"), str(rank1)]))
    assert gloo.returncode == 0, gloo.stderr
    assert _results(tmp_path / "gloo") == base
    report = json.loads((tmp_path / "gloo" / "report.json").read_text())
    assert report["tensor_parallel"]["shards"] == [str(s) for s in shards]
    assert report["tensor_parallel"]["reduce"] == "gloo"
    assert json.loads((rank1 / "progress.json").read_text())["phase"] == "done"  # rank 1 ran, on its own dir
    assert not (model.parent / "m.tp2").exists()  # nothing cut beside the store: the staged shards were read


def test_three_ranks_ring_matches_gloo(tmp_path):
    """3 ranks (6 query / 3 K/V heads, one K/V head each), each shard on its own disk: the SSD ring's results equal
    gloo's token for token (float32 sums may differ in the last bits: the addition order differs with 3 addends)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256)
    save_random_model(cfg, tmp_path / "hf")
    _word_tokenizer(128).save_pretrained(tmp_path / "hf")
    model = tmp_path / "ssd0" / "models" / "m"
    convert(str(tmp_path / "hf"), model, dtype="float32")
    shards = [tmp_path / f"ssd{k}" / "shards" / "m.tp3" / str(k) for k in range(3)]
    shard_store(model, shards)
    rings = [tmp_path / f"ssd{k}" / "ring" for k in range(3)]
    for d in rings:
        d.mkdir()
    env = {"KUBEFLASH_SHARD_DIRS": os.pathsep.join(map(str, shards))}
    gloo = _engine(model, tmp_path / "gloo", 3, **env)
    assert gloo.returncode == 0, gloo.stderr
    ring = _engine(model, tmp_path / "ring", 3, KUBEFLASH_RING_DIRS=os.pathsep.join(map(str, rings)), **env)
    assert ring.returncode == 0, ring.stderr
    base = _results(tmp_path / "gloo")
    assert len(base) == 4 and all(len(r[2]) == 6 for r in base)
    assert _results(tmp_path / "ring") == base
    assert json.loads((tmp_path / "ring" / "report.json").read_text())["tensor_parallel"]["reduce"] == "ring"
    assert not any(list(d.iterdir()) for d in rings)  # the ring's messages and heartbeats removed


def test_pod_refuses_missing_shards(staged, tmp_path):
    model, shards = staged
    r = _engine(model, tmp_path / "a", 2)
    assert r.returncode == 1 and "KUBEFLASH_SHARD_DIRS is required with spec.offload.tensorParallel 2" in r.stderr
    gone = tmp_path / "ssd1-empty" / "1"
    r = _engine(model, tmp_path / "b", 2, KUBEFLASH_SHARD_DIRS=os.pathsep.join([str(shards[0]), str(gone)]))
    assert r.returncode == 1 and f"rank 1: shard {gone} is missing" in r.stderr, r.stderr
    assert not (tmp_path / "b" / "tp").exists()  # refused before any rank started
    r = _engine(model, tmp_path / "c", 2, KUBEFLASH_SHARD_DIRS=os.pathsep.join([str(shards[1]), str(shards[0])]))
    assert r.returncode == 1 and "rank 0:" in r.stderr and "expected the shard of rank 0 of 2" in r.stderr, r.stderr
