"""bench.Ceilings' fields for the pure cost-model tests (tests/unit/test_costmodel*.py): bench imports torch, and
these tests stay free of it. Each test file builds its machine from its own values, keyword by keyword, and varies
one with dataclasses.replace."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ceil:
    """Measured bandwidths (GB/s, 1e9 bytes) and matmul rate (TFLOP/s), as bench.Ceilings names them; the fields the
    cost model always reads are required, the rest are 0 (not measured) unless given."""

    disk_read_cold: float
    disk_read_warm: float
    disk_write: float
    h2d_pinned: float
    matmul_tflops: float
    h2d_pageable: float = 0.0
    d2h_pinned: float = 0.0
    disk_read_threads: int = 0
    disk_read_task_bytes: int = 0
    disk_probe_bytes: int = 0
    disk_read_op_s: float = 0.0

    @classmethod
    def load(cls, path: Path) -> "Ceil":
        """A ceilings.json that `kubeflash bench --ceilings-only --json` wrote (a field this class lacks: TypeError)."""
        return cls(**json.loads(Path(path).read_text()))
