"""The operator's one configuration object, built once at the edge (CLI flags or environment)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

from kubeflash_api import SpecError
from kubeflash_api.quantity import parse_quantity
from kubeflash_operator.builder import DEFAULT_IMAGE, PodLimits

ENV_PREFIX = "KUBEFLASH_OPERATOR_"
ENGINE_DEVICES = ("auto", "cpu", "cuda")  # the engine's --device / $KUBEFLASH_DEVICE (cuda:<n> also accepted)
NORMAL_EVENTS = ("detours", "all")  # which steps' Normal news becomes an Event (warnings always do)
_CPU = re.compile(r"[0-9]+(\.[0-9]+)?m?")  # Kubernetes CPU quantities: 2, 0.5, 500m


@dataclass(frozen=True)
class OperatorConfig:
    engine_image: str = DEFAULT_IMAGE  # image of the inference pods unless a job names its own
    allowed_images: tuple[str, ...] = ()  # spec.image values jobs may name besides engine_image (`prefix*` ok)
    engine_cpu_request: str = PodLimits.cpu_request  # CPU request of every inference pod
    engine_cpu_limit: str = PodLimits.cpu_limit  # CPU limit of every inference pod ("" = none)
    engine_memory: str = PodLimits.memory  # memory request = limit when the job sets no spec.resources.cpuMemory
    engine_memory_overhead: str = PodLimits.memory_overhead  # added to spec.resources.cpuMemory for the pod
    engine_ephemeral_storage: str = PodLimits.ephemeral_storage  # ephemeral-storage request = limit
    engine_device: str = "auto"  # KUBEFLASH_DEVICE of the inference pods: auto, cpu, cuda (kind forces cpu)
    heartbeat_timeout_s: float = 120.0  # a FlashNode older than this takes no new jobs
    backoff_base_s: float = 10.0  # first retry delay after a failed attempt; doubles per failure
    backoff_cap_s: float = 300.0  # longest retry delay
    unschedulable_timeout_s: float = 300.0  # a pod the scheduler cannot place this long fails its attempt
    image_pull_timeout_s: float = 300.0  # a pod that cannot pull its image this long fails its attempt
    # a pod whose container has not started this long after its kubelet took it (status.startTime) fails its attempt:
    # ContainerCreating (a CSI volume that does not mount; also a first pull of the image), CreateContainerError, …
    container_start_timeout_s: float = 300.0
    # connect timeout and read timeout of every call of the operator's blocking Kubernetes client (kube.Kube: pods,
    # job status, FlashNode ledger, ConfigMaps; the Lease elector): a call past it fails naming the request
    api_timeout_s: float = 30.0
    # "detours": a job that goes from new to Running in its first step (the direct path) posts no Normal Event, its
    # status conditions say the same (one API write per job less: issue 24's 4 writes from apply to Running);
    # every other step's Normal news does. "all": that first step's news too, as one Event.
    normal_events: str = "detours"
    metrics_port: int = 0  # Prometheus /metrics; 0 = off
    liveness_port: int = 0  # kopf's /healthz; 0 = off

    def __post_init__(self) -> None:
        dev = self.engine_device
        if dev not in ENGINE_DEVICES and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ValueError(f"engine device must be one of {', '.join(ENGINE_DEVICES)} (or cuda:<n>), got {dev!r}")
        if self.normal_events not in NORMAL_EVENTS:
            raise ValueError(f"{ENV_PREFIX}NORMAL_EVENTS must be one of {', '.join(NORMAL_EVENTS)}, "
                             f"got {self.normal_events!r}")
        for name in ("engine_cpu_request", "engine_cpu_limit"):
            value = getattr(self, name)
            if not _CPU.fullmatch(value) and not (name == "engine_cpu_limit" and value == ""):
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be a CPU quantity such as 2 or 500m, got {value!r}")
        for name in ("engine_memory", "engine_memory_overhead", "engine_ephemeral_storage"):
            try:
                parse_quantity(getattr(self, name), path=ENV_PREFIX + name.upper(), lo=1)
            except SpecError as e:
                raise ValueError(str(e)) from None
        # above 0: a call needs some time; every pod is ContainerCreating for a moment
        for name in ("api_timeout_s", "container_start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be a number of seconds above 0, "
                                 f"got {getattr(self, name)!r}")
        if any(not isinstance(i, str) or not i or any(c.isspace() for c in i) for i in self.allowed_images):
            raise ValueError(f"{ENV_PREFIX}ALLOWED_IMAGES must be image references without spaces, got "
                             f"{self.allowed_images!r}")

    @property
    def pod_limits(self) -> PodLimits:
        return PodLimits(cpu_request=self.engine_cpu_request, cpu_limit=self.engine_cpu_limit,
                         memory=self.engine_memory, memory_overhead=self.engine_memory_overhead,
                         ephemeral_storage=self.engine_ephemeral_storage)

    @property
    def heartbeat_timeout(self) -> timedelta:
        return timedelta(seconds=self.heartbeat_timeout_s)

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the attempt after `failures` failed ones (exponential, capped)."""
        return min(self.backoff_base_s * 2 ** max(failures - 1, 0), self.backoff_cap_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Read KUBEFLASH_OPERATOR_<FIELD> (upper case) for every field that is set (a tuple: comma-separated)."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                kind = type(f.default)
                if kind is tuple:
                    values[f.name] = tuple(x.strip() for x in raw.split(",") if x.strip())
                    continue
                try:
                    values[f.name] = kind(raw)
                except ValueError as e:
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be a {kind.__name__}, got {raw!r}") from e
        return cls(**values)
