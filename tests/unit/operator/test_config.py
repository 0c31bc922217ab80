"""Operator configuration: environment overrides and the retry backoff curve."""

from __future__ import annotations

import pytest

from kubeflash_operator.config import OperatorConfig


def test_from_env_reads_prefixed_fields_with_their_types():
    """KUBEFLASH_OPERATOR_<FIELD> overrides a field, converted to the field's type."""
    cfg = OperatorConfig.from_env({"KUBEFLASH_OPERATOR_BACKOFF_BASE_S": "0.5", "KUBEFLASH_OPERATOR_METRICS_PORT": "9100",
                                   "KUBEFLASH_OPERATOR_ENGINE_IMAGE": "x:1", "UNRELATED": "1"})
    assert (cfg.backoff_base_s, cfg.metrics_port, cfg.engine_image) == (0.5, 9100, "x:1")
    assert cfg.heartbeat_timeout_s == OperatorConfig().heartbeat_timeout_s


def test_from_env_names_the_bad_variable():
    """A value of the wrong type is an error naming the variable."""
    with pytest.raises(ValueError, match="KUBEFLASH_OPERATOR_METRICS_PORT must be a int"):
        OperatorConfig.from_env({"KUBEFLASH_OPERATOR_METRICS_PORT": "lots"})


@pytest.mark.parametrize(("failures", "delay"), [(1, 10), (2, 20), (3, 40), (5, 60), (30, 60)],
                         ids=["first", "second", "third", "capped", "far"])
def test_backoff_doubles_and_caps(failures, delay):
    """The wait before the next attempt doubles per failure and never exceeds the cap."""
    assert OperatorConfig(backoff_base_s=10, backoff_cap_s=60).backoff(failures) == delay


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_engine_devices_accepted(device):
    """The engine understands auto, cpu, cuda and cuda:<n>."""
    assert OperatorConfig.from_env({"KUBEFLASH_OPERATOR_ENGINE_DEVICE": device}).engine_device == device


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:x", ""])
def test_bad_engine_device_rejected(device):
    """Anything else is refused when the configuration is built."""
    with pytest.raises(ValueError, match="engine device"):
        OperatorConfig(engine_device=device)


def test_normal_events_default_and_choices():
    """Direct-path Normal Events are off by default; "all" turns them on; anything else is refused by name."""
    assert OperatorConfig().normal_events == "detours"
    assert OperatorConfig.from_env({"KUBEFLASH_OPERATOR_NORMAL_EVENTS": "all"}).normal_events == "all"
    with pytest.raises(ValueError, match="KUBEFLASH_OPERATOR_NORMAL_EVENTS must be one of detours, all, got 'some'"):
        OperatorConfig.from_env({"KUBEFLASH_OPERATOR_NORMAL_EVENTS": "some"})


def test_container_start_timeout_default_env_and_refusals():
    """KUBEFLASH_OPERATOR_CONTAINER_START_TIMEOUT_S (300 s by default); zero (every pod is ContainerCreating for a
    moment), negative or not a number is refused naming the variable."""
    assert OperatorConfig().container_start_timeout_s == 300.0
    env = {"KUBEFLASH_OPERATOR_CONTAINER_START_TIMEOUT_S": "45.5"}
    assert OperatorConfig.from_env(env).container_start_timeout_s == 45.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="KUBEFLASH_OPERATOR_CONTAINER_START_TIMEOUT_S"):
            OperatorConfig.from_env({"KUBEFLASH_OPERATOR_CONTAINER_START_TIMEOUT_S": bad})
