"""How a layer splits over N tensor-parallel ranks (Megatron-style): which heads and neurons each rank holds.

Pure tensor slicing, shared by the store (cutting per-pair shard stores, store/tpshards.py, which the node agent
runs when it stages shards) and the engine (engine/tensorparallel.py computes on a rank's slice).
Attention splits by heads (wq/wk/wv by output rows, wo by input columns); the Llama MLP by intermediate neurons
(gate/up rows, down columns), OPT's by fc1 rows and fc2 columns; everything else is replicated. With fewer K/V
heads than ranks (N a multiple of num_kv_heads), the ranks sharing a K/V head each hold a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .modelconfig import ModelConfig


class TensorParallelError(ValueError):
    """A model cannot be split over this many ranks; the message names the field and what is expected."""


@dataclass(frozen=True)
class Split:
    """Which rows of each split tensor rank `rank` of `world` holds."""

    rank: int
    world: int
    q_heads: tuple[int, int]  # [first, end) of the query heads
    kv_heads: tuple[int, int]  # [first, end) of the K/V heads (shared with other ranks when num_kv_heads < world)
    neurons: tuple[int, int]  # [first, end) of the MLP's intermediate neurons


def plan(c: ModelConfig, rank: int, world: int) -> Split:
    """Rank `rank`'s slice of every layer of `c`; refuses shapes that cannot be split over `world` ranks."""
    if not 0 <= rank < world:
        raise TensorParallelError(f"rank {rank} is outside 0..{world - 1}")
    if c.num_experts:
        raise TensorParallelError(f"num_experts {c.num_experts}: mixture-of-experts layers are not split yet")
    if c.local_rope_theta:
        raise TensorParallelError("local_rope_theta: Gemma 3's sliding-layer RoPE is not split yet")
    if c.num_heads % world:
        raise TensorParallelError(f"num_heads {c.num_heads} is not a multiple of the {world} ranks")
    nk = c.num_kv_heads
    if nk % world and world % nk:
        raise TensorParallelError(f"num_kv_heads {nk} must be a multiple or a divisor of the {world} ranks")
    if c.intermediate_size < world:
        raise TensorParallelError(f"intermediate_size {c.intermediate_size} is smaller than the {world} ranks")
    per_q = c.num_heads // world
    q0 = rank * per_q
    rep = c.num_heads // nk  # query heads per K/V head
    kv = (q0 // rep, (q0 + per_q - 1) // rep + 1)
    i = c.intermediate_size
    return Split(rank, world, (q0, q0 + per_q), kv, (i * rank // world, i * (rank + 1) // world))


def local_config(c: ModelConfig, s: Split) -> ModelConfig:
    """The shape one rank computes: its query and K/V heads, its MLP neurons; everything else as `c`."""
    return replace(c, num_heads=s.q_heads[1] - s.q_heads[0], num_kv_heads=s.kv_heads[1] - s.kv_heads[0],
                   intermediate_size=s.neurons[1] - s.neurons[0], head_dim=c.head_dim)


def _cuts(c: ModelConfig, s: Split) -> dict[str, tuple[int, int, int]]:
    """tensor name -> (dim, first, end) of the rows/columns rank `s` holds; names not listed are replicated."""
    d = c.head_dim
    q, kv, n = (s.q_heads[0] * d, s.q_heads[1] * d), (s.kv_heads[0] * d, s.kv_heads[1] * d), s.neurons
    cuts = {"wq": (0, *q), "bq": (0, *q), "wk": (0, *kv), "bk": (0, *kv), "wv": (0, *kv), "bv": (0, *kv),
            "wo": (1, *q)}
    if c.architecture == "opt":
        return cuts | {"fc1_w": (0, *n), "fc1_b": (0, *n), "fc2_w": (1, *n)}
    return cuts | {"w_gate": (0, *n), "b_gate": (0, *n), "w_up": (0, *n), "b_up": (0, *n), "w_down": (1, *n)}


def shard_layer(c: ModelConfig, w: dict[str, torch.Tensor], s: Split) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors as rank `s.rank` holds them (copies, contiguous)."""
    cuts = _cuts(c, s)
    out = {}
    for name, t in w.items():
        if name in cuts:
            dim, a, b = cuts[name]
            t = t.narrow(dim, a, b - a)
        out[name] = t.contiguous().clone()
    return out


def merge_layer(c: ModelConfig, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of shard_layer over all ranks (K/V heads held by several ranks taken once)."""
    world = len(shards)
    splits = [plan(c, r, world) for r in range(world)]
    cuts = [_cuts(c, s) for s in splits]
    out = {}
    for name, t in shards[0].items():
        if name not in cuts[0]:
            out[name] = t
            continue
        dim, parts, seen = cuts[0][name][0], [], -1
        for r in range(world):
            _, a, b = cuts[r][name]
            if a > seen:  # a K/V range already taken from an earlier rank is skipped
                parts.append(shards[r][name])
                seen = a
        out[name] = torch.cat(parts, dim=dim)
    return out
