"""The operator at cluster scale: N InferenceJobs on M KWOK nodes, applied in one burst, then one delete-collection.

Starts a real control plane (tests/cluster/controlplane.py: etcd, kube-apiserver with an audit log of the
operator's writes, controller-manager, scheduler, kwok) from the kind/build-control-plane.sh binaries, creates M
KWOK nodes with FlashNodes (this script plays the node agent: every pair's disk holds the model, so a job goes
straight to Running), runs `kubeflash operator` as its own process under its own user, applies N jobs from 8
client threads, and watches them. Writes one JSON report:

  to_node_p50_s / to_node_p99_s  job created (client clock) -> status.node seen in the watch
  to_running_p50_s / _p99_s       job created (client clock) -> phase Running seen in the watch (its pod created)
  to_pod_running_p50_s / _p99_s   job created (client clock) -> its engine pod Running on its KWOK node (pod watch;
                                 pods_seen_running: how many were seen Running)
  burst_s                        how long the N creates took (8 client threads, --create-threads)
  burst_cpu_s                    CPU seconds during the creates: each control-plane process, the operator, this
                                 script ("bench": its client threads and job watch), the machine (everyone's)
  all_placed_s                   burst start -> every job has status.node
  all_running_s                  burst start -> every job in phase Running (its pod exists)
  operator_cpu_s_to_running      the operator's CPU seconds (user + system) from burst start to all Running
  operator_cpu_ms_per_job        the same per job (milliseconds)
  operator_cpu_s_delete          the operator's CPU seconds from the delete-collection to everything gone
  pods_running_s                 burst start -> every pod Running on its KWOK node
  double_booked                  (node, GPU) pairs held by more than one job, from job status and the ledgers
  api_writes_per_job             the operator's create/update/patch/delete requests (audit log) per job, burst start
                                 -> all jobs Running (includes Ready-condition updates of jobs already Running)
  api_writes_per_job_to_running  the same counted per job up to that job's own Running (shared ledger writes spread)
  delete_writes_per_job          the same for the deletion
  api_reads_per_job              the operator's get/list requests per job, burst start -> all jobs Running
                                 (reads_by_kind: by "verb resource"; watches not counted)
  conflicts_409                  the operator's requests answered 409 (burst and deletion)
  delete_s                       delete-collection -> no job, no engine pod, no ledger entry left
  delete_call_s                  how long the delete-collection request itself took (the API server marking jobs)
  operator_rss_mib, operator_idle_cpu_pct (10 s with every job placed, --idle-s), tracebacks (in the operator's log)
  operator_peak_rss_mib          the operator's peak resident memory (VmHWM) up to the end of the deletion
  operator_rss_mib_before_burst  its resident memory before the first create (every node indexed, no job)
  operator_rss_by_map_mib        operator_rss_mib by kind of mapping (malloc's main heap, anonymous, files)
  throttle                       burst (to all pods Running) and delete: seconds the scheduler's and the controller
                                 manager's clients waited on their own rate limiter (and requests that waited over
                                 0.1 s), seconds requests queued in the API server's priority-and-fairness levels
  timeline                       p50/p99 of each step from the audit log: created -> finalizer (kopf's patch) ->
                                 pod (create) -> status (patch); pod_delete (operator) -> pod_gone (kwok's final
                                 delete) -> released (the finalizer's removal)

  .venv/bin/python bench/operator_scale.py --jobs 100 --nodes 20 [--out report.json]
  KUBEFLASH_BENCH_PROFILE=/tmp/op.prof ...   also writes a cProfile of the operator's event loop (/tmp/op.prof.operator)
  KUBEFLASH_BENCH_TRACEMALLOC=/tmp/op.mem ...  the operator under tracemalloc: its 60 largest allocating lines with every
                                              job placed (/tmp/op.mem.operator.txt; slows the operator)
  KUBEFLASH_BENCH_GCSTATS=/tmp/op.gc ...      the collector's passes and their seconds, before and in the idle window
                                              (/tmp/op.gc.operator.txt; bench/opmem.py)
  KUBEFLASH_BENCH_PYSPY=/tmp/op ...           samples the operator with py-spy (not in set-up: pip install py-spy) from
                                              outside the process: collapsed stacks of the burst (/tmp/op.burst.txt)
                                              of the idle window (/tmp/op.idle.txt) and of the deletion
                                              (/tmp/op.delete.txt); every thread, idle ones left out
  make bench-operator BENCH_OPERATOR="100:20 500:50"
  .venv/bin/python bench/operator_scale.py --audit-of <work dir>/audit.log   the burst of a run that broke later
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from kubeflash_api import parse_job_spec  # noqa: E402

from controlplane import ControlPlane, ControlPlaneError, default_bin_dir  # noqa: E402

GROUP, VERSION = "kubeflash.io", "v1alpha1"
NS = "default"
MODEL_URI = "builtin:smollm2-135m"
GiB = 2**30
# The operator runs as the chart's ServiceAccount would: that user and groups, bound to cluster-admin (RBAC is not
# what this measures). Not system:masters: the API server's priority and fairness exempts that group, and a real
# operator's requests are classified by the "service-accounts" FlowSchema into the workload-low priority level.
OPERATOR_USER = "system:serviceaccount:kubeflash:kubeflash-operator"
OPERATOR_GROUPS = "system:serviceaccounts,system:serviceaccounts:kubeflash,system:authenticated"
CLAIMS_ANNOTATION = "kubeflash.io/claims"
# The API server marks the items of a delete-collection with this many workers (its default, 1, marks 200 jobs
# one after the other: ~20 s on this machine before the operator sees the last one). delete_call_s reports it.
DELETE_COLLECTION_WORKERS = int(os.environ.get("KUBEFLASH_BENCH_DELETE_WORKERS", "16"))
# kwok plays every node's kubelet with this many workers (its default, 4, moves one pod at a time per worker for
# all M nodes; a real cluster has one kubelet per node). kwok_pod_workers in the report.
KWOK_POD_WORKERS = int(os.environ.get("KUBEFLASH_BENCH_KWOK_WORKERS", "32"))
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [{"level": "Request", "users": [OPERATOR_USER], "verbs": sorted(WRITE_VERBS)},
              {"level": "Metadata", "users": [OPERATOR_USER], "verbs": ["get", "list"]},  # its reads: counted only
              # everyone's job creates and pod deletes (the benchmark's, kwok's): the timeline's ends
              {"level": "Metadata", "verbs": ["create"], "resources": [{"group": GROUP, "resources": ["inferencejobs"]}]},
              {"level": "Metadata", "verbs": ["delete"], "resources": [{"group": "", "resources": ["pods"]}]},
              {"level": "None"}],
}


# ----------------------------------------------------------------------------------------------- the cluster


# The components that rate-limit their own requests (client-go's token bucket): kube-scheduler (binds, Events;
# its default 50 QPS / burst 100) and kube-controller-manager (each controller's client 20 QPS / burst 30). kwok
# v0.7.0 has no limit (its client's RateLimiter is flowcontrol.NewFakeAlwaysRateLimiter(); no flag sets one);
# the operator (kopf's aiohttp session, the kubernetes client's urllib3 pool) has none either. Their /metrics
# are opened to anonymous reads so the report can say how long each waited (docs/benchmarks.md, issue 24).
THROTTLED = ("kube-scheduler", "kube-controller-manager")
_PORT_NAME = {"kube-scheduler": "scheduler", "kube-controller-manager": "controller-manager"}  # ControlPlane's
METRICS_OPEN = "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"


def _prom(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value) per sample."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if "=" in kv) if rest else {}
        out.append((name, {k: v.strip('"') for k, v in labels.items()}, float(value)))
    return out


def throttle_snapshot(cp: ControlPlane) -> dict[str, float]:
    """Cumulative waits so far: each THROTTLED component's client-side rate limiter (seconds waited, requests,
    requests that waited over 0.1 s) and the API server's priority-and-fairness queues (seconds queued,
    requests rejected, requests dispatched per priority level: exempt is system:masters, every client here but
    the operator)."""
    snap: dict[str, float] = {}
    for comp in THROTTLED:
        try:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # its self-signed serving certificate
            with urllib.request.urlopen(f"https://127.0.0.1:{cp.bound_ports[_PORT_NAME[comp]]}/metrics", timeout=10,
                                        context=ctx) as resp:
                body = resp.read().decode()
        except Exception as e:  # noqa: BLE001 -- a report without this part beats no report
            print(f"(no /metrics from {comp}: {e})", file=sys.stderr)
            continue
        for name, labels, v in _prom(body):
            if name == "rest_client_rate_limiter_duration_seconds_sum":
                snap[f"{comp} waited_s"] = snap.get(f"{comp} waited_s", 0.0) + v
            elif name == "rest_client_rate_limiter_duration_seconds_count":
                snap[f"{comp} requests"] = snap.get(f"{comp} requests", 0.0) + v
                snap[f"{comp} waited_over_0.1s"] = snap.get(f"{comp} waited_over_0.1s", 0.0) + v
            elif name == "rest_client_rate_limiter_duration_seconds_bucket" and labels.get("le") == "0.1":
                snap[f"{comp} waited_over_0.1s"] = snap.get(f"{comp} waited_over_0.1s", 0.0) - v
    status, body = cp.api_get("/metrics", timeout=10)
    if status == 200:
        snap.update({"apiserver apf_queued_s": 0.0, "apiserver apf_rejected": 0.0})
        for name, labels, v in _prom(body.decode()):
            if name == "apiserver_flowcontrol_request_wait_duration_seconds_sum":
                snap["apiserver apf_queued_s"] = snap.get("apiserver apf_queued_s", 0.0) + v
            elif name == "apiserver_flowcontrol_rejected_requests_total":
                snap["apiserver apf_rejected"] = snap.get("apiserver apf_rejected", 0.0) + v
            elif name == "apiserver_flowcontrol_dispatched_requests_total":
                key = f"apiserver apf_dispatched {labels.get('priority_level')}"
                snap[key] = snap.get(key, 0.0) + v
    return snap


def throttle_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b[k] - a.get(k, 0.0), 3) for k in sorted(b)}


def start_cluster(bin_dir: Path, work: Path) -> tuple[ControlPlane, Path, Path]:
    """The control plane with an audit log of the operator user's writes; returns it, the operator's kubeconfig
    and the audit log path."""
    policy, audit = work / "audit-policy.yaml", work / "audit.log"
    policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    token = os.urandom(16).hex()
    # The API server's inflight limits are its defaults (400 + 200, the total that priority and fairness shares
    # out); the scheduler's and controller manager's client limits are set to their defaults on purpose (a stock
    # cluster's; THROTTLED says why they matter); kwok has none (THROTTLED).
    cp = ControlPlane(bin_dir, extra_tokens=[(token, OPERATOR_USER, OPERATOR_GROUPS)], extra_apiserver_args=[
        f"--audit-policy-file={policy}", f"--audit-log-path={audit}", "--audit-log-format=json",
        "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s", "--max-requests-inflight=400",
        "--max-mutating-requests-inflight=200", f"--delete-collection-workers={DELETE_COLLECTION_WORKERS}"],
        kwok_options={"podPlayStageParallelism": KWOK_POD_WORKERS},
        extra_args={"kube-scheduler": [METRICS_OPEN, "--kube-api-qps=50", "--kube-api-burst=100"],
                    "kube-controller-manager": [METRICS_OPEN, "--kube-api-qps=20", "--kube-api-burst=30"]}).start()
    cp.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
              "metadata": {"name": "kubeflash-bench-operator"},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
              "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}]})
    kc = yaml.safe_load(cp.kubeconfig.read_text())
    kc["users"][0]["user"]["token"] = token
    op_kubeconfig = work / "operator.kubeconfig"
    op_kubeconfig.write_text(yaml.safe_dump(kc))
    return cp, op_kubeconfig, audit


def _loosen(schema: Any) -> None:
    """Drop integer bounds past 2**53 (the API server reads them as float64 and refuses them)."""
    if isinstance(schema, dict):
        for key in ("maximum", "minimum"):
            if isinstance(schema.get(key), int) and abs(schema[key]) > 2**53:
                del schema[key]
        for v in schema.values():
            _loosen(v)
    elif isinstance(schema, list):
        for v in schema:
            _loosen(v)


def apply_crds(cp: ControlPlane) -> None:
    """crds/ as they are, except what the API server refuses in the generated CRDs as of this writing: a
    `metadata` schema under openAPIV3Schema (the server describes metadata itself) and int64-wide bounds.
    Neither matters to placement; both are dropped here so the benchmark measures the operator."""
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for v in crd["spec"]["versions"]:
            v["schema"]["openAPIV3Schema"].get("properties", {}).pop("metadata", None)
            _loosen(v["schema"])
        cp.apply(crd)
    for attempt in range(5):  # kubectl wait fails at once on a CRD whose status has no conditions yet
        try:
            cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                       "crd/inferencejobs.kubeflash.io", "crd/flashnodes.kubeflash.io")
            return
        except ControlPlaneError:
            if attempt == 4:
                raise
            time.sleep(1)


def now_rfc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_nodes(api: client.ApiClient, cp: ControlPlane, nodes: int, pairs: int, model: str) -> list[str]:
    """M KWOK nodes with `pairs` GPUs each and their FlashNodes (the model Ready on every disk)."""
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    names = [f"gpu-{i:04d}" for i in range(nodes)]
    cap = {"cpu": "512", "memory": "8Ti", "ephemeral-storage": "100Ti", "pods": "250", "nvidia.com/gpu": str(pairs)}

    def one(name: str) -> None:
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "type": "kwok"}},
            "status": {"capacity": cap, "allocatable": cap}})
        custom.create_cluster_custom_object(GROUP, VERSION, "flashnodes", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "FlashNode", "metadata": {"name": name},
            "spec": {"nodeName": name}})
        custom.patch_cluster_custom_object_status(GROUP, VERSION, "flashnodes", name, {"status": {
            "heartbeat": now_rfc(),
            "gpus": [{"index": i, "name": "Fake H100"} for i in range(pairs)],
            "disks": [{"name": f"nvme{i}", "path": f"/mnt/nvme{i}/kubeflash", "freeBytes": 500 * GiB,
                       "readGBps": 7.0, "capacityBytes": 1000 * GiB} for i in range(pairs)],
            "pairs": [{"gpu": i, "disk": f"nvme{i}"} for i in range(pairs)],
            "models": [{"id": model, "uri": MODEL_URI, "disk": f"nvme{i}", "state": "Ready", "bytes": GiB}
                       for i in range(pairs)]}})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, names))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready = sum(1 for n in core.list_node(label_selector="type=kwok").items
                    if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
                    and not any(t.key.startswith("node.kubernetes.io/not-ready") for t in n.spec.taints or []))
        if ready == nodes:
            return names
        time.sleep(1)
    raise RuntimeError(f"only {ready}/{nodes} KWOK nodes became Ready within 180 s")


# ----------------------------------------------------------------------------------------------- the operator


class OperatorProcess:
    """`kubeflash operator` as its own process (its log in the work dir)."""

    def __init__(self, kubeconfig: Path, log: Path, *extra: str) -> None:
        env = {**os.environ, "KUBEFLASH_OPERATOR_HEARTBEAT_TIMEOUT_S": "86400", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self._fh = open(log, "ab")
        args = ["operator", "-A", "--metrics-port", "0", "--liveness-port", "0", "--kubeconfig", str(kubeconfig), *extra]
        cmd = [str(Path(sys.executable).parent / "kubeflash"), *args]
        if os.environ.get("KUBEFLASH_BENCH_PROFILE"):  # cProfile of the event loop's thread, written when it stops
            out = f"{os.environ['KUBEFLASH_BENCH_PROFILE']}.{log.stem}"
            cmd = [sys.executable, "-c", "import cProfile, sys; from kubeflash_node.cli import main; "
                   f"sys.argv = ['kubeflash', *{args!r}]; cProfile.run('main()', {out!r})"]
        elif os.environ.get("KUBEFLASH_BENCH_TRACEMALLOC") or os.environ.get("KUBEFLASH_BENCH_GCSTATS"):
            # memory by allocating line, or the collector's passes (bench/opmem.py), written on SIGUSR1
            prefix = os.environ.get("KUBEFLASH_BENCH_TRACEMALLOC") or os.environ["KUBEFLASH_BENCH_GCSTATS"]
            out = f"{prefix}.{log.stem}.txt"
            cmd = [sys.executable, str(REPO / "bench" / "opmem.py"), out, *args]
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_ready(self, timeout: float = 90) -> None:
        if os.environ.get("KUBEFLASH_BENCH_TRACEMALLOC"):  # its imports alone take 5x longer traced
            timeout *= 4
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited {self.proc.returncode}: {self.text()[-3000:]}")
            if "kubeflash operator configured" in self.text():
                time.sleep(3)  # kopf lists and indexes the FlashNodes, Nodes and pods
                return
            time.sleep(0.5)
        raise RuntimeError(f"operator not ready within {timeout} s: {self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_mib(self, field: str = "VmRSS") -> float:
        """Resident memory now (VmRSS), or its peak so far (field="VmHWM")."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def memory_map(self) -> dict[str, float]:
        """Resident MiB by kind of mapping (/proc/<pid>/smaps): "heap" (malloc's main heap), "anon" (anonymous
        maps: Python's object arenas, other threads' malloc arenas, big buffers), "file" (code and data of files)."""
        out = {"heap": 0.0, "anon": 0.0, "file": 0.0}
        kind = "anon"
        for line in Path(f"/proc/{self.proc.pid}/smaps").read_text().splitlines():
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                path = head[5] if len(head) > 5 else ""
                kind = "heap" if path == "[heap]" else "file" if path.startswith("/") else "anon"
            elif head[0] == "Rss:":
                out[kind] += int(head[1]) / 1024
        return {k: round(v, 1) for k, v in out.items()}

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


class Sampler:
    """py-spy sampling the operator process from outside (KUBEFLASH_BENCH_PYSPY=<prefix>): collapsed stacks in
    <prefix>.<phase>.txt; a no-op when the variable is unset."""

    def __init__(self, pid: int, phase: str) -> None:
        self.proc = None
        prefix = os.environ.get("KUBEFLASH_BENCH_PYSPY")
        if prefix:
            spy = Path(sys.executable).parent / "py-spy"
            self.proc = subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                                          "--nonblocking", "--output", f"{prefix}.{phase}.txt"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
            self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------ the jobs


class JobWatch:
    """First time (monotonic) each job shows status.node, and phase Running, in a watch stream."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.placed: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.running_wall: dict[str, float] = {}  # epoch seconds (to compare with the audit log)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _list(self, **kw: Any) -> dict[str, Any]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs", **kw)

    def _see(self, obj: dict[str, Any], t: float) -> None:
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        if status.get("node"):
            self.placed.setdefault(name, t)
        if status.get("phase") == "Running" and name not in self.running:
            self.running[name] = t
            self.running_wall[name] = time.time()

    def _run(self) -> None:
        rv = self._list()["metadata"]["resourceVersion"]
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(self._list, resource_version=rv, timeout_seconds=60):
                    if ev["type"] == "ERROR":  # e.g. 410 Gone: the version is too old
                        raise RuntimeError(ev["object"])
                    rv = ev["object"]["metadata"]["resourceVersion"]
                    self._see(ev["object"], time.monotonic())
                    if self._stop.is_set():
                        break
            except Exception:  # noqa: BLE001 - a dropped or expired watch: list again, resume from there
                time.sleep(0.2)
                try:
                    listed = self._list()
                except Exception:  # noqa: BLE001
                    continue
                rv = listed["metadata"]["resourceVersion"]
                for obj in listed["items"]:
                    self._see(obj, time.monotonic())

    def stop(self) -> None:
        self._stop.set()


class PodWatch(JobWatch):
    """First time (monotonic) each job's engine pod is Running on its KWOK node (`running`, by job name)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api, self.core = api, client.CoreV1Api(api)
        super().__init__(api)

    def _list(self, **kw: Any) -> Any:
        listed = self.core.list_namespaced_pod(NS, label_selector="kubeflash.io/job", **kw)
        # a watch reads the raw stream (its events' objects arrive as dicts: this function names no return type)
        return listed if kw.get("watch") else self.api.sanitize_for_serialization(listed)

    def _see(self, obj: dict[str, Any], t: float) -> None:
        job = (obj["metadata"].get("labels") or {}).get("kubeflash.io/job")
        if job and (obj.get("status") or {}).get("phase") == "Running":
            self.running.setdefault(job, t)


def job_body(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceJob", "metadata": {"name": name},
            "spec": {"model": {"uri": MODEL_URI}, "input": {"prompts": ["Hello"]}}}


def delete_all(api: client.ApiClient, tries: int = 3) -> None:
    """One delete-collection of every job. Its answer lists every deleted job (5,000 of them: tens of MB, streamed
    while the API server marks them); a connection broken while reading it is sent again (the jobs already marked
    come back marked), at most `tries` times."""
    custom = client.CustomObjectsApi(api)
    for attempt in range(1, tries + 1):
        try:
            answer = custom.delete_collection_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs",
                                                                       _preload_content=False)
            answer.read()
            return
        except (urllib3.exceptions.HTTPError, client.exceptions.ApiException) as e:
            if attempt == tries:
                raise
            print(f"(delete-collection: {e!r:.200}; again)", file=sys.stderr)


def burst(api: client.ApiClient, n: int, *, threads: int = 8, raw: bool = False) -> dict[str, float]:
    """Create n jobs from `threads` client threads; the client-side time each create returned. raw: each create
    hands the job's dict straight to the REST client (json.dumps) and reads the answer as bytes (the operator's
    `Kube._call` way), skipping the generated client's sanitizing of the body and decoding of the answer."""
    custom = client.CustomObjectsApi(api)
    created: dict[str, float] = {}
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/inferencejobs"

    def one(i: int) -> None:
        name = f"job-{i:05d}"
        if raw:
            method, url, headers, _, _ = api.param_serialize(
                method="POST", resource_path=path, auth_settings=["BearerToken"],
                header_params={"Accept": "application/json", "Content-Type": "application/json"})
            r = api.call_api(method, url, headers, job_body(name))  # the rest client dumps the dict as it is
            r.read()
            if r.status != 201:
                raise client.exceptions.ApiException(status=r.status, reason=r.data[:300])
        else:
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs", job_body(name))
        created[name] = time.monotonic()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return created


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named process, this process ("bench": its client threads
    and its job watch) and the whole machine ("machine": every process, other people's included)."""
    out = {"bench": time.process_time()}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    out["machine"] = (sum(int(x) for x in cpu) - int(cpu[3]) - int(cpu[4])) / os.sysconf("SC_CLK_TCK")
    return out


def wait(what: str, cond, timeout: float, every: float = 0.25) -> float:
    """Poll cond() until true; the monotonic time it became true. Raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return time.monotonic()
        except (client.exceptions.ApiException, OSError, ValueError, urllib3.exceptions.HTTPError) as e:
            print(f"(polling {what}: {e!r:.200}; again)", file=sys.stderr)  # a loaded API server drops a list
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(every)


def double_booked(api: client.ApiClient) -> list[str]:
    """(node, GPU) pairs that two live jobs hold, by job status or by the FlashNodes' ledgers."""
    custom = client.CustomObjectsApi(api)
    holders: dict[tuple[str, int], set[str]] = {}
    for job in custom.list_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs")["items"]:
        s = job.get("status") or {}
        if s.get("phase") in ("Scheduled", "Staging", "Running") and s.get("node"):
            for g in s.get("gpus") or [s.get("gpu")]:
                holders.setdefault((s["node"], g), set()).add(job["metadata"]["name"])
    for fn in custom.list_cluster_custom_object(GROUP, VERSION, "flashnodes")["items"]:
        ledger = json.loads(((fn["metadata"].get("annotations") or {}).get(CLAIMS_ANNOTATION)) or "{}")
        for job, e in ledger.items():
            for g in e["gpus"]:
                holders.setdefault((fn["spec"]["nodeName"], g), set()).add(job.split("/", 1)[1])
    return [f"{node}/gpu{g}: {sorted(jobs)}" for (node, g), jobs in sorted(holders.items()) if len(jobs) > 1]


def leftovers(api: client.ApiClient) -> dict[str, int]:
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    jobs = len(custom.list_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs")["items"])
    pods = len(core.list_namespaced_pod(NS, label_selector="kubeflash.io/job").items)
    claims = 0
    kv = 0
    for fn in custom.list_cluster_custom_object(GROUP, VERSION, "flashnodes")["items"]:
        claims += len(json.loads(((fn["metadata"].get("annotations") or {}).get(CLAIMS_ANNOTATION)) or "{}"))
        kv += len((fn.get("status") or {}).get("kvAllocations") or [])
    return {"jobs": jobs, "pods": pods, "claims": claims, "kv_allocations": kv}


def audit_counts(audit: Path, since: str, until: str | None = None, reads: dict[str, int] | None = None
                 ) -> tuple[int, int, dict[str, int]]:
    """(writes, 409s, writes by "verb resource[/subresource]") by the operator user between two RFC3339 micro
    timestamps (audit stage ResponseComplete); its gets and lists by kind go into `reads` if given."""
    writes = conflicts = 0
    kinds: dict[str, int] = {}
    if not audit.exists():
        return 0, 0, kinds
    for line in audit.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("stage") != "ResponseComplete" or ev.get("user", {}).get("username") != OPERATOR_USER:
            continue
        t = ev.get("requestReceivedTimestamp", "")
        if t < since or (until and t >= until):
            continue
        if ev.get("verb") in WRITE_VERBS:
            writes += 1
            ref = ev.get("objectRef") or {}
            kind = f"{ev['verb']} {ref.get('resource')}" + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            kinds[kind] = kinds.get(kind, 0) + 1
        elif reads is not None and ev.get("verb") in ("get", "list"):
            ref = ev.get("objectRef") or {}
            kind = f"{ev['verb']} {ref.get('resource')}" + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            reads[kind] = reads.get(kind, 0) + 1
        if (ev.get("responseStatus") or {}).get("code") == 409:
            conflicts += 1
    return writes, conflicts, kinds


def _target_job(ev: dict[str, Any]) -> str | None:
    """The job a write is for: the job itself, its pod (by label) or its Event (involvedObject); None for shared
    objects (FlashNodes)."""
    ref, obj = ev.get("objectRef") or {}, ev.get("requestObject") or {}
    if ref.get("resource") == "inferencejobs":
        return ref.get("name")
    if ref.get("resource") == "pods":
        return ((obj.get("metadata") or {}).get("labels") or {}).get("kubeflash.io/job") or ref.get("name", "").rsplit("-", 1)[0]
    if ref.get("resource") == "events":
        return (obj.get("involvedObject") or {}).get("name")
    return None


def writes_to_running(audit: Path, running_wall: dict[str, float], since: str, until: str) -> float:
    """The operator's writes per job from its creation to its own phase Running: writes to the job, its pod and its
    Events made before the watch saw it Running, plus the shared writes (FlashNode ledgers, model requests) of the
    burst window spread over the jobs. Writes after a job is Running (e.g. its Ready condition once the pod
    runs) do not count here; api_writes_per_job counts everything in the window."""
    own = shared = 0
    for line in audit.read_text().splitlines() if audit.exists() else ():
        ev = json.loads(line)
        if (ev.get("stage") != "ResponseComplete" or ev.get("user", {}).get("username") != OPERATOR_USER
                or ev.get("verb") not in WRITE_VERBS):
            continue
        t = ev.get("requestReceivedTimestamp", "")
        if not since <= t < until:
            continue
        job = _target_job(ev)
        if job is None:
            shared += 1
        elif job in running_wall and datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() <= running_wall[job]:
            own += 1
    return (own + shared) / max(len(running_wall), 1)


def timeline(audit: Path) -> dict[str, float]:
    """p50 / p99 seconds of each step of a job's way, from the API server's receive times (audit log):
    created -> kopf's finalizer patch -> pod create -> status patch (placement; finalizer -> status is the operator's
    own part of it, without the watch delivery before kopf's patch), and on deletion the operator's
    pod delete -> the kubelet's (kwok's) final pod delete -> the finalizer's removal."""
    marks: dict[str, dict[str, float]] = {}
    for line in audit.read_text().splitlines() if audit.exists() else ():
        ev = json.loads(line)
        if ev.get("stage") != "ResponseComplete" or (ev.get("responseStatus") or {}).get("code", 200) >= 300:
            continue
        ref, verb, user = ev.get("objectRef") or {}, ev.get("verb"), ev.get("user", {}).get("username")
        t = datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
        res, sub, name = ref.get("resource"), ref.get("subresource"), ref.get("name") or ""
        step = None
        if res == "inferencejobs" and verb == "create":
            step = "created"
        elif res == "inferencejobs" and verb == "patch" and not sub and user == OPERATOR_USER:
            body = json.dumps(ev.get("requestObject"))  # kopf's JSON patch: add, or remove, the finalizers
            step = None if "finalizers" not in body else "released" if '"remove"' in body else "finalizer"
        elif res == "inferencejobs" and sub == "status" and user == OPERATOR_USER:
            step = "status"
        elif res == "pods" and verb == "create":
            step, name = "pod", name.rsplit("-", 1)[0]
        elif res == "pods" and verb == "delete":
            step, name = ("pod_delete" if user == OPERATOR_USER else "pod_gone"), name.rsplit("-", 1)[0]
        if step:
            marks.setdefault(name, {}).setdefault(step, t)
    out = {}
    for a, b in (("created", "finalizer"), ("finalizer", "pod"), ("pod", "status"), ("finalizer", "status"),
                 ("created", "status"),
                 ("pod_delete", "pod_gone"), ("pod_gone", "released")):
        gaps = [m[b] - m[a] for m in marks.values() if a in m and b in m]
        if gaps:
            out[f"{a}_to_{b}_p50_s"] = round(statistics.median(gaps), 3)
            out[f"{a}_to_{b}_p99_s"] = round(pct(gaps, 0.99), 3)
    return out


def audit_report(audit: Path) -> dict[str, Any]:
    """The burst as the API server received it: the jobs' creates (first to last), each job's first status write by
    the operator (its placement: phase Running in one write here), the operator's 409s by minute, and timeline()."""
    created: dict[str, float] = {}
    placed: dict[str, float] = {}
    conflicts: dict[str, int] = {}
    for line in audit.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("stage") != "ResponseComplete":
            continue
        ref, code = ev.get("objectRef") or {}, (ev.get("responseStatus") or {}).get("code", 200)
        t = datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if code == 409:
            minute = t.strftime("%H:%M")
            conflicts[minute] = conflicts.get(minute, 0) + 1
        elif code < 300 and ref.get("resource") == "inferencejobs" and ev.get("verb") == "create":
            created[ref.get("name", "")] = t.timestamp()
        elif code < 300 and ref.get("resource") == "inferencejobs" and ref.get("subresource") == "status":
            placed.setdefault(ref.get("name", ""), t.timestamp())
    t0 = min(created.values(), default=0.0)
    gaps = [placed[n] - created[n] for n in placed if n in created]
    return {"audit": str(audit), "jobs_created": len(created), "jobs_placed": len(gaps),
            "creates_s": round(max(created.values(), default=t0) - t0, 3),
            "all_placed_after_first_create_s": round(max(placed.values(), default=t0) - t0, 3),
            "created_to_placed_p50_s": round(statistics.median(gaps), 3) if gaps else None,
            "created_to_placed_p99_s": round(pct(gaps, 0.99), 3) if gaps else None,
            "conflicts_409_by_minute": conflicts, "timeline": timeline(audit)}


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else float("nan")


# ---------------------------------------------------------------------------------------------------- main


def run(jobs: int, nodes: int, *, bin_dir: Path | None = None, work: Path | None = None, replicas: int = 1,
        settle_timeout: float = 600, delete_timeout: float = 120, create_threads: int = 8,
        raw_creates: bool = False, idle_s: float = 10) -> dict[str, Any]:
    """One run; returns the report (it also holds the operator log's path and any tracebacks).

    `replicas` > 1 runs that many operators side by side, all acting (no leader election): the conditional
    ledger writes alone must keep every pair single-booked; RSS and CPU are the first one's."""
    work = Path(work or tempfile.mkdtemp(prefix="kubeflash-opscale-"))
    pairs = math.ceil(jobs / nodes)
    model = parse_job_spec(job_body("x")["spec"], name="x", namespace=NS).model.id
    cp, op_kubeconfig, audit = start_cluster(Path(bin_dir or default_bin_dir()), work)
    op = None
    others: list[OperatorProcess] = []
    try:
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        apply_crds(cp)
        make_nodes(api, cp, nodes, pairs, model)
        op = OperatorProcess(op_kubeconfig, work / "operator.log")
        others = [OperatorProcess(op_kubeconfig, work / f"operator-{i}.log") for i in range(1, replicas)]
        for o in (op, *others):
            o.wait_ready()
        jw, pw = JobWatch(api), PodWatch(api)
        core = client.CoreV1Api(api)
        spy = Sampler(op.proc.pid, "burst")
        rss_before, rss_map_before = op.rss_mib(), op.memory_map()
        pids = {**dict(cp.processes()), "operator": op.proc.pid}
        cpu_burst = cpu_seconds(pids)
        thr0 = throttle_snapshot(cp)
        t0, stamp0, cpu_start = time.monotonic(), _stamp(), op.cpu_s()
        created = burst(api, jobs, threads=create_threads, raw=raw_creates)
        t_created = time.monotonic()
        cpu_burst = {k: round(v - cpu_burst.get(k, 0.0), 2) for k, v in cpu_seconds(pids).items()}
        t_running = wait(f"all {jobs} jobs Running", lambda: len(jw.running) >= jobs, settle_timeout)
        burst_cpu = op.cpu_s() - cpu_start
        spy.stop()
        stamp1 = _stamp()
        try:
            t_pods = wait(f"all {jobs} pods Running", lambda: sum(
                1 for p in core.list_namespaced_pod(NS, label_selector="kubeflash.io/job").items
                if p.status.phase == "Running") >= jobs, min(settle_timeout, 120), every=1.0)
        except TimeoutError:  # e.g. the scheduler refuses them: reported as null, the rest still measured
            t_pods = None
        thr1 = throttle_snapshot(cp)
        booked = double_booked(api)
        time.sleep(2)
        if os.environ.get("KUBEFLASH_BENCH_GCSTATS"):  # the collector's passes so far (bench/opmem.py)
            os.kill(op.proc.pid, signal.SIGUSR1)
            time.sleep(3)  # its report (a count of every object) is not part of the idle window
        spy = Sampler(op.proc.pid, "idle")
        cpu0 = op.cpu_s()
        time.sleep(idle_s)
        idle_cpu = (op.cpu_s() - cpu0) / idle_s * 100
        spy.stop()
        rss, rss_map = op.rss_mib(), op.memory_map()
        if os.environ.get("KUBEFLASH_BENCH_TRACEMALLOC") or os.environ.get("KUBEFLASH_BENCH_GCSTATS"):
            # where that memory is, or the collector's passes in the idle window (the operator writes it)
            os.kill(op.proc.pid, signal.SIGUSR1)
        spy = Sampler(op.proc.pid, "delete")
        thr2 = throttle_snapshot(cp)
        stamp2, td, cpu_del = _stamp(), time.monotonic(), op.cpu_s()
        print(f"(burst: {jobs} jobs Running {t_running - t0:.1f} s after the burst began, placed "
              f"{max(jw.placed.values()) - t0 if jw.placed else float('nan'):.1f} s; operator CPU {burst_cpu:.1f} s, "
              f"RSS {rss:.0f} MiB, idle {idle_cpu:.1f} %; load {os.getloadavg()[0]:.1f}; deleting)", file=sys.stderr)
        delete_all(api)
        t_call = time.monotonic()
        left: dict[str, int] = {}

        def clean() -> bool:
            left.update(leftovers(api))
            return not any(left.values())

        try:
            t_deleted = wait("jobs, pods and claims gone", clean, delete_timeout, every=0.25)
        except TimeoutError:
            t_deleted = None
        delete_cpu = op.cpu_s() - cpu_del
        thr3 = throttle_snapshot(cp)
        peak_rss = op.rss_mib("VmHWM")
        spy.stop()
        jw.stop()
        pw.stop()
        time.sleep(1.5)  # the audit log's batch flush
        r_burst: dict[str, int] = {}
        w_burst, c_burst, k_burst = audit_counts(audit, stamp0, stamp1, r_burst)
        w_del, c_del, k_del = audit_counts(audit, stamp2)
        writes_running = writes_to_running(audit, jw.running_wall, stamp0, stamp1)
        to_node = [jw.placed[n] - created[n] for n in created if n in jw.placed]
        to_running = [jw.running[n] - created[n] for n in created if n in jw.running]
        to_pod = [pw.running[n] - created[n] for n in created if n in pw.running]
        log = "".join(o.text() for o in (op, *others))
        return {
            "jobs": jobs, "nodes": nodes, "pairs_per_node": pairs, "operators": replicas,
            "to_node_p50_s": round(statistics.median(to_node), 3),
            "to_node_p99_s": round(pct(to_node, 0.99), 3),
            "to_node_max_s": round(max(to_node), 3),
            "to_running_p50_s": round(statistics.median(to_running), 3),
            "to_running_p99_s": round(pct(to_running, 0.99), 3),
            "to_pod_running_p50_s": round(statistics.median(to_pod), 3) if to_pod else None,
            "to_pod_running_p99_s": round(pct(to_pod, 0.99), 3) if to_pod else None,
            "pods_seen_running": len(to_pod),
            "burst_s": round(t_created - t0, 3),
            "create_threads": create_threads, "raw_creates": raw_creates,
            "burst_cpu_s": cpu_burst,
            "all_placed_s": round(max(jw.placed.values()) - t0, 3) if jw.placed else None,
            "all_running_s": round(t_running - t0, 3),
            "operator_cpu_s_to_running": round(burst_cpu, 2),
            "operator_cpu_ms_per_job": round(burst_cpu / jobs * 1000, 2),
            "operator_cpu_s_delete": round(delete_cpu, 2),
            "pods_running_s": round(t_pods - t0, 3) if t_pods is not None else None,
            "delete_s": round(t_deleted - td, 3) if t_deleted is not None else None,
            "delete_call_s": round(t_call - td, 3),
            "delete_collection_workers": DELETE_COLLECTION_WORKERS, "kwok_pod_workers": KWOK_POD_WORKERS,
            "left_after_delete": left,
            "double_booked": len(booked), "double_booked_pairs": booked[:20],
            "api_writes_per_job": round(w_burst / jobs, 2),
            "api_writes_per_job_to_running": round(writes_running, 2),
            "delete_writes_per_job": round(w_del / jobs, 2),
            "writes_by_kind": {"burst": k_burst, "delete": k_del},
            "api_reads_per_job": round(sum(r_burst.values()) / jobs, 2), "reads_by_kind": r_burst,
            "conflicts_409": c_burst + c_del,
            "timeline": timeline(audit),
            "throttle": {"burst": throttle_delta(thr0, thr1), "delete": throttle_delta(thr2, thr3)},
            "operator_rss_mib": round(rss, 1),
            "operator_rss_mib_before_burst": round(rss_before, 1),
            "operator_rss_by_map_mib": rss_map, "operator_rss_by_map_mib_before_burst": rss_map_before,
            "operator_peak_rss_mib": round(peak_rss, 1),
            "operator_idle_cpu_pct": round(idle_cpu, 2), "idle_window_s": idle_s,
            "tracebacks": log.count("Traceback"),
            "operator_log": str(op.log),
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    finally:
        for o in (*others, *([op] if op else [])):
            o.stop()
        cp.stop()


def emit(report: dict[str, Any], out: Path | None) -> None:
    """Print the JSON report and, with --out, write it there too (temp file, then rename)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--replicas", type=int, default=1, help="operators side by side, all acting (default 1)")
    p.add_argument("--settle-timeout", type=float, default=600,
                   help="seconds the burst may take until every job is Running (default 600; 5,000 jobs on a small "
                        "machine need more)")
    p.add_argument("--delete-timeout", type=float, default=120,
                   help="seconds the deletion may take before what is left is reported (default 120)")
    p.add_argument("--create-threads", type=int, default=8, help="client threads sending the creates (default 8)")
    p.add_argument("--raw-creates", action="store_true",
                   help="send each create as plain JSON and read its answer as bytes, not through the generated "
                        "client's (de)serialization (the benchmark's own CPU; the operator is the same)")
    p.add_argument("--idle-s", type=float, default=10,
                   help="seconds the operator's idle CPU is measured over, every job placed (default 10)")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    p.add_argument("--bin-dir", type=Path, help="control plane binaries (default: kind/build-control-plane.sh's)")
    p.add_argument("--audit-of", type=Path, metavar="AUDIT_LOG",
                   help="no run: what the audit log of an earlier run (its work dir's audit.log) shows of the burst "
                        "(a run that broke before its report, e.g. in the deletion)")
    args = p.parse_args(argv)
    if args.audit_of:
        emit(audit_report(args.audit_of), args.out)
        return 0
    report = run(args.jobs, args.nodes, replicas=args.replicas, settle_timeout=args.settle_timeout,
                 delete_timeout=args.delete_timeout, create_threads=args.create_threads,
                 raw_creates=args.raw_creates, idle_s=args.idle_s, bin_dir=args.bin_dir or (Path(os.environ["KUBEFLASH_K8S_BIN"])
                                                                   if os.environ.get("KUBEFLASH_K8S_BIN") else None))
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
