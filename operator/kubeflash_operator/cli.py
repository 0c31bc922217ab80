"""`kubeflash operator`: run the kopf operator in-process (standalone by default; kopf imported lazily)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from kubeflash_operator.config import OperatorConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="serve InferenceJobs in this namespace (repeatable; globs allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (default)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 turns it off")
    parser.add_argument("--liveness-port", type=int, default=8080, help="/healthz port; 0 turns it off")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument("--engine-image", help="image of the inference pods (default: $KUBEFLASH_OPERATOR_ENGINE_IMAGE "
                                               "or the release image)")
    parser.add_argument("--engine-device",
                        help="KUBEFLASH_DEVICE of the inference pods: auto, cpu or cuda (default: "
                             "$KUBEFLASH_OPERATOR_ENGINE_DEVICE or auto; kind uses cpu)")
    parser.add_argument("--peering", action="store_true",
                        help="coordinate with other operator replicas through kopf peering (needs its CRDs)")
    parser.add_argument("--leader-elect", action="store_true",
                        help="with several replicas: act only while holding the Lease kubeflash-operator "
                             "(coordination.k8s.io) in --leader-elect-namespace; the others wait")
    parser.add_argument("--leader-elect-namespace", default=os.environ.get("POD_NAMESPACE") or "default",
                        help="namespace of the Lease (default: $POD_NAMESPACE, else default)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    cfg = replace(OperatorConfig.from_env(), metrics_port=args.metrics_port, liveness_port=args.liveness_port)
    if args.engine_image:
        cfg = replace(cfg, engine_image=args.engine_image)
    if args.engine_device:
        cfg = replace(cfg, engine_device=args.engine_device)
    return cfg


def main(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # read by kopf's login and by the kubernetes client
    cfg = config_from_args(args)

    import kopf

    import kubeflash_operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose)
    elector = _elect(args) if args.leader_elect else None
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


def _elect(args: argparse.Namespace):
    """Wait for the Lease, then keep renewing it (kopf stops when a renewal fails for too long)."""
    import socket

    from kubeflash_operator.kube import Kube
    from kubeflash_operator.lease import Elector

    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    elector = Elector(Kube.connect().api, namespace=args.leader_elect_namespace, identity=identity)
    elector.wait_until_leader()
    elector.keep_renewing()
    return elector
