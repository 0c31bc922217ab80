"""Prefix KV reuse for the generation schedule: a prompt's longest cached prefix is loaded, not prefilled.

Two tiers, looked up in this order, both keyed by store.kvblocks chained keys (so blocks of other models,
dtypes or compressions never match):
- memory: the blocks that several prompts of this job share. Before the first block of prompts runs,
  `share` finds every full token block that two or more prompts start with, prefills each such prefix once
  (loading what the node cache already holds) and keeps its K, V in host memory (up to `memory_bytes`).
  This is on even without the node cache: a job whose prompts share a document computes the document once.
- node: the on-SSD store (store.kvblocks.KVBlockStore) shared by every job on the node, when the job asks for
  it (spec.cache.prefix). New full blocks are written by a background thread after a block's prefill.

How a micro-batch uses a hit (`attach`): rows stay left padded (row r's tokens in slots first_r..tp-1) and the
whole micro-batch starts its prefill at one slot `start` = min over rows of (first_r + its cached tokens); the
slots first_r..start-1 of every row are filled from the cache. Rows of equal length skip all their cached
blocks; a longer row may recompute a few cached tokens; a row with no hit that is the longest of its
micro-batch makes the whole micro-batch prefill from scratch (prompts are not reordered yet). At least one
token of every prompt is always prefilled, for its logits.

Supported: KV on the compute device (policy.kv == "device", GPU or CPU), 16-bit KV (no compression), no
X-cache. Other policies run without prefix reuse; `reason` says why, and the run report shows it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

from ..store.kvblocks import BLOCK_TOKENS, KVBlockStore, Scope, chain_keys
from .kvcache import DeviceKV


def model_identity(manifest) -> str:
    """The stored model's content: config, dtype and every file's checksum (two copies of one model match)."""
    files = sorted((name, f.sha256) for name, f in manifest.files.items())
    doc = {"config": manifest.config, "dtype": manifest.dtype, "files": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class PrefixCache:
    """Prefix reuse of one job: the memory tier of its shared prefixes and, optionally, the node's block store."""

    def __init__(self, *, store: KVBlockStore | None = None, block_tokens: int = BLOCK_TOKENS,
                 memory_bytes: int = 2 << 30):
        self.store, self.block_tokens, self.memory_bytes = store, block_tokens, memory_bytes
        self.memory: dict[str, torch.Tensor] = {}  # key -> [L, 2, Nk, n, D] on the host
        self.reason = ""  # why prefix reuse is off for this job ("" when on)
        self.note = ""  # why the node cache is not used although the job asked for it
        self.stats = {"hits": 0, "misses": 0, "prefill_tokens_saved": 0, "shared_prefixes": 0,
                      "shared_prefill_tokens": 0, "shared_prefill_s": 0.0, "memory_blocks": 0, "memory_bytes": 0,
                      "write_errors": 0}
        self.scope: Scope | None = None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="kf-kv-blocks") if store else None
        self.pending: dict[str, object] = {}
        self.lock = threading.Lock()
        self.sharing = False
        self.node_misses = 0  # full blocks this job computed because the node cache lacked them
        self.fingerprints: tuple[str, ...] = ()  # the job's prompts' (kubeflash_api.prefixes), for the agent

    # ------------------------------------------------------------------------------------ setup
    def bind(self, engine) -> "PrefixCache | None":
        """Self if prefix reuse can run under the engine's policy and model; None (and `reason` set) if not."""
        p, c = engine.policy, engine.config
        why = []
        if p.kv != "device":
            why.append(f"the KV cache is in the {p.kv!r} tier (prefix reuse needs it on the compute device)")
        if p.kv_bits != 16:
            why.append(f"the KV cache is compressed to {p.kv_bits} bits")
        if p.x_cache_percent:
            why.append("X-cache layers hold inputs, not K and V")
        if why:
            self.reason = "; ".join(why)
            return None
        dtype = str(engine.dtype).removeprefix("torch.")
        self.layout = (c.num_layers, 2, c.num_kv_heads, c.head_dim)
        self.dtype = engine.dtype
        self.scope = Scope(model_identity(engine.manifest), dtype, "none", self.block_tokens,
                           "x".join(map(str, self.layout)))
        return self

    def keys(self, tokens, usable: bool = True) -> list[str]:
        """Chained keys of `tokens`' full blocks; usable: only blocks before the last token (always prefilled)."""
        limit = (len(tokens) - 1) // self.block_tokens if usable else None
        return chain_keys(self.scope, tokens, limit)

    def _has(self, key: str) -> bool:
        return key in self.memory or (self.store is not None and self.store.contains(key))

    def _leading(self, keys: list[str]) -> int:
        n = 0
        while n < len(keys) and self._has(keys[n]):
            n += 1
        return n

    def _get(self, key: str) -> torch.Tensor | None:
        """[L, 2, Nk, n, D] of one block, from memory or the node store (verified there); None on a miss."""
        if key in self.memory:
            return self.memory[key]
        got = self.store.get(key) if self.store is not None else None
        if got is None:
            return None
        meta, payload = got
        shape = (*self.layout[:3], self.block_tokens, self.layout[3])
        t = torch.frombuffer(payload, dtype=torch.uint8)
        if meta.get("shape") != list(shape) or t.numel() != _numel(shape) * _itemsize(self.dtype):
            return None  # a block of another layout under this key: never used
        return t.view(self.dtype).view(shape)

    # ------------------------------------------------------------------------------------ one job's shared prefixes
    def share(self, engine, prompts) -> None:
        """Prefill once each prefix (in full blocks) that two or more prompts start with; keep it in memory."""
        keys = [self.keys(p) for p in prompts]
        counts = Counter(k for ks in keys for k in ks)
        wanted: dict[str, list[int]] = {}  # last key of a shared prefix -> its tokens
        inner: set[str] = set()
        for p, ks in zip(prompts, keys):
            n = 0
            while n < len(ks) and counts[ks[n]] >= 2:
                n += 1
            if n and ks[n - 1] not in self.memory:
                wanted[ks[n - 1]] = list(p[:n * self.block_tokens])
                inner.update(ks[:n - 1])
        seqs = [s for k, s in wanted.items() if k not in inner]  # a prefix of a longer shared one comes with it
        self.stats["shared_prefixes"] += len(seqs)
        seqs = [s for s in seqs if not self._remember(chain_keys(self.scope, s))]  # whole on the SSD: just read
        if not seqs:
            return
        t0 = time.perf_counter()
        from .generate import GenParams  # generate imports this module

        params = GenParams(max_new_tokens=2)  # the device KV tier (max_new_tokens 1 keeps no KV)
        self.sharing, tokens = True, 0
        try:
            for block in engine._blocks(len(seqs)):
                mbs = engine._make_block(seqs, block, params)
                engine._pass(mbs, step=0, params=params, gen=None, stop=None, collect=[])
                tokens += sum(mb.ids.shape[0] * (mb.ids.shape[1] - mb.cached) for mb in mbs)  # computed, not loaded
                self.save(engine, mbs, seqs, shared=True)
                engine.kv.close()
        finally:
            self.sharing = False
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        dt = time.perf_counter() - t0
        self.stats["shared_prefill_s"] += dt
        self.stats["shared_prefill_tokens"] += tokens
        engine.stats["prefill_s"] += dt
        engine.stats["prefill_tokens"] += tokens

    def _remember(self, keys: list[str]) -> bool:
        """Keep the blocks `keys` in memory if every one is cached (and fits); True if they now all are."""
        got = []
        for key in keys:
            t = self._get(key)
            if t is None:
                return False
            got.append((key, t))
        if self.stats["memory_bytes"] + sum(_nbytes(t) for _, t in got) > self.memory_bytes:
            return False
        for key, t in got:
            if key not in self.memory:
                self.memory[key] = t
                self.stats["memory_blocks"] += 1
                self.stats["memory_bytes"] += _nbytes(t)
        return True

    # ------------------------------------------------------------------------------------ per micro-batch
    def attach(self, engine, mbs, prompts) -> None:
        """Fill each micro-batch's KV slots before `start` from the cache; its prefill then begins at `start`."""
        if type(engine.kv) is not DeviceKV:
            return  # prefill-only runs keep no KV
        bt = self.block_tokens
        for k, mb in enumerate(mbs):
            rows = [prompts[i] for i in mb.index]
            tp = mb.ids.shape[1]
            first = [tp - len(p) for p in rows]  # left padding of each row
            keys = [self.keys(p) for p in rows]
            avail = [self._leading(ks) for ks in keys]
            blocks: dict[str, torch.Tensor] = {}
            while True:  # a corrupt or vanished block shortens its row, and so maybe the common start
                start = min(f + n * bt for f, n in zip(first, avail))
                bad = self._load(keys, first, avail, start, blocks)
                if bad is None:
                    break
                avail[bad[0]] = bad[1]
            if not self.sharing:  # the lookups of the shared-prefix pass are not the job's
                self.stats["hits"] += sum(avail)
                self.stats["misses"] += sum(len(ks) for ks in keys) - sum(avail)
            if start <= 0:
                continue
            on_device: dict[tuple[str, ...], torch.Tensor] = {}
            for r, ks in enumerate(keys):
                used = start - first[r]  # this row's tokens before `start` (the rest of its cached ones are redone)
                for j in range(self.layout[0]):  # padding slots the prefill now skips: masked, but never NaN garbage
                    for buf in engine.kv.bufs[j, k]:
                        buf[r, :, :min(first[r], start)] = 0
                if used <= 0:
                    continue
                chain = tuple(ks[:-(-used // bt)])
                if chain not in on_device:  # rows of one prefix share one copy to the device
                    on_device[chain] = torch.cat([blocks[key] for key in chain], dim=3).to(engine.device)
                kv = on_device[chain][:, :, :, :used]  # [L, 2, Nk, used, D]
                for j in range(kv.shape[0]):
                    kb, vb = engine.kv.bufs[j, k]  # [B, Nk, cap, D]
                    kb[r, :, first[r]:start] = kv[j, 0]
                    vb[r, :, first[r]:start] = kv[j, 1]
                self.stats["prefill_tokens_saved"] += used
            mb.cached = start

    def _load(self, keys, first, avail, start, blocks) -> tuple[int, int] | None:
        """Load the blocks every row needs before `start` into `blocks`; (row, blocks it really has) on a miss."""
        for r, ks in enumerate(keys):
            need = -(-max(0, start - first[r]) // self.block_tokens)
            for b in range(need):
                if ks[b] not in blocks:
                    got = self._get(ks[b])
                    if got is None:
                        return r, b
                    blocks[ks[b]] = got
        return None

    def save(self, engine, mbs, prompts, *, shared: bool = False) -> None:
        """After a prefill: hand the new full blocks to the node store (in the background) and, for the shared
        prefixes, keep them in memory."""
        if type(engine.kv) is not DeviceKV or (self.store is None and not shared):
            return
        bt = self.block_tokens
        for k, mb in enumerate(mbs):
            tp = mb.ids.shape[1]
            for r, i in enumerate(mb.index):
                p = prompts[i]
                for b, key in enumerate(self.keys(p, usable=False)):
                    in_store = self.store is None or self.store.contains(key) or key in self.pending
                    if (key in self.memory or not shared) and in_store:
                        continue
                    s0 = tp - len(p) + b * bt  # slot of the block's first token (rows are left padded)
                    kv = torch.stack([torch.stack([kb[r, :, s0:s0 + bt], vb[r, :, s0:s0 + bt]])
                                      for kb, vb in (engine.kv.bufs[j, k] for j in range(self.layout[0]))])
                    kv = kv.to("cpu", copy=True)  # [L, 2, Nk, bt, D]
                    if shared and key not in self.memory and self.stats["memory_bytes"] + _nbytes(kv) <= \
                            self.memory_bytes:
                        self.memory[key] = kv
                        self.stats["memory_blocks"] += 1
                        self.stats["memory_bytes"] += _nbytes(kv)
                    if not in_store:
                        self.node_misses += 1
                        self._write(key, kv)

    def _write(self, key: str, kv: torch.Tensor) -> None:
        with self.lock:
            self.pending[key] = self.writer.submit(self._put, key, kv)

    def _put(self, key: str, kv: torch.Tensor) -> None:
        try:
            payload = kv.contiguous().view(torch.uint8).numpy()
            self.store.put(key, memoryview(payload).cast("B"), {"shape": list(kv.shape), "dtype": self.scope.dtype})
        except Exception:  # noqa: BLE001 - a failed block write means "not cached", never a failed job
            self.stats["write_errors"] += 1
        finally:
            with self.lock:
                self.pending.pop(key, None)

    def close(self) -> None:
        """Wait for the block writes in flight (they run beside the generation, not after it)."""
        if self.writer is not None:
            self.writer.shutdown(wait=True)
            self.writer = None
            if self.scope is not None:
                st = self.store.stats  # the fingerprints say the cache holds this job's prefix: it wrote or read it
                held = st["hits"] or st["blocks_written"]
                self.store.record_usage(self.usage(), prefixes=list(self.fingerprints) if held else [])

    def usage(self) -> dict[str, int]:
        """This job's use of the node cache, as the agent sums it over jobs (FlashNode status.kvCache, Prometheus):
        hits = blocks read from the SSD, misses = blocks computed because the cache lacked them."""
        st = self.store.stats
        return {"hits": st["hits"], "misses": self.node_misses + st["corrupt"], "corrupt": st["corrupt"],
                "bytes_read": st["bytes_read"], "blocks_written": st["blocks_written"],
                "bytes_written": st["bytes_written"], "write_failures": st["write_failures"],
                "blocks_evicted": st["blocks_evicted"], "bytes_evicted": st["bytes_evicted"],
                "prefill_tokens_saved": self.stats["prefill_tokens_saved"]}

    def report(self) -> dict:
        out = {"active": self.scope is not None, "reason": self.reason, "note": self.note,
               "block_tokens": self.block_tokens,
               "node_cache": str(self.store.root) if self.store is not None else None} | dict(self.stats)
        if self.store is not None:
            out["node"] = dict(self.store.stats) | {"bytes_on_disk": self.store.usage,
                                                    "budget_bytes": self.store.budget,
                                                    "blocks_missing": self.node_misses}
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
