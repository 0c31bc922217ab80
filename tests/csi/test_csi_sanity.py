"""csi-sanity (github.com/kubernetes-csi/csi-test/v5, built from its Go module and cached) against the real
`kubeflash csi` socket: every applicable spec must pass, and every skipped spec must be skipped for a reason
stated here (ours) or by csi-sanity itself (a capability the driver does not advertise).

`make csi-sanity` runs this file with -v, which prints the table of skipped specs and their reasons.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.csi
ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "kind" / "build-csi-sanity.sh"
CONTROLLER = ("kubeflash.io has no Controller service: its volumes are CSI ephemeral inline volumes, created by "
              "NodePublishVolume on the node the pod runs on, so there is nothing to provision or attach")
NEEDS_CREATE = ("provisions its volume with Controller CreateVolume, which a node-only driver does not offer; "
                "tests/csi/test_csi_node.py checks the same behaviour on inline volumes")
# (regex over the spec's full name, reason); each becomes a -ginkgo.skip
SKIPS = [
    (r"\[Controller Server\]", CONTROLLER),
    (r"NodeUnpublishVolume should remove target path", NEEDS_CREATE),
    (r"NodeGetVolumeStats should fail when volume does not exist on the specified path", NEEDS_CREATE),
]


@pytest.fixture(scope="session")
def csi_sanity() -> Path:
    if not shutil.which("go") and subprocess.run([str(BUILD), "--check"]).returncode != 0:
        pytest.skip("csi-sanity is not built and Go is not installed to build it (kind/build-csi-sanity.sh)")
    p = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    return Path(p.stdout.strip().splitlines()[-1])


def _cases(report: Path) -> list[tuple[str, str, str]]:
    """(name, status, message) of every spec in a ginkgo JUnit report."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = re.sub(r"^\[\w+\]\s*", "", case.get("name", ""))
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status, message = ("failed" if tag != "skipped" else "skipped"), (el.get("message") or el.text or "")
                break
        out.append((name, case.get("status") or status, message.strip()))
    return out


def _reason(name: str, message: str) -> str:
    for pattern, reason in SKIPS:
        if re.search(pattern, name):
            return f"ours: {reason}"
    m = re.search(r"skipped - (.+?)(?: @|$)|\[SKIPPED\]\s*(.+?)(?:\n|$)", message)
    text = (m.group(1) or m.group(2)) if m else message
    return f"csi-sanity: {text.strip()}" if text.strip() else ""


def test_csi_sanity_passes_every_applicable_spec(driver, csi_sanity):
    report = driver.root / "junit.xml"
    cmd = [str(csi_sanity), f"--csi.endpoint={driver.socket}", f"--csi.mountdir={driver.pods}/sanity-target",
           f"--csi.stagingdir={driver.pods}/sanity-staging", "-ginkgo.no-color", f"-ginkgo.junit-report={report}"]
    cmd += [f"-ginkgo.skip={pattern}" for pattern, _ in SKIPS]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    cases = _cases(report)
    failed = [(n, m) for n, s, m in cases if s not in ("passed", "skipped", "pending")]
    assert not failed, f"csi-sanity failures: {failed}\n{p.stdout[-4000:]}"
    assert p.returncode == 0, p.stdout[-4000:]
    passed = [n for n, s, _ in cases if s == "passed"]
    skipped = [(n, _reason(n, m)) for n, s, m in cases if s in ("skipped", "pending")]
    print(f"\ncsi-sanity: {len(passed)} passed, {len(skipped)} skipped")
    for name in passed:
        print(f"  PASS {name}")
    for name, why in skipped:
        print(f"  SKIP {name}\n       {why}")
    assert len(passed) >= 13, passed  # identity, node info/capabilities, publish/unpublish/stats argument checks
    assert [n for n, why in skipped if not why] == [], "skipped without a stated reason"
