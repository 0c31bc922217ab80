"""`kubeflash convert SOURCE --out DIR`: write a model into the on-SSD layer store format."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="builtin:smollm2-135m, dummy:<preset> (e.g. dummy:llama-3-8b; dummy:<preset>@zeros: "
                                  "all-zero weights in sparse files), a .gguf file, "
                                  "a Hugging Face directory with config.json and *.safetensors, or a converted "
                                  "float store directory (to quantize it)")
    p.add_argument("--out", type=Path, help="model directory to create (published atomically); required with SOURCE")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored weights (default: float16)")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                   help="group-wise quantization (--quant-group inputs a scale) of the layers' big matrices "
                        "(default: none)")
    p.add_argument("--symmetric", action="store_true", help="symmetric quantization (no zero points)")
    p.add_argument("--quant-group", type=int, default=None,
                   help="inputs per quantization scale, an even number >= 2 (default 64); with --quantization only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--verify", action="store_true", help="re-read every file and check its sha256 afterwards")
    p.add_argument("--list-presets", action="store_true", help="print the dummy presets and exit")


def main(args: argparse.Namespace) -> int:
    from .cache import _bar
    from .convert import convert
    from .format import NoSpaceError, StoreError, verify
    from .modelconfig import PRESETS
    from .scratch import EntryBusy, entry_lock, remove_empty
    from .uris import check_scheme

    if args.list_presets:
        for name, c in PRESETS.items():
            moe = f", {c.num_experts} experts (top {c.num_experts_per_tok})" if c.num_experts else ""
            print(f"{name:14s} {c.family or c.architecture:11s} {c.total_params() / 1e9:7.2f} B params  "
                  f"{c.num_layers} layers{moe}")
        return 0
    if not args.source or not args.out:
        print("kubeflash convert: error: SOURCE and --out DIR are required (or --list-presets)", file=sys.stderr)
        return 2
    try:
        check_scheme(args.source, field="SOURCE")
        _check_options(args)
    except ValueError as e:
        print(f"kubeflash convert: error: {e}", file=sys.stderr)
        return 1
    bar = _bar(f"converting {args.source}", sys.stderr.isatty() or True)
    created: list[Path] = []  # folders above --out this command made (for its lock), removed if left empty
    try:
        _make_parents(Path(args.out), created)
        with entry_lock(Path(args.out), wait=False):  # held to the end: a second convert to --out is refused
            manifest = convert(args.source, args.out, dtype=args.dtype, quantization=args.quantization,
                               symmetric=args.symmetric, group=args.quant_group or 64, overwrite=args.overwrite,
                               progress=bar)
        created = []
        bar.close()
        if args.verify:
            verify(args.out, manifest)
    except EntryBusy as e:  # said at once, before torch is imported
        bar.close()
        print(f"kubeflash convert: error: --out {args.out}: another kubeflash convert is writing it now (it holds "
              f"{e.lock}); expected one convert per --out: wait for that one to end, or choose another --out",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the bar's line ends before the command's last word
        bar.close()
        raise
    except NoSpaceError as e:  # said before anything is written
        bar.close()
        print(f"kubeflash convert: error: --out {args.out}: {e}", file=sys.stderr)
        return 1
    except (StoreError, ValueError) as e:
        bar.close()
        print(f"kubeflash convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # --out in a folder that cannot be created or written, or a disk that filled meanwhile
        bar.close()
        room = e.errno in (errno.ENOSPC, errno.EDQUOT)
        print(f"kubeflash convert: error: --out {args.out}: {e.strerror or e} ({e.filename or args.out}); "
              f"expected {'a folder with room for the model' if room else 'a new directory in a writable folder'}"
              "; nothing was published", file=sys.stderr)
        return 1
    finally:
        remove_empty(created)  # a refused or stopped convert leaves no folder it made
    q = manifest.extra.get("quant")
    qs = f" + int{q['bits']} matrices (group {q['group']}{', symmetric' if q['symmetric'] else ''})" if q else ""
    family = manifest.config.get("family") or manifest.architecture  # config.json's model_type, as presets list it
    print(f"{args.out}: {family}, {manifest.num_layers} layers, {manifest.dtype}{qs}, "
          f"{manifest.total_bytes / 2**30:.3f} GiB, tokenizer: {manifest.tokenizer or 'none'}")
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Flags that would be ignored or fail late are refused before any work, naming the flag."""
    if args.quant_group is not None:
        if args.quantization == "none":
            raise ValueError(f"--quant-group {args.quant_group}: applies only with --quantization int8 or int4 "
                             "(this conversion stores unquantized weights)")
        if args.quant_group < 2 or args.quant_group % 2:
            raise ValueError(f"--quant-group {args.quant_group}: expected an even number >= 2")
    if args.symmetric and args.quantization == "none":
        raise ValueError("--symmetric: applies only with --quantization int8 or int4")
    if Path(args.out).exists() and not args.overwrite:  # said before torch is imported, not after (ModelWriter)
        raise ValueError(f"--out {args.out}: already exists (pass --overwrite to replace a model kubeflash convert "
                         "wrote); expected a new directory")
    for folder in Path(args.out).parents:
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {args.out}: {folder} is a file; expected a new directory in a folder")
            break



def _make_parents(out: Path, made: list[Path]) -> None:
    """Create the folders above `out` that are missing (its lock file lives beside it), appending each to `made`
    (outermost first) as it is made."""
    for d in reversed(out.parents):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        made.append(d)
