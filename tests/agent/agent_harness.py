"""Helpers for the agent tests: tiny real models, a real HTTP file server, fake sysfs trees, and a real
`kubeflash agent` process driven through its config file and local HTTP API.

Nothing here mocks the agent: tests start `python -m kubeflash_node.cli agent` and look at files and HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
# http(s) sources are off by default; the tests' file server is on 127.0.0.1, so they allow exactly that host
LOOPBACK_HTTP = {"allowHttp": True, "httpSources": {"allowHosts": ["127.0.0.1"], "privateHosts": ["127.0.0.1"]}}
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "node-agent"), str(REPO / "operator")]))


# ------------------------------------------------------------------------------------------ models


def write_tiny_llama(out: Path, *, vocab: int = 256, hidden: int = 64, layers: int = 2, seed: int = 0,
                     dtype: str = "float32") -> Path:
    """A real Hugging Face llama directory (config.json + model.safetensors) of a few hundred KB."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    inter, heads = hidden * 2, 4
    cfg = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    tdt = getattr(torch, dtype)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(tdt)

    t = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=tdt),
         "lm_head.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": torch.ones(hidden, dtype=tdt),
              p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=tdt),
              p + "self_attn.q_proj.weight": r(hidden, hidden), p + "self_attn.k_proj.weight": r(hidden, hidden),
              p + "self_attn.v_proj.weight": r(hidden, hidden), p + "self_attn.o_proj.weight": r(hidden, hidden),
              p + "mlp.gate_proj.weight": r(inter, hidden), p + "mlp.up_proj.weight": r(inter, hidden),
              p + "mlp.down_proj.weight": r(hidden, inter)}
    save_file(t, str(out / "model.safetensors"))
    return out


def make_tar(src: Path, dest: Path) -> Path:
    """A .tar (or .tar.gz) of an HF directory, with the directory as the archive's top level."""
    mode = "w:gz" if dest.name.endswith(".gz") else "w"
    with tarfile.open(dest, mode) as t:
        t.add(src, arcname=src.name)
    return dest


def model_id(uri: str, dtype: str = "float16") -> str:
    from kubeflash_node.store.ids import model_id as mid

    return mid(uri, dtype=dtype)


# ------------------------------------------------------------------------------------- HTTP server


class FileServer:
    """A real HTTP server on loopback serving one directory; optionally slow, or without Content-Length."""

    def __init__(self, root: Path, *, bytes_per_second: int = 0, content_length: bool = True):
        self.root, self.rate, self.length = root, bytes_per_second, content_length
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(server.root), **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                path = Path(self.translate_path(self.path))
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if server.length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                step = 64 << 10
                try:
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i:i + step])
                        if server.rate:
                            time.sleep(step / server.rate)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------- sysfs


def fake_sysfs(root: Path, *, gpus: dict[str, dict], nvme: dict[str, dict]) -> Path:
    """A sysfs tree as Linux lays it out for PCI GPUs and NVMe namespaces.

    gpus: bus id -> {"parents": [root port, switch…], "numa": n}; nvme: "nvme0n1" -> same plus "size" (bytes)
    and "rotational". Devices live under devices/pci<domain:bus>/…; bus/pci/devices, class/nvme, block and
    class/block hold relative symlinks to them, like the kernel's.
    """

    def place(bus: str, spec: dict) -> Path:
        host = "pci" + ":".join(spec["parents"][0].split(":")[:2]) if spec["parents"] else "pci" + bus[:7]
        d = root / "devices" / host
        for p in [*spec["parents"], bus]:
            d = d / p
            d.mkdir(parents=True, exist_ok=True)
            (d / "numa_node").write_text(f"{spec.get('numa', -1)}\n")
        (root / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(d, root / "bus" / "pci" / "devices"), root / "bus" / "pci" / "devices" / bus)
        return d

    for bus, spec in gpus.items():
        d = place(bus, spec)
        (d / "vendor").write_text("0x10de\n")
        (d / "class").write_text("0x030200\n")
    for name, spec in nvme.items():
        pci = place(spec["bus"], spec)
        ctrl_name = name[: name.rindex("n")]  # nvme0n1 -> nvme0
        ctrl = pci / "nvme" / ctrl_name
        ns = ctrl / name
        (ns / "queue").mkdir(parents=True)
        (ns / "queue" / "rotational").write_text(f"{int(spec.get('rotational', 0))}\n")
        (ns / "size").write_text(f"{spec.get('size', 1 << 40) // 512}\n")
        os.symlink(os.path.relpath(pci, ctrl), ctrl / "device")
        for link_dir in (root / "block", root / "class" / "block"):
            link_dir.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(ns, link_dir), link_dir / name)
        (root / "class" / "nvme").mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(ctrl, root / "class" / "nvme"), root / "class" / "nvme" / ctrl_name)
    return root


# ------------------------------------------------------------------------------------------- agent


class AgentProc:
    """A real `kubeflash agent` process with its own config file, state dir and log."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, extra_args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.config = {"nodeName": "test-node", "kube": False, "listen": "127.0.0.1:0", "interval": 0.3,
                       "probe": {"enabled": False}, "retryInterval": 1, **config}
        self.state_dir = Path(self.config.get("stateDir") or self.config["disks"][0]["path"])
        self.config_path = workdir / "agent-config.yaml"
        self.log_path = workdir / "agent.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.api = ""

    def write_config(self, **changes) -> None:
        self.config.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, *, wait: bool = True) -> "AgentProc":
        self.write_config()
        (self.state_dir / "agent.json").unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kubeflash_node.cli", "agent", "-c", str(self.config_path),
                                      *self.extra_args], env=ENV, stdout=log, stderr=log, cwd=REPO)
        if wait:
            self.wait_ready()
        return self

    def run_once(self, timeout: float = 120) -> int:
        """`kubeflash agent --once`: one pass, waiting for staging; returns the exit code."""
        self.write_config()
        with open(self.log_path, "ab") as log:
            return subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "agent", "-c", str(self.config_path),
                                   "--once", *self.extra_args], env=ENV, stdout=log, stderr=log, cwd=REPO,
                                  timeout=timeout).returncode

    def wait_ready(self, timeout: float = 60) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                info = json.loads((self.state_dir / "agent.json").read_text())
            except (OSError, ValueError):
                return False
            if info.get("pid") != self.proc.pid:
                return False
            self.api = f"http://{info['api']}"
            return self.get("/healthz")[0] == 200

        wait_for(up, timeout, what="agent healthy", log=self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    # HTTP
    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw, code, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw, code, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
        return code, json.loads(raw) if "json" in ctype else raw.decode()

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def inventory(self) -> dict:
        return self.get("/v1/inventory")[1]

    def models(self) -> dict[str, dict]:
        return {m["id"]: m for m in self.inventory()["status"].get("models", [])}

    def wait_model(self, mid: str, states=("Ready",), timeout: float = 120) -> dict:
        box = {}

        def check():
            m = self.models().get(mid)
            box["m"] = m
            return m is not None and m["state"] in states

        wait_for(check, timeout, what=f"model {mid} in {states} (last: {box})", log=self.log)
        return box["m"]

    # lifecycle
    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0


def wait_for(pred: Callable[[], Any], timeout: float, *, what: str, log: Callable[[], str] | None = None,
             every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{log() if log else ''}")


def worker_pids(parent: int) -> list[int]:
    """Pids of stage workers of an agent process (children running kubeflash_node.agent.stageworker)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if "kubeflash_node.agent.stageworker" in cmd and (parent == 0 or ppid == parent):
            out.append(int(p.name))
    return out


def staging_leftovers(disk: Path) -> list[str]:
    models = disk / "models"
    return sorted(p.name for p in models.iterdir() if p.name.startswith(".")) if models.is_dir() else []
