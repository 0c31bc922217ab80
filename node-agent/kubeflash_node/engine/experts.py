"""Routed-expert reading: a mixture-of-experts layer's stage is read without its experts, and the experts the
router picks are read when it has picked them: the streamer coalesces the routed set into runs (the store writes
expert after expert, so neighbouring experts are one contiguous range) and reads them in large tasks all in flight at
once, as it reads a whole layer (`expert_runs`, `StagedExpert`, `WeightStreamer._read_experts`).

The converter writes a MoE layer as its attention, norms and router first, then e0.w_gate, e0.w_up, e0.w_down,
e1.…: the part before the first expert is read like any stage (ahead of compute, into the streamer's ring);
`RoutedWeights` holds it and reads expert j the first time model.moe asks for `e{j}.…`, so a layer moves the
bytes of the experts its micro-batch routes to instead of all of them. `ExpertCache` keeps the most often
routed experts on the compute device across steps, within a byte budget, so a hot expert is read once.

The routing counts persist per model: `save_routing` writes them (per layer file, per expert) to
`<model dir>/.routing.json` when the engine closes (temp file, fsync, rename; best effort, as a pod's read-only model
volume cannot take it), `load_routing` reads them back, and `ExpertCache.warm_start` seeds the next run's counts and
reads the most routed experts into the budget before the first step, so the hot set starts warm. Where the model
directory cannot be written (a pod's read-only CSI model volume), `RoutingFiles` writes the counts to
`<job dir>/routing.json` instead (same format, same crash-safe write), and a later run can be seeded from that file
explicitly (`kubeflash run --routing-from FILE`, `Engine(routing_seed=...)`).

Expert prefetch (`Policy.expert_prefetch`, off by default; `kubeflash bench --expert-prefetch`): before a MoE
layer's attention runs, model.llama_layer applies that layer's router to the hidden state entering the layer
(attention changes the residual stream little) and hands the predicted experts to `RoutedWeights.prefetch`, which
starts their reads on the reader pool while attention computes (`EarlyReads`: a plain disk read, no hot-cache
bookkeeping yet). When the true router has run, `want` takes the predicted reads it needs over (the hot cache then
counts and keeps them exactly as it does an on-demand read) and reads only the mispredicted experts on demand,
cancelling the predicted reads not started yet (queued ahead, they would delay the on-demand ones); a predicted
expert read but never routed is counted as bytes read for nothing when the stage is released (`finish`). The expert
tensors are the same bytes either way, so outputs do not change. `PrefetchStats` holds the hit rate and the unused
bytes for the run report.
"""

from __future__ import annotations

import heapq
import json
import re
import sys
from collections import Counter
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..store.format import FileEntry, Manifest, atomic_write_json
from ..store.routing import JOB_ROUTING_FILE, ROUTING_FILE, ROUTING_FORMAT  # noqa: F401  (names used here and by tests)
from ..store.routing import MAX_BYTES as ROUTING_MAX_BYTES

_EXPERT = re.compile(r"^e(\d+)\.")


def expert_of(name: str) -> int | None:
    m = _EXPERT.match(name)
    return int(m.group(1)) if m else None


def expert_ranges(entry: FileEntry) -> tuple[int, dict[int, tuple[int, int]]]:
    """(bytes before the first expert, expert -> [start, end) byte range in the stage file); (size, {}) for a
    stage without experts. Raises if an expert's tensors are not one contiguous run (a store written otherwise)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for name, e in entry.tensors.items():
        j = expert_of(name)
        if j is not None:
            spans.setdefault(j, []).append((e.offset, e.offset + e.nbytes))
    if not spans:
        return entry.size, {}
    ranges = {j: (min(s for s, _ in v), max(t for _, t in v)) for j, v in spans.items()}
    prefix = min(s for s, _ in ranges.values())
    others = [e for n, e in entry.tensors.items() if expert_of(n) is None]
    if any(e.offset >= prefix for e in others):
        raise ValueError("store: a MoE layer's non-expert tensors must precede its experts (re-convert the model)")
    for j, (s, t) in ranges.items():
        inside = [n for n, e in entry.tensors.items() if s <= e.offset < t]
        if any(expert_of(n) != j for n in inside):
            raise ValueError(f"store: expert {j}'s tensors are not contiguous (re-convert the model)")
    return prefix, ranges


@dataclass
class PrefetchStats:
    """Expert prefetch over a run: `routed` experts picked by the routers (once per streamed layer use), `hits` of
    them predicted before attention, `issued` prefetch reads started (`bytes`), `unused` of those never routed
    (`unused_bytes`: read for nothing)."""

    routed: int = 0
    hits: int = 0
    issued: int = 0
    bytes: int = 0
    unused: int = 0
    unused_bytes: int = 0

    def describe(self) -> dict:
        """The run report's `expert_prefetch` entry."""
        return {"routed": self.routed, "predicted_hits": self.hits,
                "hit_rate": self.hits / self.routed if self.routed else 0.0, "reads_issued": self.issued,
                "bytes_prefetched": self.bytes, "unused_reads": self.unused, "bytes_unused": self.unused_bytes}


@dataclass
class EarlyReads:
    """The streamer's side of one stage's expert prefetch: `fetch(j)` reads expert j from disk (no hot-cache
    bookkeeping), `kept(j)` says it is in the hot cache (nothing to read), `confirm(j, tensors)` counts a routed
    prefetched expert in the hot cache as an on-demand read is counted (returns the tensors to use), `nbytes(j)`."""

    fetch: Callable[[int], dict[str, torch.Tensor]]
    kept: Callable[[int], bool]
    confirm: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    nbytes: Callable[[int], int]
    stats: PrefetchStats


def expert_runs(ranges: dict[int, tuple[int, int]], experts: Iterable[int], gap: int) -> list[tuple[int, int, list[int]]]:
    """The byte runs that read `experts` (their [start, end) `ranges` in the layer file): experts whose ranges are
    adjacent, or apart by at most `gap` bytes (alignment padding), share one run. [(start, end, experts in it)]."""
    out: list[tuple[int, int, list[int]]] = []
    for j in sorted(set(experts), key=lambda j: ranges[j][0]):
        start, end = ranges[j]
        if out and start - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], end), out[-1][2] + [j])
        else:
            out.append((start, end, [j]))
    return out


class StagedExpert:
    """One routed expert of a batch read (`WeightStreamer._read_experts`): `result()` waits for the read tasks
    covering its bytes, then makes its tensors once (`make()`: onto the compute device, typed, dequantized)."""

    def __init__(self, tasks: list[Future], make: Callable[[], dict[str, torch.Tensor]]):
        self._tasks, self._make, self._value = tasks, make, None

    def cancel(self) -> bool:
        return False  # its reads are shared with other experts of the same run

    def wait(self) -> None:
        """Wait for its reads only (the buffer they fill is about to be reused)."""
        for t in self._tasks:
            t.exception()

    def result(self) -> dict[str, torch.Tensor]:
        if self._value is None:
            for t in self._tasks:
                t.result()
            self._value = self._make()
            self._tasks = []
        return self._value


class RoutedWeights(dict):
    """A layer's weights whose experts are read on first use: `load(j)` returns expert j's tensors by name
    (already on the compute device, dequantized); they stay for the rest of this stage's use. `want` issues the
    reads of a set of experts at once (model.moe announces the routed set right after the router) and returns:
    through `load_many` (the streamer coalesces the set into large reads, all in flight at once; one StagedExpert
    per expert), else one `load` per expert on `pool`. Each expert's first use waits for its own bytes only, so the
    first routed expert computes while the others' reads are still in flight."""

    def __init__(self, base: dict[str, torch.Tensor], load: Callable[[int], dict[str, torch.Tensor]],
                 pool: Executor | None = None, early: EarlyReads | None = None,
                 load_many: Callable[[list[int]], dict[int, object]] | None = None):
        super().__init__(base)
        self._load, self._pool, self._io, self._many = load, pool, early, load_many
        self._have: set[int] = set()
        self._pending: dict[int, Future] = {}
        self._early: dict[int, Future] = {}  # prefetched, not (yet) routed
        self._confirm: set[int] = set()  # pending reads that started early: the hot cache counts them on arrival
        self._predicted: set[int] = set()
        self._routed: set[int] = set()

    @property
    def prefetching(self) -> bool:
        """Whether `prefetch` reads ahead (model.llama_layer then predicts this layer's experts before attention)."""
        return self._io is not None and self._pool is not None

    def prefetch(self, experts: Iterable[int]) -> None:
        """Start reading the predicted `experts` (those neither held, in flight nor in the hot cache); returns."""
        for j in experts:
            self._predicted.add(j)
            if j in self._have or j in self._pending or j in self._early or self._io.kept(j):
                continue
            self._early[j] = self._pool.submit(self._io.fetch, j)
            self._io.stats.issued += 1
            self._io.stats.bytes += self._io.nbytes(j)

    def _drop_queued(self) -> None:
        """Cancel the prefetch reads not started yet (they are then not counted as issued)."""
        for j in [j for j, fut in self._early.items() if fut.cancel()]:
            del self._early[j]
            self._io.stats.issued -= 1
            self._io.stats.bytes -= self._io.nbytes(j)

    def ready_first(self, experts: list[int]) -> list[int]:
        """`experts` with those already held or read since before the router first (stable otherwise)."""
        return sorted(experts, key=lambda j: not (j in self._have or j in self._confirm))

    def finish(self) -> None:
        """The stage is done: prefetched experts never routed were read for nothing (cancelled if not started)."""
        if self._io is None:
            return
        self._drop_queued()
        for j in self._early:
            self._io.stats.unused += 1
            self._io.stats.unused_bytes += self._io.nbytes(j)
        self._early.clear()

    def want(self, experts: Iterable[int]) -> None:
        experts = list(experts)
        if self._io is not None:
            new = [j for j in experts if j not in self._routed]
            self._routed.update(new)
            self._io.stats.routed += len(new)
            self._io.stats.hits += sum(j in self._predicted for j in new)
            for j in experts:
                if j in self._early:
                    self._pending[j] = self._early.pop(j)
                    self._confirm.add(j)
            self._drop_queued()  # mispredicted reads not started yet would only delay the on-demand ones
        missing = [j for j in experts if j not in self._have and j not in self._pending]
        if self._many is not None and missing:  # the streamer reads the whole set at once (StagedExpert each)
            self._pending.update(self._many(missing))
            return
        if self._pool and len(missing) > 1:
            for j in missing:
                self._pending[j] = self._pool.submit(self._load, j)
            return
        for j in missing:
            self._have.add(j)
            self.update(self._load(j))

    def __missing__(self, name: str) -> torch.Tensor:
        j = expert_of(name)
        if j is None or j in self._have:
            raise KeyError(name)
        if j not in self._pending:
            self.want([j])
        if j in self._pending:
            tensors = self._pending.pop(j).result()
            if j in self._confirm:
                self._confirm.discard(j)
                tensors = self._io.confirm(j, tensors)
            self._have.add(j)
            self.update(tensors)
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default


class ExpertCache:
    """Hot experts kept on the compute device, chosen from observed routing counts: every request counts; an expert
    read from disk is kept while the budget allows, or in place of kept experts requested fewer times (a lazy
    min-heap of (count when pushed, key) finds them; stale entries are re-pushed with their current count)."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.kept: dict[tuple[int, int], tuple[dict[str, torch.Tensor], int]] = {}
        self.counts: Counter = Counter()
        self.heap: list[tuple[int, tuple[int, int]]] = []
        self.hits = self.misses = 0
        self.warming = False

    def warm_start(self, counts: Counter, fetch: Callable[[tuple[int, int]], object]) -> int:
        """Seed the request counts with an earlier run's and read the most requested experts until the budget is
        full (`fetch(key)` reads expert `key` from disk and offers it here); returns how many are kept."""
        self.counts.update(counts)
        self.warming = True
        try:
            for key, _ in counts.most_common():
                if self.budget <= self.used:
                    break
                fetch(key)
                if key not in self.kept:
                    break  # the budget is full of experts routed at least as often
        finally:
            self.warming = False
        return len(self.kept)

    def get(self, key: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        """Expert `key` = (stage, j) if kept; counts the request either way (not the reads of warm_start)."""
        if self.warming:
            return None
        self.counts[key] += 1
        if key in self.kept:
            self.hits += 1
            return self.kept[key][0]
        self.misses += 1
        return None

    def offer(self, key: tuple[int, int], tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if nbytes > self.budget or key in self.kept:
            return
        while self.used + nbytes > self.budget:
            if not self.heap:
                return
            count, victim = self.heap[0]
            if victim not in self.kept:
                heapq.heappop(self.heap)
            elif count != self.counts[victim]:  # requested since it was pushed: re-push with its count
                heapq.heapreplace(self.heap, (self.counts[victim], victim))
            elif count >= self.counts[key]:
                return  # every kept expert is routed at least as often as this one
            else:
                heapq.heappop(self.heap)
                self.used -= self.kept.pop(victim)[1]
        self.kept[key] = (tensors, nbytes)
        self.used += nbytes
        heapq.heappush(self.heap, (self.counts[key], key))


def load_routing(model_dir: Path, manifest: Manifest, routed: dict[int, tuple[int, dict]],
                 path: Path | None = None) -> Counter:
    """Routing counts an earlier run saved for this model (`path`, default `<model_dir>/.routing.json`), keyed
    (stage, expert), only for the routed stages and experts this store has; an absent, unreadable or foreign file
    gives no counts (a warning names a bad one)."""
    path = Path(path) if path is not None else Path(model_dir) / ROUTING_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(ROUTING_MAX_BYTES + 1)
    except OSError:
        return Counter()
    stages = {name: i for i, name in enumerate(manifest.stages)}
    out: Counter = Counter()
    try:
        data = json.loads(raw) if len(raw) <= ROUTING_MAX_BYTES else None
        if not isinstance(data, dict) or data.get("format") != ROUTING_FORMAT:
            raise ValueError(f"expected a JSON object with format {ROUTING_FORMAT!r}")
        for name, experts in data["layers"].items():
            stage = stages.get(name)
            for j, n in experts.items():
                if stage in routed and int(j) in routed[stage][1] and isinstance(n, int) and n > 0:
                    out[(stage, int(j))] = n
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"kubeflash: {path}: ignored ({e})", file=sys.stderr)
        return Counter()
    return out


def save_routing(model_dir: Path, manifest: Manifest, counts: Counter, path: Path | None = None) -> bool:
    """Write `counts` ((stage, expert) -> requests) to `path` (default `<model_dir>/.routing.json`), crash-safely;
    False where the directory cannot be written (a read-only model volume)."""
    layers: dict[str, dict[str, int]] = {}
    for (stage, j), n in sorted(counts.items()):
        layers.setdefault(manifest.stages[stage], {})[str(j)] = int(n)
    try:
        atomic_write_json(Path(path) if path is not None else Path(model_dir) / ROUTING_FILE,
                          {"format": ROUTING_FORMAT, "layers": layers})
    except OSError:
        return False
    return True


@dataclass
class RoutingFiles:
    """Where one engine reads its starting routing counts and writes its final ones.

    Read: `seed` when given (an earlier job's `<job dir>/routing.json`, passed explicitly), else the model's
    `.routing.json`. Write: the model's `.routing.json`; where the model directory is read-only, `<job_dir>/
    routing.json`. `loaded` and `saved` record the files actually used (None: none), for the run report."""

    model_dir: Path
    job_dir: Path | None = None
    seed: Path | None = None
    loaded: Path | None = None
    saved: Path | None = None

    def load(self, manifest: Manifest, routed: dict[int, tuple[int, dict]]) -> Counter:
        path = Path(self.seed) if self.seed is not None else Path(self.model_dir) / ROUTING_FILE
        counts = load_routing(self.model_dir, manifest, routed, path)
        self.loaded = path if counts else None
        return counts

    def save(self, manifest: Manifest, counts: Counter) -> Path | None:
        for path in [Path(self.model_dir) / ROUTING_FILE] + \
                ([Path(self.job_dir) / JOB_ROUTING_FILE] if self.job_dir is not None else []):
            if save_routing(self.model_dir, manifest, counts, path):
                self.saved = path
                return path
        return None

    def describe(self) -> dict:
        """The report's `routing` entry: where the counts came from and where they went."""
        return {"seeded_from": str(self.loaded) if self.loaded else None,
                "saved_to": str(self.saved) if self.saved else None}
