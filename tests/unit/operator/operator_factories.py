"""Factories for the operator's unit tests: FlashNode bodies, job specs and a fixed clock (imported by the tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
GiB = 2**30


def rfc(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def flashnode(name: str, *, pairs=((0, "nvme0"),), free=(100 * GiB,), read=(7.0,), models=(), heartbeat_age=5.0,
              kv_jobs=(), desired=()) -> dict:
    """A FlashNode object as the agent would write it: one disk per distinct disk name in `pairs`."""
    disk_names = list(dict.fromkeys(d for _, d in pairs))
    disks = [
        {"name": d, "path": f"/mnt/{d}/kubeflash", "freeBytes": free[i % len(free)], "readGBps": read[i % len(read)],
         "capacityBytes": 1000 * GiB}
        for i, d in enumerate(disk_names)
    ]
    status = {
        "gpus": [{"index": g} for g, _ in pairs],
        "disks": disks,
        "pairs": [{"gpu": g, "disk": d} for g, d in pairs],
        "models": [dict(m) for m in models],
        "kvAllocations": [{"job": j, "disk": disk_names[0], "bytes": 10 * GiB} for j in kv_jobs],
    }
    if heartbeat_age is not None:
        status["heartbeat"] = rfc(NOW - timedelta(seconds=heartbeat_age))
    return {"apiVersion": "kubeflash.io/v1alpha1", "kind": "FlashNode", "metadata": {"name": name},
            "spec": {"nodeName": name, "models": [{"id": i, "uri": "x"} for i in desired]}, "status": status}


def job_spec(**overrides) -> dict:
    """A minimal valid InferenceJob spec; keyword arguments replace top-level sections."""
    spec = {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["Hello", "World"]}}
    spec.update(overrides)
    return spec
