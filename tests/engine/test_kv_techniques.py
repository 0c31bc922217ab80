"""INF² KV techniques: delayed write-back writes fewer, larger chunks and changes no token; CPU attention
keeps the cache on the host and changes no token; the X-cache halves an MHA model's cache and changes no token;
misconfigurations name the manifest field."""

from __future__ import annotations

import pytest

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.policy import Policy

PROMPTS = [[5 + i, 9, 13 + i, 2, 7] * (3 + i) for i in range(4)]


def _run(store, policy, job_dir, new=12):
    engine = Engine(store, policy=policy, job_dir=job_dir)
    try:
        out = [c.tokens for c in engine.generate(PROMPTS, GenParams(max_new_tokens=new))]
        return out, engine
    finally:
        engine.close()


def test_write_back_same_tokens_fewer_larger_writes(opt_store, tmp_path):
    """Buffered K/V rows reach the file in chunks >= the threshold; tokens equal the plain disk tier's."""
    plain, e1 = _run(opt_store, Policy(gpu_batch_size=2, num_gpu_batches=2, kv="disk"), tmp_path / "a")
    wb, e2 = _run(opt_store, Policy(gpu_batch_size=2, num_gpu_batches=2, kv="disk", kv_write_back=True,
                                    kv_write_back_bytes=64 << 10), tmp_path / "b")
    assert wb == plain
    assert e2.kv.io["writes"] < e1.kv.io["writes"] / 3
    assert e2.kv.io["write_bytes"] / e2.kv.io["writes"] >= 64 << 10
    assert e2.kv.io["write_bytes"] <= e1.kv.io["write_bytes"]  # rows still buffered at the end are never written
    # every decode load found its file prefix already read by the reader thread (asked one entry ahead)
    layers, steps = e1.config.num_layers, 11
    assert e1.kv.loads == {"prefetched": layers * 2 * steps, "waited": 0}
    assert e2.kv.loads == {"prefetched": layers * 2 * steps, "waited": 0}  # the prompts' rows were flushed at once
    assert e1.kv.io["reads"] == layers * 2 * steps and e1.kv.io["read_bytes"] > 0


def test_cpu_attention_same_tokens(opt_store, tmp_path):
    """Decode attention over host-resident KV gives the device tier's tokens."""
    dev, _ = _run(opt_store, Policy(gpu_batch_size=2, num_gpu_batches=2), tmp_path / "a")
    cpu, _ = _run(opt_store, Policy(gpu_batch_size=2, num_gpu_batches=2, kv="cpu", cpu_attention=True), tmp_path / "b")
    assert cpu == dev


def test_x_cache_halves_mha_cache_same_tokens(opt_store, tmp_path):
    """OPT (multi-head): holding X instead of K and V takes half the bytes on disk, and the K, V recomputed
    from it give the plain tier's tokens; a partial share splits the layers between the two kinds."""
    base = dict(gpu_batch_size=2, num_gpu_batches=2, kv="disk")
    plain, e1 = _run(opt_store, Policy(**base), tmp_path / "a")
    full, e2 = _run(opt_store, Policy(**base, x_cache_percent=100), tmp_path / "b")
    half, e3 = _run(opt_store, Policy(**base, x_cache_percent=50), tmp_path / "c")
    assert full == plain and half == plain
    kv_bytes, x_bytes, mixed = (e.stats["cache_bytes"] for e in (e1, e2, e3))
    assert x_bytes * 2 == kv_bytes and mixed * 4 == kv_bytes * 3


@pytest.mark.parametrize("offload, message", [
    ({"policy": "explicit", "weights": {"gpu": 0, "cpu": 0, "disk": 100}, "kv": {"gpu": 100, "cpu": 0, "disk": 0},
      "cpuAttention": True}, "spec.offload.cpuAttention needs the KV cache in CPU memory"),
    ({"policy": "explicit", "weights": {"gpu": 0, "cpu": 0, "disk": 100}, "kv": {"gpu": 0, "cpu": 100, "disk": 0},
      "kvWriteBack": True}, "spec.offload.kvWriteBack needs the KV cache on disk"),
], ids=["cpu-attention-without-cpu-kv", "write-back-without-disk-kv"])
def test_technique_needs_its_tier(offload, message):
    """Asking for a technique on the wrong KV tier is refused with the manifest field's name (by the parser)."""
    from kubeflash_api import SpecError, parse_job
    from kubeflash_node.engine.planning import policy_for

    with pytest.raises(SpecError, match=message):  # refused by the one parser, before any engine work
        job = parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
                         "spec": {"model": {"uri": "dummy:opt-125m"}, "input": {"synthetic": {"count": 1}},
                                  "offload": offload}})
        policy_for(job, n_prompts=1, device="cpu")


def test_auto_policy_picks_the_tier_a_technique_needs():
    """With policy auto, asking for CPU attention or write-back moves the KV to the tier they work on."""
    from kubeflash_api import parse_job
    from kubeflash_node.engine.planning import policy_for

    def pol(**off):
        job = parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
                         "spec": {"model": {"uri": "dummy:opt-125m"}, "input": {"synthetic": {"count": 1}},
                                  "offload": off}})
        return policy_for(job, n_prompts=1, device="cpu")

    assert pol(cpuAttention=True).kv == "cpu" and pol(kvWriteBack=True).kv == "disk" and pol().kv == "device"


def _job(uri="dummy:opt-125m", count=6, **offload):
    from kubeflash_api import parse_job

    return parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
                      "spec": {"model": {"uri": uri, "dtype": "float32"},
                               "input": {"synthetic": {"count": count, "promptLength": 24}},
                               "generation": {"maxNewTokens": 6}, "offload": offload}})


def test_explicit_x_cache_only_where_it_saves_bytes():
    """xCache: true under an explicit policy holds X on every layer of an MHA model, none of a GQA one."""
    from kubeflash_node.engine.planning import policy_for

    explicit = {"policy": "explicit", "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                "kv": {"gpu": 0, "cpu": 100, "disk": 0}, "xCache": True}
    assert policy_for(_job(**explicit), n_prompts=1, device="cpu").x_cache_percent == 100
    assert policy_for(_job("dummy:llama-3-8b", **explicit), n_prompts=1, device="cpu").x_cache_percent == 0


def test_run_job_auto_policy_follows_the_cost_model(opt_store, tmp_path):
    """policy auto with measured ceilings and budgets: run_job runs the cost model's choice, honours the pinned
    batch shape, and reports the plan; the tokens equal a plain run's."""
    import json
    from pathlib import Path

    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.job import run_job
    from kubeflash_node.engine.machine import Machine
    from kubeflash_node.store.format import load_manifest

    ceil = Ceilings(**json.loads((Path(__file__).parents[2] / "docs/bench-results/ceilings.json").read_text()))
    manifest = load_manifest(opt_store)
    spec = _job(gpuBatchSize=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    report = run_job(spec, model_dir=opt_store, manifest=manifest, output=tmp_path / "a.jsonl", device="cpu",
                     job_dir=tmp_path / "a", machine=Machine(ceil, 2 << 30, 3 << 30))
    assert report["policy"]["gpu_batch_size"] == 2 and "micro-batch 2 x" in report["plan"]["chosen"]
    assert report["plan"]["considered"] > 100 and report["plan"]["predicted_s"] > 0
    plain = run_job(spec, model_dir=opt_store, manifest=manifest, output=tmp_path / "b.jsonl", device="cpu",
                    job_dir=tmp_path / "b")
    assert "plan" not in plain
    rows = [[json.loads(line)["response"]["body"]["token_ids"]  # synthetic prompts on a dummy model: no text
             for line in (tmp_path / f).read_text().splitlines()] for f in ("a.jsonl", "b.jsonl")]
    assert rows[0] == rows[1]


def test_run_job_refuses_a_disk_cache_over_the_kv_disk_quota(opt_store, tmp_path):
    """An explicit policy whose KV files would outgrow spec.resources.kvDisk fails before generating, naming the
    field and the size it needs; no result is written."""
    from kubeflash_api import SpecError, parse_job
    from kubeflash_node.engine.job import run_job
    from kubeflash_node.store.format import load_manifest

    def spec(kv_disk):
        return parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
                          "spec": {"model": {"uri": "dummy:opt-125m", "dtype": "float32"},
                                   "input": {"synthetic": {"count": 4}},
                                   "generation": {"maxNewTokens": 6}, "resources": {"kvDisk": kv_disk},
                                   "offload": {"policy": "explicit", "weights": {"gpu": 100, "cpu": 0, "disk": 0},
                                               "kv": {"gpu": 0, "cpu": 0, "disk": 100}, "gpuBatchSize": 4}}})

    manifest = load_manifest(opt_store)
    out = tmp_path / "out.jsonl"
    # 4 prompts x 38 tokens (32 + 6) x 12 layers x K, V of 768 float32 values: 10.7 MiB
    with pytest.raises(SpecError, match=r"spec.resources.kvDisk: the KV cache on disk needs 10.7 MiB for blocks "
                                        r"of 4 prompts x 38 tokens, more than the 1.0 MiB reserved"):
        run_job(spec("1Mi"), model_dir=opt_store, manifest=manifest, output=out, device="cpu", job_dir=tmp_path)
    assert not out.exists() or not out.read_text().strip()
    report = run_job(spec("11Mi"), model_dir=opt_store, manifest=manifest, output=out, device="cpu", job_dir=tmp_path)
    assert report["generated_tokens"] > 0 and len(out.read_text().splitlines()) == 4


def test_run_job_plans_within_the_manifests_memory_budgets(opt_store, tmp_path):
    """spec.resources.gpuMemory / cpuMemory shrink the machine's budgets for the auto plan: a GPU budget below
    what any policy needs is refused with the budget in the message, before anything is generated."""
    import json
    from pathlib import Path

    from kubeflash_api import SpecError, parse_job
    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.job import run_job
    from kubeflash_node.engine.machine import Machine
    from kubeflash_node.store.format import load_manifest

    def spec(gpu):
        return parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "j"},
                          "spec": {"model": {"uri": "dummy:opt-125m", "dtype": "float32"},
                                   "input": {"synthetic": {"count": 4}}, "generation": {"maxNewTokens": 4},
                                   "resources": {"gpuMemory": gpu, "cpuMemory": "3Gi"}}})

    ceil = Ceilings(**json.loads((Path(__file__).parents[2] / "docs/bench-results/ceilings.json").read_text()))
    manifest, machine = load_manifest(opt_store), Machine(ceil, 80 << 30, 512 << 30)
    with pytest.raises(SpecError, match="no candidate policy fits 0.0 GiB of GPU and 3.0 GiB of CPU memory .* "
                                        r"\(the budgets: spec.resources.gpuMemory, cpuMemory and kvDisk"):
        run_job(spec("16Mi"), model_dir=opt_store, manifest=manifest, output=tmp_path / "a.jsonl", device="cpu",
                job_dir=tmp_path, machine=machine)
    assert not (tmp_path / "a.jsonl").exists() or not (tmp_path / "a.jsonl").read_text().strip()
    report = run_job(spec("2Gi"), model_dir=opt_store, manifest=manifest, output=tmp_path / "b.jsonl", device="cpu",
                     job_dir=tmp_path, machine=machine)
    gib = float(report["plan"]["chosen"].split("GPU ")[1].split(" GiB")[0])
    assert 0 < gib <= 1.0  # within 2 GiB less the 1 GiB reserve
