"""Who holds which GPU<->SSD pair: one book, owned by the operator's event loop, fed by FlashNode events.

The record of a claim is the FlashNode's `kubeflash.io/claims` annotation (the node's ledger: job -> GPUs, disk,
KV bytes, model, job uid, output ConfigMap; a tensor-parallel job's entry adds each rank's disk and its shard bytes).
A released claim becomes an entry of `kubeflash.io/ended` (with the phase its attempt ended in) until the job is
deleted or placed there again: the node's agent reads only its own FlashNode, so these two annotations, written
together in the one ledger write, are all it knows of the jobs on its node (kubeflash_api/ledger.py). It is written only
with the FlashNode's resourceVersion as a precondition, so a decision made on a
stale view, or by a second operator replica, fails with 409 instead of handing out a pair twice. The book keeps
every FlashNode's view and ledger at the newest resourceVersion seen (watch event or the answer to our own
write) plus the claims decided but not yet written ("held"), so every placement sees every claim this operator
has made. Only coroutines on the event loop touch it (no threads, hence no lock around reads); one writer task
per FlashNode sends its queued ledger changes together, so the operator never races itself for a node.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kubeflash_api.ledger import CLAIMS_ANNOTATION, ENDED_ANNOTATION
from kubeflash_operator.scheduler import Claim, Claims, NodeView, node_view

# ------------------------------------------------------------------------------------------- the ledger (pure)


def parse_ledger(node: str, body: Mapping[str, Any]) -> dict[str, Claim]:
    """The claims recorded on a FlashNode object (a malformed entry is skipped, never trusted)."""
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(CLAIMS_ANNOTATION) or "{}"
    try:
        entries = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, Claim] = {}
    for job, e in entries.items() if isinstance(entries, dict) else ():
        try:
            out[job] = Claim(job=job, node=node, gpus=tuple(int(g) for g in e["gpus"]), disk=str(e["disk"]),
                             kv_bytes=int(e.get("kv") or 0), disks=tuple(str(d) for d in e.get("disks") or ()),
                             shard_bytes=int(e.get("shard") or 0), model_id=str(e.get("model") or ""),
                             uid=str(e.get("uid") or ""), output=str(e.get("cm") or ""))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def parse_ended(body: Mapping[str, Any]) -> dict[str, Ended]:
    """The ended records on a FlashNode object (malformed ones skipped)."""
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(ENDED_ANNOTATION) or "{}"
    try:
        entries = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, Ended] = {}
    for job, e in entries.items() if isinstance(entries, dict) else ():
        try:
            out[job] = Ended(end=str(e["end"]), disk=str(e.get("disk") or ""), kv_bytes=int(e.get("kv") or 0),
                             model_id=str(e.get("model") or ""), uid=str(e.get("uid") or ""),
                             output=str(e.get("cm") or ""))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return out


def _facts(c: Claim | Ended) -> dict[str, Any]:
    """The facts the agent reads of an entry (kubeflash_api/ledger.py), empty ones left out."""
    return {k: v for k, v in (("model", c.model_id), ("uid", c.uid), ("cm", c.output)) if v}


def ledger_annotation(ledger: Mapping[str, Claim]) -> str:
    """The annotation value for a ledger (sorted, compact: the same ledger always writes the same bytes)."""
    entries = {job: {"gpus": list(c.gpus), "disk": c.disk, "kv": c.kv_bytes, **_facts(c),
                     **({"disks": list(c.disks), "shard": c.shard_bytes, "model": c.model_id} if c.disks else {})}
               for job, c in sorted(ledger.items())}
    return json.dumps(entries, separators=(",", ":"), sort_keys=True)


def ended_annotation(ended: Mapping[str, Ended]) -> str | None:
    """The annotation value for the ended records (None: none, the annotation is removed)."""
    if not ended:
        return None
    entries = {job: {"end": e.end, "disk": e.disk, "kv": e.kv_bytes, **_facts(e)} for job, e in sorted(ended.items())}
    return json.dumps(entries, separators=(",", ":"), sort_keys=True)


def clashes(claim: Claim, ledger: Mapping[str, Claim]) -> list[str]:
    """Other jobs in `ledger` holding one of `claim`'s GPUs."""
    return sorted(job for job, c in ledger.items() if job != claim.job and set(c.gpus) & set(claim.gpus))


def apply_changes(ledger: Mapping[str, Claim], changes: Mapping[str, Claim | Release]
                  ) -> tuple[dict[str, Claim], dict[str, bool]]:
    """The ledger after each change, in order; returns (new ledger, accepted per job).

    A Claim is recorded unless another job holds one of its GPUs, or the job already holds a different entry here
    (someone else's decision for this job: ours came from an older view; the same hold with other facts for the
    agent replaces it). A Release removes the job's entry only if it is still the one given (else another decision
    replaced it, and that one stays)."""
    out, accepted = dict(ledger), {}
    for job, change in changes.items():
        if isinstance(change, Release):
            if change.claim is None or out.get(job) == change.claim:
                out.pop(job, None)
            accepted[job] = True
        elif clashes(change, out) or (job in out and out[job].hold != change.hold):
            accepted[job] = False
        else:
            out[job] = change
            accepted[job] = True
    return out, accepted


def apply_ended(ended: Mapping[str, Ended], ledger: Mapping[str, Claim], changes: Mapping[str, Claim | Release],
                accepted: Mapping[str, bool]) -> dict[str, Ended]:
    """The ended records after `changes` (applied to `ledger`, the claims before them; `accepted` from
    apply_changes): an accepted Claim drops the job's record (placed here again); a Release with `end` turns the
    job's claim into a record; a plain Release (the job is deleted) drops it; a stale entry's Release leaves it."""
    out = dict(ended)
    for job, change in changes.items():
        if isinstance(change, Claim):
            if accepted.get(job):
                out.pop(job, None)
        elif change.end and job in ledger:
            c = ledger[job]
            out[job] = Ended(end=change.end, disk=c.disk, kv_bytes=c.kv_bytes, model_id=c.model_id, uid=c.uid,
                             output=c.output)
        elif not change.end and change.claim is None:
            out.pop(job, None)
    return out


@dataclass(frozen=True)
class Release:
    """Remove a job's entry (only if it is `claim`, when given). With `end` (the phase the job's attempt ended in)
    the entry becomes an ended record for the node's agent; without `end` or `claim` (the job is deleted) the
    job's ended record goes too."""

    claim: Claim | None = None
    end: str = ""


@dataclass(frozen=True)
class Ended:
    """A job that held a claim on the node and whose attempt there ended (kubeflash_api/ledger.py)."""

    end: str  # the job's phase when it was released
    disk: str = ""
    kv_bytes: int = 0
    model_id: str = ""
    uid: str = ""
    output: str = ""


def stale_entries(records: Mapping[str, NodeRecord], job: str, placed: Claim | None) -> list[tuple[str, Claim]]:
    """(FlashNode, entry) of `job` that do not match where its status says it is placed (`placed`; None: it holds
    no pair): left by a decision that lost (a crash, or another replica's conflicting write)."""
    out = []
    for name, rec in records.items():
        entry = rec.ledger.get(job)
        if entry is not None and (placed is None or (entry.node, entry.gpus, entry.disk) !=
                                  (placed.node, placed.gpus, placed.disk)):
            out.append((name, entry))
    return out


def resource_version(body: Mapping[str, Any]) -> int:
    """metadata.resourceVersion as a number for ordering views (etcd revisions); 0 if absent or not numeric."""
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


# -------------------------------------------------------------------------------------------------- the book


@dataclass(frozen=True)
class NodeRecord:
    name: str  # the FlashNode (whose ledger this is)
    view: NodeView
    rv: str  # resourceVersion, sent back as the precondition of the next ledger write
    ledger: Mapping[str, Claim]
    ended: Mapping[str, Ended] = field(default_factory=dict)  # written with the ledger, for the node's agent

    @cached_property
    def claims(self) -> tuple[Claim, ...]:
        """The ledger's claims, one tuple per record (the same object while the record is: placement memoizes by it)."""
        return tuple(self.ledger.values())


def node_record(body: Mapping[str, Any]) -> NodeRecord:
    view = node_view(body)
    meta = body.get("metadata") or {}
    return NodeRecord(name=meta.get("name", ""), view=view, rv=str(meta.get("resourceVersion") or ""),
                      ledger=parse_ledger(view.name, body), ended=parse_ended(body))


def _newer(a: NodeRecord, b: NodeRecord | None) -> NodeRecord:
    if b is None:
        return a
    try:
        return b if int(b.rv) > int(a.rv) else a
    except ValueError:
        return a


@dataclass
class ClaimBook:
    """The watch's FlashNode records (kopf's index, passed in) overlaid with newer ones from our own writes, plus
    the claims decided but not yet written. Everything a placement needs, in one place, read without awaiting."""

    written: dict[str, NodeRecord] = field(default_factory=dict)  # answers to our writes, by FlashNode name
    held: dict[str, Claim] = field(default_factory=dict)  # decided, ledger write in flight, by job
    pending: dict[str, dict[str, tuple[Claim | Release, asyncio.Future[bool]]]] = field(default_factory=dict)
    writers: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # the one ledger writer per FlashNode
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    watched: dict[str, NodeRecord] = field(default_factory=dict)  # the watch's FlashNode records (watch/unwatch)
    generation: int = 0  # bumped by changed(): what a placement reads from the records may differ now
    view: tuple[Any, Any, Any] | None = None  # (generation, what the handlers built from the records then, held overlay)
    place_memo: dict[Any, Any] = field(default_factory=dict)  # scheduler.place(memo=): each node's best pair

    def changed(self) -> None:
        """Something a placement reads from the records changed (a FlashNode or Node event, our write's answer)."""
        self.generation += 1
        self.view = None

    def watch(self, rec: NodeRecord) -> None:
        """A FlashNode as the watch shows it (added or changed)."""
        self.watched[rec.name] = rec
        self.changed()

    def unwatch(self, name: str) -> None:
        """A FlashNode the watch shows deleted."""
        self.watched.pop(name, None)
        self.changed()

    def current(self, watched: Iterable[NodeRecord]) -> dict[str, NodeRecord]:
        """The newest record of every FlashNode the watch shows (one it no longer shows is gone)."""
        out = {r.name: _newer(r, self.written.get(r.name)) for r in watched}
        for name in [n for n in self.written if n not in out]:
            del self.written[name]
        return out

    def record(self, name: str) -> NodeRecord | None:
        """current()[name] without building the whole map: FlashNode `name`'s newest record, None if not watched."""
        rec = self.watched.get(name)
        if rec is None:
            self.written.pop(name, None)
            return None
        return _newer(rec, self.written.get(name))

    def note(self, body: Mapping[str, Any]) -> NodeRecord:
        """A FlashNode as our write (or read) answered it."""
        rec = node_record(body)
        self.written[rec.name] = _newer(rec, self.written.get(rec.name))
        self.changed()
        return self.written[rec.name]

    def claims(self, records: Mapping[str, NodeRecord], *, held: bool = True) -> Claims:
        """Every recorded claim, overridden by the held ones (a job's newest decision wins; held=False: only the
        recorded ones). Each record's claims stay one shared tuple (the one placement memoizes by) unless a job
        is recorded in two ledgers (a lost decision's entry), where the last record's entry wins."""
        recorded = Claims.grouped(r.claims for r in records.values())
        return recorded.with_held(self.held) if held else recorded


def record_for(records: Mapping[str, NodeRecord], node: str) -> NodeRecord | None:
    """The record of the FlashNode serving Kubernetes node `node` (by default the FlashNode has its name)."""
    rec = records.get(node)
    if rec is not None and rec.view.name == node:
        return rec
    return next((r for r in records.values() if r.view.name == node), None)
