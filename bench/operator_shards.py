"""The operator with one spec.parallelism job: N shards on M KWOK nodes (control plane, KWOK nodes, FlashNodes and
`kubeflash operator` as its own process, as bench/operator_scale.py brings them up). Writes one JSON report:

  shards_created_s      parent created -> every shard job exists (a list every second shows it)
  all_placed_s          parent created -> every shard has status.node
  all_running_s         parent created -> every shard in phase Running
  parent_running_s      parent created -> the parent's status counts every shard running
  operator_cpu_s        the operator's CPU seconds from the parent's create to all shards Running
  operator_rss_mib, operator_idle_cpu_pct (10 s with every shard Running)
  parent_status_bytes   the parent's status as JSON, bytes (once every shard runs)
  parent_ticks, parent_tick_p50_s, parent_tick_max_s
                        the parent's reconciles (shards.sync: list, create the missing, write the sum), from the
                        operator's debug log ("shard parent ...: tick X s")
  double_booked, tracebacks

  .venv/bin/python bench/operator_shards.py --shards 1000 --nodes 100 [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from operator_scale import (  # noqa: E402
    GROUP,
    NS,
    VERSION,
    JobWatch,
    OperatorProcess,
    apply_crds,
    default_bin_dir,
    double_booked,
    emit,
    job_body,
    make_nodes,
    pct,
    start_cluster,
    wait,
)

from kubeflash_api import parse_job_spec  # noqa: E402

PARENT = "big"
TICK = re.compile(r"shard parent [^ ]+/" + PARENT + r": tick ([0-9.]+) s")


def run(shards: int, nodes: int, *, bin_dir: Path | None = None, timeout: float = 900) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="kubeflash-opshards-"))
    pairs = math.ceil(shards / nodes)
    model = parse_job_spec(job_body("x")["spec"], name="x", namespace=NS).model.id
    cp, op_kubeconfig, _audit = start_cluster(Path(bin_dir or default_bin_dir()), work)
    op = None
    try:
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        apply_crds(cp)
        make_nodes(api, cp, nodes, pairs, model)
        op = OperatorProcess(op_kubeconfig, work / "operator.log", "--verbose")
        op.wait_ready()
        jw = JobWatch(api)
        custom = client.CustomObjectsApi(api)
        body = job_body(PARENT)
        body["spec"]["parallelism"] = shards
        body["spec"]["input"]["prompts"] = [f"question {i}" for i in range(shards)]
        t0, cpu0 = time.monotonic(), op.cpu_s()
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs", body)
        names = [f"{PARENT}-s{k}" for k in range(shards)]
        def count() -> int:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs",
                                                         label_selector=f"kubeflash.io/parent={PARENT}")["items"]
            return len(items)

        t_created = wait(f"all {shards} shard jobs exist", lambda: count() >= shards, timeout, every=1.0)
        wait(f"all {shards} shards placed", lambda: all(n in jw.placed for n in names), timeout)
        wait(f"all {shards} shards Running", lambda: all(n in jw.running for n in names), timeout)
        cpu = op.cpu_s() - cpu0

        def parent() -> dict[str, Any]:
            return custom.get_namespaced_custom_object(GROUP, VERSION, NS, "inferencejobs", PARENT).get("status") or {}

        t_parent = wait("the parent counts every shard running",
                        lambda: (parent().get("shards") or {}).get("running") == shards, timeout, every=1.0)
        status = parent()
        time.sleep(2)
        c0 = op.cpu_s()
        time.sleep(10)
        idle = (op.cpu_s() - c0) / 10 * 100
        jw.stop()
        text = op.text()
        ticks = [float(x) for x in TICK.findall(text)]
        return {
            "shards": shards, "nodes": nodes, "pairs_per_node": pairs,
            "shards_created_s": round(t_created - t0, 2),
            "all_placed_s": round(max(jw.placed[n] for n in names) - t0, 2),  # as the watch saw them
            "all_running_s": round(max(jw.running[n] for n in names) - t0, 2),
            "parent_running_s": round(t_parent - t0, 2),
            "operator_cpu_s": round(cpu, 2),
            "operator_rss_mib": round(op.rss_mib(), 1),
            "operator_idle_cpu_pct": round(idle, 2),
            "parent_status_bytes": len(json.dumps(status).encode()),
            "parent_status": {k: status.get(k) for k in ("phase", "reason", "shards")},
            "parent_ticks": len(ticks),
            "parent_tick_p50_s": round(statistics.median(ticks), 3) if ticks else None,
            "parent_tick_p99_s": round(pct(ticks, 0.99), 3) if ticks else None,
            "parent_tick_max_s": round(max(ticks), 3) if ticks else None,
            "double_booked": len(double_booked(api)),
            "tracebacks": text.count("Traceback"),
            "operator_log": str(op.log),
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    finally:
        if op:
            op.stop()
        cp.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=1000, help="spec.parallelism of the one job (default 1000)")
    p.add_argument("--nodes", type=int, default=100, help="KWOK nodes with FlashNodes (default 100)")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    p.add_argument("--bin-dir", type=Path, help="control plane binaries (default: kind/build-control-plane.sh's)")
    args = p.parse_args(argv)
    print(f"one parallelism-{args.shards} job on {args.nodes} KWOK nodes: starting (minutes)", file=sys.stderr)
    report = run(args.shards, args.nodes, bin_dir=args.bin_dir)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
