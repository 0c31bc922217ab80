"""Exact-size page-locked host buffers (engine/pinned.py): page-aligned, locked (the driver knows the range as
locked host memory; torch's is_pinned() knows only its own allocator's blocks), the size asked for rather than
the caching allocator's next power of two, and unlocked when garbage."""

from __future__ import annotations

import ctypes
import gc

import torch

from kubeflash_node.engine import pinned


def _locked(t: torch.Tensor) -> bool:
    """The driver knows the range as page-locked host memory (cuMemHostGetFlags succeeds only for that)."""
    flags = ctypes.c_uint(0)
    return pinned._cuda_driver().cuMemHostGetFlags(ctypes.byref(flags), ctypes.c_void_p(t.data_ptr())) == 0


def test_pinned_buffer_is_exact_aligned_and_locked():
    t = pinned.empty((3, 5, 7), torch.float16)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float16 and _locked(t)
    assert t.data_ptr() % pinned.PAGE == 0 and t.untyped_storage().nbytes() < 3 * 5 * 7 * 2 + 3 * pinned.PAGE
    t.copy_(torch.arange(105, dtype=torch.float16).view(3, 5, 7))
    d = t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), t)


def test_large_buffer_is_not_rounded_to_a_power_of_two(monkeypatch):
    calls = []
    real = pinned._unregister
    monkeypatch.setattr(pinned, "_unregister", lambda drv, ptr: calls.append(ptr) or real(drv, ptr))
    n = (600 << 20) + 12345  # the caching allocator would lock 1 GiB for this
    t = pinned.empty(n, torch.uint8)
    held = t.untyped_storage().nbytes()  # an int: a failed assert must not print a 600 MB storage
    assert _locked(t) and held <= n + 2 * pinned.HUGE < 1 << 30
    assert t.data_ptr() % pinned.HUGE == 0  # huge-page aligned: advised to the kernel as THP
    ptr = t.data_ptr()
    del t
    gc.collect()
    assert calls == [ptr]  # unlocked when garbage, before its memory goes back


def test_unpinned_and_empty_shapes():
    plain = pinned.empty((4,), torch.float32, pinned=False)
    assert not plain.is_pinned() and not _locked(plain)
    assert pinned.empty((0, 3), torch.float16).shape == (0, 3)
