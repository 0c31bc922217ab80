"""spec.output.pvc with spec.parallelism, the operator's half without a cluster: each shard job writes its own
part file (<path>.part-<k>-of-<N>) on the claim; the merge pod the operator creates once all shards Succeeded runs
`kubeflash merge` with the parent's canonical spec, mounts the claim (and the input ConfigMap or claim, for the
input order), holds no GPU and no API token and passes Pod Security restricted; what it reports (a real V1Pod)
becomes the parent's state: merging, done, or failed with its termination message; the cluster check asks for a
claim when spec.output.path is given with parallelism."""

from __future__ import annotations

import json

import pytest
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodStatus,
)

from kubeflash_api import SpecError, from_canonical, parse_job_spec
from kubeflash_api.inferencejob import check_cluster
from kubeflash_operator.shards import child_body, merge_pod, merge_pod_name, merge_pod_state

SPEC = {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["a", "b", "c"]}, "parallelism": 3,
        "output": {"pvc": {"claimName": "results"}, "path": "out/r.jsonl"}}


def test_each_shard_writes_its_own_part_file_on_the_claim():
    for k in range(3):
        spec = child_body(namespace="ns", parent="big", uid="u", spec=SPEC, index=k, count=3)["spec"]
        assert spec["output"] == {"pvc": {"claimName": "results"}, "path": f"out/r.jsonl.part-{k}-of-3"}
        check_cluster(parse_job_spec(spec, name=f"big-s{k}", namespace="ns"))
    default = {**SPEC, "output": {"pvc": {"claimName": "results"}}}
    spec = child_body(namespace="ns", parent="big", uid="u", spec=default, index=2, count=3)["spec"]
    assert spec["output"]["path"] == "big.results.jsonl.part-2-of-3"
    assert SPEC["output"]["path"] == "out/r.jsonl"  # the parent's untouched


def test_the_cluster_check_wants_a_claim_for_an_output_path_with_parallelism():
    check_cluster(parse_job_spec(SPEC, name="big", namespace="ns"))
    with pytest.raises(SpecError, match=r"spec\.output\.path.*spec\.output\.pvc"):
        check_cluster(parse_job_spec({**SPEC, "output": {"path": "r.jsonl"}}, name="big", namespace="ns"))


def _pod(spec: dict) -> dict:
    return merge_pod(namespace="ns", parent="big", uid="u1", spec=parse_job_spec(spec, name="big", namespace="ns"),
                     image="img:1")


def test_the_merge_pod_mounts_the_claim_runs_kubeflash_merge_and_is_restricted():
    pod = _pod({**SPEC, "input": {"configMap": {"name": "in", "key": "batch.jsonl"}}})
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == merge_pod_name("big") == "big-merge"
    assert meta["labels"]["kubeflash.io/job"] == "big" and meta["ownerReferences"][0]["uid"] == "u1"
    box = spec["containers"][0]
    assert (box["image"], box["command"]) == ("img:1", ["kubeflash", "merge"])
    env = {e["name"]: e["value"] for e in box["env"]}
    parent = from_canonical(json.loads(env["KUBEFLASH_JOB_SPEC"]), name=env["KUBEFLASH_JOB_NAME"], namespace="ns")
    assert parent.parallelism == 3 and parent.output.path == "out/r.jsonl"
    assert (env["KUBEFLASH_OUTPUT_DIR"], env["KUBEFLASH_INPUT_FILE"]) == ("/output", "/input/batch.jsonl")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "results"}
    assert volumes["input"]["configMap"]["name"] == "in"
    assert "nvidia.com/gpu" not in json.dumps(box["resources"]) and spec["automountServiceAccountToken"] is False
    sc = box["securityContext"]  # Pod Security "restricted"
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"]
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert "hostPath" not in json.dumps(spec) and "affinity" not in spec
    inline = _pod(SPEC)
    assert "KUBEFLASH_INPUT_FILE" not in {e["name"] for e in inline["spec"]["containers"][0]["env"]}


def _state(phase: str, message: str | None = None):
    term = V1ContainerStateTerminated(exit_code=1, message=message, reason="Error") if phase == "Failed" else None
    status = V1PodStatus(phase=phase, container_statuses=[V1ContainerStatus(
        name="merge", image="img:1", image_id="", ready=False, restart_count=0,
        state=V1ContainerState(terminated=term))])
    return merge_pod_state(V1Pod(metadata=V1ObjectMeta(name="big-merge"), status=status), "big", "out/r.jsonl")


def test_what_the_merge_pod_says_becomes_the_parents_state():
    assert _state("Succeeded") is None
    assert _state("Running") == "merging the shards' part files into spec.output.path out/r.jsonl (pod big-merge, Running)"
    failed = _state("Failed", "kubeflash merge: error: /output/out/r.jsonl.part-1-of-3: does not exist\n")
    assert failed.startswith("!merging the shards' part files into spec.output.path out/r.jsonl failed (pod big-merge)")
    assert failed.endswith("part-1-of-3: does not exist")
