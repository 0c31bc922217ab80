"""The inference pod manifest: identity, pinning, GPUs, mounts and an unprivileged container (docs/contract.md)."""

from __future__ import annotations

import json

import pytest

from kubeflash_api import from_canonical, parse_job_spec
from kubeflash_operator.builder import JobRef, PodLimits, PodTarget, build_pod, image_refusal, pod_name

from operator_factories import job_spec

JOB = JobRef(namespace="team-a", name="summarize", uid="uid-123")
TARGET = PodTarget(node="gpu-node-1", gpus=(1,), disk="nvme1", disk_path="/mnt/nvme1/kubeflash", model_id="m-1",
                   model_disk="nvme1", model_disk_path="/mnt/nvme1/kubeflash/")


def pod(attempt=1, target=TARGET, allowed_images=(), limits=PodLimits(), **spec_overrides):
    raw = job_spec(**spec_overrides)
    spec = parse_job_spec(raw, name=JOB.name, namespace=JOB.namespace)
    return build_pod(JOB, spec, target, attempt=attempt, default_image="img:default", allowed_images=allowed_images,
                     limits=limits)


def container(manifest):
    return manifest["spec"]["containers"][0]


def env(manifest):
    return {e["name"]: e["value"] for e in container(manifest)["env"]}


def test_name_labels_and_owner():
    """Deterministic name <job>-<attempt>, the five labels, and a controller owner reference to the job."""
    p = pod(attempt=3)
    meta = p["metadata"]
    assert (meta["name"], meta["namespace"]) == ("summarize-3", "team-a")
    assert meta["labels"] == {
        "app.kubernetes.io/name": "kubeflash", "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/managed-by": "kubeflash-operator", "app.kubernetes.io/instance": "summarize",
        "kubeflash.io/job": "summarize",
    }
    assert meta["ownerReferences"] == [{"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob",
                                        "name": "summarize", "uid": "uid-123", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert meta["annotations"]["kubeflash.io/gpus"] == "1" and meta["annotations"]["kubeflash.io/attempt"] == "3"


def test_pinned_to_the_placed_node_by_required_affinity():
    """requiredDuringScheduling node affinity with matchFields metadata.name In [node]."""
    terms = pod()["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-1"]}]}]


@pytest.mark.parametrize("gpus", [1, 4], ids=["one", "four"])
def test_gpu_limit_follows_spec(gpus):
    """nvidia.com/gpu limit (and request) equal spec.resources.gpus."""
    res = container(pod(resources={"gpus": gpus}))["resources"]
    assert res["limits"]["nvidia.com/gpu"] == str(gpus) and res["requests"]["nvidia.com/gpu"] == str(gpus)


def test_cpu_memory_sets_the_memory_request_and_limit():
    """resources.cpuMemory (pinned host memory for offload) plus the process overhead is both the memory request
    and the limit, in bytes: the pod gets what it plans with and never more."""
    res = container(pod(resources={"cpuMemory": "64Gi"}, limits=PodLimits(memory_overhead="1Gi")))["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == str(65 << 30)


def test_every_pod_has_cpu_memory_and_ephemeral_storage_requests_and_limits():
    """Without spec.resources.cpuMemory the operator's defaults apply; CPU, memory and ephemeral storage each have a
    request and a limit (the issue-17 finding: engine pods had none), GPUs stay request = limit."""
    res = container(pod(limits=PodLimits(cpu_request="2", cpu_limit="6", memory="8Gi",
                                         ephemeral_storage="1Gi")))["resources"]
    assert res["requests"] == {"nvidia.com/gpu": "1", "cpu": "2", "memory": "8Gi", "ephemeral-storage": "1Gi"}
    assert res["limits"] == {"nvidia.com/gpu": "1", "cpu": "6", "memory": "8Gi", "ephemeral-storage": "1Gi"}


def test_no_cpu_limit_when_configured_empty():
    """engine_cpu_limit "" leaves CPU unlimited (a request is still set); memory and storage stay limited."""
    res = container(pod(limits=PodLimits(cpu_limit="")))["resources"]
    assert "cpu" not in res["limits"] and res["requests"]["cpu"] == PodLimits().cpu_request
    assert {"memory", "ephemeral-storage"} <= set(res["limits"])


def test_model_job_and_kv_are_csi_inline_volumes_on_the_pair_disk():
    """The model mounts read-only at KUBEFLASH_MODEL_DIR, the job dir at /job and a KV space of exactly
    resources.kvDisk at /job/kv, all three CSI inline volumes of kubeflash.io naming their disk; no hostPath."""
    p = pod(resources={"kvDisk": "20Gi"})
    volumes = {v["name"]: v for v in p["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container(p)["volumeMounts"]}
    assert volumes["model"]["csi"] == {"driver": "kubeflash.io", "readOnly": True, "volumeAttributes": {
        "kubeflash.io/model-id": "m-1", "kubeflash.io/disk": "nvme1"}}
    assert mounts["model"] == {"name": "model", "mountPath": "/models/m-1", "readOnly": True}
    assert env(p)["KUBEFLASH_MODEL_DIR"] == mounts["model"]["mountPath"]
    assert volumes["job"]["csi"]["volumeAttributes"] == {"kubeflash.io/job": "summarize", "kubeflash.io/disk": "nvme1"}
    assert mounts["job"]["mountPath"] == env(p)["KUBEFLASH_JOB_DIR"] == "/job" and not mounts["job"].get("readOnly")
    assert volumes["kv"]["csi"]["volumeAttributes"] == {"kubeflash.io/kv-size": str(20 << 30),
                                                        "kubeflash.io/disk": "nvme1"}
    assert volumes["kv"]["csi"]["readOnly"] is False and mounts["kv"]["mountPath"] == "/job/kv"
    assert not [v for v in p["spec"]["volumes"] if "hostPath" in v]


def test_model_on_another_disk_than_the_pair():
    """A model staged on another disk of the node is asked for on that disk; the job's spaces stay on the pair's."""
    other = PodTarget(node="n", gpus=(0,), disk="nvme0", disk_path="/var/lib/kubeflash", model_id="m-2",
                      model_disk="nvme1", model_disk_path="/mnt/nvme1/kubeflash")
    volumes = {v["name"]: v["csi"]["volumeAttributes"] for v in pod(target=other)["spec"]["volumes"] if "csi" in v}
    assert volumes["model"]["kubeflash.io/disk"] == "nvme1"
    assert volumes["job"]["kubeflash.io/disk"] == volumes["kv"]["kubeflash.io/disk"] == "nvme0"


def test_csi_volume_attributes_are_what_the_driver_parses():
    """The operator's volumes pass the CSI driver's own attribute check (kubeflash_node.csi.attrs)."""
    attrs = pytest.importorskip("kubeflash_node.csi.attrs")
    target = TARGET.__class__(**{**TARGET.__dict__, "model_id": "smollm2-135m-0123456789abcdef",
                                 "kv_cache_budget": 8 << 30})
    volumes = pod(target=target, cache={"prefix": True})["spec"]["volumes"]
    assert "kvcache" in [v["name"] for v in volumes]
    for v in volumes:
        if "csi" in v:
            ctx = {**v["csi"]["volumeAttributes"], "csi.storage.k8s.io/pod.namespace": JOB.namespace}
            req = attrs.parse_request("vol", "/t", ctx, read_only=v["csi"]["readOnly"])
            assert req.kind == {"model": "model", "job": "job", "kv": "kv", "kvcache": "cache"}[v["name"]]


def test_prefix_cache_mounts_the_nodes_cache_of_the_model_and_tells_the_engine():
    """spec.cache.prefix on a node whose agent keeps a cache: a read-write kubeflash.io/kv-cache volume of the job's
    model on the pair's disk, its mount in KUBEFLASH_KV_CACHE_DIR and the agent's budget in KUBEFLASH_KV_CACHE_BUDGET;
    without the field, or on a node without a cache, neither (the job then reuses prefixes among its own prompts)."""
    target = PodTarget(**{**TARGET.__dict__, "kv_cache_budget": 8 << 30})
    p = pod(target=target, cache={"prefix": True})
    volumes = {v["name"]: v for v in p["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container(p)["volumeMounts"]}
    assert volumes["kvcache"]["csi"] == {"driver": "kubeflash.io", "readOnly": False, "volumeAttributes": {
        "kubeflash.io/kv-cache": "m-1", "kubeflash.io/disk": "nvme1"}}
    assert env(p)["KUBEFLASH_KV_CACHE_DIR"] == mounts["kvcache"]["mountPath"] == "/kvcache"
    assert env(p)["KUBEFLASH_KV_CACHE_BUDGET"] == str(8 << 30)
    assert not mounts["kvcache"].get("readOnly")
    for p in (pod(target=target), pod(cache={"prefix": True})):
        assert "kvcache" not in {v["name"] for v in p["spec"]["volumes"]}
        assert not {"KUBEFLASH_KV_CACHE_DIR", "KUBEFLASH_KV_CACHE_BUDGET"} & set(env(p))


def test_runs_unprivileged_without_a_token():
    """No service-account token, non-root uid 1000, read-only root filesystem, every capability dropped."""
    p = pod()
    spec, sc = p["spec"], container(p)["securityContext"]
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in container(p)["volumeMounts"]  # writable scratch


def test_env_carries_the_contract():
    """command `kubeflash engine`; the canonical spec (every default filled in) as JSON, job identity, model dir
    and job dir in the environment; the pod reads back exactly the JobSpec the operator parsed."""
    p = pod()
    e = env(p)
    assert container(p)["command"] == ["kubeflash", "engine"]
    canonical = json.loads(e["KUBEFLASH_JOB_SPEC"])
    assert canonical["generation"]["topP"] == 1.0 and canonical["resources"]["kvDisk"] == 10 << 30
    parsed = parse_job_spec(job_spec(), name=JOB.name, namespace=JOB.namespace)
    assert from_canonical(canonical, name=JOB.name, namespace=JOB.namespace) == parsed
    assert (e["KUBEFLASH_JOB_NAME"], e["KUBEFLASH_JOB_NAMESPACE"]) == ("summarize", "team-a")
    assert (e["KUBEFLASH_MODEL_DIR"], e["KUBEFLASH_JOB_DIR"]) == ("/models/m-1", "/job")
    assert "KUBEFLASH_INPUT_FILE" not in e and "KUBEFLASH_OUTPUT_DIR" not in e
    assert e["KUBEFLASH_DEVICE"] == "auto"


def test_engine_device_is_passed_to_the_pod():
    """The operator's --engine-device becomes the engine's KUBEFLASH_DEVICE (kind forces cpu)."""
    raw = job_spec()
    p = build_pod(JOB, parse_job_spec(raw, name=JOB.name, namespace=JOB.namespace), TARGET, attempt=1, device="cpu")
    assert env(p)["KUBEFLASH_DEVICE"] == "cpu"


@pytest.mark.parametrize(("inp", "volume", "path"), [
    ({"configMap": {"name": "prompts", "key": "batch.jsonl"}},
     {"name": "input", "configMap": {"name": "prompts", "items": [{"key": "batch.jsonl", "path": "batch.jsonl"}]}},
     "/input/batch.jsonl"),
    ({"file": "runs/a.jsonl", "pvc": {"claimName": "data"}},
     {"name": "input", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}}, "/input/runs/a.jsonl"),
], ids=["configmap", "pvc-file"])
def test_input_mounted_read_only(inp, volume, path):
    """A configMap or PVC input is mounted read-only at /input and named by KUBEFLASH_INPUT_FILE."""
    p = pod(input=inp)
    assert volume in p["spec"]["volumes"]
    assert {"name": "input", "mountPath": "/input", "readOnly": True} in container(p)["volumeMounts"]
    assert env(p)["KUBEFLASH_INPUT_FILE"] == path


def test_output_pvc_mounted_writable():
    """output.pvc mounts at /output, KUBEFLASH_OUTPUT_DIR points at the claim's root; output.path travels in the
    canonical spec (the engine resolves it inside the root)."""
    p = pod(output={"pvc": {"claimName": "results"}, "path": "run1/out.jsonl"})
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "results"}} in p["spec"]["volumes"]
    assert env(p)["KUBEFLASH_OUTPUT_DIR"] == "/output"
    assert json.loads(env(p)["KUBEFLASH_JOB_SPEC"])["output"]["path"] == "run1/out.jsonl"


@pytest.mark.parametrize(("image", "allowed", "expected"), [
    (None, (), "img:default"),
    ("img:default", (), "img:default"),
    ("mine:1", ("mine:1",), "mine:1"),
    ("reg.example/team/eng@sha256:" + "a" * 64, ("reg.example/team/*",), "reg.example/team/eng@sha256:" + "a" * 64),
], ids=["operator-default", "default-named", "listed", "prefix"])
def test_image_allowed(image, allowed, expected):
    """spec.image runs only when it is the operator's engine image or on the admin's allowlist."""
    overrides = {"image": image} if image else {}
    assert container(pod(allowed_images=allowed, **overrides))["image"] == expected


@pytest.mark.parametrize(("image", "allowed"), [
    ("mine:1", ()),
    ("mine:2", ("mine:1",)),
    ("reg.example/teamx/eng:1", ("reg.example/team/*",)),  # a prefix is a prefix of the whole reference
    ("evil.example/img:1", ("reg.example/team/*",)),
], ids=["default-only", "other-tag", "sibling-repo", "other-registry"])
def test_image_not_allowed_is_refused_naming_spec_image(image, allowed):
    """Any other image is refused before a pod exists, with an error naming spec.image and the allowed images."""
    with pytest.raises(ValueError, match=r"^spec\.image: .* is not an allowed image; the cluster admin allows img:default"):
        pod(allowed_images=allowed, image=image)
    assert image_refusal(image, "img:default", allowed).startswith("spec.image")


def test_multi_gpu_target_lists_all_gpus():
    """A job holding several pairs tells the engine which GPUs through KUBEFLASH_GPUS."""
    target = PodTarget("n", (2, 0), "nvme2", "/d2", "m", "nvme2", "/d2")
    assert env(pod(target=target, resources={"gpus": 2}))["KUBEFLASH_GPUS"] == "2,0"


def test_rejects_bad_attempt_and_long_names():
    """Attempts start at 1; job names longer than 56 characters cannot make label-safe pod names."""
    with pytest.raises(ValueError, match="attempt must be >= 1"):
        pod_name("j", 0)
    raw = job_spec()
    with pytest.raises(ValueError, match="at most 56"):
        build_pod(JobRef("ns", "x" * 57, "u"), parse_job_spec(raw, name="x", namespace="ns"), TARGET, attempt=1)


def test_probe_reaches_the_engine_only_when_measured():
    """KUBEFLASH_PROBE: the placed pair's measured bandwidths as JSON; absent when the agent measured none."""
    from dataclasses import replace

    probed = replace(TARGET, probe=(("diskReadGBps", 1.4), ("h2dGBps", 53.0)))
    assert json.loads(env(pod(target=probed))["KUBEFLASH_PROBE"]) == {"diskReadGBps": 1.4, "h2dGBps": 53.0}
    assert "KUBEFLASH_PROBE" not in env(pod())
