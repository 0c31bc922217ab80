"""INF²/FlexGen KV techniques as KV tiers: attention near the data, delayed KV write-back, and the X-cache.

CpuAttentionKV: the cache lives in host memory (float32) and decode attention runs on the CPU there, so only
q, the new K/V row and the attention output cross PCIe (FlexGen's CPU attention); prefill attends on the
device over the chunk it just computed. WriteBackDiskKV: new K/V rows are buffered in host memory and written
to the token-major KV file in large sequential chunks once `flush_bytes` accumulate; loads merge the file's
prefix with the buffered rows, so nothing is re-read twice or written in small pieces. XCacheKV: for a share
of the layers the cache keeps the layer's attention input X [B, T, H] instead of K and V and recomputes K, V
on the compute device each step (INF²'s cooperative X-cache): H values a token instead of 2 x Nk x D, which
saves bytes for multi-head attention (OPT: half) and costs bytes for GQA models (Llama-3-8B: 4096 > 2048).
X is held by an ordinary tier as a pair of halves [B, 1, T, H/2], so every tier, the write-back and the KV
codec carry it unchanged.
"""

from __future__ import annotations

import torch

from .kvcache import DiskKV, HostKV, LayerKV
from .model import attention


class _HostAttention(LayerKV):
    """One layer/micro-batch step whose attention runs on the CPU over the host-resident cache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__(k, v, in_place=True)

    def attend(self, q, k_new, v_new, start, mask, x=None, project=None):
        # q: [B, Nh, S, D] on the compute device; self.k, self.v: [B, Nk, T_cap, D] float32 on the host
        s = k_new.shape[2]
        self.k[:, :, start:start + s] = k_new.float().cpu()
        self.v[:, :, start:start + s] = v_new.float().cpu()
        self.new = (k_new, v_new, start)
        if start == 0:  # prefill: the chunk's own K, V are already on the device
            return attention(q, k_new, v_new, mask)
        o = attention(q.float().cpu(), self.k[:, :, :start + s], self.v[:, :, :start + s], mask)
        return o.to(q.device, q.dtype)


class CpuAttentionKV(HostKV):
    """KV in host memory, decode attention computed on the CPU (only q and the output move)."""

    prefetches = False  # nothing is copied to the device

    def __init__(self, **kw):
        if kw.get("bits", 16) != 16:
            raise ValueError("policy: CPU attention works on uncompressed KV (kv_bits 16)")
        super().__init__(**kw)

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        shape = (batch, self.nk, capacity, self.d)
        self.bufs[layer, mb] = (torch.empty(shape, dtype=torch.float32), torch.empty(shape, dtype=torch.float32))

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        return _HostAttention(*self.bufs[layer, mb])

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        pass  # attend() already wrote the new rows where they live


class WriteBackDiskKV(DiskKV):
    """Disk KV with new rows held in host memory and written back in chunks of at least `flush_bytes`; a store that
    alone reaches `flush_bytes` with nothing buffered (a prefill's rows) is written as it is, from the device."""

    def __init__(self, *, flush_bytes: int = 8 << 20, **kw):
        super().__init__(**kw)
        self.flush_bytes = flush_bytes
        self.pending: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.flushed: dict[tuple[int, int], int] = {}  # token rows already in the file

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        super().allocate(layer, mb, batch, capacity)
        self.pending[layer, mb], self.flushed[layer, mb] = [], 0

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        k_new, v_new, _ = kv.new
        rows, pending = self._rows(k_new, v_new), self.pending[layer, mb]  # [S, row bytes] on the compute device
        if not pending and rows.numel() >= self.flush_bytes:
            f = self.files[layer, mb]
            self._write(f, rows, self.flushed[layer, mb] * self._row(f.batch))
            self.flushed[layer, mb] += rows.shape[0]
            return
        pending.append(rows.cpu())
        if sum(r.numel() for r in pending) >= self.flush_bytes:
            self._flush(layer, mb)

    def _file_rows(self, layer: int, mb: int, start: int) -> int:
        return self.flushed[layer, mb]  # the rest of the prefix is still buffered here

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        if start == 0:
            return LayerKV(None, None, in_place=False)
        b, pending = self.files[layer, mb].batch, self.pending[layer, mb]
        held = self.flushed[layer, mb] + sum(r.shape[0] for r in pending)
        if held != start:
            raise RuntimeError(f"KV write-back: layer {layer} micro-batch {mb} holds {held} rows, expected {start}")
        raw = self._prefix(layer, mb, start)  # room for the whole prefix, the file's rows first
        at = self.flushed[layer, mb] * self._row(b)
        for r in pending:  # then the buffered rows, in place: no copy of the file's part
            raw[at:at + r.numel()].copy_(r.reshape(-1))
            at += r.numel()
        return self._kv(raw, start, b)

    def _flush(self, layer: int, mb: int) -> None:
        rows = self.pending[layer, mb]
        if not rows:
            return
        f = self.files[layer, mb]
        data = torch.cat(rows)
        self._write(f, data, self.flushed[layer, mb] * self._row(f.batch))
        self.flushed[layer, mb] += data.shape[0]
        rows.clear()

    def close(self) -> None:
        self.pending.clear()
        super().close()


class _XLayer(LayerKV):
    """One X-cache layer/micro-batch step: stores the new X, recomputes the cached tokens' K, V from their X."""

    def __init__(self, inner: LayerKV):
        super().__init__(None, None, in_place=False)
        self.inner = inner  # the X halves as the holding tier loaded them

    def attend(self, q, k_new, v_new, start, mask, x=None, project=None):
        if x is None or project is None:
            raise RuntimeError("X-cache: the layer did not pass its input and K/V projection to attend()")
        half = x.shape[-1] // 2
        xk, xv = x[..., :half].unsqueeze(1), x[..., half:].unsqueeze(1)  # views [B, 1, S, H/2]; every tier copies them
        if self.inner.in_place:
            self.inner.update(xk, xv, start)
        else:
            self.inner.new = (xk, xv, start)
        if not start:
            return attention(q, k_new, v_new, mask)
        if self.inner.in_place:  # the new rows are in the buffer: K, V of every slot in one projection, no K/V cat
            s = x.shape[1]
            k, v = project(torch.cat([self.inner.k[:, 0, :start + s], self.inner.v[:, 0, :start + s]], dim=-1))
            return attention(q, k, v, mask)
        k_old, v_old = project(torch.cat([self.inner.k[:, 0, :start], self.inner.v[:, 0, :start]], dim=-1))  # [B, start, H]
        return attention(q, torch.cat([k_old, k_new], dim=2), torch.cat([v_old, v_new], dim=2), mask)


class XCacheKV:
    """Routes the layers in `x_layers` to a tier holding X (built with one head of H/2 values per half) and
    the rest to the K/V tier."""

    def __init__(self, kv, xs, x_layers: set[int]):
        self.kv, self.xs, self.x_layers = kv, xs, set(x_layers)

    def _tier(self, layer: int):
        return self.xs if layer in self.x_layers else self.kv

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        self._tier(layer).allocate(layer, mb, batch, capacity)

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        got = self._tier(layer).load(layer, mb, start)
        return _XLayer(got) if layer in self.x_layers else got

    def prefetch(self, layer: int, mb: int, start: int) -> None:
        self._tier(layer).prefetch(layer, mb, start)

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        if layer in self.x_layers:
            self.xs.store(layer, mb, kv.inner)
        else:
            self.kv.store(layer, mb, kv)

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.xs.nbytes()

    def close(self) -> None:
        self.kv.close()
        self.xs.close()
