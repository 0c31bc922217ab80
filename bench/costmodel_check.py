"""Re-predict every recorded GPU `kubeflash bench` run with the current cost model and roofline, per phase.

    .venv/bin/python bench/costmodel_check.py [FILES…] [--markdown] [--brief] [--disk-read-cold GBPS]
                                              [--routing uniform|others|own] [--expert-read-share S]

No GPU needed. Each result JSON (cli_bench.py writes them) holds the run's ceilings, workload, policy
(report.policy) and measured times, prefill and decode apart (report.prefill_latency_s, decode_latency_s). For each
run it prints the prediction of the current code for prefill, decode and the whole run against the measurement,
the resource that bounds each phase, the disk rates (the probe's, and what the run's own reads reached in each
phase: that phase's disk bytes over its time) and the roofline floor the current code computes from them.
Without FILES: docs/bench-results/*.json, every session's s*/ and peers/ours-*.json (the runs with a prediction).

A routed MoE run's expert bytes depend on how its router routes. `--routing uniform` (the default) prices them as the
planner does without a measured profile (uniform routing); `others` with costmodel.RoutingProfile built from the
OTHER recorded routed runs of the same model (every default file, the run itself left out: what an earlier run
measured, out of sample); `own` with the run's own routing (its bytes exact, leaving only the rates to test). A run's
routing points: its expert reads per layer, split into prefill and decode by its decode weight bytes
(routing_points). `--expert-read-share` prices routed expert reads at that share of the cold disk rate instead of
Calibration.expert_read_share (the runs recorded before the batched expert reads read one expert at a time).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from validate_costmodel import print_table, recorded_run

from kubeflash_node.engine.bench import Workload, roofline
from kubeflash_node.engine.costmodel import Budget, Calibration, Candidate, JobShape, RoutingProfile, predict

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "bench-results"


def default_files() -> list[Path]:
    return sorted([*RESULTS.glob("*.json"), *RESULTS.glob("s*/*.json"), *RESULTS.glob("peers/ours-*.json")])


def routing_points(d: dict) -> list[tuple[int, int, float]]:
    """(sequences, tokens of each, distinct experts a layer read) of a recorded routed MoE run: its report's
    routing_profile where the engine recorded one; else, for a run of one block without a hot-expert cache (its reads
    are net of the cache's hits), decode from the decode weight bytes (each step reads embedding, head, every layer's
    non-expert part and its routed experts), prefill from the expert reads left."""
    w, r = d["workload"], d["report"]
    if (rec := RoutingProfile.from_report(d)) is not None:  # recorded by the engine itself since session 12
        return list(rec.points)
    config, policy, _, _, sizes, _ = recorded_run(d, r.get("model") or w["model"])
    if (not config.num_experts or policy.all_experts or policy.expert_cache_bytes or "expert_reads" not in r
            or w["prompts"] > policy.block_size):
        return []
    st, layers, steps = sizes[0], config.num_layers, w["gen_len"] - 1
    experts = st[1] * config.expert_share()
    one, other = experts / config.num_experts, st[1] - experts
    decode = ((r["decode_weight_bytes"] / steps - st[0] - st[-1]) / layers - other) / one if steps else 0.0
    pts = [(w["prompts"], w["prompt_len"], r["expert_reads"] / layers - steps * decode)]
    return pts + ([(w["prompts"], 1, decode)] if steps else [])


def routing_profiles(files: list[Path]) -> dict[str, list[tuple[Path, tuple[int, int, float]]]]:
    """Every file's routing points by model name (dummy:<preset>[@fill])."""
    out: dict[str, list] = {}
    for f in files:
        d = json.loads(f.read_text())
        if "workload" in d and d.get("measured_s"):
            out.setdefault(d["report"].get("model") or d["workload"]["model"], []).extend(
                (f.resolve(), pt) for pt in routing_points(d))
    return out


def check_run(d: dict, disk_read_cold: float = 0.0, routing: RoutingProfile | None = None,
              cal: Calibration = Calibration()) -> dict:
    """Current prediction and floor of one recorded run beside what it measured (optionally another disk ceiling,
    and a measured routing profile for a routed MoE run; the uniform-routing prediction is kept as `error_uniform`)."""
    w, r = d["workload"], d["report"]
    name = r.get("model") or w["model"]  # dummy:<preset>[@fill]
    config, policy, itemsize, quant, sizes, ceil = recorded_run(d, name, disk_read_cold)
    job = JobShape(w["prompts"], w["prompt_len"], w["gen_len"])
    budget = Budget(w.get("gpu_memory_bytes") or 1 << 50, w.get("cpu_memory_bytes") or 1 << 50)
    pr, uniform_pr = (predict(Candidate(policy, quant), config=config, ceil=ceil, job=job, budget=budget, sizes=sizes,
                              itemsize=itemsize, cal=replace(cal, routing=rp)) for rp in (routing, None))
    meas = {"prefill": r.get("prefill_latency_s", 0.0), "decode": r.get("decode_latency_s", 0.0)}
    roof = roofline(stage_bytes=sizes[0], placement=policy.placement(len(sizes[0])),
                    w=Workload(job.prompts, job.prompt_len, job.gen_len, policy.block_size), c=config, ceil=ceil,
                    policy=policy, itemsize=itemsize, phase_s=(meas["prefill"], meas["decode"]), routing=routing)
    out = {"model": name.split(":", 1)[-1], "shape": f"{job.prompts}x({job.prompt_len}+{job.gen_len})",
           "weights": w["weights"], "kv": w.get("kv", "device"), "batch": f"{policy.gpu_batch_size}x{policy.num_gpu_batches}",
           "predicted_s": pr.run_s, "measured_s": d["measured_s"], "error": pr.run_s / d["measured_s"] - 1,
           "error_uniform": uniform_pr.run_s / d["measured_s"] - 1,
           "recorded_s": d.get("predicted_s"), "bound": pr.bound, "probe_gbps": ceil.disk_read_cold,
           "floor_s": roof["floor_s"], "floor_bound": roof["bound"], "efficiency": roof["floor_s"] / d["measured_s"],
           "recorded_floor_s": d["roofline"]["floor_s"], "run_gbps": roof["disk_read_run_gbps"]}
    if config.num_experts and not policy.all_experts and "expert_reads" in r:  # uniform routing against the router
        uniform = config.num_layers * sum(config.expected_experts(n * job.prompt_len)
                                          + (job.gen_len - 1) * config.expected_experts(n)
                                          for n in [min(policy.block_size, job.prompts - k)
                                                    for k in range(0, job.prompts, policy.block_size)])
        out["experts_ratio"] = (r["expert_reads"] + r.get("expert_cache_hits", 0)) / uniform
    for ph, t in meas.items():
        if ph not in pr.phases:
            out |= {f"{ph}_pred": 0.0, f"{ph}_meas": t, f"{ph}_err": None, f"{ph}_bound": "-", f"{ph}_gbps": 0.0}
            continue
        b, margin = pr.phase_bound(ph)
        res = pr.phases[ph][0]
        nbytes = roof[f"disk_bytes_{ph}"]
        out |= {f"{ph}_pred": pr.phase_s(ph), f"{ph}_meas": t, f"{ph}_err": pr.phase_s(ph) / t - 1 if t else None,
                f"{ph}_bound": f"{b} {margin:.2g}x" if margin != float("inf") else b,
                f"{ph}_res": " / ".join(f"{res[k]:.3g}" for k in ("disk", "pcie", "compute")),
                f"{ph}_gbps": nbytes / t / 1e9 if nbytes and t else 0.0}
    return out


COLS = [("run", "run", "{}"), ("model", "model", "{}"), ("shape", "prompts x (len+gen)", "{}"),
        ("weights", "weights", "{}"), ("kv", "kv", "{}"), ("batch", "batch", "{}"),
        ("prefill_pred", "prefill pred s", "{:.3g}"), ("prefill_meas", "prefill meas s", "{:.3g}"),
        ("prefill_err", "prefill err", "{:+.0%}"), ("prefill_bound", "prefill bound (x next)", "{}"),
        ("prefill_res", "prefill disk/pcie/compute s", "{}"),
        ("decode_pred", "decode pred s", "{:.3g}"), ("decode_meas", "decode meas s", "{:.3g}"),
        ("decode_err", "decode err", "{:+.0%}"), ("decode_bound", "decode bound (x next)", "{}"),
        ("decode_res", "decode disk/pcie/compute s", "{}"),
        ("predicted_s", "run pred s", "{:.3g}"), ("measured_s", "run meas s", "{:.3g}"),
        ("error_uniform", "run err, uniform routing", "{:+.1%}"), ("error", "run err", "{:+.1%}"),
        ("recorded_s", "pred at the time s", "{:.3g}"),
        ("probe_gbps", "disk GB/s probe", "{:.2f}"), ("prefill_gbps", "disk GB/s prefill", "{:.2f}"),
        ("decode_gbps", "disk GB/s decode", "{:.2f}"), ("floor_s", "floor s", "{:.3g}"),
        ("efficiency", "floor/meas", "{:.2f}"), ("recorded_floor_s", "floor at the time s", "{:.3g}"),
        ("experts_ratio", "experts routed / uniform", "{:.2f}")]


BRIEF = ("run", "shape", "kv", "prefill_pred", "prefill_meas", "prefill_err", "prefill_bound", "decode_pred",
         "decode_meas", "decode_err", "decode_bound", "error_uniform", "error", "probe_gbps", "prefill_gbps",
         "decode_gbps", "efficiency", "experts_ratio")


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and v == 0.0 and "gbps" in key):
        return "-"
    return fmt.format(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="bench result JSONs (default: every recorded GPU run)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--brief", action="store_true", help="only the per-phase times, bounds, disk rates and floor")
    ap.add_argument("--disk-read-cold", type=float, default=0.0, help="predict with this cold disk ceiling (GB/s)")
    ap.add_argument("--routing", choices=("uniform", "others", "own"), default="uniform",
                    help="routed MoE runs: uniform routing, or the routing measured by the other recorded runs of the "
                         "model, or by the run itself")
    ap.add_argument("--expert-read-share", type=float, default=Calibration.expert_read_share,
                    help="routed expert reads' rate over the cold disk rate (default: Calibration's)")
    args = ap.parse_args(argv)
    files = args.files or default_files()
    profiles = routing_profiles(sorted({*default_files(), *files})) if args.routing != "uniform" else {}
    rows = []
    for f in files:
        d = json.loads(f.read_text())
        if "workload" in d and d.get("measured_s") and d["workload"].get("device", "cuda").startswith("cuda"):
            pts = [pt for src, pt in profiles.get(d["report"].get("model") or d["workload"]["model"], [])
                   if (src == f.resolve()) == (args.routing == "own")]
            rows.append({"run": str(f.resolve().relative_to(RESULTS)) if f.resolve().is_relative_to(RESULTS) else f.name}
                        | check_run(d, args.disk_read_cold, RoutingProfile(tuple(pts)) if pts else None,
                                    Calibration(expert_read_share=args.expert_read_share)))
    cols = [c for c in COLS if c[0] in BRIEF] if args.brief else COLS
    if args.routing == "uniform":
        cols = [c for c in cols if c[0] != "error_uniform"]
    print_table(cols, [[_cell(row, k, fmt) for k, _, fmt in cols] for row in rows], args.markdown)
    errs = [abs(r["error"]) for r in rows]
    if errs:
        within = sum(e <= 0.10 for e in errs)
        above = [r["run"] for r in rows if r["efficiency"] > 1.0 + 1e-9]
        print(f"\n{len(rows)} runs: {within} within 10%, mean |error| {sum(errs) / len(errs):.1%}, max "
              f"{max(errs):.1%}; floors above the measured time: {', '.join(above) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
