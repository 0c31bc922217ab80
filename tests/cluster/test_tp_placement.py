"""A tensor-parallel InferenceJob against a real control plane (KWOK nodes, the operator in-process): with
spec.offload.tensorParallel 2 on a node with two GPU<->SSD pairs, the operator asks the FlashNode for the model with
tensorParallel 2, keeps the job in Staging (showing shard progress) until the test, playing the agent, reports both
shards Ready in the FlashNode status (an entry for the model already there without tensorParallel gains it), then
runs a pod holding 2 GPUs, both shard volumes and a KV volume per pair."""

from __future__ import annotations

from test_operator import MODEL, MODEL_URI, crds, kube, now_rfc, ns, operator, wait_for  # noqa: F401  (fixtures)


def shards(states: tuple[str, str]) -> list[dict]:
    return [{"rank": k, "gpu": k, "disk": f"nvme{k}", "path": f"/mnt/nvme{k}/kubeflash/shards/{MODEL}.tp2/{k}",
             "state": state, "bytes": 1 << 20, "progress": 100.0 if state == "Ready" else 50.0}
            for k, state in enumerate(states)]


def model_row(states: tuple[str, str] | None) -> dict:
    row = {"id": MODEL, "uri": MODEL_URI, "disk": "nvme0", "state": "Ready", "bytes": 1 << 30}
    return row if states is None else {**row, "tensorParallel": 2, "shards": shards(states)}


def test_tensor_parallel_job_waits_for_both_shards_then_runs_on_two_pairs(ns, kube, control_plane):  # noqa: F811
    node = kube.gpu_node(control_plane, "two", pairs=2, models=(MODEL,))
    # the model is already wanted there without shards (as a one-GPU job asks for it): the entry gains tensorParallel
    kube.custom.patch_cluster_custom_object("kubeflash.io", "v1alpha1", "flashnodes", node, {"spec": {"models": [
        {"id": MODEL, "uri": MODEL_URI, "dtype": "float16", "quantization": "none", "disk": "nvme0"}]}})
    kube.settle()
    kube.submit("tp", offload={"tensorParallel": 2})
    s = kube.wait_phase("tp", "Staging")
    assert (s["node"], s["gpus"]) == (node, [0, 1])
    entry = wait_for("the model asked with tensorParallel 2", lambda: kube.flashnode(node)["spec"].get("models") or [],
                     lambda ms: any(m["id"] == MODEL and m.get("tensorParallel") == 2 for m in ms))
    assert [(m["id"], m["disk"]) for m in entry] == [(MODEL, "nvme0")]  # the same entry, not a second one
    kube.agent_status(node, {"heartbeat": now_rfc(), "models": [model_row(("Ready", "Staging"))]})
    s = wait_for("shard progress in the message", lambda: kube.status("tp"),
                 lambda s: "shards 1/2 Ready" in (s.get("message") or ""))
    assert s["phase"] == "Staging" and "shard 1 staging 50%" in s["message"] and kube.pods("tp") == []
    kube.agent_status(node, {"heartbeat": now_rfc(), "models": [model_row(("Ready", "Ready"))]})
    s = kube.wait_phase("tp", "Running")
    pod = wait_for("pod bound", lambda: kube.pods("tp"), lambda ps: ps and ps[0]["spec"].get("nodeName"))[0]
    assert pod["spec"]["nodeName"] == node
    ctr = pod["spec"]["containers"][0]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "2" == ctr["resources"]["requests"]["nvidia.com/gpu"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    for k in (0, 1):
        assert volumes[f"shard-{k}"]["csi"]["volumeAttributes"] == {
            "kubeflash.io/model-id": MODEL, "kubeflash.io/shard": str(k), "kubeflash.io/tensor-parallel": "2",
            "kubeflash.io/disk": f"nvme{k}"}
        assert volumes[f"shard-{k}"]["csi"]["readOnly"] is True
        assert (mounts[f"shard-{k}"]["mountPath"], mounts[f"shard-{k}"]["readOnly"]) == (f"/shards/{k}", True)
    assert volumes["kv"]["csi"]["volumeAttributes"]["kubeflash.io/disk"] == "nvme0"
    assert volumes["kv-1"]["csi"]["volumeAttributes"]["kubeflash.io/disk"] == "nvme1"
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert (env["KUBEFLASH_SHARD_DIRS"], env["KUBEFLASH_RANK_DIRS"]) == ("/shards/0:/shards/1", "/job:/ranks/1")


def test_gpus_two_without_tensor_parallel_runs_two_ranks_on_two_pairs(ns, kube, control_plane):  # noqa: F811
    """resources.gpus 2 with tensorParallel left out, through the real API server: on a node with one pair it waits
    (Pending, the reason says 1 free pair, needs 2); on a node with two pairs it asks the FlashNode for 2 shards,
    and once they are Ready runs a pod with 2 GPUs, shard k and a KV volume on pair k's disk, and tensorParallel 2
    in the spec the engine reads (KUBEFLASH_JOB_SPEC)."""
    import json

    kube.gpu_node(control_plane, "one", pairs=1, models=(MODEL,))
    kube.settle()
    kube.submit("g2", resources={"gpus": 2})
    s = wait_for("the reason for no placement", lambda: kube.status("g2"),
                 lambda s: "1 free GPU<->SSD pairs, needs 2" in (s.get("message") or ""))
    assert s.get("phase") in (None, "Pending") and kube.pods("g2") == []
    node = kube.gpu_node(control_plane, "two", pairs=2, models=(MODEL,))
    s = kube.wait_phase("g2", "Staging")
    assert (s["node"], s["gpus"]) == (node, [0, 1])
    wait_for("the model asked with tensorParallel 2", lambda: kube.flashnode(node)["spec"].get("models") or [],
             lambda ms: any(m["id"] == MODEL and m.get("tensorParallel") == 2 for m in ms))
    kube.agent_status(node, {"heartbeat": now_rfc(), "models": [model_row(("Ready", "Ready"))]})
    kube.wait_phase("g2", "Running")
    pod = wait_for("pod bound", lambda: kube.pods("g2"), lambda ps: ps and ps[0]["spec"].get("nodeName"))[0]
    ctr = pod["spec"]["containers"][0]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "2"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for k, kv in ((0, "kv"), (1, "kv-1")):
        assert volumes[f"shard-{k}"]["csi"]["volumeAttributes"]["kubeflash.io/disk"] == f"nvme{k}"
        assert volumes[kv]["csi"]["volumeAttributes"]["kubeflash.io/disk"] == f"nvme{k}"
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert json.loads(env["KUBEFLASH_JOB_SPEC"])["offload"]["tensorParallel"] == 2
