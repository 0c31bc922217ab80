"""The layer store format: round trip, 4 KiB alignment, crash-safe publish, corruption and truncation detection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kubeflash_node.store.format import ALIGN, Manifest, ModelWriter, StoreError, load_manifest, tensor_view, verify


def _write_model(out, *, tensors=None):
    rng = np.random.default_rng(0)
    tensors = tensors or {"a": rng.standard_normal((3, 5)).astype(np.float32),
                          "b": rng.standard_normal(7).astype(np.float16)}
    w = ModelWriter(out)
    entry = w.add_stage("layer_000.bin", ((k, v, str(v.dtype)) for k, v in tensors.items()))
    m = Manifest(architecture="llama", config={"x": 1}, dtype="float32", files=dict(w.files), stages=["layer_000.bin"])
    w.publish(m)
    return tensors, entry


def test_round_trip_and_alignment(tmp_path):
    """Tensors come back bit-identical from their recorded offsets, each offset and the file size 4 KiB-aligned."""
    tensors, entry = _write_model(tmp_path / "m")
    m = load_manifest(tmp_path / "m")
    buf = np.fromfile(tmp_path / "m" / "layer_000.bin", dtype=np.uint8)
    assert entry.size % ALIGN == 0 and len(buf) == entry.size
    for name, arr in tensors.items():
        e = m.files["layer_000.bin"].tensors[name]
        assert e.offset % ALIGN == 0
        np.testing.assert_array_equal(tensor_view(buf, e), arr)
    verify(tmp_path / "m")


def test_publish_is_atomic_and_abort_leaves_nothing(tmp_path):
    """Until publish the model directory does not exist; abort removes the staging directory entirely."""
    w = ModelWriter(tmp_path / "m")
    w.add_stage("layer_000.bin", [("a", np.zeros(4, np.float32), "float32")])
    assert not (tmp_path / "m").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_existing_model_is_not_overwritten_by_default(tmp_path):
    """Converting onto an existing model is refused unless overwrite is asked for."""
    _write_model(tmp_path / "m")
    with pytest.raises(StoreError, match="already exists"):
        ModelWriter(tmp_path / "m")


def test_flipped_byte_detected_naming_file(tmp_path):
    """A single corrupted byte fails verify with the file's name in the message."""
    _write_model(tmp_path / "m")
    f = tmp_path / "m" / "layer_000.bin"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="layer_000.bin: sha256"):
        verify(tmp_path / "m")


def test_truncated_file_detected_on_load(tmp_path):
    """A truncated layer file is caught by the cheap size check at load time, naming the file."""
    _write_model(tmp_path / "m")
    f = tmp_path / "m" / "layer_000.bin"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(StoreError, match=r"layer_000.bin: 100 bytes, expected \d+ \(truncated"):
        load_manifest(tmp_path / "m")


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json: not valid JSON"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"format": "other/9"})), "format is 'other/9'"),
    (lambda d: (d / "layer_000.bin").unlink(), "layer_000.bin: missing"),
], ids=["no-manifest", "bad-json", "wrong-format", "missing-layer"])
def test_broken_store_errors_name_the_file(tmp_path, breakage, message):
    """Each way a store can be broken gives an error naming the file and the problem."""
    _write_model(tmp_path / "m")
    breakage(tmp_path / "m")
    with pytest.raises(StoreError, match=message):
        load_manifest(tmp_path / "m")


def test_missing_model_directory(tmp_path):
    """Loading a model that was never converted says so and how to fix it."""
    with pytest.raises(StoreError, match="no such model directory.*kubeflash convert"):
        load_manifest(tmp_path / "nope")


def test_all_zero_tensors_become_holes(tmp_path):
    """A large all-zero tensor is written as a hole (the file keeps its size, the disk holds almost nothing) and
    reads back as zeros under the same sha256; a tensor of negative zeros is data, not a hole."""
    big = 4 << 20
    tensors = {"zeros": np.zeros(big // 4, np.float32), "negzero": np.full(big // 4, -0.0, np.float32),
               "tail": np.zeros(big // 2, np.float16)}
    _, entry = _write_model(tmp_path / "m", tensors=tensors)
    path = tmp_path / "m" / "layer_000.bin"
    assert path.stat().st_size == entry.size >= 2.5 * big
    assert path.stat().st_blocks * 512 < 1.5 * big  # only the negative zeros take disk
    verify(tmp_path / "m")  # sizes and sha256 of what the holes read as
    buf = np.fromfile(path, dtype=np.uint8)
    m = load_manifest(tmp_path / "m")
    for name, arr in tensors.items():
        assert np.array_equal(tensor_view(buf, m.files["layer_000.bin"].tensors[name]).view(np.uint8),
                              arr.view(np.uint8)), name


def test_zero_filled_dummy_source(tmp_path):
    from kubeflash_node.store.convert import SourceError, convert

    m = convert("dummy:opt-125m@zeros", tmp_path / "z", dtype="float16")
    apparent = sum((tmp_path / "z" / f).stat().st_size for f in m.files)
    used = sum((tmp_path / "z" / f).stat().st_blocks * 512 for f in m.files)
    assert apparent > 230 << 20 and used < apparent / 50
    with pytest.raises(SourceError, match="must be one of random, zeros, skewed"):
        convert("dummy:opt-125m@ones", tmp_path / "o", dtype="float16")


def test_skewed_dummy_router_concentrates_routes_and_needs_experts():
    """dummy:PRESET@skewed: the synthetic router of the hot-expert-cache benchmark sends most routes to a few
    experts, the plain random fill spreads them; a dense preset has no router to skew and is refused."""
    from dataclasses import replace

    import torch

    from kubeflash_node.store.convert import DummySource, SourceError

    def top32_share(fill: str) -> float:
        src = DummySource(f"qwen3-30b-a3b{fill}")
        src.config = replace(src.config, hidden_size=256, intermediate_size=8)  # the router's shape, small
        router = src.layer(0)["router"]
        x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(1))
        top = (x @ router.T).topk(src.config.num_experts_per_tok, dim=1).indices
        counts = torch.bincount(top.flatten(), minlength=src.config.num_experts).sort(descending=True).values
        return float(counts[:32].sum() / counts.sum())

    assert top32_share("@skewed") > 0.6 > 0.4 > top32_share("")
    with pytest.raises(SourceError, match="only a mixture-of-experts preset"):
        DummySource("llama-3-8b@skewed")
