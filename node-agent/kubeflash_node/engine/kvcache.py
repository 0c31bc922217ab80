"""KV cache tiers behind one interface: `load(layer, mb, start) -> LayerKV` and `store(layer, mb, kv)`.

device: tensors stay on the compute device, updated in place. cpu: host tensors, prefix copied in and new
slice copied out per step. disk: one file per (layer, micro-batch) in the job directory, token-major
([T, B, 2, Nk, D]) so the prefix is one sequential read and a step's new tokens one sequential write.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class LayerKV:
    """The cache of one layer for one micro-batch during one step; the model calls `update` once."""

    def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, in_place: bool):
        # k, v: [B, Nk, T_cap or T_prefix, D]
        self.k, self.v, self.in_place = k, v, in_place
        self.new: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int):
        # k_new: [B, Nk, S, D] -> full K, V [B, Nk, start+S, D]
        s = k_new.shape[2]
        self.new = (k_new, v_new, start)
        if self.in_place:
            self.k[:, :, start:start + s] = k_new
            self.v[:, :, start:start + s] = v_new
            return self.k[:, :, :start + s], self.v[:, :, :start + s]
        if self.k is None or start == 0:
            return k_new, v_new
        return torch.cat([self.k, k_new], dim=2), torch.cat([self.v, v_new], dim=2)


class DeviceKV:
    """KV resident on the compute device (preallocated to the block's full length)."""

    def __init__(self, *, device, dtype, num_kv_heads: int, head_dim: int, **_):
        self.device, self.dtype, self.nk, self.d = device, dtype, num_kv_heads, head_dim
        self.bufs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        shape = (batch, self.nk, capacity, self.d)
        self.bufs[layer, mb] = (torch.empty(shape, dtype=self.dtype, device=self.device),
                                torch.empty(shape, dtype=self.dtype, device=self.device))

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        k, v = self.bufs[layer, mb]
        return LayerKV(k, v, in_place=True)

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        pass

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.bufs.values())

    def close(self) -> None:
        self.bufs.clear()


class HostKV(DeviceKV):
    """KV in host memory (pinned when the compute device is a GPU); only the new slice is written back."""

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        shape = (batch, self.nk, capacity, self.d)
        pin = self.device.type == "cuda"
        self.bufs[layer, mb] = (torch.empty(shape, dtype=self.dtype, pin_memory=pin),
                                torch.empty(shape, dtype=self.dtype, pin_memory=pin))

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        if start == 0:
            return LayerKV(None, None, in_place=False)
        k, v = self.bufs[layer, mb]
        return LayerKV(k[:, :, :start].to(self.device, non_blocking=True),
                       v[:, :, :start].to(self.device, non_blocking=True), in_place=False)

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        k_new, v_new, start = kv.new
        k, v = self.bufs[layer, mb]
        s = k_new.shape[2]
        k[:, :, start:start + s].copy_(k_new, non_blocking=True)
        v[:, :, start:start + s].copy_(v_new, non_blocking=True)


class DiskKV:
    """KV in files under `directory`: kv_l{layer}_m{mb}.bin, rows of [B, 2, Nk, D] per token position."""

    def __init__(self, *, device, dtype, num_kv_heads: int, head_dim: int, directory: Path):
        self.device, self.dtype, self.nk, self.d = device, dtype, num_kv_heads, head_dim
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[tuple[int, int], tuple[int, int]] = {}  # -> (fd, batch)
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        path = self.dir / f"kv_l{layer:03d}_m{mb:03d}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, capacity * self._row(batch))
        old = self.files.pop((layer, mb), None)
        if old:
            os.close(old[0])
        self.files[layer, mb] = (fd, batch)

    def _row(self, batch: int) -> int:
        return batch * 2 * self.nk * self.d * self.itemsize

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        if start == 0:
            return LayerKV(None, None, in_place=False)
        fd, b = self.files[layer, mb]
        raw = torch.empty(start * self._row(b), dtype=torch.uint8)
        view = memoryview(raw.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], done)
            if got == 0:
                raise OSError(f"{self.dir}: KV file for layer {layer} micro-batch {mb} is shorter than expected")
            done += got
        rows = raw.view(self.dtype).view(start, b, 2, self.nk, self.d).to(self.device)
        kv = rows.permute(1, 2, 3, 0, 4)  # [B, 2, Nk, T, D]
        return LayerKV(kv[:, 0], kv[:, 1], in_place=False)

    def store(self, layer: int, mb: int, kv: LayerKV) -> None:
        k_new, v_new, start = kv.new
        fd, b = self.files[layer, mb]
        rows = torch.stack([k_new, v_new], dim=1).permute(3, 0, 1, 2, 4).contiguous().cpu()  # [S, B, 2, Nk, D]
        data = memoryview(rows.view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], start * self._row(b) + done)

    def nbytes(self) -> int:
        return sum(os.fstat(fd).st_size for fd, _ in self.files.values())

    def close(self) -> None:
        for fd, _ in self.files.values():
            os.close(fd)
        self.files.clear()


class NoKV(DeviceKV):
    """Prefill-only jobs (max_new_tokens == 1): attention uses the chunk's own K, V; nothing is kept."""

    def allocate(self, layer: int, mb: int, batch: int, capacity: int) -> None:
        pass

    def load(self, layer: int, mb: int, start: int) -> LayerKV:
        return LayerKV(None, None, in_place=False)


TIERS = {"device": DeviceKV, "cpu": HostKV, "disk": DiskKV, "none": NoKV}


def make_kv(tier: str, **kw):
    if tier == "disk" and kw.get("directory") is None:
        raise ValueError("kv tier 'disk' needs a job directory for its files")
    if tier != "disk":
        kw.pop("directory", None)
    return TIERS[tier](**kw)
