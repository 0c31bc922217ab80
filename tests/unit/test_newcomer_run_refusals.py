"""`kubeflash run` refuses a missing model, an unknown builtin or dummy preset, an output it cannot write or that
names a folder, and a bad --tensor-parallel or size before torch is imported, naming what is wrong, and leaves no
directory behind.

Found by trying the product as a newcomer: these used to import torch first (seconds), leave an empty
kubeflash-out/<job>/, and an output under /sys (os.access says yes to root) failed only after the model was
converted, with a bare "[Errno 13]" and a progress.json left in the job directory. Each case runs the real
dispatcher in a fresh interpreter in an empty working directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_probe import dispatch


def _manifest(tmp_path: Path, uri: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: j}\nspec:\n"
                    f"  model: {{uri: '{uri}'}}\n  input: {{prompts: [hi]}}\n")
    return path


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    work = tmp_path / "work"
    work.mkdir()
    return dispatch(work, "run", *args, "--store", str(tmp_path / "store"))


@pytest.mark.parametrize(("uri", "expected"), [
    ("/nonexistent/kubeflash/model.gguf", "spec.model.uri: /nonexistent/kubeflash/model.gguf: no such file"),
    ("dummy:no-such-preset", "spec.model.uri: unknown dummy preset 'no-such-preset'"),
    ("builtin:smollm2-136m", "spec.model.uri: builtin model 'smollm2-136m' is unknown; expected builtin:smollm2-135m"),
], ids=["missing-file", "unknown-dummy", "unknown-builtin"])
def test_missing_model_refused_before_torch_and_leaves_nothing(tmp_path, uri, expected):
    result, err = _run(tmp_path, str(_manifest(tmp_path, uri)))
    assert result == {"code": 1, "torch": False}, err
    assert expected in err
    assert list((tmp_path / "work").iterdir()) == []  # no kubeflash-out/j/
    assert not (tmp_path / "store").exists()


def _builtin_gguf() -> Path:
    from kubeflash_node.store.convert import builtin_gguf

    return builtin_gguf("smollm2-135m")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("m.gguf", lambda: b"\xf3junk" * 100, "not a readable GGUF file: at byte 0, the magic"),
    ("m.gguf", lambda: _builtin_gguf().read_bytes()[:100_000],
     "not a readable GGUF file: at byte 1099, the element count of key 'tokenizer.ggml.tokens'"),
    ("m.safetensors", lambda: b"\0" * 64, "expected a .gguf file or a Hugging Face directory with config.json"),
    ("m", None, "m/config.json: missing; a Hugging Face model directory needs config.json"),
], ids=["garbage-gguf", "truncated-gguf", "other-file", "folder-without-config"])
def test_a_model_path_that_is_no_model_is_refused_before_torch(tmp_path, name, content, expected):
    """A corrupt GGUF or a path that is no model was refused only after torch was imported (~5 s)."""
    uri = tmp_path / name
    if content is None:
        uri.mkdir()
    else:
        uri.write_bytes(content())
    result, err = _run(tmp_path, str(_manifest(tmp_path, str(uri))))
    assert result == {"code": 1, "torch": False}, err
    assert f"spec.model.uri: {tmp_path / expected if content is None else f'{uri}: {expected}'}" in err
    assert list((tmp_path / "work").iterdir()) == [] and not (tmp_path / "store").exists()


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs mounted at /sys")
def test_unwritable_output_refused_before_torch_and_created_dirs_removed(tmp_path):
    job_dir = tmp_path / "work" / "a" / "b"
    result, err = _run(tmp_path, str(_manifest(tmp_path, "builtin:smollm2-135m")),
                       "--job-dir", str(job_dir), "--output", "/sys/kubeflash-newcomer.jsonl")
    assert result == {"code": 1, "torch": False}, err
    assert "--output /sys/kubeflash-newcomer.jsonl: /sys is not writable" in err
    assert list((tmp_path / "work").iterdir()) == []  # a/b was created for the check and removed again
    assert not Path("/sys/kubeflash-newcomer.jsonl").exists()


def test_tensor_parallel_zero_is_a_usage_error(tmp_path):
    result, err = _run(tmp_path, str(_manifest(tmp_path, "builtin:smollm2-135m")), "--tensor-parallel", "0")
    assert result == {"code": 2, "torch": False}, err
    assert "argument --tensor-parallel: must be an integer >= 1, got '0'" in err
    assert list((tmp_path / "work").iterdir()) == []


def test_output_naming_a_folder_is_a_usage_error(tmp_path):
    """`--output out/` was written as a file named out (Path drops the slash)."""
    result, err = _run(tmp_path, str(_manifest(tmp_path, "builtin:smollm2-135m")), "--output", "out/")
    assert result == {"code": 2, "torch": False}, err
    assert "argument --output: 'out/' ends in '/'; expected the path of a file" in err
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize(("size", "expected"), [
    ("9" * 400, "is past 1 EiB"),  # was an OverflowError traceback (float infinity)
    ("1.5.5Gi", "'1.5.5Gi' is not a size"),  # was "could not convert string to float"
], ids=["400-digits", "two-dots"])
def test_nonsense_memory_sizes_are_usage_errors(tmp_path, size, expected):
    result, err = _run(tmp_path, str(_manifest(tmp_path, "builtin:smollm2-135m")), "--cpu-memory", size)
    assert result == {"code": 2, "torch": False}, err
    assert "argument --cpu-memory: " in err and expected in err


@pytest.mark.parametrize(("output", "expected"), [
    ("jd/progress.json", "--output jd/progress.json: is the run's own progress.json in jd"),
    ("jd/report.json", "--output jd/report.json: is the run's own report.json in jd"),
    ("jd/kv/r.jsonl", "--output jd/kv/r.jsonl: is the run's own kv/ folder in jd"),
    ("jd", "--output jd: is the job directory"),
], ids=["progress", "report", "kv-folder", "job-dir"])
def test_results_onto_the_runs_own_files_are_refused_before_torch(tmp_path, output, expected):
    """Results written to report.json were replaced by the report at the end (and the run said 'results:
    …/report.json'); onto progress.json the run died with a JSONDecodeError traceback after the model ran."""
    result, err = _run(tmp_path, str(_manifest(tmp_path, "builtin:smollm2-135m")), "--job-dir", "jd",
                       "--output", output)
    assert result == {"code": 1, "torch": False}, err
    assert f"kubeflash run: error: {expected}; expected another file for the results (default: jd/results.jsonl)" \
        in err
    assert list((tmp_path / "work").iterdir()) == []
