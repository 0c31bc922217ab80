"""FlashNode.status and the node's labels, built from what the agent knows; pure (docs/contract.md).

Conditions follow metav1.Condition: lastTransitionTime moves only when a condition's status changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubeflash_api.quantity import human

from .devices import Disk, Gpu, Pair
from .jobs import Allocation
from .probe import DiskProbe, GpuProbe

PAIRS_LABEL = "kubeflash.io/gpu-ssd-pairs"
AGENT_LABEL = "kubeflash.io/agent"


def gpu_row(g: Gpu, probe: GpuProbe | None) -> dict[str, Any]:
    row: dict[str, Any] = {"index": g.index, "name": g.name, "memoryBytes": g.memory_bytes,
                           "pciRoot": g.location.root}
    if g.uuid:
        row["uuid"] = g.uuid
    if g.location.numa_node is not None:
        row["numaNode"] = g.location.numa_node
    if probe is not None:
        row["h2dGBps"] = probe.h2d_gbps
    return row


def disk_row(d: Disk, probe: DiskProbe | None, capacity: int, free: int) -> dict[str, Any]:
    row: dict[str, Any] = {"name": d.name, "path": str(d.path), "pciRoot": d.location.root,
                           "capacityBytes": capacity, "freeBytes": free}
    if d.location.numa_node is not None:
        row["numaNode"] = d.location.numa_node
    if probe is not None and probe.method != "skipped":
        row["readGBps"], row["writeGBps"] = probe.read_gbps, probe.write_gbps
    return row


def allocation_row(a: Allocation) -> dict[str, Any]:
    return {"job": a.job, "disk": a.disk, "bytes": a.quota, "path": str(a.path)}


def conditions(*, pairs: Sequence[Pair], models: Sequence[Mapping[str, Any]],
               allocations: Sequence[Allocation], running: bool = True) -> list[dict[str, str]]:
    """The agent's conditions without timestamps: Ready, Paired, ModelsReady, KVWithinQuota."""
    out = [_cond("Ready", running, "AgentRunning" if running else "AgentStopped",
                 "the node agent is running" if running else "the node agent stopped")]
    out.append(_cond("Paired", bool(pairs), "Paired" if pairs else "NoPairs",
                     f"{len(pairs)} GPU<->SSD pairs" if pairs else "no GPU could be paired with a store disk"))
    failed = [m for m in models if m.get("state") in ("Failed", "Evicted")]
    busy = [m for m in models if m.get("state") in ("Pending", "Staging")]
    if failed:
        text = "; ".join(f"{m['id']}: {m.get('message', m['state'])}" for m in failed)
        out.append(_cond("ModelsReady", False, "StagingFailed", text[:4000]))
    elif busy:
        out.append(_cond("ModelsReady", False, "Staging", "staging " + ", ".join(m["id"] for m in busy)))
    else:
        out.append(_cond("ModelsReady", True, "AllStaged", "every wanted model is staged"))
    over = [a for a in allocations if a.over]
    out.append(_cond("KVWithinQuota", not over, "OverQuota" if over else "WithinQuota",
                     "; ".join(f"{a.job} uses {a.used} of {a.quota} bytes" for a in over)[:4000]
                     or "every job is within its KV quota"))
    return out


def _cond(kind: str, ok: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def merge_conditions(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, str]], now: str) -> list[dict]:
    """New conditions stamped with lastTransitionTime: kept from `old` where the status did not change."""
    before = {c.get("type"): c for c in old}
    out = []
    for c in new:
        prev = before.get(c["type"])
        keep = prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime")
        out.append({**c, "lastTransitionTime": prev["lastTransitionTime"] if keep else now})
    return out


def flashnode_status(*, gpus: Sequence[dict], disks: Sequence[dict], pairs: Sequence[Pair],
                     models: Sequence[dict], allocations: Sequence[Allocation], conditions: Sequence[dict],
                     heartbeat: str, kv_cache: Mapping[str, Any] | None = None) -> dict[str, Any]:
    out = {
        "gpus": list(gpus),
        "disks": list(disks),
        "pairs": [{"gpu": p.gpu, "disk": p.disk} for p in pairs],
        "models": list(models),
        "kvAllocations": [allocation_row(a) for a in allocations],
        "heartbeat": heartbeat,
        "conditions": list(conditions),
        # one-glance summaries for `kubectl get fn` (printer columns cannot count lists)
        "gpuCount": len(gpus),
        "pairCount": len(pairs),
        "freeSSD": human(sum(int(d.get("freeBytes") or 0) for d in disks)),
        "modelsReady": sum(1 for m in models if m.get("state") == "Ready"),
    }
    if kv_cache is not None:
        out["kvCache"] = dict(kv_cache)
    return out


def node_labels(pairs: Sequence[Pair], *, running: bool = True) -> dict[str, str | None]:
    """Labels the operator and users select nodes by; None removes a label (merge patch)."""
    return {PAIRS_LABEL: str(len(pairs)), AGENT_LABEL: "ready" if running else None}
