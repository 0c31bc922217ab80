"""`kubeflash engine` (the inference pod's entry point) names KUBEFLASH_JOB_SPEC when it holds no JSON.

Found by trying the product as a newcomer: a pod whose KUBEFLASH_JOB_SPEC was not JSON exited with only
"Expecting property name enclosed in double quotes: line 1 column 2", naming no variable. Runs the real dispatcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
PY = str(PYTHON) if PYTHON.exists() else sys.executable


def test_job_spec_that_is_not_json_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEFLASH_")}
    env |= {"KUBEFLASH_JOB_SPEC": "{bad", "KUBEFLASH_JOB_NAME": "j", "KUBEFLASH_MODEL_DIR": str(tmp_path / "m"),
            "KUBEFLASH_JOB_DIR": str(tmp_path / "job")}
    proc = subprocess.run([PY, "-m", "kubeflash_node.cli", "engine", "--device", "cpu"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("kubeflash engine: error: environment variable KUBEFLASH_JOB_SPEC: not JSON (")
    assert line.endswith("expected the job's canonical spec (kubeflash_api.to_canonical) as JSON, "
                         "as the operator sets it")
    assert not (tmp_path / "job").exists()
