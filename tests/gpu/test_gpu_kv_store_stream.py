"""The host KV tier's stores on the GPU (issue 18, ourslcc): HostKV copies a layer's new rows (K, V, or the
X-cache's X halves) to host memory on a store stream of its own, so the next layer's compute does not queue behind
the copy. The copy leaves the compute stream free at once, every reader sees the stored bytes exactly (the prefetch,
the load that was not prefetched, after the rows' memory was reused on the compute stream), and the engine's tokens
with kv cpu (plain and X-cache) are the device tier's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.kvcache import HostKV, LayerKV
from kubeflash_node.engine.policy import Policy

PROMPTS = [[5 + i, 9, 13 + i, 2, 7] * (40 + 9 * i) for i in range(4)]  # 200-335 tokens: prefill stores of size


def _tier(nk=1, d=512, dtype=torch.float16):
    return HostKV(device="cuda", dtype=dtype, num_kv_heads=nk, head_dim=d)


def _store(kv: HostKV, layer: int, rows: tuple[torch.Tensor, torch.Tensor], start: int) -> None:
    got = LayerKV(None, None, in_place=False)
    got.new = (rows[0], rows[1], start)
    kv.store(layer, 0, got)


def test_store_leaves_the_compute_stream_at_once():
    """A 1 GiB store: the compute stream passes it while the copy is still running, on a stream that is not the
    compute stream; once its event is done the host rows are the device's, bit for bit."""
    kv = _tier(d=2048)
    b, s = 4, 32768  # [B, 1, S, D] fp16: 2 x 512 MiB
    kv.allocate(0, 0, b, s)
    k = torch.randn(b, 1, s, 2048, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    torch.cuda.synchronize()
    _store(kv, 0, (k, v), 0)
    passed = torch.cuda.Event()
    passed.record(torch.cuda.current_stream())
    passed.synchronize()
    copying = not kv.stored[0, 0].query()
    kv.stored[0, 0].synchronize()
    assert kv.store_stream is not None and kv.store_stream != torch.cuda.current_stream()
    assert copying  # the compute stream reached the mark before the copy out finished
    hk, hv = kv.bufs[0, 0]  # [T, B, 1, D]
    assert torch.equal(hk.permute(1, 2, 0, 3), k.cpu()) and torch.equal(hv.permute(1, 2, 0, 3), v.cpu())
    kv.close()


@pytest.mark.parametrize("prefetched", [True, False], ids=["prefetch", "load-only"])
def test_loads_see_every_store_after_the_rows_memory_is_reused(prefetched):
    """A prefill then decode rows, each stored right after it is made and its memory reused at once on the compute
    stream (filled with other values behind a sleep-delayed producer): the prefix each step loads, prefetched or
    not, is exactly what was stored."""
    kv = _tier(nk=2, d=128)
    b, cap, prompt, steps = 3, 4200, 4096, 6
    for layer in range(2):
        kv.allocate(layer, 0, b, cap)
    torch.manual_seed(0)
    want = {layer: (torch.randn(b, 2, cap, 128, dtype=torch.float16),
                    torch.randn(b, 2, cap, 128, dtype=torch.float16)) for layer in range(2)}
    for step in range(steps + 1):
        start, s = (0, prompt) if step == 0 else (prompt + step - 1, 1)
        for layer in range(2):
            if start:
                if prefetched:
                    kv.prefetch(layer, 0, start)
                got = kv.load(layer, 0, start)
                assert torch.equal(got.k.cpu(), want[layer][0][:, :, :start])
                assert torch.equal(got.v.cpu(), want[layer][1][:, :, :start])
            torch.cuda._sleep(20_000_000)  # the producer runs late: a store that did not wait for it copies garbage
            rows = [w[:, :, start:start + s].to("cuda") * 1 for w in want[layer]]
            _store(kv, layer, tuple(rows), start)
            del rows  # their blocks go back to the compute stream's pool...
            junk = [torch.full((b, 2, s, 128), float("nan"), device="cuda", dtype=torch.float16) for _ in range(2)]
            del junk  # ...and are reused at once only if the store did not hold them
    assert kv.loads == {"prefetched": 2 * steps if prefetched else 0, "waited": 0 if prefetched else 2 * steps}
    kv.close()


def _tokens(store, policy, tmp_path):
    engine = Engine(store, policy=policy, device="cuda", job_dir=tmp_path)
    try:
        return [c.tokens for c in engine.generate(PROMPTS, GenParams(max_new_tokens=12))]
    finally:
        engine.close()


@pytest.mark.parametrize("x_cache", [100, 0], ids=["x-cache", "kv"])
def test_kv_cpu_with_async_stores_gives_the_device_tiers_tokens(opt_store, tmp_path, x_cache):
    """kv cpu (X-cache on every layer, or plain K, V), its stores on the store stream, generates exactly the device
    tier's tokens for the same policy."""
    base = Policy(gpu_batch_size=2, num_gpu_batches=2, x_cache_percent=x_cache, compute_dtype="float32")
    device = _tokens(opt_store, base, tmp_path / "device")
    host = _tokens(opt_store, replace(base, kv="cpu"), tmp_path / "cpu")
    assert host == device and all(len(t) for t in host)
