"""What the automatic policy plans against: measured ceilings and memory budgets, from the agent's probe in a pod
or `kubeflash bench` on one machine, shrunk to spec.resources.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kubeflash_api import JobSpec


@dataclass(frozen=True)
class Machine:
    """What the automatic policy plans against: measured ceilings (bench.Ceilings) and memory budgets (bytes)."""

    ceilings: object
    gpu_bytes: int
    cpu_bytes: int


def probe_ceilings(probe: dict, measured: dict):
    """bench.Ceilings for an inference pod: the node agent's probe of the placed pair (KUBEFLASH_PROBE:
    diskReadGBps, diskWriteGBps, h2dGBps), completed by what the pod measured itself (`measured`: bench's keys,
    PCIe and matmul always, the disk when the agent had not). Without a page-cache figure the warm disk rate is
    taken as the cold one (no help from the page cache is assumed)."""
    from .bench import Ceilings

    c = Ceilings(**{k: v for k, v in measured.items() if k in Ceilings.__dataclass_fields__})
    named = {"diskReadGBps": "disk_read_cold", "diskWriteGBps": "disk_write", "h2dGBps": "h2d_pinned"}
    for key, value in probe.items():
        if key not in named:
            raise ValueError(f"KUBEFLASH_PROBE: unknown key {key!r}; expected {', '.join(named)}")
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"KUBEFLASH_PROBE.{key} must be a positive number of GB/s, got {value!r}")
        setattr(c, named[key], float(value))
    if "disk_read_warm" not in measured:
        c.disk_read_warm = c.disk_read_cold
    return c


def pod_machine(probe_env: str | None, scratch: Path) -> Machine:
    """The Machine an inference pod plans `policy: auto` against on a GPU: the agent's probe (measuring the
    disk under `scratch` only if the agent did not), PCIe and matmul measured here (~1 s), the GPU's memory and
    the host memory left to the pod (its cgroup limit or MemAvailable, the smaller)."""
    import json

    from .bench import measure_disk, measure_matmul, measure_pcie
    from .memory import gpu_total, mem_available

    try:
        probe = json.loads(probe_env) if probe_env else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"KUBEFLASH_PROBE is not JSON ({e}): the operator writes it from the FlashNode") from None
    if not isinstance(probe, dict):
        raise ValueError("KUBEFLASH_PROBE must be a JSON object")
    measured = measure_pcie(256 << 20) | measure_matmul(4096)
    if not probe.get("diskReadGBps") or not probe.get("diskWriteGBps"):
        measured |= measure_disk(scratch, 256 << 20, thread_options=(8,))
    cpu = mem_available()
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and limit.read_text().strip().isdigit():
        cpu = min(cpu, int(limit.read_text()))
    return Machine(probe_ceilings(probe, measured), gpu_total(), cpu)


def within_resources(spec: JobSpec, machine: Machine | None, device: str) -> Machine | None:
    """Apply spec.resources.gpuMemory / cpuMemory: the plan's budgets shrink to them, and on a GPU the caching
    allocator is capped at gpuMemory (an allocation beyond it fails as out of memory)."""
    r = spec.resources
    if r.gpu_memory and device.startswith("cuda"):
        from .memory import cap_gpu_allocator

        cap_gpu_allocator(r.gpu_memory, device)
    if machine is None:
        return None
    return replace(machine, gpu_bytes=min(machine.gpu_bytes, r.gpu_memory or machine.gpu_bytes),
                   cpu_bytes=min(machine.cpu_bytes, r.cpu_memory or machine.cpu_bytes))
