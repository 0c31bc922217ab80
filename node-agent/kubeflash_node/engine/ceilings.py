"""The machine's measured ceilings (disk, PCIe, GPU matmul) as one dataclass, and the one reader of their JSON.

Kept apart from bench.py, which measures them and imports torch: the cost model, `kubeflash plan` and the pure
unit tests read ceilings without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Ceilings:
    """Measured bandwidths (GB/s, 1e9 bytes) and matmul rate (TFLOP/s)."""

    disk_read_cold: float = 0.0
    disk_read_warm: float = 0.0
    disk_write: float = 0.0
    h2d_pinned: float = 0.0
    h2d_pageable: float = 0.0
    d2h_pinned: float = 0.0
    matmul_tflops: float = 0.0
    disk_read_threads: int = 0
    disk_read_task_bytes: int = 0
    disk_probe_bytes: int = 0
    disk_read_op_s: float = 0.0  # seconds a small read adds on top of its bytes, cold (measure_read_op; 0: not measured)

    def to_dict(self) -> dict:
        return asdict(self)

    def unmeasured(self) -> dict[str, str]:
        """The ceilings a plan or a roofline needs that are 0 (not measured), each with what measures it."""
        need = {"disk_read_cold": "the disk probe (kubeflash bench)",
                "h2d_pinned": "a CUDA GPU (PCIe host-to-device copies)", "matmul_tflops": "a CUDA GPU (fp16 matmul)"}
        return {k: why for k, why in need.items() if not getattr(self, k)}

    @classmethod
    def load(cls, path: Path) -> "Ceilings":
        """Read ceilings JSON: `kubeflash bench --ceilings-only --json` output, a bench result holding a
        'ceilings' key, or the bare fields (unknown keys ignored)."""
        if not Path(path).is_file():  # a named pipe would block the read
            raise ValueError(f"{path}: {'is not a regular file' if Path(path).exists() else 'no such file'}; "
                             "expected the output of kubeflash bench --ceilings-only --json")
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not JSON ({e}); expected the output of kubeflash bench --ceilings-only --json") from None
        d = d.get("ceilings", d) if isinstance(d, dict) else None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of ceilings (disk_read_cold, h2d_pinned, …)")
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k, v in fields.items():  # a string or a negative rate would only fail later, in a formula or a format
            whole = cls.__dataclass_fields__[k].type == "int"
            if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"{path}: {k} = {v!r}; expected {'an integer' if whole else 'a number'} >= 0, "
                                 "as kubeflash bench --ceilings-only --json writes it")
        return cls(**fields)
