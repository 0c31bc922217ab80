"""A manifest file holding two YAML documents is refused with a message that fits both commands that read it.

Found by trying the product as a newcomer: `kubeflash plan examples/cluster-batch-configmap.yaml` (a ConfigMap and
an InferenceJob in one file, for kubectl) said "kubeflash run takes exactly one InferenceJob per file" under
`kubeflash plan: error:`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
PY = str(PYTHON) if PYTHON.exists() else sys.executable
EXAMPLE = REPO / "examples" / "cluster-batch-configmap.yaml"


def test_plan_and_run_name_both_commands_for_a_two_document_file(tmp_path):
    for command in ("plan", "run"):
        proc = subprocess.run([PY, "-m", "kubeflash_node.cli", command, str(EXAMPLE), "--store", str(tmp_path)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line == (f"kubeflash {command}: error: {EXAMPLE} holds 2 YAML documents (ConfigMap, InferenceJob); "
                        "kubeflash run and plan take exactly one InferenceJob per file")
