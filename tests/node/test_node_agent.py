"""The node agent under faults and attacks, on the session's real node:
- the agent pod deleted while it stages a model (issue 15): the new agent stages it again, nothing half-written
  ever sits under the model's name, and the model becomes Ready with every file matching its manifest's sha256;
- a pod in the job's namespace that replaces the job's results.jsonl with a symlink to another tenant's results
  and progress.json with one to the agent's service-account token (issue 17): the agent follows neither, so the
  output ConfigMap, the job's status and the FlashNode never hold those bytes, and the ConfigMap says why;
- the chart's default agent process is uid 1000 with no capabilities, and a pod that replaces a finished job's
  kv/ with a link to the store's root-owned csi/ changes nothing there; the job ends Failed naming kv.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import podkit as kit
import pytest

from kubeflash_api.inferencejob import DTYPES
from kubeflash_api.names import model_id
from kubeflash_node.store.format import checked_files, load_manifest, verify

import e2e_cases as cases
from e2e_cases import job, phase, wait_for, wait_phase

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

# About 2.6 GB of random weights: staging takes tens of seconds here, long enough to be caught in the middle.
STAGED_URI = "dummy:opt-1.3b"
STAGE_JOB = """
apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {{name: restage}}
spec:
  model: {{uri: "{uri}", dtype: {dtype}}}
  input: {{synthetic: {{count: 1, promptLength: 8}}}}
  generation: {{maxNewTokens: 1}}
  resources: {{kvDisk: 1Gi}}
"""


def _fresh_dtype(c) -> str:
    """A dtype whose STAGED_URI model the node neither holds nor wants yet (a reused cluster may hold some)."""
    fn = c.json("get", "flashnode", kit.realnode.NODE_NAME)
    known = {m.get("id") for m in (fn.get("status") or {}).get("models") or []}
    known |= {m.get("id") for m in (fn.get("spec") or {}).get("models") or []}
    fresh = [d for d in DTYPES if model_id(STAGED_URI, dtype=d) not in known]
    if not fresh:
        pytest.skip(f"every dtype of {STAGED_URI} is already on this node: run on a fresh cluster (make cluster-down)")
    return fresh[0]


def _whole_or_absent(folder: Path) -> bool:
    """models/<id> is absent, or holds its manifest and every file the manifest lists at its full size."""
    if not folder.exists():
        return True
    try:
        manifest = load_manifest(folder)
    except Exception:
        return False
    return all((folder / name).stat().st_size == size for name, (size, _) in checked_files(manifest).items())


def test_agent_deleted_mid_staging_restages_and_serves_only_verified(node_cluster, node_namespace):
    c, ns = node_cluster, node_namespace
    disk, dtype = kit.store(c), _fresh_dtype(c)
    mid = model_id(STAGED_URI, dtype=dtype)
    final = disk / "models" / mid
    c.apply(STAGE_JOB.format(uri=STAGED_URI, dtype=dtype), ns)

    polls = [0]

    def half_written():
        polls[0] += 1
        if polls[0] % 20 == 0 and phase(j := job(c, ns, "restage")) == "Failed":
            raise AssertionError(f"the job failed before its model was staged: {j.get('status')}")
        try:
            return [d for d in (disk / "models").glob(f".staging-{mid}-*")
                    if any(f.is_file() and f.stat().st_size > 0 for f in d.rglob("*"))]
        except FileNotFoundError:  # a file renamed while we looked
            return []
    (half,) = wait_for(f"the agent to write part of {mid} into models/.staging-*", half_written, bool,
                       timeout=300, every=0.2)
    assert not final.exists(), f"{final} exists while the model is still being written"
    kit.restart_agent(c)

    def state():
        assert _whole_or_absent(final), f"{final} is there but incomplete"
        rows = c.json("get", "flashnode", kit.realnode.NODE_NAME)["status"].get("models") or []
        return next((r for r in rows if r.get("id") == mid), {})
    row = wait_for(f"{mid} to be Ready", state, lambda r: r.get("state") in ("Ready", "Failed"), timeout=420, every=1)
    assert row["state"] == "Ready", row
    c.kubectl("delete", "ij", "restage", "-n", ns, "--wait=false")  # its pod would run 1.3B parameters on the CPU
    assert not half.exists(), f"the half-written {half} was left behind"
    assert not list((disk / "models").glob(f".staging-{mid}-*")), "staging leftovers"
    manifest = verify(final)  # every file's sha256 as the manifest says
    assert row.get("bytes", 0) >= sum(size for size, _ in checked_files(manifest).values()) > 2 << 30, row


VICTIM_JOB = """
apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {name: victim}
spec:
  model: {uri: builtin:smollm2-135m}
  input: {prompts: ["What is the capital of France?"]}
  generation: {maxNewTokens: 8, temperature: 0}
"""

LEAKY_JOB = """
apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {name: leaky}
spec:
  model: {uri: builtin:smollm2-135m}
  input: {prompts: ["Name a colour.", "Name a fruit.", "Name a river."]}
  generation: {maxNewTokens: 32}
  output: {configMap: {name: leaky-results}}
"""

# Mounts the leaky job's directory (its own namespace's job volume); once the engine wrote every result, keeps
# results.jsonl and progress.json replaced by symlinks (re-planted whenever the engine writes them again).
PLANTER = """
import os, time
links = {{'results.jsonl': {victim!r}, 'progress.json': {token!r}}}
def lines():
    try:
        with open('/job/results.jsonl', 'rb') as f:
            return f.read().count(b'\\n')
    except OSError:
        return 0
print('WATCHING', flush=True)
while lines() < {count}:
    time.sleep(0.05)
while True:
    for name, target in links.items():
        path = '/job/' + name
        if not (os.path.islink(path) and os.readlink(path) == target):
            tmp = '/job/.' + name + '.planted'
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(target, tmp)
            os.replace(tmp, path)
            print('PLANTED', name, flush=True)
    time.sleep(0.05)
"""
TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # in the agent's container


def _agent_token(c) -> bytes:
    """The agent's service-account token, read on the node from the kubelet's projected volume of its pod."""
    uid = kit.agent_pod(c)["metadata"]["uid"]
    (token,) = (kit.PODS_DIR / uid / "volumes" / "kubernetes.io~projected").glob("*/token")
    return token.read_bytes()


def test_planted_symlinks_are_not_followed_by_the_agent(node_cluster, node_namespace):
    """A pod that replaces results.jsonl and progress.json with links to another tenant's results and the agent's
    token: neither reaches the ConfigMap, the job or the FlashNode; the job ends Failed (ResultsRefused)."""
    c, ns = node_cluster, node_namespace
    disk = kit.store(c)
    with cases.namespace(c, "victim") as other:
        victim_path = disk / "jobs" / other / "victim" / "results.jsonl"
        c.apply(VICTIM_JOB, other)
        wait_phase(c, other, "victim", {"Succeeded"})  # its results exist before the attack starts
        c.apply(LEAKY_JOB, ns)
        kit.create(c, ns, kit.pod("planter", kit.node_image(c), PLANTER.format(victim=str(victim_path), token=TOKEN,
                                                                                   count=3),
                                  {"job": kit.csi(job="leaky")}, {"job": "/job"}))
        secret = victim_path.read_bytes()
        needles = [line.strip()[:80] for line in secret.decode().splitlines() if line.strip()]
        assert needles, f"the victim wrote no results: {secret!r}"
        owner = victim_path.stat()
        token = _agent_token(c).decode()
        seen: list = []

        def configmap() -> dict:
            p = c.kubectl("get", "configmap", "leaky-results", "-n", ns, "-o", "json", check=False)
            data = (json.loads(p.stdout).get("data") or {}) if p.returncode == 0 else {}
            seen.append(data)
            return data
        wait_for("the leaky job to end", lambda: (configmap(), job(c, ns, "leaky"))[1],
                 lambda j: phase(j) in ("Succeeded", "Failed"), timeout=600, every=1)
        planted = kit.log(c, ns, "planter")
        assert "PLANTED results.jsonl" in planted and "PLANTED progress.json" in planted, planted
        data = wait_for("the agent to refuse results.jsonl in the ConfigMap", configmap,
                        lambda d: "refused" in (d.get("error") or ""), timeout=90, every=1)
        assert "results.jsonl" in data["error"] and not data.get("results.jsonl"), data
        # the agent reports what it refused (status.refused) and the operator fails the job, naming the files
        failed = wait_for("the leaky job to be Failed (ResultsRefused)", lambda: job(c, ns, "leaky"),
                          lambda j: phase(j) == "Failed" and j["status"].get("reason") == "ResultsRefused",
                          timeout=90, every=1)
        assert "results.jsonl" in failed["status"]["message"] and "progress.json" in failed["status"]["message"]
        time.sleep(5)  # a few more agent passes (every 2 s)
        configmap()
        seen += [c.json("get", "ij", "leaky", "-n", ns), c.json("get", "flashnode", kit.realnode.NODE_NAME)]
        texts = [t for obj in seen for t in _strings(obj)]
        assert not [t for t in texts for n in needles if n in t], "another tenant's results leaked"
        assert not [t for t in texts if token in t or "eyJhbGci" in t], "the agent's token leaked"
        after = victim_path.stat()
        assert (after.st_uid, after.st_gid, after.st_mode, after.st_size) == (
            owner.st_uid, owner.st_gid, owner.st_mode, owner.st_size), "the victim's results were touched"
        assert victim_path.read_bytes() == secret


def _strings(obj):
    """Every string in a JSON document, keys and values, unescaped."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


KV_JOB = """
apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {name: kvlink}
spec:
  model: {uri: builtin:smollm2-135m}
  input: {prompts: ["Name a colour."]}
  generation: {maxNewTokens: 4, temperature: 0}
"""

# Mounts the finished job's directory and replaces its kv/ with a symlink to `target` (kept planted).
KV_PLANTER = """
import os, time
os.rename('/job/kv', '/job/kv-moved')
os.symlink({target!r}, '/job/kv')
print('PLANTED kv', flush=True)
time.sleep(3600)
"""


def _agent_process() -> dict[str, str]:
    """/proc/<pid>/status of the agent's `kubeflash agent` process, seen from the node."""
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in cmd and any(a.endswith(b"kubeflash") for a in cmd[:2]) and \
                b"--config=/etc/kubeflash/agent.yaml" in cmd:
            rows = (p / "status").read_text().splitlines()
            return {k: v.strip() for k, _, v in (r.partition(":") for r in rows)}
    raise AssertionError("no `kubeflash agent` process on the node")


def test_agent_is_non_root_and_a_planted_kv_link_is_refused(node_cluster, node_namespace):
    """The chart's default agent runs as uid 1000 with no capabilities (seen in /proc on the node). A pod that
    replaces a finished job's kv/ with a link to the store's root-owned csi/ directory (the plugin's KV images):
    nothing is chowned or changed there, and the job ends Failed (ResultsRefused) naming kv."""
    c, ns = node_cluster, node_namespace
    st = _agent_process()
    assert st["Uid"].split() == ["1000"] * 4 and st["Gid"].split() == ["1000"] * 4, st["Uid"]
    assert {st[k] for k in ("CapPrm", "CapEff", "CapAmb")} == {"0000000000000000"}, st
    disk = kit.store(c)
    target = disk / "csi"
    before = target.stat()
    c.apply(KV_JOB, ns)
    wait_phase(c, ns, "kvlink", {"Succeeded"})
    kit.create(c, ns, kit.pod("kv-planter", kit.node_image(c), KV_PLANTER.format(target=str(target)),
                              {"job": kit.csi(job="kvlink")}, {"job": "/job"}))
    wait_for("the planter to plant kv", lambda: kit.log(c, ns, "kv-planter"), lambda t: "PLANTED kv" in t,
             timeout=180, every=1)
    failed = wait_for("the job to be Failed (ResultsRefused)", lambda: job(c, ns, "kvlink"),
                      lambda j: phase(j) == "Failed" and j["status"].get("reason") == "ResultsRefused",
                      timeout=90, every=1)
    message = failed["status"]["message"]
    assert "kv" in message and "symlink" in message, message
    after = target.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert after.st_uid == 0, "csi/ stays root's"
    assert (disk / "jobs" / ns / "kvlink" / "kv").is_symlink(), "the link itself is left alone"
