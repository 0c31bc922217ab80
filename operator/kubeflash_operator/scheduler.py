"""Pure placement: which node's GPU<->SSD pair runs a job, from FlashNode status and the jobs already placed.

Filter: a Node that is not cordoned (`spec.unschedulable`: kubectl cordon/drain), a fresh heartbeat, enough
free pairs (a pair is taken while a placed job holds its GPU), and room on the pair's SSD for the model (unless
already there) plus the job's KV reservation. Score: model Ready on that SSD >> model being staged there >> (for a
job with spec.cache.prefix) the job's own prefix in that SSD's node cache (the longest prefix fingerprint,
kubeflash_api.prefixes, its prompts share with the cache of its model and namespace there) >> prefix KV blocks of
the job's model and namespace there >> SSD read bandwidth > free space; ties go to the lower node name and GPU
index so placement is deterministic.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubeflash_api.prefixes import shared_bytes
from kubeflash_operator.timefmt import parse_time

DEFAULT_HEARTBEAT_TIMEOUT = timedelta(seconds=120)
_PRESENT = ("Pending", "Staging", "Ready")  # states in which a model takes (or will take) its space


@dataclass(frozen=True)
class Disk:
    name: str
    path: str
    free_bytes: int = 0
    read_gbps: float = 0.0
    write_gbps: float = 0.0


@dataclass(frozen=True)
class ShardCopy:
    """One tensor-parallel shard of a model copy (FlashNode status.models[].shards[])."""

    rank: int
    disk: str
    state: str
    gpu: int | None = None
    progress: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class ModelCopy:
    id: str
    disk: str
    state: str
    bytes: int = 0
    progress: float = 0.0
    message: str = ""
    tensor_parallel: int = 1  # status.models[].tensorParallel: how many shards the agent was asked for
    shards: tuple[ShardCopy, ...] = ()

    def shard_set(self, world: int) -> tuple[ShardCopy, ...] | None:
        """The shards 0..world-1 of a cut into `world` ranks, in rank order; None unless all are reported."""
        if self.tensor_parallel != world:
            return None
        by_rank = {sh.rank: sh for sh in self.shards}
        return tuple(by_rank[k] for k in range(world)) if all(k in by_rank for k in range(world)) else None

    def shards_ready(self, world: int) -> int:
        """How many of the `world` shards are Ready (0 when the copy holds a cut into another number)."""
        got = self.shard_set(world)
        return sum(sh.state == "Ready" for sh in got) if got else 0


@dataclass(frozen=True)
class NodeView:
    """What the scheduler needs from one FlashNode."""

    name: str  # the Kubernetes node (spec.nodeName)
    heartbeat: datetime | None
    disks: Mapping[str, Disk]
    pairs: tuple[tuple[int, str], ...]  # (gpu index, disk name)
    models: tuple[ModelCopy, ...] = ()
    kv_jobs: frozenset[str] = frozenset()  # "ns/name" the agent already reserved KV space for
    desired: frozenset[str] = frozenset()  # model ids in spec.models
    desired_tp: Mapping[str, int] = field(default_factory=dict)  # model id -> spec.models[].tensorParallel (> 1 only)
    cordoned: bool = False  # the Node has spec.unschedulable (kubectl cordon/drain): no new jobs or retries
    gpu_h2d_gbps: Mapping[int, float] = field(default_factory=dict)  # the agent's host->GPU probe, by GPU index
    kv_cache_budget: int = 0  # bytes of the agent's prefix KV cache (status.kvCache.budgetBytes); 0: none
    kv_cached: Mapping[tuple[str, str, str], int] = field(default_factory=dict)  # (disk, namespace, model) -> blocks
    kv_prefixes: Mapping[tuple[str, str, str], frozenset[str]] = field(default_factory=dict)  # -> fingerprints

    def cached_blocks(self, disk: str, job: str, model_id: str) -> int:
        """Prefix KV blocks the node's cache on `disk` holds for `model_id` in the namespace of `job` ("ns/name")."""
        return self.kv_cached.get((disk, job.split("/", 1)[0], model_id), 0) if self.kv_cache_budget > 0 else 0

    def cached_prefix(self, disk: str, job: str, model_id: str, fingerprints: Iterable[str]) -> int:
        """Bytes of prompt text (a fingerprint level) the longest prefix of `fingerprints` that the node's cache on
        `disk` holds for `model_id` in the namespace of `job` covers; 0: none of the job's prefixes is there."""
        if self.kv_cache_budget <= 0:
            return 0
        return shared_bytes(fingerprints, self.kv_prefixes.get((disk, job.split("/", 1)[0], model_id), ()))

    def probe(self, gpu: int, disk: str) -> dict[str, float]:
        """The agent's measured bandwidths for a (GPU, disk) placement, as the engine reads them
        (KUBEFLASH_PROBE; only the values the agent has measured)."""
        d = self.disks.get(disk)
        got = {"diskReadGBps": d.read_gbps if d else 0.0, "diskWriteGBps": d.write_gbps if d else 0.0,
               "h2dGBps": self.gpu_h2d_gbps.get(gpu, 0.0)}
        return {k: v for k, v in got.items() if v > 0}

    def model(self, model_id: str, disk: str | None = None) -> ModelCopy | None:
        """This node's copy of a model (on `disk` if given), Ready copies first."""
        copies = [m for m in self.models if m.id == model_id and (disk is None or m.disk == disk)]
        copies.sort(key=lambda m: m.state != "Ready")
        return copies[0] if copies else None

    def fresh(self, now: datetime, timeout: timedelta = DEFAULT_HEARTBEAT_TIMEOUT) -> bool:
        return self.heartbeat is not None and now - self.heartbeat <= timeout

    def usable(self, now: datetime, timeout: timedelta = DEFAULT_HEARTBEAT_TIMEOUT) -> bool:
        """May take new jobs and retries: not cordoned and reporting."""
        return not self.cordoned and self.fresh(now, timeout)


@dataclass(frozen=True)
class Claim:
    """A placed job's hold on a node: its GPUs and the KV space on its pair's disk; a tensor-parallel job's claim
    also names every rank's disk (`disks`, rank order: the disk paired with gpus[k]), the KV bytes it holds on each
    of them and the bytes of the shard each rank's disk will hold (`shard_bytes`, counted while shard k of
    `model_id`.tp<len(gpus)> is not yet reported on that disk)."""

    job: str  # "ns/name"
    node: str
    gpus: tuple[int, ...]
    disk: str
    kv_bytes: int = 0
    disks: tuple[str, ...] = ()  # per rank; () means (disk,)
    shard_bytes: int = 0
    model_id: str = ""
    # for the node's agent, which reads nothing but its own FlashNode (kubeflash_api/ledger.py): no effect on placement
    uid: str = ""  # the InferenceJob's metadata.uid
    output: str = ""  # spec.output.configMap's name ("" if none)

    @property
    def hold(self) -> tuple[Any, ...]:
        """What the claim takes on its node (everything but the facts carried for the agent)."""
        return self.node, self.gpus, self.disk, self.kv_bytes, self.disks, self.shard_bytes

    def held(self, node: NodeView) -> dict[str, int]:
        """Bytes this claim takes on each of `node`'s disks beyond what the disks' free space already shows: KV
        until the agent reports the job's reservation, a shard until the agent reports it on that disk."""
        out: dict[str, int] = {}
        disks = self.disks or (self.disk,)
        tp = len(disks)
        staged = {(sh.rank, sh.disk) for m in node.models if m.id == self.model_id and m.tensor_parallel == tp
                  for sh in m.shards if sh.state in _PRESENT}
        for k, d in enumerate(disks):
            got = 0 if self.job in node.kv_jobs else self.kv_bytes
            if tp > 1 and (k, d) not in staged:
                got += self.shard_bytes
            out[d] = out.get(d, 0) + got
        return out


@dataclass(frozen=True)
class Request:
    job: str  # "ns/name"
    model_id: str
    gpus: int = 1
    kv_bytes: int = 0
    prefix_cache: bool = False  # spec.cache.prefix: prefer a disk whose node cache holds the model's blocks
    prefixes: tuple[str, ...] = ()  # the job's prompts' fingerprints (kubeflash_api.prefixes.job_fingerprints)
    tensor_parallel: int = 1  # spec.offload.tensorParallel: prefer a node whose N shards are Ready


@dataclass(frozen=True)
class Placement:
    node: str
    gpu: int
    disk: str
    staged: bool  # model already Ready on `disk`
    gpus: tuple[int, ...] = ()  # all GPUs held, `gpu` first
    disks: tuple[str, ...] = ()  # tensor-parallel: the disk paired with each of `gpus` (rank order)
    shard_bytes: int = 0  # tensor-parallel: bytes of one shard, reserved on each rank's disk until it is staged
    model_id: str = ""

    def claim(self, job: str, kv_bytes: int, *, model_id: str = "", uid: str = "", output: str = "") -> Claim:
        return Claim(job=job, node=self.node, gpus=self.gpus or (self.gpu,), disk=self.disk, kv_bytes=kv_bytes,
                     disks=self.disks, shard_bytes=self.shard_bytes, model_id=self.model_id or model_id, uid=uid,
                     output=output)


@dataclass(frozen=True)
class NoFit:
    reason: str


# --------------------------------------------------------------------------------------------- placement


class Claims:
    """Every placed job's claim, by job and by node (a job's newest claim wins: the last one given). Built once per
    view and shared by every placement made on it (a placement then reads one node's claims, not all 5,000 of a
    burst); `with_held` lays the claims decided since on top without regrouping the rest."""

    __slots__ = ("by_job", "by_node", "single")

    def __init__(self, claims: Iterable[Claim] = ()) -> None:
        self.single = False  # known: no job is in two ledgers (grouped()), so a job's one entry is by_job's
        self.by_job: dict[str, Claim] = {c.job: c for c in claims}
        grouped: dict[str, list[Claim]] = {}
        for c in self.by_job.values():
            grouped.setdefault(c.node, []).append(c)
        self.by_node: dict[str, tuple[Claim, ...]] = {n: tuple(cs) for n, cs in grouped.items()}

    @classmethod
    def grouped(cls, groups: Iterable[tuple[Claim, ...]]) -> Claims:
        """From tuples of one node's claims each (a FlashNode ledger's), kept as they are; if a job is in two of
        them or two tuples name one node, as Claims(all of them in order)."""
        groups = [g for g in groups if g]
        out = cls()
        for g in groups:
            if g[0].node in out.by_node:
                return cls(c for g in groups for c in g)
            out.by_node[g[0].node] = g
            out.by_job.update((c.job, c) for c in g)
        if len(out.by_job) != sum(map(len, groups)):
            return cls(c for g in groups for c in g)
        out.single = True
        return out

    def __iter__(self) -> Iterator[Claim]:
        return iter(self.by_job.values())

    def __len__(self) -> int:
        return len(self.by_job)

    def of(self, job: str) -> Claim | None:
        return self.by_job.get(job)

    def on(self, node: str) -> tuple[Claim, ...]:
        return self.by_node.get(node, ())

    def with_held(self, held: Mapping[str, Claim]) -> Claims:
        """These claims with `held` (job -> its newest decision) replacing each job's recorded one."""
        if not held:
            return self
        out = Claims()
        out.by_job = {**self.by_job, **held}
        out.by_node = dict(self.by_node)
        touched = {c.node for c in held.values()} | {self.by_job[j].node for j in held if j in self.by_job}
        for node in touched:
            kept = tuple(c for c in self.on(node) if c.job not in held) + tuple(c for c in held.values()
                                                                             if c.node == node)
            if kept:
                out.by_node[node] = kept
            else:
                out.by_node.pop(node, None)
        return out


def as_claims(claims: Iterable[Claim]) -> Claims:
    return claims if isinstance(claims, Claims) else Claims(claims)


PlaceMemo = dict  # node name -> (view, its claims, request shape, model bytes, _node_best's answer): place(memo=)
# (and "model sizes" -> {node name: (view, {model id: bytes})})


def place(
    request: Request,
    nodes: Iterable[NodeView],
    claims: Iterable[Claim],
    *,
    now: datetime,
    heartbeat_timeout: timedelta = DEFAULT_HEARTBEAT_TIMEOUT,
    memo: PlaceMemo | None = None,
) -> Placement | NoFit:
    """Pick the best GPU<->SSD pair for `request`, or say why none fits.

    `memo` (a dict kept by the caller across placements): each node's best pair is reused while that node's view
    and claims are the same objects and the request has the same shape, so a burst re-scores only the nodes that
    changed since the last placement (the one just claimed, a FlashNode just written), not all of them per job."""
    nodes = list(nodes)  # any order: the score ends with (node name, GPU), so the best is the same
    if not nodes:
        return NoFit("no FlashNode reports GPU<->SSD pairs yet")
    claims = as_claims(claims)
    model_bytes = known_model_bytes(request.model_id, nodes, memo)
    shape = None if request.prefix_cache or memo is None else (request.model_id, request.gpus, request.kv_bytes,
                                                                request.tensor_parallel)
    own = claims.of(request.job)  # a job's claim is in its node's claims only: that node is scored without it
    best: tuple[tuple, Placement] | None = None
    rejects: list[tuple[str, NoFit]] = []  # spelled out only if nothing fits
    for node in nodes:
        found = _usable(node, now, heartbeat_timeout)
        if found is None:
            mine = claims.on(node.name)
            if own is not None and own.node == node.name:
                found = _node_best(request, node, tuple(c for c in mine if c.job != request.job), model_bytes)
            elif shape is None:
                found = _node_best(request, node, mine, model_bytes)
            else:
                found = _node_best_memo(request, node, mine, model_bytes, shape, memo)
        if isinstance(found, NoFit):
            rejects.append((node.name, found))
        elif best is None or found[0] < best[0]:
            best = found
    if best is None:
        reasons = [f"{name}: {found.reason}" for name, found in sorted(rejects, key=lambda r: r[0])]
        return NoFit(f"0/{len(nodes)} nodes fit: " + "; ".join(reasons))
    return best[1]


def _node_best_memo(request: Request, node: NodeView, mine: tuple[Claim, ...], model_bytes: int, shape: tuple,
                    memo: PlaceMemo) -> tuple[tuple, Placement] | NoFit:
    """_node_best for `node` with its claims `mine` (the request's own not among them), from `memo` while the
    node's view and claims are the same objects and the request has the same shape."""
    hit = memo.get(node.name)
    if (hit is not None and hit[0] is node and hit[2] == shape and hit[3] == model_bytes
            and (hit[1] is mine or (len(hit[1]) == len(mine) and all(map(operator.is_, hit[1], mine))))):
        return hit[4]
    found = _node_best(request, node, mine, model_bytes)
    memo[node.name] = (node, mine, shape, model_bytes, found)
    return found


def reuse(claim: Claim, request: Request, nodes: Mapping[str, NodeView], *, now: datetime,
          heartbeat_timeout: timedelta = DEFAULT_HEARTBEAT_TIMEOUT) -> Placement | None:
    """The placement a job's own recorded claim stands for, if its node still takes jobs and the pair still exists
    (after a restart between recording a claim and writing the job's status, the job keeps that pair)."""
    node = nodes.get(claim.node)
    if node is None or not node.usable(now, heartbeat_timeout) or len(claim.gpus) != request.gpus:
        return None
    if any((g, claim.disk) not in node.pairs for g in claim.gpus[:1]) or claim.disk not in node.disks:
        return None
    copy = node.model(request.model_id, claim.disk)
    return Placement(node.name, claim.gpus[0], claim.disk, copy is not None and copy.state == "Ready", claim.gpus,
                     disks=claim.disks, shard_bytes=claim.shard_bytes, model_id=claim.model_id)


def known_model_bytes(model_id: str, nodes: Iterable[NodeView], memo: PlaceMemo | None = None) -> int:
    """Size of a model as any node reports it (0 while no node has staged it); `memo`: each node's sizes are read
    once per view of it."""
    if memo is None:
        return max((m.bytes for n in nodes for m in n.models if m.id == model_id), default=0)
    seen = memo.setdefault("model sizes", {})  # node name -> (view, {model id: bytes})
    best = 0
    for n in nodes:
        hit = seen.get(n.name)
        if hit is None or hit[0] is not n:
            sizes: dict[str, int] = {}
            for m in n.models:
                sizes[m.id] = max(sizes.get(m.id, 0), m.bytes)
            hit = seen[n.name] = (n, sizes)
        got = hit[1].get(model_id, 0)
        if got > best:
            best = got
    return best


def _usable(node: NodeView, now: datetime, timeout: timedelta) -> NoFit | None:
    """Why `node` takes no new job now (cordoned, or its agent's heartbeat is stale); None if it does."""
    if node.cordoned:
        return NoFit("node cordoned (spec.unschedulable)")
    if not node.fresh(now, timeout):
        age = "never" if node.heartbeat is None else f"{int((now - node.heartbeat).total_seconds())}s ago"
        return NoFit(f"heartbeat stale (last {age})")
    return None


def _node_best(request: Request, node: NodeView, claims: Sequence[Claim], model_bytes: int
               ) -> tuple[tuple, Placement] | NoFit:
    """The best-scored pair on usable `node` (score, placement) for `request`, or why none fits; `claims`: this
    node's (the request's own left out). Depends on nothing else (not the time): place() memoizes it."""
    mine = claims  # the claims on this node
    tp = request.tensor_parallel
    other = next((c for c in mine if tp > 1 and c.model_id == request.model_id and len(c.disks) > 1
                  and len(c.disks) != tp), None)
    if other is not None:  # the agent keeps one cut per model per node (FlashNode spec.models[].tensorParallel)
        return NoFit(f"model {request.model_id} is cut into {len(other.disks)} shards here for job {other.job} "
                     f"(spec.offload.tensorParallel {len(other.disks)}), this job asks spec.offload.tensorParallel "
                     f"{tp}: one cut per model per node until that job ends")
    busy = {g for c in mine for g in c.gpus}
    free = [(g, d) for g, d in sorted(node.pairs) if g not in busy and d in node.disks]
    if len(free) < request.gpus:
        return NoFit(f"{len(free)} free GPU<->SSD pairs, needs {request.gpus}")
    best: tuple[tuple, int, str, int, tuple[tuple[int, str], ...]] | None = None
    worst = ""
    copies = _copies_by_disk(node, request.model_id)
    reserved: dict[str, int] = {}  # KV (and shard) space promised per disk, once per node (not once per pair)
    for c in mine:
        for d, n in c.held(node).items():
            reserved[d] = reserved.get(d, 0) + n
    shard = -(-model_bytes // tp) if tp > 1 else 0  # a shard is about the model's bytes / N
    staged = _staged_shards(node, request.model_id, tp)
    homes = _shard_homes(node, staged, tp)
    for gpu, disk_name in free:
        disk = node.disks[disk_name]
        if tp > 1 and disk_name not in homes[0]:  # rank 0 streams shard 0 from its own pair's disk
            continue
        copy = copies.get(disk_name)
        present = copy is not None and copy.state in _PRESENT
        need = request.kv_bytes + (0 if present else model_bytes) + (0 if (0, disk_name) in staged else shard)
        room = disk.free_bytes - reserved.get(disk_name, 0)
        if room < need:
            if tp <= 1 or not worst:  # a tensor-parallel job keeps the first reason, usually a rank's disk
                worst = f"disk {disk_name} has {_gib(room)} free, needs {_gib(need)}"
            continue
        rank = 2 if copy is not None and copy.state == "Ready" else 1 if present else 0
        cached = prefix = 0
        if request.prefix_cache:
            cached = node.cached_blocks(disk_name, request.job, request.model_id)
            prefix = node.cached_prefix(disk_name, request.job, request.model_id, request.prefixes)
        score = (-rank, -prefix, -cached, -disk.read_gbps, -room, node.name, gpu)
        if request.tensor_parallel > 1:  # a node holding the job's shards first, rank 0 where shard 0 is, then
            score = (-max((m.shards_ready(request.tensor_parallel) for m in node.models if m.id == request.model_id),
                          default=0), -((0, disk_name) in staged), *score)
        if tp <= 1:
            if best is None or score < best[0]:
                best = (score, gpu, disk_name, rank, ())
            continue
        taken = dict(reserved)
        taken[disk_name] = taken.get(disk_name, 0) + need
        ranks, why = _other_ranks(request, node, free, gpu, taken, shard, staged, homes)
        if ranks is None:
            worst = why
        elif best is None or score < best[0]:
            best = (score, gpu, disk_name, rank, ranks)
    if best is None:
        return NoFit(worst or (_homeless(0, homes[0]) if tp > 1 else "no free pair fits"))
    score, gpu, disk_name, rank, ranks = best
    if tp <= 1:
        others = tuple(g for g, _ in free if g != gpu)[: request.gpus - 1]
        return score, Placement(node.name, gpu, disk_name, rank == 2, (gpu, *others))
    return score, Placement(node.name, gpu, disk_name, rank == 2, (gpu, *(g for g, _ in ranks)),
                            disks=(disk_name, *(d for _, d in ranks)), shard_bytes=shard, model_id=request.model_id)


def _staged_shards(node: NodeView, model_id: str, tp: int) -> set[tuple[int, str]]:
    """(rank, disk) of the shards of `model_id` cut into `tp` that the node reports on a disk (or being staged)."""
    if tp <= 1:
        return set()
    return {(sh.rank, sh.disk) for m in node.models if m.id == model_id and m.tensor_parallel == tp
            for sh in m.shards if sh.state in _PRESENT}


def _shard_homes(node: NodeView, staged: set[tuple[int, str]], tp: int) -> dict[int, frozenset[str]]:
    """The disks shard k is on (the node reports it there) or will be cut onto: the agent puts shard k on the disk
    of pair k, pairs in GPU index order (agent/tpstaging.plan_targets). Rank k must run on a GPU paired with one of
    them, or it would stream its shard from another pair's SSD."""
    pairs = sorted(node.pairs)
    out: dict[int, frozenset[str]] = {}
    for k in range(tp):
        on = frozenset(d for r, d in staged if r == k)
        out[k] = on or frozenset([pairs[k][1]] if k < len(pairs) else [])
    return out


def _homeless(k: int, disks: frozenset[str]) -> str:
    """Why rank k finds no pair: no free GPU is paired with the disk of shard k."""
    if not disks:
        return f"shard {k} has no disk: fewer GPU<->SSD pairs than ranks"
    return (f"no free GPU is paired with disk {', '.join(sorted(disks))}, where shard {k} is (or is cut: shard k "
            f"goes on pair k's disk), so rank {k} would stream it from another pair's SSD")


def _other_ranks(request: Request, node: NodeView, free: Sequence[tuple[int, str]], first: int,
                 taken: dict[str, int], shard: int, staged: set[tuple[int, str]],
                 homes: dict[int, frozenset[str]]) -> tuple[tuple[tuple[int, str], ...] | None, str]:
    """Pairs for ranks 1..N-1 whose disk holds shard k (or will: `homes`) and has room for the rank's KV and its
    shard, counting what the node's claims and the ranks already chosen take on that disk; the lowest free GPU
    among them; (None, why) when fewer than N-1 fit."""
    out: list[tuple[int, str]] = []
    left = [(g, d) for g, d in free if g != first]
    for k in range(1, request.tensor_parallel):
        why = _homeless(k, homes[k])
        for gpu, disk_name in sorted((p for p in left if p[1] in homes[k]), key=lambda p: p[0]):
            need = request.kv_bytes + (0 if (k, disk_name) in staged else shard)
            room = node.disks[disk_name].free_bytes - taken.get(disk_name, 0)
            if room < need:
                why = (f"disk {disk_name} (GPU {gpu}) has {_gib(room)} free, needs {_gib(need)} for rank {k}'s KV "
                       f"({_gib(request.kv_bytes)}) and shard ({_gib(need - request.kv_bytes)})")
                continue
            taken[disk_name] = taken.get(disk_name, 0) + need
            out.append((gpu, disk_name))
            left.remove((gpu, disk_name))
            break
        else:
            return None, why
    return tuple(out), ""


def _copies_by_disk(node: NodeView, model_id: str) -> dict[str, ModelCopy]:
    """node.model(model_id, disk) for every disk at once (a Ready copy wins over another state)."""
    out: dict[str, ModelCopy] = {}
    for m in node.models:
        if m.id == model_id and (m.disk not in out or (out[m.disk].state != "Ready" and m.state == "Ready")):
            out[m.disk] = m
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}Gi"


# ------------------------------------------------------------------------------------ FlashNode parsing


def node_view(body: Mapping[str, Any], *, cordoned: bool = False) -> NodeView:
    """A NodeView from a FlashNode object; tolerant of a half-written status (the agent fills it in).

    `cordoned`: the Kubernetes Node of that name has `spec.unschedulable` (read from the Node, not the FlashNode).
    """
    spec, status = body.get("spec") or {}, body.get("status") or {}
    cache = status.get("kvCache") or {}
    name = spec.get("nodeName") or body.get("metadata", {}).get("name", "")
    disks = {
        d["name"]: Disk(
            name=d["name"],
            path=d.get("path", ""),
            free_bytes=int(d.get("freeBytes") or 0),
            read_gbps=float(d.get("readGBps") or 0.0),
            write_gbps=float(d.get("writeGBps") or 0.0),
        )
        for d in status.get("disks") or []
        if d.get("name")
    }
    models = tuple(
        ModelCopy(
            id=m["id"],
            disk=m.get("disk", ""),
            state=m.get("state", "Pending"),
            bytes=int(m.get("bytes") or 0),
            progress=float(m.get("progress") or 0.0),
            message=m.get("message", ""),
            tensor_parallel=int(m.get("tensorParallel") or 1),
            shards=tuple(ShardCopy(rank=int(sh["rank"]), disk=sh.get("disk", ""), state=sh.get("state", "Pending"),
                                   gpu=int(sh["gpu"]) if sh.get("gpu") is not None else None,
                                   progress=float(sh.get("progress") or 0.0), message=sh.get("message", ""))
                         for sh in m.get("shards") or [] if sh.get("rank") is not None),
        )
        for m in status.get("models") or []
        if m.get("id")
    )
    return NodeView(
        name=name,
        heartbeat=parse_time(status.get("heartbeat")),
        disks=disks,
        pairs=tuple((int(p["gpu"]), p["disk"]) for p in status.get("pairs") or [] if "gpu" in p and "disk" in p),
        models=models,
        kv_jobs=frozenset(a["job"] for a in status.get("kvAllocations") or [] if a.get("job")),
        desired=frozenset(m["id"] for m in spec.get("models") or [] if m.get("id")),
        desired_tp={m["id"]: int(m["tensorParallel"]) for m in spec.get("models") or []
                    if m.get("id") and int(m.get("tensorParallel") or 1) > 1},
        cordoned=cordoned,
        gpu_h2d_gbps={int(g["index"]): float(g["h2dGBps"]) for g in status.get("gpus") or []
                      if g.get("index") is not None and g.get("h2dGBps")},
        kv_cache_budget=int(cache.get("budgetBytes") or 0),
        kv_cached={(e["disk"], e["namespace"], e["modelId"]): int(e.get("blocks") or 0)
                   for e in cache.get("entries") or [] if e.get("disk") and e.get("namespace") and e.get("modelId")},
        kv_prefixes={(e["disk"], e["namespace"], e["modelId"]): frozenset(p for p in e["prefixes"] if isinstance(p, str))
                     for e in cache.get("entries") or []
                     if e.get("disk") and e.get("namespace") and e.get("modelId") and isinstance(e.get("prefixes"), list)},
    )


def claim_of(body: Mapping[str, Any], *, kv_bytes: int) -> Claim | None:
    """The hold an InferenceJob has on a node, from its status (None unless placed and not finished)."""
    status = body.get("status") or {}
    if status.get("phase") not in ("Scheduled", "Staging", "Running") or not status.get("node"):
        return None
    meta = body.get("metadata", {})
    gpus = tuple(status.get("gpus") or ([status["gpu"]] if status.get("gpu") is not None else []))
    return Claim(
        job=f"{meta.get('namespace')}/{meta.get('name')}",
        node=status["node"],
        gpus=gpus,
        disk=status.get("disk", ""),
        kv_bytes=kv_bytes,
    )
