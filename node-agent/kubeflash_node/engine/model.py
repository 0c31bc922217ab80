"""The model math, as pure functions over weight dicts: embed, one decoder layer (Llama or OPT), head.

The functions never know where a weight came from (GPU, pinned host, disk); the schedule hands them
tensors already on the compute device. Shapes: B batch, S new tokens, T cached + new tokens, H hidden,
Nh query heads, Nk kv heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..store.modelconfig import ModelConfig
from .rope import Rope, apply_rope


@dataclass
class Span:
    """Which cache slots each new token attends to, in O(B) numbers instead of a dense [B, 1, S, T] mask.

    Sequences are left padded (row r's real tokens sit in consecutive slots first[r]..T-1), so a query at slot q
    sees slots k with first[r] <= k <= q, and, in a layer whose attention slides over `window` positions, only
    q - window < k as well (transformers' sliding_window_overlay). `attention` turns this into an `is_causal`
    flash call per group of equally padded rows (prefill) or a mask of one row per query over a bounded chunk
    of queries (decode, windows, kernels without flash); see attention()."""

    start: int  # cache slot of the first new token
    first: tuple[int, ...]  # per row: the slot of its first real token (its left padding)
    window: int = 0  # 0: the whole context
    softcap: float = 0.0  # Gemma's attn_logit_softcapping: scores -> cap * tanh(scores / cap); 0: none
    scale: float | None = None  # of q.k (Gemma: query_pre_attn_scalar ** -0.5); None: head_dim ** -0.5
    _dense: dict = field(default_factory=dict, repr=False)  # (device, dtype, q0, q1, lo) -> chunk mask, decode only

    def chunk_mask(self, q0: int, q1: int, lo: int, dtype, device) -> torch.Tensor:
        """Additive mask [B, 1, q1-q0, q1-lo] of the queries at slots q0..q1-1 over the keys at slots lo..q1-1."""
        key = (str(device), dtype, q0, q1, lo)
        if key in self._dense:
            return self._dense[key]
        qs = torch.arange(q0, q1, device=device)[:, None]
        ks = torch.arange(lo, q1, device=device)[None, :]
        first = torch.tensor(self.first, device=device)[:, None, None]
        allowed = (ks <= qs)[None] & (ks >= first)  # [B, C, K]
        if self.window:
            allowed &= (qs - ks < self.window)[None]
        allowed |= (ks == qs)[None]  # a padding query attends to itself: no all-masked rows
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        if q1 - q0 == 1:  # a decode step: every layer of the micro-batch reuses this [B, 1, 1, K] row
            self._dense[key] = mask[:, None]
        return mask[:, None]


@dataclass
class Batch:
    """Per micro-batch tensors that every layer needs for one step."""

    positions: torch.Tensor  # [B, S] position ids of the new tokens
    span: Span  # causal + padding, as numbers (no dense mask)
    prefix_positions: torch.Tensor | None = None  # [B, start] position ids of the cached tokens (X-cache recompute)
    rope_at: Callable | None = None  # positions [B, T] -> (cos, sin) [B, 1, T, D]; None for learned positions
    windowed: dict = field(default_factory=dict)  # (window, softcap, scale) -> Span of such a layer
    local_rope: dict = field(default_factory=dict)  # Gemma 3 sliding layers: "new"/"prefix" -> (cos, sin)

    @property
    def start(self) -> int:  # slot in the KV cache where the new tokens go
        return self.span.start

    def mask_for(self, window: int, softcap: float = 0.0, scale: float | None = None) -> Span:
        """The span of a layer whose attention slides over `window` positions (0: the whole context), its scores
        scaled by `scale` (None: 1/sqrt(D)) and soft-capped at `softcap` (0: not). A row's real tokens sit in
        consecutive slots, so slots count positions."""
        if not window and not softcap and scale is None:
            return self.span
        key = (window, softcap, scale)
        if key not in self.windowed:
            self.windowed[key] = Span(self.span.start, self.span.first, window, softcap, scale)
        return self.windowed[key]


# ----------------------------------------------------------------------------------------------- blocks


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# transformers' ACT2FN, formula for formula (config.ACTIVATIONS lists the names); each takes a temporary it may
# overwrite. gelu_new, gelu_python_tanh and gelu_accurate are one formula in transformers too.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_10": lambda x: F.gelu(x).clamp_(-10, 10),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_new": _gelu_tanh,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "hardswish": F.hardswish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0)))),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01, inplace=True),
    "linear": lambda x: x,
    "mish": F.mish,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": lambda x: F.relu(x, inplace=True),
    "relu2": lambda x: torch.square(F.relu(x, inplace=True)),
    "relu6": lambda x: F.relu6(x, inplace=True),
    "sigmoid": torch.sigmoid,
    "silu": lambda x: F.silu(x, inplace=True),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "swish": lambda x: F.silu(x, inplace=True),
    "tanh": torch.tanh,
}


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def gemma_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: weights stored as offsets from 1, the product taken in float32 before the cast."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def norm(c: ModelConfig, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (gemma_rms_norm if c.norm_plus_one else rms_norm)(x, w, c.norm_eps)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap if cap else x


# cuDNN's SDPA re-plans for every new sequence length (~2.4 ms of CPU per call, measured on H100 during
# decode); the memory-efficient kernel takes the padding mask without that cost.
_CUDA_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
_CUDA_CAUSAL = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Most mask (GPU) or score (CPU math kernel) elements one masked call may hold: bounds the fallback's memory.
_CHUNK_ELEMS = 1 << 25


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: Span) -> torch.Tensor:
    """Causal attention of the new tokens over the cache with left padding, never an O(S x T) mask in memory.

    Why this shape (issue 18): every row is left padded and its real tokens are consecutive, so a prefill is,
    per group of rows with the same padding, plain causal attention over the slots after that padding:
    `is_causal` on those slices runs the flash kernel (O(S) memory, no mask read) and its own grouped-query
    mode (no repeated K/V). FlexAttention would express the same with a block mask but needs torch.compile (a
    compile per shape, a C++ toolchain on CPU); per-row lengths cost nothing. Everything else (decode steps,
    sliding-window layers, dtypes or head sizes the flash kernel lacks) takes a mask built per chunk of
    queries, bounded by _CHUNK_ELEMS: one [B, 1, 1, T] row per decode step, keys limited to the window. There
    grouped-query heads are folded into the query axis ([B, Nh, S, D] -> [B, Nk, rep*S, D]), so each K/V head
    is read once for its `rep` query heads and never copied."""
    # q: [B, Nh, S, D]; k, v: [B, Nk, T, D] with T = span.start + S -> [B, Nh, S, D]
    one_group = len(set(span.first)) == 1
    if not span.window and not span.softcap and (q.shape[2] > 1 or one_group) and (span.start == 0 or q.is_cuda) and _flash_ok(q):
        return _causal_groups(q, k, v, span)
    return _masked_chunks(q, k, v, span)


def _flash_ok(q: torch.Tensor) -> bool:
    if not q.is_cuda:
        return True  # the CPU kernels take is_causal with GQA in any dtype
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _sdpa(q, k, v, mask=None, causal=False, span: Span | None = None):
    scale = span.scale if span else None
    if span and span.softcap:  # no fused kernel caps scores: this (bounded) chunk's scores, as transformers' eager
        scores = softcap(q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5), span.softcap) + mask  # [B, Nk, C, K]
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    gqa = k.shape[1] != q.shape[1]
    if not q.is_cuda and not gqa and isinstance(mask, torch.Tensor) and q.shape[-2] <= 64 and k.shape[-2] >= 4096:
        # a decode step over a long host cache (CPU attention): scores as K @ q^T, so BLAS streams each K row once
        # (q @ K^T with a few query rows ran at a third of the read bandwidth for GQA: bench/cpu_attention.py)
        scores = (k @ q.transpose(-1, -2)).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5) + mask
        return torch.softmax(scores, dim=-1) @ v
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=scale)
    with sdpa_kernel(_CUDA_SDPA if isinstance(mask, torch.Tensor) else _CUDA_CAUSAL):  # flash first, maskless
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=scale)


def _rows(rows: list[int], device):
    """An index of batch rows: a slice (a view) where they are consecutive, else an index tensor."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def _causal_groups(q, k, v, span: Span) -> torch.Tensor:
    """Causal attention per group of rows with equal padding, over the slots after it: `is_causal` when the
    queries start at slot 0, else (a prefix already cached) lower-right causal alignment, which the flash kernel
    also runs without a mask. Padding queries get zeros (nothing real attends to their keys)."""
    from torch.nn.attention.bias import causal_lower_right

    start, s = span.start, q.shape[2]
    groups: dict[int, list[int]] = {}
    for r, f in enumerate(span.first):
        groups.setdefault(f, []).append(r)

    def causal(qg, kg, vg):
        sq, sk = qg.shape[2], kg.shape[2]
        if sq == sk:
            return _sdpa(qg, kg, vg, causal=True, span=span)
        if sq == 1:  # a decode step sees every key: no mask, and none of CausalBias's Python per call
            return _sdpa(qg, kg, vg, span=span)
        return _sdpa(qg, kg, vg, causal_lower_right(sq, sk), span=span)

    if len(groups) == 1 and span.first[0] <= start:
        f = span.first[0]
        return causal(q, k[:, :, f:], v[:, :, f:])
    out = torch.zeros_like(q)
    for f, rows in groups.items():
        ix, q0 = _rows(rows, q.device), max(start, f) - start  # q0: the group's first real query
        if q0 < s:
            out[ix, :, q0:] = causal(q[ix, :, q0:], k[ix, :, f:], v[ix, :, f:])
    return out


def _masked_chunks(q, k, v, span: Span) -> torch.Tensor:
    """Queries in chunks, each with its own small mask over the keys it can see (causal, padding, window)."""
    b, nh, s, d = q.shape
    nk, t = k.shape[1], k.shape[2]
    rep = nh // nk
    w = span.window
    seen = t if not w else min(t, 2 * w)  # keys one query chunk of at most `w` queries can see
    per_query = b * seen * (rep if q.is_cuda else nh)  # mask elements (GPU), score elements (CPU math)
    chunk = max(1, _CHUNK_ELEMS // per_query)
    if w:
        chunk = min(chunk, w)
    out = None if chunk >= s else torch.empty_like(q)
    for s0 in range(0, s, chunk):
        s1 = min(s, s0 + chunk)
        q0, q1 = span.start + s0, span.start + s1  # query slots; keys past q1-1 are never seen
        lo = max(0, q0 - w + 1) if w else 0
        mask = span.chunk_mask(q0, q1, lo, q.dtype, q.device)  # [B, 1, C, q1-lo]
        c = s1 - s0
        qc = q[:, :, s0:s1]
        if rep > 1:  # fold: [B, Nh, C, D] -> [B, Nk, rep*C, D]; the mask rows repeat per head of a group
            qc = qc.reshape(b, nk, rep * c, d)
            mask = mask[:, :, None].expand(b, 1, rep, c, q1 - lo).reshape(b, 1, rep * c, q1 - lo)
        o = _sdpa(qc, k[:, :, lo:q1], v[:, :, lo:q1], mask, span=span).reshape(b, nh, c, d)
        if out is None:
            return o
        out[:, :, s0:s1] = o
    return out


def warm_attention(c: ModelConfig, dtype, device) -> None:
    """Run every attention path once on tiny inputs of the model's heads, head size and dtype: the CUDA kernels
    load lazily on their first launch (~4 s for the flash kernels, measured on the H200), which belongs to
    set-up, not to the first prefill."""
    nk = c.num_kv_heads if c.architecture == "llama" else c.num_heads
    q = torch.zeros(2, c.num_heads, 64, c.head_dim, dtype=dtype, device=device)
    k = torch.zeros(2, nk, 64, c.head_dim, dtype=dtype, device=device)
    for first in ((0, 0), (0, 3)):  # one group (flash, is_causal) / padded rows (groups, masked decode)
        attention(q, k, k, Span(0, first))
        attention(q[:, :, 32:], k, k, Span(32, first))  # a cached prefix: lower-right causal
        attention(q[:, :, :1], k[:, :, :33], k[:, :, :33], Span(32, first))  # a decode step
        attention(q, k, k, Span(0, first, window=16))  # a sliding window's chunks


def split_heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    # x: [B, S, n*d] -> [B, n, S, d]
    b, s, _ = x.shape
    return x.view(b, s, n, d).transpose(1, 2)


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    return x if rope is None else apply_rope(x, *rope)


def llama_kv(c: ModelConfig, w: dict, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotated unless rope is None) and V of a Llama layer from its normalized input h [B, T, H]
    -> [B, Nk, T, D] each."""
    k = split_heads(F.linear(h, w["wk"], w.get("bk")), c.num_kv_heads, c.head_dim)
    v = split_heads(F.linear(h, w["wv"], w.get("bv")), c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        k = norm(c, k, w["k_norm"])
    return _rotate(k, rope), v


def _local_rope(c: ModelConfig, batch: Batch, key: str, positions: torch.Tensor, dtype) -> tuple:
    """(cos, sin) of a Gemma 3 sliding layer: plain RoPE of base local_rope_theta, once per micro-batch step."""
    if key not in batch.local_rope:
        batch.local_rope[key] = Rope(replace(c, rope_theta=c.local_rope_theta, rope_scaling=None),
                                     positions.device)(positions, dtype)
    return batch.local_rope[key]


def mlp(c: ModelConfig, w: dict, h: torch.Tensor) -> torch.Tensor:
    """The gated MLP of the Llama family, down(act(gate(h)) * up(h)): [B, S, H] -> [B, S, H]."""
    if "sparse_ffn" in w:  # activation sparsity (engine/sparse.py): only the active neurons' rows and columns
        return w["sparse_ffn"](c, w, h)
    gate = ACTIVATIONS[c.hidden_act](F.linear(h, w["w_gate"], w.get("b_gate")))
    return F.linear(gate.mul_(F.linear(h, w["w_up"], w.get("b_up"))), w["w_down"], w.get("b_down"))


def predict_experts(c: ModelConfig, w: dict, h: torch.Tensor) -> list[int]:
    """The experts a layer's router picks for `h` ([B, S, H]): given the layer's input (normalized as the MLP's input
    is) instead of its post-attention state, a guess of the experts `moe` will route to, made before attention."""
    return torch.topk(F.linear(h.reshape(-1, h.shape[-1]), w["router"]), c.num_experts_per_tok, dim=-1) \
        .indices.unique().tolist()


def moe(c: ModelConfig, w: dict, h: torch.Tensor) -> torch.Tensor:
    """Mixture of experts (Mixtral, Qwen3-MoE), routed as transformers routes: softmax of the router's logits in
    float32, the num_experts_per_tok largest, renormalized to sum 1 when norm_topk_prob; each routed expert (a
    gated MLP, weights e{j}.w_gate / w_up / w_down) runs on its own tokens, in expert order."""
    # h: [B, S, H] -> [B, S, H]
    x = h.reshape(-1, h.shape[-1])  # [N, H]
    probs = torch.softmax(F.linear(x, w["router"]).float(), dim=-1)  # [N, E]
    top, idx = torch.topk(probs, c.num_experts_per_tok, dim=-1)  # [N, k]
    if c.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    act = ACTIVATIONS[c.hidden_act]
    routed = idx.unique().tolist()
    if hasattr(w, "want"):  # experts streamed on demand (experts.RoutedWeights): read the routed set at once
        w.want(routed)

    def expert(e: int) -> tuple[torch.Tensor, torch.Tensor]:  # expert e's tokens and weighted outputs [n, H]
        rows, slot = torch.where(idx == e)
        xe = x[rows]  # [n, H]
        y = F.linear(act(F.linear(xe, w[f"e{e}.w_gate"])).mul_(F.linear(xe, w[f"e{e}.w_up"])), w[f"e{e}.w_down"])
        return rows, (y * top[rows, slot, None]).to(out.dtype)

    if getattr(w, "prefetching", False):  # the prefetched experts compute first, while the others are read; the sum
        parts = {e: expert(e) for e in w.ready_first(routed)}  # still runs in expert order: the same float sums
        for e in routed:
            out.index_add_(0, *parts.pop(e))
        return out.view_as(h)
    for e in routed:
        out.index_add_(0, *expert(e))
    return out.view_as(h)


def llama_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch: Batch, cache, rope, layer: int = 0) -> torch.Tensor:
    """Decoder layer `layer` of the Llama family; `cache.attend` adds the new K, V and attends over the whole
    cache (an X-cache layer recomputes the cached tokens' K, V from their stored input with `project`).
    Biases are whichever the store holds (the converter reads exactly the ones the config names)."""
    # x: [B, S, H]
    uses_rope, window = c.layer_rope(layer), c.layer_window(layer)
    local = bool(uses_rope and window and c.local_rope_theta)  # Gemma 3's sliding layers have a RoPE of their own
    if local:
        rope = _local_rope(c, batch, "new", batch.positions, rope[0].dtype)
    rope = rope if uses_rope else None

    def prefix_rope():  # (cos, sin) of the cached tokens, for an X-cache layer's recompute
        if not uses_rope:
            return None
        if local:
            return _local_rope(c, batch, "prefix", batch.prefix_positions, rope[0].dtype)
        return batch.rope_at(batch.prefix_positions)

    if getattr(w, "prefetching", False):  # streamed experts (experts.RoutedWeights): read the likely ones during attention
        w.prefetch(predict_experts(c, w, norm(c, x, w["mlp_norm"])))
    h = norm(c, x, w["attn_norm"])
    q = split_heads(F.linear(h, w["wq"], w.get("bq")), c.num_heads, c.head_dim)
    q = _rotate(norm(c, q, w["q_norm"]) if c.qk_norm else q, rope)
    k, v = llama_kv(c, w, h, rope)
    o = cache.attend(q, k, v, batch.start, batch.mask_for(window, c.attn_softcap, c.attn_scale or None), x=h,  # [B, Nh, S, D]
                     project=lambda hp: llama_kv(c, w, hp, prefix_rope()))
    del q, k, v  # the MLP's temporaries are the peak of a prefill: free what attention no longer needs
    o = F.linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.q_dim), w["wo"], w.get("bo"))
    x = x + (norm(c, o, w["post_attn_norm"]) if c.sandwich_norms else o)
    del o
    h = norm(c, x, w["mlp_norm"])
    m = moe(c, w, h) if c.num_experts else mlp(c, w, h)
    return x + (norm(c, m, w["post_mlp_norm"]) if c.sandwich_norms else m)


def _layer_norm(c: ModelConfig, w: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    # name_w / name_b are absent when layer_norm_elementwise_affine is false
    return F.layer_norm(x, (c.hidden_size,), w.get(name + "_w"), w.get(name + "_b"), c.norm_eps)


def opt_kv(c: ModelConfig, w: dict, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of an OPT layer from its attention input h [B, T, H] -> [B, Nh, T, D] each."""
    return (split_heads(F.linear(h, w["wk"], w.get("bk")), c.num_heads, c.head_dim),
            split_heads(F.linear(h, w["wv"], w.get("bv")), c.num_heads, c.head_dim))


def opt_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch: Batch, cache, rope=None, layer: int = 0) -> torch.Tensor:
    """One OPT decoder layer: MHA and an MLP of `activation_function`, LayerNorm before each (pre_norm) or
    after each residual sum (post-LN, opt-350m)."""
    # x: [B, S, H]
    h = _layer_norm(c, w, x, "attn_norm") if c.pre_norm else x
    q = split_heads(F.linear(h, w["wq"], w.get("bq")), c.num_heads, c.head_dim)
    k, v = opt_kv(c, w, h)
    o = cache.attend(q, k, v, batch.start, batch.mask_for(0), x=h, project=lambda hp: opt_kv(c, w, hp))
    del q, k, v  # as in llama_layer: the MLP's temporaries are a prefill's peak
    x = x + F.linear(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.hidden_size), w["wo"], w.get("bo"))
    del o
    if not c.pre_norm:
        x = _layer_norm(c, w, x, "attn_norm")
    h = _layer_norm(c, w, x, "mlp_norm") if c.pre_norm else x
    if "sparse_ffn" in w:  # activation sparsity (engine/sparse.py): only the active neurons' fc2 columns
        x = x + w["sparse_ffn"](c, w, h)
    else:
        x = x + F.linear(ACTIVATIONS[c.hidden_act](F.linear(h, w["fc1_w"], w.get("fc1_b"))), w["fc2_w"], w.get("fc2_b"))
    return x if c.pre_norm else _layer_norm(c, w, x, "mlp_norm")


LAYERS = {"llama": llama_layer, "opt": opt_layer}


def embed(c: ModelConfig, w: dict, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # ids, positions: [B, S] -> [B, S, H]
    x = F.embedding(ids, w["tok_embed"])  # [B, S, E]
    if c.embed_scale:  # Gemma: sqrt(hidden), rounded to the weights' dtype as transformers rounds it
        x = x * torch.tensor(c.embed_scale, dtype=torch.float32).to(x.dtype)
    if "project_in" in w:  # OPT's word_embed_proj_dim != hidden_size: [B, S, E] -> [B, S, H]
        x = F.linear(x, w["project_in"])
    if c.architecture == "opt":
        x = x + F.embedding(positions + 2, w["pos_embed"])  # OPT's learned positions are offset by 2
    return x


def head(c: ModelConfig, w: dict, x: torch.Tensor) -> torch.Tensor:
    # x: [B, H] (last position only) -> logits [B, V] in float32 (lm_head: [V, E])
    if c.architecture == "opt":
        if c.final_norm:
            x = _layer_norm(c, w, x, "norm")
        if "project_out" in w:  # [B, H] -> [B, E]
            x = F.linear(x, w["project_out"])
    else:
        x = norm(c, x, w["norm"])
    return softcap(F.linear(x, w["lm_head"]), c.final_softcap).float()


def make_batch(attn_mask: torch.Tensor, start: int, new: int, device=None) -> Batch:
    """Positions and attention span for `new` tokens written at slot `start` of a left-padded cache.

    attn_mask: [B, T] on the host, 1 for real tokens (cache slots first..start+new-1 of each row), 0 for padding.
    """
    t = start + new
    am = attn_mask[:, :t].bool().cpu()
    first = (am.long().cumsum(-1) == 0).sum(-1)  # [B] leading padding slots
    if not bool((am.sum(-1) == t - first).all()):
        raise ValueError("make_batch: each row's real tokens must be consecutive and end at the last slot")
    every = (am.long().cumsum(-1) - 1).clamp(min=0).to(device)  # [B, T]: one copy to the device
    return Batch(positions=every[:, start:t], span=Span(start, tuple(first.tolist())), prefix_positions=every[:, :start])
