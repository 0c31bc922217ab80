"""Bad models and stores fail early with errors naming the file or field: never a stack of torch internals."""

from __future__ import annotations

import json

import pytest

from kubeflash_node.engine.generate import Engine, EngineError, GenParams
from kubeflash_node.store.convert import SourceError, convert
from kubeflash_node.store.format import StoreError


def test_unknown_architecture(tmp_path):
    """An HF directory of an unsupported model_type names the type and the supported ones."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8}))
    with pytest.raises(SourceError, match="model_type 'gpt2' is not supported; expected one of llama, mistral, .*, opt"):
        convert(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_dummy_preset(tmp_path):
    """A typo in a dummy preset lists the presets."""
    with pytest.raises(ValueError, match="unknown dummy preset 'llama-9'.*llama-3-8b"):
        convert("dummy:llama-9", tmp_path / "out")


def test_not_a_gguf(tmp_path):
    """A file that is not GGUF is named as such."""
    f = tmp_path / "x.gguf"
    f.write_bytes(b"hello world" * 10)
    with pytest.raises(SourceError, match="x.gguf: not a readable GGUF file"):
        convert(str(f), tmp_path / "out")


def test_missing_store(tmp_path):
    """An engine on a directory that holds no model says to convert first."""
    with pytest.raises(StoreError, match="kubeflash convert"):
        Engine(tmp_path / "none")


def test_corrupt_store_layer_named(tmp_path):
    """A truncated layer file of a real converted model is named when the engine opens the store."""
    convert("dummy:opt-125m", tmp_path / "m", dtype="float16")
    f = tmp_path / "m" / "layer_003.bin"
    f.write_bytes(f.read_bytes()[:4096])
    with pytest.raises(StoreError, match="layer_003.bin: 4096 bytes, expected"):
        Engine(tmp_path / "m")


def test_prompt_longer_than_context(opt_store):
    """A prompt plus max_new_tokens beyond the context window names the prompt and the window."""
    engine = Engine(opt_store)
    try:
        with pytest.raises(EngineError, match="prompt 1: 2040 tokens \\+ max_new_tokens 16 exceed .* 2048"):
            engine.generate([[5] * 10, [5] * 2040], GenParams(max_new_tokens=16))
        with pytest.raises(EngineError, match="prompt 0 is empty"):
            engine.generate([[]], GenParams())
    finally:
        engine.close()


def test_dummy_model_generates(tmp_path):
    """Tokenizer-free dummy weights run through the whole schedule (what benchmarks use)."""
    m = convert("dummy:opt-125m", tmp_path / "m", dtype="float16")
    assert m.tokenizer is None and m.num_layers == 12
    engine = Engine(tmp_path / "m")
    try:
        out = engine.generate([[5, 6, 7], [8, 9]], GenParams(max_new_tokens=4))
    finally:
        engine.close()
    assert [len(c.tokens) for c in out] == [4, 4]


def test_run_job_refused_before_any_work_leaves_progress_failed_with_the_reason(opt_store, tmp_path):
    """A job refused by run_job's checks (here: prompt + maxNewTokens past the context window) leaves
    progress.json in the failed phase with the same reason, never "running", and no results file."""
    from kubeflash_api import parse_job
    from kubeflash_node.engine.job import run_job
    from kubeflash_node.store.format import load_manifest

    spec = parse_job({"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "long"},
                      "spec": {"model": {"uri": "dummy:opt-125m"}, "input": {"synthetic": {"count": 1,
                                                                                          "promptLength": 2040}},
                               "generation": {"maxNewTokens": 16}}})
    out, job_dir = tmp_path / "out" / "results.jsonl", tmp_path / "job"
    with pytest.raises(ValueError) as e:
        run_job(spec, model_dir=opt_store, manifest=load_manifest(opt_store), output=out, job_dir=job_dir)
    progress = json.loads((job_dir / "progress.json").read_text())
    assert progress["phase"] == "failed" and progress["message"] == str(e.value)[:500]
    assert "2048" in progress["message"] and not out.exists()
