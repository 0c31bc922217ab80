"""`kubeflash plan` refuses a --prompt-len past the model's context window, an unknown builtin model, ceilings that
are not JSON and a --json naming a folder before torch is imported, in well under a second, naming what is wrong.

Found by trying the product as a newcomer: plan imported torch (through bench) before reading --ceilings, so every
refusal took ~3 s on this machine, and --prompt-len 99999999999 was priced and came back as 'no candidate policy
fits ... raise a budget'. Each case runs the real dispatcher in a fresh interpreter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_probe import dispatch

CEILINGS = Path(__file__).resolve().parents[2] / "docs" / "bench-results" / "ceilings.json"


def _plan(tmp_path: Path, *args: str, uri: str = "builtin:smollm2-135m") -> tuple[dict, str]:
    job = tmp_path / "job.yaml"
    job.write_text("apiVersion: kubeflash.io/v1alpha1\nkind: InferenceJob\nmetadata: {name: j}\nspec:\n"
                   f"  model: {{uri: '{uri}'}}\n  input: {{prompts: [hi]}}\n  generation: {{maxNewTokens: 4}}\n")
    return dispatch(tmp_path, "plan", str(job), "--store", str(tmp_path / "store"), *args)


@pytest.mark.parametrize(("args", "uri", "expected"), [
    (["--ceilings", str(CEILINGS), "--prompt-len", "8189"], "builtin:smollm2-135m",
     "--prompt-len 8189: 8189 + 4 generated tokens exceed the model's context window of 8192 tokens; "
     "expected at most 8188"),
    (["--ceilings", str(CEILINGS)], "builtin:smollm2-136m",
     "spec.model.uri: builtin model 'smollm2-136m' is unknown; expected builtin:smollm2-135m"),
    (["--ceilings", "job.yaml"], "builtin:smollm2-135m", "job.yaml: not JSON"),
], ids=["prompt-len-past-context", "unknown-builtin", "ceilings-not-json"])
def test_refused_before_torch_naming_the_input(tmp_path, args, uri, expected):
    result, err = _plan(tmp_path, *args, uri=uri)
    assert result == {"code": 1, "torch": False}, err
    assert f"kubeflash plan: error: {expected}" in err


def test_json_naming_a_folder_is_a_usage_error(tmp_path):
    """`--json out/` was written as a file named out."""
    result, err = _plan(tmp_path, "--ceilings", str(CEILINGS), "--json", "out/")
    assert result == {"code": 2, "torch": False}, err
    assert "argument --json: 'out/' ends in '/'; expected the path of a file" in err
    assert not (tmp_path / "out").exists()


def test_budgets_nothing_fits_say_where_they_came_from_and_the_least_any_plan_needs(tmp_path):
    """`--gpu-memory 1` was answered 'no candidate policy fits 0.0 GiB of GPU ...' without saying which input set that
    budget or how much would do."""
    result, err = _plan(tmp_path, "--ceilings", str(CEILINGS), "--gpu-memory", "1", "--cpu-memory", "1Mi")
    assert result["code"] == 1, err
    line = next(ln for ln in err.splitlines() if ln.startswith("kubeflash plan: error: "))
    assert "no candidate policy fits 0.0 GiB of GPU and 0.0 GiB of CPU memory" in line
    assert "(GPU budget from --gpu-memory, CPU budget from --cpu-memory)" in line
    least = float(line.split("the least GPU any candidate needs is ")[1].split(" GiB")[0])
    assert 1.0 < least < 2.0, line  # the 1 GiB reserve and SmolLM2's smallest working set (~0.07 GiB)
    ok, out = _plan(tmp_path, "--ceilings", str(CEILINGS), "--gpu-memory", f"{least + 0.01:.2f}Gi", "--cpu-memory", "64Gi")
    assert ok["code"] == 0, out  # and that much is enough
