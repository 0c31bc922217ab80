"""What `kubeflash plan` assumes about a mixture-of-experts model, stated beside the plan (torch-free).

The cost model prices a streamed MoE layer by routed_layer_bytes: its non-expert bytes plus the distinct experts a
layer read is expected to route to, less the hot-expert cache's hits, taken as the cache's share of all layers'
experts (what a uniform router gives). The distinct experts come from the model's measured routing profile where
there is one (`stored_routing`: the store entry's .routing-profile.json, which every routed run adds to, see
store/routingprofile.py; or `kubeflash plan --routing-from BENCH_JSON`), else from uniform routing
(ModelConfig.expected_experts of the tokens sharing that read: a block's sequences in decode, times the prompt in
prefill). `Routing.line` is the one line the plan and the run print about which it assumed; these lines say so too,
with the numbers used.

`expert_cache_bytes` turns spec.offload.expertCache into the cache's budget: a quantity as given; `auto` an eighth
(EXPERT_CACHE_AUTO_SHARE) of the GPU budget (the memory the experts' cache lives in on a GPU run) or, on a CPU run,
of the host budget; always 0 for a dense model.

`expert_prefetch_choice` turns spec.offload.expertPrefetch into the policy's switch: on and off as given; auto as
costmodel.expert_prefetch_cost predicts faster for the policy (off where no ceilings are measured, or no MoE layer is
streamed from disk), with the lines that say why (the plan prints them; the run report keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..store.modelconfig import ModelConfig
from .costmodel import (
    Calibration,
    JobShape,
    PrefetchCost,
    RoutingProfile,
    expert_prefetch_cost,
    guess_hit_rate,
    routed_layer_bytes,
)
from .policy import Policy

EXPERT_CACHE_AUTO_SHARE = 1 / 8  # of the compute device's budget, under spec.offload.expertCache: auto


def expert_cache_bytes(c: ModelConfig, value: int | str, *, budget: int | None) -> int:
    """The hot-expert cache's bytes for spec.offload.expertCache `value` (bytes or "auto"); `budget`: the compute
    device's memory budget (GPU bytes on a GPU, host bytes on a CPU run; None: unknown, so auto gives 0)."""
    if not c.num_experts:
        return 0
    if value == "auto":
        return int(budget * EXPERT_CACHE_AUTO_SHARE) if budget else 0
    return int(value)


@dataclass(frozen=True)
class Routing:
    """The routing a plan prices a MoE model's routed reads with: a measured profile, or uniform (profile None)."""

    profile: RoutingProfile | None = None
    source: str = ""  # where the measured profile came from (a file)
    runs: int = 0  # the runs it sums (0: not known, as for a bench JSON given with --routing-from)
    note: str | None = None  # why a stored profile was not used (it names the file), or None

    def line(self, c: ModelConfig, block: int, prompt_len: int) -> str:
        """`routing: ...`: measured (in how many runs, the distinct experts a layer read at this batch) or uniform."""
        if self.profile is None:
            return "routing: uniform (no measured profile" + (f"; {self.note})" if self.note else ")")
        runs = f"in {self.runs} run{'s' if self.runs != 1 else ''} " if self.runs else ""
        plen = max(1, prompt_len)
        return (f"routing: measured {runs}({self.source}), {self.profile.distinct(c, block, 1):.1f} distinct experts "
                f"per layer at batch {block} (uniform: {c.expected_experts(block):.1f}); a prefill read of {block} x "
                f"{plen} tokens {self.profile.distinct(c, block, plen):.1f} "
                f"(uniform: {c.expected_experts(block * plen):.1f})")

    def to_json(self, c: ModelConfig, block: int, prompt_len: int) -> dict:
        return {"measured": self.profile is not None, "source": self.source or None, "runs": self.runs,
                "note": self.note, "line": self.line(c, block, prompt_len),
                "points": [list(pt) for pt in self.profile.points] if self.profile else []}


def stored_routing(c: ModelConfig, model_dir: Path | None) -> Routing:
    """The routing profile measured on the model stored at `model_dir` (its .routing-profile.json), or uniform
    routing: none there, a dense model, or a file that is not this model's profile (`note` says why, naming it)."""
    from ..store.routingprofile import PROFILE_FILE, load

    if not c.num_experts or model_dir is None or not (Path(model_dir) / "manifest.json").is_file():
        return Routing()
    got, why = load(Path(model_dir))
    if got is None:
        return Routing(note=why)
    return Routing(RoutingProfile(got.points()), str(Path(model_dir) / PROFILE_FILE), got.runs)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def moe_assumptions(c: ModelConfig, p: Policy, job: JobShape, stored: list[int],
                    routing=None, *, source: str = "--routing-from") -> tuple[list[str], dict | None]:
    """(lines for the plan's output, the same as a dict for --json) for plan policy `p`; ([], None) for a dense
    model. `stored`: bytes of each stage as stored (embed, layers, head); `routing`: a measured
    costmodel.RoutingProfile (None: uniform routing), measured as `source` says."""
    if not c.num_experts:
        return [], None
    e, k = c.num_experts, c.num_experts_per_tok
    where = p.placement(len(stored))
    disk = [i for i in range(1, len(stored) - 1) if where[i] == "disk"]
    layer = stored[1]
    head = (f"MoE: {e} experts, top-{k} per token, {c.expert_share():.0%} of a layer's parameters in its experts; "
            f"{len(disk)} of {c.num_layers} layers streamed from disk")
    if p.all_experts:
        return [head, "  all experts: every expert is read with its layer (no routing assumed)"], \
            {"experts": e, "top_k": k, "all_experts": True, "streamed_layers": len(disk)}
    block = p.gpu_batch_size * p.num_gpu_batches  # sequences that share one read of each layer
    plen = max(1, job.prompt_len)
    decode, prefill = (routing.distinct(c, block, 1), routing.distinct(c, block, plen)) if routing else \
        (c.expected_experts(block), c.expected_experts(block * plen))
    expert_bytes = layer * c.expert_share() * c.num_layers  # as routed_layer_bytes takes it: every layer's experts
    hit = min(1.0, p.expert_cache_bytes / expert_bytes) if expert_bytes else 0.0
    per_read = routed_layer_bytes(c, layer, p, block, sequences=block, routing=routing)
    how = f"routing as measured ({source})" if routing else \
        "assumed uniform routing (no measured profile; measured reads route to fewer experts, docs/moe.md)"
    lines = [head,
             f"  {how}: "
             f"a decode read serves {block} tokens -> {decode:.1f} of {e} experts expected per layer "
             f"({decode / e:.0%} of its expert bytes); a prefill read serves {block} x {job.prompt_len} tokens -> "
             f"{prefill:.1f}",
             f"  hot-expert cache: {_mib(p.expert_cache_bytes)} of {_mib(expert_bytes)} of experts (all layers) -> "
             f"assumed hit rate {hit:.0%} (its share of the experts, as under uniform routing; the saved routing "
             f"counts that warm it are not counted)",
             f"  a streamed layer's decode read: {_mib(per_read)} expected vs {_mib(layer)} with every expert"]
    return lines, {"experts": e, "top_k": k, "all_experts": False, "streamed_layers": len(disk),
                   "tokens_per_decode_read": block, "expected_experts_decode": decode,
                   "expected_experts_prefill": prefill, "expert_cache_bytes": p.expert_cache_bytes,
                   "assumed_hit_rate": hit, "layer_read_bytes_decode": per_read, "layer_bytes": layer}


def expert_prefetch_choice(setting: str, c: ModelConfig, p: Policy, job: JobShape, stored: list[int], ceil, *,
                           itemsize: int = 2, routing=None) -> tuple[bool, list[str], dict | None]:
    """(prefetch on, lines saying what was chosen and why, the same for --json and the run report) for
    spec.offload.expertPrefetch `setting` (auto | on | off) under policy `p`; `ceil`: measured ceilings (None: none
    here, so auto is off); `routing`: a measured costmodel.RoutingProfile (None: uniform routing). A dense model:
    (False, [], None)."""
    if not c.num_experts:
        return False, [], None
    cost = expert_prefetch_cost(p, config=c, ceil=ceil, job=job, stored=stored, itemsize=itemsize,
                                cal=Calibration(routing=routing)) \
        if ceil is not None else None
    priced = cost is not None and cost.layers > 0
    if priced:
        more = cost.on_s / cost.off_s - 1 if cost.off_s else 0.0
        verdict = (f"the cost model predicts the {cost.layers} streamed MoE layers {cost.on_s:.3g} s with prefetch vs "
                   f"{cost.off_s:.3g} s reading experts only after the router ({more:+.1%})")
    if setting != "auto":
        on, why = setting == "on", "as the job sets it" + (f"; {verdict}" if priced else "")
    elif p.all_experts:
        on, why = False, "every expert is read with its layer"
    elif cost is None:
        on, why = False, "no measured ceilings to price it against reads after the router"
    elif not priced:
        on, why = False, "no MoE layer is streamed from disk"
    else:
        on, why = cost.on, verdict
    lines = [f"  expert prefetch: {'on' if on else 'off'} (spec.offload.expertPrefetch: {setting}): {why}"]
    d = {"setting": setting, "on": on, "why": why}
    if priced:
        lines += _prefetch_lines(c, p, cost)
        d |= {"off_s": cost.off_s, "on_s": cost.on_s, "routed_bytes": cost.routed, "overlapped_bytes": cost.overlapped,
              "wasted_bytes": cost.wasted, "attention_s": cost.attention_s, "nonexpert_read_s": cost.nonexpert_s,
              "assumed_guess_per_token": cost.guess, "streamed_layers": cost.layers}
    return on, lines, d


def _prefetch_lines(c: ModelConfig, p: Policy, cost: PrefetchCost) -> list[str]:
    block = p.gpu_batch_size * p.num_gpu_batches
    window = ("reading their non-expert parts outlasts attention, so the disk has no idle window for expert reads"
              if cost.nonexpert_s >= cost.attention_s else "attention outlasts reading their non-expert parts, so "
              "the disk has room for expert reads while it computes")
    return [f"    attention {cost.attention_s:.3g} s, non-expert reads {cost.nonexpert_s:.3g} s: {window}; prefetch "
            f"reads {_mib(cost.overlapped)} of the {_mib(cost.routed)} routed expert bytes during attention and "
            f"{_mib(cost.wasted)} of mispredicted experts for nothing",
            f"    assumed: the router applied to a layer's input guesses {cost.guess:.0%} of a token's experts (measured "
            f"on random weights, docs/moe.md; no run records it per model) -> {guess_hit_rate(c, block, cost.guess):.0%} "
            f"of a decode read's experts at {block} tokens, about all of a long prefill's"]
