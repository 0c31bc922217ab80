"""The operator's one configuration object, built once at the edge (CLI flags or environment)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

from kubeflash_operator.builder import DEFAULT_IMAGE

ENV_PREFIX = "KUBEFLASH_OPERATOR_"
ENGINE_DEVICES = ("auto", "cpu", "cuda")  # the engine's --device / $KUBEFLASH_DEVICE (cuda:<n> also accepted)


@dataclass(frozen=True)
class OperatorConfig:
    engine_image: str = DEFAULT_IMAGE  # image of the inference pods unless a job names its own
    engine_device: str = "auto"  # KUBEFLASH_DEVICE of the inference pods: auto, cpu, cuda (kind forces cpu)
    heartbeat_timeout_s: float = 120.0  # a FlashNode older than this takes no new jobs
    backoff_base_s: float = 10.0  # first retry delay after a failed attempt; doubles per failure
    backoff_cap_s: float = 300.0  # longest retry delay
    unschedulable_timeout_s: float = 300.0  # a pod the scheduler cannot place this long fails its attempt
    image_pull_timeout_s: float = 300.0  # a pod that cannot pull its image this long fails its attempt
    metrics_port: int = 0  # Prometheus /metrics; 0 = off
    liveness_port: int = 0  # kopf's /healthz; 0 = off

    def __post_init__(self) -> None:
        dev = self.engine_device
        if dev not in ENGINE_DEVICES and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ValueError(f"engine device must be one of {', '.join(ENGINE_DEVICES)} (or cuda:<n>), got {dev!r}")

    @property
    def heartbeat_timeout(self) -> timedelta:
        return timedelta(seconds=self.heartbeat_timeout_s)

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the attempt after `failures` failed ones (exponential, capped)."""
        return min(self.backoff_base_s * 2 ** max(failures - 1, 0), self.backoff_cap_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Read KUBEFLASH_OPERATOR_<FIELD> (upper case) for every field that is set."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                kind = type(f.default)
                try:
                    values[f.name] = kind(raw)
                except ValueError as e:
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be a {kind.__name__}, got {raw!r}") from e
        return cls(**values)
