"""`kubeflash bench`: this machine's ceilings, then a full workload run printed beside its roofline floor."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dummy:llama-3-8b",
                   help="a model source (dummy:<preset>, builtin:…, .gguf, HF dir) or a converted store directory")
    p.add_argument("--store", type=Path, default=Path("/tmp/kubeflash-bench"),
                   help="where models are converted and probe files written (put it on the SSD under test)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--prompts", type=int, default=8, help="number of sequences")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=0, help="sequences per micro-batch (default: all prompts)")
    p.add_argument("--num-gpu-batches", type=int, default=1, help="micro-batches per block (zig-zag)")
    p.add_argument("--weights", default="disk", help="disk | cpu | gpu, or GPU:CPU percentages like 20:30")
    p.add_argument("--kv", default="device", choices=["device", "cpu", "disk"])
    p.add_argument("--prefetch", type=int, default=2, help="stages read ahead of compute")
    p.add_argument("--io-backend", default="auto", choices=["auto", "posix", "odirect", "kvikio"])
    p.add_argument("--io-threads", type=int, default=0, help="reader threads (default: the best the disk probe found)")
    p.add_argument("--task-mb", type=int, default=0, help="one read task in MiB (default: the best the probe found)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before the run")
    p.add_argument("--no-ceilings", action="store_true", help="skip the ceiling measurements")
    p.add_argument("--ceilings", type=Path, help="read ceilings from this JSON instead of measuring")
    p.add_argument("--ceilings-only", action="store_true", help="measure the ceilings and stop")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write everything measured to this JSON file")


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
        raise ValueError(f"--weights {s!r}: expected disk, cpu, gpu or GPU:CPU percentages like 20:30") from None
    return g, c


def main(args: argparse.Namespace) -> int:
    import torch

    from ..store.cache import ensure_model
    from ..store.format import StoreError, load_manifest
    from .bench import Ceilings, Workload, drop_page_cache, measure_ceilings, measure_disk_files, roofline
    from .cli_run import resolve_device
    from .generate import Engine, GenParams
    from .policy import Policy
    from .report import build_report, format_report

    try:
        device = resolve_device(args.device)
        if args.ceilings:
            ceil = Ceilings(**json.loads(args.ceilings.read_text()))
        elif args.no_ceilings:
            ceil = Ceilings()
        else:
            print("measuring ceilings (disk write/read cold+warm, PCIe, matmul)…", file=sys.stderr)
            ceil = measure_ceilings(args.store)
        _print_ceilings(ceil)
        if args.ceilings_only:
            _dump(args.json, {"ceilings": ceil.to_dict()})
            return 0
        if Path(args.model).is_dir():
            model_dir, manifest = Path(args.model), load_manifest(Path(args.model))
        else:
            model_dir, manifest = ensure_model(args.model, dtype=args.dtype, root=args.store)
        g_pct, c_pct = _placement_args(args.weights)
        if args.cold and g_pct + c_pct < 100 and not args.no_ceilings:
            files = [model_dir / st for st in manifest.stages]
            print("measuring the disk's cold read ceiling on the model's own files…", file=sys.stderr)
            for k, v in measure_disk_files(files).items():
                setattr(ceil, k, v)
            _print_ceilings(ceil)
        threads = args.io_threads or ceil.disk_read_threads or 8
        task_mb = args.task_mb or (ceil.disk_read_task_bytes >> 20) or 16
        gbs = args.gpu_batch_size or args.prompts
        policy = Policy(gpu_batch_size=gbs, num_gpu_batches=args.num_gpu_batches, weights_gpu_percent=g_pct,
                        weights_cpu_percent=c_pct, kv=args.kv, prefetch=args.prefetch, io_backend=args.io_backend,
                        io_threads=threads, io_task_bytes=task_mb << 20)
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
    except (StoreError, ValueError, OSError) as e:
        print(f"kubeflash bench: error: {e}", file=sys.stderr)
        return 1
    w = Workload(prompts=args.prompts, prompt_len=args.prompt_len, gen_len=args.gen_len, block_size=policy.block_size)
    stage_bytes = [manifest.files[s].size for s in manifest.stages]
    itemsize = torch.empty((), dtype=engine.dtype).element_size()
    roof = roofline(stage_bytes=stage_bytes, placement=engine.placement, w=w, c=engine.config, ceil=ceil,
                    kv_tier=policy.kv, itemsize=itemsize)
    tokens = args.prompts * args.gen_len
    result = {
        "workload": {"model": args.model, "prompts": args.prompts, "prompt_len": args.prompt_len,
                     "gen_len": args.gen_len, "weights": args.weights, "kv": args.kv, "cold": args.cold,
                     "gpu_batch_size": gbs, "num_gpu_batches": args.num_gpu_batches, "device": device},
        "measured_s": elapsed, "setup_s": t_setup, "tokens_per_s": tokens / elapsed, "projected": False,
        "roofline": roof, "efficiency": roof["floor_s"] / elapsed if roof["floor_s"] else None,
        "ceilings": ceil.to_dict(), "report": report,
    }
    print(format_report(report))
    print(f"\nworkload: {args.prompts} x ({args.prompt_len} prompt + {args.gen_len} gen), weights={args.weights}, "
          f"kv={args.kv}, block={policy.block_size} ({gbs} x {args.num_gpu_batches})  [full run, not projected]")
    print(f"measured {elapsed:.3f} s  ->  {tokens / elapsed:.2f} generated tokens/s  (setup {t_setup:.2f} s)")
    print(f"roofline floor {roof['floor_s']:.3f} s ({roof['bound']}-bound: disk {roof['t_disk_s']:.3f} s for "
          f"{roof['disk_bytes'] / 1e9:.1f} GB, pcie {roof['t_pcie_s']:.3f} s for {roof['pcie_bytes'] / 1e9:.1f} GB, "
          f"compute {roof['t_compute_s']:.3f} s for {roof['flops'] / 1e12:.1f} TFLOP)")
    if result["efficiency"] is not None:
        print(f"efficiency = floor / measured = {result['efficiency']:.3f}")
    _dump(args.json, result)
    return 0


def _print_ceilings(c) -> None:
    print(f"ceilings: disk read cold {c.disk_read_cold:.2f} GB/s ({c.disk_read_threads} threads), warm "
          f"{c.disk_read_warm:.2f} GB/s, tasks {c.disk_read_task_bytes >> 20} MiB, write {c.disk_write:.2f} GB/s; H2D pinned {c.h2d_pinned:.1f} GB/s, "
          f"pageable {c.h2d_pageable:.1f} GB/s; D2H pinned {c.d2h_pinned:.1f} GB/s; matmul {c.matmul_tflops:.0f} TFLOP/s")


def _dump(path: Path | None, obj: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1, default=str))
