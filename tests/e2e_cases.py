"""The end-to-end test bodies, written once and run against every cluster provider: tests/node (a real kubelet +
containerd on this machine, kind/realnode.py) and tests/kind (kind in Docker, kind/e2e.sh). Each provider passes
a handle with the same small interface, so both paths make identical assertions:

    kubectl(*args, input=None, check=True, timeout=120) -> CompletedProcess
    json(*args) -> dict                      kubectl ... -o json, parsed
    apply(text, namespace)                   kubectl apply -n namespace -f -
    on_node(node, *cmd, check=True)          a command on the node (the node's file system: its SSD store)
    workers() -> list[str]                   the kubeflash.io/ssd=true nodes

Both handles derive from Kubectl (kubectl with a kubeconfig); both conftests take a namespace per test from
namespace() and attach cluster_logs() to a failing test's report with attach_logs().
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from polling import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# A job that runs for a minute or more on the CPU: random OPT-125M weights (no download), synthetic prompts.
LONG_JOB = """
apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata:
  name: {name}
spec:
  model:
    uri: dummy:opt-125m
  input:
    synthetic: {{count: {count}, promptLength: 64}}
  generation:
    maxNewTokens: {tokens}
  resources:
    kvDisk: 1Gi
  offload: {{gpuBatchSize: 2, numGpuBatches: 1}}   # blocks of 2 prompts: progress moves prompt pair by pair
  backoffLimit: 3
"""


SYSTEM_NAMESPACE = "kubeflash-system"  # where the chart runs the operator and the agent


class Kubectl:
    """kubectl against one cluster; subclasses add on_node() (how to run a command on a node)."""

    def __init__(self, kubeconfig: Path, kubectl: str = "kubectl"):
        self.kubeconfig, self.binary = kubeconfig, kubectl

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.binary, f"--kubeconfig={self.kubeconfig}", *args], input=input,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, text: str, namespace: str) -> None:
        self.kubectl("apply", "-n", namespace, "-f", "-", input=text)

    def workers(self) -> list[str]:
        out = self.kubectl("get", "nodes", "-l", "kubeflash.io/ssd=true", "-o", "jsonpath={.items[*].metadata.name}")
        return sorted(out.stdout.split())


@contextlib.contextmanager
def namespace(c, prefix: str, labels: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh namespace `<prefix>-<6 hex>`; its jobs are deleted (finalizers run) and then the namespace."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    c.kubectl("create", "namespace", name)
    if labels:
        c.kubectl("label", "namespace", name, *(f"{k}={v}" for k, v in labels.items()))
    try:
        yield name
    finally:
        c.kubectl("delete", "ij", "--all", "-n", name, "--timeout=120s", check=False, timeout=180)
        c.kubectl("delete", "namespace", name, "--wait=false", check=False)


def cluster_logs(c, namespaces: Sequence[str] = (), lines: int = 80) -> str:
    """What a failing test prints, on every provider: the operator's and agents' logs, the pods of the test's
    namespaces with their logs, the cluster's warning events and every pod."""
    parts = []
    for component in ("operator", "agent"):
        p = c.kubectl("logs", "-n", SYSTEM_NAMESPACE, "-l", f"app.kubernetes.io/component={component}",
                      "--all-containers", f"--tail={lines}", "--prefix", check=False, timeout=30)
        parts.append(f"--- kubeflash-{component} pods ---\n{p.stdout}{p.stderr}")
    for ns in namespaces:
        p = c.kubectl("get", "pods,ij", "-n", ns, "-o", "wide", check=False, timeout=30)
        parts.append(f"--- namespace {ns} ---\n{p.stdout}{p.stderr}")
        p = c.kubectl("logs", "-n", ns, "-l", "kubeflash.io/job", "--all-containers", f"--tail={lines}", "--prefix",
                      check=False, timeout=30)
        parts.append(p.stdout + p.stderr)
    ev = c.kubectl("get", "events", "-A", "--field-selector=type!=Normal", "--sort-by=.lastTimestamp", check=False,
                   timeout=30)
    pods = c.kubectl("get", "pods", "-A", "-o", "wide", check=False, timeout=30)
    parts.append(f"--- warning events ---\n{ev.stdout[-4000:]}\n--- pods ---\n{pods.stdout}")
    return "\n".join(parts)


def attach_logs(rep, item, c, title: str, extra: Callable[[], str] | None = None) -> None:
    """For a conftest's pytest_runtest_makereport hookwrapper: a test that failed in its call gets a report
    section with extra() (provider-specific logs, e.g. kubelet and containerd) and cluster_logs() of the cluster
    handle c (None while no cluster is up) for the namespaces among its fixtures."""
    if rep.when != "call" or not rep.failed or c is None:
        return
    namespaces = [v for k, v in item.funcargs.items() if k.endswith("namespace") and isinstance(v, str)]
    try:
        text = (extra() + "\n" if extra else "") + cluster_logs(c, namespaces)
    except Exception as e:  # the report must not hide the test's own failure
        text = f"could not collect: {type(e).__name__}: {e}"
    rep.sections.append((title, text))


def wait_for(what: str, get: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 300.0,
             every: float = 2.0) -> Any:
    return _wait_for(what, get, ok, timeout=timeout, every=every)


def job(c, ns: str, name: str) -> dict:
    proc = c.kubectl("get", "ij", name, "-n", ns, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def phase(j: dict) -> str:
    return (j.get("status") or {}).get("phase", "")


def events(c, ns: str, name: str) -> str:
    return c.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}",
                     "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message", check=False).stdout


def why_not(c, ns: str, name: str) -> str:
    """The reasons a job is not done: its status, its events, its pods' events and logs."""
    j = job(c, ns, name)
    out = [f"status: {json.dumps(j.get('status'), indent=1)}", f"events:\n{events(c, ns, name)}"]
    for p in job_pods(c, ns, name):
        pod = p["metadata"]["name"]
        out.append(f"pod {pod} phase {p['status'].get('phase')}; events:\n{events(c, ns, pod)}")
        out.append(c.kubectl("logs", "-n", ns, pod, "--all-containers", "--tail=60", check=False).stdout)
    return "\n".join(out)


def wait_phase(c, ns: str, name: str, wanted: set[str], timeout: float = 900) -> dict:
    try:
        j = wait_for(f"job {ns}/{name} to reach {sorted(wanted)}", lambda: job(c, ns, name),
                     lambda j: phase(j) in wanted | {"Failed"}, timeout=timeout, every=3)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{why_not(c, ns, name)}") from None
    if phase(j) not in wanted:
        raise AssertionError(f"job {name} ended {phase(j)}\n{why_not(c, ns, name)}")
    return j


def job_dir(c, j: dict) -> tuple[str, str]:
    """(node, the job's directory on that node's SSD) from the job's status and its node's FlashNode."""
    node, disk = j["status"]["node"], j["status"]["disk"]
    disks = c.json("get", "flashnode", node)["status"]["disks"]
    root = next(d["path"] for d in disks if d["name"] == disk)
    meta = j["metadata"]
    return node, f"{root}/jobs/{meta['namespace']}/{meta['name']}"


def job_pods(c, ns: str, name: str) -> list[dict]:
    return c.json("get", "pods", "-n", ns, "-l", f"kubeflash.io/job={name}")["items"]


def results(c, j: dict) -> list[dict]:
    node, path = job_dir(c, j)
    return [json.loads(line) for line in c.on_node(node, "cat", f"{path}/results.jsonl").stdout.splitlines()
            if line.strip()]


def ij_table(c, ns: str) -> dict[str, dict[str, str]]:
    """`kubectl get ij` as {name: {COLUMN: value}} (the printer columns of the CRD)."""
    lines = c.kubectl("get", "ij", "-n", ns).stdout.splitlines()
    import re
    starts = [(m.group(0), m.start()) for m in re.finditer(r"\S+", lines[0])]
    table = {}
    for row in lines[1:]:
        cells = {name: row[start:(starts[i + 1][1] if i + 1 < len(starts) else None)].strip()
                 for i, (name, start) in enumerate(starts)}
        table[cells["NAME"]] = cells
    return table


# ---------------------------------------------------------------- the cases
def capital_of_france_answers_paris(c, ns: str) -> None:
    """The README's example, submitted with kubectl: staged, run on a worker, the answer on its SSD."""
    c.apply((EXAMPLES / "capital-of-france.yaml").read_text(), ns)
    j = wait_phase(c, ns, "capital-of-france", {"Succeeded"})
    res = results(c, j)
    assert len(res) == 1 and "Paris" in json.dumps(res[0]), res
    assert j["status"]["progress"]["promptsDone"] == 1
    assert j["status"].get("timings"), "the agent relayed no per-layer timings"
    row = ij_table(c, ns)["capital-of-france"]
    assert row.get("PHASE") == "Succeeded" and row.get("NODE") == j["status"]["node"], row
    assert row.get("PROGRESS", "").startswith("1"), row


def cluster_smollm2_two_prompts(c, ns: str) -> None:
    """examples/cluster-smollm2.yaml: both prompts answered, the first with Paris; the table has every column."""
    c.apply((EXAMPLES / "cluster-smollm2.yaml").read_text(), ns)
    j = wait_phase(c, ns, "smollm2-hello", {"Succeeded"})
    res = results(c, j)
    assert len(res) == 2, res
    assert "Paris" in json.dumps(res[0]), res[0]
    assert j["status"]["progress"]["promptsDone"] == 2
    row = ij_table(c, ns)["smollm2-hello"]
    for column in ("PHASE", "MODEL", "NODE", "PROGRESS", "TOKENS/S"):
        assert row.get(column) not in (None, "", "<none>"), (column, row)
    assert row["PHASE"] == "Succeeded" and float(row["TOKENS/S"]) > 0, row


def results_reach_the_output_configmap(c, ns: str) -> None:
    """A batch from a ConfigMap, results copied by the agent into spec.output.configMap when the job ends,
    checked line by line against the input's custom_ids."""
    c.apply((EXAMPLES / "cluster-batch-configmap.yaml").read_text(), ns)
    wait_phase(c, ns, "capitals", {"Succeeded"})
    cm = wait_for("the results ConfigMap", lambda: c.kubectl(
        "get", "configmap", "capitals-results", "-n", ns, "-o", "json", check=False),
        lambda p: p.returncode == 0 and "results.jsonl" in (json.loads(p.stdout).get("data") or {}), timeout=60)
    # the operator creates the ConfigMap before the pod; the agent fills it in when the job has ended
    lines = [json.loads(line) for line in json.loads(cm.stdout)["data"]["results.jsonl"].splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["fr", "jp"]
    for line in lines:  # each an OpenAI batch output line: a 200 with an answer of at most max_tokens (16)
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and line.get("error") is None, line
        assert body["choices"][0]["message"]["content"].strip(), line
        assert 0 < body["usage"]["completion_tokens"] <= 16, body["usage"]


def deleting_a_job_removes_its_pod_and_directory(c, ns: str) -> None:
    """Deleting an InferenceJob deletes its pod (finalizer) and the agent removes its directory on the SSD."""
    c.apply((EXAMPLES / "capital-of-france.yaml").read_text(), ns)
    j = wait_phase(c, ns, "capital-of-france", {"Succeeded"})
    node, path = job_dir(c, j)
    assert c.on_node(node, "test", "-d", path, check=False).returncode == 0
    assert job_pods(c, ns, "capital-of-france"), "the finished job's pod should stay until the job is deleted"
    c.kubectl("delete", "ij", "capital-of-france", "-n", ns, "--wait=false")
    wait_for("the job to be gone", lambda: job(c, ns, "capital-of-france"), lambda j: not j, timeout=120)
    wait_for("its pod to be gone", lambda: job_pods(c, ns, "capital-of-france"), lambda pods: not pods, timeout=120)
    wait_for(f"{node}:{path} to be removed by the agent",
             lambda: c.on_node(node, "test", "-e", path, check=False).returncode, lambda rc: rc != 0, timeout=120)
    kv = c.json("get", "flashnode", node)["status"].get("kvAllocations") or []
    assert not [a for a in kv if a.get("job") == f"{ns}/capital-of-france"], "the job's KV space is still allocated"


def _running_with_progress(c, ns: str, name: str, done: int = 1) -> dict:
    return wait_for(f"job {name} to run and finish {done} prompt(s)", lambda: job(c, ns, name),
                    lambda j: phase(j) in ("Running", "Succeeded", "Failed")
                    and ((j.get("status") or {}).get("progress") or {}).get("promptsDone", 0) >= done,
                    timeout=600, every=2)


def killed_inference_pod_resumes_exactly_once(c, ns: str) -> None:
    """The inference pod killed mid-run: a new attempt resumes, and every prompt's result appears exactly once."""
    count = 12  # six blocks of two: an idle node finishes one in seconds, so the kill lands mid-run
    c.apply(LONG_JOB.format(name="resume", count=count, tokens=64), ns)
    j = _running_with_progress(c, ns, "resume")
    assert phase(j) == "Running", f"the job finished before the pod could be killed: {j.get('status')}"
    first = j["status"]["pod"]
    c.kubectl("delete", "pod", first, "-n", ns, "--grace-period=0", "--force", check=False)
    j = wait_phase(c, ns, "resume", {"Succeeded"})
    assert j["status"].get("attempt", 1) >= 2 or j["status"].get("pod") != first, j["status"]
    ids = [r.get("custom_id") for r in results(c, j)]
    assert len(ids) == count and len(set(ids)) == count, f"results not exactly once per prompt: {ids}"


def deleting_a_running_job_releases_everything(c, ns: str) -> None:
    """The job deleted mid-run: its pod is gone, its KV space released, its finalizer cleared (the object goes)."""
    c.apply(LONG_JOB.format(name="doomed", count=8, tokens=128), ns)
    j = _running_with_progress(c, ns, "doomed", done=0)
    wait_for("the job's pod to run", lambda: job_pods(c, ns, "doomed"),
             lambda pods: any(p["status"].get("phase") == "Running" for p in pods), timeout=300)
    node = j["status"]["node"]
    c.kubectl("delete", "ij", "doomed", "-n", ns, "--wait=false")
    wait_for("the job (finalizer cleared) to be gone", lambda: job(c, ns, "doomed"), lambda j: not j, timeout=180)
    wait_for("its pod to be gone", lambda: job_pods(c, ns, "doomed"), lambda pods: not pods, timeout=180)
    wait_for("its KV space to be released", lambda: c.json("get", "flashnode", node)["status"].get("kvAllocations")
             or [], lambda kv: not [a for a in kv if a.get("job") == f"{ns}/doomed"], timeout=120)


def operator_restarted_mid_job_still_completes(c, ns: str, operator_ns: str) -> None:
    """The operator's pod deleted while a job runs: the new operator picks the job up and it completes."""
    c.apply(LONG_JOB.format(name="survivor", count=4, tokens=32), ns)
    _running_with_progress(c, ns, "survivor", done=0)
    sel = "app.kubernetes.io/component=operator"
    old = {p["metadata"]["name"] for p in c.json("get", "pods", "-n", operator_ns, "-l", sel)["items"]}
    c.kubectl("delete", "pod", "-n", operator_ns, "-l", sel, "--wait=false")
    wait_for("a new operator pod to run", lambda: c.json("get", "pods", "-n", operator_ns, "-l", sel)["items"],
             lambda pods: any(p["metadata"]["name"] not in old and p["status"].get("phase") == "Running"
                              for p in pods), timeout=300)
    j = wait_phase(c, ns, "survivor", {"Succeeded"})
    assert len(results(c, j)) == 4


def malformed_job_is_refused_with_the_field_path(c, ns: str) -> None:
    """An InferenceJob with a bad field: refused by the API server (CRD schema) or Failed by the operator; either
    way the message names the field path."""
    bad = """
apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata:
  name: malformed
spec:
  model:
    uri: builtin:smollm2-135m
  input:
    prompts: [hello]
  generation:
    maxNewTokens: -5
"""
    proc = c.kubectl("apply", "-n", ns, "-f", "-", input=bad, check=False)
    if proc.returncode != 0:
        assert "maxNewTokens" in proc.stderr, proc.stderr
        return
    deadline = time.monotonic() + 120
    text = ""
    while time.monotonic() < deadline:
        j = job(c, ns, "malformed")
        text = json.dumps(j.get("status")) + events(c, ns, "malformed")
        if phase(j) == "Failed" and "maxNewTokens" in text:
            return
        time.sleep(2)
    raise AssertionError(f"the malformed job was neither refused nor Failed naming spec.generation.maxNewTokens: {text}")
