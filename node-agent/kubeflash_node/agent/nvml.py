"""GPUs as NVML reports them (pynvml, from the nvidia-ml-py package); none where NVML is missing.

Kept apart so discovery runs on machines without a driver: every NVML failure means "no GPUs here".
"""

from __future__ import annotations

import logging

from .config import GpuSpec

log = logging.getLogger(__name__)


def list_gpus() -> list[GpuSpec]:
    """Index, name, UUID, memory and PCI bus id of each GPU; [] without pynvml or a driver."""
    try:
        import pynvml
    except ImportError:
        log.info("pynvml is not installed; no GPUs discovered")
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        log.info("NVML unavailable; no GPUs discovered", extra={"error": str(e)})
        return []
    try:
        return [_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as e:
        log.warning("NVML query failed; no GPUs discovered", extra={"error": str(e)})
        return []
    finally:
        pynvml.nvmlShutdown()


def _gpu(pynvml, i: int) -> GpuSpec:
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    pci = pynvml.nvmlDeviceGetPciInfo(h)
    bus = pci.busId.decode() if isinstance(pci.busId, bytes) else str(pci.busId)
    name = pynvml.nvmlDeviceGetName(h)
    uuid = pynvml.nvmlDeviceGetUUID(h)
    return GpuSpec(index=i, name=name.decode() if isinstance(name, bytes) else str(name),
                   uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                   memory=int(pynvml.nvmlDeviceGetMemoryInfo(h).total), pci_bus_id=bus)
