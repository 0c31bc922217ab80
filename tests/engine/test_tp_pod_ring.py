"""The pod the operator builds for spec.offload.reduce ring runs: `kubeflash engine` (the pod's entry point, a real
subprocess on CPU) is given exactly the environment `build_pod` writes for a tensorParallel-2 job
(KUBEFLASH_SHARD_DIRS, KUBEFLASH_RANK_DIRS, KUBEFLASH_RING_DIRS, the canonical spec), each absolute pod path laid
out under a tmp directory standing for the container's root (the shard mounts and the model linked to what the
agent staged, the KV volumes as directories). The two ranks reduce through ring directories inside their own KV
volumes (/job/kv/ring, /ranks/1/ring) and the results equal the one-process pod's token for token (two float32
addends sum the same in any order)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_tp_pod import _engine, _results, staged  # noqa: F401  (staged: the module-scoped fixture)

from kubeflash_api import contract as c
from kubeflash_api.inferencejob import parse_job_spec
from kubeflash_operator.builder import JobRef, PodTarget, build_pod


def _pod_env(tp: int) -> dict[str, str]:
    raw = {"model": {"uri": "/models/tiny-llama", "dtype": "float32"},
           "input": {"synthetic": {"count": 4, "promptLength": 7}}, "generation": {"maxNewTokens": 6},
           "offload": {"policy": "explicit", "gpuBatchSize": 2, "weights": {"gpu": 0, "cpu": 0, "disk": 100},
                       "kv": {"gpu": 100, "cpu": 0, "disk": 0}, "tensorParallel": tp, "reduce": "ring"}}
    spec = parse_job_spec(raw, name="j", namespace="ns")
    target = PodTarget(node="n1", gpus=(0, 1), disk="nvme0", disk_path="/mnt/nvme0/kubeflash", model_id=spec.model.id,
                       model_disk="nvme0", model_disk_path="/mnt/nvme0/kubeflash", shard_disks=("nvme0", "nvme1"),
                       kv_disks=("nvme0", "nvme1"))
    pod = build_pod(JobRef("ns", "j", "uid-1"), spec, target, attempt=1, default_image="img")
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


def test_the_built_ring_pod_runs_with_its_ring_dirs_in_the_kv_volumes(staged, tmp_path):  # noqa: F811
    model, shards = staged
    base = _engine(model, tmp_path / "one", 1)
    assert base.returncode == 0, base.stderr

    env = _pod_env(2)
    assert env[c.ENV_RING_DIRS] == "/job/kv/ring:/ranks/1/ring"
    root = tmp_path / "pod"  # the container's "/"

    def at(p: str) -> Path:
        return root / p.lstrip("/")

    at(env[c.ENV_MODEL_DIR]).parent.mkdir(parents=True)
    at(env[c.ENV_MODEL_DIR]).symlink_to(model)
    for k, d in enumerate(env[c.ENV_SHARD_DIRS].split(":")):
        at(d).parent.mkdir(parents=True, exist_ok=True)
        at(d).symlink_to(shards[k])
    for d in ("/job/kv", *env[c.ENV_RANK_DIRS].split(":")):  # the KV volumes (and the job directory) as mounted
        at(d).mkdir(parents=True, exist_ok=True)
    rebased = {k: ":".join(str(at(p)) for p in env[k].split(":"))
               for k in (c.ENV_SHARD_DIRS, c.ENV_RANK_DIRS, c.ENV_RING_DIRS)}
    run = _engine(model, at(env[c.ENV_JOB_DIR]), 2, **rebased, KUBEFLASH_JOB_SPEC=env[c.ENV_JOB_SPEC],
                  KUBEFLASH_MODEL_DIR=str(at(env[c.ENV_MODEL_DIR])))
    assert run.returncode == 0, run.stderr
    assert _results(at("/job")) == _results(tmp_path / "one")
    report = json.loads((at("/job") / "report.json").read_text())["tensor_parallel"]
    rings = [str(at(p)) for p in env[c.ENV_RING_DIRS].split(":")]
    assert report["reduce"] == "ring" and report["ring_dirs"] == rings
    assert all(os.path.isdir(d) for d in rings)
    assert json.loads((at("/ranks/1") / "progress.json").read_text())["phase"] == "done"
