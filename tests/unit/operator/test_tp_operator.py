"""Tensor-parallel jobs in the operator (docs/multi-gpu.md): spec.offload.tensorParallel N holds N GPU<->SSD pairs
of one node, asks the agent for the model with tensorParallel N, waits in Staging until every shard the FlashNode
reports is Ready, prefers a node whose shards are Ready, and builds a pod with N GPUs, one read-only shard volume
per rank, one KV volume per pair and KUBEFLASH_SHARD_DIRS / KUBEFLASH_RANK_DIRS naming those mounts."""

from __future__ import annotations

import json
from datetime import timedelta

from test_reconcile import CFG, MODEL, apply

from kubeflash_api import contract as c
from kubeflash_operator.bookkeeping import ledger_annotation, parse_ledger
from kubeflash_operator.builder import JobRef, build_pod
from kubeflash_operator.reconcile import Job, World, admit, step
from kubeflash_operator.scheduler import Claim, node_view

from operator_factories import NOW, GiB, flashnode, job_spec

TWO = ((0, "nvme0"), (1, "nvme1"))


def tp_job(tp=2, status=None, **spec) -> Job:
    spec = {"offload": {"tensorParallel": tp}, **spec}
    job = Job("ns", "j", "uid-1", job_spec(**spec), dict(status or {}), created=NOW - timedelta(seconds=3),
              generation=1)
    return apply(job, admit(job, now=NOW).status) if status is None else job


def world(*bodies, claims=(), now=NOW):
    return World(now=now, nodes={b["metadata"]["name"]: node_view(b) for b in bodies}, claims=tuple(claims))


def shard(k, state="Ready", progress=100.0, message=""):
    return {"rank": k, "gpu": k, "disk": f"nvme{k}", "path": f"/mnt/nvme{k}/kubeflash/shards/{MODEL}.tp2/{k}",
            "state": state, "bytes": GiB, "progress": progress, **({"message": message} if message else {})}


def node(name="n1", shards=None, pairs=TWO, tp=2, desired=True, **kw):
    model = {"id": MODEL, "disk": "nvme0", "state": "Ready", "bytes": GiB}
    if shards is not None:
        model.update(tensorParallel=tp, shards=shards)
    body = flashnode(name, pairs=pairs, models=[model], **kw)
    if desired:
        body["spec"]["models"] = [{"id": MODEL, "uri": "builtin:smollm2-135m", "tensorParallel": tp}]
    return body


def test_tensor_parallel_implies_gpus_and_a_mismatch_is_refused_naming_the_field():
    """tensorParallel 2 with resources.gpus left out holds 2 GPUs; gpus 3 is refused naming spec.resources.gpus."""
    job = tp_job()
    assert job.parsed.resources.gpus == 2 and job.status["phase"] == "Pending"
    bad = Job("ns", "j", "uid-1", job_spec(offload={"tensorParallel": 2}, resources={"gpus": 3}), {}, created=NOW)
    plan = admit(bad, now=NOW)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert plan.status["message"].startswith("spec.resources.gpus must be 2 (or left out) with "
                                             "spec.offload.tensorParallel 2")


def test_gpus_n_without_tensor_parallel_runs_n_ranks_on_n_pairs():
    """resources.gpus 2 with tensorParallel left out is a tensor-parallel job of 2 ranks: the FlashNode entry asks
    for 2 shards, the job waits for them, then runs on GPUs 0 and 1 with shard k and a KV volume on pair k's disk,
    and the pod's own spec (KUBEFLASH_JOB_SPEC) says tensorParallel 2, so the engine starts a rank per GPU.
    tensorParallel 1 written out is the same (the CRD writes that default into every job: left out looks the same)."""
    job = Job("ns", "j", "uid-1", job_spec(resources={"gpus": 2}), {}, created=NOW - timedelta(seconds=3),
              generation=1)
    job = apply(job, admit(job, now=NOW).status)
    assert job.parsed.offload.tensor_parallel == 2 and job.parsed.resources.gpus == 2
    plan = step(job, world(node(desired=False)), CFG)
    assert plan.status["phase"] == "Staging" and plan.stage.entry["tensorParallel"] == 2
    job = apply(job, plan.status)
    plan = step(job, world(node(shards=[shard(0), shard(1)])), CFG)
    t = plan.create.target
    assert (t.gpus, t.shard_disks, t.kv_disks) == ((0, 1), ("nvme0", "nvme1"), ("nvme0", "nvme1"))
    pod = build_pod(JobRef("ns", "j", "uid-1"), job.parsed, t, attempt=1, default_image="img")
    ctr = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    assert json.loads(env[c.ENV_JOB_SPEC])["offload"]["tensorParallel"] == 2
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "2" and env[c.ENV_RANK_DIRS] == "/job:/ranks/1"
    one = Job("ns", "j", "uid-1", job_spec(offload={"tensorParallel": 1}, resources={"gpus": 2}), {}, created=NOW)
    assert one.parsed.offload.tensor_parallel == 2 and admit(one, now=NOW).status["phase"] == "Pending"


def test_needs_two_free_pairs_on_one_node():
    """A node with one pair, or two pairs one of which another job holds, does not fit; the reason says so."""
    plan = step(tp_job(), world(node(pairs=((0, "nvme0"),), desired=False)), CFG)
    assert "n1: 1 free GPU<->SSD pairs, needs 2" in plan.status["message"]
    plan = step(tp_job(), world(node(), claims=[Claim("ns/other", "n1", (1,), "nvme1")]), CFG)
    assert "n1: 1 free GPU<->SSD pairs, needs 2" in plan.status["message"] and plan.create is None


def test_waits_in_staging_with_shard_progress_then_runs_on_both_pairs():
    """Model Ready without shards: Staging, the FlashNode entry asked with tensorParallel 2; shard progress in the
    message; once both shards are Ready a pod is created holding GPUs 0 and 1, shard k read from disk nvme<k>."""
    job = tp_job()
    plan = step(job, world(node(desired=False)), CFG)
    assert plan.status["phase"] == "Staging" and plan.create is None
    assert plan.status["gpus"] == [0, 1]
    assert plan.stage.entry == {"id": MODEL, "uri": "builtin:smollm2-135m", "dtype": "float16",
                                "quantization": "none", "disk": "nvme0", "tensorParallel": 2}
    job = apply(job, plan.status)
    plan = step(job, world(node(shards=[shard(0), shard(1, "Staging", 40.0)])), CFG)
    assert plan.stage is None and plan.create is None and "phase" not in plan.status
    assert plan.status["message"].endswith(": model ready; shards 1/2 Ready, shard 1 staging 40%")
    plan = step(job, world(node(shards=[shard(0), shard(1)])), CFG)
    assert plan.status["phase"] == "Running" and plan.create is not None
    t = plan.create.target
    assert (t.gpus, t.shard_disks, t.kv_disks) == ((0, 1), ("nvme0", "nvme1"), ("nvme0", "nvme1"))


def test_a_desired_entry_without_tensor_parallel_is_asked_again():
    """The model already wanted (and Ready) without tensorParallel: the operator asks for the entry with 2."""
    job = apply(tp_job(), step(tp_job(), world(node(desired=False)), CFG).status)
    body = node()
    body["spec"]["models"] = [{"id": MODEL, "uri": "builtin:smollm2-135m"}]
    plan = step(job, world(body), CFG)
    assert plan.stage is not None and plan.stage.entry["tensorParallel"] == 2


def test_a_failed_shard_fails_the_job_naming_shard_and_disk():
    """The agent reporting shard 1 Failed ends the job with StagingFailed naming the shard, its disk and why."""
    job = apply(tp_job(), step(tp_job(), world(node(desired=False)), CFG).status)
    plan = step(job, world(node(shards=[shard(0), shard(1, "Failed", message="needs ~9 bytes, 1 free")])), CFG)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "StagingFailed" and plan.release
    assert "(shard 1 on disk nvme1: needs ~9 bytes, 1 free)" in plan.status["message"]


def test_prefers_the_node_whose_shards_are_ready():
    """Two nodes with the model Ready: the one whose two shards are Ready wins over a better-named one without."""
    plan = step(tp_job(), world(node("a", shards=[shard(0), shard(1, "Staging")]), node("b", shards=[shard(0), shard(1)])),
                CFG)
    assert plan.status["node"] == "b" and plan.status["phase"] == "Running"


def test_one_rank_jobs_are_unchanged():
    """Without tensorParallel the Ready model alone starts the pod; no shard fields in the target."""
    plan = step(tp_job(tp=1), world(flashnode("n1", models=[{"id": MODEL, "disk": "nvme0", "state": "Ready"}])), CFG)
    assert plan.create is not None and plan.create.target.shard_disks == () and plan.create.target.kv_disks == ()


def test_the_pod_holds_two_gpus_two_shard_volumes_and_a_kv_volume_per_pair():
    """The built pod: nvidia.com/gpu 2; shard-0/1 CSI volumes (model id, shard k, tensor-parallel 2, disk nvme<k>)
    read-only at /shards/<k>; KV volumes on nvme0 (/job/kv) and nvme1 (/ranks/1); the engine's env names them."""
    job = tp_job()
    plan = step(job, world(node(shards=[shard(0), shard(1)])), CFG)
    pod = build_pod(JobRef("ns", "j", "uid-1"), job.parsed, plan.create.target, attempt=1, default_image="img")
    ctr = pod["spec"]["containers"][0]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "2" == ctr["resources"]["requests"]["nvidia.com/gpu"]
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    for k in (0, 1):
        assert vols[f"shard-{k}"]["csi"] == {"driver": "kubeflash.io", "readOnly": True, "volumeAttributes": {
            c.CSI_MODEL_ID: MODEL, c.CSI_SHARD: str(k), c.CSI_TENSOR_PARALLEL: "2", c.CSI_DISK: f"nvme{k}"}}
        assert mounts[f"shard-{k}"] == {"name": f"shard-{k}", "mountPath": f"/shards/{k}", "readOnly": True}
    assert vols["kv"]["csi"]["volumeAttributes"][c.CSI_DISK] == "nvme0" and mounts["kv"]["mountPath"] == "/job/kv"
    assert vols["kv-1"]["csi"]["volumeAttributes"][c.CSI_DISK] == "nvme1" and mounts["kv-1"]["mountPath"] == "/ranks/1"
    assert "kv-2" not in vols and "shard-2" not in vols
    env = {e["name"]: e["value"] for e in ctr["env"]}
    assert env[c.ENV_SHARD_DIRS] == "/shards/0:/shards/1" and env[c.ENV_RANK_DIRS] == "/job:/ranks/1"
    assert c.ENV_RING_DIRS not in env  # NCCL between the pod's GPUs


# ------------------------------------------------------------------------- disk space on every rank's disk

FOUR = ((0, "nvme0"), (1, "nvme1"), (2, "nvme0"), (3, "nvme1"))  # two pairs per disk


def disk_node(pairs=FOUR, free=(30 * GiB,), shards=None):
    """The model (8 GiB, so a 2-way shard is 4 GiB) Ready on nvme0; `free` bytes per disk."""
    model = {"id": MODEL, "disk": "nvme0", "state": "Ready", "bytes": 8 * GiB}
    if shards is not None:
        model.update(tensorParallel=2, shards=shards)
    return flashnode("n1", pairs=pairs, free=free, models=[model])


def placed(name, kv, w):
    job = Job("ns", name, f"uid-{name}", job_spec(offload={"tensorParallel": 2}, resources={"kvDisk": kv}), {},
              created=NOW - timedelta(seconds=3), generation=1)
    job = apply(job, admit(job, now=NOW).status)
    return step(job, w, CFG)


def test_kv_and_shard_space_is_reserved_on_every_ranks_disk_and_a_second_job_sees_it():
    """Job a (kvDisk 12Gi, tensorParallel 2) on 4 pairs over 2 disks of 30 GiB: its claim holds 12 GiB KV + a 4 GiB
    shard on nvme0 and on nvme1, and the ledger keeps that; job b then finds 14 GiB left on each disk and is refused
    naming the disk; with kvDisk 10Gi both fit (b on GPUs 2 and 3). Staged shards stop counting."""
    plan = placed("a", "12Gi", world(disk_node()))
    claim = plan.claim
    assert (claim.gpus, claim.disks, claim.shard_bytes) == ((0, 1), ("nvme0", "nvme1"), 4 * GiB)
    view = node_view(disk_node())
    assert claim.held(view) == {"nvme0": 16 * GiB, "nvme1": 16 * GiB}
    body = disk_node()
    body["metadata"]["annotations"] = {"kubeflash.io/claims": ledger_annotation({claim.job: claim})}
    assert parse_ledger("n1", body) == {claim.job: claim}
    plan = placed("b", "12Gi", world(disk_node(), claims=[claim]))
    assert plan.claim is None
    assert "n1: disk nvme0 has 14.0Gi free, needs 16.0Gi" in plan.status["message"]
    a = placed("a", "10Gi", world(disk_node())).claim
    b = placed("b", "10Gi", world(disk_node(), claims=[a])).claim
    assert (b.gpus, b.disks) == ((2, 3), ("nvme0", "nvme1"))
    staged = node_view(disk_node(shards=[shard(0), shard(1)]))
    assert a.held(staged) == {"nvme0": 10 * GiB, "nvme1": 10 * GiB}


def test_a_disk_too_small_for_rank_1_refuses_that_pair_naming_the_disk():
    """Two pairs, nvme1 with 5 GiB free and 10 GiB of KV asked per rank: no fit, the reason names nvme1, rank 1 and
    what it needs (KV + shard). A third pair on a roomy disk does not help while shard 1 is still to be cut: the
    agent cuts shard 1 onto pair 1's disk, nvme1, so rank 1 must run there (GPU 2 would stream it from nvme1, the
    other pair's SSD). Once the node reports shard 1 on nvme2, the job takes GPUs 0 and 2."""
    plan = placed("a", "10Gi", world(disk_node(pairs=TWO, free=(30 * GiB, 5 * GiB))))
    assert plan.claim is None
    assert ("n1: disk nvme1 (GPU 1) has 5.0Gi free, needs 14.0Gi for rank 1's KV (10.0Gi) and shard (4.0Gi)"
            in plan.status["message"])
    three = (*TWO, (2, "nvme2"))
    plan = placed("a", "10Gi", world(disk_node(pairs=three, free=(30 * GiB, 5 * GiB, 30 * GiB))))
    assert plan.claim is None
    assert "n1: disk nvme1 (GPU 1) has 5.0Gi free, needs 14.0Gi for rank 1's KV" in plan.status["message"]
    on2 = {**shard(1), "gpu": 2, "disk": "nvme2", "path": f"/mnt/nvme2/kubeflash/shards/{MODEL}.tp2/1"}
    body = disk_node(pairs=three, free=(30 * GiB, 5 * GiB, 30 * GiB), shards=[shard(0), on2])
    claim = placed("a", "10Gi", world(body)).claim
    assert (claim.gpus, claim.disks) == ((0, 2), ("nvme0", "nvme2"))


def test_each_rank_runs_on_the_pair_whose_disk_gets_its_shard():
    """Four pairs on four disks, no shard cut yet, GPU 0 held by a one-GPU job: the agent will cut shard 0 onto pair
    0's disk (nvme0), so no pair can run rank 0 from its own SSD; the job is not placed and the reason names nvme0
    and shard 0 (before this check it took GPUs 1 and 2, and rank 0 streamed shard 0 from nvme0, GPU 0's disk).
    With GPU 0 free again the ranks take GPUs 0 and 1, the pairs of nvme0 and nvme1 where the shards go."""
    four = ((0, "nvme0"), (1, "nvme1"), (2, "nvme2"), (3, "nvme3"))
    body = disk_node(pairs=four, free=(30 * GiB,) * 4)
    other = Claim(job="ns/other", node="n1", gpus=(0,), disk="nvme0", kv_bytes=GiB)
    plan = placed("a", "1Gi", world(body, claims=[other]))
    assert plan.claim is None
    assert ("n1: no free GPU is paired with disk nvme0, where shard 0 is (or is cut: shard k goes on pair k's disk)"
            in plan.status["message"]), plan.status["message"]
    claim = placed("a", "1Gi", world(body)).claim
    assert (claim.gpus, claim.disks) == ((0, 1), ("nvme0", "nvme1"))


def test_a_second_cut_of_the_same_model_waits_naming_the_field():
    """The agent keeps one tensorParallel per model on a node (spec.models[].tensorParallel). While job a holds
    the model cut in 2 on n1, job b with tensorParallel 3 is not placed there (the reason names the field and job
    a) and goes to another node; job c with tensorParallel 2 shares n1."""
    six = tuple((g, f"nvme{g % 2}") for g in range(6))
    big = (100 * GiB,)
    a = placed("a", "1Gi", world(disk_node(pairs=six, free=big))).claim
    job = Job("ns", "b", "uid-b", job_spec(offload={"tensorParallel": 3}), {}, created=NOW, generation=1)
    job = apply(job, admit(job, now=NOW).status)
    plan = step(job, world(disk_node(pairs=six, free=big), claims=[a]), CFG)
    assert plan.claim is None and (f"n1: model {MODEL} is cut into 2 shards here for job ns/a "
                                   "(spec.offload.tensorParallel 2), this job asks spec.offload.tensorParallel 3"
                                   in plan.status["message"])
    other = flashnode("n2", pairs=six, free=big, models=[{"id": MODEL, "disk": "nvme0", "state": "Ready",
                                                          "bytes": 8 * GiB}])
    plan = step(job, world(disk_node(pairs=six, free=big), other, claims=[a]), CFG)
    assert plan.claim.node == "n2" and len(plan.claim.gpus) == 3
    c = placed("c", "1Gi", world(disk_node(pairs=six, free=big), claims=[a])).claim
    assert (c.node, c.gpus) == ("n1", (2, 3))


def test_reduce_ring_gives_each_rank_a_ring_directory_in_its_own_kv_volume():
    """spec.offload.reduce ring: KUBEFLASH_RING_DIRS names /job/kv/ring (rank 0's KV volume, disk nvme0) and
    /ranks/1/ring (rank 1's, disk nvme1), in rank order; reduce ring with tensorParallel 1 is refused naming the
    field."""
    job = tp_job(offload={"tensorParallel": 2, "reduce": "ring"})
    assert job.parsed.offload.reduce == "ring"
    plan = step(job, world(node(shards=[shard(0), shard(1)])), CFG)
    pod = build_pod(JobRef("ns", "j", "uid-1"), job.parsed, plan.create.target, attempt=1, default_image="img")
    ctr = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    assert env[c.ENV_RING_DIRS] == "/job/kv/ring:/ranks/1/ring"
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    for k, ring in enumerate(env[c.ENV_RING_DIRS].split(":")):
        mount = ring.rsplit("/", 1)[0]
        assert vols[mounts[mount]]["csi"]["volumeAttributes"][c.CSI_DISK] == f"nvme{k}"
    bad = Job("ns", "j", "uid-1", job_spec(offload={"reduce": "ring"}), {}, created=NOW)
    plan = admit(bad, now=NOW)
    assert plan.status["phase"] == "Failed"
    assert plan.status["message"].startswith("spec.offload.reduce ring needs spec.offload.tensorParallel > 1")


def test_ranks_go_to_the_pairs_whose_disks_already_hold_their_shards():
    """Four pairs on four disks, shard 0 staged on nvme2 and shard 1 on nvme3 (an earlier job's cut): rank 0 takes
    GPU 2 and rank 1 GPU 3, so no shard is staged a second time and none of their space is reserved again; with
    the shards the other way round (shard 0 on nvme3) the ranks follow them."""
    four = ((0, "nvme0"), (1, "nvme1"), (2, "nvme2"), (3, "nvme3"))

    def on(k, disk):
        return {**shard(k), "gpu": int(disk[-1]), "disk": disk, "path": f"/mnt/{disk}/kubeflash/shards/{MODEL}.tp2/{k}"}

    body = disk_node(pairs=four, free=(30 * GiB,) * 4, shards=[on(0, "nvme2"), on(1, "nvme3")])
    claim = placed("a", "10Gi", world(body)).claim
    assert (claim.gpus, claim.disks) == ((2, 3), ("nvme2", "nvme3"))
    assert claim.held(node_view(body)) == {"nvme2": 10 * GiB, "nvme3": 10 * GiB}
    body = disk_node(pairs=four, free=(30 * GiB,) * 4, shards=[on(0, "nvme3"), on(1, "nvme2")])
    claim = placed("a", "10Gi", world(body)).claim
    assert (claim.gpus, claim.disks) == ((3, 2), ("nvme3", "nvme2"))
