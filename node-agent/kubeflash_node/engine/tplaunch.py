"""`kubeflash run` with spec.offload.tensorParallel N (or --tensor-parallel N): N rank processes on this machine.

The parent checks the split (engine/tensorparallel.plan) and the options before anything starts, cuts the store
into N shard stores once (store/tpshards.ensure_shards, kept beside the store entry), then starts N processes
(spawned, so no torch state is forked). Rank r streams only its own shard and sums its partial outputs with the
others through torch.distributed (gloo on CPU; NCCL is the GPU backend) or the SSD ring (engine/ssdring.py, one
directory per rank). Every rank runs the same prompts, so the reductions pair up and every rank samples the same
tokens; rank 0 alone writes the job's results.jsonl, progress.json and KV files, exactly where and as a
single-process run does (same fingerprints, so a run resumes across N). Ranks 1..N-1 keep their progress and KV
files under <job dir>/tp/rank<R>/.

A rank that fails or dies (kill -9) fails the run: the parent notices within a poll, stops the other ranks
(SIGTERM, which ends them through their normal error path, then SIGKILL), and reports the rank by number and pid.
Rank 0's results lines are whole (each is written, flushed and fsynced before the next step); a rerun resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from ..store.format import atomic_write_json

REDUCES = ("auto", "gloo", "ring", "nccl")
COLLECTIVE_TIMEOUT_S = 120.0  # longest wait of one reduction for a peer (gloo's group timeout, the ring's)
STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL


class TPLaunchError(ValueError):
    """Tensor parallelism cannot run as asked; one line naming the field or option and what is expected."""


def check_request(world: int, *, reduce: str, ring_dirs: list[Path] | None, device: str, field: str) -> str:
    """The reduction backend for `world` ranks on `device` (auto: gloo on CPU, nccl on GPUs); refuses, before the
    model is touched, what cannot run here. `field` names where N came from."""
    if reduce not in REDUCES:
        raise TPLaunchError(f"--reduce {reduce}: expected one of {', '.join(REDUCES)}")
    gpu = device.startswith("cuda")
    if world == 1:
        if ring_dirs:
            raise TPLaunchError(f"--ring-dir needs tensor parallelism ({field} is 1)")
        return "none"
    if reduce == "auto":
        reduce = "nccl" if gpu else "gloo"
    if reduce == "nccl" and not gpu:
        raise TPLaunchError(f"--reduce nccl: NCCL is the GPU backend and needs CUDA GPUs (device {device}; none "
                            "usable here); on CPU use --reduce gloo or --reduce ring")
    if reduce == "gloo" and gpu:
        raise TPLaunchError(f"--reduce gloo on {device}: use --reduce nccl (or ring) for GPU tensors")
    if gpu:
        import torch

        if torch.cuda.device_count() < world:
            raise TPLaunchError(f"{field} {world}: needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    if ring_dirs and reduce != "ring":
        raise TPLaunchError(f"--ring-dir needs --reduce ring (got --reduce {reduce})")
    if ring_dirs and len(ring_dirs) != world:
        raise TPLaunchError(f"--ring-dir given {len(ring_dirs)} times; expected one per rank ({world})")
    return reduce


def check_job(spec, config, world: int, *, field: str) -> None:
    """Refuse a model or an option tensor parallelism does not split, naming the numbers or the field."""
    from .tensorparallel import TensorParallelError, plan

    o = spec.offload
    unsupported = [(o.sparsity is not None, "spec.offload.sparsity (activation sparsity is not split across ranks)"),
                   (spec.model.quantization != "none",
                    f"spec.model.quantization {spec.model.quantization} (quantized stores are not sharded)"),
                   (spec.cache.prefix, "spec.cache.prefix (the node's prefix cache holds whole-model KV blocks)"),
                   (o.x_cache, "spec.offload.xCache (not checked with split layers yet)"),
                   (o.cpu_attention, "spec.offload.cpuAttention (not checked with split layers yet)"),
                   (o.kv_write_back, "spec.offload.kvWriteBack (not checked with split layers yet)")]
    for bad, what in unsupported:
        if bad:
            raise TPLaunchError(f"{field} {world}: {what}; run it with tensorParallel 1")
    try:
        plan(config, 0, world)
    except TensorParallelError as e:
        raise TPLaunchError(f"{field} {world}: {e} (model: num_heads {config.num_heads}, num_kv_heads "
                            f"{config.num_kv_heads}, intermediate_size {config.intermediate_size})") from None


@dataclass(frozen=True)
class RankArgs:
    """Everything one rank process needs (pickled to it: the parsed spec, never re-parsed)."""

    rank: int
    world: int
    spec: object  # kubeflash_api.JobSpec; ranks > 0 hold only the prompts rank 0 still has to run
    model_dir: Path  # the whole store: tokenizer and manifest (fingerprints identical to one process)
    manifest: object
    shard_dir: Path
    output: Path
    job_dir: Path
    device: str
    reduce: str
    init_method: str
    ring_dirs: tuple[Path, ...]
    session: str
    threads: int
    quiet: bool
    timeout_s: float


def run_tp(spec, *, world: int, reduce: str, ring_dirs: list[Path] | None, model_dir: Path, manifest,
           output: Path, device: str, job_dir: Path, quiet: bool, timeout_s: float = COLLECTIVE_TIMEOUT_S,
           shard_dirs: list[Path] | None = None, rank_dirs: list[Path] | None = None) -> dict:
    """Run the job over `world` rank processes; returns rank 0's report (as run_job's) with a tensor_parallel
    entry. Raises TPLaunchError naming the rank when one fails or dies. `shard_dirs`: shards already staged (the
    pod: each on its pair's disk, staged by the node agent), checked, never written; default: cut beside the
    store entry. `rank_dirs`: where ranks 1..N-1 keep progress and KV files (default <job dir>/tp/rank<R>)."""
    import torch.multiprocessing as mp

    from ..store.tpshards import ensure_shards
    from .results import ResultsFile, fingerprints

    if shard_dirs is not None:
        shards = [Path(d) for d in shard_dirs]
        check_shard_dirs(model_dir, shards, world)
    else:
        shards = ensure_shards(model_dir, world, progress=None if quiet else _shard_progress)
    tp_dir = Path(job_dir) / "tp"
    tp_dir.mkdir(parents=True, exist_ok=True)
    rings = tuple(Path(d) for d in ring_dirs) if ring_dirs else tuple(tp_dir / f"ring{r}" for r in range(world))
    if reduce == "ring":
        _check_ring_dirs(rings)
    # ranks > 0 run exactly the prompts rank 0 will run (the ones without a matching result in `output`)
    done = ResultsFile(output, fingerprints(spec, manifest=manifest, device=device), model=spec.model.uri).done
    rest = replace(spec, input=replace(spec.input, prompts=tuple(p for p in spec.input.prompts if p.id not in done)))
    session = uuid.uuid4().hex[:12]
    rendezvous = tp_dir / f"rendezvous-{session}"
    threads = max(1, ((os.cpu_count() or 2) - 1) // world)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = []
    for r in range(world):
        rank_dir = Path(job_dir) if r == 0 else Path(rank_dirs[r]) if rank_dirs else tp_dir / f"rank{r}"
        rank_out = output if r == 0 else rank_dir / "results.jsonl"
        if r:
            rank_dir.mkdir(parents=True, exist_ok=True)
            rank_out.unlink(missing_ok=True)  # a killed run's lines would make this rank skip prompts
        a = RankArgs(rank=r, world=world, spec=spec if r == 0 else rest, model_dir=Path(model_dir), manifest=manifest,
                     shard_dir=shards[r], output=rank_out, job_dir=rank_dir,
                     device=f"cuda:{r}" if device.startswith("cuda") else device, reduce=reduce,
                     init_method=rendezvous.resolve().as_uri(), ring_dirs=rings, session=session, threads=threads,
                     quiet=quiet, timeout_s=timeout_s)
        procs.append(ctx.Process(target=_rank_main, args=(a, q), name=f"kubeflash-tp-rank{r}", daemon=False))
    try:
        for p in procs:
            p.start()
        _write_ranks(tp_dir / "ranks.json", procs, session)
        report = _wait(procs, q, output)
    finally:
        _stop(procs)
        rendezvous.unlink(missing_ok=True)
        if reduce == "ring":
            from .ssdring import clear

            for d in rings:
                clear(d, session)
    report["tensor_parallel"] = {"ranks": world, "reduce": reduce, "shards": [str(s) for s in shards],
                                 **({"ring_dirs": [str(d) for d in rings]} if reduce == "ring" else {})}
    return report


def _check_ring_dirs(rings: tuple[Path, ...]) -> None:
    """Make each rank's ring directory and check that it takes a file, before any rank starts; TPLaunchError
    naming the rank and the directory otherwise (a full disk is found at the first write, naming the file)."""
    from .ssdring import SSDRingError, check_dir

    for r, d in enumerate(rings):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TPLaunchError(f"rank {r}'s ring directory {d} cannot be made ({e.strerror or e})") from None
        try:
            check_dir(r, d)
        except SSDRingError as e:
            raise TPLaunchError(str(e)) from None


def check_shard_dirs(model_dir: Path, shards: list[Path], world: int) -> None:
    """Staged shards, one per rank: each a verified store holding that rank's slice, cut from `model_dir` as it
    is now; TPLaunchError naming the rank and the directory otherwise."""
    from ..store.format import StoreError
    from ..store.tpshards import check_shard

    if len(shards) != world:
        raise TPLaunchError(f"{len(shards)} shard directories for {world} ranks; expected one per rank")
    for r, d in enumerate(shards):
        if not (Path(d) / "manifest.json").is_file():
            raise TPLaunchError(f"rank {r}: shard {d} is missing (no manifest.json): the node agent stages shard {r} "
                                f"on pair {r}'s disk (FlashNode spec.models[].tensorParallel)")
        try:
            check_shard(Path(d), model_dir=Path(model_dir), rank=r, world=world)
        except StoreError as e:
            raise TPLaunchError(f"rank {r}: {e}") from None


def _shard_progress(done: int, total: int, stage: str) -> None:
    print(f"\rsharding the store: {done}/{total} stages ({stage})", end="\n" if done == total else "",
          file=sys.stderr, flush=True)


def _write_ranks(path: Path, procs, session: str) -> None:
    """<job dir>/tp/ranks.json: each rank's pid, for an operator who wants to see (or stop) one."""
    atomic_write_json(path, {"session": session, "pids": [p.pid for p in procs]})


def _wait(procs, q, output: Path) -> dict:
    """Rank 0's report once every rank exited 0; TPLaunchError naming the first rank that failed otherwise."""
    import queue

    errors: dict[int, str] = {}
    report = None
    while True:
        try:
            msg = q.get(timeout=0.05)
            if msg[0] == "report":
                report = msg[1]
            else:
                errors[msg[1]] = msg[2]
            continue  # drain before looking at exit codes: a rank's message precedes its exit
        except queue.Empty:
            pass
        codes = [p.exitcode for p in procs]
        if all(c == 0 for c in codes):
            while report is None:  # rank 0 flushed its report before exiting; it may still be in the pipe
                try:
                    msg = q.get(timeout=5)
                except queue.Empty:
                    raise TPLaunchError("rank 0 exited without a report") from None
                report = msg[1] if msg[0] == "report" else None
            return report
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]  # before the launcher stops the others
        if failed:
            _stop(procs)
            while True:  # the others' messages, now that they stopped
                try:
                    msg = q.get(timeout=0.2)
                except queue.Empty:
                    break
                if msg[0] == "error":
                    errors[msg[1]] = msg[2]
            raise TPLaunchError(_failure(procs, codes, errors, output))


def _failure(procs, codes, errors: dict[int, str], output: Path) -> str:
    """One line: the rank that died by a signal (the cause) before any rank that failed because a peer vanished."""
    killed = [r for r, c in enumerate(codes) if c is not None and c < 0 and r not in errors]
    after = f"; the other ranks were stopped; results written so far are in {output} (a rerun resumes)"
    if killed:
        r = killed[0]
        name = signal.Signals(-codes[r]).name if -codes[r] in signal.Signals._value2member_map_ else str(-codes[r])
        return f"rank {r} (pid {procs[r].pid}) was killed by {name}{after}"
    if errors:  # a rank that failed on its own, not one the launcher stopped because of it
        first = [r for r in sorted(errors) if codes[r] not in (None, 0)]
        r = first[0] if first else min(errors)
        return f"rank {r} (pid {procs[r].pid}) failed: {errors[r]}{after}"
    r = next(r for r, c in enumerate(codes) if c not in (None, 0))
    return f"rank {r} (pid {procs[r].pid}) exited with status {codes[r]}{after}"


def _stop(procs) -> None:
    """SIGTERM every live rank, then SIGKILL what is still there after STOP_GRACE_S."""
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            p.terminate()
    end = time.monotonic() + STOP_GRACE_S
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, end - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()


# ------------------------------------------------------------------------------------------------ one rank


class _Stopped(Exception):
    pass


def _on_term(signum, frame):
    raise _Stopped("stopped by the launcher (another rank failed)")


def _rank_main(a: RankArgs, q) -> None:
    """One rank: join the group (or the ring), run the job on this rank's shard, hand rank 0's report back."""
    signal.signal(signal.SIGTERM, _on_term)
    import torch
    import torch.distributed as dist

    from .job import run_job
    from .ssdring import RingConfig, SSDRing
    from .tensorparallel import TPEngine, gloo_reduce, ring_reduce

    try:
        torch.set_num_threads(a.threads)
        if a.reduce == "ring":
            reduce = ring_reduce(SSDRing(a.rank, RingConfig(dirs=a.ring_dirs, session=a.session,
                                                            timeout_s=a.timeout_s)))
        else:
            from datetime import timedelta

            if a.device.startswith("cuda"):
                torch.cuda.set_device(torch.device(a.device))
            dist.init_process_group(a.reduce, init_method=a.init_method, rank=a.rank, world_size=a.world,
                                    timeout=timedelta(seconds=a.timeout_s))
            reduce = gloo_reduce

        def engine(_model_dir, **kw):
            return TPEngine(a.shard_dir, rank=a.rank, world=a.world, reduce=reduce, **kw)

        bar = None
        if a.rank == 0 and not a.quiet:
            from .cli_run import _TokenBar

            bar = _TokenBar(len(a.spec.input.prompts), enabled=True)
        report = run_job(a.spec, model_dir=a.model_dir, manifest=a.manifest, output=a.output, device=a.device,
                         job_dir=a.job_dir, engine_factory=engine, on_tokens=bar.tokens if bar else None,
                         on_prompts=bar.prompts if bar else None)
        if bar:
            bar.close()
        if a.rank == 0:
            q.put(("report", report))
    except BaseException as e:  # noqa: BLE001 (every failure is reported to the launcher, then the exit says it)
        q.put(("error", a.rank, (str(e) or type(e).__name__).splitlines()[0][:400]))
        q.close()
        q.join_thread()
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    q.close()
    q.join_thread()
