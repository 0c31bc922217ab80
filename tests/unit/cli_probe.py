"""Run one `kubeflash` subcommand through the real dispatcher in a fresh interpreter and report its exit code and
whether torch got imported: how the newcomer tests prove a bad input is refused before any heavy work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
PY = str(PYTHON) if PYTHON.exists() else sys.executable

PROBE = """
import json, sys
from kubeflash_node import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def dispatch(cwd: Path, *args: str) -> tuple[dict, str]:
    """({"code": exit code, "torch": imported?}, stderr) of `kubeflash *args` run in `cwd`; no traceback allowed."""
    proc = subprocess.run([PY, "-c", PROBE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
