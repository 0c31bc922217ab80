"""`kubeflash plan JOB.yaml`: the policy the cost model picks for a job on this machine's measured ceilings,
its predicted time and throughput, the resource that bounds it, and the runner-up. Runs nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..store.format import atomic_write_json
from .cliargs import file_path, int_range, positive_size
from .memory import cap_gpu_allocator, parse_size  # noqa: F401  (kubeflash run and bench/peers import them here)
from .memory import gpu_total as _gpu_total
from .memory import mem_available as _mem_available


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="an InferenceJob YAML file")
    p.add_argument("--ceilings", type=Path, help="ceilings JSON (kubeflash bench --ceilings-only --json FILE, or a "
                                                 "bench result holding a 'ceilings' key; default: the ones kubeflash "
                                                 "run saved in <store>/ceilings.json)")
    p.add_argument("--measure", action="store_true", help="measure the ceilings now (disk probe under --store, GPU)")
    p.add_argument("--gpu-memory", type=positive_size, help="GPU memory the job may use, e.g. 5GiB (default: the manifest's "
                                        "spec.resources.gpuMemory, else the GPU's total)")
    p.add_argument("--cpu-memory", type=positive_size, help="host memory the job may use, e.g. 64GiB (default: the manifest's "
                                        "spec.resources.cpuMemory, else MemAvailable)")
    p.add_argument("--store", type=Path, help="local model store root, to read the converted model's stage sizes "
                                              "(default: $KUBEFLASH_HOME or ~/.cache/kubeflash)")
    p.add_argument("--prompt-len", type=int_range(0), default=0, help="tokens per prompt (default: from the job's prompts)")
    p.add_argument("--allow-compression", action="store_true",
                   help="also weigh int8/int4 weights and 8/4-bit KV (changes the outputs: see docs/compression.md)")
    p.add_argument("--step", type=int_range(1, 100), default=10, help="step of the weights' gpu/cpu percentages (default 10)")
    p.add_argument("--json", type=file_path, help="write the plan to this JSON file")
    p.add_argument("--routing-from", type=Path, metavar="BENCH_JSON",
                   help="MoE models: price routed expert reads with the routing a run of this model measured (its "
                        "report's routing_profile: kubeflash bench --json) instead of the store entry's measured "
                        "profile (.routing-profile.json, which routed runs write) or, without one, uniform routing")


def main(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kubeflash_api import SpecError
    from kubeflash_api.local import load_job_file as load_job

    from ..store.format import StoreError
    from .costmodel import QUANT_BITS, Budget, Calibration, NoPlanFits, describe, x_cache_note
    from .costmodel import plan as make_plan
    from .moeplan import expert_cache_bytes, expert_prefetch_choice, moe_assumptions
    from .planning import pinned

    try:
        spec = load_job(args.manifest)
        _check_json_path(args.json)
        ceil, assumed = _ceilings(args)
        config, sizes, itemsize, size_note, tokenizer = _model(spec, args.store)
        routing = _routing(args.routing_from, config, _entry(spec, args.store))
        cal = Calibration(routing=routing.profile)
        job = _job(spec, tokenizer, args.prompt_len)
        _check_prompt_len(config, job, args.prompt_len)
        r = spec.resources
        gpu_bytes = args.gpu_memory or r.gpu_memory or _gpu_or_assumed(assumed)
        cache = expert_cache_bytes(config, spec.offload.expert_cache, budget=gpu_bytes)  # spec.offload.expertCache
        budget = Budget(gpu_bytes - cache, args.cpu_memory or r.cpu_memory or _mem_available(),
                        r.kv_disk)
        quants = tuple(sizes) if args.allow_compression else (spec.model.quantization,)
        kv_bits = (16, 8, 4) if args.allow_compression else (QUANT_BITS[spec.offload.compression],)
        explicit = _explicit(spec, job, config, ceil, budget, sizes, itemsize, cal) \
            if spec.offload.policy == "explicit" else None
        freq = _entry_frequency(spec, config, args.store)  # read once: the hot set, its GPU tier, per-layer reads
        attn_why = None  # FFN-only or FFN+attention, where the store has attn_channels/ (_priced_plan)
        try:  # under an explicit policy the automatic plan is shown beside it, for comparison, without its pins
            plan, attn_why = _priced_plan(
                make_plan, _sparse_cost(spec, config, itemsize, args.store, freq), config=config, ceil=ceil, job=job,
                budget=budget, sizes=sizes, quantizations=quants, kv_bits=kv_bits,
                base=replace(_base_policy(ceil), expert_cache_bytes=cache), step=args.step,
                keep=None if explicit else pinned(spec.offload, config), itemsize=itemsize, cal=cal)
        except ValueError as e:
            if explicit is not None:
                plan, explicit = None, explicit + [f"policy auto would not fit either: {e}"]
            elif isinstance(e, NoPlanFits):
                raise NoPlanFits(f"{e} (GPU budget from {_source(args.gpu_memory, r.gpu_memory, 'gpuMemory', 'gpu')}, "
                                 f"CPU budget from {_source(args.cpu_memory, r.cpu_memory, 'cpuMemory', 'cpu')})"
                                 ) from None
            else:
                raise
        if plan is not None:
            before_s = plan.best.total_s
            plan = _device_tier(plan, spec, config, itemsize, freq, budget=budget, ceil=ceil, job=job,
                                sizes=sizes, cal=cal)
            if attn_why is not None and plan.best.total_s != before_s:  # the two were priced without the GPU tier
                attn_why += (f" (both priced before the hot set's GPU tier, which brings the chosen plan to "
                             f"{plan.best.total_s:.4g} s)")
    except (SpecError, StoreError, ValueError, OSError) as e:
        print(f"kubeflash plan: error: {e}", file=sys.stderr)
        return 1
    print(f"model: {spec.model.uri} ({config.family or config.architecture}, {config.num_layers} layers, {spec.model.dtype}; "
          f"{sum(sizes[spec.model.quantization][0]) / 2**30:.2f} GiB stored, {size_note})")
    print(f"job: {job.prompts} prompts x ({job.prompt_len} prompt + {job.gen_len} generated tokens)")
    op = f", {ceil.disk_read_op_s * 1e6:.1f} us a small read" if getattr(ceil, "disk_read_op_s", 0) else ""
    print(f"ceilings: disk read {ceil.disk_read_cold:.2f} GB/s cold{op}, H2D {ceil.h2d_pinned:.1f} GB/s, "
          f"matmul {ceil.matmul_tflops:.0f} TFLOP/s")
    for line in assumed:
        print("assumed: " + line)
    if explicit is not None:
        print(f"budgets: GPU {budget.gpu_bytes / 2**30:.2f} GiB, CPU {budget.cpu_bytes / 2**30:.2f} GiB\n")
        print("\n".join(explicit))
        if plan is None:
            if args.json:
                atomic_write_json(args.json, {"explicit": explicit})
            return 0
        print(f"\npolicy auto instead ({plan.fitting} of {plan.considered} candidate policies fit):")
    else:
        print(f"budgets: GPU {budget.gpu_bytes / 2**30:.2f} GiB, CPU {budget.cpu_bytes / 2**30:.2f} GiB; "
              f"{plan.fitting} of {plan.considered} candidate policies fit\n")
    print(x_cache_note(config))
    print("chosen:    " + describe(plan.best))
    print("           why: " + plan.best.why())
    stored = sizes[plan.best.candidate.quantization][0]
    best = plan.best.candidate.policy
    if config.num_experts:  # which routing the MoE reads were priced with
        print(routing.line(config, best.gpu_batch_size * best.num_gpu_batches, job.prompt_len))
    moe_lines, moe = moe_assumptions(config, best, job, stored, cal.routing,
                                     source="--routing-from" if args.routing_from else "the store entry's profile")
    prefetch, pf_lines, pf = expert_prefetch_choice(spec.offload.expert_prefetch, config, plan.best.candidate.policy,
                                                    job, stored, ceil, itemsize=itemsize, routing=cal.routing)
    for line in moe_lines + pf_lines:
        print(line)
    if moe is not None:
        moe["expert_prefetch"] = pf
        moe["routing"] = routing.to_json(config, best.gpu_batch_size * best.num_gpu_batches, job.prompt_len)
    if spec.offload.sparsity is not None:
        print(_sparse_line(spec.offload.sparsity, plan, ceil))
        if attn_why is not None:
            print(f"sparsity {spec.offload.sparsity:g}: {attn_why}")
        layers = _layer_reads(spec, config, itemsize, freq, plan, ceil)
        if layers is not None:
            print(f"sparsity {spec.offload.sparsity:g}: {layers.line()}")
        crit = _criterion(spec, config, args.store)
        if crit is not None:
            print(f"sparsity {spec.offload.sparsity:g}: {crit}")
    if plan.runner_up:
        r = plan.runner_up
        print(f"runner-up: {describe(r)}  (+{max(0.0, r.total_s / plan.best.total_s - 1):.1%})")
        print("           why: " + r.why())
    print("\nto pin it, in the job's spec:\n" + _offload_yaml(plan.best, prefetch if moe is not None else None))
    if args.json:
        atomic_write_json(args.json, _to_json(plan, job, budget) | ({"moe": moe} if moe else {})
                          | ({"attention_why": attn_why} if attn_why is not None else {}))
    return 0


# ------------------------------------------------------------------------------------------- inputs


_HOW = "kubeflash bench --ceilings-only --json FILE on the GPU machine writes them"


def _check_json_path(path: Path | None) -> None:
    """--json FILE is refused before any work when it could not be written (a real write in its folder:
    os.access says yes to root on read-only mounts and /sys); a folder created for the check is removed."""
    from .cli_run import _remove_empty, check_writable

    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"--json {path}: is a directory; expected the path of a JSON file to write")
    if not path.parent.is_dir():
        raise ValueError(f"--json {path}: {path.parent} is not a directory; expected the path of a JSON file in one")
    _remove_empty(check_writable("--json", path, path.parent))


def _entry(spec, store: Path | None) -> Path:
    """The job's model entry in the local store (it may not be there)."""
    from ..store.cache import DEFAULT_ROOT
    from ..store.ids import model_id

    m = spec.model
    return (store or DEFAULT_ROOT) / "models" / model_id(m.uri, dtype=m.dtype, quantization=m.quantization)


def _routing(path: Path | None, config, entry: Path):
    """The routing to price MoE reads with (moeplan.Routing): the profile --routing-from names, else the one stored
    in the model's entry (routed runs write it), else uniform routing (with the reason where a stored one is not
    used: a corrupt file or another model's is ignored, named)."""
    import json

    from .costmodel import RoutingProfile
    from .moeplan import Routing, stored_routing

    if path is None:
        return stored_routing(config, entry)
    if not config.num_experts:
        raise ValueError(f"--routing-from {path}: the model has no experts (a mixture-of-experts model only)")
    if not path.is_file():  # a named pipe would block the read
        why = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "no such file"
        raise ValueError(f"--routing-from {path}: {why}; expected a kubeflash bench --json result")
    try:
        got = RoutingProfile.from_report(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--routing-from {path}: not JSON ({e}); expected a kubeflash bench --json result") from None
    if got is None:
        raise ValueError(f"--routing-from {path}: no report.routing_profile (a kubeflash bench --json result of a "
                         f"routed MoE run, without expert prefetch, expected)")
    return Routing(got, f"by {path}: " + ", ".join(f"{s} x {t} tokens -> {n:.1f} experts" for s, t, n in got.points)
                   + " a layer read")


def _source(flag: int | None, spec: int | None, field: str, which: str) -> str:
    """Where a budget came from, for a refusal: the flag, the manifest's field, or this machine."""
    if flag:
        return f"--{which}-memory"
    if spec:
        return f"spec.resources.{field}"
    return "this machine's GPU (or the assumed 80 GiB)" if which == "gpu" else "this machine's available memory"


def _explicit(spec, job, config, ceil, budget, sizes, itemsize, cal) -> list[str]:
    """Lines on the manifest's explicit policy: the prediction, and whether it fits the budgets (by how much not)."""
    from dataclasses import replace

    from .costmodel import Candidate, describe, kv_disk_bytes, memory, predict
    from .planning import policy_for

    base = _base_policy(ceil)
    pol = replace(policy_for(spec, n_prompts=job.prompts, device="cuda", config=config),
                  io_threads=base.io_threads, io_task_bytes=base.io_task_bytes)
    cand, q = Candidate(pol, spec.model.quantization), spec.model.quantization
    gpu, cpu = memory(cand, config=config, job=job, sizes=sizes[q], cal=cal, itemsize=itemsize)
    disk = kv_disk_bytes(cand, config=config, job=job, itemsize=itemsize)
    pr = predict(cand, config=config, ceil=ceil, job=job, budget=budget, sizes=sizes[q], cal=cal, itemsize=itemsize)
    short = [f"{what} needs {need / 2**30:.2f} GiB, the budget is {have / 2**30:.2f} GiB"
             for what, need, have in (("GPU (with the 1 GiB reserve)", gpu + cal.gpu_reserve_bytes, budget.gpu_bytes),
                                      ("CPU", cpu, budget.cpu_bytes), ("KV disk", disk, budget.disk_bytes))
             if need > have]
    return ["explicit (spec.offload, as the manifest pins it): " + describe(pr),
            "           why: " + pr.why(),
            "           fits the budgets" if not short else "           does NOT fit: " + "; ".join(short)]


def _ceilings(args):
    """(bench.Ceilings with disk, PCIe and matmul measured, [what was assumed]): --ceilings FILE, --measure, else
    the ceilings `kubeflash run` saved in the store. Ceilings without PCIe or matmul (measured where there is no
    GPU) are refused: a plan from them would count those resources as free."""
    from ..store.cache import DEFAULT_ROOT

    saved = (args.store or DEFAULT_ROOT) / "ceilings.json"
    if args.ceilings and not args.ceilings.is_file():  # said at once
        why = "is a directory" if args.ceilings.is_dir() else "is not a regular file" if args.ceilings.exists() \
            else "no such file"
        raise ValueError(f"--ceilings {args.ceilings}: {why}; expected a ceilings JSON file ({_HOW})")
    from .ceilings import Ceilings  # torch-free: a plan imports no torch unless it measures

    if args.ceilings:
        ceil, source = Ceilings.load(args.ceilings), f"--ceilings {args.ceilings}"
    elif args.measure:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--measure: no CUDA GPU here, so PCIe and matmul cannot be measured (only the disk "
                             f"could); pass --ceilings FILE ({_HOW})")
        from .bench import measure_ceilings

        print("measuring ceilings (disk, PCIe, matmul)…", file=sys.stderr)
        ceil, source = measure_ceilings((args.store or DEFAULT_ROOT) / "probe"), "--measure"
    elif saved.is_file():
        ceil, source = Ceilings.load(saved), str(saved)
    else:
        raise ValueError(f"no ceilings: pass --ceilings FILE ({_HOW}) or --measure (on a GPU machine); none were "
                         f"saved in {saved} either")
    missing = ceil.unmeasured()
    if missing:
        raise ValueError(f"{source}: {', '.join(missing)} not measured (0; they need "
                         f"{' and '.join(sorted(set(missing.values())))}); pass --ceilings FILE ({_HOW})")
    return ceil, [] if source.startswith("--") else [f"the ceilings saved in {source}"]


def _gpu_or_assumed(assumed: list[str]) -> int:
    """This machine's GPU memory; with no GPU here, an 80 GiB GPU (H100/A100 80GB), said in `assumed`."""
    try:
        return _gpu_total()
    except ValueError:
        assumed.append("no GPU here and no --gpu-memory or spec.resources.gpuMemory: planning for an 80 GiB GPU "
                       "(pass --gpu-memory for the GPU the job will run on)")
        return 80 << 30


def _source_config(uri: str):
    """The model config of spec.model.uri read from its source; a source that cannot be read names the field."""
    from ..store.format import StoreError
    from ..store.modelconfig import preset

    try:
        if uri.startswith("dummy:"):
            return preset(uri.split(":", 1)[1])
        if uri == "builtin:smollm2-135m":
            return preset("smollm2-135m")
        from ..store.convert import open_source
        from ..store.uris import check_scheme

        return open_source(check_scheme(uri)).config
    except (StoreError, ValueError) as e:
        if str(e).startswith("spec.model"):
            raise
        raise ValueError(f"spec.model.uri: {e}") from None


def _model(spec, store: Path | None):
    """(config, {quantization: (stored, dense)}, compute itemsize, where the sizes come from, tokenizer dir)."""
    from ..store.cache import DEFAULT_ROOT
    from ..store.format import StoreError, load_manifest
    from ..store.ids import model_id
    from ..store.modelconfig import ModelConfig
    from .costmodel import stage_sizes

    m = spec.model
    itemsize = 4 if m.dtype == "float32" else 2
    model_dir = (store or DEFAULT_ROOT) / "models" / model_id(m.uri, dtype=m.dtype, quantization=m.quantization)
    try:
        manifest = load_manifest(model_dir)
    except StoreError:
        manifest = None
    if manifest:
        config = ModelConfig.from_dict(manifest.config)
        have = manifest.stage_bytes
    else:
        config, have = _source_config(m.uri), None
    sizes = {q: stage_sizes(config, itemsize, q) for q in ("none", "int8", "int4")}
    if have:  # measured sizes for the stored quantization, scaled by the estimates for the others
        base = sizes[m.quantization][0]
        sizes = {q: ([round(h * s / b) for h, s, b in zip(have, st, base)], de) for q, (st, de) in sizes.items()}
    tok = model_dir / manifest.tokenizer if manifest and manifest.tokenizer else None
    return config, sizes, itemsize, f"sizes from {model_dir}" if have else "sizes estimated from the config", tok


def _job(spec, tokenizer_dir: Path | None, prompt_len: int):
    from .costmodel import JobShape

    prompts = spec.input.prompts
    g = spec.generation
    gen = max([g.max_new_tokens] + [p.max_tokens or 0 for p in prompts])
    if not prompt_len:
        lens = [len(p.token_ids) for p in prompts if p.token_ids is not None]
        texts = [p.text if p.text is not None else "\n".join(x["content"] for x in p.messages or ())
                 for p in prompts if p.token_ids is None]
        if texts and tokenizer_dir:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            lens += [len(tok(t)["input_ids"]) + 16 for t in texts]  # + a chat template's few tokens
        else:
            lens += [len(t) // 4 + 16 for t in texts]  # ~4 characters a token
        prompt_len = max(lens)
    return JobShape(prompts=len(prompts), prompt_len=prompt_len, gen_len=gen)


def _check_prompt_len(config, job, prompt_len: int) -> None:
    """--prompt-len past the model's positions is refused naming it (it was priced: 'no candidate policy fits')."""
    from .planning import context_limit

    limit = context_limit(config)
    if prompt_len and prompt_len + job.gen_len > limit:
        raise ValueError(f"--prompt-len {prompt_len}: {prompt_len} + {job.gen_len} generated tokens exceed the model's "
                         f"context window of {limit} tokens; expected at most {max(limit - job.gen_len, 0)}")


def _base_policy(ceil):
    from .policy import make_policy

    return make_policy(ceil)


# ------------------------------------------------------------------------------------------- output


def _offload_yaml(pr, prefetch: bool | None = None) -> str:
    """The chosen policy as spec.offload YAML; `prefetch`: the MoE expert prefetch chosen (None: a dense model)."""
    p = pr.candidate.policy
    kv = {t: 100 if t == {"device": "gpu"}.get(p.kv, p.kv) else 0 for t in ("gpu", "cpu", "disk")}
    disk = 100 - p.weights_gpu_percent - p.weights_cpu_percent
    return (f"  offload:\n    policy: explicit\n    weights: {{gpu: {p.weights_gpu_percent:g}, cpu: "
            f"{p.weights_cpu_percent:g}, disk: {disk:g}}}\n"
            f"    kv: {{gpu: {kv['gpu']}, cpu: {kv['cpu']}, disk: {kv['disk']}}}\n"
            f"    gpuBatchSize: {p.gpu_batch_size}\n    numGpuBatches: {p.num_gpu_batches}"
            + (f"\n    compression: int{p.kv_bits}  # the KV cache's bits" if p.kv_bits != 16 else "")
            + ("\n    cpuAttention: true" if p.cpu_attention else "") + ("\n    kvWriteBack: true" if p.kv_write_back else "")
            + ("\n    xCache: true" if p.x_cache_percent else "")
            + ("" if prefetch is None else f"\n    expertPrefetch: {'on' if prefetch else 'off'}")
            + (f"\n  model: {{quantization: {q}}}  # merge into spec.model" if (q := pr.candidate.quantization) != "none"
               else ""))


def _sparse_cost(spec, config, itemsize: int, store: Path | None = None, freq=None):
    """spec.offload.sparsity as the cost model prices it (costmodel.SparseCost), or None (off, or a MoE model):
    input sparsity (TEAL) for the Llama family (the attention's inputs too where the model's store entry has the
    attention channel files, `kubeflash calibrate --attention`), gate-activation reads of neuron bundles for OPT.
    Input sparsity's hot set (a quarter of spec.resources.cpuMemory) is chosen and priced from the entry's keep
    frequencies `freq` (_entry_frequency's) as `kubeflash run` chooses it (channelcache.hot_rows, hot_pricing).
    OPT's hot set's hit rate is its share of the bundles (a uniform assumption; calibration frequencies do better)."""
    from ..store.channels import attn_present
    from .costmodel import SparseCost, updown_bytes
    from .sparse import hot_budget

    if spec.offload.sparsity is None or config.num_experts:
        return None
    if config.architecture != "opt":  # kubeflash calibrate writes input-channel files: a run reads input-sparse
        held, pairs, hit = (0, (), 0.0) if freq is None else _hot_pricing(freq, config, itemsize, spec.resources)
        return SparseCost(spec.offload.sparsity, method="input", attention=attn_present(_entry(spec, store)),
                          channel_hot_bytes=held, channel_hot=pairs, channel_hit=hit)
    hot = hot_budget(spec.resources, "cuda")
    return SparseCost(spec.offload.sparsity, hot, min(1.0, hot / (config.num_layers * updown_bytes(config, itemsize))))


def _row_sizes(config, itemsize: int) -> dict:
    """The input-channel rows' sizes channelcache's hot_rows/hot_tiers/hot_pricing and layerreads take: an input
    channel's gate + up column, a neuron's down column (store.channels.ChannelReader's in_row_bytes, down_row_bytes)."""
    h, i = config.hidden_size, config.intermediate_size
    return dict(hidden=h, in_row_bytes=2 * i * itemsize, down_row_bytes=h * itemsize)


def _hot_pricing(freq, config, itemsize: int, resources):
    """channelcache.hot_pricing of the hot set a job with `resources` holds (a quarter of cpuMemory), or no hot set."""
    from .channelcache import hot_pricing, hot_rows
    from .sparse import hot_budget

    budget = hot_budget(resources, "cpu")
    if not budget:
        return 0, (), 0.0
    rows = _row_sizes(config, itemsize)
    return hot_pricing(freq, hot_rows(freq, **rows, budget_bytes=budget), **rows)


def _layer_reads(spec, config, itemsize: int, freq, plan, ceil):
    """Input sparsity read sparsely, with the store entry's keep frequencies `freq` (_entry_frequency's): each layer
    priced on its own at the chosen micro-batch, the hot set of spec.resources held (layerreads.py, as `kubeflash
    run` does); else None."""
    from .channelcache import hot_tiers
    from .costmodel import read_op_s
    from .layerreads import choose_layers
    from .sparse import hot_budget

    sparse = plan.best.candidate.sparse
    if sparse is None or sparse.method != "input" or freq is None:
        return None
    rows = _row_sizes(config, itemsize)
    # held on the GPU (its tier's bytes select the same rows) and in host memory
    dev, host = hot_tiers(freq, **rows, budgets=(sparse.channel_gpu_bytes, hot_budget(spec.resources, "cpu")))
    held = [(sorted(a + c), sorted(b + d)) for (a, b), (c, d) in zip(dev, host)]
    policy = plan.best.candidate.policy
    return choose_layers(freq, **rows, tokens=policy.gpu_batch_size, op_s=read_op_s(ceil), gbps=ceil.disk_read_cold,
                         held=held, threads=policy.io_threads)


def _entry_frequency(spec, config, store: Path | None):
    """The store entry's keep frequencies at spec.offload.sparsity (store.channels.frequency), read once a plan and
    passed to _sparse_cost, _device_tier and _layer_reads (`kubeflash run` reads them once too); None without input
    sparsity (off, a MoE model, OPT's bundles) or without input-channel files."""
    from ..store.channels import frequency, present

    if spec.offload.sparsity is None or config.num_experts or config.architecture == "opt":
        return None
    entry = _entry(spec, store)
    return frequency(entry, spec.offload.sparsity) if present(entry) else None


def _criterion(spec, config, store: Path | None) -> str | None:
    """What the store entry's input sparsity thresholds compare (kubeflash calibrate --criterion), where that is
    not magnitude; None for magnitude, OPT or a MoE model, and where the entry has no readable calibration (the run
    refuses it with the command to run)."""
    from ..store import sparsity as cal
    from ..store.format import StoreError

    if spec.offload.sparsity is None or config.num_experts or config.architecture == "opt":
        return None
    try:
        c = cal.load(_entry(spec, store))
    except StoreError:
        return None
    if c is None or c.criterion == "magnitude":
        return None
    return (f"calibrated with --criterion {c.criterion} (a channel is kept where |x| x its weight column norm is "
            "above the threshold)")


def _device_tier(plan, spec, config, itemsize: int, freq, *, budget, ceil, job, sizes, cal):
    """Input sparsity's hot set as `kubeflash run` holds it on a GPU (job._device_tier): its most frequent rows in
    the GPU memory the budget leaves after the chosen plan's predicted use (costmodel.device_room), the next within a
    quarter of cpuMemory in host memory (channelcache.hot_tiers), both from the keep frequencies `freq`; the chosen
    plan priced again with both tiers (its GPU figure grows by exactly the device tier's bytes). The plan unchanged
    without keep frequencies or room."""
    from .channelcache import hot_pricing, hot_tiers
    from .costmodel import device_room
    from .planning import repriced
    from .sparse import hot_budget

    s = plan.best.candidate.sparse
    room = device_room(plan.best, budget, cal) if s is not None and s.method == "input" else 0
    if freq is None or not room:
        return plan
    rows = _row_sizes(config, itemsize)
    dev, host = hot_tiers(freq, **rows, budgets=(room, hot_budget(spec.resources, "cpu")))
    return repriced(plan, (hot_pricing(freq, dev, **rows), hot_pricing(freq, host, **rows)),
                    dict(config=config, ceil=ceil, budget=budget, sizes=sizes, cal=cal, itemsize=itemsize), job=job)


def _priced_plan(make_plan, sparsity, **kw):
    """(make_plan's plan with `sparsity`, None); where `sparsity` thresholds the attention too (the store has
    attn_channels/), planned FFN-only as well and the faster plan kept, with the words saying which and the two
    predicted times (costmodel.attention_choice, as `kubeflash run` chooses)."""
    from dataclasses import replace

    from .costmodel import attention_choice

    plan = make_plan(sparsity=sparsity, **kw)
    if sparsity is None or not sparsity.attention:
        return plan, None
    ffn = make_plan(sparsity=replace(sparsity, attention=False), **kw)
    use, why = attention_choice(plan.best.total_s, ffn.best.total_s)
    return (plan if use else ffn), why


def _sparse_line(target: float, plan, ceil=None) -> str:
    from .costmodel import read_op_s

    best, other = plan.best, plan.other_reads
    picked, rest = ("sparse", "dense") if best.candidate.sparse else ("dense", "sparse")
    measured = "measured" if getattr(ceil, "disk_read_op_s", 0) else "assumed"
    op = f"; a bundle read costs {read_op_s(ceil) * 1e6:.1f} us on top of its bytes ({measured})"
    s = next((pr.candidate.sparse for pr in (best, other) if pr is not None and pr.candidate.sparse), None)
    if s is not None and (s.channel_hot_bytes or s.channel_gpu_bytes):  # input sparsity's hot set, priced with them
        dev = (f"{s.channel_gpu_bytes / 2**20:.1f} MiB on the GPU (the room its budget leaves after the plan) + "
               if s.channel_gpu_bytes else "")
        op += (f"; hot set {dev}{s.channel_hot_bytes / 2**20:.1f} MiB of channel rows in host memory (a quarter of "
               f"cpuMemory), expected to serve {100 * s.channel_hit:.1f}% of a decode token's kept FFN column bytes")
    if other is None:
        return f"sparsity {target:g}: {picked} FFN reads (no {rest} candidate fits){op}"
    more = max(0.0, other.total_s / best.total_s - 1)
    return (f"sparsity {target:g}: picked {picked} FFN reads; the fastest with {rest} reads is predicted "
            f"{other.total_s:.3g} s (+{more:.1%}){op}")


def _to_json(plan, job, budget) -> dict:
    def one(pr):
        return None if pr is None else {
            "policy": pr.candidate.policy.__dict__, "quantization": pr.candidate.quantization,
            "placement": pr.placement, "total_s": pr.total_s, "run_s": pr.run_s, "setup_s": pr.setup_s,
            "tokens_per_s": pr.tokens_per_s, "bound": pr.bound, "resource_s": pr.resource_s,
            "phases": pr.phase_summary(),
            "gpu_bytes": pr.gpu_bytes, "cpu_bytes": pr.cpu_bytes, "sparse_reads": pr.candidate.sparse is not None}

    return {"job": job.__dict__, "budget": budget.__dict__, "considered": plan.considered, "fitting": plan.fitting,
            "best": one(plan.best), "runner_up": one(plan.runner_up), "other_reads": one(plan.other_reads)}
