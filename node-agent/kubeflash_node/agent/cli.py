"""`kubeflash agent`: the node agent, one per GPU/SSD node (the chart's DaemonSet).

It pairs every GPU with its closest store SSD, probes their bandwidths, stages the models FlashNode.spec.models
asks for, prepares each placed job's space, relays the engine's progress into InferenceJob.status and publishes
it all in the node's FlashNode. Flags override the config file (docs/agent.md lists its keys). Without a cluster
(--no-kube) wanted models and jobs come from the config file and the local API. Exit codes: 0 ok, 1 cannot start
(another agent holds the lock), 2 config error (the message names the field), 3 --once ended with a model not
Ready.
"""
# Flags, the config built once, and the process around the Agent (signals, API, exit). Nothing heavy is
# imported at module level; the kubernetes client is imported only in cluster mode.

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

log = logging.getLogger("kubeflash_node.agent")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config file (docs/agent.md)")
    p.add_argument("--node-name", help="this node's name (default: $NODE_NAME, else the host name)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-kube", dest="kube", action="store_false", default=None,
                      help="run without a cluster: wanted models/jobs from the config file and the local API")
    mode.add_argument("--kube", dest="kube", action="store_true", help="run against the cluster (default)")
    p.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster, else $KUBECONFIG / ~/.kube/config)")
    p.add_argument("--listen", help="local API address: 127.0.0.1:PORT, unix:/path or none (default 127.0.0.1:9477)")
    p.add_argument("--interval", type=float, help="seconds between reconcile passes (default 10)")
    p.add_argument("--state-dir", help="where the lock, probe cache and status.json live (default: the first "
                                        "disk's path)")
    p.add_argument("--sysfs-root", help="sysfs mount (default /sys; tests use fake trees)")
    p.add_argument("--no-probe", dest="probe", action="store_false", default=None, help="skip bandwidth probes")
    p.add_argument("--reprobe", action="store_true", default=None, help="ignore cached probe results")
    p.add_argument("--once", action="store_true", default=None,
                   help="one reconcile pass, wait for staging to finish, then exit (3 if a model is not Ready)")
    p.add_argument("--log-format", choices=["json", "text"],
                   help="logs on stderr: one JSON object a line, or text (default: json)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: INFO)")


def build_config(args: argparse.Namespace):
    import os
    from pathlib import Path

    from .config import load

    return load(
        args.config,
        node_name=args.node_name or os.environ.get("NODE_NAME") or None,
        kube=args.kube,
        kubeconfig=args.kubeconfig,
        listen=args.listen,
        interval=args.interval,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        sysfs_root=Path(args.sysfs_root) if args.sysfs_root else None,
        probe=args.probe,
        reprobe=args.reprobe,
        once=args.once,
        log_format=args.log_format,
        log_level=args.log_level,
    )


def _side_factory(cfg, disks):
    if cfg.kube:
        from .kube import KubeSide

        return KubeSide(cfg, disks)
    from .local import LocalSide

    return LocalSide(cfg)


def main(args: argparse.Namespace) -> int:
    from . import logs
    from .agent import Agent, AgentError
    from .api import Server
    from .config import ConfigError

    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"kubeflash agent: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_format, cfg.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(cfg, _side_factory)
    server = None
    try:
        agent.start()
        if cfg.listen != "none":
            server = Server(cfg.listen, agent)
            server.start()
        agent.write_pidfile(server.address if server else "")
        log.info("agent started", extra={"node": cfg.node_name, "mode": "kube" if cfg.kube else "local"})
        return agent.run(stop)
    except (AgentError, ConfigError, OSError) as e:
        log.error("agent cannot start", extra={"error": str(e)})
        return 1
    finally:
        agent.shutdown()
        if server:
            server.stop()
