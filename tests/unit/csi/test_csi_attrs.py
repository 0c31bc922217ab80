"""The CSI driver's pure parts without root: volume attributes to a checked request (the CSI code each mistake
gets, and that the message names the attribute), and /proc/self/mountinfo parsing with escaped paths."""

from __future__ import annotations

import grpc
import pytest

from kubeflash_node.csi.attrs import parse_request
from kubeflash_node.csi.errors import CsiError
from kubeflash_node.csi.mounts import parse_mountinfo

MID = "tiny-0123456789abcdef"


def test_model_request_is_always_read_only():
    req = parse_request("v", "/t", {"kubeflash.io/model-id": MID, "csi.storage.k8s.io/ephemeral": "true"},
                        read_only=False)
    assert (req.kind, req.model_id, req.read_only) == ("model", MID, True)


def test_kv_size_quantities():
    assert parse_request("v", "/t", {"kubeflash.io/kv-size": "8Gi"}, read_only=False).size == 8 << 30
    assert parse_request("v", "/t", {"kubeflash.io/kv-size": "1e9"}, read_only=False).size == 10**9
    assert parse_request("v", "/t", {"kubeflash.io/kv-size": str(20 << 20)}, read_only=False).size == 20 << 20


def test_job_takes_the_pods_namespace_from_the_kubelet():
    ctx = {"kubeflash.io/job": "j1", "csi.storage.k8s.io/pod.namespace": "team-a", "kubeflash.io/disk": "nvme0"}
    req = parse_request("v", "/t", ctx, read_only=False)
    assert (req.kind, req.job, req.disk) == ("job", "team-a/j1", "nvme0")


BAD = [
    ("dotdot", {"kubeflash.io/model-id": "../x-0123456789abcdef"}, grpc.StatusCode.INVALID_ARGUMENT, "model-id"),
    ("no-hash", {"kubeflash.io/model-id": "tiny"}, grpc.StatusCode.INVALID_ARGUMENT, "model-id"),
    ("unknown", {"kubeflash.io/size": "1Gi"}, grpc.StatusCode.INVALID_ARGUMENT, "kubeflash.io/size"),
    ("two", {"kubeflash.io/job": "j", "kubeflash.io/kv-size": "1Gi"}, grpc.StatusCode.INVALID_ARGUMENT, "exclude"),
    ("negative", {"kubeflash.io/kv-size": "-1Gi"}, grpc.StatusCode.INVALID_ARGUMENT, "kv-size"),
    ("small", {"kubeflash.io/kv-size": "1Mi"}, grpc.StatusCode.INVALID_ARGUMENT, "kv-size"),
    ("job-name", {"kubeflash.io/job": "../x", "csi.storage.k8s.io/pod.namespace": "a"},
     grpc.StatusCode.INVALID_ARGUMENT, "kubeflash.io/job"),
    ("disk", {"kubeflash.io/kv-size": "1Gi", "kubeflash.io/disk": "../d"}, grpc.StatusCode.INVALID_ARGUMENT, "disk"),
    ("none", {"csi.storage.k8s.io/ephemeral": "true"}, grpc.StatusCode.NOT_FOUND, "kubeflash.io/model-id"),
]


@pytest.mark.parametrize("ctx,code,named", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_attributes(ctx, code, named):
    with pytest.raises(CsiError) as e:
        parse_request("v", "/t", ctx, read_only=False)
    assert e.value.code == code and named in e.value.message


def test_mountinfo_with_escaped_paths():
    text = ("36 35 98:0 /models/m /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my\\040vol/mount "
            "ro,nosuid,nodev,relatime shared:1 - ext4 /dev/vda rw\n"
            "40 36 7:0 / /data/kv rw,noatime - ext4 /dev/loop0 rw\n")
    a, b = parse_mountinfo(text)
    assert a.target.endswith("my vol/mount") and a.root == "/models/m" and a.read_only and a.fstype == "ext4"
    assert b.source == "/dev/loop0" and not b.read_only


def test_cache_takes_the_model_and_the_pods_namespace():
    ctx = {"kubeflash.io/kv-cache": MID, "csi.storage.k8s.io/pod.namespace": "team-a"}
    req = parse_request("v", "/t", ctx, read_only=False)
    assert (req.kind, req.model_id, req.namespace, req.read_only) == ("cache", MID, "team-a", False)
    from kubeflash_node.csi.attrs import Request

    assert Request.from_json(req.to_json()) == req
    old = {k: v for k, v in req.to_json().items() if k != "namespace"}  # a record of a driver before caches
    assert Request.from_json(old).namespace == ""
