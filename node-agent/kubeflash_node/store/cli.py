"""`kubeflash convert SOURCE --out DIR`: write a model into the on-SSD layer store format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="builtin:smollm2-135m, dummy:<preset> (e.g. dummy:llama-3-8b), a .gguf file, "
                                  "or a Hugging Face directory with config.json and *.safetensors")
    p.add_argument("--out", required=True, type=Path, help="model directory to create (published atomically)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored weights (default: float16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--verify", action="store_true", help="re-read every file and check its sha256 afterwards")
    p.add_argument("--list-presets", action="store_true", help="print the dummy presets and exit")


def main(args: argparse.Namespace) -> int:
    from ..engine.config import PRESETS
    from .cache import _bar
    from .convert import convert
    from .format import StoreError, verify

    if args.list_presets:
        for name, c in PRESETS.items():
            print(f"{name:14s} {c.architecture:6s} {c.total_params() / 1e9:7.2f} B params  {c.num_layers} layers")
        return 0
    bar = _bar(f"converting {args.source}", sys.stderr.isatty() or True)
    try:
        manifest = convert(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=bar)
        bar.close()
        if args.verify:
            verify(args.out, manifest)
    except (StoreError, ValueError) as e:
        bar.close()
        print(f"kubeflash convert: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {manifest.architecture}, {manifest.num_layers} layers, {manifest.dtype}, "
          f"{manifest.total_bytes / 2**30:.3f} GiB, tokenizer: {manifest.tokenizer or 'none'}")
    return 0
