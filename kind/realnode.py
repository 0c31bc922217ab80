"""A real one-node Kubernetes cluster on this machine: the control plane of tests/cluster/controlplane.py plus a
real kubelet, kube-proxy and containerd (runc, CNI bridge), the kubeflash images built offline and the chart
installed with pullPolicy Never. Run as root; everything it changes on the host is recorded and undone by `down`.

    python kind/realnode.py up      # idempotent: a running cluster is checked and kept, images/chart updated
    python kind/realnode.py demo    # capital-of-france: wait for Succeeded, print the answer
    python kind/realnode.py down    # stop by pid, unmount, remove interfaces/iptables rules, restore sysctls
    python kind/realnode.py logs    # the tails of every component's log (what a failing test prints)

State (pids, the sysctls and iptables chains found before, the kubeconfig): /run/kubeflash-node.
Data (etcd, certificates, containerd's images, CNI, logs, the node's store): /var/lib/kubeflash-node.
The kubelet keeps its standard root /var/lib/kubelet (CSI plugins register there); removed by `down` when
it was not there before. The node is CPU-only and says so: nvidia.com/gpu is advertised as an extended
resource (node status capacity, the documented way) and the node is labelled kubeflash.io/cpu-executing=true;
the operator runs the engine with KUBEFLASH_DEVICE=cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from controlplane import ControlPlane, ControlPlaneError  # noqa: E402

STATE = Path(os.environ.get("KUBEFLASH_NODE_RUN", "/run/kubeflash-node"))
DATA = Path(os.environ.get("KUBEFLASH_NODE_DATA", "/var/lib/kubeflash-node"))
KUBELET_ROOT = Path("/var/lib/kubelet")
NODE_NAME = "kubeflash-node"
NAMESPACE = "kubeflash-system"
RELEASE = "kubeflash"
POD_CIDR = "10.244.0.0/24"
BRIDGE = "kfbr0"
GPUS = 2  # advertised nvidia.com/gpu (extended resource; the pods compute on the CPU)
STORE = DATA / "store"
SOCK = STATE / "containerd" / "containerd.sock"
PORTS = {"etcd": 2379, "etcd-peer": 2380, "apiserver": 6443, "controller-manager": 10257, "scheduler": 10259,
         "kubelet": 10250, "kubelet-healthz": 10248, "kube-proxy-metrics": 10249, "kube-proxy-healthz": 10256}
# Sysctls that the kubelet, kube-proxy or the CNI bridge may change: recorded on `up`, restored on `down`.
SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward",
           "net/ipv4/conf/all/route_localnet", "net/bridge/bridge-nf-call-iptables",
           "net/bridge/bridge-nf-call-ip6tables", "net/netfilter/nf_conntrack_max",
           "net/netfilter/nf_conntrack_tcp_timeout_established", "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
           "net/ipv6/conf/all/forwarding")
PACKAGES = {"containerd": "containerd", "runc": "runc", "/usr/lib/cni/bridge": "containernetworking-plugins",
            "debootstrap": "debootstrap", "dockerd": "docker.io", "iptables": "iptables", "conntrack": "conntrack"}
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


class HarnessError(RuntimeError):
    """Bring-up or teardown cannot go on; the message says why and what to do."""


def log(msg: str) -> None:
    print(f"[realnode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True, input: str | None = None, timeout: float = 600,
        env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.chmod(mode)
    os.replace(tmp, path)


def node_ip() -> str:
    out = run("ip", "-4", "route", "get", "1.1.1.1", check=False).stdout.split()
    if "src" in out:
        return out[out.index("src") + 1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]


# ---------------------------------------------------------------- processes by pid (never by name)
def _starttime(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def record_pid(name: str, pid: int) -> None:
    pids = load_json(STATE / "pids.json", {})
    pids[name] = {"pid": pid, "start": _starttime(pid)}
    write_atomic(STATE / "pids.json", json.dumps(pids, indent=1))


def alive(entry: dict) -> bool:
    return entry.get("start") is not None and _starttime(entry["pid"]) == entry["start"]


def stop_pid(name: str, entry: dict, grace: float = 15) -> None:
    if not alive(entry):
        return
    pid = entry["pid"]
    log(f"stopping {name} (pid {pid})")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(entry):
        time.sleep(0.2)
    if alive(entry):
        os.kill(pid, signal.SIGKILL)
        while alive(entry):
            time.sleep(0.1)


def load_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def spawn(name: str, args: list[str], env: dict | None = None) -> int:
    """Start a long-lived component in its own session, its output in DATA/logs/<name>.log; record its pid."""
    logf = DATA / "logs" / f"{name}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    with open(logf, "ab") as fh:
        fh.write(f"$ {' '.join(args)}\n".encode())
        fh.flush()
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env or dict(os.environ))
    record_pid(name, p.pid)
    return p.pid


def wait(what: str, ok, timeout: float, name: str | None = None, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    entry = load_json(STATE / "pids.json", {}).get(name) if name else None
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except Exception:
            pass
        if entry and not alive(entry):
            raise HarnessError(f"{name} exited before {what}:\n{tail(DATA / 'logs' / f'{name}.log')}")
        time.sleep(every)
    extra = f"\n{tail(DATA / 'logs' / f'{name}.log')}" if name else ""
    raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return f"--- {path} (last {lines} lines) ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"--- {path}: no log ---"


# ---------------------------------------------------------------- checks
def preflight() -> None:
    if os.geteuid() != 0:
        raise HarnessError("the real-node harness needs root (it runs containerd, the kubelet and kube-proxy, "
                           "changes iptables and sysctls); run it as root, e.g. `sudo make cluster`")
    missing = sorted({pkg for tool, pkg in PACKAGES.items()
                      if not (Path(tool).exists() if tool.startswith("/") else shutil.which(tool))})
    if missing:
        if shutil.which("apt-get") is None:
            raise HarnessError(f"missing packages {', '.join(missing)} and no apt-get to install them")
        log(f"installing {' '.join(missing)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run("apt-get", "update", "-q", env=env, timeout=900)
        run("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, env=env, timeout=1800)
    if not Path(KUBECTL).exists():
        raise HarnessError("kubectl is not installed (expected on PATH or at /usr/bin/kubectl)")
    if not Path("/proc/sys/net/bridge").exists():
        run("modprobe", "br_netfilter", check=False)


def ports_taken() -> list[str]:
    taken = []
    for name, port in PORTS.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                taken.append(f"{port} ({name})")
    return taken


def cluster_running() -> bool:
    pids = load_json(STATE / "pids.json", {})
    wanted = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "containerd", "kubelet",
              "kube-proxy")
    return bool(pids) and all(n in pids and alive(pids[n]) for n in wanted)


# ---------------------------------------------------------------- host state: record and restore
def record_host() -> None:
    """What `down` restores: sysctl values, iptables chains, whether /var/lib/kubelet existed, netns present."""
    if (STATE / "host.json").exists():
        return
    sysctls = {}
    for key in SYSCTLS:
        try:
            sysctls[key] = Path("/proc/sys", key).read_text().strip()
        except OSError:
            pass
    host = {"sysctls": sysctls, "kubelet_root_existed": KUBELET_ROOT.exists(),
            "netns": sorted(os.listdir("/run/netns")) if Path("/run/netns").is_dir() else [],
            "run_netns_existed": Path("/run/netns").exists(), "cni_dir_existed": Path("/var/lib/cni").exists(),
            "root_shared": root_is_shared(),
            **{b: {t: iptables_chains(t, b) for t in ("filter", "nat", "mangle")} for b in ("iptables", "ip6tables")}}
    write_atomic(STATE / "host.json", json.dumps(host, indent=1))


def root_is_shared() -> bool:
    """Whether / is a shared mount (mount propagation: the kubelet needs it for Bidirectional/HostToContainer)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return any(f.startswith("shared:") for f in fields[6:fields.index("-")])
    return False


def iptables_chains(table: str, binary: str = "iptables") -> list[str]:
    if not shutil.which(f"{binary}-save"):
        return []
    out = run(f"{binary}-save", "-t", table, check=False).stdout
    return sorted(line[1:].split()[0] for line in out.splitlines() if line.startswith(":"))


def restore_iptables(host: dict) -> None:
    """Remove the KUBE-*/CNI-* chains that were not there before, and every rule that jumps to them."""
    import shlex
    for binary in ("iptables", "ip6tables"):
        if not shutil.which(f"{binary}-save"):
            continue
        for table in ("filter", "nat", "mangle"):
            before = set(host.get(binary, {}).get(table, []))
            out = run(f"{binary}-save", "-t", table, check=False).stdout
            chains = [line[1:].split()[0] for line in out.splitlines() if line.startswith(":")]
            new = {c for c in chains if c not in before and c.startswith(("KUBE-", "CNI-"))}
            if not new:
                continue
            for line in out.splitlines():
                if not line.startswith("-A "):
                    continue
                args = shlex.split(line)
                target = args[args.index("-j") + 1] if "-j" in args else None
                if args[1] not in new and target in new:
                    run(binary, "-t", table, "-D", *args[1:], check=False)
            for c in new:
                run(binary, "-t", table, "-F", c, check=False)
            for c in new:
                run(binary, "-t", table, "-X", c, check=False)
            log(f"{binary} {table}: removed {len(new)} chains")


def restore_sysctls(host: dict) -> None:
    for key, value in host.get("sysctls", {}).items():
        path = Path("/proc/sys", key)
        try:
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
                log(f"restored sysctl {key.replace('/', '.')} = {value}")
        except OSError as e:
            log(f"could not restore sysctl {key}: {e}")


def unmount_under(*roots: Path) -> None:
    for _ in range(3):
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4].replace("\\040", " ")
            if any(mp == str(r) or mp.startswith(str(r) + "/") for r in roots):
                mounts.append(mp)
        if not mounts:
            return
        for mp in sorted(set(mounts), key=len, reverse=True):
            if run("umount", mp, check=False).returncode != 0:
                run("umount", "-l", mp, check=False)


# ---------------------------------------------------------------- components
STORE_SIZE = os.environ.get("KUBEFLASH_NODE_STORE_SIZE", "40G")


def mount_store() -> None:
    """The node's "NVMe": a sparse ext4 image loop-mounted at STORE, so the space the agent reports (and the
    operator places jobs by) is the node's own, not whatever the builds and other tests leave on the host disk.
    Sparse: it takes only what is written. Unmounted (loop device freed) and deleted by `down`."""
    if os.path.ismount(STORE):
        return
    image = DATA / "store.img"
    if not image.exists():
        run("truncate", "-s", STORE_SIZE, str(image))
        run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    STORE.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "loop", str(image), str(STORE))
    log(f"store: {STORE_SIZE} sparse ext4 image loop-mounted at {STORE}")


def start_control_plane(ip: str) -> None:
    tokens = {"kubelet": secrets.token_hex(16), "kube-proxy": secrets.token_hex(16)}
    cp = ControlPlane(workdir=DATA / "cp", bind_address="0.0.0.0", advertise_address=ip,
                      ports=PORTS, persistent=True, with_kwok=False, endpoint_reconciler="lease",
                      extra_apiserver_args=["--kubelet-preferred-address-types=InternalIP,Hostname"],
                      extra_tokens=[(tokens["kubelet"], f"system:node:{NODE_NAME}", "system:nodes"),
                                    (tokens["kube-proxy"], "system:kube-proxy", "system:node-proxier")])
    try:
        cp.start()
    except ControlPlaneError as e:
        for name, pid in cp.processes():
            record_pid(name, pid)
        raise HarnessError(f"control plane failed to start: {e}") from e
    for name, pid in cp.processes():
        record_pid(name, pid)
    for name, tok in tokens.items():
        kubeconfig(DATA / f"{name}.kubeconfig", cp.server, cp.ca_file, tok)
    shutil.copy(cp.kubeconfig, STATE / "kubeconfig")
    write_atomic(STATE / "cluster.json", json.dumps({"server": cp.server, "ca": str(cp.ca_file), "ip": ip,
                                                     "bin_dir": str(cp.bin_dir)}))


def kubeconfig(path: Path, server: str, ca: Path, token: str) -> None:
    write_atomic(path, f"""apiVersion: v1
kind: Config
clusters:
- name: kubeflash
  cluster: {{server: "{server}", certificate-authority: "{ca}"}}
users:
- name: u
  user: {{token: "{token}"}}
contexts:
- name: c
  context: {{cluster: kubeflash, user: u}}
current-context: c
""", 0o600)


def containerd_config(pause_ref: str) -> Path:
    cfg = DATA / "containerd.toml"
    write_atomic(cfg, f"""version = 2
root = "{DATA}/containerd"
state = "{STATE}/containerd"
[grpc]
  address = "{SOCK}"
[ttrpc]
  address = "{SOCK}.ttrpc"
[debug]
  address = "{STATE}/containerd/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{DATA}/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/{pause_ref}"
  restrict_oom_score_adj = true
  enable_unprivileged_ports = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{DATA}/cni/net.d"
""")
    write_atomic(DATA / "cni" / "net.d" / "10-kubeflash.conflist", json.dumps({
        "cniVersion": "0.4.0", "name": "kubeflash",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(DATA / "cni" / "ipam"),
                      "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}, indent=1))
    return cfg


def ctr(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    return run("ctr", "--address", str(SOCK), "--namespace", "k8s.io", *args, check=check, timeout=timeout)


def start_containerd(pause_ref: str) -> None:
    cfg = containerd_config(pause_ref)
    (STATE / "containerd").mkdir(parents=True, exist_ok=True)
    spawn("containerd", ["containerd", "--config", str(cfg)])
    wait("containerd to answer", lambda: ctr("version", check=False).returncode == 0, 60, "containerd")


def start_kubelet(bin_dir: Path, ip: str, ca: str) -> None:
    cfg = DATA / "kubelet.yaml"
    write_atomic(cfg, f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://{SOCK}
imageServiceEndpoint: unix://{SOCK}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# The images are GBs and the disk is shared with the builds: evict on memory only, never GC the (unpinnable in
# containerd 1.6) pause image or the never-pulled kubeflash images for disk space.
evictionHard: {{memory.available: "100Mi", nodefs.available: "100Mi", imagefs.available: "100Mi"}}
evictionPressureTransitionPeriod: 10s
podPidsLimit: -1
maxPods: 50
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
registerNode: true
""")
    spawn("kubelet", [str(bin_dir / "kubelet"), f"--config={cfg}", f"--kubeconfig={DATA / 'kubelet.kubeconfig'}",
                      f"--root-dir={KUBELET_ROOT}", f"--cert-dir={DATA / 'kubelet-pki'}",
                      f"--hostname-override={NODE_NAME}", f"--node-ip={ip}",
                      "--node-labels=kubeflash.io/ssd=true,kubeflash.io/cpu-executing=true", "--v=1"])


def start_kube_proxy(bin_dir: Path) -> None:
    cfg = DATA / "kube-proxy.yaml"
    write_atomic(cfg, f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: "{DATA / 'kube-proxy.kubeconfig'}"}}
mode: iptables
clusterCIDR: {POD_CIDR}
hostnameOverride: {NODE_NAME}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")
    spawn("kube-proxy", [str(bin_dir / "kube-proxy"), f"--config={cfg}", "--v=1"])


def kubectl(*args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return run(KUBECTL, f"--kubeconfig={STATE / 'kubeconfig'}", *args, check=check, input=input, timeout=timeout)


def node_ready() -> bool:
    out = kubectl("get", "node", NODE_NAME, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                  check=False)
    return out.stdout.strip() == "True"


def advertise_gpus() -> None:
    """nvidia.com/gpu as an extended resource: a JSON patch of the node's status capacity (the kubelet copies it
    into allocatable). The node carries kubeflash.io/cpu-executing=true: these 'GPUs' are CPU slots."""
    patch = json.dumps([{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(GPUS)}])
    kubectl("patch", "node", NODE_NAME, "--subresource=status", "--type=json", "-p", patch)
    wait("nvidia.com/gpu in the node's allocatable", lambda: kubectl(
        "get", "node", NODE_NAME, "-o", "jsonpath={.status.allocatable.nvidia\\.com/gpu}").stdout == str(GPUS), 60)


def build_binaries() -> Path:
    proc = subprocess.run(["bash", str(REPO / "kind" / "build-node.sh")], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"kind/build-node.sh failed ({proc.returncode}); kubelet/kube-proxy could not be built")
    return Path(proc.stdout.strip().splitlines()[-1])


def start_image_build() -> subprocess.Popen:
    """kind/images.sh in the background (network and disk bound; overlaps the Go builds, which are CPU bound)."""
    return subprocess.Popen(["bash", str(REPO / "kind" / "images.sh")], stdout=subprocess.PIPE, text=True)


def build_images(proc: subprocess.Popen | None = None) -> dict[str, str]:
    """{"pause"|"operator"|"node": ref, "<kind>_tar": path} once kind/images.sh is done."""
    proc = proc or start_image_build()
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise HarnessError(f"kind/images.sh failed ({proc.returncode}): an image did not build (its log is named above)")
    refs = {}
    for line, kind in zip(out.strip().splitlines()[-3:], ("pause", "operator", "node"), strict=True):
        ref, tar = line.split()
        refs[kind] = ref
        refs[f"{kind}_tar"] = tar
    return refs


def import_images(refs: dict[str, str]) -> None:
    have = set(ctr("images", "ls", "-q").stdout.split())
    for kind in ("pause", "operator", "node"):
        full = f"docker.io/{refs[kind]}" if "/" in refs[kind] else f"docker.io/library/{refs[kind]}"
        if full in have:
            continue
        repo = full.rsplit(":", 1)[0]
        old = [r for r in have if r.rsplit(":", 1)[0] == repo and r != full]
        if old and kind != "pause":  # older keys of this image go first: the disk never holds both (~2 x 6 GB each)
            ctr("images", "rm", "--sync", *old, check=False)
        tar = Path(refs[f"{kind}_tar"])
        need, free = 2 * tar.stat().st_size + (1 << 30), shutil.disk_usage(DATA).free  # its blobs, then unpacked
        if free < need:
            raise HarnessError(f"importing {refs[kind]} into containerd needs about {need >> 30} GiB free in {DATA} "
                               f"({tar} is {tar.stat().st_size >> 30} GiB, stored and unpacked), which has "
                               f"{free >> 30} GiB; free some (old test runs: rm -rf /tmp/pytest-of-$USER) and run again")
        t0 = time.monotonic()
        log(f"importing {refs[kind]} into containerd")
        ctr("images", "import", str(tar), timeout=1800)
        if kind == "pause":
            ctr("images", "label", full, "io.cri-containerd.pinned=pinned", check=False)
        log(f"{refs[kind]} imported in {time.monotonic() - t0:.0f}s")


def helm_install(bin_dir: Path, refs: dict[str, str]) -> None:
    op_repo, op_tag = refs["operator"].split(":")
    node_repo, node_tag = refs["node"].split(":")
    env = dict(os.environ, KUBECONFIG=str(STATE / "kubeconfig"), HELM_CACHE_HOME=str(DATA / "helm" / "cache"),
               HELM_CONFIG_HOME=str(DATA / "helm" / "config"), HELM_DATA_HOME=str(DATA / "helm" / "data"))
    log(f"helm upgrade --install {RELEASE} ({refs['operator']}, {refs['node']}, pullPolicy Never)")
    chart = os.environ.get("KUBEFLASH_CHART", str(REPO / "helm" / "kubeflash"))
    proc = subprocess.run([str(bin_dir / "helm"), "upgrade", "--install", RELEASE, chart,
                           "-n", NAMESPACE, "--create-namespace", "-f", str(REPO / "kind" / "node-values.yaml"),
                           "--set", f"operator.image.repository={op_repo}", "--set", f"operator.image.tag={op_tag}",
                           "--set", f"agent.image.repository={node_repo}", "--set", f"agent.image.tag={node_tag}",
                           "--set", f"agent.storePath={STORE}", "--wait", "--timeout", "10m"],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise HarnessError(f"helm install failed: {proc.stderr.strip()[-2000:]}\n{describe_problems()}")
    for what in ("deployment/kubeflash-operator", "daemonset/kubeflash-agent"):
        kubectl("-n", NAMESPACE, "rollout", "status", what, "--timeout=5m", timeout=330)
    wait("the node's FlashNode to report GPU<->SSD pairs", lambda: kubectl(
        "get", "flashnode", NODE_NAME, "-o", "jsonpath={.status.pairs}", check=False).stdout.strip() not in ("", "[]"),
        300, every=2)


def describe_problems() -> str:
    """Events of non-normal type and pods not running in the kubeflash namespace: the 'why' of a failure."""
    ev = kubectl("get", "events", "-A", "--field-selector=type!=Normal", "--sort-by=.lastTimestamp", check=False)
    pods = kubectl("get", "pods", "-A", "-o", "wide", check=False)
    return f"--- warning events ---\n{ev.stdout[-3000:]}\n--- pods ---\n{pods.stdout}"


# ---------------------------------------------------------------- commands
def up() -> None:
    t_start = time.monotonic()
    preflight()
    STATE.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    if cluster_running():
        log("the cluster is already running: keeping it (images and chart are brought up to date)")
        info = load_json(STATE / "cluster.json", {})
        bin_dir = Path(info["bin_dir"])
        refs = build_images()
        import_images(refs)
    else:
        if load_json(STATE / "pids.json", {}):
            log("a partial cluster from an earlier run is around: taking it down first")
            down()
            STATE.mkdir(parents=True, exist_ok=True)
        taken = ports_taken()
        if taken:
            raise HarnessError(f"port(s) already in use: {', '.join(taken)}; stop what listens there "
                               "(`ss -ltnp`) and run again")
        record_host()
        if not root_is_shared():  # volumes with mount propagation (the store, CSI) need a shared /
            run("mount", "--make-shared", "/")
            log("made / a shared mount (restored by cluster-down)")
        ip = node_ip()
        t0 = time.monotonic()
        images = start_image_build()
        try:
            bin_dir = build_binaries()
        except BaseException:
            images.terminate()
            images.wait()
            raise
        log(f"binaries ready in {time.monotonic() - t0:.0f}s: {bin_dir}")
        refs = build_images(images)
        log(f"images ready in {time.monotonic() - t0:.0f}s")
        log(f"control plane on {ip}:6443")
        if (DATA / "cp").exists():
            shutil.rmtree(DATA / "cp")  # fresh etcd and certificates each time the cluster starts
        mount_store()
        start_control_plane(ip)
        start_containerd(refs["pause"])
        import_images(refs)
        info = load_json(STATE / "cluster.json", {})
        start_kubelet(bin_dir, ip, info["ca"])
        start_kube_proxy(bin_dir)
        wait(f"node {NODE_NAME} Ready", node_ready, 180, "kubelet", every=1)
        advertise_gpus()
        log(f"node {NODE_NAME} Ready; nvidia.com/gpu={GPUS} advertised (CPU-executing)")
    helm_install(bin_dir, refs)
    log(f"cluster up in {time.monotonic() - t_start:.0f}s; KUBECONFIG={STATE / 'kubeconfig'}")


def demo(timeout: float = 600) -> None:
    job = "capital-of-france"
    kubectl("delete", "ij", job, "--ignore-not-found", "--wait=true", timeout=180)
    kubectl("apply", "-f", str(REPO / "examples" / f"{job}.yaml"))
    deadline = time.monotonic() + timeout
    phase = ""
    while time.monotonic() < deadline:
        phase = kubectl("get", "ij", job, "-o", "jsonpath={.status.phase}", check=False).stdout
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(3)
    print(kubectl("get", "ij", job, "-o", "wide").stdout)
    if phase != "Succeeded":
        print(kubectl("describe", "ij", job, check=False).stdout, file=sys.stderr)
        raise HarnessError(f"{job} ended {phase or 'without a phase'}\n{describe_problems()}")
    results = job_results("default", job)
    print(results)
    if "Paris" not in results:
        raise HarnessError("no 'Paris' in the results")
    log("ok: the example answered Paris")


def job_results(namespace: str, job: str) -> str:
    path = STORE / "jobs" / namespace / job / "results.jsonl"
    return path.read_text()


def down() -> None:
    if os.geteuid() != 0:
        raise HarnessError("cluster-down needs root (it stops root processes, unmounts, restores sysctls)")
    pids = load_json(STATE / "pids.json", {})
    host = load_json(STATE / "host.json", {})
    if not pids and not host:
        log("no cluster recorded in /run/kubeflash-node: nothing to do")
    # the kubelet first (nothing restarts pods), then every pod's containers, then containerd
    for name in ("kubelet", "kube-proxy"):
        if name in pids:
            stop_pid(name, pids[name])
    if "containerd" in pids and alive(pids["containerd"]):
        for task in ctr("tasks", "ls", "-q", check=False).stdout.split():
            ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        time.sleep(1)
        for task in ctr("tasks", "ls", "-q", check=False).stdout.split():
            ctr("tasks", "delete", "-f", task, check=False)
        for c in ctr("containers", "ls", "-q", check=False).stdout.split():
            ctr("containers", "delete", c, check=False)
    for name in ("containerd", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
        if name in pids:
            stop_pid(name, pids[name])
    stop_leftover_dockerd()
    # shims of our containerd (their command line names our socket), then their containers
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and str(SOCK).encode() in cmd:
                pid = int(d.name)
                stop_pid("containerd-shim", {"pid": pid, "start": _starttime(pid)}, grace=3)
    unmount_under(KUBELET_ROOT, DATA, STATE)
    # network namespaces the CNI made (bind mounts under /run/netns), then the bridge
    before = set(host.get("netns", []))
    if Path("/run/netns").is_dir():
        for ns in os.listdir("/run/netns"):
            if ns.startswith("cni-") and ns not in before:
                run("umount", f"/run/netns/{ns}", check=False)
                Path("/run/netns", ns).unlink(missing_ok=True)
        if not host.get("run_netns_existed", True) and not os.listdir("/run/netns"):
            Path("/run/netns").rmdir()
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        run("ip", "link", "delete", BRIDGE, check=False)
        log(f"removed interface {BRIDGE}")
    bin_dir = Path(load_json(STATE / "cluster.json", {}).get("bin_dir", ""))
    if bin_dir and (bin_dir / "kube-proxy").exists():
        run(str(bin_dir / "kube-proxy"), "--cleanup", check=False)
    if host:
        restore_iptables(host)
        restore_sysctls(host)
        if host.get("root_shared") is False and root_is_shared():
            run("mount", "--make-private", "/", check=False)
            log("/ is a private mount again")
        if not host.get("kubelet_root_existed", True) and KUBELET_ROOT.exists():
            shutil.rmtree(KUBELET_ROOT, ignore_errors=True)
        if not host.get("cni_dir_existed", True) and Path("/var/lib/cni").exists():
            shutil.rmtree("/var/lib/cni", ignore_errors=True)
    for sub in ("cp", "cni", "kubelet-pki", "helm", "store"):
        shutil.rmtree(DATA / sub, ignore_errors=True)
    (DATA / "store.img").unlink(missing_ok=True)
    shutil.rmtree(STATE, ignore_errors=True)
    log("cluster down; host restored (containerd's image cache stays in "
        f"{DATA}/containerd; `make cluster-down PURGE=1` removes {DATA})")
    if os.environ.get("PURGE", "") not in ("", "0"):
        unmount_under(DATA)
        shutil.rmtree(DATA, ignore_errors=True)


def stop_leftover_dockerd() -> None:
    """The dockerd of a kind/images.sh that was killed before it could stop it; never one of a running build
    (kind/images.sh holds the image cache's lock while it runs)."""
    import fcntl
    pidfile = Path("/run/kubeflash-images/dockerd.pid")
    lock = Path(os.environ.get("KUBEFLASH_IMAGE_CACHE", Path.home() / ".cache/kubeflash/images")) / ".lock"
    if not pidfile.exists() or not lock.exists():
        return
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log("kind/images.sh is building: its dockerd stays")
            return
        try:
            pid = int(pidfile.read_text())
        except ValueError:
            return
        stop_pid("dockerd (left by kind/images.sh)", {"pid": pid, "start": _starttime(pid)})
        pidfile.unlink(missing_ok=True)


def component_logs(lines: int = 60) -> str:
    """The tails of the logs of the processes this harness runs (containerd, kubelet, kube-proxy, control plane)."""
    parts = [tail(p, lines) for p in sorted((DATA / "logs").glob("*.log"))]
    parts += [tail(p, lines) for p in sorted((DATA / "cp" / "logs").glob("*.log"))]
    return "\n".join(parts)


def logs(lines: int = 60) -> str:
    parts = [component_logs(lines)]
    if (STATE / "kubeconfig").exists():
        for app in ("kubeflash-operator", "kubeflash-agent"):
            p = kubectl("logs", "-n", NAMESPACE, "-l", f"app.kubernetes.io/component={app.split('-')[1]}",
                        "--all-containers", f"--tail={lines}", "--prefix", check=False, timeout=30)
            parts.append(f"--- {app} pods ---\n{p.stdout}{p.stderr}")
        parts.append(describe_problems())
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "demo", "logs", "status"))
    args = ap.parse_args()
    try:
        if args.command == "up":
            up()
        elif args.command == "demo":
            demo()
        elif args.command == "down":
            down()
        elif args.command == "logs":
            print(logs())
        elif args.command == "status":
            print("running" if cluster_running() else "not running")
            return 0 if cluster_running() else 1
    except HarnessError as e:
        log(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
