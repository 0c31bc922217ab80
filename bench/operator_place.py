"""The operator's placement function alone: CPU seconds to place N jobs one after the other on M nodes.

Each node has 10 GPU<->SSD pairs with the model Ready on every disk (as in bench/operator_scale.py); every job's
claim is added before the next one is placed, so the last job sees N-1 claims, as in a burst. No cluster, no
kopf: what `scheduler.place` itself costs at (500, 50), (2,000, 200) and (5,000, 500). A scheduler with
`Claims` is called as the operator calls it: the claims indexed by node, each new one laid on top as a held
claim, and one memo of every node's best pair kept across the placements (--no-memo: without that memo).

  .venv/bin/python bench/operator_place.py [--points 500:50,2000:200,5000:500]
  git show fe36f07:operator/kubeflash_operator/scheduler.py > /tmp/old_scheduler.py
  .venv/bin/python bench/operator_place.py --scheduler /tmp/old_scheduler.py --points 500:50,2000:200
  git show 485a017:operator/kubeflash_operator/scheduler.py > /tmp/scheduler_485a017.py   # before the memo
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = 10


def load(path: Path):
    """The scheduler module at `path` (default: this checkout's)."""
    sys.path[:0] = [str(REPO / "operator"), str(REPO / "node-agent")]
    spec = importlib.util.spec_from_file_location("bench_scheduler", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scheduler"] = mod
    spec.loader.exec_module(mod)
    return mod


def run(sched, jobs: int, nodes: int, *, memo: bool = True) -> float:
    now = datetime.now(UTC)
    views = [sched.NodeView(
        name=f"gpu-{i:04d}", heartbeat=now,
        disks={f"nvme{d}": sched.Disk(f"nvme{d}", f"/mnt/nvme{d}", 500 * 2**30, 7.0) for d in range(PAIRS)},
        pairs=tuple((d, f"nvme{d}") for d in range(PAIRS)),
        models=tuple(sched.ModelCopy("m", f"nvme{d}", "Ready", 2**30) for d in range(PAIRS))) for i in range(nodes)]
    indexed = hasattr(sched, "Claims")  # this checkout's scheduler (an older one takes a plain list)
    claims = sched.Claims() if indexed else []
    kwargs = {"memo": {}} if indexed and memo else {}
    t0 = time.process_time()
    for j in range(jobs):
        found = sched.place(sched.Request(f"ns/j{j}", "m"), views, claims, now=now, **kwargs)
        if isinstance(found, sched.NoFit):
            raise SystemExit(f"job {j} did not fit: {found.reason}")
        claim = found.claim(f"ns/j{j}", 0)
        if indexed:
            claims = claims.with_held({claim.job: claim})
        else:
            claims.append(claim)
    return time.process_time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="500:50,2000:200,5000:500", help="jobs:nodes,... (default: %(default)s)")
    p.add_argument("--scheduler", type=Path, default=REPO / "operator" / "kubeflash_operator" / "scheduler.py",
                   help="scheduler.py to time (default: this checkout's)")
    p.add_argument("--no-memo", action="store_true", help="no memo of each node's best pair across placements")
    args = p.parse_args()
    sched = load(args.scheduler)
    for point in args.points.split(","):
        jobs, nodes = (int(x) for x in point.split(":"))
        print(f"{jobs} jobs on {nodes} nodes: {run(sched, jobs, nodes, memo=not args.no_memo):.2f} s CPU", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
