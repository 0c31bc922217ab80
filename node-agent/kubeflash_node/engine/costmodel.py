"""Cost model: predict a job's time under candidate policies from measured ceilings, keep those that fit the GPU
and CPU memory budgets, pick the fastest and say which resource bounds it.

Pure (no torch). The schedule reads stage j+1 (disk -> pinned host -> GPU, `prefetch` deep) while stage j runs
for every micro-batch of the block, and a micro-batch's KV copies to and from the device run on the compute stream,
so
    t_stage = max(t_disk, t_pcie, t_compute + t_kv)      t_run = sum over blocks, steps, stages of t_stage
plus a one-time setup that reads the resident stages. The disk KV tier's prefix reads and its writes (a prefill
writes the whole prompt's K and V) run on their own threads: they count in t_disk, beside streamed weights, so they
overlap compute (the larger of the two, never the sum). Compute is the GPU's work, FLOPs / (matmul peak x
efficiency) plus the weights' HBM reads, and a fixed per-(layer, micro-batch) overhead (Python and kernel launches):
added to the GPU's work, except for a resident layer over a device cache, whose call waits on nothing of the host,
so the CPU launches ahead and the call takes the larger of the two. Calibration holds those constants, fitted to
the H100 runs in docs/bench-results (docs/costmodel.md has the fit and the errors).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, replace

from ..store.modelconfig import ModelConfig
from .policy import Policy, make_policy

GB = 1e9
QUANT_BITS = {"none": 16, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class JobShape:
    """What the job asks for: sequences, (max) prompt tokens, tokens generated per sequence."""

    prompts: int
    prompt_len: int
    gen_len: int


@dataclass(frozen=True)
class Budget:
    """Memory the job may use, and room for its KV cache on the paired SSD (bytes)."""

    gpu_bytes: int
    cpu_bytes: int
    disk_bytes: int = 1 << 62  # spec.resources.kvDisk; unbounded for `kubeflash bench`


@dataclass(frozen=True)
class Calibration:
    """Constants the ceilings do not give; defaults fitted to the H100 runs (docs/costmodel.md)."""

    compute_efficiency: float = 0.5  # attained / measured matmul peak over a layer (prefill runs: 0.47-0.64)
    layer_overhead_s: float = 1.5e-3  # per (layer, micro-batch): launches + Python (decode runs: 1.3-1.9 ms)
    hbm_gbps: float = 3000.0  # GPU memory bandwidth: a decode micro-batch reads the layer's weights once
    dequant_gbps: float = 600.0  # dequantized bytes per second on the GPU (fused kernel; fitted to the int4 peer run)
    recompute_efficiency: float = 0.85  # X-cache: K, V rebuilt by one [B*T, H] x [H, 2 kv] GEMM (opt-30b, 64 x 528: 0.9)
    cpu_attention_gbps: float = 20.0  # float32 KV bytes CPU attention scans per second (assumed, not yet measured)
    host_lock_gbps: float = 6.0  # page-locking a block's host KV cache, behind its prefill (H100, huge pages: 7.0)
    neuron_read_op_s: float = 20e-6  # per neuron-bundle read (a run of active neurons) where the ceilings have no
    # measured one (Ceilings.disk_read_op_s, bench.measure_read_op); assumed
    expert_read_share: float = 1.0  # routed experts' read rate / disk_read_cold. One read per expert ran at 0.82 (H200,
    # session 9, Qwen3-30B-A3B int8: 0.99-1.01 GB/s at batch 4-64 against the probe's 1.22; whole layers 1.55 GB/s);
    # read as one batch (coalesced runs in task-size reads, all in flight) they ran at 0.82-1.09x of a whole layer's
    # rate with 16 reader threads (CPU, bench/moe_reads.py, docs/moe.md; 4 threads: 0.44-1.14x, small sets bound by
    # latency); not yet re-measured on the GPU
    merge_gbps: float = 3.0  # read rate that prices a merged read's extra rows when no disk ceiling is known (assumed)
    gpu_reserve_bytes: int = 1 << 30  # CUDA context and allocator slack beyond the tensors counted
    host_base_bytes: int = 2 << 30  # the process itself (Python, torch, CUDA runtime)
    routing: RoutingProfile | None = None  # a MoE model's measured routing (None: uniform routing, assumed)


@dataclass(frozen=True)
class RoutingProfile:
    """Measured routing of one MoE model: the mean distinct experts one layer read routed to, at a few read shapes
    (sequences sharing the read, tokens of each: a prefill read takes every prompt token, a decode read one).

    Uniform routing (ModelConfig.expected_experts) takes every token of a read as an independent pick of k experts
    out of E. Measured reads route to fewer: a prompt's tokens share experts and some experts are picked more often
    (session 9, Qwen3-30B-A3B random weights: 8 prompt tokens -> 18 experts against 51.6 uniform, 64 decode tokens ->
    94.8 against 125.9). A point is kept as its effective tokens, n = ln(1 - D/E) / ln(1 - k/E) (the tokens a
    uniform router needs for D distinct experts), over its tokens; another shape takes the ratio of the points of
    its kind (prefill or decode), interpolated in log(tokens) between the nearest two, held beyond them, never
    above 1 (uniform) and never under one token's k experts."""

    points: tuple[tuple[int, int, float], ...]  # (sequences, tokens of each, distinct experts a layer read)

    @classmethod
    def from_report(cls, d: dict) -> RoutingProfile | None:
        """The profile a run recorded (`routing_profile` of its report, or of a bench JSON's `report`); None where it
        has none (a dense model, every expert read, expert prefetch on, or a run from before the engine recorded it)."""
        r = d.get("report", d) if isinstance(d, dict) else {}
        pts = r.get("routing_profile") if isinstance(r, dict) else None
        if not pts:
            return None
        return cls(tuple((int(s), int(t), float(n)) for s, t, n in pts))

    def distinct(self, c: ModelConfig, sequences: int, per_seq: int) -> float:
        """Expected distinct experts one layer read of `sequences` x `per_seq` tokens routes to."""
        tokens = max(1, sequences * per_seq)
        kind = sorted((s * t, _effective_tokens(c, d) / (s * t)) for s, t, d in self.points
                      if (t > 1) == (per_seq > 1) and s * t > 0)
        if not kind or not c.num_experts:
            return c.expected_experts(tokens)
        lo = max((pt for pt in kind if pt[0] <= tokens), default=kind[0])
        hi = min((pt for pt in kind if pt[0] >= tokens), default=kind[-1])
        f = 0.0 if hi[0] == lo[0] else (math.log(tokens) - math.log(lo[0])) / (math.log(hi[0]) - math.log(lo[0]))
        ratio = min(1.0, lo[1] + f * (hi[1] - lo[1]))
        return c.expected_experts(max(1.0, ratio * tokens))


def _effective_tokens(c: ModelConfig, distinct: float) -> float:
    """Tokens a uniform router sends to `distinct` experts of a layer (inverse of ModelConfig.expected_experts)."""
    e, k = c.num_experts, c.num_experts_per_tok
    share = min(distinct, e - 1e-6) / e
    return math.log(1 - share) / math.log(1 - k / e)


@dataclass(frozen=True)
class SparseCost:
    """How a sparse run (spec.offload.sparsity with neuron bundles, sparse.py) reads a streamed layer: everything but
    its up/down matrices ahead of compute, then on the compute thread one bundle per active neuron not held."""

    target: float  # share of a token's FFN activations dropped (the calibrated target)
    hot_bytes: int = 0  # resident hot neuron bundles over all layers (device memory)
    hot_hit: float = 0.0  # share of active-neuron requests the hot set serves (calibration frequency; else its size share)
    window_hit: float = 0.0  # share of a decode step's active neurons the window still holds (0 unless measured)
    gap: int | None = None  # runs this many inactive neurons apart are read as one (None: merge_gap from the disk)
    # "gate": CATS, the gate read ahead with the layer, up/down per active neuron from the bundles; "input": TEAL,
    # gate/up columns per kept input channel and down columns per kept neuron from the input-channel files, nothing
    # of the FFN read ahead (hot_bytes, hot_hit and window_hit unused: its hot set is channel_hot_* below)
    method: str = "gate"
    # with method "input": the attention's inputs thresholded too (attnsparse.py): q/k/v columns per kept attention
    # input channel and o columns per kept attention output channel from the attention channel files
    attention: bool = False
    # with method "input": its hot set (channelcache.py, chosen and priced by channelcache.hot_rows/hot_pricing from
    # the calibration's keep frequencies): bytes held in host memory; the held rows as (keep frequency, bytes over
    # all layers) pairs, never read from the SSD; the expected share of a decode token's kept-row bytes it serves.
    # The window (channel_window, 0 in a job) is not priced.
    channel_hot_bytes: int = 0
    channel_hot: tuple[tuple[float, int], ...] = ()
    channel_hit: float = 0.0
    # its device tier (channelcache.hot_tiers: the most frequent rows, where the GPU budget leaves room after the
    # plan's own use): bytes in GPU memory, and its rows as (keep frequency, bytes) pairs, neither read from the SSD
    # nor copied host->device (the host tier's rows above are not read, but cross PCIe each call); channel_hit is
    # both tiers'
    channel_gpu_bytes: int = 0
    channel_gpu: tuple[tuple[float, int], ...] = ()

    def channel_saved(self, tokens: int, *, host: bool = True, device: bool = True) -> float:
        """Expected bytes over all layers one call of `tokens` tokens finds in the input hot set (its host and/or
        device tier) instead of reading them: a held row kept on a share f of the calibration's tokens is needed with
        probability 1 - (1 - f)^tokens (as layerreads.choose_layers prices it)."""
        pairs = (self.channel_hot if host else ()) + (self.channel_gpu if device else ())
        return sum(b * (1 - (1 - f) ** max(tokens, 1)) for f, b in pairs)

    def read_share(self, tokens: int, decode: bool) -> float:
        """Expected share of a layer's neurons whose bundles one call of `tokens` tokens reads: the union of the
        tokens' active sets (each neuron active with probability 1 - target, independently), less what is held."""
        held = self.hot_hit + (1 - self.hot_hit) * (self.window_hit if decode else 0.0)
        return (1 - self.target ** max(tokens, 1)) * (1 - held)


@dataclass(frozen=True)
class Candidate:
    """A policy plus the weight quantization of the store it would read, and whether its FFN reads are sparse."""

    policy: Policy
    quantization: str = "none"  # none | int8 | int4
    sparse: SparseCost | None = None  # None: dense reads (every streamed layer read whole)


@dataclass
class Prediction:
    """Predicted time and memory of one candidate."""

    candidate: Candidate
    run_s: float  # the generation itself (what `kubeflash bench` reports as measured_s)
    setup_s: float  # reading the resident stages once
    resource_s: dict[str, float]  # summed per-stage time of each resource (disk, pcie, compute)
    bound_s: dict[str, float]  # run time during which each resource was the slowest
    gpu_bytes: int
    cpu_bytes: int
    tokens: int
    placement: dict[str, int] = field(default_factory=dict)
    lock_s: float = 0.0  # of run_s: page-locking the host KV cache that its block's prefill does not hide
    # per phase ("prefill": step 0 of every block, "decode": the other steps): (resource_s, bound_s) as above
    phases: dict[str, tuple[dict[str, float], dict[str, float]]] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.run_s + self.setup_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s else 0.0

    @property
    def bound(self) -> str:
        return max(self.bound_s, key=self.bound_s.get)

    def why(self) -> str:
        share = self.bound_s[self.bound] / self.run_s if self.run_s else 0.0
        parts = ", ".join(f"{k} {v:.3g} s" for k, v in self.resource_s.items())
        lock = f"; {self.lock_s:.3g} s page-locking the host KV cache" if self.lock_s else ""
        phases = "".join(f"; {self.phase_why(ph)}" for ph in self.phases if self.phase_s(ph))
        return (f"{self.bound}-bound: the slowest resource in {share:.0%} of the run (summed stage time: {parts})"
                f"{lock}{phases}")

    def phase_s(self, phase: str) -> float:
        """Predicted seconds of one phase (prefill or decode; decode holds the page-locking prefill did not hide)."""
        return sum(self.phases[phase][1].values()) + (self.lock_s if phase == "decode" else 0.0)

    def phase_bound(self, phase: str) -> tuple[str, float]:
        """(the resource that bounds the phase, how many times the next resource's summed time it is): the one
        slowest in most of the phase's stages, against the largest other resource's summed stage time."""
        res, bound = self.phases[phase]
        top = max(bound, key=bound.get)
        other = max((v for k, v in res.items() if k != top), default=0.0)
        return top, res[top] / other if other else float("inf")

    def phase_summary(self) -> dict[str, dict]:
        """Per phase: predicted seconds, the bounding resource, how many times the next one's time it is, and the
        summed stage time of each resource (what `kubeflash plan --json` writes)."""
        out = {}
        for ph, (res, _) in self.phases.items():
            top, margin = self.phase_bound(ph)
            out[ph] = {"s": self.phase_s(ph), "bound": top, "times_next": None if margin == float("inf") else margin,
                       "resource_s": dict(res)}
        return out

    def phase_why(self, phase: str) -> str:
        res, bound = self.phases[phase]
        top, margin = self.phase_bound(phase)
        share = bound[top] / sum(bound.values()) if sum(bound.values()) else 0.0
        nxt = max((k for k in res if k != top), key=res.get)
        by = f"{margin:.2g}x {nxt} {res[nxt]:.3g} s" if margin != float("inf") else "nothing else used"
        return (f"{phase} {self.phase_s(phase):.3g} s {top}-bound ({share:.0%} of its stages; {top} {res[top]:.3g} s "
                f"= {by})")


# ------------------------------------------------------------------------------------------- sizes


def layer_matrix_params(c: ModelConfig) -> int:
    """Parameters of a layer's big matrices (the ones quantization packs)."""
    h, i = c.hidden_size, c.intermediate_size
    mlp = (2 if c.architecture == "opt" else 3) * h * i * max(1, c.num_experts)  # MoE: every expert's three
    return h * c.q_dim + 2 * h * c.kv_dim + c.q_dim * h + mlp


def packed_bytes(bits: int, group: int = 64) -> float:
    """Stored bytes per value: float at 16 bits, else codes + float16 scale and zero per group."""
    return 2.0 if bits == 16 else bits / 8 + 4 / group


def stage_sizes(c: ModelConfig, itemsize: int, quantization: str = "none") -> tuple[list[int], list[int]]:
    """(stored, dense) bytes per stage (embed, layers, head), estimated from the config: stored is what disk
    and PCIe carry; dense is the dequantized layer in the compute dtype."""
    dense_layer = c.layer_params() * itemsize
    mat = layer_matrix_params(c)
    bits = QUANT_BITS[quantization]
    stored_layer = dense_layer if bits == 16 else int(mat * packed_bytes(bits) + (c.layer_params() - mat) * itemsize)
    embed, head = c.embed_params() * itemsize, c.head_params() * itemsize
    n = c.num_layers
    return [embed] + [stored_layer] * n + [head], [embed] + [dense_layer] * n + [head]


# ------------------------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class _Env:
    c: ModelConfig
    ceil: object  # bench.Ceilings (duck-typed: disk_read_cold, disk_read_warm, disk_write, h2d_pinned, matmul_tflops)
    job: JobShape
    budget: Budget
    cal: Calibration
    itemsize: int  # compute dtype bytes


def _rate(nbytes: float, gbps: float) -> float:
    return nbytes / (gbps * GB) if nbytes and gbps else 0.0


def _blocks(job: JobShape, p: Policy) -> list[tuple[int, list[int]]]:
    """(how many such blocks, micro-batch sizes) for the full blocks and the remainder block."""
    full, rest = divmod(job.prompts, p.block_size)
    out = [(full, [p.gpu_batch_size] * p.num_gpu_batches)] if full else []
    if rest:
        whole, part = divmod(rest, p.gpu_batch_size)
        out.append((1, [p.gpu_batch_size] * whole + ([part] if part else [])))
    return out


def _packed(d: int, bits: int, itemsize: int) -> float:
    """Bytes of a row of d values: as computed, or the KV codec's codes + float16 scale and zero per group."""
    return itemsize * d if bits == 16 else d * bits / 8 + 4 * (d // min(64, d))


def _kv_row(e: _Env, bits: int, x: bool = False) -> float:
    """Bytes of one token's cache of one layer for one sequence, as the cpu/disk tiers hold it: K and V, or
    (X-cache) the layer input X held as two halves of H/2."""
    if x:
        return 2 * _packed(e.c.hidden_size // 2, bits, e.itemsize)
    return 2 * e.c.num_kv_heads * _packed(e.c.head_dim, bits, e.itemsize)


def _kv_token(e: _Env, p: Policy, *, host: bool = False) -> float:
    """Bytes of one token's cache over every layer for one sequence: K and V, or X on the X-cache layers; `host`:
    as the cpu tier holds it (CPU attention keeps its K and V in float32, twice the bytes)."""
    nx = len(p.x_layers(e.c.num_layers))
    kv = _kv_row(e, p.kv_bits) * (2 if host and p.cpu_attention else 1)
    return (e.c.num_layers - nx) * kv + nx * _kv_row(e, p.kv_bits, x=True)


def kv_link_bytes(c: ModelConfig, p: Policy, itemsize: int) -> tuple[float, float]:
    """(bytes read back per cached token, bytes written out per new token) over every layer for one sequence
    when the cache is off the device: K and V, or X on the X-cache layers; CPU attention reads nothing back (the
    scan runs where the cache is) and writes its float32 rows."""
    e = _Env(c, None, JobShape(1, 1, 2), Budget(0, 0), Calibration(), itemsize)
    full = _kv_token(e, p)
    if not p.cpu_attention:
        return full, full
    scanned = (c.num_layers - len(p.x_layers(c.num_layers))) * _kv_row(e, p.kv_bits)  # K, V left on the host
    return full - scanned, _kv_token(e, p, host=True)


def x_cache_saves(c: ModelConfig) -> bool:
    """X (H values a token) is smaller than K + V (2 x Nk x D): true for multi-head attention, false for GQA
    models whose K + V is already smaller."""
    return c.hidden_size < 2 * c.kv_dim


def x_cache_note(c: ModelConfig) -> str:
    verdict = "saves bytes" if x_cache_saves(c) else "costs bytes, not used"
    return (f"X-cache {verdict} for this model: X is {c.hidden_size} values a token and layer, K + V "
            f"{2 * c.kv_dim}")


def x_cache_fits(c: ModelConfig, bits: int) -> bool:
    """X can be held by the tier: two halves, each a multiple of the KV codec's group when compressed."""
    half = c.hidden_size // 2
    return c.hidden_size % 2 == 0 and (bits == 16 or half % min(64, half) == 0)


def _layer_compute(e: _Env, b: int, s_new: int, ctx: int, dense: int) -> float:
    """GPU seconds of one layer for one micro-batch of b sequences adding s_new tokens to a cache of ctx-s_new: its
    FLOPs and one read of its dense weights (the per-call overhead is _stage's)."""
    f0 = e.c.layer_flops_per_token(0)
    f1 = e.c.layer_flops_per_token(1) - f0
    prev = ctx - s_new
    flops = b * (s_new * f0 + f1 * (s_new * prev + s_new * (s_new + 1) / 2))
    return _rate(flops, e.ceil.matmul_tflops * 1e3 * e.cal.compute_efficiency) + _rate(dense, e.cal.hbm_gbps)


def _kv_time(e: _Env, p: Policy, b: int, s_new: int, ctx: int, kv_fits_cache: bool, x: bool = False) -> float:
    """KV work of one layer for one micro-batch on the compute stream: the new rows' copy off the device (disk tier)
    and the prefix's copy to the device from disk (the cpu tier's prefix is prefetched on a copy stream and its new
    rows stored on a store stream, after the compute that made them and overlapping the next layer's; the disk tier's
    read and write run on their own threads: those count on the link and the disk, in _stage); an X-cache layer
    recomputes the cached tokens' K, V; CPU attention scans the host KV where it lives."""
    if e.job.gen_len <= 1:
        return 0.0
    prev = ctx - s_new
    t = _rate(2 * b * prev * e.c.hidden_size * 2 * e.c.kv_dim,
              e.ceil.matmul_tflops * 1e3 * e.cal.recompute_efficiency) if x else 0.0  # GFLOP/s, as in _stage
    if p.kv == "device":  # a compressed device cache decodes its prefix every step
        return t + (_rate(ctx * b * _kv_row(e, 16, x), e.cal.dequant_gbps) if p.kv_bits != 16 else 0.0)
    if p.cpu_attention and not x:  # float32 rows scanned on the host; q, the new row and the output move
        return _rate(prev * b * 2 * e.c.kv_dim * 4, e.cal.cpu_attention_gbps) \
            + _rate(s_new * b * 2 * e.c.kv_dim * 4, e.ceil.h2d_pinned)
    row = _kv_row(e, p.kv_bits, x) * b
    load, store = prev * row, s_new * row
    if p.kv == "disk":
        t += _rate(store + load, e.ceil.h2d_pinned)
    if p.kv_bits != 16:
        t += _rate((load + store) / row * b * _kv_row(e, 16, x), e.cal.dequant_gbps)
    return t


def kv_write_s(e: _Env, p: Policy, b: int, s_new: int, x: bool = False) -> float:
    """Disk seconds of the disk KV tier writing one layer's new rows for one micro-batch (s_new tokens of b
    sequences: a prefill writes the whole prompt's K and V, a decode step one row each), at the ceilings' disk_write
    rate. The tier writes on its own thread (kvcache.DiskKV), so _stage counts this on the disk, where it overlaps
    the layer's compute and shares the disk with the tier's prefix reads and streamed weights."""
    if p.kv != "disk" or e.job.gen_len <= 1:
        return 0.0
    return _rate(s_new * b * _kv_row(e, p.kv_bits, x), e.ceil.disk_write)


def routed_layer_bytes(c: ModelConfig, stored: int, p: Policy, tokens: int, *, sequences: int = 0,
                       routing: RoutingProfile | None = None) -> float:
    """Bytes a streamed MoE layer reads for `tokens` tokens of one pass (of `sequences` sequences; 0: one token
    each): its non-expert part, plus the experts routed to that the hot-expert cache does not hold (its share of all
    layers' experts: a uniform router's hit rate). Routed to: under `routing` where measured, else expected under
    uniform routing (ModelConfig.expected_experts)."""
    experts = stored * c.expert_share()
    hit = min(1.0, p.expert_cache_bytes / (experts * c.num_layers)) if experts else 0.0
    seqs = sequences or tokens
    routed = routing.distinct(c, seqs, max(1, round(tokens / seqs))) if routing and seqs else c.expected_experts(tokens)
    return stored - experts + experts * routed / c.num_experts * (1 - hit)


# ------------------------------------------------------------------------------------------- MoE expert prefetch

EXPERT_GUESS_HIT = 0.5  # per token: share of its routed experts that the router applied to the layer's input guesses
# (assumed: no run records it per model; 50.5% was measured over a batch-1 run of random weights, docs/moe.md, and
# trained routers are reported to guess more)
PREFETCH_MARGIN = 0.01  # prefetch must be predicted this much faster; within it, reads only after the router


def guess_hit_rate(c: ModelConfig, tokens: float, per_token: float = EXPERT_GUESS_HIT) -> float:
    """Share of the distinct experts `tokens` tokens route to that the prefetch guessed, under uniform routing, each
    token's guess holding `per_token` (q) of its own k experts and, in place of the others, experts it does not route
    to: a token routes to a given expert with probability k/E, and its guess picks it without routing to it with
    (1 - q) k/E, so that expert is routed but missed with (1 - k/E)^T - (1 - (2 - q) k/E)^T and routed with
    1 - (1 - k/E)^T. At 50% a token, top-8 of 128 experts: 57% at 4 tokens (measured 59.3% over a batch-4 run,
    prefill included: docs/moe.md), 77% at 16, about all of a long prefill's."""
    k_e, t = c.num_experts_per_tok / c.num_experts, max(1.0, tokens)
    routed = 1 - (1 - k_e) ** t
    missed = (1 - k_e) ** t - max(0.0, 1 - (2 - per_token) * k_e) ** t
    return 1 - missed / routed if routed else 0.0


@dataclass(frozen=True)
class PrefetchCost:
    """The streamed MoE layers' time around their expert reads over the job, with reads only after the router
    (`off_s`) and with expert prefetch (`on_s`); bytes over the job: `routed` (experts the routers pick and the hot
    cache does not hold), `overlapped` (of those, read while attention computed), `wasted` (mispredicted, read for
    nothing); `guess` the per-token hit rate assumed and `layers` the MoE layers streamed from disk."""

    off_s: float
    on_s: float
    routed: float
    overlapped: float
    wasted: float
    attention_s: float  # the streamed layers' attention time over the job (the window prefetch reads in)
    nonexpert_s: float  # reading their non-expert parts over the job (the disk's other work)
    guess: float
    layers: int

    @property
    def on(self) -> bool:
        return self.layers > 0 and self.on_s < self.off_s * (1 - PREFETCH_MARGIN)


def _attention_s(e: _Env, p: Policy, b: int, s_new: int, ctx: int, kv_fits_cache: bool) -> float:
    """Seconds from a MoE layer's start to its router for one micro-batch: the attention projections and scores
    (layer_flops_per_token without the experts), its KV work, and half the layer's fixed overhead (assumed)."""
    c = e.c
    proj = 2 * (c.hidden_size * c.q_dim + 2 * c.hidden_size * c.kv_dim + c.q_dim * c.hidden_size)
    prev = ctx - s_new
    flops = b * (s_new * proj + 4 * c.q_dim * (s_new * prev + s_new * (s_new + 1) / 2))
    return _rate(flops, e.ceil.matmul_tflops * 1e3 * e.cal.compute_efficiency) + e.cal.layer_overhead_s / 2 \
        + _kv_time(e, p, b, s_new, ctx, kv_fits_cache)


def expert_prefetch_cost(p: Policy, *, config: ModelConfig, ceil, job: JobShape, stored: list[int],
                         cal: Calibration = Calibration(), itemsize: int = 2, guess: float = EXPERT_GUESS_HIT,
                         kv_fits_cache: bool = True) -> PrefetchCost:
    """Price expert prefetch for policy `p` (`stored`: bytes per stage as stored). Per streamed MoE layer, block and
    step (the tokens T sharing one read, R = the routed expert bytes, N = the non-expert bytes, A = attention up to
    the router, read rate = the slower of the cold disk and H2D):
      after the router only:  max((N + R) / rate, A + R / rate)
      prefetch:               max((N + R + wasted) / rate, A + (R - h * done + (1 - h) * flying) / rate)
    where the predicted set is as large as the routed one, `done` = min(R, A * rate) is read during attention,
    `flying` = min(R - done, io_threads experts) is in flight at the router (started, so not cancelled), h is
    guess_hit_rate(T) and wasted = (1 - h) * (done + flying). The disk's total (the first term) is why prefetch
    never wins where reading the layer's non-expert part already outlasts attention. Expert compute is the same
    either way and left out."""
    e = _Env(config, ceil, job, Budget(0, 0), cal, itemsize)
    where = _placement(config, p, len(stored))
    layers = [i for i in range(1, len(stored) - 1) if where[i] == "disk"]
    if not config.num_experts or p.all_experts or not layers:
        return PrefetchCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, guess, 0)
    layer = stored[layers[0]]
    experts = layer * config.expert_share()
    hit = min(1.0, p.expert_cache_bytes / (experts * config.num_layers)) if experts else 0.0
    one = experts / config.num_experts  # one expert's bytes
    h2d = getattr(ceil, "h2d_pinned", 0.0)  # 0 where measured without a GPU: the disk alone
    rate = (min(ceil.disk_read_cold, h2d) if h2d else ceil.disk_read_cold) * GB
    t = {"off_s": 0.0, "on_s": 0.0, "routed": 0.0, "overlapped": 0.0, "wasted": 0.0, "attention_s": 0.0,
         "nonexpert_s": 0.0}
    for count, mbs in _blocks(job, p):
        for step, weight in _steps(job.gen_len):
            s_new, ctx = (job.prompt_len, job.prompt_len) if step == 0 else (1, job.prompt_len + step)
            tokens = sum(mbs) * s_new
            r = experts * (cal.routing.distinct(config, sum(mbs), s_new) if cal.routing else
                           config.expected_experts(tokens)) / config.num_experts * (1 - hit)
            a = sum(_attention_s(e, p, b, s_new, ctx, kv_fits_cache) for b in mbs)
            n = (layer - experts) / rate
            h = guess_hit_rate(config, tokens, guess)
            done = min(r, a * rate)
            flying = min(r - done, p.io_threads * one)
            wasted = (1 - h) * (done + flying)
            off = max(n + r / rate, a + r / rate)
            on = max(n + (r + wasted) / rate, a + (r - h * done + (1 - h) * flying) / rate)
            w = weight * count * len(layers)
            for key, v in (("off_s", off), ("on_s", on), ("routed", r), ("overlapped", h * done),
                           ("wasted", wasted), ("attention_s", a), ("nonexpert_s", n)):
                t[key] += v * w
    return PrefetchCost(**t, guess=guess, layers=len(layers))


def updown_bytes(c: ModelConfig, itemsize: int) -> int:
    """Bytes of a layer's matrices the neuron bundles hold: up and down (OPT: fc2), one row + column a neuron."""
    return (1 if c.architecture == "opt" else 2) * c.hidden_size * c.intermediate_size * itemsize


def read_op_s(ceil, cal: Calibration | None = None) -> float:
    """Seconds a bundle read costs on top of its bytes: the ceilings' measured one (disk_read_op_s), else the
    calibration's assumed neuron_read_op_s."""
    return getattr(ceil, "disk_read_op_s", 0.0) or (cal or Calibration()).neuron_read_op_s


def merge_gap(row_bytes: int, op_s: float = Calibration.neuron_read_op_s, gbps: float = Calibration.merge_gbps) -> int:
    """Inactive neurons worth reading to join two runs of missing ones into one read: a read costs `op_s` on top
    of its bytes, so a gap of g bundles is read through while g * row_bytes at `gbps` costs less than `op_s`
    (20 us at 3 GB/s: 60 kB, 13 bundles of SmolLM2-135M in float32, 3 of llama-3-8b in float16)."""
    return max(0, int(op_s * gbps * 1e9 // row_bytes)) if row_bytes else 0


def row_reads_s(demand: float, runs: float, *, op_s: float, gbps: float, threads: int) -> float:
    """Seconds one read call of a layer call waits for its rows (neuron bundles, one kind of input-channel rows;
    `demand` bytes in `runs` reads): the bytes at the disk's rate `gbps`, and a read's fixed cost `op_s` (measured
    one read at a time) per read, overlapped `threads` at a time: the engine keeps up to its policy's io_threads
    row reads of a call in flight (store/bundles.preadv_all, as the weight streamer reads a layer), fewer where the
    call makes fewer reads."""
    return _rate(demand, gbps) + runs * op_s / max(1.0, min(float(threads), runs))


def sparse_layer_bytes(c: ModelConfig, stored: int, s: SparseCost, tokens: int, itemsize: int,
                       decode: bool = True, gap: int = 0) -> tuple[float, float, float]:
    """(bytes read ahead: the layer without up/down; bundle bytes one call of `tokens` tokens reads; its reads)
    for a streamed layer of a sparse run. The missing neurons are taken as independent (each with probability
    `share`): the gaps between consecutive ones are geometric, a gap of at most `gap` inactive neurons is read
    through (their bytes are read too) and a longer one starts a new read."""
    updown = updown_bytes(c, itemsize)
    share = s.read_share(tokens, decode)
    q = 1 - share
    through = sum(k * share * q ** k for k in range(1, gap + 1))  # inactive neurons read per missing one
    runs = c.intermediate_size * share * q ** (gap + 1) + share  # run starts: a gap longer than `gap`
    return stored - updown, updown * min(1.0, share * (1 + through)), runs


def input_layer_bytes(c: ModelConfig, stored: int, s: SparseCost, tokens: int, itemsize: int, *, op_s: float,
                      gbps: float) -> tuple[float, float, float]:
    """(bytes read ahead: the layer without its three FFN matrices; column bytes one call of `tokens` tokens reads;
    its reads) for a streamed layer of an input-sparse (TEAL) run: each input channel and each intermediate neuron
    kept with probability 1 - target per token, independently; a kept input channel costs a gate and an up column
    (2I elements), a kept neuron a down column (H). Runs closer than merge_gap apart are read as one. With
    s.attention the attention's matrices are read the same way: a kept input channel costs a q, k and v column
    (Q + 2KV elements), a kept output channel an o column (H). The FFN's columns the input hot set holds
    (s.channel_saved, a layer's share of it) are not read: the FFN's bytes and reads fall by that share of its bytes
    (the uniform model less the calibration's frequencies of the held rows: equal in expectation at one token)."""
    ahead, parts, left = _input_kinds(c, stored, s, tokens, itemsize, op_s=op_s, gbps=gbps)
    ffn = parts[0][0] + parts[1][0]
    demand = left * ffn + sum(b for b, _ in parts[2:])
    runs = left * (parts[0][1] + parts[1][1]) + sum(r for _, r in parts[2:])
    return ahead, demand, runs


def input_layer_calls(c: ModelConfig, stored: int, s: SparseCost, tokens: int, itemsize: int, *, op_s: float,
                      gbps: float) -> list[tuple[float, float]]:
    """(bytes, reads) of each read call a layer call of an input-sparse run makes, one after the other (each needs
    the compute before it): the gate|up rows, the down rows and, with s.attention, the q|k|v rows and the o rows;
    their sums are input_layer_bytes's. A call's reads are in flight together, never two calls' (row_reads_s)."""
    _, parts, left = _input_kinds(c, stored, s, tokens, itemsize, op_s=op_s, gbps=gbps)
    return [(left * b, left * r) for b, r in parts[:2]] + parts[2:]


def _input_kinds(c: ModelConfig, stored: int, s: SparseCost, tokens: int, itemsize: int, *, op_s: float,
                 gbps: float) -> tuple[float, list[tuple[float, float]], float]:
    """(bytes read ahead, (bytes, reads) per kind of row, the FFN's share not held by the hot set)."""
    share = 1 - s.target ** max(tokens, 1)
    q = 1 - share
    h, i = c.hidden_size, c.intermediate_size
    kinds = [(h, 2 * i * itemsize), (i, h * itemsize)]
    ahead = stored - 3 * h * i * itemsize
    if s.attention:
        qkv = c.q_dim + 2 * c.kv_dim
        kinds += [(h, qkv * itemsize), (c.q_dim, h * itemsize)]
        ahead -= (qkv + c.q_dim) * h * itemsize
    parts = []  # per kind: (bytes, reads)
    for n, row in kinds:
        gap = merge_gap(row, op_s, gbps) if s.gap is None else s.gap
        through = sum(k * share * q ** k for k in range(1, gap + 1))
        parts.append((n * row * min(1.0, share * (1 + through)), n * share * q ** (gap + 1) + share))
    ffn = parts[0][0] + parts[1][0]
    left = 1 - min(1.0, s.channel_saved(tokens) / c.num_layers / ffn) if ffn else 1.0  # not held by the hot set
    return ahead, parts, left


def _placement(c: ModelConfig, p: Policy, n: int) -> list[str]:
    where = p.placement(n)
    if c.tie_word_embeddings:
        where[0] = "gpu"  # as the engine does: the head reads the embedding
    return where


def device_room(pr: Prediction, budget: Budget, cal: Calibration = Calibration()) -> int:
    """GPU bytes the budget leaves after a plan's own predicted use and the reserve (what the input hot set's device
    tier may hold; channelcache.hot_tiers), 0 where none."""
    return max(0, budget.gpu_bytes - cal.gpu_reserve_bytes - pr.gpu_bytes)


def memory(cand: Candidate, *, config: ModelConfig, job: JobShape, sizes: tuple[list[int], list[int]],
           cal: Calibration = Calibration(), itemsize: int = 2) -> tuple[int, int]:
    """(GPU bytes, CPU bytes) the candidate needs at its peak (the GPU figure excludes cal.gpu_reserve_bytes)."""
    e = _Env(config, None, job, Budget(0, 0), cal, itemsize)
    stored, dense = sizes
    gpu, cpu = _memory(e, cand.policy, stored, dense, _placement(config, cand.policy, len(stored)))
    s = cand.sparse
    return (gpu + (s.hot_bytes + s.channel_gpu_bytes if s else 0),  # input hot rows: their device tier and
            cpu + (s.channel_hot_bytes if s else 0))  # host memory


def kv_disk_bytes(cand: Candidate, *, config: ModelConfig, job: JobShape, itemsize: int = 2) -> int:
    """Bytes the candidate's KV files take on disk: a block's cache (the next block reuses the files)."""
    p = cand.policy
    if p.kv != "disk" or job.gen_len <= 1:
        return 0
    e = _Env(config, None, job, Budget(0, 0), Calibration(), itemsize)
    return int(min(p.block_size, job.prompts) * (job.prompt_len + job.gen_len) * _kv_token(e, p))


def _disk_kv_buffers(e: _Env, p: Policy, g: int, s: int, cap: int, nx: int) -> int:
    """Host bytes the disk KV tier (kvcache.DiskKV) holds besides its files, per tier object (the K/V one, and the
    X-cache one where some layers hold X): WRITES_IN_FLIGHT = 2 staging buffers of one store, a micro-batch's prompt
    rows of one layer (g x s rows), and 2 prefix buffers of a micro-batch's rows (g x cap): on a GPU the READ_SLOTS
    page-locked read slots, on the CPU the prefix being attended (K, V are views of it) and the next one read
    meanwhile."""
    rows = ([_kv_row(e, p.kv_bits)] if nx < e.c.num_layers else []) + ([_kv_row(e, p.kv_bits, x=True)] if nx else [])
    return int(sum(2 * g * s * r + 2 * g * cap * r for r in rows))


def _memory(e: _Env, p: Policy, stored: list[int], dense: list[int], where: list[str]) -> tuple[int, int]:
    """(GPU bytes, CPU bytes) at the peak: what lives the whole run plus the larger of a micro-batch's prefill
    temporaries and a decode step's cache temporaries (they never coexist). Fitted to the measured peaks of
    docs/bench-results (docs/costmodel.md, "Memory")."""
    c, j, isz = e.c, e.job, e.itemsize
    h, q, kv = c.hidden_size, c.q_dim, c.kv_dim
    streamed = [i for i, w in enumerate(where) if w != "gpu"]
    slots = (p.prefetch + 1) * max((stored[i] for i in streamed), default=0)
    deq = max((dense[i] for i in streamed if stored[i] != dense[i]), default=0)  # one stage dequantized at a time
    blk, g = min(p.block_size, j.prompts), min(p.gpu_batch_size, j.prompts)
    s, cap = j.prompt_len, j.prompt_len + j.gen_len
    nx = len(p.x_layers(c.num_layers))
    kv_dev = blk * cap * _kv_token(e, p) if p.kv == "device" and j.gen_len > 1 else 0  # the whole block's cache
    # the hidden state of every micro-batch of the block and its rope cos/sin (no attention mask: model.Span
    # holds per-row lengths, a decode step's [B, 1, 1, T] row is counted with the step)
    static = sum(dense[i] for i, w in enumerate(where) if w == "gpu") + slots + deq + kv_dev \
        + blk * s * (h + 2 * c.head_dim) * isz
    # one micro-batch's prefill layer: attention holds x, h, q, k, v and o; the MLP x, the residual, h, the new
    # K and V (until the cache stores them) and its hidden activations (OPT's ReLU in place; Llama's gate, up)
    mlp = (1 if c.architecture == "opt" else 2) * c.intermediate_size
    prefill = g * s * max(2 * h + 2 * q + 2 * kv, 3 * h + 2 * kv + mlp) * isz
    if j.gen_len > 1 and p.kv == "cpu" and not p.cpu_attention:
        # and the previous layer's stored rows, held until their copy to the host, which runs beside this layer's
        # compute, is done (kvcache.HostKV.store)
        rows = ([_kv_row(e, p.kv_bits)] if nx < c.num_layers else []) + ([_kv_row(e, p.kv_bits, x=True)] if nx else [])
        prefill += g * s * max(rows)
    decode = 0
    if j.gen_len > 1 and (p.kv != "device" or p.kv_bits != 16):
        decode = 2 * g * cap * 2 * kv * isz  # one layer's prefix for one micro-batch, loaded/decoded + concatenated
    if j.gen_len > 1 and p.kv == "cpu" and not p.cpu_attention:  # and the next one's, prefetched meanwhile
        decode += g * cap * max(_kv_row(e, p.kv_bits), _kv_row(e, p.kv_bits, x=True) if nx else 0)
    if j.gen_len > 1 and nx:
        decode += g * cap * (h + 2 * kv) * isz  # a layer's X prefix and the K, V made from it
    gpu = static + max(prefill, decode) + g * c.vocab_size * 4
    ring = slots if any(w == "disk" for w in where) else 0
    kv_host = 0
    if p.kv == "cpu" and j.gen_len > 1:
        kv_host = blk * cap * _kv_token(e, p, host=True)
    if p.kv == "disk" and p.kv_write_back and j.gen_len > 1:  # rows buffered per (layer, micro-batch)
        kv_host = c.num_layers * -(-blk // g) * min(p.kv_write_back_bytes, cap * g * _kv_row(e, p.kv_bits))
    if p.kv == "disk" and j.gen_len > 1:
        kv_host += _disk_kv_buffers(e, p, g, s, cap, nx)
    cpu = e.cal.host_base_bytes + sum(stored[i] for i, w in enumerate(where) if w == "cpu") + ring + kv_host
    return int(gpu), int(cpu)


def predict(cand: Candidate, *, config: ModelConfig, ceil, job: JobShape, budget: Budget,
            sizes: tuple[list[int], list[int]], cal: Calibration = Calibration(), itemsize: int = 2,
            memo: dict | None = None) -> Prediction:
    """Time and memory of one candidate; `sizes` = (stored, dense) bytes per stage for its quantization.
    `memo` caches stage times across candidates of one search (same config, ceilings, job and calibration)."""
    e = _Env(config, ceil, job, budget, cal, itemsize)
    p, (stored, dense) = cand.policy, sizes
    where = _placement(config, p, len(stored))
    gpu, cpu = _memory(e, p, stored, dense, where)
    gpu += cand.sparse.hot_bytes + cand.sparse.channel_gpu_bytes if cand.sparse else 0  # input hot rows' device tier
    cpu += cand.sparse.channel_hot_bytes if cand.sparse else 0  # input sparsity's hot rows: host memory
    xl = p.x_layers(config.num_layers)
    kv_total = job.prompts * (job.prompt_len + job.gen_len) * _kv_token(e, p)
    kv_fits_cache = kv_total <= budget.cpu_bytes - cpu
    res = {"disk": 0.0, "pcie": 0.0, "compute": 0.0}
    bound = dict.fromkeys(res, 0.0)
    pre_res, pre_bound = dict.fromkeys(res, 0.0), dict.fromkeys(res, 0.0)
    last = len(stored) - 1
    kinds = Counter(("embed" if i == 0 else "head" if i == last else "xlayer" if i - 1 in xl else "layer",
                     where[i], stored[i], dense[i]) for i in range(last + 1))  # identical stages: computed once
    lock = 0.0
    for count, mbs in _blocks(job, p):
        prefill = 0.0
        for (kind, w, st, de), n in kinds.items():
            key = (kind, w, st, de, tuple(mbs), p.kv, p.kv_bits, p.cpu_attention, kv_fits_cache, cand.sparse,
                   p.all_experts, p.expert_cache_bytes)
            got = memo.get(key) if memo is not None else None
            if got is None:
                got = _stage_all_steps(e, p, kind, w, st, de, Counter(mbs), kv_fits_cache, cand.sparse)
                if memo is not None:
                    memo[key] = got
            for k in res:
                res[k] += got[0][k] * n * count
                bound[k] += got[1][k] * n * count
                pre_res[k] += got[2][k] * n * count
                pre_bound[k] += got[3][k] * n * count
            prefill += sum(got[3].values()) * n
        if p.kv == "cpu" and job.gen_len > 1:  # a block's host cache is page-locked while its prefill runs
            need = _rate(sum(mbs) * (job.prompt_len + job.gen_len) * _kv_token(e, p, host=True), cal.host_lock_gbps)
            lock += max(0.0, need - prefill) * count
    setup = sum(_rate(stored[i], ceil.disk_read_cold) for i, w in enumerate(where) if w != "disk")
    if job.prompts:  # the first streamed stages are read while the engine is built
        moved, first_setup = _read_at_setup(e, p, where, stored, dense, xl, _blocks(job, p)[0][1], kv_fits_cache,
                                            cand.sparse)
        setup += first_setup
        for k in res:
            res[k] += moved[0][k]
            bound[k] += moved[1][k]
            pre_res[k] += moved[0][k]
            pre_bound[k] += moved[1][k]
    tokens = job.prompts * job.gen_len
    phases = {"prefill": (pre_res, pre_bound)}
    if job.gen_len > 1:
        phases["decode"] = ({k: res[k] - pre_res[k] for k in res}, {k: bound[k] - pre_bound[k] for k in res})
    return Prediction(cand, sum(bound.values()) + lock, setup, res, bound, gpu, cpu, tokens,
                      {k: where.count(k) for k in ("gpu", "cpu", "disk")}, lock, phases)


def _read_at_setup(e: _Env, p: Policy, where: list[str], stored: list[int], dense: list[int], xl: set,
                   mbs: list[int], kv_fits_cache: bool,
                   sparse: SparseCost | None = None) -> tuple[tuple[dict, dict], float]:
    """The streamer submits the reads of the first `prefetch + 1` streamed stages (one a slot) when it is built, and
    the engine warms its kernels after that, so those reads run in the setup, not in the first prefill: the engine's
    prefill weight bytes on the H200 were 0.941 of a pass with every expert read (3 of Qwen3-MoE's 50 stages, session
    9 and 12). Returns the change of the first prefill's (seconds per resource, seconds each resource was the
    slowest) without those reads (a routed MoE layer's slot holds its non-expert part only: its experts are read
    after the router; a sparse run's layer slot holds what _stage reads ahead, the FFN's kept rows or columns are
    read per call), and their disk time, which goes to the setup."""
    d_res, d_bound = dict.fromkeys(("disk", "pcie", "compute"), 0.0), dict.fromkeys(("disk", "pcie", "compute"), 0.0)
    setup, last = 0.0, len(stored) - 1
    for i in [i for i, w in enumerate(where) if w != "gpu"][:p.prefetch + 1]:
        kind = "embed" if i == 0 else "head" if i == last else "xlayer" if i - 1 in xl else "layer"
        t = _stage(e, p, kind, where[i], stored[i], dense[i], Counter(mbs), e.job.prompt_len, e.job.prompt_len,
                   kv_fits_cache, sparse)
        layer = kind not in ("embed", "head") and where[i] == "disk"
        ahead = stored[i]  # what the slot's read holds
        if layer and sparse is not None:
            ahead = (input_layer_bytes(e.c, stored[i], sparse, 1, e.itemsize, op_s=read_op_s(e.ceil, e.cal),
                                       gbps=e.ceil.disk_read_cold)[0] if sparse.method == "input"
                     else stored[i] - updown_bytes(e.c, e.itemsize))
        elif layer and e.c.num_experts and not p.all_experts:
            ahead = stored[i] * (1 - e.c.expert_share())
        after = dict(t, pcie=max(0.0, t["pcie"] - _rate(ahead, e.ceil.h2d_pinned)))
        if where[i] == "disk":
            after["disk"] = max(0.0, t["disk"] - _rate(ahead, e.ceil.disk_read_cold))
            setup += _rate(ahead, e.ceil.disk_read_cold)
        for k in t:
            d_res[k] += after[k] - t[k]
        top, top_after = max(t, key=t.get), max(after, key=after.get)
        d_bound[top] -= t[top]
        d_bound[top_after] += after[top_after]
    return (d_res, d_bound), setup


def _steps(gen_len: int, exact: int = 33) -> list[tuple[int, float]]:
    """(step, weight): every step when few, else prefill + evenly spaced decode steps whose weights sum to the
    steps they stand for (stage time is piecewise linear in the context, so the error stays small)."""
    if gen_len <= exact:
        return [(s, 1.0) for s in range(gen_len)]
    n = exact - 1
    picks = [1 + round(k * (gen_len - 2) / (n - 1)) for k in range(n)]
    return [(0, 1.0)] + [(s, (gen_len - 1) / n) for s in picks]


def _stage_all_steps(e: _Env, p: Policy, kind: str, where: str, stored: int, dense: int, mbs: Counter,
                     kv_fits_cache: bool, sparse: SparseCost | None = None) -> tuple[dict, dict, dict, dict]:
    """One stage over every step of one block: (seconds per resource, seconds each resource was the slowest) over
    every step, then the same two for the prefill step alone."""
    res = {"disk": 0.0, "pcie": 0.0, "compute": 0.0}
    bound = dict.fromkeys(res, 0.0)
    pre_res, pre_bound = dict(res), dict(res)
    j = e.job
    for step, weight in _steps(j.gen_len):
        s_new, ctx = (j.prompt_len, j.prompt_len) if step == 0 else (1, j.prompt_len + step)
        t = _stage(e, p, kind, where, stored, dense, mbs, s_new, ctx, kv_fits_cache, sparse)
        top = max(t, key=t.get)
        for k, v in t.items():
            res[k] += v * weight
        bound[top] += t[top] * weight
        if step == 0:
            pre_res, pre_bound[top] = dict(t), t[top]
    return res, bound, pre_res, pre_bound


def _call_s(e: _Env, gpu_s: float, *, resident: bool, share: float = 1.0) -> float:
    """Seconds of one stage call with `gpu_s` of GPU work: the CPU's per-call overhead (Python, launches; `share` of
    a layer's) and the GPU's work add up where the call waits on the host (streamed weights, a host or disk cache);
    a resident stage over a device cache waits on nothing, so the CPU launches ahead of the GPU and the call takes
    the longer of the two (ourslc on the H100, session 13: 31 decode steps of 48 such layer calls, half of them
    recomputing K, V from X for ~1.7 ms, took 2.32 s; the sum predicted 3.61 s, the larger 2.47 s)."""
    overhead = e.cal.layer_overhead_s * share
    return max(overhead, gpu_s) if resident else overhead + gpu_s


def _stage(e: _Env, p: Policy, kind: str, where: str, stored: int, dense: int, mbs: Counter,
           s_new: int, ctx: int, kv_fits_cache: bool, sparse: SparseCost | None = None) -> dict[str, float]:
    """Per-resource seconds of one stage in one pass over the micro-batches `mbs` ({size: how many})."""
    moved, layer, slow = stored, kind not in ("embed", "head"), 0.0
    if where == "disk" and layer and e.c.num_experts and not p.all_experts:
        seqs = sum(b * m for b, m in mbs.items())  # the block's micro-batches share one read of the layer
        moved = routed_layer_bytes(e.c, stored, p, seqs * s_new, sequences=seqs, routing=e.cal.routing)
        # the routed experts' reads, priced at expert_read_share of a whole layer's rate: their extra time
        slow = (moved - stored * (1 - e.c.expert_share())) * (1 / e.cal.expert_read_share - 1)
    comp = _rate(dense, e.cal.dequant_gbps) if where != "gpu" and stored != dense else 0.0
    if where == "disk" and layer and sparse is not None and sparse.method == "input":  # kept columns on demand
        op_s = read_op_s(e.ceil, e.cal)
        moved = input_layer_bytes(e.c, stored, sparse, 1, e.itemsize, op_s=op_s, gbps=e.ceil.disk_read_cold)[0]
        for b, m in mbs.items():
            calls = input_layer_calls(e.c, stored, sparse, b * s_new, e.itemsize, op_s=op_s,
                                      gbps=e.ceil.disk_read_cold)
            moved += m * sum(n for n, _ in calls)
            comp += m * sum(row_reads_s(n, r, op_s=op_s, gbps=e.ceil.disk_read_cold, threads=p.io_threads)
                            for n, r in calls)
    elif where == "disk" and layer and sparse is not None:  # each micro-batch reads its active bundles on demand
        moved = stored - updown_bytes(e.c, e.itemsize)
        op_s = read_op_s(e.ceil, e.cal)
        gap = sparse.gap if sparse.gap is not None else merge_gap(
            updown_bytes(e.c, e.itemsize) // e.c.intermediate_size, op_s, e.ceil.disk_read_cold)
        for b, m in mbs.items():
            _, demand, runs = sparse_layer_bytes(e.c, stored, sparse, b * s_new, e.itemsize, decode=s_new == 1,
                                                 gap=gap)
            moved += m * demand
            comp += m * row_reads_s(demand, runs, op_s=op_s, gbps=e.ceil.disk_read_cold, threads=p.io_threads)
    disk = _rate(moved + slow, e.ceil.disk_read_cold) if where == "disk" else 0.0
    crossing = moved  # the input hot set's host tier is not read but crosses PCIe; its device tier does neither
    if where == "disk" and layer and sparse is not None and sparse.method == "input" and sparse.channel_hot:
        crossing += sum(m * sparse.channel_saved(b * s_new, device=False) for b, m in mbs.items()) / e.c.num_layers
    pcie = _rate(crossing, e.ceil.h2d_pinned) if where != "gpu" else 0.0
    peak = e.ceil.matmul_tflops * 1e3 * e.cal.compute_efficiency  # GFLOP/s
    resident = where == "gpu" and p.kv == "device"
    for b, m in mbs.items():
        if kind == "embed":
            comp += m * _call_s(e, 0.0, resident=resident, share=0.25)  # an embedding lookup: a few kernels
        elif kind == "head":
            comp += m * _call_s(e, _rate(2 * b * e.c.hidden_size * e.c.vocab_size, peak), resident=resident,
                                share=0.5)
        else:
            gpu = _layer_compute(e, b, s_new, ctx, dense) + _kv_time(e, p, b, s_new, ctx, kv_fits_cache,
                                                                      x=kind == "xlayer")
            comp += m * _call_s(e, gpu, resident=resident)
            if p.kv in ("cpu", "disk") and not (p.cpu_attention and kind != "xlayer") and e.job.gen_len > 1:
                # the prefix crosses PCIe (prefetched, or after its disk read), sharing the link with the weights
                pcie += m * _rate(ctx * b * _kv_row(e, p.kv_bits, kind == "xlayer"), e.ceil.h2d_pinned)
            if p.kv == "disk" and e.job.gen_len > 1:  # KV reads (or the page cache's) and writes share the disk
                disk += m * (_rate((ctx - s_new) * b * _kv_row(e, p.kv_bits, kind == "xlayer"),
                                   e.ceil.disk_read_warm if kv_fits_cache else e.ceil.disk_read_cold)
                             + kv_write_s(e, p, b, s_new, x=kind == "xlayer"))
    return {"disk": disk, "pcie": pcie, "compute": comp}


# ------------------------------------------------------------------------------------------- search


def candidates(job: JobShape, *, quantizations=("none",), kv_bits=(16,), step: int = 10,
               base: Policy | None = None, config: ModelConfig | None = None, techniques: bool = True,
               shapes: list[tuple[int, int]] | None = None) -> list[Candidate]:
    """Weights gpu/cpu percentages in `step`s, KV tiers (+ compressed), batch shapes in powers of two, and with
    `techniques` the exact INF² ones: CPU attention (KV in CPU memory), write-back (KV on disk, always on) and,
    where X is smaller than K + V (`config`), X-cache for half or all of the layers. Each candidate is `base`
    (policy.make_policy's I/O settings by default) with those fields replaced."""
    base = base or make_policy()
    pct = range(0, 101, step)
    if shapes is None:
        sizes = sorted({min(2 ** k, job.prompts) for k in range(12)})
        shapes = [(g, nb) for g in sizes for nb in (2 ** k for k in range(8)) if (nb - 1) * g < job.prompts]
    kvs = [("device", 16, False)]
    if job.gen_len > 1:
        kvs += [("device", b, False) for b in kv_bits if b != 16]
        kvs += [(t, b, False) for t in ("cpu", "disk") for b in kv_bits]
        if techniques and 16 in kv_bits:
            kvs.append(("cpu", 16, True))
    out = []
    for (gp, cp), (kv, kb, attn), (g, nb), q in itertools.product(
            [(gp, cp) for gp in pct for cp in pct if gp + cp <= 100], kvs, shapes, quantizations):
        xs = (0.0, 50.0, 100.0) if (techniques and config and job.gen_len > 1 and not attn and x_cache_saves(config)
                                    and x_cache_fits(config, kb)) else (0.0,)
        for xp in xs:
            pol = replace(base, weights_gpu_percent=float(gp), weights_cpu_percent=float(cp), kv=kv, kv_bits=kb,
                          gpu_batch_size=g, num_gpu_batches=nb, cpu_attention=attn, x_cache_percent=xp,
                          kv_write_back=techniques and kv == "disk")
            out.append(Candidate(pol, q))
    return out


@dataclass
class Plan:
    """The chosen prediction, the best one placing or quantizing weights otherwise, and how many were weighed."""

    best: Prediction
    runner_up: Prediction | None
    considered: int
    fitting: int
    other_reads: Prediction | None = None  # with sparsity: the fastest with the other FFN reads (dense | sparse)


def _shape(pr: Prediction) -> tuple:
    """What makes a runner-up worth showing: another weights placement or quantization."""
    return tuple(pr.placement.values()), pr.candidate.quantization


class NoPlanFits(ValueError):
    """No candidate fits the budgets (choose): the message says how much the least of them needs."""


def choose(cands: list[Candidate], *, config: ModelConfig, ceil, job: JobShape, budget: Budget,
           sizes: dict[str, tuple[list[int], list[int]]], cal: Calibration = Calibration(),
           itemsize: int = 2) -> Plan:
    """Predict every candidate that fits both budgets; the fastest wins (ties: less summed work, less GPU)."""
    fits, memo, least = [], {}, None
    for cand in cands:
        gpu, cpu = memory(cand, config=config, job=job, sizes=sizes[cand.quantization], cal=cal, itemsize=itemsize)
        disk = kv_disk_bytes(cand, config=config, job=job, itemsize=itemsize)
        if gpu + cal.gpu_reserve_bytes <= budget.gpu_bytes and cpu <= budget.cpu_bytes and disk <= budget.disk_bytes:
            fits.append(predict(cand, config=config, ceil=ceil, job=job, budget=budget,
                                sizes=sizes[cand.quantization], cal=cal, itemsize=itemsize, memo=memo))
        elif least is None or (gpu, cpu) < least:
            least = (gpu, cpu)
    if not fits:
        disk = "" if budget.disk_bytes >= 1 << 62 else f" (and {budget.disk_bytes / 2**30:.1f} GiB of KV disk)"
        need = "" if least is None else (f"; the least GPU any candidate needs is "
                                         f"{(least[0] + cal.gpu_reserve_bytes) / 2**30:.2f} GiB (with the "
                                         f"{cal.gpu_reserve_bytes / 2**30:g} GiB reserve), with {least[1] / 2**30:.2f} "
                                         "GiB of CPU memory")
        raise NoPlanFits(f"no candidate policy fits {budget.gpu_bytes / 2**30:.1f} GiB of GPU and "
                         f"{budget.cpu_bytes / 2**30:.1f} GiB of CPU memory{disk}{need}; raise a budget or shorten "
                         "the job")
    # ties (a hidden resource changes nothing) go to the candidate that does less work, then uses less GPU
    fits.sort(key=lambda pr: (round(pr.total_s, 9), round(sum(pr.resource_s.values()), 9), pr.gpu_bytes, pr.cpu_bytes))
    best = fits[0]
    runner = next((pr for pr in fits[1:] if _shape(pr) != _shape(best)), None)
    other = next((pr for pr in fits[1:] if (pr.candidate.sparse is None) != (best.candidate.sparse is None)), None)
    return Plan(best, runner, len(cands), len(fits), other)


def plan(*, config: ModelConfig, ceil, job: JobShape, budget: Budget, sizes: dict[str, tuple[list[int], list[int]]],
         quantizations=("none",), kv_bits=(16,), base: Policy | None = None, step: int = 10,
         shapes: list[tuple[int, int]] | None = None, keep=None, cal: Calibration = Calibration(),
         itemsize: int = 2, sparsity: SparseCost | None = None) -> Plan:
    """The automatic policy: every candidate (techniques included) that `keep` accepts, the fastest that fits;
    with `sparsity`, each unquantized one also with sparse FFN reads (neuron bundles are cut from float stores)."""
    cands = candidates(job, quantizations=quantizations, kv_bits=kv_bits, step=step, base=base, config=config,
                       shapes=shapes)
    if sparsity is not None:
        cands += [replace(cd, sparse=sparsity) for cd in cands if cd.quantization == "none"]
    if config.num_experts:  # MoE: a layer read whole (one sequential read) against its routed experts only
        cands += [replace(cd, policy=replace(cd.policy, all_experts=True)) for cd in cands
                  if cd.policy.weights_gpu_percent < 100]
    if keep is not None:
        cands = [cd for cd in cands if keep(cd.policy)]
        if not cands:
            raise ValueError(f"no candidate policy has what spec.offload pins (gpuBatchSize, numGpuBatches, "
                             f"cpuAttention, kvWriteBack, xCache) for a job of {job.prompts} prompt(s): a micro-batch "
                             f"holds at most {job.prompts} sequence(s) here; lower the pinned batch or leave it out")
    return choose(cands, config=config, ceil=ceil, job=job, budget=budget, sizes=sizes, cal=cal, itemsize=itemsize)


def describe(pr: Prediction) -> str:
    """One line: placement, quantization, KV tier and techniques, batch shape, predicted time and memory."""
    p, q, pl = pr.candidate.policy, pr.candidate.quantization, pr.placement
    kv = p.kv + (f" {p.kv_bits}-bit" if p.kv_bits != 16 else "")
    tech = [t for t, on in (("CPU attention", p.cpu_attention), ("write-back", p.kv_write_back),
                            (f"X-cache {p.x_cache_percent:g}% of layers", p.x_cache_percent > 0)) if on]
    return (f"weights gpu {p.weights_gpu_percent:.0f}% cpu {p.weights_cpu_percent:.0f}% (stages gpu={pl['gpu']} "
            f"cpu={pl['cpu']} disk={pl['disk']}){'' if q == 'none' else ', ' + q + ' weights'}"
            f"{_reads(pr.candidate.sparse)}{', every expert read with its layer' if p.all_experts else ''}, kv {kv}"
            f"{' + ' + ', '.join(tech) if tech else ''}, micro-batch {p.gpu_batch_size} x {p.num_gpu_batches}: "
            f"{pr.total_s:.3g} s (setup {pr.setup_s:.3g} s + run {pr.run_s:.3g} s), {pr.tokens_per_s:.3g} generated "
            f"tokens/s, GPU {pr.gpu_bytes / 2**30:.2f} GiB, CPU {pr.cpu_bytes / 2**30:.2f} GiB")


def _reads(s: SparseCost | None) -> str:
    if s is None:
        return ""
    hot = f", hot neurons {s.hot_bytes / 2**30:.2f} GiB" if s.hot_bytes else ""
    if s.method == "input":
        attn = ", q/k/v/o columns likewise" if s.attention else ""
        dev = f"{s.channel_gpu_bytes / 2**30:.2f} GiB on the GPU + " if s.channel_gpu_bytes else ""
        held = (f", hot channel rows {dev}{s.channel_hot_bytes / 2**30:.2f} GiB in host memory (expected to serve "
                f"{100 * s.channel_hit:.0f}% of a decode token's kept FFN column bytes)"
                if s.channel_hot_bytes or s.channel_gpu_bytes else "")
        return (f", input-sparse FFN reads (target {s.target:g}: {100 * (1 - s.target):.0f}% of gate/up/down columns a "
                f"decode token{attn}{held})")
    return f", sparse FFN reads (target {s.target:g}: {100 * s.read_share(1, True):.0f}% of up/down a decode token{hot})"


SPARSE_MARGIN = 0.01  # sparse reads must be predicted this much faster; within it dense (fewer, larger reads) wins


def reads_choice(policy: Policy, sparse: SparseCost, *, config: ModelConfig, ceil, job: JobShape, budget: Budget,
                 sizes: tuple[list[int], list[int]], cal: Calibration = Calibration(),
                 itemsize: int = 2) -> tuple[bool, str]:
    """(sparse reads predicted faster, why) for a run of `policy` whose store has neuron bundles: the same policy
    predicted with dense and with sparse FFN reads (what `kubeflash run` follows when the policy is given)."""
    kw = dict(config=config, ceil=ceil, job=job, budget=budget, sizes=sizes, cal=cal, itemsize=itemsize)
    dense = predict(Candidate(policy), **kw).total_s
    sp = predict(Candidate(policy, sparse=sparse), **kw).total_s
    won = sp < dense * (1 - SPARSE_MARGIN)
    return won, reads_why(won, sp, dense, policy.gpu_batch_size)


def attention_prices(policy: Policy, sparse: SparseCost, *, config: ModelConfig, ceil, job: JobShape,
                     budget: Budget, sizes: tuple[list[int], list[int]], cal: Calibration = Calibration(),
                     itemsize: int = 2) -> tuple[float, float]:
    """(predicted seconds with FFN+attention input sparsity, with FFN-only) for a run of `policy` whose store has
    the attention channel files: the same policy priced with the attention's columns read per kept channel and with
    the attention read whole, ahead of compute with the rest of the layer."""
    kw = dict(config=config, ceil=ceil, job=job, budget=budget, sizes=sizes, cal=cal, itemsize=itemsize)
    return tuple(predict(Candidate(policy, sparse=replace(sparse, attention=a)), **kw).total_s for a in (True, False))


def attention_choice(attn_s: float, ffn_s: float, *, asked: bool = False) -> tuple[bool, str]:
    """(thresholds the attention's inputs too, why) from the predicted seconds with FFN+attention input sparsity
    and with FFN-only: the faster, FFN-only within SPARSE_MARGIN (it drops less); `asked`: the caller asked for
    attention sparsity, which is kept and said to be slower where it is predicted so."""
    more = f"{attn_s / ffn_s - 1:+.1%}" if ffn_s > 0 else "n/a"
    if asked:
        slower = ", slower than FFN-only" if attn_s > ffn_s else ""
        return True, (f"FFN+attention input sparsity (asked for): predicted {attn_s:.4g} s against {ffn_s:.4g} s "
                      f"FFN-only ({more}){slower}")
    if attn_s < ffn_s * (1 - SPARSE_MARGIN):
        return True, f"FFN+attention input sparsity: predicted {attn_s:.4g} s against {ffn_s:.4g} s FFN-only ({more})"
    return False, (f"FFN-only input sparsity (attention read whole): predicted {ffn_s:.4g} s against {attn_s:.4g} s "
                   f"with attention sparsity ({more})")


def reads_why(sparse: bool, sparse_s: float, dense_s: float, batch: int) -> str:
    won, lost = (sparse_s, dense_s) if sparse else (dense_s, sparse_s)
    more = f"{lost / won - 1:+.1%}" if won > 0 else "n/a"
    return (f"{'sparse' if sparse else 'dense'} FFN reads: predicted {won:.4g} s against {lost:.4g} s ({more}) with "
            f"{'dense' if sparse else 'sparse'} reads at micro-batch {batch}")
