"""Tensor parallelism, Megatron-style: each rank computes a slice of every layer and partial outputs are summed.

Attention is split by heads (wq/wk/wv by output rows = column-parallel, wo by input columns = row-parallel); the
Llama MLP by intermediate neurons (gate/up rows, down columns), OPT's by fc1 rows and fc2 columns. One all-reduce
after attention's output projection and one after the MLP; everything else (norms, embeddings, head) is
replicated. GQA: with at least as many K/V heads as ranks, each rank takes num_kv_heads / N of them; with fewer,
the ranks that share a K/V head each hold a copy (N a multiple of num_kv_heads). Biases applied after a
reduction (bo, b_down, fc2_b) are added once, after it.

The layer math is engine/model.py's: `local_config` gives the shape one rank sees (its heads, its neurons), and
the blocks there (split_heads, llama_kv, opt_kv, mlp, norm, the cache's attention) run on it unchanged; only the
two reductions sit between them here. The reduction is a callable `reduce(t) -> t` summing over ranks in place:
`gloo_reduce` (torch.distributed; NCCL on GPUs) or `ring_reduce` (the SSD ring, engine/ssdring.py).
`TPEngine` is the single-process Engine streaming one rank's shard store (store/tpshards.py) with these layers.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..store.modelconfig import ModelConfig
from ..store.tpsplit import Split, TensorParallelError, local_config, merge_layer, plan, shard_layer  # noqa: F401
from .generate import Engine
from .model import ACTIVATIONS, llama_kv, mlp, norm, opt_kv, split_heads
from .rope import apply_rope
from .ssdring import SSDRing

Reduce = Callable[[torch.Tensor], torch.Tensor]
AFTER_REDUCE = ("bo", "b_down", "fc2_b")  # biases of a row-parallel matrix: added once, to the sum


# ----------------------------------------------------------------------------------------------- layers


def _reduced(reduce: Reduce, t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    t = reduce(t)
    return t if bias is None else t + bias


def tp_llama_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch, cache, rope, layer: int = 0, *,
                   reduce: Reduce) -> torch.Tensor:
    """model.llama_layer on this rank's heads and neurons (`c` from local_config), summed over ranks after the
    output projection and after the MLP."""
    # x: [B, S, H] (replicated) -> [B, S, H]
    uses_rope, window = c.layer_rope(layer), c.layer_window(layer)
    rope = rope if uses_rope else None
    h = norm(c, x, w["attn_norm"])
    q = split_heads(F.linear(h, w["wq"], w.get("bq")), c.num_heads, c.head_dim)  # [B, Nh/N, S, D]
    q = norm(c, q, w["q_norm"]) if c.qk_norm else q
    q = q if rope is None else apply_rope(q, *rope)
    k, v = llama_kv(c, w, h, rope)  # [B, Nk/N (or 1), S, D]
    # an X-cache layer's recompute: RoPE of the first n slots (the prefix, or every slot where the tier wrote the new
    # rows in place and projects them too), once per step
    prefix_rope = batch.rope_until if uses_rope else (lambda n: None)
    o = cache.attend(q, k, v, batch.start, batch.mask_for(window, c.attn_softcap, c.attn_scale or None), x=h,
                     project=lambda hp: llama_kv(c, w, hp, prefix_rope(hp.shape[1])))
    del q, k, v
    o = F.linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.q_dim), w["wo"])  # partial [B, S, H]
    o = _reduced(reduce, o, w.get("bo"))
    x = x + (norm(c, o, w["post_attn_norm"]) if c.sandwich_norms else o)
    del o
    h = norm(c, x, w["mlp_norm"])
    m = _reduced(reduce, mlp(c, {k: t for k, t in w.items() if k != "b_down"}, h), w.get("b_down"))
    return x + (norm(c, m, w["post_mlp_norm"]) if c.sandwich_norms else m)


def _layer_norm(c: ModelConfig, w: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    return F.layer_norm(x, (c.hidden_size,), w.get(name + "_w"), w.get(name + "_b"), c.norm_eps)


def tp_opt_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch, cache, rope=None, layer: int = 0, *,
                 reduce: Reduce) -> torch.Tensor:
    """model.opt_layer on this rank's heads and neurons, summed over ranks after wo and after fc2."""
    # x: [B, S, H] (replicated) -> [B, S, H]
    h = _layer_norm(c, w, x, "attn_norm") if c.pre_norm else x
    q = split_heads(F.linear(h, w["wq"], w.get("bq")), c.num_heads, c.head_dim)  # [B, Nh/N, S, D]
    k, v = opt_kv(c, w, h)
    o = cache.attend(q, k, v, batch.start, batch.mask_for(0), x=h, project=lambda hp: opt_kv(c, w, hp))
    del q, k, v
    o = F.linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.q_dim), w["wo"])  # partial [B, S, H]
    x = x + _reduced(reduce, o, w.get("bo"))
    del o
    if not c.pre_norm:
        x = _layer_norm(c, w, x, "attn_norm")
    h = _layer_norm(c, w, x, "mlp_norm") if c.pre_norm else x
    m = F.linear(ACTIVATIONS[c.hidden_act](F.linear(h, w["fc1_w"], w.get("fc1_b"))), w["fc2_w"])  # partial
    x = x + _reduced(reduce, m, w.get("fc2_b"))
    return x if c.pre_norm else _layer_norm(c, w, x, "mlp_norm")


TP_LAYERS = {"llama": tp_llama_layer, "opt": tp_opt_layer}


# ----------------------------------------------------------------------------------------------- reductions


def gloo_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over the default process group (gloo on CPU, NCCL on GPUs), in place; the group's timeout bounds it."""
    dist.all_reduce(t)
    return t


def ring_reduce(ring: SSDRing) -> Reduce:
    """Sum through the SSD ring; a GPU tensor goes through host memory (the ring's files are on the SSDs)."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and t.is_contiguous():
            return ring.all_reduce(t)
        return t.copy_(ring.all_reduce(t.detach().to("cpu").contiguous()))
    return reduce


def init_gloo(rank: int, world: int, init_method: str, timeout_s: float = 120.0) -> None:
    """The default process group on CPU; every collective fails after timeout_s instead of hanging."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


# ----------------------------------------------------------------------------------------------- engine


class TPEngine(Engine):
    """The Engine (streaming, KV tiers, schedule) over one rank's shard store, its layers split by tensor
    parallelism. Every rank must run the same prompts with the same parameters: the reductions pair up."""

    def __init__(self, shard_dir, *, rank: int, world: int, reduce: Reduce, **kw):
        super().__init__(shard_dir, **kw)
        tp = self.manifest.extra.get("tensor_parallel") or {}
        if (tp.get("rank"), tp.get("world")) != (rank, world):
            raise TensorParallelError(f"{shard_dir}: manifest extra.tensor_parallel is {tp or 'absent'}, expected "
                                      f"the shard of rank {rank} of {world}")
        if self.sparsity is not None:
            raise TensorParallelError("activation sparsity is not split across ranks yet")
        self.full_config = self.config
        self.config = local_config(self.config, plan(self.config, rank, world))  # KV tiers size per-rank heads
        self.layer_fn = partial(TP_LAYERS[self.config.architecture], reduce=reduce)
