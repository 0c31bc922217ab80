"""spec.parallelism against a real control plane (the operator under KopfRunner, KWOK nodes, the test playing the
node agent and the kubelet, as in test_operator.py): a parallelism-3 job becomes 3 shard InferenceJobs placed on
distinct GPU<->SSD pairs, each carrying only its own inline prompts; its status sums them up (a bounded summary
and summed progress), it Succeeds when every shard's pod has, and deleting it deletes the shards (owner
references, garbage collector). With spec.output.configMap the shards' ConfigMaps (filled by the test as the agent
would) are merged into the parent's in input order; merged results over 1 MiB fail the job (OutputTooLarge,
naming the field and the size) and write no merged ConfigMap. With spec.output.pvc each shard writes its own part
file (spec.output.path <path>.part-<k>-of-<N>) and, once all have Succeeded, the operator creates one merge pod
(`kubeflash merge` on the claim): the parent is Succeeded when it is, Failed with its message when it fails; an
output path without a claim is refused naming the field. A shard whose node is lost (its FlashNode gone: the
agent no longer serves it) is placed again on another node and the parent still Succeeds."""

from __future__ import annotations

import json

from test_operator import MODEL, crds, kube, ns, operator, wait_for  # noqa: F401  (fixtures)

from kubeflash_api.sharding import shard_of


def test_parallel_job_runs_as_shard_jobs_on_distinct_pairs(ns, kube, control_plane):  # noqa: F811
    for k in range(3):
        kube.gpu_node(control_plane, f"n{k}", models=(MODEL,))
    kube.settle()
    kube.submit("big", parallelism=3, input={"prompts": [f"question {i}" for i in range(9)]})
    shards = [f"big-s{k}" for k in range(3)]
    placed = [kube.wait_phase(name, "Running") for name in shards]
    assert len({(s["node"], s["gpu"], s["disk"]) for s in placed}) == 3
    assert not kube.status("big").get("node") and not kube.pods("big")  # the parent itself is never placed
    for k, name in enumerate(shards):
        spec, meta = kube.job(name)["spec"], kube.job(name)["metadata"]
        own = [i for i in range(9) if shard_of(f"prompt-{i}", 3) == k]  # only its own prompts travel
        assert spec["shard"] == {"index": k, "count": 3, "promptIndex": own} and spec.get("parallelism", 1) == 1
        assert spec["input"]["prompts"] == [f"question {i}" for i in own]
        assert meta["ownerReferences"][0]["uid"] == kube.job("big")["metadata"]["uid"]
    s = wait_for("parent summary", lambda: kube.status("big"), lambda s: (s.get("shards") or {}).get("running") == 3)
    assert s["phase"] == "Running" and s["shards"]["total"] == 3
    for name in shards:
        kube.end_pod(f"{name}-1", "Succeeded")
    s = kube.wait_phase("big", "Succeeded")
    assert s["shards"] == {"total": 3, "pending": 0, "running": 0, "succeeded": 3, "failed": 0}
    assert s["completionTime"]
    kube.delete_job("big")
    wait_for("shard jobs deleted with the parent", lambda: [n for n in shards if kube.job(n) is not None],
             lambda left: not left, timeout=60)


def test_a_lost_nodes_shard_is_placed_again_elsewhere_and_the_parent_completes(ns, kube, control_plane):  # noqa: F811
    nodes = [kube.gpu_node(control_plane, f"l{k}", models=(MODEL,)) for k in range(3)]
    kube.settle()
    kube.submit("lost", parallelism=2, input={"prompts": [f"question {i}" for i in range(6)]})
    shards = ["lost-s0", "lost-s1"]
    placed = {name: kube.wait_phase(name, "Running") for name in shards}
    gone = placed["lost-s0"]["node"]
    assert gone in nodes and placed["lost-s1"]["node"] != gone
    kube.custom.delete_cluster_custom_object("kubeflash.io", "v1alpha1", "flashnodes", gone)  # the agent is gone
    moved = wait_for("shard lost-s0 running on another node", lambda: kube.status("lost-s0"),
                     lambda s: s.get("phase") == "Running" and s.get("node") not in (None, gone), timeout=60)
    assert moved["node"] in nodes and moved["pod"] != placed["lost-s0"]["pod"]
    assert [a["reason"] for a in moved.get("attempts") or []] == ["NodeLost"], moved
    assert kube.status("lost")["phase"] == "Running"
    for name in shards:
        kube.end_pod(kube.status(name)["pod"], "Succeeded")
    s = kube.wait_phase("lost", "Succeeded")
    assert s["shards"] == {"total": 2, "pending": 0, "running": 0, "succeeded": 2, "failed": 0}


def _claim(api, space: str, name: str) -> str:
    """A bound ReadWriteMany claim (a static PersistentVolume, no provisioner needed); returns the PV's name."""
    pv = f"{space}-{name}"
    api.core.create_persistent_volume({"metadata": {"name": pv}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "hostPath": {"path": f"/tmp/{pv}"},
        "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
        "claimRef": {"namespace": space, "name": name}}})
    api.core.create_namespaced_persistent_volume_claim(space, {"metadata": {"name": name}, "spec": {
        "accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
        "resources": {"requests": {"storage": "1Gi"}}}})
    return pv


def test_an_output_claim_gets_part_files_then_a_merge_pod(ns, kube, control_plane):  # noqa: F811
    for k in range(2):
        kube.gpu_node(control_plane, f"p{k}", models=(MODEL,))
    kube.settle()
    pv = _claim(kube, ns, "results")
    try:
        kube.submit("bad", parallelism=2, output={"path": "r.jsonl"})  # no claim: the shards' nodes differ
        s = kube.wait_phase("bad", "Failed")
        assert s["reason"] == "InvalidSpec" and "spec.output.path" in s["message"] and "spec.output.pvc" in s["message"]
        assert kube.job("bad-s0") is None
        for job in ("claim", "broken"):
            kube.submit(job, parallelism=2, input={"prompts": [f"q{i}" for i in range(4)]},
                        output={"pvc": {"claimName": "results"}, "path": f"{job}.jsonl"})
            for k in range(2):
                spec = kube.wait_phase(f"{job}-s{k}", "Running") and kube.job(f"{job}-s{k}")["spec"]
                assert spec["output"] == {"pvc": {"claimName": "results"}, "path": f"{job}.jsonl.part-{k}-of-2"}
            assert kube.status(job)["phase"] == "Running" and not _pod(kube, ns, f"{job}-merge")
            kube.core.patch_namespaced_pod(f"{job}-s0-1", ns, {"spec": {"containers": [  # as --engine-image sets it
                {"name": "engine", "image": "registry.example/kubeflash:shards"}]}})
            for k in range(2):
                kube.end_pod(f"{job}-s{k}-1", "Succeeded")
            merging = wait_for("merge pod", lambda j=job: kube.status(j), lambda s: s.get("reason") == "MergingResults")
            assert merging["phase"] == "Running" and f"pod {job}-merge" in merging["message"]
            pod = _pod(kube, ns, f"{job}-merge")
            assert pod.spec.containers[0].command == ["kubeflash", "merge"]
            assert pod.spec.containers[0].image == "registry.example/kubeflash:shards"  # the image the shards ran
            assert [v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim] \
                == ["results"]
            assert pod.metadata.owner_references[0].uid == kube.job(job)["metadata"]["uid"]
        kube.end_pod("claim-merge", "Succeeded")
        s = kube.wait_phase("claim", "Succeeded")
        assert s["shards"]["succeeded"] == 2 and s["completionTime"]
        kube.core.patch_namespaced_pod_status("broken-merge", ns, {"status": {"phase": "Failed", "containerStatuses": [
            {"name": "merge", "image": "x", "imageID": "", "ready": False, "restartCount": 0, "state": {"terminated": {
                "exitCode": 1, "reason": "Error", "message": "kubeflash merge: error: broken.jsonl.part-1-of-2: "
                                                            "does not exist"}}}]}})
        s = kube.wait_phase("broken", "Failed")
        assert s["reason"] == "ResultsNotMerged" and "part-1-of-2: does not exist" in s["message"], s
        assert "spec.output.path broken.jsonl" in s["message"]
    finally:
        for job in ("claim", "broken"):
            kube.delete_job(job)
        kube.core.delete_persistent_volume(pv)


def _pod(api, space: str, name: str):
    try:
        return api.core.read_namespaced_pod(name, space)
    except Exception:  # noqa: BLE001  (absent)
        return None


def test_shard_results_merge_into_the_parents_configmap_in_input_order(ns, kube, control_plane):  # noqa: F811
    for k in range(2):
        kube.gpu_node(control_plane, f"m{k}", models=(MODEL,))
    kube.settle()
    ids = [f"prompt-{i}" for i in range(6)]
    kube.submit("cm", parallelism=2, input={"prompts": [f"q{i}" for i in range(6)]},
                output={"configMap": {"name": "res"}})
    for k in range(2):
        kube.wait_phase(f"cm-s{k}", "Running")
        mine = [cid for cid in ids if shard_of(cid, 2) == k]
        text = "".join(json.dumps({"custom_id": cid, "response": {"shard": k}}) + "\n" for cid in reversed(mine))
        kube.core.patch_namespaced_config_map(f"res-s{k}", ns, {"data": {"results.jsonl": text}})  # as the agent
        kube.end_pod(f"cm-s{k}-1", "Succeeded")
    s = kube.wait_phase("cm", "Succeeded")
    assert s["shards"]["succeeded"] == 2
    merged = kube.core.read_namespaced_config_map("res", ns)
    assert [json.loads(x)["custom_id"] for x in merged.data["results.jsonl"].splitlines()] == ids
    assert merged.metadata.owner_references[0].uid == kube.job("cm")["metadata"]["uid"]
    assert merged.metadata.labels["kubeflash.io/job"] == "cm"  # the chart's policy: the operator's own objects only


def test_merged_results_over_1_mib_fail_the_job_naming_the_field_and_write_nothing(ns, kube, control_plane):  # noqa: F811
    for k in range(2):
        kube.gpu_node(control_plane, f"c{k}", models=(MODEL,))
    kube.settle()
    ids = [f"prompt-{i}" for i in range(6)]
    kube.submit("huge", parallelism=2, input={"prompts": [f"q{i}" for i in range(6)]},
                output={"configMap": {"name": "big-res"}})
    for k in range(2):  # each shard's part fits in its own ConfigMap (about 600 KB); the two together do not
        kube.wait_phase(f"huge-s{k}", "Running")
        mine = [cid for cid in ids if shard_of(cid, 2) == k]
        pad = "y" * (600_000 // len(mine))
        text = "".join(json.dumps({"custom_id": cid, "response": {"text": pad}}) + "\n" for cid in mine)
        kube.core.patch_namespaced_config_map(f"big-res-s{k}", ns, {"data": {"results.jsonl": text}})
        kube.end_pod(f"huge-s{k}-1", "Succeeded")
    s = kube.wait_phase("huge", "Failed")
    assert s["reason"] == "OutputTooLarge", s
    assert s["message"].startswith("spec.output.configMap") and "ConfigMap big-res would be 12" in s["message"]
    names = [c.metadata.name for c in kube.core.list_namespaced_config_map(ns).items]
    assert "big-res" not in names and {"big-res-s0", "big-res-s1"} <= set(names)  # never a half-written one
