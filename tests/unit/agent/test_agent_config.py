"""The agent config: YAML mapping -> one frozen dataclass; mistakes name the field path."""

from pathlib import Path

import pytest

from kubeflash_node.agent.config import ConfigError, from_mapping, parse_bytes, parse_seconds


def test_minimal_defaults():
    """With nothing configured: one disk at /var/lib/kubeflash, NVML for GPUs, cluster mode, loopback API."""
    cfg = from_mapping({}, node_name="n1")
    assert cfg.node_name == "n1" and cfg.kube and cfg.gpus is None
    assert [d.path for d in cfg.disks] == [Path("/var/lib/kubeflash")]
    assert cfg.state_dir == Path("/var/lib/kubeflash") and cfg.listen == "127.0.0.1:9477"


def test_full_document():
    """Fake devices, wanted models and jobs are read with units; the state dir defaults to the first disk."""
    cfg = from_mapping({
        "nodeName": "kind-worker", "kube": False, "interval": "2s",
        "gpus": [{"index": 0, "name": "fake", "memory": "80Gi", "pciRoot": "0000:00", "numaNode": 0}],
        "disks": [{"name": "ssd0", "path": "/data/a", "capacity": "100Gi", "reserve": "1Gi"}],
        "models": ["builtin:smollm2-135m", {"uri": "dummy:opt-125m", "dtype": "float32"}],
        "jobs": [{"namespace": "ns", "name": "j", "quota": "2Gi", "model": "builtin:smollm2-135m"}],
        "probe": {"enabled": False},
    })
    assert cfg.gpus[0].memory == 80 << 30 and cfg.gpus[0].numa_node == 0
    assert cfg.disks[0].capacity == 100 << 30 and cfg.state_dir == Path("/data/a")
    assert [m.uri for m in cfg.models] == ["builtin:smollm2-135m", "dummy:opt-125m"]
    assert cfg.jobs[0].quota == 2 << 30 and cfg.jobs[0].model_id.startswith("smollm2-135m-")
    assert cfg.interval == 2.0 and not cfg.probe


@pytest.mark.parametrize(
    "raw,message",
    [
        pytest.param({"disks": [{"name": "a", "path": "/x"}, {"path": "rel"}]}, r"disks\[1\]\.path is required",
                     id="relative-disk-path"),
        pytest.param({"disks": [{"name": "Bad_Name", "path": "/x"}]}, r"disks\[0\]\.name must be", id="disk-name"),
        pytest.param({"disks": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}, "must be unique",
                     id="duplicate-disks"),
        pytest.param({"gpus": [{"name": "x"}]}, r"gpus\[0\]\.index is required", id="gpu-index"),
        pytest.param({"models": [{"uri": "builtin:x", "dtype": "int3"}]}, r"models\[0\]\.dtype must be one of",
                     id="model-dtype"),
        pytest.param({"jobs": [{"name": "../x"}]}, r"jobs\[0\]\.name must be a Kubernetes name", id="job-name"),
        pytest.param({"listen": "0.0.0.0:9477"}, "listen must be 127.0.0.1", id="listen-not-loopback"),
        pytest.param({"disks": [{"path": "/x", "capacity": "lots"}]}, r"disks\[0\]\.capacity must be a quantity",
                     id="bad-quantity"),
        pytest.param({"colour": "blue"}, "colour is not a known field", id="unknown-key"),
        pytest.param({"allowedSourceRoots": ["models"]}, r"allowedSourceRoots\[0\] must be an absolute path",
                     id="relative-root"),
    ],
)
def test_errors_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(raw, node_name="n")


@pytest.mark.parametrize("listen", ["127.0.0.1:1", "[::1]:9", "localhost:80", "unix:/run/k.sock", "none"])
def test_listen_accepted(listen):
    assert from_mapping({"listen": listen}, node_name="n").listen == listen


@pytest.mark.parametrize("value,expected", [(0, 0), (1024, 1024), ("10Gi", 10 << 30), ("500M", 500_000_000),
                                            ("1.5Ki", 1536), ("2k", 2000)], ids=str)
def test_parse_bytes(value, expected):
    assert parse_bytes(value, "x") == expected


@pytest.mark.parametrize("value,expected", [(3, 3.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0)], ids=str)
def test_parse_seconds(value, expected):
    assert parse_seconds(value, "x") == expected


def test_config_is_frozen():
    cfg = from_mapping({}, node_name="n")
    with pytest.raises(AttributeError):
        cfg.interval = 1  # type: ignore[misc]


EXAMPLE_CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[3] / "examples").glob("agent-config*.yaml"))


def test_example_configs_are_found():
    """The glob below finds the configs the docs point at (a glob finding nothing would pass)."""
    assert {"agent-config.yaml", "agent-config-kind.yaml", "agent-config-local.yaml"} <= set(EXAMPLE_CONFIGS)


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_examples_parse(name):
    """The example config files users copy are valid."""
    from kubeflash_node.agent.config import load

    examples = Path(__file__).resolve().parents[3] / "examples"
    cfg = load(examples / name, node_name="n")
    assert cfg.disks
