"""`kubeflash engine`: the inference pod's entry point, configured by the operator through env and mounts.

Env (docs/contract.md): KUBEFLASH_JOB_SPEC (the job's canonical spec, kubeflash_api.to_canonical, as JSON),
KUBEFLASH_JOB_NAME, KUBEFLASH_JOB_NAMESPACE, KUBEFLASH_MODEL_DIR (the staged model, read-only), KUBEFLASH_JOB_DIR (KV files,
results.jsonl, progress.json, report.json), KUBEFLASH_PROBE (the node agent's measured bandwidths of the placed
pair, JSON; spec.offload.policy auto plans with it on a GPU). A restarted pod skips the prompts already in
results.jsonl.

spec.offload.tensorParallel N > 1: the pod starts N rank processes (engine/tplaunch.py), rank k on the pod's GPU
k (cuda:k) streaming shard k from KUBEFLASH_SHARD_DIRS (one directory per rank, os.pathsep-separated, each on
its pair's disk, staged by the node agent; checked before any rank starts, a missing one named). Optional:
KUBEFLASH_RING_DIRS (one per rank: reduce through the SSD ring instead of NCCL/gloo), KUBEFLASH_RANK_DIRS (where
ranks 1..N-1 keep progress and KV files, e.g. their pairs' KV volumes). Rank 0 writes the job's files as one
process does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=os.environ.get("KUBEFLASH_DEVICE", "auto"),
                   help="auto, cpu, cuda or cuda:N (default: $KUBEFLASH_DEVICE or auto)")
    p.add_argument("--output-dir", type=Path, default=os.environ.get("KUBEFLASH_OUTPUT_DIR"),
                   help="the output claim's root: when the job is done its results are copied there, to "
                        "spec.output.path (default <job>.results.jsonl). Default: $KUBEFLASH_OUTPUT_DIR; "
                        "unset: no copy, results stay in $KUBEFLASH_JOB_DIR")


def _env(name: str) -> str:
    v = os.environ.get(name)
    if not v:
        raise ValueError(f"environment variable {name} is required (the operator sets it in the pod spec)")
    return v


def _terminate(signum, frame):  # PID 1 in the pod: turn SIGTERM into a clean exit (results are already flushed)
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    import signal

    from kubeflash_api import SpecError, from_canonical
    from kubeflash_api import contract as c
    from kubeflash_api.batch import read_batch

    from ..store.format import StoreError, verify_model
    from .cli_run import resolve_device
    from .generate import EngineError
    from .job import run_job
    from .report import format_report, write_report

    signal.signal(signal.SIGTERM, _terminate)
    try:
        spec = from_canonical(_job_spec_json(c.ENV_JOB_SPEC), name=_env(c.ENV_JOB_NAME),
                              namespace=os.environ.get(c.ENV_JOB_NAMESPACE, "default"))
        if os.environ.get(c.ENV_INPUT_FILE):  # configMap or PVC input, mounted by the operator
            spec = spec.with_prompts(read_batch(Path(os.environ[c.ENV_INPUT_FILE]), field="spec.input"))
        model_dir, job_dir = Path(_env("KUBEFLASH_MODEL_DIR")), Path(_env("KUBEFLASH_JOB_DIR"))
        manifest = verify_model(model_dir)  # sha256 of every file, once per node (cached verdict)
        device = resolve_device(args.device)
        output = job_dir / "results.jsonl"
        machine = None
        from .planning import needs_ceilings

        priced = needs_ceilings(spec, manifest)  # policy auto, sparse vs dense reads, MoE expertPrefetch auto
        if priced and device.startswith("cuda"):  # plan with the agent's probe
            from .machine import pod_machine

            machine = pod_machine(os.environ.get("KUBEFLASH_PROBE"), job_dir / "probe")
        if spec.offload.tensor_parallel > 1:
            report = _run_ranks(spec, model_dir=model_dir, manifest=manifest, output=output, device=device,
                                job_dir=job_dir)
        else:
            report = run_job(spec, model_dir=model_dir, manifest=manifest, output=output, device=device,
                             job_dir=job_dir, machine=machine, kv_cache_dir=_kv_cache_dir())
    except (SpecError, StoreError, EngineError, ValueError, OSError, json.JSONDecodeError) as e:
        print(f"kubeflash engine: error: {e}", file=sys.stderr)
        return 1
    if "skipped" not in report:
        print(format_report(report))
        write_report(report, job_dir / "report.json")
    if args.output_dir:
        from kubeflash_api.names import resolve_within

        from ..store.format import atomic_write_bytes

        root = Path(args.output_dir)  # the output claim's root
        dest = resolve_within(root, spec.output.path or f"{spec.name}.results.jsonl", "spec.output.path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, output.read_bytes())
    return 0


def _job_spec_json(name: str):
    """The job's canonical spec from environment variable `name`; ValueError naming the variable if not JSON."""
    raw = _env(name)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"environment variable {name}: not JSON ({e}); expected the job's canonical spec "
                         "(kubeflash_api.to_canonical) as JSON, as the operator sets it") from None


def _run_ranks(spec, *, model_dir: Path, manifest, output: Path, device: str, job_dir: Path) -> dict:
    """spec.offload.tensorParallel N: N rank processes over the shards the agent staged on each pair's disk."""
    from kubeflash_api import contract as c

    from ..store.modelconfig import ModelConfig
    from .tplaunch import check_job, check_request, run_tp

    world, field = spec.offload.tensor_parallel, "spec.offload.tensorParallel"
    shards = _dirs(c.ENV_SHARD_DIRS, world, required=True)
    rings, ranks = _dirs(c.ENV_RING_DIRS, world), _dirs(c.ENV_RANK_DIRS, world)
    reduce = check_request(world, reduce="ring" if rings else "auto", ring_dirs=rings, device=device, field=field)
    check_job(spec, ModelConfig.from_dict(manifest.config), world, field=field)
    return run_tp(spec, world=world, reduce=reduce, ring_dirs=rings, model_dir=model_dir, manifest=manifest,
                  output=output, device=device, job_dir=job_dir, quiet=True, shard_dirs=shards, rank_dirs=ranks)


def _dirs(name: str, world: int, *, required: bool = False) -> list[Path] | None:
    """One directory per rank from an os.pathsep-separated environment variable; None when unset and optional."""
    raw = os.environ.get(name, "")
    if not raw:
        if required:
            raise ValueError(f"environment variable {name} is required with spec.offload.tensorParallel {world} "
                             f"(one shard directory per rank, separated by {os.pathsep!r})")
        return None
    dirs = [Path(p) for p in raw.split(os.pathsep)]
    if len(dirs) != world or not all(str(p) for p in dirs):
        raise ValueError(f"environment variable {name}: {len(dirs)} entries, expected one directory per rank "
                         f"({world}, separated by {os.pathsep!r})")
    return dirs


def _kv_cache_dir() -> Path | None:
    """The node's prefix KV cache directory, when the runner mounted one (docs/contract.md)."""
    from ..store.kvblocks import ENV_KV_CACHE_DIR

    return Path(os.environ[ENV_KV_CACHE_DIR]) if os.environ.get(ENV_KV_CACHE_DIR) else None
