"""Traversal attempts against a running agent: refused with a status message, nothing read or written."""

from __future__ import annotations

import os

import pytest

from agent_harness import model_id, staging_leftovers


@pytest.fixture
def setup(tmp_path, tiny_models, agents):
    secret = tmp_path / "secret-model"
    secret.mkdir()
    os.symlink(tiny_models / "tiny-a" / "config.json", secret / "config.json")  # a real model, outside the roots
    os.symlink(tiny_models / "tiny-a" / "model.safetensors", secret / "model.safetensors")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.symlink(secret, allowed / "escape")
    disk = tmp_path / "ssd0"
    agent = agents({"disks": [{"name": "ssd0", "path": str(disk)}], "allowedSourceRoots": [str(allowed)],
                    "retryInterval": 3600}).start()
    return agent, allowed, secret, disk


@pytest.mark.parametrize(
    "make_uri,message",
    [
        pytest.param(lambda a, s: f"{a}/../secret-model", "without '..'", id="dotdot"),
        pytest.param(lambda a, s: str(s), "outside the allowed source roots", id="absolute-outside"),
        pytest.param(lambda a, s: f"file://{s}", "scheme 'file' is not supported", id="file-url"),
        pytest.param(lambda a, s: f"{a}/escape", "outside the allowed source roots", id="symlink-escape"),
        pytest.param(lambda a, s: "secret-model", "or an absolute path, got 'secret-model'", id="relative"),
        pytest.param(lambda a, s: "builtin:../../etc/passwd", "with a lowercase name", id="builtin"),
        pytest.param(lambda a, s: "ftp://h/m.gguf", "scheme 'ftp' is not supported", id="scheme"),
    ],
)
def test_source_refused(setup, make_uri, message):
    """Each attempt is refused with the reason, by the API parser (400) where the uri's form already says it
    (a '..'), else as a Failed model once resolved; the secret model is never staged."""
    agent, allowed, secret, disk = setup
    uri = make_uri(allowed, secret)
    code, body = agent.request("POST", "/v1/models", {"uri": uri})
    if code == 400:
        assert message in body["error"]
    else:
        assert code == 202
        row = agent.wait_model(body["id"], states=("Failed",), timeout=30)
        assert message in row["message"]
        assert row["id"] == model_id(uri)
    assert [p.name for p in (disk / "models").iterdir()] == [] and staging_leftovers(disk) == []


@pytest.mark.parametrize("path", ["/v1/jobs/default/..%2Fx", "/v1/jobs/../etc", "/v1/jobs/NS/x"], ids=str)
def test_job_names_refused(setup, path):
    """A job name that is not a Kubernetes name never becomes a directory."""
    agent, _, _, disk = setup
    code, _ = agent.request("PUT", path, {})
    assert code in (400, 404)
    assert not any((disk / "jobs").rglob("*x*")) and not (disk / "etc").exists()
