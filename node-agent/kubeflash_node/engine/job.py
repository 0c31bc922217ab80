"""Run one InferenceJob on this machine: tokenize, skip prompts already done, generate, append results,
keep progress.json current, and return the report. Shared by `kubeflash run` and the inference pod.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable

from kubeflash_api import JobSpec, parse_quantity
from kubeflash_api.prefixes import job_fingerprints
from kubeflash_api.sharding import shard_prompts

from ..store.kvblocks import DEFAULT_BUDGET, ENV_KV_CACHE_BUDGET, KVBlockStore
from ..store.modelconfig import ModelConfig
from .generate import Engine, GenParams
from .machine import Machine, within_resources
from .moeplan import stored_routing
from .planning import auto_plan, check_context, check_kv_disk, check_one_sequence, check_vocab, job_shape, policy_for
from .policy import Policy
from .prefixcache import PrefixCache
from .progress import Progress
from .prompts import load_tokenizer, tokenize
from .report import build_report
from .results import ResultsFile, fingerprints, is_chat


def run_job(spec: JobSpec, *, model_dir: Path, manifest, output: Path, device: str = "cpu",
            job_dir: Path | None = None, policy: Policy | None = None, machine: Machine | None = None,
            on_tokens: Callable[[int], None] | None = None, on_prompts: Callable[[int], None] | None = None,
            kv_cache_dir: Path | None = None, engine_factory: Callable[..., Engine] = Engine,
            expert_cache: int | None = None, routing_seed: Path | None = None, calibrate: bool = False) -> dict:
    """Generate every prompt of `spec` without a result of the same fingerprint in `output` (results.py); returns
    the report dict. `output` is left untouched until the first new result is written. `engine_factory` builds
    the engine from (model_dir, **options): one rank's TPEngine under tensor parallelism (engine/tplaunch.py).
    MoE: `expert_cache` (bytes; `kubeflash run --expert-cache`) overrides spec.offload.expertCache; `routing_seed`
    is an earlier job's routing.json to start the hot-expert cache from. `calibrate`: a sparsity target the model's
    store entry has no calibration for is calibrated on the built-in text first (autocalib.py), once."""
    if spec.shard is not None:  # one shard job of a spec.parallelism job: only its share of the prompts
        spec = spec.with_prompts(shard_prompts(spec.input.prompts, spec.shard))
    tokenizer = load_tokenizer(model_dir, manifest)
    ids = tokenize(spec, tokenizer)
    results = ResultsFile(output, fingerprints(spec, manifest=manifest, device=device), model=spec.model.uri)
    todo = [i for i, p in enumerate(spec.input.prompts) if p.id not in results.done]
    progress = Progress(job_dir, total=len(ids), done=len(ids) - len(todo), tokens=results.kept_tokens)
    progress.write("running")
    if not todo:
        results.commit()  # sets aside the lines of prompts no longer in the job
        results.close()
        progress.write("done", message="every prompt already has a result")
        return {"skipped": len(ids), "generated_tokens": 0}
    with _failed_on_refusal(progress):  # refused before any work: progress.json says why, never "running"
        g = spec.generation
        max_new = max([g.max_new_tokens] + [spec.input.prompts[i].max_tokens or 0 for i in todo])
        chosen = None
        machine = within_resources(spec, machine, device)
        shape = job_shape([ids[i] for i in todo], max_new)
        config = ModelConfig.from_dict(manifest.config)  # refused before any work: positions, one sequence's KV
        where = "spec.input.synthetic" if spec.input.synthetic else "spec.input.prompts"
        names = [f"{where}[{i}] (id {spec.input.prompts[i].id})" for i in todo]
        check_context(config, [ids[i] for i in todo], max_new, names)
        check_vocab(config, [ids[i] for i in todo], names)
        # refused before any work: no or stale calibration (unless `calibrate`: then calibrated once, first)
        sparsity = _sparsity(spec, config, model_dir, device, calibrate)
        if sparsity is not None and sparsity.bundles is not None and machine is not None:  # merged reads: this disk's
            from .costmodel import merge_gap, read_op_s

            sparsity.gap = merge_gap(sparsity.bundles.row_bytes, read_op_s(machine.ceilings),
                                     gbps=machine.ceilings.disk_read_cold)
        if sparsity is not None and sparsity.channels is not None and machine is not None:  # input sparsity's rows
            from .costmodel import read_op_s
            from .sparse import channel_gaps

            sparsity.channel_gaps = channel_gaps(sparsity.channels, op_s=read_op_s(machine.ceilings),
                                                 gbps=machine.ceilings.disk_read_cold)
        itemsize = 4 if manifest.dtype == "float32" else 2
        check_one_sequence(spec, policy, config=config, job=shape, itemsize=itemsize, machine=machine)
        cache = _expert_cache(spec, config, device, machine, expert_cache)
        measured = stored_routing(config, model_dir)  # MoE: the model's measured routing profile, else uniform
        if policy is None and spec.offload.policy == "auto" and machine is not None:
            chosen = _auto_plan(spec, sparsity, config=config, itemsize=itemsize, manifest=manifest, job=shape,
                                machine=machine, expert_cache=cache, routing=measured.profile)
            policy = chosen.best.candidate.policy
        if policy is None:
            policy = replace(policy_for(spec, n_prompts=len(todo), device=device, config=config),
                             expert_cache_bytes=cache)
        check_one_sequence(spec, policy, config=config, job=shape, itemsize=itemsize, machine=machine)
        check_kv_disk(spec, policy, manifest=manifest, job=shape)
        policy, prefetch = _expert_prefetch(spec, policy, config=config, manifest=manifest, job=shape, machine=machine,
                                            itemsize=itemsize, routing=measured.profile)
        if sparsity is not None and (sparsity.bundles is not None or sparsity.channels is not None):
            _follow_reads(sparsity, spec, chosen, policy, config=config, manifest=manifest, job=shape, machine=machine,
                          itemsize=itemsize)
            if str(device) != "cpu":  # the hot set's GPU tier, and the plan priced with it as kubeflash plan does
                chosen = _device_tier(sparsity, spec, chosen, device=device, machine=machine, manifest=manifest,
                                      job=shape, expert_cache=cache, routing=measured.profile)
            _layer_reads(sparsity, policy, machine)
        prefix = _prefix_cache(spec, kv_cache_dir)
        seed = {"routing_seed": routing_seed} if routing_seed is not None else {}
        engine = engine_factory(model_dir, policy=policy, device=device, job_dir=job_dir, prefix_cache=prefix,
                                sparsity=sparsity, **seed)
    eos = tuple(engine.config.eos_token_id) + ((tokenizer.eos_token_id,) if tokenizer is not None
                                                and tokenizer.eos_token_id is not None else ())
    params = GenParams(max_new_tokens=max_new, temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                       eos_token_ids=tuple(sorted(set(eos))))
    limits = [spec.input.prompts[i].max_tokens or g.max_new_tokens for i in todo]

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""

    def stop(k: int, tokens: list[int]) -> bool:
        if len(tokens) >= limits[k]:
            return True
        return bool(g.stop) and any(s in decode(tokens[-16:]) or s in decode(tokens) for s in g.stop)

    def on_block(done) -> None:
        for c in done:
            p = spec.input.prompts[todo[c.index]]
            text = decode(c.tokens)
            reason = c.finish_reason
            if len(c.tokens) >= limits[c.index] and reason == "stop" and not _hit_stop(text, g.stop):
                reason = "length"
            for s in g.stop:
                if s in text:
                    text, reason = text[:text.index(s)], "stop"
            results.append(p.id, text, chat=is_chat(p), finish_reason=reason, prompt_tokens=len(ids[todo[c.index]]),
                           completion_tokens=len(c.tokens), token_ids=c.tokens)
        progress.done += len(done)
        progress.tokens += sum(len(c.tokens) for c in done)
        progress.write("running", timings=_timings(engine))
        if on_prompts:
            on_prompts(len(done))

    def on_step(n: int) -> None:
        if on_tokens:
            on_tokens(n)

    report = None
    try:
        engine.generate([ids[i] for i in todo], params, stop=stop, on_block=on_block, on_step=on_step)
        prefix.close()  # the last block writes land before the report counts them
        report = build_report(engine)
        if sparsity is not None:
            report["sparsity"] = sparsity.describe() | {"line": sparsity.line()}
        if chosen is not None:
            report["plan"] = _plan_report(chosen)
        if prefetch is not None:  # MoE: spec.offload.expertPrefetch as run, and why
            report["expert_prefetch_choice"] = prefetch
        if config.num_experts and machine is not None:  # MoE, priced: the routing the plan and prefetch assumed
            report["routing_assumed"] = measured.to_json(config, policy.block_size, shape.prompt_len)
        progress.write("done", timings=_timings(engine))
        return report
    except BaseException as e:
        progress.write("failed", timings=_timings(engine), message=(str(e) or type(e).__name__)[:500])
        raise
    finally:
        prefix.close()
        results.close()
        engine.close()
        routing = getattr(getattr(engine, "streamer", None), "routing", None)  # MoE: set at close
        if report is not None and routing is not None and engine.streamer.expert_cache is not None:
            report["routing"] = routing.describe()
        if report is not None and getattr(engine, "routing_profile_saved", None) is not None:  # MoE, routed
            report["routing_profile_saved_to"] = str(engine.routing_profile_saved)


def _expert_cache(spec: JobSpec, config: ModelConfig, device: str, machine: Machine | None,
                  override: int | None) -> int:
    """The MoE hot-expert cache's bytes: --expert-cache, else spec.offload.expertCache (auto: a share of the compute
    device's budget, engine/moeplan.py)."""
    from .moeplan import expert_cache_bytes

    value = spec.offload.expert_cache if override is None else override
    budget = None
    if value == "auto":
        r = spec.resources
        if device.startswith("cuda"):
            budget = machine.gpu_bytes if machine is not None else r.gpu_memory or _gpu_total(device)
        else:
            budget = machine.cpu_bytes if machine is not None else r.cpu_memory or _mem_available()
    return expert_cache_bytes(config, value, budget=budget)


def _expert_prefetch(spec: JobSpec, policy: Policy, *, config: ModelConfig, manifest, job, machine: Machine | None,
                     itemsize: int, routing=None) -> tuple[Policy, dict | None]:
    """The policy with spec.offload.expertPrefetch applied (auto: as the cost model prices it for this policy on the
    machine's ceilings; off without them), and the choice with its reasons for the report (None: a dense model)."""
    from .moeplan import expert_prefetch_choice

    on, lines, choice = expert_prefetch_choice(spec.offload.expert_prefetch, config, policy, job, manifest.stage_bytes,
                                               machine.ceilings if machine is not None else None, itemsize=itemsize,
                                               routing=routing)
    if choice is None:
        return policy, None
    return replace(policy, expert_prefetch=on), choice | {"lines": [line.strip() for line in lines]}


def _gpu_total(device: str) -> int:
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def _failed_on_refusal(progress: Progress):
    """Write progress.json's failed phase with the reason when the checks before any work refuse the job."""
    try:
        yield
    except Exception as e:
        progress.write("failed", message=(str(e) or type(e).__name__)[:500])
        raise


def _sparsity(spec: JobSpec, config: ModelConfig, model_dir: Path, device: str, calibrate: bool = False):
    """spec.offload.sparsity as the engine runs it (sparse.SparseFFN), or None for the dense path. `calibrate`: an
    entry without a calibration for the target is calibrated first (autocalib.py) instead of refused."""
    if spec.offload.sparsity is None:
        return None
    from .autocalib import ensure_calibrated, missing_targets, needs_calibration
    from .sparse import for_job, hot_budget

    target = spec.offload.sparsity
    if calibrate and needs_calibration(config) and missing_targets(model_dir, (target,)):
        ensure_calibrated(model_dir, (target,), device=device)  # first use: once, under the entry's lock
    return for_job(config, model_dir, target, hot_bytes=hot_budget(spec.resources, device),
                   channel_hot_bytes=hot_budget(spec.resources, "cpu"))  # input sparsity's rows: host memory


def _sparse_cost(sparsity, config: ModelConfig, itemsize: int):
    """The job's sparse FFN reads as the cost model prices them (None: no bundles to read sparsely)."""
    if sparsity is None or (sparsity.bundles is None and sparsity.channels is None):
        return None
    from .costmodel import SparseCost, updown_bytes

    if sparsity.channels is not None:  # input sparsity (TEAL): kept columns from the input-channel files
        attn = sparsity.attention is not None and sparsity.attention.channels is not None  # q/k/v/o likewise
        held, pairs, hit = sparsity.channel_hot or (0, (), 0.0)  # the hot set in host memory (channelcache.py)
        dev, on, dev_hit = sparsity.channel_gpu or (0, (), 0.0)  # and its device tier (sparse.hold_on_device)
        return SparseCost(sparsity.target, method="input", attention=attn, channel_hot_bytes=held, channel_hot=pairs,
                          channel_hit=hit + dev_hit, channel_gpu_bytes=dev, channel_gpu=on)
    hot = sum(len(ids) for ids in sparsity.hot or []) * sparsity.bundles.row_bytes
    return SparseCost(sparsity.target, hot, min(1.0, hot / (config.num_layers * updown_bytes(config, itemsize))),
                      gap=sparsity.gap)


def _auto_plan(spec: JobSpec, sparsity, *, config: ModelConfig, itemsize: int, **kw):  # kw: auto_plan's
    """auto_plan with the job's sparse reads; where attention sparsity changes the reads, planned FFN-only too and
    the faster plan kept (sparse.SparseFFN.price_attention: which, and the two predicted times)."""
    cost = _sparse_cost(sparsity, config, itemsize)
    chosen = auto_plan(spec, sparsity=cost, **kw)
    if cost is None or not sparsity.attention_priced:
        return chosen
    ffn = auto_plan(spec, sparsity=replace(cost, attention=False), **kw)
    return chosen if sparsity.price_attention(chosen.best.total_s, ffn.best.total_s) else ffn


def _follow_reads(sparsity, spec: JobSpec, chosen, policy: Policy, *, config, manifest, job, machine,
                  itemsize: int) -> None:
    """Sparse or dense FFN reads, as the cost model predicts faster for this policy and batch: the automatic
    plan's pick, else the given policy priced both ways on the machine's ceilings; without ceilings, sparse."""
    from .costmodel import Budget, attention_prices, reads_choice, reads_why, stage_sizes

    if chosen is not None:
        sparse, best, other = chosen.best.candidate.sparse is not None, chosen.best, chosen.other_reads
        why = (reads_why(sparse, *((best.total_s, other.total_s) if sparse else (other.total_s, best.total_s)),
                         policy.gpu_batch_size) if other is not None
               else f"{'sparse' if sparse else 'dense'} FFN reads: the plan's only fitting kind")
    elif machine is not None:
        sizes = (manifest.stage_bytes, stage_sizes(config, itemsize, spec.model.quantization)[1])
        kw = dict(config=config, ceil=machine.ceilings, job=job, itemsize=itemsize, sizes=sizes,
                  budget=Budget(machine.gpu_bytes, machine.cpu_bytes, spec.resources.kv_disk))
        if sparsity.attention_priced:  # FFN-only against FFN+attention first, for this policy
            sparsity.price_attention(*attention_prices(policy, _sparse_cost(sparsity, config, itemsize), **kw))
        sparse, why = reads_choice(policy, _sparse_cost(sparsity, config, itemsize), **kw)
    else:
        sparse, why = True, "sparse FFN reads: no measured ceilings to price them against dense"
        if sparsity.attention_priced:
            sparsity.attention_why = "FFN+attention input sparsity: no measured ceilings to price it against FFN-only"
    sparsity.follow(sparse, why)


def _device_tier(sparsity, spec: JobSpec, chosen, *, device: str, machine, manifest, job, expert_cache: int = 0,
                 routing=None):
    """On a GPU (the caller skips it on the CPU), input sparsity's hot set takes the GPU memory the budget leaves
    after the chosen plan's predicted use (costmodel.device_room) for its most frequent rows, the next a quarter of
    cpuMemory in host memory as before (sparse.hold_on_device). Returns the chosen plan priced again with both tiers
    on auto_plan's own terms (planning.repriced), as `kubeflash plan` prices it (cli_plan._device_tier), so the
    report and the run line carry plan's figures; without an automatic plan, with dense reads or no room, unchanged."""
    if chosen is None or sparsity.channels is None:
        return chosen
    from .costmodel import device_room
    from .planning import plan_terms, repriced
    from .sparse import hold_on_device, hot_budget

    terms = plan_terms(spec, manifest=manifest, machine=machine, expert_cache=expert_cache, routing=routing)
    room = device_room(chosen.best, terms["budget"], terms["cal"])
    s = chosen.best.candidate.sparse
    if s is None or s.method != "input" or not hold_on_device(sparsity, device_bytes=room,
                                                                host_bytes=hot_budget(spec.resources, "cpu"),
                                                                device=device):
        return chosen
    return repriced(chosen, (sparsity.channel_gpu, sparsity.channel_hot), terms, job=job)


def _plan_report(chosen) -> dict:
    """report.json's "plan" (and the run line's "policy auto:"): the chosen plan as priced, why, the alternatives."""
    from .costmodel import describe

    return {"chosen": describe(chosen.best), "why": chosen.best.why(), "predicted_s": chosen.best.run_s,
            "considered": chosen.considered}


def _layer_reads(sparsity, policy: Policy, machine) -> None:
    """Input sparsity reading sparsely, with the machine's ceilings and the calibration's keep frequencies (as
    sparse.for_job loaded them: sparsity.channel_freq): each layer priced on its own at the policy's micro-batch
    (layerreads.py); where the union of kept rows approaches them all, the layer's FFN is streamed whole instead."""
    if sparsity.channels is None or machine is None:
        return
    from .costmodel import read_op_s
    from .layerreads import choose_layers

    freq = sparsity.channel_freq
    if freq is None:  # channel files cut before the frequencies were written: every layer as the run chose
        return
    ch = sparsity.channels
    held = ch.held_rows() if hasattr(ch, "held_rows") else None
    sparsity.per_layer(choose_layers(freq, hidden=ch.hidden, in_row_bytes=ch.in_row_bytes,
                                     down_row_bytes=ch.down_row_bytes, tokens=policy.gpu_batch_size,
                                     op_s=read_op_s(machine.ceilings), gbps=machine.ceilings.disk_read_cold, held=held,
                                     threads=policy.io_threads))


def _prefix_cache(spec: JobSpec, kv_cache_dir: Path | None) -> PrefixCache:
    """Prefix reuse for this job: always within the job; across jobs through the node's block store when
    spec.cache.prefix is set and the caller gave its directory. A store that cannot be opened means no node cache,
    never a failed job (the report says why)."""
    if not (spec.cache.prefix and kv_cache_dir is not None):
        cache = PrefixCache()
        if spec.cache.prefix:
            cache.note = "spec.cache.prefix is set but this runner has no node cache directory"
        return cache
    try:
        budget = parse_quantity(os.environ.get(ENV_KV_CACHE_BUDGET) or str(DEFAULT_BUDGET), path=ENV_KV_CACHE_BUDGET)
        cache = PrefixCache(store=KVBlockStore(kv_cache_dir, budget_bytes=budget))
        cache.fingerprints = job_fingerprints(spec.input.prompts)  # left for the agent: placement by prefix
        return cache
    except (OSError, ValueError) as e:
        cache = PrefixCache()
        cache.note = f"node cache {kv_cache_dir} unavailable: {e}"
        return cache


def _hit_stop(text: str, stops) -> bool:
    return any(s in text for s in stops)


def _timings(engine) -> dict:
    t = engine.timings
    return {k: round(t.mean(k), 6) for k in ("load_weight", "compute_layer_prefill", "compute_layer_decode",
                                             "load_cache_decode", "store_cache_decode") if t.count[k]}
