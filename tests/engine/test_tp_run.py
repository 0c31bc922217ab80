"""`kubeflash run` with tensor parallelism, in real processes on CPU: the same results.jsonl as one process.

A tiny random Llama with GQA (4 query / 2 K/V heads) run with spec.offload.tensorParallel 2 (gloo, and the SSD
ring with ring directories given on the command line) and SmolLM2-135M's real weights with --tensor-parallel 3
write token-identical results (greedy, float32) to the single-process run; the shards are cut once beside the
store entry, reused, and refused when stale. Splits that do not divide the model, unsupported options and NCCL
without GPUs are refused in one line before any rank starts; kill -9 of one rank mid-run fails the run naming that
rank, without a hang, and leaves results.jsonl with whole lines only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hf_random import save_random_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama with GQA (4 query heads over 2 K/V heads), saved as safetensors. Its vocabulary holds
    the synthetic prompts' token ids (3 to 1002: a job with ids past vocab_size is refused)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    save_random_model(cfg, out)
    _word_tokenizer(128).save_pretrained(out)  # a store needs a loadable tokenizer; prompts here are token ids
    return out


def _word_tokenizer(n: int):
    """A word-level tokenizer of n tokens (t0 .. t{n-1})."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kfhome")


def _job(path: Path, uri: str, *, name: str = "tp", tp: int | None = None, synthetic: dict | None = None,
         prompts: list[str] | None = None, max_new: int = 8, **offload) -> Path:
    spec = {"model": {"uri": uri},
            "input": {"synthetic": synthetic} if synthetic else {"prompts": prompts},
            "generation": {"maxNewTokens": max_new},
            "offload": {"policy": "explicit", "gpuBatchSize": 2, "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                        "kv": {"gpu": 100, "cpu": 0, "disk": 0}, **offload}}
    if tp is not None:
        spec["offload"]["tensorParallel"] = tp
    path.write_text(yaml.safe_dump({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob",
                                    "metadata": {"name": name}, "spec": spec}))
    return path


def _run(args, cwd: Path, store_root: Path, **kw):
    return subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "run", *args, "--device", "cpu", "--quiet",
                           "--store", str(store_root)], cwd=cwd, capture_output=True, text=True, timeout=600, **kw)


def _lines(path: Path) -> list[dict]:
    """Each result's id, token ids, text and fingerprint (everything but the per-run ids and times)."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        body = rec["response"]["body"]
        assert body["token_ids"], rec
        out.append({"id": rec["custom_id"], "fingerprint": body["system_fingerprint"], "tokens": body["token_ids"],
                    "choices": body["choices"], "usage": body["usage"]})
    return sorted(out, key=lambda r: r["id"])


def test_tiny_llama_gqa_tp2_matches_one_process(tmp_path, tiny_llama, store_root):
    """tensorParallel 2 over gloo, then the ring (own ring dirs), give one process's results.jsonl, token for token;
    the second run reuses the shards; shards cut from another version of the store are refused."""
    syn = {"count": 5, "promptLength": 7}
    one = _run([str(_job(tmp_path / "one.yaml", str(tiny_llama), synthetic=syn)), "--job-dir", str(tmp_path / "j1")],
               tmp_path, store_root)
    assert one.returncode == 0, one.stderr
    base = _lines(tmp_path / "j1" / "results.jsonl")
    assert len(base) == 5 and all(r["usage"]["completion_tokens"] == 8 for r in base)

    gloo = _run([str(_job(tmp_path / "tp.yaml", str(tiny_llama), synthetic=syn, tp=2)),
                 "--job-dir", str(tmp_path / "j2")], tmp_path, store_root)
    assert gloo.returncode == 0, gloo.stderr
    assert "tensor parallel: 2 ranks, reduce gloo" in gloo.stdout
    assert _lines(tmp_path / "j2" / "results.jsonl") == base
    report = json.loads((tmp_path / "j2" / "report.json").read_text())
    shards = [Path(s) for s in report["tensor_parallel"]["shards"]]
    assert [s.name for s in shards] == ["0", "1"] and shards[0].parent.parent == store_root / "models"
    mtime = (shards[0] / "manifest.json").stat().st_mtime_ns

    rings = [tmp_path / "ssd0", tmp_path / "ssd1"]
    ring = _run([str(tmp_path / "tp.yaml"), "--job-dir", str(tmp_path / "j3"), "--reduce", "ring",
                 "--ring-dir", str(rings[0]), "--ring-dir", str(rings[1])], tmp_path, store_root)
    assert ring.returncode == 0, ring.stderr
    assert _lines(tmp_path / "j3" / "results.jsonl") == base
    assert (shards[0] / "manifest.json").stat().st_mtime_ns == mtime  # reused, not cut again
    assert all(d.is_dir() and not list(d.iterdir()) for d in rings)  # no ring message left behind

    # spec.offload.reduce: ring in the manifest is what `kubeflash run` uses when --reduce is not given
    by_spec = _run([str(_job(tmp_path / "ring.yaml", str(tiny_llama), synthetic=syn, tp=2, reduce="ring")),
                    "--job-dir", str(tmp_path / "j5")], tmp_path, store_root)
    assert by_spec.returncode == 0, by_spec.stderr
    assert "tensor parallel: 2 ranks, reduce ring" in by_spec.stdout
    assert _lines(tmp_path / "j5" / "results.jsonl") == base

    # a shard from another version of the store: refused, naming the shard directory
    m = json.loads((shards[1] / "manifest.json").read_text())
    m["extra"]["tensor_parallel"]["source_manifest_sha256"] = "0" * 64
    (shards[1] / "manifest.json").write_text(json.dumps(m))
    stale = _run([str(tmp_path / "tp.yaml"), "--job-dir", str(tmp_path / "j4")], tmp_path, store_root)
    assert stale.returncode != 0
    assert str(shards[1]) in stale.stderr and len(stale.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "j4" / "results.jsonl").exists()
    import shutil

    shutil.rmtree(shards[0].parent)  # the next test cuts them again


def test_smollm2_tp3_matches_one_process(tmp_path, store_root):
    """SmolLM2-135M (9 query heads over 3 K/V heads) with --tensor-parallel 3: the same answers as one process."""
    prompts = ["What is the capital of France?", "Name a primary colour."]
    job = _job(tmp_path / "smol.yaml", "builtin:smollm2-135m", name="smol", prompts=prompts, max_new=6)
    one = _run([str(job), "--job-dir", str(tmp_path / "j1")], tmp_path, store_root)
    assert one.returncode == 0, one.stderr
    three = _run([str(job), "--job-dir", str(tmp_path / "j3"), "--tensor-parallel", "3"], tmp_path, store_root)
    assert three.returncode == 0, three.stderr
    base = _lines(tmp_path / "j1" / "results.jsonl")
    assert len(base) == 2 and _lines(tmp_path / "j3" / "results.jsonl") == base


@pytest.mark.parametrize("extra,tp,expect", [
    ([], 3, "num_heads 4 is not a multiple of the 3 ranks"),
    (["--reduce", "nccl"], 2, "NCCL is the GPU backend and needs CUDA GPUs"),
    (["--reduce", "ring", "--ring-dir", "a"], 2, "--ring-dir given 1 times; expected one per rank (2)"),
])
def test_refused_before_any_rank_starts(tmp_path, tiny_llama, store_root, extra, tp, expect):
    """One line naming the numbers or the option, exit 1, no rank process and no job output."""
    job = _job(tmp_path / "j.yaml", str(tiny_llama), synthetic={"count": 1, "promptLength": 4}, tp=tp)
    r = _run([str(job), "--job-dir", str(tmp_path / "jd"), *extra], tmp_path, store_root)
    assert r.returncode == 1 and expect in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "jd" / "tp").exists() and not (tmp_path / "jd" / "results.jsonl").exists()


def test_unsupported_option_refused(tmp_path, tiny_llama, store_root):
    """An option tensor parallelism does not split (here xCache) is named, before anything runs."""
    job = _job(tmp_path / "j.yaml", str(tiny_llama), synthetic={"count": 1, "promptLength": 4}, tp=2, xCache=True)
    r = _run([str(job), "--job-dir", str(tmp_path / "jd")], tmp_path, store_root)
    assert r.returncode == 1 and "spec.offload.tensorParallel 2: spec.offload.xCache" in r.stderr, r.stderr
    assert not (tmp_path / "jd" / "tp").exists()


@pytest.mark.parametrize("reduce", ["gloo", "ring"])
def test_killed_rank_fails_the_run_naming_it(tmp_path, tiny_llama, store_root, reduce):
    """kill -9 of rank 1 once rank 0 has written results: the run fails within the timeout, naming rank 1 and its
    pid; no rank is left running; results.jsonl holds whole result lines only."""
    job = _job(tmp_path / "j.yaml", str(tiny_llama), synthetic={"count": 200, "promptLength": 8}, tp=2,
               max_new=64, gpuBatchSize=1)
    jd = tmp_path / "jd"
    proc = subprocess.Popen([sys.executable, "-m", "kubeflash_node.cli", "run", str(job), "--device", "cpu",
                             "--quiet", "--store", str(store_root), "--job-dir", str(jd), "--reduce", reduce],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results, ranks = jd / "results.jsonl", jd / "tp" / "ranks.json"
    while proc.poll() is None and not (results.exists() and results.stat().st_size > 0 and ranks.exists()):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    pids = json.loads(ranks.read_text())["pids"]
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert f"rank 1 (pid {pids[1]}) was killed by SIGKILL" in err, err
    for pid in pids:  # every rank is gone (reaped by the launcher)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    data = results.read_bytes()
    assert data.endswith(b"\n")
    lines = data.splitlines()
    assert 0 < len(lines) < 200 and all(json.loads(x)["custom_id"] for x in lines)
