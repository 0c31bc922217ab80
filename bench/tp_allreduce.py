"""One all-reduce of a layer's activations over N local processes: gloo vs the SSD ring (issue 22), side by side.

Each rank sums a [tokens, hidden] bfloat16 tensor (the partial output of a row-parallel matrix) with
torch.distributed gloo and with engine/ssdring.py over one directory per rank, and the median of --repeat calls
is printed per size; the ring's result is checked against gloo's. Two ring columns: pipelined in segments of
--segment-bytes (the default, 1 MiB), and one segment per chunk (no pipelining, each step waits for a whole chunk).
On this machine the directories are wherever --dirs puts them (default: one temporary directory per rank on the
same disk), so this measures the ring's file-system and synchronisation cost, not N separate SSDs; the run on
separate drives needs a host with several GPU<->SSD pairs.

With --device cuda (one GPU per rank, cuda:R) the collective column is NCCL on GPU tensors and the ring columns
reduce GPU tensors the way the engine does (tensorparallel.ring_reduce: copied to host memory, summed through the
ring, copied back), each timed call ending with torch.cuda.synchronize(): NCCL vs the SSD ring, per layer.

    .venv/bin/python bench/tp_allreduce.py [--world 2] [--hidden 5120] [--tokens 1 32 2048] [--dirs D0 D1 ...]
    .venv/bin/python bench/tp_allreduce.py --device cuda --world 2 --dirs /ssd0/ring /ssd1/ring
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "node-agent"))
from kubeflash_node.engine.ssdring import RingConfig, SSDRing  # noqa: E402
from kubeflash_node.engine.tensorparallel import init_gloo, ring_reduce  # noqa: E402


def _median(fn, repeat: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeat):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, a, pg: str, out: str) -> None:
    torch.set_num_threads(1)
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{pg}", rank=rank, world_size=a.world,
                                timeout=timedelta(seconds=120))
    else:
        init_gloo(rank, a.world, f"file://{pg}", timeout_s=120)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dirs = tuple(Path(d) for d in a.dirs)
    ring = SSDRing(rank, RingConfig(dirs=dirs, session="bench", timeout_s=120, segment_bytes=a.segment_bytes))
    whole = SSDRing(rank, RingConfig(dirs=dirs, session="bench1", timeout_s=120, segment_bytes=1 << 40))
    by_ring, by_whole = ring_reduce(ring), ring_reduce(whole)  # a GPU tensor goes through host memory
    rows = []
    for tokens in a.tokens:
        x = torch.randn(tokens, a.hidden).to(torch.bfloat16).to(dev)
        g, r = x.clone(), x.clone()
        dist.all_reduce(g)
        by_ring(r)
        torch.testing.assert_close(r, g, atol=0.05, rtol=0.02)
        t_coll = _median(lambda x=x: dist.all_reduce(x.clone()), a.repeat, sync)
        t_ring = _median(lambda x=x: by_ring(x.clone()), a.repeat, sync)
        t_whole = _median(lambda x=x: by_whole(x.clone()), a.repeat, sync)
        rows.append({"tokens": tokens, "bytes": x.numel() * 2, "backend": dist.get_backend(),
                     "collective_ms": t_coll * 1e3, "ring_ms": t_ring * 1e3, "ring_1seg_ms": t_whole * 1e3})
    ring.close()
    whole.close()
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2, help="processes (ranks)")
    ap.add_argument("--hidden", type=int, default=5120, help="hidden size (opt-13b: 5120)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 2048], help="rows of the activation tensor")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per size (median printed)")
    ap.add_argument("--segment-bytes", type=int, default=1 << 20, help="the ring's pipeline segment (default 1 MiB)")
    ap.add_argument("--dirs", nargs="*", help="one ring directory per rank (default: temporary directories)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: gloo vs the ring on host tensors; cuda: NCCL vs the ring on GPU tensors (rank R on cuda:R)")
    a = ap.parse_args()
    if a.device == "cuda" and torch.cuda.device_count() < a.world:
        ap.error(f"--device cuda --world {a.world}: {torch.cuda.device_count()} CUDA GPUs here, one per rank needed")
    with tempfile.TemporaryDirectory(prefix="kf-allreduce-") as tmp:
        if not a.dirs:
            a.dirs = [str(Path(tmp) / f"ssd{r}") for r in range(a.world)]
            for d in a.dirs:
                Path(d).mkdir()
        if len(a.dirs) != a.world:
            ap.error(f"--dirs names {len(a.dirs)} directories for --world {a.world}")
        out = Path(tmp) / "rows.json"
        # fork on CPU (a spawned child re-imports torch); a CUDA child must be spawned
        mp.start_processes(_worker, args=(a, str(Path(tmp) / "pg"), str(out)), nprocs=a.world,
                           start_method="spawn" if a.device == "cuda" else "fork")
        rows = json.loads(out.read_text())
    coll = rows[0]["backend"] if rows else "gloo"
    print(f"world {a.world}, {a.device}, hidden {a.hidden}, bfloat16, median of {a.repeat}, segments of "
          f"{a.segment_bytes} bytes; ring dirs: {' '.join(a.dirs)}")
    print(f"{'tokens':>7} {'bytes':>11} {coll + ' ms':>9} {'ring ms':>9} {'1-seg ms':>9} {'ring/' + coll:>9}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['bytes']:>11} {r['collective_ms']:>9.3f} {r['ring_ms']:>9.3f} "
              f"{r['ring_1seg_ms']:>9.3f} {r['ring_ms'] / r['collective_ms']:>9.2f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
