"""No user string escapes its root: metadata.name, spec.input.file and spec.output.path, with '..', absolute
paths and symlinks (of the file, or of a folder on the way), are refused naming the field; the same paths that
stay inside are accepted (the control). Real files and symlinks in tmp_path; one real `kubeflash run` process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubeflash_api import SpecError, parse_job
from kubeflash_api.local import load_job_file
from kubeflash_api.names import job_dir_name, resolve_within

REPO = Path(__file__).resolve().parents[3]
_VENV_KUBEFLASH = REPO / ".venv" / "bin" / "kubeflash"
KUBEFLASH = [str(_VENV_KUBEFLASH)] if _VENV_KUBEFLASH.exists() else [sys.executable, "-m", "kubeflash_node.cli"]
LINE = json.dumps({"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi"}]}}) + "\n"


def _doc(name="j", **spec):
    return {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": name},
            "spec": {"model": {"uri": "builtin:smollm2-135m"}, "input": {"prompts": ["hi"]}, **spec}}


def _manifest(folder: Path, file: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(json.dumps(_doc(input={"file": file})))
    return path


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "/etc", "x\n", "a\\b", "-a", "A", "a" * 57, ""],
                         ids=["dotdot", "parent", "dot", "slash", "absolute", "newline", "backslash", "dash", "upper",
                              "long", "empty"])
def test_metadata_name_that_could_be_a_path_is_refused(name):
    """The job's name becomes a folder name (kubeflash-out/<name>, <namespace>/<name> on a node): labels only."""
    with pytest.raises(SpecError) as err:
        parse_job(_doc(name=name))
    assert err.value.path == "metadata.name"
    if len(name) <= 56:  # 57..63 characters is a label (a node folder) but too long for the job's pod names
        with pytest.raises(SpecError):
            job_dir_name("default", name)


@pytest.mark.parametrize("file", ["../x.jsonl", "a/../../x.jsonl", "/etc/passwd", "a/..", "..", "a\\..\\x", "./",
                                  "a\0b", "out/", "out/.", "a\nb.jsonl", "a\tb", "x" * 256 + ".jsonl"],
                         ids=["dotdot", "inner-dotdot", "absolute", "trailing-dotdot", "parent", "backslash", "dot",
                              "nul", "folder", "folder-dot", "newline", "tab", "part-over-255-bytes"])
@pytest.mark.parametrize("field", ["input.file", "output.path"])
def test_dotdot_and_absolute_paths_are_refused_by_the_parser(file, field):
    """'..' components, absolute paths, backslashes and control characters never get past the parser, in either
    field; nor does a path naming a folder ('out/' was written as a file named out) or a part longer than a file name
    may be (the run failed on its first write, after the model was converted)."""
    section, key = field.split(".")
    spec = {"input": {"file": file}} if section == "input" else {"output": {"path": file}}
    with pytest.raises(SpecError) as err:
        parse_job(_doc(**spec))
    assert err.value.path == f"spec.{field}"


def test_an_input_file_inside_the_folder_is_read(tmp_path):
    """The control: a batch next to the manifest, or below it, or reached by a symlink that stays inside."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(LINE)
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "sub" / "b.jsonl")
    for file in ("sub/b.jsonl", "link.jsonl", "./sub//b.jsonl"):
        job = load_job_file(_manifest(tmp_path, file))
        assert [p.id for p in job.input.prompts] == ["a"]


def test_an_input_file_symlinked_outside_is_refused(tmp_path):
    """A symlink in the manifest's folder to a file outside it is refused, naming spec.input.file."""
    secret = tmp_path / "secret.jsonl"
    secret.write_text(LINE)
    folder = tmp_path / "job"
    manifest = _manifest(folder, "b.jsonl")
    (folder / "b.jsonl").symlink_to(secret)
    with pytest.raises(SpecError) as err:
        load_job_file(manifest)
    assert err.value.path == "spec.input.file" and "outside" in str(err.value)


def test_an_input_file_inside_a_symlinked_folder_is_refused(tmp_path):
    """A folder on the way that is a symlink out of the manifest's folder is followed, and refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.jsonl").write_text(LINE)
    folder = tmp_path / "job"
    manifest = _manifest(folder, "data/b.jsonl")
    (folder / "data").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SpecError) as err:
        load_job_file(manifest)
    assert err.value.path == "spec.input.file" and str(outside) in str(err.value)


def test_a_manifest_in_a_symlinked_folder_reads_its_own_files(tmp_path):
    """The manifest's folder itself may be a symlink: its files are inside it once both are resolved."""
    real = tmp_path / "real"
    _manifest(real, "b.jsonl")
    (real / "b.jsonl").write_text(LINE)
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert len(load_job_file(tmp_path / "alias" / "job.yaml").input.prompts) == 1


def test_resolve_within_keeps_output_paths_inside_the_job_folder(tmp_path):
    """spec.output.path resolved in the job folder: inside is returned resolved; symlinks out are refused."""
    job = tmp_path / "job"
    (job / "runs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert resolve_within(job, "runs/out.jsonl", "spec.output.path") == job.resolve() / "runs" / "out.jsonl"
    assert resolve_within(job, "new/deeper/out.jsonl", "spec.output.path") == job.resolve() / "new/deeper/out.jsonl"
    (job / "escape").symlink_to(outside, target_is_directory=True)
    (job / "file-link.jsonl").symlink_to(outside / "results.jsonl")
    (job / "dangling.jsonl").symlink_to(tmp_path / "nowhere" / "x.jsonl")
    for rel in ("escape/out.jsonl", "file-link.jsonl", "dangling.jsonl", "../outside/x.jsonl", "/tmp/x.jsonl"):
        with pytest.raises(SpecError) as err:
            resolve_within(job, rel, "spec.output.path")
        assert err.value.path == "spec.output.path", rel
    (job / "loop").symlink_to(job / "loop")  # a loop leads nowhere (opening it fails with ELOOP), not outside
    assert job.resolve() in resolve_within(job, "loop/x.jsonl", "spec.output.path").parents


def test_kubeflash_run_refusal_leaves_the_output_untouched(tmp_path):
    """A real `kubeflash run` of a bad manifest: exit 1 within 2 s, the field on stderr, and the results file a
    previous run left in the job folder byte-identical (same content, same mtime)."""
    job_dir = tmp_path / "out"
    job_dir.mkdir()
    results = job_dir / "results.jsonl"
    before = b'{"custom_id": "a", "response": {"status_code": 200}}\n'
    results.write_bytes(before)
    stamp = results.stat().st_mtime_ns
    manifest = tmp_path / "job.yaml"
    doc = _doc(generation={"topP": 3})
    manifest.write_text(json.dumps(doc))
    t = time.monotonic()
    proc = subprocess.run([*KUBEFLASH, "run", str(manifest), "--job-dir", str(job_dir)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    elapsed = time.monotonic() - t
    assert proc.returncode == 1, proc.stderr
    assert "spec.generation.topP must be > 0 and <= 1, got 3" in proc.stderr
    assert elapsed < 2.0, f"kubeflash run took {elapsed:.2f} s to refuse a bad manifest"
    assert results.read_bytes() == before and results.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in job_dir.iterdir()) == ["results.jsonl"]
