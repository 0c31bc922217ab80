"""Operator metrics: the jobs-by-phase gauge follows each job's latest phase; latencies land in histograms."""

from __future__ import annotations

from kubeflash_operator.metrics import Metrics


def sample(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels)


def test_jobs_by_phase_counts_each_job_once():
    """A job moving between phases moves between gauge labels; a deleted job leaves the gauge."""
    m = Metrics()
    m.job_phase("ns/a", "Pending")
    m.job_phase("ns/b", "Pending")
    m.job_phase("ns/a", "Running")
    assert (sample(m, "kubeflash_jobs", phase="Pending"), sample(m, "kubeflash_jobs", phase="Running")) == (1, 1)
    m.job_phase("ns/b", None)
    assert sample(m, "kubeflash_jobs", phase="Pending") == 0 and m.phase_counts() == {"Running": 1}


def test_latency_histograms():
    """scheduling and staging observations are counted and summed; negative clock skew clamps to 0."""
    m = Metrics()
    m.observe("scheduling", 1.5)
    m.observe("staging", 20)
    m.observe("staging", -1)
    assert sample(m, "kubeflash_scheduling_latency_seconds_count") == 1
    assert sample(m, "kubeflash_staging_latency_seconds_sum") == 20
    assert sample(m, "kubeflash_staging_latency_seconds_count") == 2


def test_failed_attempts_by_reason():
    """Failed attempts are counted per reason."""
    m = Metrics()
    m.observe("failed_attempt", "Evicted")
    m.observe("failed_attempt", "Evicted")
    assert sample(m, "kubeflash_failed_attempts_total", reason="Evicted") == 2


def test_serves_metrics_over_http():
    """serve() exposes the registry on /metrics."""
    import urllib.request

    from kubeflash_operator.metrics import Metrics as M

    m = M()
    m.serve(0, addr="127.0.0.1")
    try:
        port = m._server.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kubeflash_jobs{phase="Pending"} 0.0' in body
    finally:
        m.close()
