"""Defects a newcomer met walking README.md and docs/ on a CPU machine (helper-68's pass), each refused within a
second naming the field or file and what was expected, with nothing stored lost or half-written:

(a) a full disk under `kubeflash run`'s job directory or store, or under `kubeflash convert --out`: a bare
    "[Errno 28] No space left on device" (no file, no field) after torch was imported and the model converted, or
    a conversion that wrote until the disk was full before it failed;
(b) `kubeflash calibrate --text` of an empty, too short or binary file refused only after torch and the model were
    loaded (4-7 s), and `--text /dev/null` called "no such file".

The full-disk cases use a real small tmpfs (mount needs root; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-X", "importtime", "-m", "kubeflash_node.cli"]


def _cli(*args: str, cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, set[str]]:
    """(the process, its wall time, the modules it imported) of one kubeflash command."""
    t = time.monotonic()
    r = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    imported = {x.rsplit("|", 1)[-1].strip() for x in r.stderr.splitlines() if x.startswith("import time:")}
    r.stderr = "\n".join(x for x in r.stderr.splitlines() if not x.startswith("import time:"))
    return r, time.monotonic() - t, imported


def _error(r: subprocess.CompletedProcess, command: str) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith(f"kubeflash {command}: error:")]
    return line.removeprefix(f"kubeflash {command}: error: ")


@pytest.fixture
def full_disk(tmp_path):
    """A 4 MiB tmpfs filled to the last byte (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        with open(disk / "ballast", "wb") as f:
            try:
                while True:
                    f.write(b"\1" * 65536)
                    f.flush()
            except OSError:
                pass
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: full}\nspec:\n"
                    "  model: {uri: 'dummy:opt-125m'}\n  input: {synthetic: {count: 1, promptLength: 4}}\n"
                    "  generation: {maxNewTokens: 2}\n")
    return path


def test_run_with_its_job_directory_on_a_full_disk_names_it_before_torch(tmp_path, full_disk):
    """--job-dir on a full disk: refused naming --job-dir and the disk's state, before torch is imported (the empty
    probe file the check wrote fit on a full disk, and the run died later on progress.json with no file named)."""
    r, took, imported = _cli("run", str(_job(tmp_path)), "--device", "cpu", "--job-dir", str(full_disk / "job"),
                             "--store", str(tmp_path / "home"), cwd=tmp_path)
    assert _error(r, "run").startswith(f"--job-dir {full_disk / 'job'}: {full_disk / 'job'} is not writable (No space "
                                       "left on device)"), r.stderr
    assert "torch" not in imported and took < 5, took
    assert not (full_disk / "job").exists() and not (tmp_path / "home").exists()


def test_run_with_its_store_on_a_full_disk_names_the_space_it_needs(tmp_path, full_disk):
    """The store ($KUBEFLASH_HOME) on a disk with too little room for the model: one line naming the store, the bytes
    the model needs and the bytes free, before any stage file is written (it was a bare "[Errno 28]" after the first
    stages); no job directory and no scratch directory are left."""
    home = full_disk / "home"
    os.remove(full_disk / "ballast")
    (full_disk / "ballast").write_bytes(b"\1" * (2 << 20))  # 2 MiB free: the probes fit, the model does not
    r, took, _ = _cli("run", str(_job(tmp_path)), "--device", "cpu", cwd=tmp_path, env={"KUBEFLASH_HOME": str(home)})
    error = _error(r, "run")
    assert error.startswith(f"the model store {home} (--store or $KUBEFLASH_HOME): dummy:opt-125m needs about "
                            f"0.467 GiB in float32, but {home / 'models'} has 0.00"), error
    assert took < 15, took
    assert [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == []
    assert not (tmp_path / "kubeflash-out").exists()


def test_convert_onto_a_full_disk_refuses_before_writing(tmp_path, full_disk):
    """kubeflash convert --out on a disk without room: refused before the first stage is written (it used to write
    until the disk was full, seconds later, and call the folder unwritable); a store that does fit converts."""
    r, took, imported = _cli("convert", "dummy:opt-125m", "--out", str(full_disk / "opt"), cwd=tmp_path)
    error = _error(r, "convert")
    assert error.startswith(f"--out {full_disk / 'opt'}: dummy:opt-125m needs about 0.234 GiB in float16, but "
                            f"{full_disk} has 0.000 GiB free"), error
    assert "torch" not in imported and took < 5, took
    assert sorted(p.name for p in full_disk.iterdir()) == ["ballast"]


def test_a_disk_that_fills_during_a_write_is_named_by_file(tmp_path, full_disk):
    """Where the space runs out after the checks (another writer took it): the error names the file being written,
    and the half-written file is gone (atomic_write_bytes, write_stage)."""
    from kubeflash_node.store.format import atomic_write_json, write_stage

    target = full_disk / "progress.json"
    with pytest.raises(OSError) as e:
        atomic_write_json(target, {"x": "y" * 100000})
    assert e.value.filename == str(target) and "No space left" in str(e.value), str(e.value)
    import numpy as np

    stage = full_disk / "layer_000.bin"
    with pytest.raises(OSError) as e:
        write_stage(stage, [("w", np.ones((256, 256), np.float32), "float32")])
    assert e.value.filename == str(stage) and "No space left" in str(e.value), str(e.value)
    assert sorted(p.name for p in full_disk.iterdir()) == ["ballast"]


@pytest.mark.parametrize("content,message", [
    (b"", "0 bytes; calibration needs at least 512 tokens (a few pages of ordinary prose)"),
    (b"Just a line.\n", "13 bytes; calibration needs at least 512 tokens (a few pages of ordinary prose)"),
    (b"\xfa\xfb" * 2000, "not UTF-8 text ('utf-8' codec can't decode byte 0xfa in position 0"),
], ids=["empty", "short", "binary"])
def test_calibrate_refuses_a_text_it_cannot_use_before_torch(tmp_path, content, message):
    """A --text with fewer bytes than the 512 tokens calibration needs (no tokenizer makes more tokens than bytes)
    or that is not UTF-8 is refused before torch is imported and the model converted."""
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    r, took, imported = _cli("calibrate", "builtin:smollm2-135m", "--text", str(text), "--device", "cpu",
                             "--store", str(tmp_path / "home"), "--quiet", cwd=tmp_path)
    assert _error(r, "calibrate").startswith(f"--text {text}: {message}"), r.stderr
    assert "torch" not in imported and took < 5, took
    assert not (tmp_path / "home").exists()


def test_calibrate_names_a_text_that_is_not_a_regular_file(tmp_path):
    """--text /dev/null exists: it is no regular file, not "no such file"."""
    r, _, _ = _cli("calibrate", "builtin:smollm2-135m", "--text", "/dev/null", "--device", "cpu", cwd=tmp_path)
    assert _error(r, "calibrate") == ("--text /dev/null: is not a regular file; expected a UTF-8 text file of "
                                      "ordinary prose")


def test_calibrate_refuses_a_dummy_model_before_converting_it(tmp_path):
    """MODEL dummy:PRESET has no tokenizer: refused at once, naming MODEL, instead of after converting the preset
    into the store (minutes for a large one) with "has no tokenizer"."""
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r, took, imported = _cli("calibrate", "dummy:llama-3-8b", "--text", str(text), "--device", "cpu",
                             "--store", str(tmp_path / "home"), "--quiet", cwd=tmp_path)
    assert _error(r, "calibrate").startswith("MODEL dummy:llama-3-8b: random weights have no tokenizer, so they "
                                             "cannot read --text"), r.stderr
    assert "torch" not in imported and took < 5, took
    assert not (tmp_path / "home").exists()


def test_a_models_family_is_named_as_config_json_gives_it(tmp_path):
    """A Gemma 2 directory is reported as gemma2 (its config.json model_type, ModelConfig.family, "for reports") by
    convert's summary, plan's model line and run's report, as --list-presets names its presets; all three said
    "llama" (the engine's architecture), so a newcomer could not tell whether the right model had been read."""
    from hf_random import save_random_model
    from transformers import Gemma2Config

    src = tmp_path / "gemma"
    save_random_model(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64), src)
    r, _, _ = _cli("convert", str(src), "--out", str(tmp_path / "store"), "--dtype", "float32", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"{tmp_path / 'store'}: gemma2, 2 layers, float32"), r.stdout
    job = tmp_path / "job.yaml"
    job.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: g}\nspec:\n"
                   f"  model: {{uri: '{src}', dtype: float32}}\n  input: {{synthetic: {{count: 1, promptLength: 4}}}}\n"
                   "  generation: {maxNewTokens: 2}\n")
    home = str(tmp_path / "home")
    r, _, _ = _cli("run", str(job), "--device", "cpu", "--quiet", "--store", home, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [model] = [x for x in r.stdout.splitlines() if x.startswith("model ") and " layers, " in x]
    assert model.endswith(f"hf:{src} (gemma2, 2 layers, float32)"), model
    r, _, _ = _cli("plan", str(job), "--store", home, "--ceilings", str(ROOT / "docs" / "bench-results" /
                                                                      "ceilings.json"), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"model: {src} (gemma2, 2 layers, float32;"), r.stdout


@pytest.mark.parametrize("name,kind", [("model.safetensors", "fifo"), ("model.safetensors", "dir"),
                                       ("config.json", "fifo"), ("config.json", "dir")])
def test_a_source_file_that_is_no_regular_file_is_named(tmp_path, name, kind):
    """A Hugging Face directory whose model.safetensors is a named pipe made convert wait forever on reading its
    header (and `kubeflash run`, whose check reads it too); a config.json that is a pipe or a directory was called
    "missing". Each is refused at once naming the file: not a regular file."""
    from hf_random import save_random_model
    from transformers import LlamaConfig

    src = tmp_path / "hf"
    save_random_model(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), src)
    (src / name).unlink()
    os.mkfifo(src / name) if kind == "fifo" else (src / name).mkdir()
    r, took, _ = _cli("convert", str(src), "--out", str(tmp_path / "store"), cwd=tmp_path)
    error = _error(r, "convert")
    want = {"model.safetensors": f"{src / name}: not a readable safetensors file (not a regular file)",
            "config.json": f"{src / name}: is not a regular file; a Hugging Face model directory needs config.json"}
    assert error == want[name], error
    assert took < 5 and not (tmp_path / "store").exists()


def _small_job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: p}\nspec:\n"
                    "  model: {uri: 'dummy:opt-125m'}\n  input: {synthetic: {count: 1, promptLength: 4}}\n")
    return path


@pytest.mark.parametrize("kind", ["missing", "fifo"])
def test_plan_refuses_a_ceilings_path_that_is_no_file_before_torch(tmp_path, kind):
    """`kubeflash plan --ceilings X` where X does not exist or is a named pipe: refused naming --ceilings before torch
    is imported (the check sat after bench's import, 2-6 s of torch for a typo); a pipe is "not a regular file"."""
    ceilings = tmp_path / "ceilings.json"
    if kind == "fifo":
        os.mkfifo(ceilings)
    r, took, imported = _cli("plan", str(_small_job(tmp_path)), "--ceilings", str(ceilings), cwd=tmp_path)
    why = "no such file" if kind == "missing" else "is not a regular file"
    assert _error(r, "plan").startswith(f"--ceilings {ceilings}: {why}; expected a ceilings JSON file"), r.stderr
    assert "torch" not in imported and took < 5, took


def test_ceilings_that_are_not_utf8_or_a_pipe_are_named_by_file(tmp_path):
    """Ceilings.load (plan, run, bench): bytes that are not UTF-8 were a bare "'utf-8' codec can't decode" naming no
    file; a named pipe blocked the read. Both name the file now."""
    from kubeflash_node.engine.bench import Ceilings

    path = tmp_path / "ceilings.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=rf"^{path}: not JSON \("):
        Ceilings.load(path)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ValueError, match=rf"^{path}: is not a regular file; expected the output of kubeflash bench"):
        Ceilings.load(path)


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file; expected the routing.json an earlier MoE job wrote"),
    ("dir", "is a directory; expected the routing.json an earlier MoE job wrote"),
    ("other", "expected a JSON object with format 'kubeflash-routing/1'"),
    ("text", "not JSON ("),
])
def test_run_refuses_a_routing_from_that_is_no_routing_file(tmp_path, kind, message):
    """`kubeflash run --routing-from FILE` with FILE missing, a directory or not a routing counts file: refused naming
    --routing-from before torch; it used to run, silently, with "routing counts: seeded from nothing"."""
    path = tmp_path / "routing.json"
    if kind == "dir":
        path.mkdir()
    elif kind == "other":
        path.write_text('{"x": 1}')
    elif kind == "text":
        path.write_text("counts: many")
    r, took, imported = _cli("run", str(_small_job(tmp_path)), "--routing-from", str(path), "--device", "cpu",
                             "--store", str(tmp_path / "home"), cwd=tmp_path)
    assert _error(r, "run").startswith(f"--routing-from {path}: {message}"), r.stderr
    assert "torch" not in imported and took < 5, took
    assert not (tmp_path / "kubeflash-out").exists() and not (tmp_path / "home").exists()


def test_bench_says_to_convert_a_hugging_face_directory_first(tmp_path):
    """`kubeflash bench --model HF_DIR` (its --help: a model directory kubeflash convert --out DIR wrote, for HF
    sources): said "manifest.json: missing; ... is not a complete kubeflash model"; it now says what to run."""
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    r, took, imported = _cli("bench", "--model", str(src), "--device", "cpu", "--no-ceilings", "--weights", "disk",
                             "--store", str(tmp_path / "bs"), cwd=tmp_path)
    assert _error(r, "bench") == (f"--model {src}: is a Hugging Face directory, not a store; convert it first "
                                  f"(kubeflash convert {src} --out DIR) and bench --model DIR"), r.stderr
    assert "torch" not in imported and took < 5, took


@pytest.mark.parametrize("sig,word,code", [(signal.SIGTERM, "terminated (SIGTERM)", 143),
                                           (signal.SIGINT, "interrupted", 130)], ids=["sigterm", "sigint"])
def test_a_stopped_convert_says_nothing_was_published(tmp_path, sig, word, code):
    """kubeflash convert stopped by SIGTERM said "finished results are kept, a re-run resumes" (kubeflash run's
    words) and by Ctrl-C only "interrupted": it says now that nothing was published, and nothing is."""
    out = tmp_path / "store" / "m"
    # opt-1.3b: ~100 MB a layer, so the 21 stages after layer_002 take seconds, not the ~0.35 s smollm2-135m's took
    # (in CI the whole convert finished before the signal arrived)
    # SIGINT's default action restored in the child: a shell's background job (CI runs the suite as one) ignores it,
    # and Python then keeps ignoring it, as a terminal's foreground command never does
    p = subprocess.Popen([sys.executable, "-m", "kubeflash_node.cli", "convert", "dummy:opt-1.3b", "--out",
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "store").glob(".*/layer_002.bin")):
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
        time.sleep(0.005)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and err.rstrip().endswith(f"{word}; nothing was published (a re-run converts anew)"), err
    assert not (tmp_path / "store").exists()  # nor its lock, nor the folder it made for --out


def _converting(out: Path, *, kill: bool = False) -> subprocess.Popen:
    """A `kubeflash convert dummy:opt-1.3b --out OUT` (~100 MB a layer: seconds to go) once its third layer is written;
    killed with SIGKILL there and waited for where `kill`."""
    p = subprocess.Popen([sys.executable, "-m", "kubeflash_node.cli", "convert", "dummy:opt-1.3b", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".staging-{out.name}-*/layer_002.bin")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.005)
    if kill:
        p.kill()
        p.communicate(timeout=60)
    return p


def test_a_second_convert_to_the_same_out_is_refused_while_the_first_runs(tmp_path):
    """Two `kubeflash convert` to one --out at once both succeeded, the second replacing the first's model without a
    word. The second is refused now within seconds, before torch, naming --out and the lock its first holds (with
    --overwrite too), and the first publishes its own model; its lock is gone when it ends."""
    out = tmp_path / "store" / "m"
    first = _converting(out)
    lock = tmp_path / "store" / ".m.lock"
    for extra in ([], ["--overwrite"]):
        r, took, imported = _cli("convert", "dummy:opt-125m", "--out", str(out), *extra, cwd=tmp_path)
        assert _error(r, "convert") == (f"--out {out}: another kubeflash convert is writing it now (it holds {lock}); "
                                        "expected one convert per --out: wait for that one to end, or choose another "
                                        "--out"), r.stderr
        assert "torch" not in imported and took < 5, took
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    from kubeflash_node.store.format import load_manifest

    assert load_manifest(out).num_layers == 24  # opt-1.3b's, not opt-125m's 12
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["m"]


def test_a_killed_converts_lock_does_not_block_the_next(tmp_path):
    """A convert killed with SIGKILL leaves its lock file (it cannot remove it), but the kernel let go of its lock:
    the next convert to that --out runs, publishes, and leaves neither the lock nor the killed one's scratch."""
    out = tmp_path / "store" / "m"
    _converting(out, kill=True)
    assert (tmp_path / "store" / ".m.lock").exists()
    r, _, _ = _cli("convert", "dummy:opt-125m", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from kubeflash_node.store.format import load_manifest

    assert load_manifest(out).num_layers == 12
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["m"]


def test_a_second_run_of_the_same_job_is_refused_while_the_first_runs(tmp_path):
    """Two `kubeflash run job.yaml` at once (two terminals) both appended every prompt's result: results.jsonl held
    7 lines for 4 prompts, 3 of them twice. The second is refused now, naming the job directory, and the first ends
    with each prompt's result exactly once."""
    import json

    job = tmp_path / "two.yaml"
    job.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: two}\nspec:\n"
                   "  model: {uri: 'dummy:opt-125m'}\n  input: {synthetic: {count: 8, promptLength: 8}}\n"
                   "  generation: {maxNewTokens: 16}\n  offload: {policy: explicit, weights: {disk: 100}, "
                   "kv: {gpu: 100}, gpuBatchSize: 1, numGpuBatches: 1}\n")
    home = str(tmp_path / "home")
    first = subprocess.Popen([sys.executable, "-m", "kubeflash_node.cli", "run", str(job), "--device", "cpu",
                              "--quiet", "--store", home], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    progress = tmp_path / "kubeflash-out" / "two" / "progress.json"  # the run goes on for seconds after it is written
    # (8 prompts x 16 tokens: ~3 s for 4 x 8 on a loaded 2-core machine was a thin margin for the second run's check)
    deadline = time.monotonic() + 120
    while not progress.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    r, took, _ = _cli("run", str(job), "--device", "cpu", "--quiet", "--store", home, cwd=tmp_path)
    assert _error(r, "run") == (f"the job directory {Path('kubeflash-out') / 'two'}: another kubeflash run of this "
                                "job is using it (running now); expected one run per job: wait for it to finish, then "
                                "run again to resume"), r.stderr
    assert took < 5, took
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    lines = (tmp_path / "kubeflash-out" / "two" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in lines) == sorted(f"synthetic-{i}" for i in range(8))
    r, _, _ = _cli("run", str(job), "--device", "cpu", "--quiet", "--store", home, cwd=tmp_path)  # the lock is gone
    assert r.returncode == 0 and "already had results" in r.stdout, r.stderr


@pytest.mark.parametrize("uri,message", [
    ("dummy:opt-125m@foo", "dummy:opt-125m@foo: the fill after @ must be one of random, zeros, skewed"),
    ("dummy:opt-125m@skewed", "dummy:opt-125m@skewed: only a mixture-of-experts preset has a router to skew"),
])
def test_convert_refuses_a_bad_dummy_fill_before_torch(tmp_path, uri, message):
    """A dummy: source's fill after @ was checked after torch was imported (1.6-2 s, more on a loaded machine)."""
    r, took, imported = _cli("convert", uri, "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert _error(r, "convert") == message, r.stderr
    assert "torch" not in imported and took < 5, took
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("where", ["--output", "spec.output.path"])
def test_run_refuses_a_results_path_that_is_a_named_pipe(tmp_path, where):
    """A results file that is a named pipe (--output, or results.jsonl in the job directory) made kubeflash run
    block forever reading it; refused now before torch, naming it."""
    job = _small_job(tmp_path)
    if where == "--output":
        pipe, args = tmp_path / "out.jsonl", ["--output", str(tmp_path / "out.jsonl")]
    else:
        pipe, args = tmp_path / "kubeflash-out" / "p" / "results.jsonl", []
        pipe.parent.mkdir(parents=True)
    os.mkfifo(pipe)
    shown = pipe if where == "--output" else Path(os.path.realpath(pipe))
    r, took, imported = _cli("run", str(job), *args, "--device", "cpu", "--store", str(tmp_path / "home"),
                             cwd=tmp_path)
    assert _error(r, "run") == (f"{where} {shown}: is not a regular file; expected the path of a results JSONL "
                                "file"), r.stderr
    assert "torch" not in imported and took < 5, took


@pytest.mark.parametrize("kind", ["missing", "fifo", "binary"])
def test_plan_routing_from_that_is_no_bench_result_is_named(tmp_path, kind):
    """`kubeflash plan --routing-from X`: a missing X was "[Errno 2] No such file or directory: 'X'" (no flag), bytes
    that are not UTF-8 a bare codec error, and a named pipe blocked plan forever. Each names --routing-from now."""
    path = tmp_path / "bench.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "binary":
        path.write_bytes(b"\x9a\xff" * 50)
    job = tmp_path / "moe.yaml"
    job.write_text(_small_job(tmp_path).read_text().replace("dummy:opt-125m", "dummy:mixtral-8x7b"))
    r, _, _ = _cli("plan", str(job), "--ceilings", str(ROOT / "docs" / "bench-results" / "ceilings.json"),
                   "--routing-from", str(path), "--store", str(tmp_path / "home"), cwd=tmp_path)
    want = {"missing": "no such file; expected a kubeflash bench --json result",
            "fifo": "is not a regular file; expected a kubeflash bench --json result",
            "binary": "not JSON ('utf-8' codec can't decode byte 0x9a"}[kind]
    assert _error(r, "plan").startswith(f"--routing-from {path}: {want}"), r.stderr


@pytest.mark.parametrize("kind,message", [("fifo", "cannot read the config file (not a regular file)"),
                                          ("binary", "not UTF-8 text ('utf-8' codec can't decode byte 0x9a")])
def test_agent_config_that_is_a_pipe_or_binary_is_named(tmp_path, kind, message):
    """`kubeflash agent -c FILE`: a named pipe blocked the agent's start forever and a binary file was a
    UnicodeDecodeError traceback; both are a config error (exit 2) naming the file."""
    path = tmp_path / "agent.yaml"
    os.mkfifo(path) if kind == "fifo" else path.write_bytes(b"\x9a\xff" * 50)
    r = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "agent", "-c", str(path), "--no-kube", "--once",
                        "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"{path}: {message}" in r.stderr, r.stderr


def test_convert_to_an_existing_folder_is_refused_before_torch(tmp_path):
    """`kubeflash convert SRC --out .` (or any existing folder, without --overwrite) was refused only once the
    writer was built, after torch was imported (1.7 s); now at once, the folder untouched."""
    (tmp_path / "keep.txt").write_text("x")
    r, took, imported = _cli("convert", "dummy:opt-125m", "--out", ".", cwd=tmp_path)
    assert _error(r, "convert") == ("--out .: already exists (pass --overwrite to replace a model kubeflash convert "
                                    "wrote); expected a new directory"), r.stderr
    assert "torch" not in imported and took < 5, took
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_folder_that_counts_no_blocks_is_not_called_full(tmp_path):
    """--out under /proc or /sys (file systems that count no blocks) was called full ("has 0.000 GiB free") by the
    room check; their own error (not writable) is said instead."""
    r, _, _ = _cli("convert", "dummy:opt-125m", "--out", "/proc/kubeflash-test-model", cwd=tmp_path)
    error = _error(r, "convert")
    assert "GiB free" not in error and error.startswith("--out /proc/kubeflash-test-model: "), error
    assert error.endswith("expected a new directory in a writable folder; nothing was published"), error


def test_run_names_its_results_and_report_by_whole_paths(tmp_path):
    """The last two lines of kubeflash run named results.jsonl by its whole path and report.json relative to the
    working directory ("report:  kubeflash-out/<job>/report.json"); both are whole paths now, and both files exist."""
    r, _, _ = _cli("run", str(_small_job(tmp_path)), "--device", "cpu", "--quiet", "--store", str(tmp_path / "home"),
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    results, report = r.stdout.splitlines()[-2:]
    out = Path(os.path.realpath(tmp_path)) / "kubeflash-out" / "p"
    assert results == f"results: {out / 'results.jsonl'}" and report == f"report:  {out / 'report.json'}", r.stdout
    assert (out / "results.jsonl").is_file() and (out / "report.json").is_file()
