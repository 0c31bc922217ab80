"""Which Policy a job runs with: the manifest's explicit split, or the cost model's plan under `policy: auto`,
checked against the job's KV disk quota before anything runs.
"""

from __future__ import annotations

from kubeflash_api import JobSpec, SpecError

from .machine import Machine
from .policy import Policy, make_policy


def pinned(offload, config):
    """The cost model's filter for what the manifest pins under policy auto: the batch shape and the INF²
    switches (xCache: on wherever X is smaller than K + V, so it pins nothing for a GQA model)."""
    from .costmodel import x_cache_saves

    want_x = offload.x_cache and x_cache_saves(config)

    def keep(p: Policy) -> bool:
        return ((offload.gpu_batch_size is None or p.gpu_batch_size == offload.gpu_batch_size)
                and (offload.num_gpu_batches is None or p.num_gpu_batches == offload.num_gpu_batches)
                and (not offload.cpu_attention or p.cpu_attention) and (not offload.kv_write_back or p.kv_write_back)
                and (not want_x or p.x_cache_percent > 0))
    return keep


def needs_ceilings(spec: JobSpec, manifest) -> bool:
    """Whether the run prices something on the machine's measured ceilings: the policy (auto), sparse against dense
    FFN reads (spec.offload.sparsity), or a MoE model's expert prefetch (spec.offload.expertPrefetch: auto)."""
    from ..store.modelconfig import ModelConfig

    o = spec.offload
    return o.policy == "auto" or o.sparsity is not None or (
        o.expert_prefetch == "auto" and bool(ModelConfig.from_dict(manifest.config).num_experts))


def job_shape(prompts: list[list[int]], gen_len: int):
    """The cost model's view of the prompts still to run (costmodel.JobShape)."""
    from .costmodel import JobShape

    return JobShape(prompts=len(prompts), prompt_len=max(len(p) for p in prompts), gen_len=gen_len)


def auto_plan(spec: JobSpec, *, manifest, job, machine: Machine, sparsity=None, expert_cache: int = 0,
              routing=None):
    """The cost model's plan for `job` (costmodel.JobShape) on this machine (costmodel.Plan): placement, batch
    shape and the exact techniques; the store's quantization and the KV compression stay as the manifest says.
    `expert_cache`: bytes of the MoE hot-expert cache, priced in the reads and held back from the GPU budget;
    `routing`: the MoE model's measured costmodel.RoutingProfile (None: uniform routing)."""
    from dataclasses import replace

    from .costmodel import QUANT_BITS, plan

    kw = plan_terms(spec, manifest=manifest, machine=machine, expert_cache=expert_cache, routing=routing)
    q = spec.model.quantization
    base = replace(make_policy(kw["ceil"]), expert_cache_bytes=expert_cache)
    try:
        return plan(job=job, **kw, quantizations=(q,), kv_bits=(QUANT_BITS[spec.offload.compression],), base=base,
                    keep=pinned(spec.offload, kw["config"]), sparsity=sparsity)
    except ValueError as e:  # nothing fits: say which manifest fields set the budgets
        raise SpecError(f"{e} (the budgets: spec.resources.gpuMemory, cpuMemory and kvDisk, within what this "
                        f"machine has; and what spec.offload pins)") from None


def plan_terms(spec: JobSpec, *, manifest, machine: Machine, expert_cache: int = 0, routing=None) -> dict:
    """What auto_plan prices a job with (costmodel.plan's config, ceil, budget, sizes of the manifest's
    quantization, itemsize and cal), so a plan priced again (repriced) uses the very same terms."""
    from ..store.modelconfig import ModelConfig
    from .costmodel import Budget, Calibration, stage_sizes

    config = ModelConfig.from_dict(manifest.config)
    itemsize = 4 if manifest.dtype == "float32" else 2
    q = spec.model.quantization
    return dict(config=config, ceil=machine.ceilings, itemsize=itemsize, cal=Calibration(routing=routing),
                budget=Budget(max(0, machine.gpu_bytes - expert_cache), machine.cpu_bytes, spec.resources.kv_disk),
                sizes={q: (manifest.stage_bytes, stage_sizes(config, itemsize, q)[1])})


def repriced(chosen, tiers, terms: dict, *, job):
    """The plan `chosen` (costmodel.Plan) with its best candidate's sparse reads given the hot set's two tiers
    `tiers` ((gpu bytes, gpu share, gpu hits), (host bytes, host share, host hits): channelcache.hot_pricing of each)
    and priced again on the same `terms` (plan_terms) with costmodel.predict: how `kubeflash plan` and a GPU run
    both price their chosen plan after the hot set's GPU tier."""
    from dataclasses import replace

    from .costmodel import predict

    (gb, gp, gh), (hb, hp, hh) = tiers
    s = chosen.best.candidate.sparse
    cand = replace(chosen.best.candidate, sparse=replace(s, channel_gpu_bytes=gb, channel_gpu=gp, channel_hot_bytes=hb,
                                                         channel_hot=hp, channel_hit=gh + hh))
    t = {k: v for k, v in terms.items() if k != "sizes"}
    return replace(chosen, best=predict(cand, job=job, sizes=terms["sizes"][cand.quantization], **t))


def check_kv_disk(spec: JobSpec, policy: Policy, *, manifest, job) -> None:
    """Refuse, before anything runs, a policy whose KV files would outgrow spec.resources.kvDisk (the room the
    operator reserved for this job on the paired SSD); `job` is the costmodel.JobShape still to run."""
    from kubeflash_api.quantity import human

    from ..store.modelconfig import ModelConfig
    from .costmodel import Candidate, kv_disk_bytes

    need = kv_disk_bytes(Candidate(policy), config=ModelConfig.from_dict(manifest.config), job=job,
                         itemsize=4 if manifest.dtype == "float32" else 2)
    have = spec.resources.kv_disk
    if need > have:
        one = sequence_kv_bytes(ModelConfig.from_dict(manifest.config), policy, job.prompt_len + job.gen_len,
                                4 if manifest.dtype == "float32" else 2)
        alone = (f"; one sequence alone needs {human(one)}: shorten the prompt or compress the cache "
                 f"(spec.offload.compression)") if one > have else ""
        raise SpecError(f"spec.resources.kvDisk: the KV cache on disk needs {human(need)} for blocks of "
                        f"{min(policy.block_size, job.prompts)} prompts x {job.prompt_len + job.gen_len} tokens, "
                        f"more than the {human(have)} reserved; raise kvDisk, or lower spec.offload.gpuBatchSize"
                        f" x numGpuBatches, or move the KV cache (spec.offload.kv){alone}")


def policy_for(spec: JobSpec, *, n_prompts: int, device: str, config=None) -> Policy:
    """Policy from the manifest: explicit percentages as given; for auto without measured ceilings (run_job
    plans with the cost model when it has them) the default streaming policy."""
    o = spec.offload
    g = o.gpu_batch_size or min(8, max(1, n_prompts))
    nb = o.num_gpu_batches or 1
    from .costmodel import QUANT_BITS

    kv_bits = QUANT_BITS[o.compression]  # weights: spec.model.quantization
    if o.policy == "auto":  # the INF² switches pick the KV tier they need
        kv_tier = "cpu" if o.cpu_attention else "disk" if o.kv_write_back else "device"
        return make_policy(gpu_batch_size=g, num_gpu_batches=nb, kv_bits=kv_bits, kv=kv_tier,
                           cpu_attention=o.cpu_attention, kv_write_back=o.kv_write_back)
    kv = {"gpu": "device", "cpu": "cpu", "disk": "disk"}
    full = [t for t in ("gpu", "cpu", "disk") if getattr(o.kv, t) == 100]
    # kubeflash_api guarantees one tier at 100, and the tier cpuAttention / kvWriteBack need
    return make_policy(gpu_batch_size=g, num_gpu_batches=nb, weights_gpu_percent=o.weights.gpu,
                       weights_cpu_percent=o.weights.cpu, kv=kv[full[0]], kv_bits=kv_bits,
                       cpu_attention=o.cpu_attention, kv_write_back=o.kv_write_back,
                       x_cache_percent=100.0 if o.x_cache and _x_saves(spec, kv_bits, config) else 0.0)


def _x_saves(spec: JobSpec, kv_bits: int, config) -> bool:
    """xCache under an explicit policy: every layer, where X is smaller than K + V (never for GQA models)."""
    from ..store.convert import open_source
    from ..store.modelconfig import preset
    from .costmodel import x_cache_fits, x_cache_saves

    uri = spec.model.uri
    if config is None:
        config = preset(uri.split(":", 1)[1]) if uri.startswith(("dummy:", "builtin:")) else open_source(uri).config
    return x_cache_saves(config) and x_cache_fits(config, kv_bits)


def context_limit(config) -> int:
    """Positions the model takes after rope scaling: max_position_embeddings, stretched by `factor` where the
    config states the original window (linear and dynamic scale max_position_embeddings itself; YaRN its
    original_max_position_embeddings, e.g. Qwen2.5's 32K x 4). Llama-3's and LongRoPE's configs already state
    the stretched window as max_position_embeddings."""
    limit = config.max_position_embeddings
    rs = config.rope_scaling or {}
    factor = float(rs.get("factor") or 0)
    if factor > 1 and rs.get("rope_type") in ("linear", "dynamic"):
        limit = int(limit * factor)
    elif factor > 1 and rs.get("rope_type") == "yarn":
        limit = max(limit, int(rs["original_max_position_embeddings"] * factor))
    return limit


def check_context(config, prompts: list[list[int]], max_new: int, names: list[str] | None = None) -> None:
    """Refuse, before anything runs, a prompt whose tokens plus the block's max_new_tokens pass the model's
    positions (every row of a block decodes max_new steps, so its positions reach len + max_new - 1).
    `names`: how the error names each prompt (default spec.input.prompts[i])."""
    limit = context_limit(config)
    scaled = "" if limit == config.max_position_embeddings else \
        f" (max_position_embeddings {config.max_position_embeddings} after rope scaling)"
    for i, p in enumerate(prompts):
        if len(p) + max_new > limit:
            name = names[i] if names else f"spec.input.prompts[{i}]"
            raise SpecError(f"{name}: {len(p)} tokens + max_new_tokens {max_new} = {len(p) + max_new} tokens "
                            f"exceed the model's context window of {limit} tokens{scaled}; shorten the prompt or "
                            f"lower spec.generation.maxNewTokens / the prompt's max_tokens")


def check_vocab(config, prompts: list[list[int]], names: list[str]) -> None:
    """Refuse, before anything runs, a prompt holding a token id the model has no embedding for (synthetic prompts
    use ids 3..1002, past a tiny model's vocabulary), naming the prompt, the id and vocab_size."""
    for name, p in zip(names, prompts, strict=True):
        bad = next((t for t in p if not 0 <= t < config.vocab_size), None)
        if bad is not None:
            hint = " (synthetic prompts use token ids 3 to 1002)" if name.startswith("spec.input.synthetic") else ""
            raise SpecError(f"{name}: token id {bad} is outside the model's vocabulary of {config.vocab_size} ids "
                            f"(0 to {config.vocab_size - 1}){hint}")


def sequence_kv_bytes(config, policy: Policy, tokens: int, itemsize: int) -> int:
    """Bytes of one sequence's cache of `tokens` tokens over every layer as `policy`'s tier holds it (KV bits,
    X-cache layers; CPU attention keeps float32, twice the 16-bit bytes)."""
    from dataclasses import replace

    from .costmodel import Candidate, JobShape, kv_disk_bytes

    as_disk = replace(policy, kv="disk", cpu_attention=False, kv_write_back=False)
    n = kv_disk_bytes(Candidate(as_disk), config=config, job=JobShape(prompts=1, prompt_len=tokens - 2, gen_len=2),
                      itemsize=itemsize)
    return n * (2 if policy.cpu_attention and itemsize == 2 else 1)


def check_one_sequence(spec: JobSpec, policy: Policy | None, *, config, job, itemsize: int,
                       machine: Machine | None = None) -> None:
    """Refuse, before anything runs, a job where even one sequence's KV cache at the requested length does not
    fit the budget of the tier that would hold it: the pinned tier's (`policy`), or, under policy auto (policy
    None), the largest of the three budgets. `job` is the costmodel.JobShape still to run."""
    from kubeflash_api.quantity import human

    from .costmodel import QUANT_BITS

    if job.gen_len <= 1:
        return  # prefill only: no cache is kept
    tokens = job.prompt_len + job.gen_len
    r = spec.resources
    gpu = min(x for x in (r.gpu_memory, machine.gpu_bytes if machine else None) if x) \
        if (r.gpu_memory or machine) else None
    cpu = min(x for x in (r.cpu_memory, machine.cpu_bytes if machine else None) if x) \
        if (r.cpu_memory or machine) else None
    budgets = {"device": (gpu, "spec.resources.gpuMemory"), "cpu": (cpu, "spec.resources.cpuMemory"),
               "disk": (r.kv_disk, "spec.resources.kvDisk")}
    if policy is not None:
        if policy.kv == "disk":
            return  # check_kv_disk refuses it, naming one sequence's bytes where even one does not fit
        need = sequence_kv_bytes(config, policy, tokens, itemsize)
        have, field = budgets[policy.kv]
        if have is not None and need > have:
            raise SpecError(f"{field}: one sequence of {job.prompt_len} prompt + {job.gen_len} new tokens needs "
                            f"{human(need)} of KV cache ({policy.kv} tier), more than the {human(have)} budget; "
                            f"raise {field}, shorten the prompt, compress the cache (spec.offload.compression) or "
                            f"move it (spec.offload.kv)")
        return
    bits = QUANT_BITS[spec.offload.compression]
    need = min(sequence_kv_bytes(config, make_policy(kv="disk", kv_bits=bits, x_cache_percent=x), tokens, itemsize)
               for x in (0.0, 100.0))  # the plan may keep X instead of K, V where that is smaller
    known = {t: b for t, b in budgets.items() if b[0] is not None}
    if known and len(known) == 3 and all(need > have for have, _ in known.values()):
        raise SpecError(f"spec.resources: one sequence of {job.prompt_len} prompt + {job.gen_len} new tokens needs "
                        f"{human(need)} of KV cache, more than any tier's budget ("
                        + ", ".join(f"{f} {human(h)}" for h, f in known.values())
                        + "); shorten the prompt, raise a budget or compress the cache (spec.offload.compression)")
