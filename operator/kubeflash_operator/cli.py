"""`kubeflash operator`: the kopf operator that places InferenceJobs on GPU<->SSD pairs and runs their pods.

Standalone by default (one replica); --leader-elect lets several replicas run, only the holder of the Lease acting.
In a pod it uses its service account, elsewhere --kubeconfig, $KUBECONFIG or ~/.kube/config. Tuning knobs are
environment variables KUBEFLASH_OPERATOR_<FIELD> (ENGINE_IMAGE, ENGINE_DEVICE, HEARTBEAT_TIMEOUT_S,
BACKOFF_BASE_S, BACKOFF_CAP_S, UNSCHEDULABLE_TIMEOUT_S, IMAGE_PULL_TIMEOUT_S, CONTAINER_START_TIMEOUT_S, ...;
docs/operator.md).
"""
# kopf and the kubernetes client are imported only in main(), so --help and a bad flag need neither.

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from kubeflash_operator.builder import DEFAULT_IMAGE
from kubeflash_operator.config import OperatorConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="serve InferenceJobs in this namespace (repeatable; globs allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (default)")
    parser.add_argument("--metrics-port", type=_port, default=9090,
                        help="Prometheus /metrics port; 0 turns it off (default: %(default)s)")
    parser.add_argument("--liveness-port", type=_port, default=8080,
                        help="/healthz port; 0 turns it off (default: %(default)s)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else $KUBECONFIG or "
                                             "~/.kube/config)")
    parser.add_argument("--engine-image", help="image of the inference pods (default: $KUBEFLASH_OPERATOR_ENGINE_IMAGE "
                                               f"or {DEFAULT_IMAGE})")
    parser.add_argument("--engine-device",
                        help="KUBEFLASH_DEVICE of the inference pods: auto, cpu, cuda or cuda:N (default: "
                             "$KUBEFLASH_OPERATOR_ENGINE_DEVICE or auto; kind uses cpu)")
    parser.add_argument("--peering", action="store_true",
                        help="coordinate with other operator replicas through kopf peering (needs its CRDs)")
    parser.add_argument("--leader-elect", action="store_true",
                        help="with several replicas: act only while holding the Lease kubeflash-operator "
                             "(coordination.k8s.io) in --leader-elect-namespace; the others wait")
    parser.add_argument("--leader-elect-namespace", default=os.environ.get("POD_NAMESPACE") or "default",
                        help="namespace of the Lease (default: $POD_NAMESPACE, else default)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _port(text: str) -> int:
    """A TCP port, 0..65535 (0: off)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535 (0: off), got {text!r}")
    return n


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    cfg = replace(OperatorConfig.from_env(), metrics_port=args.metrics_port, liveness_port=args.liveness_port)
    if args.engine_image:
        cfg = replace(cfg, engine_image=args.engine_image)
    if args.engine_device:
        try:
            cfg = replace(cfg, engine_device=args.engine_device)
        except ValueError as e:
            raise ValueError(f"--engine-device: {e}") from None
    return cfg


def main(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # read by kopf's login and by the kubernetes client
    try:
        cfg = config_from_args(args)
    except ValueError as e:  # a bad --engine-device or KUBEFLASH_OPERATOR_* value, named by the config
        print(f"kubeflash operator: error: {e}", file=sys.stderr)
        return 2

    import kopf

    import kubeflash_operator.handlers  # noqa: F401  (registers the handlers)
    from kubeflash_operator import heap

    heap.limit_arenas()  # before kopf and the API calls start their threads
    heap.tune_gc()  # every module imported: they leave the collector's scans

    kopf.configure(verbose=args.verbose)
    elector = _elect(args, cfg) if args.leader_elect else None
    liveness = f"http://0.0.0.0:{cfg.liveness_port}/healthz" if cfg.liveness_port else None
    try:
        kopf.run(
            standalone=not args.peering,
            clusterwide=not args.namespaces,
            namespaces=args.namespaces or (),
            liveness_endpoint=liveness,
            memo=kopf.Memo(config=cfg),
            stop_flag=elector.lost if elector else None,
        )
    finally:
        if elector is not None and not elector.lost.is_set():
            elector.release()
    return 1 if elector is not None and elector.lost.is_set() else 0


def _elect(args: argparse.Namespace, cfg: OperatorConfig):
    """Wait for the Lease, then keep renewing it (kopf stops when a renewal fails for too long)."""
    import socket

    from kubeflash_operator.kube import Kube
    from kubeflash_operator.lease import Elector

    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    elector = Elector(Kube.connect(timeout_s=cfg.api_timeout_s).api, namespace=args.leader_elect_namespace, identity=identity)
    elector.wait_until_leader()
    elector.keep_renewing()
    return elector
