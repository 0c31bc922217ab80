"""Bare pods on the real node for the storage and boundary tests: the node image (it carries python) run with a
short script, kubeflash.io CSI inline volumes, and what the driver and the kubelet leave on this machine (volume
records, KV images, loop devices, pins, mounts) to check that a volume was published and released."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import realnode

import e2e_cases as cases
from e2e_cases import wait_for

AGENT = "app.kubernetes.io/component=agent"
PODS_DIR = realnode.KUBELET_ROOT / "pods"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}
UID = 1000  # the engine's user (operator ENGINE_UID): owner of job directories and KV volumes


def node_image(c) -> str:
    """The image of the agent DaemonSet's csi container: the node image, with python and kubeflash."""
    (ds,) = c.json("get", "daemonset", "-n", cases.SYSTEM_NAMESPACE, "-l", AGENT)["items"]
    return next(x["image"] for x in ds["spec"]["template"]["spec"]["containers"] if x["name"] == "csi")


def store(c) -> Path:
    """The node's store disk as its FlashNode reports it (the same path on the host and in the agent)."""
    (disk,) = c.json("get", "flashnode", realnode.NODE_NAME)["status"]["disks"]
    return Path(disk["path"])


def csi(**attributes: str) -> dict:
    return {"driver": "kubeflash.io", "volumeAttributes": {f"kubeflash.io/{k.replace('_', '-')}": v
                                                          for k, v in attributes.items()}}


def pod(name: str, image: str, script: str, volumes: dict[str, dict], mounts: dict[str, str], *,
        read_only: tuple[str, ...] = ()) -> dict:
    """A pod that passes Pod Security "restricted": `python -c script` as the engine's user, every volume a
    kubeflash.io inline volume (name -> csi spec) mounted at mounts[name]."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"test": "podkit"}}, "spec": {
        "restartPolicy": "Never", "automountServiceAccountToken": False, "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 1,
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never", "command": ["python", "-c", script],
                        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [{"name": n, "mountPath": m, "readOnly": n in read_only}
                                         for n, m in mounts.items()]}],
        "volumes": [{"name": n, "csi": {**v, "readOnly": n in read_only}} for n, v in volumes.items()]}}


def create(c, ns: str, *pods: dict) -> None:
    c.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(pods)}), ns)


def log(c, ns: str, name: str) -> str:
    return c.kubectl("logs", "-n", ns, name, check=False, timeout=30).stdout


def wait_log(c, ns: str, name: str, marker: str, timeout: float = 180) -> dict:
    """Wait until the pod's log has `marker` (the pod still running); returns the pod. A pod that ended or cannot
    start fails with its phase, log and events."""
    def get():
        p = c.json("get", "pod", name, "-n", ns)
        return p, (log(c, ns, name) if p["status"].get("phase") in ("Running", "Succeeded", "Failed") else "")

    def ok(v):
        p, text = v
        if marker in text:
            return True
        if p["status"].get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"pod {name} ended {p['status']['phase']} before printing {marker!r}: {text}")
        return False

    try:
        return wait_for(f"pod {ns}/{name} to print {marker!r}", get, ok, timeout=timeout, every=1)[0]
    except AssertionError as e:
        raise AssertionError(f"{e}\nevents:\n{cases.events(c, ns, name)}") from None


def result(c, ns: str, name: str) -> list[str]:
    """The words after RESULT in the pod's log."""
    text = log(c, ns, name)
    assert "RESULT " in text, text
    return text.split("RESULT ", 1)[1].split()


def records(disk: Path, pod_uid: str) -> list[Path]:
    """The driver's records of volumes published into this pod (`<disk>/csi/volumes/*.json`)."""
    folder = disk / "csi" / "volumes"
    return [f for f in folder.glob("*.json") if f"/pods/{pod_uid}/" in f.read_text()] if folder.is_dir() else []


def target(pod_uid: str, volume: str) -> Path:
    """Where the kubelet has the driver publish a pod's inline volume (visible here: the mounts propagate)."""
    return PODS_DIR / pod_uid / "volumes" / "kubernetes.io~csi" / volume / "mount"


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, from this machine's mount table."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(path) or point.startswith(f"{path}/"):
            out.append(point)
    return out


def leftovers(disk: Path, pod_uid: str, stems: list[str]) -> list[str]:
    """What the volumes (record stems) of a deleted pod still hold on this machine: records, KV images and their
    mount directories, loop devices backed by the images, pins, mounts under the pod's directory."""
    left = [str(r) for r in records(disk, pod_uid)]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    for s in stems:
        image, mnt = disk / "csi" / "kv" / f"{s}.img", disk / "csi" / "kv" / s
        left += [str(p) for p in (image, mnt) if p.exists()]
        left += [f"loop device on {image}" for line in loops.splitlines() if str(image) in line]
        left += [str(p) for p in (disk / "pins").glob(f"*/{s}")]
    return left + mounts_under(PODS_DIR / pod_uid)


def delete_and_wait_released(c, ns: str, pods: dict[str, dict], disk: Path, stems: dict[str, list[str]],
                             timeout: float = 120) -> None:
    """Delete the pods; wait until they are gone and the driver has released every volume they had."""
    c.kubectl("delete", "pod", *pods, "-n", ns, "--wait=false")
    for name, p in pods.items():
        uid = p["metadata"]["uid"]
        wait_for(f"pod {name}'s volumes to be released", lambda uid=uid, name=name: leftovers(disk, uid, stems[name]),
                 lambda left: not left, timeout=timeout, every=1)


def agent_pod(c) -> dict:
    (p,) = [p for p in c.json("get", "pods", "-n", cases.SYSTEM_NAMESPACE, "-l", AGENT)["items"]
            if not p["metadata"].get("deletionTimestamp")] or [None]
    return p


def restart_agent(c, timeout: float = 180) -> str:
    """Delete the agent pod (its agent and csi containers; the DaemonSet makes a new one) and wait until a new
    one is Ready and the driver registered again with the kubelet; returns the new pod's name."""
    old = agent_pod(c)["metadata"]["name"]
    c.kubectl("delete", "pod", old, "-n", cases.SYSTEM_NAMESPACE, "--wait=false")

    def ready(p):
        return (p is not None and p["metadata"]["name"] != old
                and all(s.get("ready") for s in p["status"].get("containerStatuses") or [{}]))
    new = wait_for("a new agent pod to be Ready", lambda: _agent_or_none(c), ready, timeout=timeout, every=1)
    wait_for("kubeflash.io registered in the node's CSINode", lambda: c.json("get", "csinode", realnode.NODE_NAME),
             lambda n: any(d["name"] == "kubeflash.io" for d in n["spec"].get("drivers") or []), timeout=60)
    return new["metadata"]["name"]


def _agent_or_none(c) -> dict | None:
    pods = [p for p in c.json("get", "pods", "-n", cases.SYSTEM_NAMESPACE, "-l", AGENT)["items"]
            if not p["metadata"].get("deletionTimestamp")]
    return pods[0] if len(pods) == 1 else None
