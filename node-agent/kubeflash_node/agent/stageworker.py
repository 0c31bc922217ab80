"""`python -m kubeflash_node.agent.stageworker REQUEST_JSON`: stages one model into a staging directory.

A child of the agent (it dies with it), so a model being staged can be cancelled by killing it and torch is
never loaded into the agent. It downloads (http), unpacks (.tar archives, with tarfile's "data" filter),
converts into `<staging>/<model-id>` via store.convert, makes the tree readable by the engine's
unprivileged user and verifies every sha256 (stamping the verdict, store.format.verify_model). The agent
renames the result into models/ and removes the staging dir.

Protocol: one JSON event per line on stdout. Before each large write the worker sends
{"event": "need", "bytes": N, "phase": ...} and waits for "go" on stdin (the agent makes room, evicting if
it must) or anything else (stop). Then {"event": "progress", "percent", "phase"}…, and finally
{"event": "done", "bytes"} or {"event": "error", "kind": nospace|fetch|source|verify|internal, "message"}.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tarfile
from pathlib import Path

from .fsutil import is_no_space, tree_bytes

EXIT_ERROR, EXIT_STOPPED = 1, 2
TOKENIZER_GUESS = 32 << 20  # GGUF sources: tokenizer.json written by transformers


class Stopped(Exception):
    """The agent answered a `need` with something other than go."""


class FetchError(Exception):
    pass


class Worker:
    def __init__(self, req: dict, proto, stdin):
        self.req, self.proto, self.stdin = req, proto, stdin
        self.staging = Path(req["staging"])
        self.http = req["kind"] == "http"
        self.phase = "start"

    def emit(self, event: str, **fields) -> None:
        self.proto.write(json.dumps({"event": event, **fields}) + "\n")
        self.proto.flush()

    def need(self, nbytes: int, phase: str) -> None:
        self.emit("need", bytes=int(nbytes), phase=phase)
        answer = self.stdin.readline().strip()
        if answer != "go":
            raise Stopped(answer or "agent went away")

    def progress(self, lo: float, hi: float, frac: float) -> None:
        self.emit("progress", percent=round(lo + (hi - lo) * min(max(frac, 0.0), 1.0), 2), phase=self.phase)

    # ----------------------------------------------------------------------------------------- steps

    def run(self) -> int:
        src = self.fetch() if self.http else self.req["ref"]
        base = 45.0 if self.http else 0.0
        out = self.convert(src, base)
        if self.req.get("sparsity"):
            self.calibrate(out)
        self.phase = "verify"
        self.progress(0, 100, 0.95 if self.http else 0.9)
        from kubeflash_node.store.format import verify_model

        make_readable(out)
        verify_model(out)  # every sha256; its stamp spares the engine a second full read on first load
        self.emit("done", bytes=tree_bytes(out))
        return 0

    def fetch(self) -> str:
        self.phase = "download"
        dl = self.staging / "download"
        dl.mkdir()
        dest = dl / self.req["fetchName"]
        self.download(self.req["ref"], dest)  # the #sha256 pin, when given, is checked there
        if dest.name.startswith("source.tar"):
            self.phase = "extract"
            return str(self.extract(dest, self.staging / "src"))
        return str(dest)

    def download(self, url: str, dest: Path) -> str:
        """Through store.fetch: allowlisted hosts, checked addresses on every hop, the size cap, the #sha256 pin."""
        from kubeflash_node.store.fetch import FetchPolicy, download

        pol = self.req.get("http") or {}
        policy = FetchPolicy(allow_hosts=tuple(pol.get("allowHosts") or ()),
                             private_hosts=tuple(pol.get("privateHosts") or ()),
                             max_bytes=int(pol.get("maxBytes") or 0) or FetchPolicy.max_bytes)
        with open(dest, "wb") as f:
            digest = download(url, f, policy, sha256=self.req.get("sha256") or "",
                              on_length=lambda n: self.need(n, "download"),
                              progress=lambda done, total: total and self.progress(0, 40, done / total))
            f.flush()
            os.fsync(f.fileno())
        return digest

    def extract(self, archive: Path, dest: Path) -> Path:
        with tarfile.open(archive) as t:
            members = t.getmembers()
            self.need(sum(m.size for m in members if m.isfile()), "extract")
            dest.mkdir()
            t.extractall(dest, filter="data")
        archive.unlink()
        found = sorted(dest.rglob("config.json"), key=lambda p: len(p.parts))
        if not found:
            raise FetchError("the archive holds no config.json (expected a Hugging Face model directory)")
        return found[0].parent

    def convert(self, src: str, base: float) -> Path:
        from kubeflash_node.store.convert import HFSource, open_source
        from kubeflash_node.store.convert import convert as convert_model

        from .space import estimate_store_bytes

        self.phase = "convert"
        dtype = self.req["dtype"]
        source = open_source(src)
        extra = 0
        if isinstance(source, HFSource):
            files = [source.path / n for n in HFSource.TOKENIZER_FILES]
            extra = sum(f.stat().st_size for f in files if f.is_file())
        elif src.endswith(".gguf") or src.startswith("builtin:"):
            extra = TOKENIZER_GUESS
        self.need(estimate_store_bytes(source.config, dtype, extra=extra), "convert")
        del source
        out = self.staging / self.req["id"]
        top = 95.0 if self.http else 90.0
        convert_model(src, out, dtype=dtype, quantization=self.req.get("quantization", "none"),
                      progress=lambda n, total, stage: self.progress(base, top, n / total))
        return out


    def calibrate(self, out: Path) -> None:
        """Calibrate the staged model for the entry's target sparsities (thresholds, neuron bundles, predictors) on
        the built-in text, inside the staging directory: it is renamed into models/ only whole. In a process of
        its own (`python -m kubeflash_node.engine.autocalib`): the agent's side never imports the engine."""
        import subprocess

        from kubeflash_node.store.format import load_manifest

        m = load_manifest(out)
        if not m.tokenizer:  # a dummy: model cannot read text; its sparse jobs are refused naming the calibration
            return
        self.phase = "calibrate"
        self.progress(0, 100, 0.9)
        bundles = sum(e.nbytes for f in m.files.values() for n, e in f.tensors.items()
                      if n in ("w_up", "w_down", "fc2_w"))
        self.need(bundles, "calibrate")  # the neuron bundles: the up/down matrices again
        targets = ",".join(f"{float(t):g}" for t in self.req["sparsity"])
        done = subprocess.run([sys.executable, "-m", "kubeflash_node.engine.autocalib", str(out), "--sparsity",
                               targets], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise RuntimeError(f"calibrating for sparsity {targets} failed: {tail}")


def make_readable(root: Path) -> None:
    """convert() creates 0700/0600 temporaries; the engine runs unprivileged and only needs to read."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def classify(e: BaseException, phase: str) -> tuple[str, str]:
    """(kind, message) for an error, worded for FlashNode.status.models[].message."""
    from kubeflash_node.store.format import StoreError

    if is_no_space(e):
        return "nospace", f"no space left on the disk during {phase}"
    from kubeflash_node.store.fetch import FetchRefused

    if isinstance(e, FetchRefused):
        return "fetch", f"download refused: {e}"
    if isinstance(e, (http.client.HTTPException, ConnectionError, TimeoutError, OSError)) and phase == "download":
        return "fetch", f"download failed: {type(e).__name__}: {getattr(e, 'strerror', None) or e}"
    if isinstance(e, FetchError):
        return "fetch", str(e)
    if isinstance(e, tarfile.TarError):
        return "source", f"unsafe or corrupt archive: {e}"
    if isinstance(e, StoreError):
        return ("verify" if phase == "verify" else "source"), str(e)
    return "internal", f"{type(e).__name__}: {e}"


def main(argv: list[str]) -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries that print go to stderr, never into the protocol
    worker = Worker(json.loads(argv[1]), proto, sys.stdin)
    try:
        return worker.run()
    except Stopped:
        return EXIT_STOPPED
    except Exception as e:  # every failure becomes one error event the agent shows in status
        kind, message = classify(e, worker.phase)
        worker.emit("error", kind=kind, message=message, phase=worker.phase)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv))
