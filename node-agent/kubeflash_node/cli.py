"""The one `kubeflash` command: subcommands are registered by module path and imported only when used.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int`` and imports nothing heavy
(torch, kopf, kubernetes) at module level, so `kubeflash operator` runs in an image without torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kubeflash_node.engine.cli_run", "run an InferenceJob manifest on this machine, no cluster needed"),
    "convert": ("kubeflash_node.store.cli", "convert a model (HF dir, GGUF file, builtin:, dummy:) into the layer store"),
    "bench": ("kubeflash_node.engine.cli_bench", "measure this machine's ceilings and a workload against its roofline"),
    "calibrate": ("kubeflash_node.engine.cli_calibrate",
                  "calibrate a model's activation-sparsity thresholds from text (for spec.offload.sparsity)"),
    "plan": ("kubeflash_node.engine.cli_plan", "pick a job's offload policy with the cost model from measured ceilings"),
    "engine": ("kubeflash_node.engine.cli_pod", "the inference pod's entry point (reads the job the operator mounted)"),
    "merge": ("kubeflash_node.engine.cli_merge",
              "the merge pod of a spec.parallelism job: join its shards' part files on the claim in input order"),
    "agent": ("kubeflash_node.agent.cli", "the node agent DaemonSet: pairing, model staging, KV space, progress relay"),
    "csi": ("kubeflash_node.csi.cli", "the CSI node plugin (driver kubeflash.io): model, KV and job volumes for pods"),
    "operator": ("kubeflash_operator.cli", "the kopf operator that places InferenceJobs on GPU<->SSD pairs"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only the chosen subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="kubeflash",
        description="SSD-native LLM inference: weights stream layer by layer from the SSD into the GPU.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:  # its --help shows the module's own account of what it does (env, files, defaults)
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            if p.description == help_text:  # unless add_arguments wrote its own
                p.formatter_class, p.description = argparse.RawDescriptionHelpFormatter, mod.__doc__ or help_text
            parser.set_defaults(_subparser=p)
    return parser


def _version() -> str:
    from kubeflash_node import __version__

    return f"kubeflash {__version__}"


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if a in SUBCOMMANDS), None)


def _check_device(args: argparse.Namespace) -> None:
    """A subcommand's --device is refused here, before its module imports torch (exit 2, argparse's usage error)."""
    if not hasattr(args, "device"):
        return
    from kubeflash_node.engine.devices import device_syntax_error

    error = device_syntax_error(args.device)
    if error:
        args._subparser.error(error)


# PyTorch's CUDA caching allocator in expandable segments: a segment grows in place (2 MiB pages mapped into one
# virtual range) instead of a new cudaMalloc per size class, so memory freed by one stage's tensors serves the next
# stage's of another size. With the default, a 35:20 opt-13b plan ran out of a 12 GiB cap at 10.46 GiB allocated plus
# 1.46 GiB reserved but unallocated (docs/benchmarks.md, "Session 11 on one H100"); the cost model counts tensors and a
# fixed reserve (Calibration.gpu_reserve_bytes), not fragmentation. Read by torch when CUDA's allocator starts.
ALLOC_CONF = "expandable_segments:True"


def set_allocator_env(env=os.environ) -> None:
    """Give engine processes (and the processes they start: tensor-parallel ranks) ALLOC_CONF, before torch is
    imported; a value the user set under either name (PYTORCH_ALLOC_CONF, PYTORCH_CUDA_ALLOC_CONF) is kept."""
    if not any(k in env for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    set_allocator_env()
    chosen = _chosen(argv)
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _check_device(args)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    signal.signal(signal.SIGTERM, _terminated)  # `kill` ends a run like Ctrl-C: progress.json says failed, results stay
    try:
        return int(module.main(args) or 0)
    except Terminated:
        print(f"terminated (SIGTERM){_AFTER_STOP.get(args.command, '')}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"interrupted{_AFTER_STOP.get(args.command, '')}", file=sys.stderr)
        return 130


# what a stopped command leaves: run and engine keep each finished prompt's result; convert publishes nothing
_AFTER_STOP = {"run": "; finished results are kept, a re-run resumes",
               "engine": "; finished results are kept, a re-run resumes",
               "convert": "; nothing was published (a re-run converts anew)"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so the same clean-up as Ctrl-C runs."""


def _terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
