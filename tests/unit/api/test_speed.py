"""A bad manifest is refused in under a second and before torch is imported (issue 14, DESIGN.md: one CLI with
lazy imports), whatever is wrong with it.

Each case runs the real `kubeflash` dispatcher (kubeflash_node.cli.main) in a fresh interpreter, so what counts is
what a user's `kubeflash run bad.yaml` imports: the exit code, stderr naming the field, "torch" never in
sys.modules, and the time from the call to the refusal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PYTHON = REPO / ".venv" / "bin" / "python"
PY = str(PYTHON) if PYTHON.exists() else sys.executable

PROBE = """
import json, sys, time
t = time.monotonic()
from kubeflash_node import cli
code = cli.main(["run", sys.argv[1], "--job-dir", sys.argv[2]])
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "seconds": time.monotonic() - t}))
"""

HEAD = "apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: NAME}\nspec:\n" \
       "  model: {uri: builtin:smollm2-135m}\n"
PROMPTS = "  input: {prompts: [hi]}\n"
BATCH = json.dumps({"custom_id": "a", "body": {"messages": [{"role": "user", "content": 5}]}}) + "\n"

CASES = [  # (id, manifest text, what stderr must say)
    ("nan-temperature", HEAD + PROMPTS + "  generation: {temperature: .nan}\n",
     "spec.generation.temperature must be a finite number"),
    ("unknown-field", HEAD + PROMPTS + "  generation: {max_tokens: 5}\n",
     "spec.generation.max_tokens is not a known field"),
    ("content-not-string", HEAD + "  input: {file: b.jsonl}\n", "b.jsonl:1: body.messages[0].content must be a string"),
    ("name-traversal", HEAD.replace("NAME", "'../../x'") + PROMPTS, "metadata.name must be a DNS-1123 label"),
    ("two-documents", HEAD + PROMPTS + "---\n" + HEAD + PROMPTS, "holds 2 YAML documents"),
    ("missing-input-file", HEAD + "  input: {file: nowhere.jsonl}\n", "spec.input.file:"),
    ("kv-split", HEAD + PROMPTS + "  offload: {policy: explicit, weights: {disk: 100}, kv: {gpu: 50, disk: 50}}\n",
     "spec.offload.kv must put 100 on one of gpu, cpu or disk"),
    ("output-escape", HEAD + PROMPTS + "  output: {path: ../elsewhere.jsonl}\n", "spec.output.path must be a path"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_fast_and_without_torch(tmp_path, text, expected):
    """Exit 1, the field on stderr, no torch imported, under a second from the call (interpreter start aside)."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text(text.replace("NAME", "j"))
    (tmp_path / "b.jsonl").write_text(BATCH)
    proc = subprocess.run([PY, "-c", PROBE, str(manifest), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 1, proc.stderr
    assert expected in proc.stderr
    assert proc.stderr.startswith("kubeflash run: error: ")
    assert result["torch"] is False, "a refusal imported torch (see kubeflash_node.engine.cli_run.main)"
    assert result["seconds"] < 1.0, result
    assert not (tmp_path / "out").exists(), "a refused job created its job directory"
