"""argparse types for the engine's subcommands: sizes, file paths, bounded integers and percentages.

A bad value is refused by argparse itself (`kubeflash bench: error: argument --prompts: must be an integer >= 1,
got '0'`), at parse time, before a subcommand imports torch.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from .memory import parse_size


def size(text: str) -> int:
    """A byte size such as 12GiB, 64G or 500MiB."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_size(text: str) -> int:
    n = size(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a size above 0, got {text!r}")
    return n


def file_path(text: str) -> Path:
    """A path naming a file: 'out/' (a folder, whose slash Path would drop) is refused."""
    if text.endswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r} ends in '/'; expected the path of a file")
    return Path(text)


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in lo..hi (hi: no upper bound when None)."""
    want = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return n
    return parse


def percent(text: str) -> float:
    """A percentage in 0..100."""
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not 0 <= x <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage in 0..100, got {text!r}")
    return x
