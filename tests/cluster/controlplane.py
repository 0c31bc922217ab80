"""A real Kubernetes control plane for tests, run as local processes.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake nodes, fake
running pods) are built from Go modules by ``kind/build-control-plane.sh`` into a cache
outside the repository; this module starts them on free loopback ports with everything
(data, certificates, logs) in one temporary directory and tears them down on exit.

    with ControlPlane() as cp:
        cp.create_fake_node("gpu-node-0", labels={"kubeflash.io/ssd": "nvme"})
        cp.kubectl("get", "nodes")

No Docker, no root, no kubelet. Authentication is a static bearer token for user
``admin`` in group ``system:masters``; the serving certificate is signed by a throwaway
CA whose certificate is embedded in the kubeconfig (``certificate-authority-data``).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "kind" / "build-control-plane.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "helm")

#: Annotation that makes a Node managed by our kwok controller.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
DEFAULT_FAKE_NODE_CAPACITY = {"cpu": "32", "memory": "256Gi", "ephemeral-storage": "1Ti", "nvidia.com/gpu": "4",
                              "pods": "110"}
SERVICE_CIDR = "10.0.0.0/24"


class ControlPlaneError(RuntimeError):
    """A component failed to start or to become ready."""


class BuildError(RuntimeError):
    """The binaries could not be built; ``reason`` says why in one line."""

    def __init__(self, reason: str, output: str = "", go_missing: bool = False):
        super().__init__(reason + (f"\n{output}" if output else ""))
        self.reason = reason
        self.output = output
        self.go_missing = go_missing


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def build_control_plane(timeout: float = 7200, quiet: bool = False) -> Path:
    """Run kind/build-control-plane.sh (skips what is built) and return the bin dir.

    Raises BuildError (``go_missing=True`` when Go is not installed).
    """
    if shutil.which("go") is None:
        # The script itself succeeds without Go when everything is already cached.
        check = subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], capture_output=True)
        if check.returncode != 0:
            raise BuildError("Go is not installed and the control plane binaries are not cached", go_missing=True)
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=None if not quiet else subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        output = (proc.stderr or "")[-4000:] if quiet else ""
        raise BuildError(f"{BUILD_SCRIPT.name} failed with exit status {proc.returncode}", output,
                         go_missing=proc.returncode == 3)
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    missing = [b for b in BINARIES if not (bin_dir / b).is_file()]
    if missing:
        raise BuildError(f"{BUILD_SCRIPT.name} did not produce {', '.join(missing)} in {bin_dir}")
    return bin_dir


def default_bin_dir() -> Path:
    """$KUBEFLASH_K8S_BIN, else the cache dir the build script uses."""
    env = os.environ.get("KUBEFLASH_K8S_BIN")
    if env:
        return Path(env)
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-bin-dir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Children get SIGTERM when the test process dies, even on SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class _Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log: Path):
        self.name, self.popen, self.log = name, popen, log


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback.

    Attributes after ``start()`` / ``__enter__``:
      kubeconfig  Path of an admin kubeconfig (token auth, CA data embedded)
      server      "https://127.0.0.1:<port>"
      token       the admin bearer token (group system:masters)
      bin_dir     where the binaries come from
      workdir     the temporary directory (logs under workdir/logs/<component>.log)
      ca_file     the CA certificate that signed the serving certificate
    """

    def __init__(self, bin_dir: str | Path | None = None, *, workdir: str | Path | None = None,
                 keep_workdir: bool = False, start_timeout: float = 120.0,
                 extra_apiserver_args: Sequence[str] = (), bind_address: str = "127.0.0.1",
                 advertise_address: str = "127.0.0.1", ports: Mapping[str, int] | None = None,
                 persistent: bool = False, extra_tokens: Sequence[tuple[str, str, str]] = (),
                 with_kwok: bool = True, endpoint_reconciler: str = "none", kwok_options: Mapping | None = None,
                 extra_args: Mapping[str, Sequence[str]] | None = None):
        """The defaults serve tests/cluster (loopback, free ports, children die with the test process).

        The real-node harness (kind/realnode.py) sets: bind_address 0.0.0.0 and advertise_address the node's
        IP (pods reach the apiserver through the kubernetes Service), fixed ``ports`` (names: etcd, etcd-peer,
        apiserver, controller-manager, scheduler), ``persistent`` (the components outlive this process; the
        workdir stays), ``extra_tokens`` (token, user, comma-separated groups) for the kubelet and kube-proxy,
        no kwok, and the lease endpoint reconciler (the Service's endpoint is the advertised address).
        ``kwok_options``: KwokConfiguration options (e.g. podPlayStageParallelism; kwok's defaults otherwise).
        ``extra_args``: component name -> flags appended to its command line (e.g. kube-scheduler's
        --kube-api-qps); ``bound_ports`` holds each component's port once started (its /metrics).
        """
        self.extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
        self.bound_ports: dict[str, int] = {}
        self.kwok_options = dict(kwok_options or {})
        self.bin_dir = Path(bin_dir) if bin_dir else default_bin_dir()
        self._given_workdir = Path(workdir) if workdir else None
        self.keep_workdir = keep_workdir
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.bind_address, self.advertise_address = bind_address, advertise_address
        self.ports = dict(ports or {})
        self.persistent = persistent
        self.extra_tokens = list(extra_tokens)
        self.with_kwok = with_kwok
        self.endpoint_reconciler = endpoint_reconciler
        self.workdir: Path | None = None
        self.kubeconfig: Path | None = None
        self.server: str | None = None
        self.token: str | None = None
        self.ca_file: Path | None = None
        self._procs: list[_Proc] = []
        self._ssl: ssl.SSLContext | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ControlPlane":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        needed = BINARIES[:5] if self.with_kwok else BINARIES[:4]
        missing = [b for b in needed if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise ControlPlaneError(f"missing binaries in {self.bin_dir}: {', '.join(missing)} "
                                    f"(run {BUILD_SCRIPT.relative_to(REPO_ROOT)})")
        if self._given_workdir:
            self.workdir = self._given_workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="kubeflash-cp-"))
        (self.workdir / "logs").mkdir(exist_ok=True)
        try:
            self._generate_credentials()
            self._start_etcd()
            self._start_apiserver()
            self._write_kubeconfig()
            self._start_controller_manager()
            self._start_scheduler()
            if self.with_kwok:
                self._start_kwok()
            self._wait_cluster_usable()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate every component (newest first), kill what does not exit, remove the workdir."""
        for p in reversed(self._procs):
            if p.popen.poll() is None:
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in reversed(self._procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait(timeout=10)
        self._procs.clear()
        if self.workdir and not self._given_workdir and not self.keep_workdir and not self.persistent:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def processes(self) -> list[tuple[str, int]]:
        """(component, pid) of every started component, oldest first."""
        return [(p.name, p.popen.pid) for p in self._procs]

    def _port(self, name: str) -> int:
        self.bound_ports[name] = self.ports.get(name) or free_port()
        return self.bound_ports[name]

    def log_path(self, component: str) -> Path:
        assert self.workdir is not None
        return self.workdir / "logs" / f"{component}.log"

    def env(self) -> dict[str, str]:
        """Environment for subprocesses: KUBECONFIG set, bin_dir first on PATH, helm dirs private."""
        assert self.workdir is not None and self.kubeconfig is not None
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
            env.setdefault(var, str(self.workdir / "helm" / sub))
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; returns the CompletedProcess (text stdout/stderr).

        With check=True a non-zero exit raises ControlPlaneError carrying stderr.
        """
        kubectl = shutil.which("kubectl") or "/usr/bin/kubectl"
        assert self.workdir is not None
        cmd = [kubectl, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.workdir / 'kubectl-cache'}", *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def kubectl_json(self, *args: str, timeout: float = 60) -> dict:
        """kubectl ... -o json, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json", timeout=timeout).stdout)

    def apply(self, obj: Mapping | str) -> subprocess.CompletedProcess:
        """kubectl apply -f - for a manifest (dict -> JSON, or YAML/JSON text)."""
        text = obj if isinstance(obj, str) else json.dumps(obj)
        return self.kubectl("apply", "-f", "-", input=text)

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the cached helm binary against this cluster (private HELM_* dirs)."""
        cmd = [str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def api_get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """GET a raw API path with the admin token; returns (status, body)."""
        assert self.server and self._ssl
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def create_fake_node(self, name: str, labels: Mapping[str, str] | None = None,
                         capacity: Mapping[str, str] | None = None,
                         annotations: Mapping[str, str] | None = None,
                         taints: Iterable[Mapping] | None = None,
                         wait: bool = True, timeout: float = 60) -> dict:
        """Create a Node that our kwok controller manages, and wait until it is Ready.

        capacity defaults to 32 CPU, 256Gi, 4 nvidia.com/gpu, 110 pods (allocatable = capacity).
        kwok sets the Ready condition and keeps the heartbeat; the node lifecycle controller
        then lifts the not-ready taint, after which the scheduler may place pods on it.
        Returns the Node as a dict.
        """
        cap = dict(DEFAULT_FAKE_NODE_CAPACITY if capacity is None else capacity)
        node_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64",
            "type": "kwok",
            **(labels or {}),
        }
        node_annotations = {
            KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1],
            "node.alpha.kubernetes.io/ttl": "0",
            **(annotations or {}),
        }
        manifest = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": node_labels, "annotations": node_annotations},
            "spec": {"taints": list(taints or [])},
            "status": {
                "capacity": cap,
                "allocatable": cap,
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "kubeletVersion": "fake",
                    "kubeProxyVersion": "fake",
                    "containerRuntimeVersion": "kwok",
                },
            },
        }
        self.apply(manifest)
        if not wait:
            return self.kubectl_json("get", "node", name)
        return self.wait_node_ready(name, timeout=timeout)

    def wait_crds_established(self, *names: str, timeout: float = 60) -> None:
        """Wait until each CustomResourceDefinition is Established. Polled: `kubectl wait --for=condition=Established`
        fails at once on a CRD created a moment ago, whose status.conditions is still null ("conditions accessor
        error: <nil>")."""
        deadline = time.monotonic() + timeout
        for name in names:
            while True:
                crd = self.kubectl_json("get", "crd", name)
                if any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in (crd.get("status") or {}).get("conditions") or []):
                    break
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"CRD {name} not Established within {timeout}s: {crd.get('status')}")
                time.sleep(0.2)

    def wait_node_ready(self, name: str, timeout: float = 60) -> dict:
        """Wait until the node reports Ready=True and carries no not-ready/unreachable taint."""
        deadline = time.monotonic() + timeout
        node: dict = {}
        while time.monotonic() < deadline:
            node = self.kubectl_json("get", "node", name)
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in node.get("status", {}).get("conditions", []) or [])
            blocking = [t for t in node.get("spec", {}).get("taints", []) or []
                        if t.get("key") in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")]
            if ready and not blocking:
                return node
            time.sleep(0.5)
        raise ControlPlaneError(f"node {name} not Ready within {timeout}s: status={json.dumps(node.get('status', {}))[:2000]}"
                                f"\n--- kwok log tail ---\n{_tail(self.log_path('kwok'))}")

    # ------------------------------------------------------------------ internals
    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=self.workdir)
        if proc.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")

    def _extra_san(self) -> str:
        a = self.advertise_address
        return f"IP:{a}," if a not in ("127.0.0.1", "10.0.0.1") else ""

    def _generate_credentials(self) -> None:
        if shutil.which("openssl") is None:
            raise ControlPlaneError("openssl is required to generate the test CA and keys")
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        self.ca_file = pki / "ca.crt"
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
                      "-keyout", str(pki / "ca.key"), "-out", str(self.ca_file),
                      "-subj", "/CN=kubeflash-test-ca",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256",
                      "-keyout", str(pki / "apiserver.key"), "-out", str(pki / "apiserver.csr"),
                      "-subj", "/CN=kube-apiserver")
        (pki / "apiserver.ext").write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
            f"subjectAltName=IP:127.0.0.1,IP:10.0.0.1,{self._extra_san()}DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n")
        self._openssl("x509", "-req", "-in", str(pki / "apiserver.csr"), "-CA", str(self.ca_file),
                      "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-sha256", "-days", "2",
                      "-extfile", str(pki / "apiserver.ext"), "-out", str(pki / "apiserver.crt"))
        if self.persistent:  # a real kubelet: the apiserver authenticates to it with this client certificate
            self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256",
                          "-keyout", str(pki / "kubelet-client.key"), "-out", str(pki / "kubelet-client.csr"),
                          "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client")
            (pki / "kubelet-client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
            self._openssl("x509", "-req", "-in", str(pki / "kubelet-client.csr"), "-CA", str(self.ca_file),
                          "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-sha256", "-days", "2",
                          "-extfile", str(pki / "kubelet-client.ext"), "-out", str(pki / "kubelet-client.crt"))
            self.extra_apiserver_args += [f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
                                          f"--kubelet-client-key={pki / 'kubelet-client.key'}"]
        self._openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        self._openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
        self.token = secrets.token_hex(24)
        lines = [f'{self.token},admin,kubeflash-admin,"system:masters"']
        lines += [f'{tok},{user},{user},"{groups}"' for tok, user, groups in self.extra_tokens]
        (pki / "tokens.csv").write_text("\n".join(lines) + "\n")
        for f in pki.iterdir():
            f.chmod(0o600)
        self._ssl = ssl.create_default_context(cafile=str(self.ca_file))

    def _spawn(self, name: str, args: Sequence[str]) -> _Proc:
        args = [*args, *self.extra_args.get(name, ())]
        log = self.log_path(name)
        with open(log, "ab") as fh:
            fh.write(f"$ {' '.join(args)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                list(args), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") and not self.persistent else None,
                env={**os.environ, "HOME": str(self.workdir / "home")},
            )
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def _fail(self, proc: _Proc, why: str) -> None:
        raise ControlPlaneError(f"{proc.name} {why}; log {proc.log}:\n{_tail(proc.log)}")

    def _wait(self, proc: _Proc, ready, what: str, timeout: float | None = None) -> None:
        """Poll ready() until true; fail early with the log tail if the process exits."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                self._fail(proc, f"exited with status {proc.popen.returncode} before {what}")
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.25)
        self._fail(proc, f"not {what} within {timeout or self.start_timeout:.0f}s")

    @staticmethod
    def _https_ok(url: str, ctx: ssl.SSLContext | None = None, headers: Mapping[str, str] | None = None) -> bool:
        if ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(url, headers=dict(headers or {}))
        with urllib.request.urlopen(req, timeout=3, context=ctx) as resp:
            return resp.status == 200

    def _start_etcd(self) -> None:
        client, peer = self._port("etcd"), self._port("etcd-peer")
        self.etcd_url = f"http://127.0.0.1:{client}"
        proc = self._spawn("etcd", [
            str(self.bin_dir / "etcd"),
            "--name=kubeflash-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=kubeflash-test=http://127.0.0.1:{peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648",
            "--log-level=warn",
        ])

        def healthy() -> bool:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
                return json.loads(resp.read()).get("health") == "true"

        self._wait(proc, healthy, "healthy")

    def _start_apiserver(self) -> None:
        port = self._port("apiserver")
        pki = self.workdir / "pki"
        self.server = f"https://127.0.0.1:{port}"
        proc = self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.bind_address}",
            f"--advertise-address={self.advertise_address}",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
            f"--endpoint-reconciler-type={self.endpoint_reconciler}",
            *self.extra_apiserver_args,
        ])
        headers = {"Authorization": f"Bearer {self.token}"}
        self._wait(proc, lambda: self._https_ok(self.server + "/readyz", self._ssl, headers), "ready (/readyz)")

    def _write_kubeconfig(self) -> None:
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\n"
            "kind: Config\n"
            "clusters:\n"
            "- name: kubeflash-test\n"
            "  cluster:\n"
            f"    server: {self.server}\n"
            f"    certificate-authority-data: {ca_data}\n"
            "users:\n"
            "- name: admin\n"
            "  user:\n"
            f"    token: {self.token}\n"
            "contexts:\n"
            "- name: kubeflash-test\n"
            "  context:\n"
            "    cluster: kubeflash-test\n"
            "    user: admin\n"
            "    namespace: default\n"
            "current-context: kubeflash-test\n"
        )
        self.kubeconfig.chmod(0o600)

    def _start_controller_manager(self) -> None:
        port = self._port("controller-manager")
        pki = self.workdir / "pki"
        proc = self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            f"--cluster-signing-cert-file={self.ca_file}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--use-service-account-credentials=false",
            "--profiling=false",
        ])
        self._wait(proc, lambda: self._https_ok(f"https://127.0.0.1:{port}/healthz"), "healthy (/healthz)")

    def _start_scheduler(self) -> None:
        port = self._port("scheduler")
        proc = self._spawn("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"),
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--leader-elect=false",
            "--profiling=false",
        ])
        self._wait(proc, lambda: self._https_ok(f"https://127.0.0.1:{port}/healthz"), "healthy (/healthz)")

    def _start_kwok(self) -> None:
        port = free_port()
        key, value = KWOK_NODE_ANNOTATION
        config = self.workdir / "kwok.yaml"
        # An empty config file: kwok would otherwise read ~/.kwok/kwok.yaml. With no Stage
        # configured kwok uses its built-in default node and pod stages (nodes go Ready,
        # pods go Running, Job pods complete).
        config.write_text(json.dumps({"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration",
                                      "options": self.kwok_options}) if self.kwok_options else "")
        proc = self._spawn("kwok", [
            str(self.bin_dir / "kwok"),
            f"--kubeconfig={self.kubeconfig}",
            f"--config={config}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            "--manage-nodes-with-label-selector=",
            "--cidr=10.0.0.1/24",
            "--node-ip=10.0.0.1",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{port}",
        ])

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, ConnectionError):
                return self._https_ok(f"https://127.0.0.1:{port}/healthz")

        self._wait(proc, healthy, "healthy (/healthz)")

    def _wait_cluster_usable(self) -> None:
        """The controller manager has made the default ServiceAccount (pods need it)."""
        kcm = next(p for p in self._procs if p.name == "kube-controller-manager")

        def sa_exists() -> bool:
            status, _ = self.api_get("/api/v1/namespaces/default/serviceaccounts/default")
            return status == 200

        self._wait(kcm, sa_exists, "creating the default ServiceAccount")
