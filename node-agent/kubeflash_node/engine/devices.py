"""The compute device a user names with `--device`: auto, cpu, cuda or cuda:N.

The syntax is checked without torch (`kubeflash` refuses a bad value before importing it); the index of
cuda:N is checked against the CUDA devices present when the device is resolved.
"""

from __future__ import annotations

import re

_DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?")


def device_syntax_error(value: str) -> str | None:
    """None when `value` is auto, cpu, cuda or cuda:N (N a non-negative integer); else the error to print."""
    if isinstance(value, str) and _DEVICE.fullmatch(value):
        return None
    return f"--device must be auto, cpu, cuda or cuda:N, got {value!r}"


def check_device(name: str) -> None:
    """Raise ValueError for a bad --device: wrong syntax, or cuda:N beyond the CUDA devices of this machine
    (torch is imported only for cuda:N)."""
    error = device_syntax_error(name)
    if error:
        raise ValueError(error)
    if name.startswith("cuda:"):
        import torch

        n, index = torch.cuda.device_count(), int(name.split(":", 1)[1])
        if n and index >= n:
            raise ValueError(f"--device {name}: this machine has {n} CUDA device{'s' if n > 1 else ''} "
                             f"(cuda:0{f' .. cuda:{n - 1}' if n > 1 else ''})")
