"""The model math, as pure functions over weight dicts: embed, one decoder layer (Llama or OPT), head.

The functions never know where a weight came from (GPU, pinned host, disk); the schedule hands them
tensors already on the compute device. Shapes: B batch, S new tokens, T cached + new tokens, H hidden,
Nh query heads, Nk kv heads, D head dim.
"""

from __future__ import annotations

import functools
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
    local_rope: dict = field(default_factory=dict)  # Gemma 3 sliding layers: "new"/"prefix"/n -> (cos, sin)
    all_positions: torch.Tensor | None = None  # [B, start + S] position ids of every slot (X-cache recompute)
    _rot: dict = field(default_factory=dict, repr=False)  # once per step: token-major RoPE, cached prefix RoPE

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

    def rope_until(self, n: int) -> Rotary | None:
        """The rotary embedding of the first n cache slots (an X-cache layer's recompute), once per step."""
        if self.rope_at is None:
            return None
        if n not in self._rot:
            pos = self.prefix_positions if n == self.start or self.all_positions is None else self.all_positions[:, :n]
            self._rot[n] = Rotary.of(*self.rope_at(pos))
        return self._rot[n]

    def rotary(self, rope: tuple | None) -> Rotary | None:
        """`rope` ((cos, sin) [B, 1, S, D], computed once per step by the engine) as a Rotary, built once per step."""
        if rope is None or isinstance(rope, Rotary):
            return rope
        key = id(rope[0])
        if key not in self._rot:
            self._rot[key] = (rope, Rotary.of(*rope))  # the key's tensors stay alive with the entry
        return self._rot[key][1]


class Rotary(tuple):
    """(cos, sin with its first half negated) [B, 1, S, D]: rope.apply_rope in four operators instead of five, as
    x * cos + roll(x, D/2) * sin_signed, which equals x * cos + rotate_half(x) * sin element for element (negation
    is exact). `token_major` gives the same for x laid out [B, S, N, D] (Q and K rotated in one go)."""

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> Rotary:
        half = sin.shape[-1] // 2
        return cls((cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)))

    @functools.cached_property
    def token_major(self) -> Rotary:
        return Rotary((self[0].transpose(1, 2), self[1].transpose(1, 2)))  # [B, S, 1, D]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self[0] + torch.roll(x, x.shape[-1] // 2, dims=-1) * self[1]

    def in_place(self, x: torch.Tensor) -> torch.Tensor:
        """The same values written over x (the same operators, so the same rounding)."""
        r = torch.roll(x, x.shape[-1] // 2, dims=-1).mul_(self[1])
        return x.mul_(self[0]).add_(r)


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
    # transformers' LlamaRMSNorm: normalized in float32, rounded to x's dtype, then scaled; F.rms_norm is one fused
    # kernel on CUDA and the same five operators (bit for bit) on the CPU
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * w


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
    # (on the CPU a cached prefix takes the masked path, but for a decode step, which needs no mask at all)
    cpu_ok = span.start == 0 or q.shape[2] == 1
    if not span.window and not span.softcap and (q.shape[2] > 1 or one_group) and (cpu_ok or q.is_cuda) and _flash_ok(q):
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
    if not q.is_cuda and not gqa and not causal and (mask is None or isinstance(mask, torch.Tensor)) \
            and q.shape[-2] <= 64 and k.shape[-2] >= 4096:
        # a decode step over a long host cache (CPU attention): scores as K @ q^T, so BLAS streams each K row once
        # (q @ K^T with a few query rows ran at a third of the read bandwidth for GQA: bench/cpu_attention.py)
        scores = (k @ q.transpose(-1, -2)).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        return torch.softmax(scores if mask is None else scores + mask, dim=-1) @ v
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
    start, s = span.start, q.shape[2]

    def causal(qg, kg, vg):
        sq, sk = qg.shape[2], kg.shape[2]
        if sq == sk:
            return _sdpa(qg, kg, vg, causal=True, span=span)
        if sq == 1:  # a decode step sees every key: no mask, and none of CausalBias's Python per call
            b, nh, _, d = qg.shape
            nk = kg.shape[1]
            if not qg.is_cuda and nk != nh:  # CPU: grouped-query heads folded into the query axis, as _masked_chunks
                return _sdpa(qg.reshape(b, nk, nh // nk, d), kg, vg, span=span).reshape(b, nh, 1, d)
            return _sdpa(qg, kg, vg, span=span)
        from torch.nn.attention.bias import causal_lower_right

        return _sdpa(qg, kg, vg, causal_lower_right(sq, sk), span=span)

    f = span.first[0]
    if f <= start and span.first.count(f) == len(span.first):  # one group (every decode step that gets here)
        return causal(q, k[:, :, f:], v[:, :, f:])
    groups: dict[int, list[int]] = {}
    for r, f in enumerate(span.first):
        groups.setdefault(f, []).append(r)
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


# Weights of one layer that a decode step multiplies by the same input: concatenated once (fuse_projections) they
# take one matmul instead of three (Q, K, V) or two (gate, up). name -> (parts, their biases)
FUSED = {"fused_qkv": (("wq", "wk", "wv"), ("bq", "bk", "bv")),
         "fused_gate_up": (("w_gate", "w_up"), ("b_gate", "b_up"))}


def fuse_projections(w: dict) -> dict:
    """A resident layer's weights with each FUSED group concatenated once into one matrix (and one bias), the parts
    becoming row views of it, so the X-cache recompute, the sparse FFN and tensor parallelism read the same tensors.
    Every tensor that was a view into a shared buffer (a CPU stage file) is copied out, so the buffer is freed and
    the layer takes no more memory than before. Streamed layers are not fused: that would copy them every step."""
    out = dict(w)
    for name, (parts, biases) in FUSED.items():
        ts = [w.get(p) for p in parts]
        bs = [w.get(b) for b in biases]
        if any(not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point() for t in ts) \
                or len({(t.dtype, t.device, t.shape[1]) for t in ts}) != 1 \
                or (any(b is not None for b in bs) and any(b is None for b in bs)):
            continue
        out[name] = torch.cat(ts)
        for p, view in zip(parts, out[name].split([t.shape[0] for t in ts])):
            out[p] = view
        if bs[0] is not None:
            out[name + "_b"] = torch.cat(bs)
            for b, view in zip(biases, out[name + "_b"].split([t.shape[0] for t in ts])):
                out[b] = view
    fused = {p for name, (parts, biases) in FUSED.items() if name in out for p in parts + biases}
    for k, t in out.items():  # the rest out of a shared stage buffer, which is then freed
        if k not in fused and isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > t.nbytes:
            out[k] = t.clone()
    return out


def _qkv(c: ModelConfig, w: dict, h: torch.Tensor, nk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Q and K together [B, S, Nh + nk, D] and V [B, S, nk, D] (token-major views of one output) of the attention
    input h [B, S, H], from the fused matrix in one matmul; None when the layer has no fused matrix."""
    if "fused_qkv" not in w:
        return None
    b, s, _ = h.shape
    y = F.linear(h, w["fused_qkv"], w.get("fused_qkv_b")).view(b, s, c.num_heads + 2 * nk, c.head_dim)
    return y.split([c.num_heads + nk, nk], dim=2)


def split_heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    # x: [B, S, n*d] -> [B, n, S, d]
    b, s, _ = x.shape
    return x.view(b, s, n, d).transpose(1, 2)


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    if rope is None:
        return x
    return rope(x) if isinstance(rope, Rotary) else apply_rope(x, *rope)


def llama_kv(c: ModelConfig, w: dict, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotated unless rope is None) and V of a Llama layer from its normalized input h [B, T, H]
    -> [B, Nk, T, D] each."""
    k, v = _kv_proj(c, w, h, c.num_kv_heads)
    if c.qk_norm:
        k = norm(c, k, w["k_norm"])
    return _rotate(k, rope), v


def _kv_proj(c: ModelConfig, w: dict, h: torch.Tensor, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [B, nk, T, D] of h [B, T, H]: one matmul over the K and V rows of the fused matrix when there is one."""
    if "fused_qkv" not in w:
        return (split_heads(F.linear(h, w["wk"], w.get("bk")), nk, c.head_dim),
                split_heads(F.linear(h, w["wv"], w.get("bv")), nk, c.head_dim))
    q_rows = w["wq"].shape[0]
    b = w.get("fused_qkv_b")
    kv = split_heads(F.linear(h, w["fused_qkv"][q_rows:], None if b is None else b[q_rows:]), 2 * nk, c.head_dim)
    return kv[:, :nk], kv[:, nk:]


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
    if "fused_gate_up" in w:  # one matmul; gate and up are views of its output, the activation runs in place
        gate, up = F.linear(h, w["fused_gate_up"], w.get("fused_gate_up_b")).split(w["w_gate"].shape[0], dim=-1)
        return F.linear(ACTIVATIONS[c.hidden_act](gate).mul_(up), w["w_down"], w.get("b_down"))
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
    rope = batch.rotary(rope) if uses_rope else None  # sign-folded sin, built once per step

    def prefix_rope(n: int):  # the rotary embedding of the first n cache slots, for an X-cache layer's recompute
        if not uses_rope:
            return None
        if local:
            pos = batch.prefix_positions if n == batch.start else batch.all_positions[:, :n]
            return batch.rotary(_local_rope(c, batch, n, pos, rope[0].dtype))
        return batch.rope_until(n)

    if getattr(w, "prefetching", False):  # streamed experts (experts.RoutedWeights): read the likely ones during attention
        w.prefetch(predict_experts(c, w, norm(c, x, w["mlp_norm"])))
    h = norm(c, x, w["attn_norm"])
    sa = w.get("sparse_attn")  # attention input sparsity (attnsparse.py): q/k/v/o of the kept channels only
    wa, ha, h = (w, h, h) if sa is None else sa.qkv(c, w, h)
    qkv = None if c.qk_norm else _qkv(c, wa, ha, c.num_kv_heads)
    if qkv is not None:  # one matmul, and Q and K rotated together in place: token-major [B, S, heads, D]
        qk, v = qkv
        if rope is not None:  # (in place: K stays next to V, so the cache writes both in one copy)
            rope.token_major.in_place(qk)
        q, k = qk.split([c.num_heads, c.num_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, N, S, D]
    else:
        q = split_heads(F.linear(ha, wa["wq"], wa.get("bq")), c.num_heads, c.head_dim)
        q = _rotate(norm(c, q, w["q_norm"]) if c.qk_norm else q, rope)
        k, v = llama_kv(c, wa, ha, rope)
    del wa, ha

    def project(hp: torch.Tensor):  # an X-cache layer's K, V of its stored inputs (masked ones when sparse)
        wp, hp = (w, hp) if sa is None else sa.qkv(c, w, hp, count=False)[:2]
        return llama_kv(c, wp, hp, prefix_rope(hp.shape[1]))

    o = cache.attend(q, k, v, batch.start, batch.mask_for(window, c.attn_softcap, c.attn_scale or None), x=h,  # [B, Nh, S, D]
                     project=project)
    del q, k, v  # the MLP's temporaries are the peak of a prefill: free what attention no longer needs
    o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], c.q_dim)
    o = F.linear(o, w["wo"], w.get("bo")) if sa is None else sa.out(c, w, o)
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
    return _kv_proj(c, w, h, c.num_heads)


def opt_layer(c: ModelConfig, w: dict, x: torch.Tensor, batch: Batch, cache, rope=None, layer: int = 0) -> torch.Tensor:
    """One OPT decoder layer: MHA and an MLP of `activation_function`, LayerNorm before each (pre_norm) or
    after each residual sum (post-LN, opt-350m)."""
    # x: [B, S, H]
    h = _layer_norm(c, w, x, "attn_norm") if c.pre_norm else x
    qkv = _qkv(c, w, h, c.num_heads)
    if qkv is not None:  # one matmul: token-major views [B, S, heads, D] -> [B, N, S, D]
        q, k = qkv[0].transpose(1, 2).split(c.num_heads, dim=1)
        v = qkv[1].transpose(1, 2)
    else:
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
    Host work is O(B x T) comparisons once and O(B) numbers after; the positions are built on `device` from the
    per-row padding (slot j of row r is position max(j - first[r], 0)), so nothing of size [B, T] crosses to it.
    """
    t = start + new
    am = attn_mask[:, :t].cpu() != 0
    real = am.sum(-1)  # [B]
    first = t - real  # a valid row's real tokens are its last `real` slots
    lead = am.int().argmax(-1)  # each row's first real slot (0 for a row with none)
    if not bool(((real == 0) | (lead == first)).all()):
        raise ValueError("make_batch: each row's real tokens must be consecutive and end at the last slot")
    firsts = first.tolist()
    slots = torch.arange(t, device=device)
    every = (slots[None, :] - torch.tensor(firsts, device=device)[:, None]).clamp(min=0)  # [B, T] long
    return Batch(positions=every[:, start:t], span=Span(start, tuple(firsts)), prefix_positions=every[:, :start],
                 all_positions=every)
