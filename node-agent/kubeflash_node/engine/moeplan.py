"""What `kubeflash plan` assumes about a mixture-of-experts model, stated beside the plan (torch-free).

The cost model prices a streamed MoE layer by routed_layer_bytes: its non-expert bytes plus the distinct experts a
layer read is expected to route to under uniform routing (ModelConfig.expected_experts of the tokens sharing that
read: a block's sequences in decode, times the prompt in prefill), less the hot-expert cache's hits, taken as the
cache's share of all layers' experts (what a uniform router gives). These lines say so, with the numbers used.

`expert_cache_bytes` turns spec.offload.expertCache into the cache's budget: a quantity as given; `auto` an eighth
(EXPERT_CACHE_AUTO_SHARE) of the GPU budget (the memory the experts' cache lives in on a GPU run) or, on a CPU run,
of the host budget; always 0 for a dense model.
"""

from __future__ import annotations

from ..store.modelconfig import ModelConfig
from .costmodel import JobShape, routed_layer_bytes
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


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def moe_assumptions(c: ModelConfig, p: Policy, job: JobShape, stored: list[int]) -> tuple[list[str], dict | None]:
    """(lines for the plan's output, the same as a dict for --json) for plan policy `p`; ([], None) for a dense
    model. `stored`: bytes of each stage as stored (embed, layers, head)."""
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
    decode, prefill = c.expected_experts(block), c.expected_experts(block * max(1, job.prompt_len))
    expert_bytes = layer * c.expert_share() * c.num_layers  # as routed_layer_bytes takes it: every layer's experts
    hit = min(1.0, p.expert_cache_bytes / expert_bytes) if expert_bytes else 0.0
    per_read = routed_layer_bytes(c, layer, p, block)
    lines = [head,
             f"  assumed uniform routing (random weights route so; a trained router is skewed, which reads fewer): "
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
