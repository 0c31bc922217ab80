"""The `kubeflash` CLI answers every input as a user would expect (issue 14, "CLI and formats").

Run as a user runs it (`.venv/bin/kubeflash` in a subprocess): `convert --list-presets` lists the presets; `plan`
prints a plan or says what it assumed on a machine without a GPU, never a traceback; a bad `--device` is refused by
every subcommand that takes it, with argparse's error, in under a second and before torch is imported; `bench`
without a GPU names what it could not measure instead of printing zeros; an unsupported model URI scheme is named;
every subcommand's --help works. Also the structure behind them: job.py imports no CLI module, and every offload
policy is built by policy.make_policy.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KUBEFLASH = [str(Path(sys.executable).parent / "kubeflash")]
ENGINE = ROOT / "node-agent" / "kubeflash_node" / "engine"
EXAMPLE = ROOT / "examples" / "capital-of-france.yaml"
CEILINGS = ROOT / "docs" / "bench-results" / "ceilings.json"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def kubeflash(*args, tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"KUBEFLASH_HOME": str(tmp_path / "home")}
    env.pop("KUBEFLASH_DEVICE", None)
    return subprocess.run(KUBEFLASH + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)


def assert_clean_error(proc: subprocess.CompletedProcess, rc: int = 1) -> None:
    assert proc.returncode == rc, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------- convert


def test_list_presets_lists_every_preset(tmp_path):
    """The README's `kubeflash convert --list-presets` prints each dummy preset (no SOURCE, no --out needed)."""
    from kubeflash_node.store.modelconfig import PRESETS

    proc = kubeflash("convert", "--list-presets", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert listed == set(PRESETS) and "llama-3-8b" in listed


def test_convert_without_source_says_what_is_required(tmp_path):
    proc = kubeflash("convert", tmp_path=tmp_path)
    assert_clean_error(proc, rc=2)
    assert "SOURCE and --out DIR are required (or --list-presets)" in proc.stderr


@pytest.mark.parametrize("uri, scheme", [("s3://bucket/llama", "s3"), ("ftp://host/m.gguf", "ftp"),
                                         ("hf://org/model", "hf"), ("GS://b/m", "gs")], ids=["s3", "ftp", "hf", "gs"])
def test_convert_names_an_unsupported_scheme(tmp_path, uri, scheme):
    proc = kubeflash("convert", uri, "--out", tmp_path / "m", tmp_path=tmp_path)
    assert_clean_error(proc)
    assert f"SOURCE: scheme {scheme!r} is not supported; use builtin:, dummy:, a local path, or http(s)://" \
        in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("uri", ["s3://bucket/llama", "ftp://host/m.gguf", "hf://org/model"], ids=["s3", "ftp", "hf"])
def test_store_refuses_an_unsupported_scheme_before_touching_disk(tmp_path, uri):
    """The store side (ensure_model, what `kubeflash run`, bench and the agent call) names the scheme."""
    from kubeflash_node.store.cache import ensure_model
    from kubeflash_node.store.format import StoreError

    scheme = uri.split(":")[0]
    with pytest.raises(StoreError, match=f"spec.model.uri: scheme '{scheme}' is not supported; use builtin:, "
                                         r"dummy:, a local path, or http\(s\)://"):
        ensure_model(uri, root=tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_supported_schemes_pass_the_check():
    from kubeflash_node.store.uris import check_scheme

    for uri in ("builtin:smollm2-135m", "dummy:opt-125m", "/models/x.gguf", "rel/dir", "file:///m.gguf",
                "https://example.org/m.gguf", "http://example.org/m.gguf"):
        assert check_scheme(uri) == uri


# ------------------------------------------------------------------------------------------- --device

BAD_DEVICES = ["gpu0", "cuda:-1", "cuda:x", "CUDA", "cuda:", "cuda:01", "cpu:0", ""]
DEVICE_COMMANDS = {"run": [EXAMPLE], "bench": [], "engine": []}


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize("device", BAD_DEVICES, ids=lambda d: d or "empty")
def test_bad_device_is_refused_fast_and_before_torch(tmp_path, command, device):
    t0 = time.perf_counter()
    proc = kubeflash(command, *DEVICE_COMMANDS[command], "--device", device, tmp_path=tmp_path)
    elapsed = time.perf_counter() - t0
    assert_clean_error(proc, rc=2)
    assert f"kubeflash {command}: error: --device must be auto, cpu, cuda or cuda:N, got {device!r}" in proc.stderr
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert not (tmp_path / "home").exists() and not (tmp_path / "kubeflash-out").exists()  # nothing was started


def test_bad_device_is_refused_without_importing_torch(tmp_path):
    code = ("import sys\nfrom kubeflash_node.cli import main\ntry:\n    main(['bench', '--device', 'gpu0'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.stdout.split() == ["2", "False"], (proc.stdout, proc.stderr)


def test_engine_names_a_bad_device_from_its_environment(tmp_path):
    env = os.environ | {"KUBEFLASH_DEVICE": "tpu"}
    proc = subprocess.run(KUBEFLASH + ["engine"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert_clean_error(proc, rc=2)
    assert "kubeflash engine: error: --device must be auto, cpu, cuda or cuda:N, got 'tpu'" in proc.stderr


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:12"])
def test_good_device_syntax_is_accepted(device):
    from kubeflash_node.engine.devices import device_syntax_error

    assert device_syntax_error(device) is None


def test_cuda_index_beyond_this_machine_is_refused(tmp_path):
    """cuda:N is checked against the CUDA devices present (none here: CUDA is not available)."""
    proc = kubeflash("run", EXAMPLE, "--device", "cuda:99", tmp_path=tmp_path)
    assert_clean_error(proc)
    assert "--device cuda:99: " in proc.stderr
    assert ("CUDA is not available" if not _cuda() else "this machine has") in proc.stderr


BAD_FLAGS = [
    ("bench", ["--prompts", "0"], "argument --prompts: must be an integer >= 1, got '0'"),
    ("bench", ["--gen-len", "-1"], "argument --gen-len: must be an integer >= 1, got '-1'"),
    ("bench", ["--num-gpu-batches", "0"], "argument --num-gpu-batches: must be an integer >= 1, got '0'"),
    ("bench", ["--prefetch", "0"], "argument --prefetch: must be an integer >= 1, got '0'"),
    ("bench", ["--io-threads", "-1"], "argument --io-threads: must be an integer >= 0, got '-1'"),
    ("bench", ["--x-cache", "200"], "argument --x-cache: must be a percentage in 0..100, got '200'"),
    ("bench", ["--x-cache", "nan"], "argument --x-cache: must be a percentage in 0..100, got 'nan'"),
    ("bench", ["--weights", "50:80"], "argument --weights: expected disk, cpu, gpu or GPU:CPU percentages summing"),
    ("bench", ["--gpu-memory", "lots"], "argument --gpu-memory: 'lots' is not a size; expected something like 5GiB"),
    ("bench", ["--disk-probe", "0"], "argument --disk-probe: must be a size above 0, got '0'"),
    ("plan", [EXAMPLE, "--step", "0"], "argument --step: must be an integer in 1..100, got '0'"),
    ("plan", [EXAMPLE, "--prompt-len", "-3"], "argument --prompt-len: must be an integer >= 0, got '-3'"),
    ("plan", [EXAMPLE, "--cpu-memory", "0"], "argument --cpu-memory: must be a size above 0, got '0'"),
    ("run", [EXAMPLE, "--gpu-memory", "12XB"], "argument --gpu-memory: '12XB' is not a size; expected something"),
    ("run", [EXAMPLE, "--cpu-memory", "0"], "argument --cpu-memory: must be a size above 0, got '0'"),
    ("operator", ["--metrics-port", "70000"], "argument --metrics-port: must be a port in 0..65535 (0: off), got"),
    ("operator", ["--liveness-port", "http"], "argument --liveness-port: must be a port in 0..65535 (0: off), got"),
]


@pytest.mark.parametrize("command, args, message", BAD_FLAGS, ids=[f"{c}{a[-2]}{a[-1]}" for c, a, _ in BAD_FLAGS])
def test_bad_numbers_are_refused_by_argparse_in_under_a_second(tmp_path, command, args, message):
    """Zero, negative or out-of-range numbers used to crash late (range() arg 3 must not be zero, max_workers must
    be greater than 0) or be taken silently as the default (--num-gpu-batches 0)."""
    t0 = time.perf_counter()
    proc = kubeflash(command, *args, tmp_path=tmp_path)
    elapsed = time.perf_counter() - t0
    assert_clean_error(proc, rc=2)
    assert f"kubeflash {command}: error: {message}" in proc.stderr
    assert elapsed < 1.0, f"{elapsed:.2f} s"


# ------------------------------------------------------------------------------------------- run: paths, model


def _paths_case(tmp_path: Path, case: str) -> tuple[list, str]:
    """(extra run arguments, the start of the one-line error) for a path a newcomer might get wrong."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    return {
        "job-dir-is-a-file": (["--job-dir", afile], f"--job-dir {afile}: {afile} is a file; expected a directory"),
        "job-dir-under-a-file": (["--job-dir", afile / "job"], f"--job-dir {afile / 'job'}: cannot create"),
        "output-is-a-directory": (["--output", outdir], f"--output {outdir}: is a directory; expected the path of a"),
        "output-under-a-file": (["--output", afile / "r.jsonl"], f"--output {afile / 'r.jsonl'}: {afile} is a file"),
        "store-under-a-file": (["--store", afile / "s"], f"--store {afile / 's'}: cannot create"),
    }[case]


@pytest.mark.parametrize("case", ["job-dir-is-a-file", "job-dir-under-a-file", "output-is-a-directory",
                                  "output-under-a-file", "store-under-a-file"])
def test_run_names_a_path_it_cannot_write_before_converting(tmp_path, case):
    """A job directory, results file or store that cannot be written is one line naming the flag and what was
    expected, exit 1, and nothing converted (these used to be bare '[Errno 2] ...' lines naming no flag)."""
    extra, message = _paths_case(tmp_path, case)
    proc = kubeflash("run", EXAMPLE, "--device", "cpu", "--quiet", *extra, tmp_path=tmp_path)
    assert_clean_error(proc)
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"kubeflash run: error: {message}"), line
    assert not (tmp_path / "home" / "models").exists()  # refused before the model was converted


BAD_URIS = [("dummy:llama-9", "unknown dummy preset 'llama-9'; expected one of: smollm2-135m"),
            ("/nonexistent/model", "/nonexistent/model: no such file or directory (expected builtin:"),
            ("builtin:smollm2-1b", "builtin model 'smollm2-1b' is unknown; expected builtin:smollm2-135m")]


def _job_with_uri(tmp_path: Path, uri: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(EXAMPLE.read_text().replace("builtin:smollm2-135m", uri))
    assert uri in job.read_text()
    return job


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("uri, message", BAD_URIS, ids=["preset", "path", "builtin"])
def test_a_model_that_does_not_exist_names_spec_model_uri(tmp_path, command, uri, message):
    """A model URI that names nothing is one line starting with the field, exit 1, nothing left in the store."""
    extra = ["--device", "cpu", "--quiet"] if command == "run" else ["--ceilings", CEILINGS]
    proc = kubeflash(command, _job_with_uri(tmp_path, uri), *extra, tmp_path=tmp_path)
    assert_clean_error(proc)
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"kubeflash {command}: error: spec.model.uri: {message}"), line
    assert not list((tmp_path / "home").glob("models/*/manifest.json"))


@pytest.mark.parametrize("missing", [True, False], ids=["missing", "directory"])
def test_calibrate_names_a_text_it_cannot_read_before_converting(tmp_path, missing):
    """`kubeflash calibrate MODEL --text FILE` with no such file (or a folder) is one line naming --text, before the
    model is converted into the store (it used to convert first, then print a bare '[Errno 2] ...')."""
    text = tmp_path / "prose.txt" if missing else tmp_path
    proc = kubeflash("calibrate", "builtin:smollm2-135m", "--text", text, "--device", "cpu", "--quiet",
                     tmp_path=tmp_path)
    assert_clean_error(proc)
    what = "no such file" if missing else "is a directory"
    assert proc.stderr.strip() == f"kubeflash calibrate: error: --text {text}: {what}; expected a UTF-8 text file " \
                                  "of ordinary prose"
    assert not (tmp_path / "home" / "models").exists()


@pytest.mark.parametrize("model, message", [
    ("dummy:opt-9", "--model dummy:opt-9: unknown dummy preset 'opt-9'; expected one of: smollm2-135m"),
    ("builtin:smollm2-135m", "--model builtin:smollm2-135m: expected dummy:<preset> or a model directory kubeflash "
                             "convert --out DIR wrote"),
], ids=["unknown-preset", "source-not-converted"])
def test_bench_names_a_model_it_cannot_take(tmp_path, model, message):
    """bench takes a dummy preset or a converted directory (as its --help now says, not any source); anything else
    is one line naming --model."""
    proc = kubeflash("bench", "--no-ceilings", "--model", model, "--device", "cpu", "--store", tmp_path / "s",
                     tmp_path=tmp_path)
    assert_clean_error(proc)
    assert proc.stderr.strip().splitlines()[-1].startswith(f"kubeflash bench: error: {message}"), proc.stderr


# ------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("case", ["ceilings-missing", "ceilings-directory", "json-directory", "json-no-folder",
                                  "json-unwritable"])
def test_plan_names_a_file_it_cannot_read_or_write(tmp_path, case):
    """--ceilings that is not a file and --json that cannot be written: one line naming the flag, exit 1 (a --json
    in a missing folder used to end in a traceback after the plan was printed)."""
    args, message = {
        "ceilings-missing": (["--ceilings", tmp_path / "nope.json"],
                             f"--ceilings {tmp_path / 'nope.json'}: no such file; expected a ceilings JSON file"),
        "ceilings-directory": (["--ceilings", tmp_path], f"--ceilings {tmp_path}: is a directory; expected"),
        "json-directory": (["--ceilings", CEILINGS, "--json", tmp_path],
                           f"--json {tmp_path}: is a directory; expected the path of a JSON file"),
        "json-no-folder": (["--ceilings", CEILINGS, "--json", tmp_path / "no" / "plan.json"],
                           f"--json {tmp_path / 'no' / 'plan.json'}: {tmp_path / 'no'} is not a directory"),
        # root may write where os.access says so, but not into /sys: the check writes for real
        "json-unwritable": (["--ceilings", CEILINGS, "--json", "/sys/plan.json"],
                            "--json /sys/plan.json: /sys is not writable"),
    }[case]
    proc = kubeflash("plan", EXAMPLE, *args, tmp_path=tmp_path)
    assert_clean_error(proc)
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"kubeflash plan: error: {message}"), line
    assert proc.stdout == ""  # refused before anything was planned or printed


no_gpu = pytest.mark.skipif("_cuda()", reason="checks what happens on a machine without a GPU")


@no_gpu
def test_plan_without_gpu_prints_a_plan_and_what_it_assumed(tmp_path):
    proc = kubeflash("plan", EXAMPLE, "--ceilings", CEILINGS, "--json", tmp_path / "plan.json", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "assumed: no GPU here and no --gpu-memory or spec.resources.gpuMemory: planning for an 80 GiB GPU" \
        in proc.stdout
    assert "chosen:" in proc.stdout and "budgets: GPU 80.00 GiB" in proc.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["budget"]["gpu_bytes"] == 80 << 30


def test_plan_with_gpu_memory_assumes_nothing(tmp_path):
    proc = kubeflash("plan", EXAMPLE, "--ceilings", CEILINGS, "--gpu-memory", "12GiB", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "assumed:" not in proc.stdout and "budgets: GPU 12.00 GiB" in proc.stdout


def test_plan_without_ceilings_says_how_to_get_them(tmp_path):
    proc = kubeflash("plan", EXAMPLE, tmp_path=tmp_path)
    assert_clean_error(proc)
    assert "no ceilings: pass --ceilings FILE (kubeflash bench --ceilings-only --json FILE" in proc.stderr
    assert str(tmp_path / "home" / "ceilings.json") in proc.stderr


def test_plan_uses_the_ceilings_kubeflash_run_saved(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "ceilings.json").write_text(CEILINGS.read_text())
    proc = kubeflash("plan", EXAMPLE, "--gpu-memory", "12GiB", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"assumed: the ceilings saved in {tmp_path / 'home' / 'ceilings.json'}" in proc.stdout


def test_plan_refuses_ceilings_measured_without_a_gpu(tmp_path):
    """Ceilings with PCIe and matmul at 0 would make the cost model count them as free."""
    cpu_only = json.loads(CEILINGS.read_text()) | {"h2d_pinned": 0.0, "matmul_tflops": 0.0}
    (tmp_path / "c.json").write_text(json.dumps(cpu_only))
    proc = kubeflash("plan", EXAMPLE, "--ceilings", tmp_path / "c.json", "--gpu-memory", "12GiB", tmp_path=tmp_path)
    assert_clean_error(proc)
    assert f"--ceilings {tmp_path / 'c.json'}: h2d_pinned, matmul_tflops not measured" in proc.stderr


@no_gpu
def test_plan_measure_without_gpu_says_what_cannot_be_measured(tmp_path):
    proc = kubeflash("plan", EXAMPLE, "--measure", tmp_path=tmp_path)
    assert_clean_error(proc)
    assert "--measure: no CUDA GPU here, so PCIe and matmul cannot be measured" in proc.stderr


# ------------------------------------------------------------------------------------------- bench


@no_gpu
def test_bench_without_gpu_says_what_it_measured(tmp_path):
    proc = kubeflash("bench", "--ceilings-only", "--disk-probe", "64MiB", "--store", tmp_path / "s",
                     "--json", tmp_path / "c.json", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "PCIe:   not measured (needs a CUDA GPU; none here)" in proc.stdout
    assert "matmul: not measured (needs a CUDA GPU; none here)" in proc.stdout
    assert "disk:   read cold" in proc.stdout and " 0.0 GB/s" not in proc.stdout and "0 TFLOP" not in proc.stdout
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["ceilings"]["disk_read_cold"] > 0 and set(out["unmeasured"]) == {"h2d_pinned", "matmul_tflops"}


def test_bench_with_cpu_ceilings_leaves_out_what_was_not_measured(tmp_path):
    """A workload run whose ceilings lack PCIe and matmul: no cost-model prediction and no 0 s roofline terms."""
    cpu_only = json.loads(CEILINGS.read_text()) | {"h2d_pinned": 0.0, "h2d_pageable": 0.0, "d2h_pinned": 0.0,
                                                   "matmul_tflops": 0.0}
    (tmp_path / "c.json").write_text(json.dumps(cpu_only))
    proc = kubeflash("bench", "--model", "dummy:opt-125m", "--dtype", "float32", "--device", "cpu", "--store",
                     tmp_path / "s", "--prompts", "2", "--prompt-len", "8", "--gen-len", "2", "--ceilings",
                     tmp_path / "c.json", "--json", tmp_path / "r.json", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "policy: explicit defaults (the auto policy needs h2d_pinned, matmul_tflops, not measured)" in proc.stderr
    assert "cost model: no prediction (h2d_pinned, matmul_tflops not measured)" in proc.stdout
    assert "left out: pcie" in proc.stdout and "compute (" in proc.stdout and "pcie 0.000 s" not in proc.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["predicted_s"] is None and r["report"]["generated_tokens"] == 4


def test_bench_policy_auto_without_pcie_and_matmul_is_refused(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"disk_read_cold": 1.0}))
    proc = kubeflash("bench", "--model", "dummy:opt-125m", "--device", "cpu", "--policy", "auto", "--ceilings",
                     tmp_path / "c.json", "--store", tmp_path / "s", tmp_path=tmp_path)
    assert_clean_error(proc)
    assert "--policy auto plans from measured ceilings; h2d_pinned, matmul_tflops were not measured" in proc.stderr


# ------------------------------------------------------------------------------------------- --help


def _subcommands() -> list[str]:
    from kubeflash_node.cli import SUBCOMMANDS

    return list(SUBCOMMANDS)


@pytest.mark.parametrize("command", [None, *_subcommands()], ids=lambda c: c or "kubeflash")
def test_every_help_works(tmp_path, command):
    proc = kubeflash(*([command] if command else []), "--help", tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: kubeflash{' ' + command if command else ''}"), proc.stdout[:200]
    assert "Traceback" not in proc.stderr
    usage, _, options = proc.stdout.partition("options:")
    flags = [line for line in options.splitlines() if line.startswith("  -")]
    assert flags[0].split()[:2] == ["-h,", "--help"] and len(flags) >= 2  # and something to pass besides --help
    assert len(usage.split("\n\n", 1)[-1].split()) >= 5  # a description of what it does, not only the usage line


def test_every_option_of_every_subcommand_says_what_it_does():
    """No option in any subcommand's --help is a bare flag name: each has a help text (the agent's --log-format,
    csi's --log-level and bench's --dtype and --io-backend had none)."""
    import argparse
    import importlib

    from kubeflash_node.cli import SUBCOMMANDS

    bare = []
    for name, (module, _) in SUBCOMMANDS.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        bare += [f"{name} {a.option_strings[-1] if a.option_strings else a.dest}" for a in parser._actions
                 if not a.help]
    assert bare == []


# ------------------------------------------------------------------------------------------- structure


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_job_imports_no_cli_module():
    """job.py is the engine's core; CLI modules are the edge and may import it, never the reverse."""
    cli = {m for m in _imports(ENGINE / "job.py") if m.rsplit(".", 1)[-1].startswith("cli")}
    assert not cli
    code = ("import sys, kubeflash_node.engine.job\n"
            "print(sorted(m for m in sys.modules if m.startswith('kubeflash') and '.cli' in m))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


def test_every_policy_is_built_by_make_policy():
    """No engine module but policy.py constructs Policy(...) itself; make_policy is the one place."""
    builders = []
    for path in sorted(p for p in ENGINE.glob("*.py") if p.name != "policy.py"):
        tree = ast.parse(path.read_text())
        defaults = {id(d) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                    for d in f.args.defaults + f.args.kw_defaults if d is not None}  # e.g. Engine(policy=Policy())
        builders += [f"{path.name}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Call)
                     and getattr(n.func, "id", None) == "Policy" and id(n) not in defaults]
    assert builders == []


def test_make_policy_takes_io_settings_from_the_disk_probe():
    from kubeflash_node.engine.bench import Ceilings
    from kubeflash_node.engine.policy import Policy, make_policy

    probed = Ceilings(disk_read_threads=16, disk_read_task_bytes=64 << 20)
    assert make_policy() == Policy()
    assert (make_policy(probed).io_threads, make_policy(probed).io_task_bytes) == (16, 64 << 20)
    assert make_policy(probed, io_threads=2, kv="cpu") == Policy(io_threads=2, io_task_bytes=64 << 20, kv="cpu")
    assert make_policy(Ceilings(), default_io_threads=8).io_threads == 8
