"""The one generation schedule: for each step, for each stage (embed, layers, head) load its weights once,
then run every micro-batch of the block through it (zig-zag), loading and storing each micro-batch's KV.

    for step:                       # step 0 is prefill
        for stage:                  # weights of stage+1.. are already being read (WeightStreamer)
            w = load_weight(stage)
            for mb in block:        # each layer is read once per block
                load_cache(stage, mb); prefetch_cache(next (stage, mb)); compute(stage, mb); store_cache(stage, mb)
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..store.format import Manifest, load_manifest
from ..store.modelconfig import ModelConfig
from .experts import RoutingFiles
from .kvcache import make_kv
from .kvnear import CpuAttentionKV, WriteBackDiskKV, XCacheKV
from .model import LAYERS, embed, fuse_projections, head, make_batch
from .policy import Policy
from .rope import Rope
from .sampling import sample
from .stream import TORCH_DTYPES, WeightStreamer
from .timing import Timings


class EngineError(Exception):
    """A job cannot run as asked (prompt too long, empty prompt, …); the message says which input."""


@dataclass(frozen=True)
class GenParams:
    """Generation parameters of one job."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    """One prompt's result."""

    index: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # length | stop


@dataclass
class _MicroBatch:
    index: list[int]  # prompt indices
    ids: torch.Tensor  # [B, Tp] left padded
    mask: torch.Tensor  # [B, Tp + max_new] 1 = real token
    done: torch.Tensor  # [B] bool
    out: list[list[int]]
    reason: list[str]
    x: torch.Tensor | None = None  # activations between stages [B, S, H]
    batch: object = None
    rope: tuple | None = None
    cached: int = 0  # leading prompt slots whose KV came from the prefix cache (prefixcache.attach)


class Engine:
    """A stored model ready to generate under one policy on one device."""

    def __init__(self, model_dir: Path, *, policy: Policy = Policy(), device: str = "cpu",
                 job_dir: Path | None = None, prefix_cache=None, sparsity=None, routing_seed: Path | None = None):
        self.dir = Path(model_dir)
        self.manifest: Manifest = load_manifest(self.dir)
        self.config = ModelConfig.from_dict(self.manifest.config)
        self.policy, self.device, self.job_dir = policy, torch.device(device), job_dir
        self.prefix_cache = prefix_cache  # prefixcache.PrefixCache or None; self.prefix: the same when it can run
        cd = policy.compute_dtype
        if cd == "auto":
            cd = "float32" if self.device.type == "cpu" else self.manifest.dtype
        self.dtype = TORCH_DTYPES[cd]
        cuda = self.device.type == "cuda"
        self.timings = Timings(cuda=cuda)
        self.layer_fn = LAYERS[self.config.architecture]
        self.sparsity = sparsity  # sparse.SparseFFN or None (dense)
        if sparsity is not None:
            self.layer_fn = sparsity.wrap(self.layer_fn)
            sparsity.timings = self.timings  # neuron-bundle reads are counted with the weights' (load_neurons)
        self.rope = Rope(self.config, self.device) if self.config.architecture == "llama" else None
        n = len(self.manifest.stages)
        placement = policy.placement(n)
        if self.config.tie_word_embeddings:
            placement[0] = "gpu"  # the head reads the embedding: keep it resident instead of reading it twice
        self.placement = placement
        self.streamer = WeightStreamer(
            self.dir, self.manifest, device=self.device, dtype=self.dtype, placement=placement,
            order=itertools.cycle(range(n)), prefetch=policy.prefetch, threads=policy.io_threads,
            task_bytes=policy.io_task_bytes, backend=policy.io_backend, timings=self.timings,
            routed_experts=not policy.all_experts, expert_cache_bytes=policy.expert_cache_bytes,
            skip_tensors=sparsity.skip_tensors if sparsity is not None else None,
            routing=RoutingFiles(self.dir, job_dir, routing_seed),  # MoE counts: model dir, else the job dir
            expert_prefetch=policy.expert_prefetch)
        if sparsity is not None:  # rows read with the streamer's threads and task size (through the page cache)
            sparsity.io(threads=policy.io_threads, task_bytes=policy.io_task_bytes)
        for stage in range(1, n - 1):  # resident layers: Q/K/V and gate/up concatenated once, one matmul each a step
            if stage in self.streamer.resident:
                self.streamer.resident[stage] = fuse_projections(self.streamer.resident[stage])
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_tokens": 0, "decode_tokens": 0, "cache_bytes": 0,
                      "generated_tokens": 0, "block_setup_s": 0.0, "prefill_weight_bytes": 0,
                      "decode_weight_bytes": 0, "decode_passes": 0, "routing": {}}
        self.routing_profile_saved = self.routing_profile_warning = None  # set at close (_save_routing_profile)
        self.prefix = prefix_cache.bind(self) if prefix_cache is not None else None
        if cuda:
            self._warm_kernels()

    def _warm_kernels(self) -> None:
        """Compile the fused dequantization kernels this job will launch (the store's weights, the KV codec) now,
        at set-up, not in the first step: Triton compiles each variant once (~2 s on the H100)."""
        from .model import warm_attention
        from .quant import KVCodec, dequantize, quantize

        c, spec = self.config, self.streamer.quant
        warm_attention(c, self.dtype, self.device)
        if spec is not None:
            for k in {c.hidden_size, c.intermediate_size}:  # the matrices' input dims
                if spec.fits((k,)):
                    p = quantize(torch.zeros(2, k, device=self.device), spec)
                    dequantize(p["q"], p["scale"], p.get("zero"), spec, self.dtype)
        if self.policy.kv_bits != 16:
            dims = {c.head_dim} | ({c.hidden_size // 2} if self.policy.x_cache_percent else set())
            for d in dims:
                codec = KVCodec(self.policy.kv_bits, d)
                codec.decode(codec.encode(torch.zeros(2, 1, d, device=self.device))[:1], self.dtype)
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self.streamer.close()
        self._save_routing_profile()

    def _save_routing_profile(self) -> None:
        """A routed MoE run's routing by read shape added to the model's measured profile (store/routingprofile.py:
        the model's entry, else the job dir), once; where it went (or None) and any warning in
        `self.routing_profile_saved` / `_warning` for the report. Best effort: a profile only prices later plans."""
        from ..store.routingprofile import record

        run = self.stats["routing"]
        if not run or self.routing_profile_saved is not None or self.manifest.extra.get("tensor_parallel"):
            return  # not routed, saved already, or a tensor-parallel rank's shard (not the model's entry)
        try:
            saved, why = record(self.dir, {k: tuple(v) for k, v in run.items()}, job_dir=self.job_dir)
        except OSError as e:
            saved, why = None, f"routing profile not saved ({e})"
        self.routing_profile_saved, self.routing_profile_warning = saved, why
        if why:
            print(f"kubeflash: {why}", file=sys.stderr)

    # ------------------------------------------------------------------------------------ public
    def generate(self, prompts: Sequence[Sequence[int]], params: GenParams,
                 stop: Callable[[int, list[int]], bool] | None = None,
                 on_block: Callable[[list[Completion]], None] | None = None,
                 on_step: Callable[[int], None] | None = None) -> list[Completion]:
        """Generate for every prompt, one block (policy.block_size prompts) at a time."""
        self._check(prompts, params)
        gen = torch.Generator().manual_seed(params.seed)
        results: list[Completion] = []
        if self.prefix:
            self.prefix.share(self, prompts)  # prefixes several prompts start with: prefilled once, kept
        for block in self._blocks(len(prompts)):
            done = self._run_block(prompts, block, params, gen, stop, on_step)
            results.extend(done)
            if on_block:
                on_block(done)
        return results

    def prefill_logits(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Last-position logits [N, V] after prefill (for comparisons against a reference)."""
        logits = []
        params = GenParams(max_new_tokens=1)
        self._check(prompts, params)
        for block in self._blocks(len(prompts)):
            mbs = self._make_block(prompts, block, params)
            self._pass(mbs, step=0, params=params, gen=None, stop=None, collect=logits)
            self.kv.close()
        return torch.cat(logits)

    def _blocks(self, n: int):
        """Prompt indices of each block (policy.block_size prompts; the last may be smaller)."""
        bs = self.policy.block_size
        for b0 in range(0, n, bs):
            yield list(range(b0, min(b0 + bs, n)))

    def _expert_requests(self) -> int:
        """Routed experts requested so far over every routed layer read: read, or served by the hot-expert cache."""
        return self.timings.count["load_expert"] + self.timings.count["expert_cache_hit"]

    def _count_routing(self, mbs, step: int, requests: int) -> None:
        """Add one pass's routed expert requests to the run's routing by read shape (sequences of the block, tokens of
        each: the prompt at step 0, one after), with the routed layer reads they came from; the report's
        routing_profile is their mean, what costmodel.RoutingProfile takes. Not counted with expert prefetch, whose
        reads include guesses the router did not pick."""
        layers = len(self.streamer.routed)
        if not layers or self.streamer.expert_prefetch is not None:
            return
        shape = (sum(mb.ids.shape[0] for mb in mbs), max(mb.ids.shape[1] - mb.cached for mb in mbs) if step == 0 else 1)
        got = self.stats["routing"].setdefault(shape, [0, 0])
        got[0] += requests
        got[1] += layers

    # ------------------------------------------------------------------------------------ schedule
    def _run_block(self, prompts, block, params, gen, stop, on_step) -> list[Completion]:
        t0 = time.perf_counter()
        mbs = self._make_block(prompts, block, params)  # queues the block's KV cache (host memory locks meanwhile)
        self.stats["block_setup_s"] += time.perf_counter() - t0
        for step in range(params.max_new_tokens):
            t0, b0, r0 = time.perf_counter(), self.timings.weight_bytes(), self._expert_requests()
            self._pass(mbs, step=step, params=params, gen=gen, stop=stop)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            key = "prefill" if step == 0 else "decode"
            self.stats[f"{key}_s"] += dt
            # bytes whose reads finished during the pass (the streamer reads a few stages ahead, so a pass also
            # counts the next pass's first stages and not its own: even over a run, exact for routed experts)
            self.stats[f"{key}_weight_bytes"] += self.timings.weight_bytes() - b0
            self.stats["decode_passes"] += step > 0
            self._count_routing(mbs, step, self._expert_requests() - r0)
            self.stats[f"{key}_tokens"] += sum(mb.ids.shape[0] * (mb.ids.shape[1] - mb.cached if step == 0 else 1)
                                               for mb in mbs)
            if step == 0 and self.prefix:
                self.prefix.save(self, mbs, prompts)  # new full blocks to the node cache, written in the background
            if on_step:
                on_step(sum(mb.ids.shape[0] for mb in mbs))
            if all(bool(mb.done.all()) for mb in mbs):
                break
        self.stats["cache_bytes"] = max(self.stats["cache_bytes"], self.kv.nbytes())
        self.kv.close()
        return [Completion(i, mb.out[r], mb.reason[r]) for mb in mbs for r, i in enumerate(mb.index)]

    def _pass(self, mbs: list[_MicroBatch], *, step: int, params, gen, stop, collect=None) -> None:
        """One pass over every stage for every micro-batch: the zig-zag inner loops."""
        phase = "prefill" if step == 0 else "decode"
        last = len(self.manifest.stages) - 1
        for stage in range(last + 1):
            w = self.streamer.get(stage)
            for k, mb in enumerate(mbs):
                if stage == 0:
                    self._embed(mb, w, step)
                elif stage == last:
                    self._head(mb, w, step, params, gen, stop, collect)
                else:
                    self._layer(stage - 1, k, mb, w, phase, mbs)
            if stage == 0 and last > 1:
                self.kv.prefetch(0, 0, mbs[0].batch.start)
            del w  # a dequantized stage is freed before the next one is built

    def _embed(self, mb: _MicroBatch, w, step: int) -> None:
        tp = mb.ids.shape[1]
        start, new = (mb.cached, tp - mb.cached) if step == 0 else (tp + step - 1, 1)
        ids = mb.ids[:, mb.cached:] if step == 0 else torch.tensor([o[-1] if o else 0 for o in mb.out]).view(-1, 1)
        mb.batch = make_batch(mb.mask, start, new, self.device)
        if self.rope is not None:
            mb.rope = self.rope(mb.batch.positions, self.dtype)
            mb.batch.rope_at = lambda pos: self.rope(pos, self.dtype)
        mb.x = embed(self.config, w, ids.to(self.device), mb.batch.positions)

    def _layer(self, j: int, k: int, mb: _MicroBatch, w, phase: str, mbs: list[_MicroBatch]) -> None:
        t = self.timings
        with t(f"load_cache_{phase}"):
            # the next (layer, micro-batch) in schedule order, asked for before this one is waited for: its cache
            # is read (disk) or crosses PCIe while this one's arrives and computes, so the link never idles
            nj, nk = (j, k + 1) if k + 1 < len(mbs) else (j + 1, 0)
            if nj < self.config.num_layers:
                self.kv.prefetch(nj, nk, mbs[nk].batch.start)
            kv = self.kv.load(j, k, mb.batch.start)
        with t(f"compute_layer_{phase}"):
            mb.x = self.layer_fn(self.config, w, mb.x, mb.batch, kv, mb.rope, layer=j)
        with t(f"store_cache_{phase}"):
            self.kv.store(j, k, kv)

    def _head(self, mb: _MicroBatch, w, step: int, params: GenParams, gen, stop, collect) -> None:
        if self.config.tie_word_embeddings:
            w = {**w, "lm_head": self.streamer.resident[0]["tok_embed"]}  # embed stage is resident when tied
        logits = head(self.config, w, mb.x[:, -1])
        if collect is not None:
            collect.append(logits.cpu())
            return
        nxt = sample(logits, temperature=params.temperature, top_p=params.top_p, generator=gen).cpu().tolist()
        tp = mb.ids.shape[1]
        for r, tok in enumerate(nxt):
            if mb.done[r]:
                continue
            self.stats["generated_tokens"] += 1
            if tok in params.eos_token_ids:
                mb.done[r], mb.reason[r] = True, "stop"
                continue
            mb.out[r].append(tok)
            if stop and stop(mb.index[r], mb.out[r]):
                mb.done[r], mb.reason[r] = True, "stop"
        mb.mask[:, tp + step] = 1

    # ------------------------------------------------------------------------------------ setup
    def _check(self, prompts, params: GenParams) -> None:
        if not prompts:
            raise EngineError("no prompts to run")
        from .planning import context_limit

        limit = context_limit(self.config)
        for i, p in enumerate(prompts):
            if not len(p):
                raise EngineError(f"prompt {i} is empty")
            if len(p) + params.max_new_tokens > limit:
                raise EngineError(f"prompt {i}: {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceed "
                                  f"the model's context window of {limit} tokens")

    def _make_kv(self, tier: str):
        """The KV tier of the policy: plain, with CPU attention / delayed write-back, and X-cache layers (kvnear)."""
        c, p = self.config, self.policy
        kv = self._tier(tier, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, cpu_attention=p.cpu_attention)
        x_layers = p.x_layers(c.num_layers) if tier != "none" else set()
        if not x_layers:
            return kv
        if c.hidden_size % 2:
            raise ValueError(f"X-cache: hidden size {c.hidden_size} is odd; it is held as two halves")
        xs = self._tier(tier, num_kv_heads=1, head_dim=c.hidden_size // 2, cpu_attention=False)
        return XCacheKV(kv, xs, x_layers)

    def _tier(self, tier: str, *, num_kv_heads: int, head_dim: int, cpu_attention: bool):
        p = self.policy
        kw = dict(device=self.device, dtype=self.dtype, num_kv_heads=num_kv_heads, head_dim=head_dim, bits=p.kv_bits)
        if tier == "cpu" and cpu_attention:
            return CpuAttentionKV(**kw)
        directory = (self.job_dir / "kv") if self.job_dir else None
        if tier == "disk":  # its reads and writes split as the weights' reads are (threads, task size, backend)
            kw |= dict(io_threads=p.io_threads, io_task_bytes=p.io_task_bytes, io_backend=p.io_backend)
        if tier == "disk" and p.kv_write_back:
            if directory is None:
                raise ValueError("kv tier 'disk' needs a job directory for its files")
            return WriteBackDiskKV(directory=directory, flush_bytes=p.kv_write_back_bytes, **kw)
        return make_kv(tier, directory=directory, **kw)

    def _make_block(self, prompts, block: list[int], params: GenParams) -> list[_MicroBatch]:
        g = self.policy.gpu_batch_size
        mbs = []
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        for m0 in range(0, len(block), g):
            idx = block[m0:m0 + g]
            tp = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), tp), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), tp + params.max_new_tokens), dtype=torch.long)
            for r, i in enumerate(idx):
                p = list(prompts[i])
                ids[r, tp - len(p):] = torch.tensor(p)
                mask[r, tp - len(p):tp] = 1
            mbs.append(_MicroBatch(idx, ids, mask, torch.zeros(len(idx), dtype=torch.bool),
                                   [[] for _ in idx], ["length"] * len(idx)))
        c = self.config
        self.kv = self._make_kv("none" if params.max_new_tokens == 1 else self.policy.kv)  # prefill-only: no KV
        for j in range(c.num_layers):  # in the order the prefill stores them (host buffers are locked meanwhile)
            for k, mb in enumerate(mbs):
                self.kv.allocate(j, k, mb.ids.shape[0], mb.mask.shape[1])
        if self.prefix:
            self.prefix.attach(self, mbs, prompts)  # cached prefixes loaded; those rows prefill only the rest
        return mbs
