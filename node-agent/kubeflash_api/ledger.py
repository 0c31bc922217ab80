"""The per-node job ledger on a FlashNode: what the operator tells a node's agent about the jobs placed there.

The agent may read only its own FlashNode (and its Node), never pods or InferenceJobs (docs/security.md), so
everything it needs about a job travels here, written by the operator in the same conditional write that records
or releases the job's claim (no extra write per job):

* `kubeflash.io/claims` — the live claims: "ns/name" -> {gpus, disk, kv, model, uid, cm, [disks, shard]}. The
  operator's own bookkeeping (operator/kubeflash_operator/bookkeeping.py); a job listed here is placed on the node.
* `kubeflash.io/ended` — jobs that held a claim here and whose attempt ended (Succeeded, Failed, or sent back to
  Pending): "ns/name" -> {disk, kv, model, uid, cm, end: the job's phase}. Dropped when the job is deleted (or
  placed here again), so the agent keeps a job's directory exactly while it is listed in one of the two.

Keys: gpus (GPU indexes), disk (the pair's store disk), kv (KV bytes reserved), model (model id), uid (the
InferenceJob's metadata.uid), cm (spec.output.configMap, "" if none), disks/shard (tensor-parallel ranks).
This module only reads; a malformed entry is skipped, never trusted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CLAIMS_ANNOTATION = "kubeflash.io/claims"
ENDED_ANNOTATION = "kubeflash.io/ended"
TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class PlacedJob:
    """One job the ledger lists on this node, as the agent sees it (values unchecked beyond their types)."""

    key: str  # "ns/name"
    disk: str = ""
    kv: int = 0  # bytes; 0: not given
    model: str = ""
    uid: str = ""
    output: str = ""  # spec.output.configMap's name
    end: str = ""  # "": placed now (a live claim); else the phase its attempt here ended in

    @property
    def live(self) -> bool:
        return not self.end

    @property
    def terminal(self) -> bool:
        """The job is done (Succeeded or Failed): its results are final."""
        return self.end in TERMINAL


def _entries(raw: Any) -> dict[str, Any]:
    try:
        doc = json.loads(raw or "{}")
    except (TypeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _entry(key: str, e: Any, *, end: str) -> PlacedJob | None:
    if not isinstance(e, dict) or not isinstance(key, str) or key.count("/") != 1:
        return None
    try:
        kv = int(e.get("kv") or 0)
    except (TypeError, ValueError):
        return None
    fields = {f: e.get(f) or "" for f in ("disk", "model", "uid", "cm")}
    if not all(isinstance(v, str) for v in fields.values()) or kv < 0:
        return None
    return PlacedJob(key=key, disk=fields["disk"], kv=kv, model=fields["model"], uid=fields["uid"],
                     output=fields["cm"], end=end)


def placed_jobs(annotations: Mapping[str, Any] | None) -> dict[str, PlacedJob]:
    """Every job a FlashNode's ledger lists, by "ns/name" (a live claim wins over an ended record of the job)."""
    annotations = annotations or {}
    out: dict[str, PlacedJob] = {}
    for key, e in _entries(annotations.get(ENDED_ANNOTATION)).items():
        end = e.get("end") if isinstance(e, dict) else None
        if isinstance(end, str) and end and (job := _entry(key, e, end=end)):
            out[key] = job
    for key, e in _entries(annotations.get(CLAIMS_ANNOTATION)).items():
        if job := _entry(key, e, end=""):
            out[key] = job
    return out
