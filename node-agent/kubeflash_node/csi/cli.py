"""`kubeflash csi`: the CSI node plugin, serving Identity and Node on a unix socket and registering itself
with the kubelet. Runs as root (it mounts) in a privileged container of the agent DaemonSet."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from concurrent import futures
from pathlib import Path

DEFAULT_SOCKET = "/var/lib/kubelet/plugins/kubeflash.io/csi.sock"
DEFAULT_REGISTRY = "/var/lib/kubelet/plugins_registry"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("CSI node plugin of driver kubeflash.io: serves Identity and Node on a unix socket and "
                     "registers itself with the kubelet (a privileged container of the agent DaemonSet). "
                     "Volumes are CSI inline (ephemeral) volumes with "
                     "attribute kubeflash.io/model-id (read-only bind of a staged model), kubeflash.io/kv-size "
                     "(a sized, loop-mounted ext4 KV space), kubeflash.io/job (the job's directory) or "
                     "kubeflash.io/kv-cache (the node's prefix KV cache of a model, in the pod's namespace). "
                     "Needs root.")
    p.add_argument("--endpoint", default=DEFAULT_SOCKET, metavar="SOCKET",
                   help="unix socket to serve CSI on: a path or unix:///path (default: %(default)s)")
    p.add_argument("--node-id", default=os.environ.get("NODE_NAME") or socket.gethostname().split(".")[0].lower(),
                   help="node name reported by NodeGetInfo and in the topology.kubeflash.io/node segment "
                        "(default: $NODE_NAME, else the host name)")
    p.add_argument("--disk", action="append", default=[], metavar="NAME=PATH",
                   help="a store disk (the agent's disks[]: name and store directory); repeat for several "
                        "(default: disk0=/var/lib/kubeflash)")
    p.add_argument("--pods-dir", default="/var/lib/kubelet/pods", type=Path,
                   help="the kubelet's pods directory: every target_path must lie under it (default: %(default)s)")
    p.add_argument("--registration-dir", default=DEFAULT_REGISTRY, metavar="DIR",
                   help="where the kubelet watches for plugin sockets; '' serves CSI only, without registering "
                        "(default: %(default)s)")
    p.add_argument("--kubelet-endpoint", default="", metavar="PATH",
                   help="the CSI socket's path as the kubelet sees it, when it differs from --endpoint")
    p.add_argument("--kv-owner", default="1000:1000", metavar="UID:GID",
                   help="owner of a new KV volume's root directory, the engine's user (default: %(default)s)")
    p.add_argument("--kv-reserve", default="0", metavar="SIZE",
                   help="space on each disk that KV volumes never take, e.g. 10Gi (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="(default: %(default)s)")


def _socket_path(endpoint: str) -> str:
    path = endpoint[len("unix://"):] if endpoint.startswith("unix://") else endpoint
    if not os.path.isabs(path):
        raise SystemExit(f"kubeflash csi: --endpoint must be an absolute unix socket path, got {endpoint!r}")
    return path


def _config(args):
    from kubeflash_api.errors import SpecError
    from kubeflash_api.quantity import parse_quantity

    from .volumes import DriverConfig

    disks = []
    for item in args.disk or ["disk0=/var/lib/kubeflash"]:
        name, sep, path = item.partition("=")
        if not sep or not name or not os.path.isabs(path):
            raise SystemExit(f"kubeflash csi: --disk must be NAME=/absolute/path, got {item!r}")
        disks.append((name, Path(path)))
    try:
        uid, gid = (int(x) for x in args.kv_owner.split(":"))
    except ValueError:
        raise SystemExit(f"kubeflash csi: --kv-owner must be UID:GID, got {args.kv_owner!r}") from None
    try:
        reserve = parse_quantity(args.kv_reserve or "0", path="--kv-reserve")
    except SpecError as e:
        raise SystemExit(f"kubeflash csi: {e}") from None
    return DriverConfig(node_id=args.node_id, disks=tuple(disks), pods_dir=args.pods_dir, kv_owner=(uid, gid),
                        kv_reserve=reserve)


def _listen(server, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a socket left by a previous run
    server.add_insecure_port(f"unix://{path}")


def main(args) -> int:
    import grpc

    from .pb import csi_pb2_grpc, registration_pb2_grpc
    from .registration import Registration
    from .service import DRIVER, Identity, Node
    from .volumes import Volumes

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log = logging.getLogger("kubeflash.csi")
    cfg = _config(args)
    path = _socket_path(args.endpoint)
    volumes = Volumes(cfg)
    for note in volumes.recover():
        log.info("recovered: %s", note)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    csi_pb2_grpc.add_IdentityServicer_to_server(Identity(volumes), server)
    csi_pb2_grpc.add_NodeServicer_to_server(Node(volumes), server)
    _listen(server, path)
    server.start()
    log.info("serving CSI driver %s on %s for node %s (disks: %s)", DRIVER, path, cfg.node_id,
             ", ".join(f"{n}={p}" for n, p in cfg.disks))
    reg_server, reg_path = None, ""
    if args.registration_dir:
        reg_path = os.path.join(args.registration_dir, f"{DRIVER}-reg.sock")
        reg_server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        registration_pb2_grpc.add_RegistrationServicer_to_server(
            Registration(DRIVER, args.kubelet_endpoint or path), reg_server)
        _listen(reg_server, reg_path)
        reg_server.start()
        log.info("registration socket %s", reg_path)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    for s, p in ((reg_server, reg_path), (server, path)):
        if s is not None:
            s.stop(grace=5).wait()
            if p and os.path.exists(p):
                os.unlink(p)
    return 0
