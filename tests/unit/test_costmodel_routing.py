"""A MoE model's measured routing (costmodel.RoutingProfile) prices a routed layer read by the distinct experts reads
of that shape routed to, where uniform routing counts every token as an independent pick: on the H200 the random-
weight Qwen3-30B-A3B routed 4 x 8 prompt tokens to 49.7 experts a layer (uniform: 111.8), so the uniform model
predicted 2.1x the prefill bytes the run read (session 12, +53% on the whole run). Also: engine processes start
with PyTorch's expandable-segments allocator unless the user chose a configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubeflash_node import cli
from kubeflash_node.engine.ceilings import Ceilings
from kubeflash_node.engine.costmodel import (
    Budget,
    Calibration,
    Candidate,
    JobShape,
    RoutingProfile,
    predict,
    routed_layer_bytes,
    stage_sizes,
)
from kubeflash_node.engine.policy import Policy
from kubeflash_node.store.modelconfig import preset

ROOT = Path(__file__).resolve().parents[2]
Q3 = preset("qwen3-30b-a3b")
# session 9's routed runs (docs/bench-results/s9, routing_points of bench/costmodel_check.py), rounded
S9 = RoutingProfile(((1, 8, 18.0), (1, 1, 8.0), (4, 8, 49.7), (4, 1, 23.6), (16, 8, 84.8), (16, 1, 53.6),
                     (64, 8, 115.1), (64, 1, 94.8)))


CEIL = Ceilings(disk_read_cold=1.5, disk_read_warm=14.0, disk_write=2.0, h2d_pinned=55.0, matmul_tflops=760.0)


@pytest.mark.parametrize("seqs,per_seq,distinct", [(4, 8, 49.7), (64, 1, 94.8), (1, 1, 8.0)], ids=["pre4", "dec64", "dec1"])
def test_measured_point_is_reproduced(seqs, per_seq, distinct):
    """At a shape it measured, the profile gives back what was measured."""
    assert S9.distinct(Q3, seqs, per_seq) == pytest.approx(distinct, rel=1e-6)


def test_between_points_monotone_and_never_above_uniform():
    """Other shapes of a kind interpolate: more tokens never route to fewer experts, and never to more than uniform
    routing or fewer than one token's k."""
    dec = [S9.distinct(Q3, b, 1) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    assert dec == sorted(dec) and all(d <= Q3.expected_experts(b) + 1e-9 for d, b in zip(dec, (1, 2, 4, 8, 16, 32, 64, 128, 256)))
    assert 23.6 < S9.distinct(Q3, 8, 1) < 53.6 and 49.7 < S9.distinct(Q3, 8, 8) < 84.8
    one_point = RoutingProfile(((64, 1, 94.8),))
    assert one_point.distinct(Q3, 1, 1) >= Q3.num_experts_per_tok - 1e-9


def test_no_point_of_the_kind_means_uniform():
    """A profile with decode points only leaves prefill reads to uniform routing."""
    dec_only = RoutingProfile(((4, 1, 23.6),))
    assert dec_only.distinct(Q3, 4, 8) == pytest.approx(Q3.expected_experts(32))
    p = Policy(weights_gpu_percent=0.0, weights_cpu_percent=0.0)
    layer = stage_sizes(Q3, 2, "int8")[0][1]
    assert routed_layer_bytes(Q3, layer, p, 32) == routed_layer_bytes(Q3, layer, p, 32, sequences=4, routing=None)


def _predict(policy: Policy, routing: RoutingProfile | None, config=Q3):
    sizes = stage_sizes(config, 2, "int8")
    return predict(Candidate(policy, "int8"), config=config, ceil=CEIL, job=JobShape(4, 8, 3),
                   budget=Budget(1 << 40, 1 << 40), sizes=sizes, cal=Calibration(routing=routing))


def test_routed_prediction_reads_the_measured_experts_only():
    """Streamed routed reads: prefill disk time falls by the measured/uniform expert ratio (non-expert bytes stay);
    every-expert reads and dense models ignore the profile."""
    routed = Policy(weights_gpu_percent=0.0, weights_cpu_percent=0.0, gpu_batch_size=4)
    uni, measured = _predict(routed, None), _predict(routed, S9)
    pre_uni, pre_meas = uni.phases["prefill"][0]["disk"], measured.phases["prefill"][0]["disk"]
    assert 0.4 < pre_meas / pre_uni < 49.7 / 111.8 + 0.05
    assert measured.run_s < uni.run_s
    every = Policy(weights_gpu_percent=0.0, weights_cpu_percent=0.0, gpu_batch_size=4, all_experts=True)
    assert _predict(every, S9).run_s == pytest.approx(_predict(every, None).run_s)
    dense = preset("llama-3-8b")
    assert _predict(routed, S9, dense).run_s == pytest.approx(_predict(routed, None, dense).run_s)


def test_recorded_s12_runs_with_the_other_runs_routing():
    """The session-12 routed runs re-priced with the routing the other recorded runs measured (session 9's, out of
    sample) come within 15% where uniform routing was 35-53% over; the every-expert run is not routed."""
    out = subprocess.run([sys.executable, str(ROOT / "bench/costmodel_check.py"), "--brief", "--markdown", "--routing",
                          "others", *(str(ROOT / f"docs/bench-results/s12/{n}.json") for n in
                                      ("moe-routed-b4", "moe-routed-b64", "moe-all-b64"))],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("|")]
    head = [h.strip() for h in lines[0]]
    rows = {r[0].strip(): dict(zip(head, (c.strip() for c in r))) for r in lines[2:]}
    for run in ("s12/moe-routed-b4.json", "s12/moe-routed-b64.json"):
        assert float(rows[run]["run err, uniform routing"].rstrip("%")) > 30
        assert abs(float(rows[run]["run err"].rstrip("%"))) < 15
    every = rows["s12/moe-all-b64.json"]
    assert every["run err"] == every["run err, uniform routing"]


@pytest.mark.parametrize("env,expected", [({}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
                                          ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"},
                                           {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}),
                                          ({"PYTORCH_ALLOC_CONF": "backend:native"}, {"PYTORCH_ALLOC_CONF": "backend:native"})],
                         ids=["unset", "user-cuda-conf", "user-alloc-conf"])
def test_allocator_env(env, expected):
    """Expandable segments unless the user set an allocator configuration under either name."""
    cli.set_allocator_env(env)
    assert env == expected


def test_cli_sets_allocator_env_before_torch():
    """`kubeflash` sets it in its own process before any subcommand imports torch (so torch reads it)."""
    code = ("import sys, os\nfrom kubeflash_node import cli\ntry:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split()[-2:] == ["expandable_segments:True", "False"]


def test_first_stages_are_read_during_setup():
    """The streamer submits its first `prefetch + 1` stage reads while the engine is built (the H200 runs' prefill
    weight bytes were 47/50 of a pass with every expert read): their disk time is setup, not the first prefill; later
    passes and a routed layer's experts (read after the router) stay in the run."""
    c = preset("llama-3-8b")
    sizes = stage_sizes(c, 2, "none")
    ceil = CEIL
    stage_s = sizes[0][1] / (ceil.disk_read_cold * 1e9)

    def run(prefetch: int, gen: int = 1):
        p = Policy(weights_gpu_percent=0.0, weights_cpu_percent=0.0, gpu_batch_size=1, prefetch=prefetch)
        return predict(Candidate(p), config=c, ceil=ceil, job=JobShape(1, 16, gen), budget=Budget(1 << 40, 1 << 40),
                       sizes=sizes)

    two, four = run(1), run(3)  # 2 slots: the embedding and layer 0; 4 slots: layers 1 and 2 besides
    embed_s = sizes[0][0] / (ceil.disk_read_cold * 1e9)
    assert two.run_s - four.run_s == pytest.approx(2 * stage_s, rel=0.01)
    assert four.setup_s - two.setup_s == pytest.approx(2 * stage_s, rel=0.01)
    assert two.setup_s == pytest.approx(embed_s + stage_s, rel=0.01)
    assert run(3, gen=3).phase_s("decode") == pytest.approx(run(1, gen=3).phase_s("decode"), rel=1e-6)


def test_recorded_every_expert_run_prefill_bytes_match_the_roofline():
    """The roofline counts the first prefill without the stages read during setup: for the H200 every-expert run its
    prefill disk bytes are the 31.09 GB the engine counted (47 of 50 stages), its decode bytes a whole pass each."""
    out = subprocess.run([sys.executable, str(ROOT / "bench/costmodel_check.py"), "--markdown",
                          str(ROOT / "docs/bench-results/s12/moe-all-b64.json")],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("|")]
    row = dict(zip((h.strip() for h in lines[0]), (c.strip() for c in lines[2])))
    assert float(row["disk GB/s prefill"]) == pytest.approx(31.089e9 / 16.869e9, abs=0.01)
    assert float(row["disk GB/s decode"]) == pytest.approx(33.036e9 / 16.022e9, abs=0.01)


def test_plan_prices_with_a_recorded_routing_profile(tmp_path):
    """`kubeflash plan --routing-from BENCH_JSON` takes the run's report.routing_profile: it says so, its MoE lines give
    the measured experts, and the predicted time of the chosen routed plan is no longer than under uniform routing; a
    JSON without a profile is refused, naming the flag."""
    job = tmp_path / "job.yaml"
    job.write_text("""apiVersion: kubeflash.io/v1alpha1
kind: InferenceJob
metadata: {name: moe}
spec:
  model: {uri: "dummy:qwen3-30b-a3b", dtype: float16}
  input: {synthetic: {count: 4, promptLength: 8}}
  generation: {maxNewTokens: 3}
  resources: {gpuMemory: 12Gi, cpuMemory: 16Gi}
""")
    bench = tmp_path / "bench.json"
    bench.write_text('{"report": {"routing_profile": [[4, 1, 23.6], [4, 8, 49.7]]}}')
    env = os.environ | {"KUBEFLASH_HOME": str(tmp_path / "home")}
    ceilings = str(ROOT / "docs/bench-results/s12/moe-routed-b4.json")

    def plan(*extra: str) -> tuple[subprocess.CompletedProcess, dict]:
        out = tmp_path / f"p{len(extra)}.json"
        proc = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "plan", str(job), "--ceilings", ceilings,
                               "--json", str(out), *extra], capture_output=True, text=True, timeout=600, env=env)
        return proc, (json.loads(out.read_text()) if proc.returncode == 0 else {})

    (uni, p_uni), (meas, p_meas) = plan(), plan("--routing-from", str(bench))
    assert uni.returncode == 0 and meas.returncode == 0, uni.stderr + meas.stderr
    assert f"routing: measured (by {bench}: 4 x 1 tokens -> 23.6 experts, 4 x 8 tokens -> 49.7 experts" in meas.stdout
    assert "routing: uniform (no measured profile)\n" in uni.stdout  # no entry in the store: nothing measured
    if not p_meas["best"]["policy"]["all_experts"]:
        assert p_meas["moe"]["expected_experts_prefill"] == pytest.approx(49.7, rel=1e-3)
    assert p_meas["best"]["total_s"] < p_uni["best"]["total_s"]
    bad = tmp_path / "none.json"
    bad.write_text('{"report": {}}')
    refused, _ = plan("--routing-from", str(bad))
    assert refused.returncode == 1 and "--routing-from" in refused.stderr and "routing_profile" in refused.stderr
