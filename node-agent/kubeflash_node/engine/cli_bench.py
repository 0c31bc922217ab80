"""`kubeflash bench`: this machine's ceilings, then a full workload run printed beside its roofline floor."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .cliargs import file_path, int_range, percent, positive_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dummy:llama-3-8b",
                   help="dummy:<preset> (kubeflash convert --list-presets; default: %(default)s), or a model "
                        "directory kubeflash convert --out DIR wrote (for builtin:, .gguf or HF sources)")
    p.add_argument("--store", type=Path, default=Path("/tmp/kubeflash-bench"),
                   help="where models are converted and probe files written (put it on the SSD under test; "
                        "default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the converted weights and the compute (default: float16)")
    p.add_argument("--prompts", type=int_range(1), default=8, help="number of sequences (default: %(default)s)")
    p.add_argument("--prompt-len", type=int_range(1), default=512, help="tokens per prompt (default: %(default)s)")
    p.add_argument("--gen-len", type=int_range(1), default=32, help="tokens generated per prompt (default: %(default)s)")
    p.add_argument("--policy", choices=["auto", "explicit"],
                   help="auto: the cost model picks placement, batch shape and techniques from the ceilings and the "
                        "budgets, keeping any placement flag below that is given with it (a pin); explicit: the "
                        "flags below (default: explicit when any of them is given, else auto)")
    p.add_argument("--gpu-memory", type=positive_size,
                   help="GPU memory the run may use, e.g. 12GiB: the auto policy plans with it and the CUDA allocator "
                        "is capped to it (default: the GPU's)")
    p.add_argument("--cpu-memory", type=positive_size,
                   help="host memory the auto policy plans with, e.g. 16GiB (default: MemAvailable)")
    p.add_argument("--allow-compression", action="store_true",
                   help="auto: also weigh int8/int4 weights and 8/4-bit KV (changes outputs: docs/compression.md)")
    p.add_argument("--quantization", choices=["none", "int8", "int4"], help="explicit: store weights group-wise "
                                                                            "quantized (default none)")
    p.add_argument("--gpu-batch-size", type=int_range(1), help="sequences per micro-batch (default: all prompts)")
    p.add_argument("--num-gpu-batches", type=int_range(1), help="micro-batches per block (zig-zag; default 1)")
    p.add_argument("--weights", type=_weights_arg, help="disk | cpu | gpu, or GPU:CPU percentages like 20:30 (default disk)")
    p.add_argument("--kv", choices=["device", "cpu", "disk"], help="where the KV cache lives (default device)")
    p.add_argument("--kv-bits", type=int, choices=[16, 8, 4],
                   help="KV cache bits in any tier (group-wise; 16: none; device: a compressed GPU cache; explicit: "
                        "default 16)")
    p.add_argument("--cpu-attention", action="store_true", help="decode attention on the CPU (kv cpu)")
    p.add_argument("--kv-write-back", action="store_true", help="buffer new KV rows, write large chunks (kv disk)")
    p.add_argument("--x-cache", type=percent, help="percent of layers keeping X instead of K and V (INF² X-cache)")
    p.add_argument("--prefetch", type=int_range(1), default=2, help="stages read ahead of compute (default: %(default)s)")
    p.add_argument("--all-experts", action="store_true",
                   help="MoE models: read every expert of a streamed layer (dense streaming), not only the routed ones")
    p.add_argument("--expert-cache", type=positive_size, default=0,
                   help="MoE models: device memory for the most often routed experts, kept across steps (e.g. 4GiB; "
                        "default: 0, none)")
    p.add_argument("--expert-prefetch", action="store_true",
                   help="MoE models: predict each streamed layer's experts before its attention and read them meanwhile "
                        "(default: off, experts are read after the router; docs/moe.md)")
    p.add_argument("--io-backend", default="auto", choices=["auto", "posix", "odirect", "kvikio"],
                   help="how layers are read from disk; auto: kvikio with real GPUDirect Storage, else O_DIRECT on "
                        "a GPU where the file system allows it, else buffered posix (default: auto)")
    p.add_argument("--io-threads", type=int_range(0), default=0, help="reader threads (default: the best the disk probe found)")
    p.add_argument("--task-mb", type=int_range(0), default=0, help="one read task in MiB (default: the best the probe found)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before the run")
    p.add_argument("--no-ceilings", action="store_true", help="skip the ceiling measurements")
    p.add_argument("--ceilings", type=Path, help="read ceilings from this JSON instead of measuring")
    p.add_argument("--ceilings-only", action="store_true", help="measure the ceilings and stop")
    p.add_argument("--disk-probe", type=positive_size, default="2GiB",
                   help="size of the disk probe file written and read back under --store (default 2GiB; larger is steadier)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    p.add_argument("--json", type=file_path, help="write everything measured to this JSON file")


def _placement_args(s: str) -> tuple[float, float]:
    if s == "disk":
        return 0.0, 0.0
    if s == "cpu":
        return 0.0, 100.0
    if s == "gpu":
        return 100.0, 0.0
    try:
        g, c = (float(x) for x in s.split(":"))
    except ValueError:
        g = c = math.nan
    if not (0 <= g <= 100 and 0 <= c <= 100 and g + c <= 100):
        raise ValueError(f"--weights {s!r}: expected disk, cpu, gpu or GPU:CPU percentages summing to at most 100, "
                         f"like 20:30")
    return g, c


def _weights_arg(s: str) -> str:
    try:
        _placement_args(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return s


EXPLICIT = ("quantization", "gpu_batch_size", "num_gpu_batches", "weights", "kv", "kv_bits", "x_cache")


def _pins(args):
    """--policy auto with placement flags: the flags given, as a filter on the cost model's candidates."""
    want = {}
    if args.weights is not None:
        want["weights_gpu_percent"], want["weights_cpu_percent"] = _placement_args(args.weights)
    for flag, field in (("gpu_batch_size", "gpu_batch_size"), ("num_gpu_batches", "num_gpu_batches"), ("kv", "kv"),
                        ("kv_bits", "kv_bits"), ("x_cache", "x_cache_percent")):
        if getattr(args, flag) is not None:
            want[field] = getattr(args, flag)
    for flag in ("cpu_attention", "kv_write_back"):
        if getattr(args, flag):
            want[flag] = True
    return (lambda pol: all(getattr(pol, k) == v for k, v in want.items())) if want else None


def _explicit_policy(args, base):
    from dataclasses import replace

    g_pct, c_pct = _placement_args(args.weights or "disk")
    return replace(base, gpu_batch_size=args.gpu_batch_size or args.prompts, num_gpu_batches=args.num_gpu_batches or 1,
                   weights_gpu_percent=g_pct, weights_cpu_percent=c_pct, kv=args.kv or "device",
                   kv_bits=args.kv_bits or 16, cpu_attention=args.cpu_attention, kv_write_back=args.kv_write_back,
                   x_cache_percent=args.x_cache or 0.0), args.quantization or "none"


def _model_shape(args):
    """(config, {quantization: (stored, dense)}, quantizations the store can have) before any conversion."""
    from ..store.format import load_manifest
    from ..store.modelconfig import ModelConfig, preset
    from .costmodel import stage_sizes

    itemsize = 4 if args.dtype == "float32" else 2
    if Path(args.model).is_dir():
        if not (Path(args.model) / "manifest.json").exists() and (Path(args.model) / "config.json").is_file():
            raise ValueError(f"--model {args.model}: is a Hugging Face directory, not a store; convert it first "
                             f"(kubeflash convert {args.model} --out DIR) and bench --model DIR")
        m = load_manifest(Path(args.model))
        config = ModelConfig.from_dict(m.config)
        q = {8: "int8", 4: "int4"}.get((m.extra.get("quant") or {}).get("bits"), "none")
        return config, {q: (m.stage_bytes, stage_sizes(config, itemsize, q)[1])}, (q,)
    if not args.model.startswith("dummy:"):
        raise ValueError(f"--model {args.model}: expected dummy:<preset> or a model directory kubeflash convert "
                         "--out DIR wrote")
    try:
        config = preset(args.model.split(":", 1)[1])
    except ValueError as e:
        raise ValueError(f"--model {args.model}: {e}") from None
    return config, {q: stage_sizes(config, itemsize, q) for q in ("none", "int8", "int4")}, ("none", "int8", "int4")


def _refuse_early(args) -> None:
    """A --model that names nothing, or a --store or --json that cannot be written, refused before torch is
    imported (seconds) and before ceilings are measured (a minute)."""
    from ..store.format import StoreError
    from .cli_run import check_writable

    try:
        _model_shape(args)
    except StoreError as e:
        raise ValueError(f"--model {args.model}: {e}") from None
    check_writable("--store", args.store, args.store)
    if args.json:
        check_writable("--json", args.json, args.json.parent)


def main(args: argparse.Namespace) -> int:
    try:
        _refuse_early(args)
    except ValueError as e:
        print(f"kubeflash bench: error: {e}", file=sys.stderr)
        return 1

    import torch

    from ..store.cache import ensure_model
    from ..store.format import StoreError, load_manifest
    from .bench import Ceilings, Workload, drop_page_cache, measure_ceilings, measure_disk_files, roofline
    from .cli_run import resolve_device
    from .costmodel import Budget, Calibration, Candidate, JobShape, describe, plan, predict
    from .generate import Engine, EngineError, GenParams
    from .memory import cap_gpu_allocator, gpu_total, mem_available
    from .moeplan import Routing, stored_routing
    from .policy import make_policy
    from .report import build_report, format_report

    try:
        device = resolve_device(args.device)
        if args.ceilings:
            ceil = Ceilings.load(args.ceilings)
        elif args.no_ceilings:
            ceil = Ceilings()
        else:
            what = ", PCIe, matmul" if torch.cuda.is_available() else "; no CUDA GPU here, so not PCIe or matmul"
            print(f"measuring ceilings (disk write/read cold+warm{what})…", file=sys.stderr)
            ceil = measure_ceilings(args.store, disk_bytes=args.disk_probe)
        missing = ceil.unmeasured()  # 0 in a ceilings file, or no GPU here: printed and left out, never as 0
        _print_ceilings(ceil, _why_missing(args, torch.cuda.is_available()))
        if args.ceilings_only:
            _dump(args.json, {"ceilings": ceil.to_dict(), "unmeasured": missing})
            return 0
        mode = args.policy or ("explicit" if any(getattr(args, k) is not None for k in EXPLICIT)
                               or args.cpu_attention or args.kv_write_back else "auto")
        if mode == "auto" and missing and not args.no_ceilings:
            if args.policy == "auto":
                raise ValueError(f"--policy auto plans from measured ceilings; {', '.join(missing)} were not "
                                 f"measured: pass --ceilings FILE from a GPU machine, or the placement flags")
            print(f"policy: explicit defaults (the auto policy needs {', '.join(missing)}, not measured)",
                  file=sys.stderr)
            mode = "explicit"
        config, sizes, quants = _model_shape(args)
        job = JobShape(args.prompts, args.prompt_len, args.gen_len)
        budget = Budget(args.gpu_memory or (gpu_total() if device.startswith("cuda") else 1 << 50),
                        args.cpu_memory or mem_available())
        base = make_policy(ceil, io_threads=args.io_threads, io_task_bytes=args.task_mb << 20, default_io_threads=8,
                           prefetch=args.prefetch, io_backend=args.io_backend, all_experts=args.all_experts,
                           expert_cache_bytes=args.expert_cache, expert_prefetch=args.expert_prefetch)
        itemsize = 4 if args.dtype == "float32" else 2
        routing = Routing()  # MoE: priced with the model's measured routing profile where its entry has one
        if mode == "auto":
            if args.no_ceilings:
                raise ValueError("--policy auto plans from measured ceilings: drop --no-ceilings")
            allowed = quants if args.allow_compression else tuple(q for q in quants if q == "none") or quants
            if args.quantization is not None:
                if args.quantization not in quants:
                    raise ValueError(f"--quantization {args.quantization}: {args.model} is stored as {quants[0]}")
                allowed = (args.quantization,)
            if len(allowed) == 1:  # the entry this run reads (with --allow-compression: several, so uniform)
                routing = stored_routing(config, _entry(args, allowed[0]))
            bits = (16, 8, 4) if args.allow_compression or (args.kv_bits or 16) != 16 else (16,)
            chosen = plan(config=config, ceil=ceil, job=job, budget=budget, sizes=sizes, quantizations=allowed,
                          kv_bits=bits, base=base, itemsize=itemsize, keep=_pins(args),
                          cal=Calibration(routing=routing.profile)).best
            policy, quant = chosen.candidate.policy, chosen.candidate.quantization
            print(f"policy auto: {describe(chosen)}\n             {chosen.why()}", file=sys.stderr)
            if config.num_experts:
                print(routing.line(config, policy.block_size, args.prompt_len), file=sys.stderr)
        else:
            policy, quant = _explicit_policy(args, base)
        if quant not in sizes:
            raise ValueError(f"--quantization {quant}: {args.model} is stored as {quants[0]}")
        if mode != "auto":  # the prediction of the policy run: with the entry's measured routing too
            routing = stored_routing(config, _entry(args, quant))
        if args.gpu_memory and device.startswith("cuda"):
            cap_gpu_allocator(budget.gpu_bytes, device)
        if Path(args.model).is_dir():
            model_dir, manifest = Path(args.model), load_manifest(Path(args.model))
        else:
            model_dir, manifest = ensure_model(args.model, dtype=args.dtype, quantization=quant, root=args.store)
        if args.cold and policy.weights_gpu_percent + policy.weights_cpu_percent < 100 and not args.no_ceilings:
            files = [model_dir / st for st in manifest.stages]
            print("measuring the disk's cold read ceiling on the model's own files…", file=sys.stderr)
            # the run's own read pattern: its reader threads plus one read per prefetched stage in flight, its tasks
            pattern = dict(thread_options=(policy.io_threads + policy.prefetch,), task_options=(policy.io_task_bytes,))
            for k, v in measure_disk_files(files, **pattern).items():
                setattr(ceil, k, v)
            _print_ceilings(ceil)
        prompts = [[(7 * i + 13 * j) % 1000 + 3 for j in range(args.prompt_len)] for i in range(args.prompts)]
        if args.cold:
            print(f"page cache: {drop_page_cache([model_dir / f for f in manifest.files])}", file=sys.stderr)
        t0 = time.perf_counter()
        engine = Engine(model_dir, policy=policy, device=device, job_dir=args.store / "job")
        t_setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.generate(prompts, GenParams(max_new_tokens=args.gen_len))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        report = build_report(engine)
        engine.close()
    except (StoreError, EngineError, ValueError, OSError) as e:
        from .cli_run import say

        print(f"kubeflash bench: error: {say(e)}", file=sys.stderr)
        return 1
    gbs = policy.gpu_batch_size
    pred = predict(Candidate(policy, quant), config=config, ceil=ceil, job=job, budget=budget,
                   sizes=(manifest.stage_bytes, sizes[quant][1]), itemsize=itemsize,
                   cal=Calibration(routing=routing.profile)) if not missing else None
    w = Workload(prompts=args.prompts, prompt_len=args.prompt_len, gen_len=args.gen_len, block_size=policy.block_size)
    itemsize = torch.empty((), dtype=engine.dtype).element_size()
    roof = roofline(stage_bytes=manifest.stage_bytes, placement=engine.placement, w=w, c=engine.config, ceil=ceil,
                    policy=policy, itemsize=itemsize,
                    phase_s=(report.get("prefill_latency_s", 0.0), report.get("decode_latency_s", 0.0)))
    weights = "disk" if policy.weights_gpu_percent + policy.weights_cpu_percent == 0 else \
        f"{policy.weights_gpu_percent:g}:{policy.weights_cpu_percent:g}"
    tokens = args.prompts * args.gen_len
    result = {
        "workload": {"model": args.model, "prompts": args.prompts, "prompt_len": args.prompt_len,
                     "gen_len": args.gen_len, "weights": weights, "kv": policy.kv, "cold": args.cold,
                     "gpu_batch_size": gbs, "num_gpu_batches": policy.num_gpu_batches, "device": device,
                     "policy_mode": mode, "quantization": quant, "kv_bits": policy.kv_bits,
                     "cpu_attention": policy.cpu_attention, "kv_write_back": policy.kv_write_back,
                     "x_cache_percent": policy.x_cache_percent, "attention_mask": "per-row lengths",
                     "gpu_memory_bytes": budget.gpu_bytes, "cpu_memory_bytes": budget.cpu_bytes},
        "predicted_s": pred.run_s if pred else None,
        "prediction_error": (pred.run_s / elapsed - 1) if pred else None,
        "predicted_gpu_gib": pred.gpu_bytes / 2**30 if pred else None,  # compare report.peak_gpu_mem_gb (GiB)
        "predicted_phases": pred.phase_summary() if pred else None,  # compare report.prefill/decode_latency_s
        "measured_s": elapsed, "setup_s": t_setup, "tokens_per_s": tokens / elapsed, "projected": False,
        "roofline": roof, "efficiency": roof["floor_s"] / elapsed if roof["floor_s"] else None,
        "ceilings": ceil.to_dict(), "unmeasured": missing, "report": report,
    }
    if config.num_experts:  # the routing the plan (policy auto) and the prediction were priced with
        result["routing_assumed"] = routing.to_json(config, policy.block_size, args.prompt_len)
    if engine.routing_profile_saved is not None:
        result["routing_profile_saved_to"] = str(engine.routing_profile_saved)
    print(format_report(report))
    print(f"\nworkload: {args.prompts} x ({args.prompt_len} prompt + {args.gen_len} gen), weights={weights}"
          f"{'' if quant == 'none' else ' ' + quant}, kv={policy.kv}{'' if policy.kv_bits == 16 else f' {policy.kv_bits}-bit'}"
          f", x-cache {policy.x_cache_percent:g}%, cpu-attention {policy.cpu_attention}, write-back {policy.kv_write_back}"
          f", block={policy.block_size} ({gbs} x {policy.num_gpu_batches}), policy {mode}  [full run, not projected]")
    if missing:
        print(f"cost model: no prediction ({', '.join(missing)} not measured)")
    if pred:
        print(f"cost model predicted {pred.run_s:.3f} s ({pred.run_s / elapsed - 1:+.1%}) and "
              f"{pred.gpu_bytes / 2**30:.2f} GiB of GPU tensors (peak allocated {report['peak_gpu_mem_gb']:.2f} GiB); "
              f"{describe(pred)}")
        print("cost model per phase: " + "; ".join(
            f"{ph} {pred.phase_s(ph):.3f} s predicted, {report.get(ph + '_latency_s', 0.0):.3f} s measured "
            f"({pred.phase_bound(ph)[0]}-bound)" for ph in pred.phases))
    print(f"measured {elapsed:.3f} s  ->  {tokens / elapsed:.2f} generated tokens/s  (setup {t_setup:.2f} s)")
    print(_roofline_line(roof, missing))
    if result["efficiency"] is not None:
        print(f"efficiency = floor / measured = {result['efficiency']:.3f}")
    _dump(args.json, result)
    return 0


def _entry(args, quantization: str) -> Path:
    """The store entry the run reads: --model itself where it is a store directory."""
    from ..store.ids import model_id

    if Path(args.model).is_dir():
        return Path(args.model)
    return args.store / "models" / model_id(args.model, dtype=args.dtype, quantization=quantization)


def _why_missing(args, gpu_here: bool) -> str:
    if args.no_ceilings:
        return "--no-ceilings"
    if args.ceilings:
        return f"0 in {args.ceilings}"
    return "needs a CUDA GPU; none here" if not gpu_here else "not measured"


def _print_ceilings(c, why: str = "not measured") -> None:
    """One line per resource; a ceiling that is 0 is printed as not measured, with why, never as 0 GB/s."""
    tasks = f", tasks {c.disk_read_task_bytes >> 20} MiB" if c.disk_read_task_bytes else ""
    disk = (f"read cold {c.disk_read_cold:.2f} GB/s ({c.disk_read_threads} threads){tasks}, warm "
            f"{c.disk_read_warm:.2f} GB/s, write {c.disk_write:.2f} GB/s"
            + (f", {c.disk_read_op_s * 1e6:.1f} us a small read" if c.disk_read_op_s else "")
            if c.disk_read_cold else f"not measured ({why})")
    pcie = (f"H2D pinned {c.h2d_pinned:.1f} GB/s, pageable {c.h2d_pageable:.1f} GB/s; D2H pinned {c.d2h_pinned:.1f} "
            f"GB/s" if c.h2d_pinned else f"not measured ({why})")
    mm = f"{c.matmul_tflops:.0f} TFLOP/s" if c.matmul_tflops else f"not measured ({why})"
    print(f"ceilings:\n  disk:   {disk}\n  PCIe:   {pcie}\n  matmul: {mm}")


def _roofline_line(roof: dict, missing: dict) -> str:
    """The floor and its terms; a term whose ceiling was not measured is named as left out, not shown as 0 s."""
    terms = [(name, key, f"{roof[b] / scale:.1f} {unit}") for name, key, b, scale, unit in (
        ("disk", "disk_read_cold", "disk_bytes", 1e9, "GB"), ("pcie", "h2d_pinned", "pcie_bytes", 1e9, "GB"),
        ("compute", "matmul_tflops", "flops", 1e12, "TFLOP"))]
    shown = [f"{n} {roof[f't_{n}_s']:.3f} s for {amount}" for n, key, amount in terms if key not in missing]
    left = [f"{n} ({amount}, ceiling not measured)" for n, key, amount in terms if key in missing]
    bound = f"{roof['bound']}-bound" if shown else "no measured term"
    rate = f"; disk at {roof['disk_read_gbps']:.2f} GB/s (probe {roof['disk_read_probe_gbps']:.2f}, the run's own reads " \
        f"{roof['disk_read_run_gbps']:.2f})" if roof["disk_bytes"] and "disk_read_cold" not in missing else ""
    return (f"roofline floor {roof['floor_s']:.3f} s ({bound}: {', '.join(shown) or '-'})"
            + (f"; left out: {', '.join(left)}" if left else "") + rate)


def _dump(path: Path | None, obj: dict) -> None:
    """Write the result JSON crash-safely (temp, fsync, rename): never a half-written file."""
    from ..store.format import atomic_write_bytes

    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode(), mode=0o644)
