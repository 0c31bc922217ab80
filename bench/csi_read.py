"""Read speed of a model through the CSI model volume (kubeflash.io's read-only bind mount) vs the store directly.

Starts a real `kubeflash csi` on a temp socket, publishes the model as the kubelet would (NodePublishVolume with
kubeflash.io/model-id), then reads every stage file of the model both ways, cold (page cache dropped before
each read) and alternating which path goes first, and prints GB/s per round and the ratio csi/direct
(goal >= 0.98: a bind mount adds no copy). Needs root (it mounts).

  sudo .venv/bin/python bench/csi_read.py                      # a synthetic 1 GiB model in a temp store
  sudo .venv/bin/python bench/csi_read.py --store /var/lib/kubeflash --model-id <id> --rounds 5
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from kubeflash_node.csi.pb import csi_pb2 as pb
from kubeflash_node.csi.pb import csi_pb2_grpc as pb_grpc
from kubeflash_node.engine.bench import drop_page_cache
from kubeflash_node.store.format import Manifest, ModelWriter, load_manifest

CHUNK = 16 << 20


def synthetic_model(store: Path, size: int, model_id: str) -> Path:
    """A real store model of `size` bytes: 16 stage files of random float16 tensors, checksummed."""
    w = ModelWriter(store / "models" / model_id)
    rng = np.random.default_rng(0)
    files, stages = {}, []
    per = size // 16 // 2
    for i in range(16):
        name = f"layer_{i:03d}"
        files[name] = w.add_stage(name, [("w", rng.standard_normal(per, dtype=np.float32).astype(np.float16), "float16")])
        stages.append(name)
    return w.publish(Manifest(architecture="llama", config={"num_layers": 16}, dtype="float16", files=files,
                              stages=stages))


def read_all(folder: Path, names: list[str], *, direct: bool) -> tuple[int, float]:
    """Read every file in `names` sequentially (O_DIRECT into an aligned buffer, like the engine); (bytes, s)."""
    buf = mmap.mmap(-1, CHUNK)
    total, t0 = 0, time.perf_counter()
    for name in names:
        fd = os.open(folder / name, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return total, time.perf_counter() - t0


def serve(store: Path, root: Path) -> tuple[subprocess.Popen, Path]:
    sock = root / "csi.sock"
    proc = subprocess.Popen([sys.executable, "-m", "kubeflash_node.cli", "csi", f"--endpoint={sock}",
                             f"--disk=d0={store}", f"--pods-dir={root / 'pods'}", "--registration-dir=",
                             "--log-level=WARNING"])
    for _ in range(300):
        if sock.exists():
            return proc, sock
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("kubeflash csi did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, help="a store disk holding models/<id> (default: a temp store)")
    ap.add_argument("--model-id", default="bench-0000000000000000", help="the model to read")
    ap.add_argument("--size", default=1 << 30, type=int, help="bytes of the synthetic model (default 1 GiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--buffered", action="store_true", help="buffered reads instead of O_DIRECT")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kf-csi-bench-"))
    (root / "pods").mkdir()
    store = args.store or root / "store"
    if args.store is None:
        synthetic_model(store, args.size, args.model_id)
    direct_dir = store / "models" / args.model_id
    names = load_manifest(direct_dir).stages
    proc, sock = serve(store, root)
    node = pb_grpc.NodeStub(grpc.insecure_channel(f"unix://{sock}"))
    target = root / "pods" / "uid" / "volumes" / "kubernetes.io~csi" / "model" / "mount"
    target.parent.mkdir(parents=True)
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY))
    node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id="bench", target_path=str(target), readonly=True,
                                                       volume_capability=cap,
                                                       volume_context={"kubeflash.io/model-id": args.model_id}))
    rates: dict[str, list[float]] = {"direct": [], "csi": []}
    how = ""
    try:
        for r in range(args.rounds):
            order = [("direct", direct_dir), ("csi", target)]
            for label, folder in order if r % 2 == 0 else reversed(order):
                how = drop_page_cache([direct_dir / n for n in names])
                nbytes, secs = read_all(folder, names, direct=not args.buffered)
                rates[label].append(nbytes / secs / 1e9)
            print(f"round {r + 1}: direct {rates['direct'][-1]:.2f} GB/s  csi {rates['csi'][-1]:.2f} GB/s")
    finally:
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="bench", target_path=str(target)))
        proc.terminate()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)  # the temp store (and nothing of --store)
    d, c = statistics.median(rates["direct"]), statistics.median(rates["csi"])
    print(f"model {args.model_id}: {nbytes / 1e9:.2f} GB in {len(names)} files, {args.rounds} rounds, "
          f"{'buffered' if args.buffered else 'O_DIRECT'} reads, cache dropped with {how}")
    print(f"median direct {d:.2f} GB/s, through the CSI bind mount {c:.2f} GB/s, ratio csi/direct {c / d:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
