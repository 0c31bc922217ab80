"""The agent's Prometheus metrics, in a registry of its own (no process-global state), served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

P = "kubeflash_agent_"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes_staged = Counter(P + "staged_bytes", "Bytes of model store written by staging", ["disk"], registry=r)
        self.cache_hits = Counter(P + "cache_hits", "Wanted models that were already staged", registry=r)
        self.cache_misses = Counter(P + "cache_misses", "Wanted models that had to be staged", registry=r)
        self.evictions = Counter(P + "evictions", "Models evicted to make room", ["disk"], registry=r)
        self.staging_failures = Counter(P + "staging_failures", "Failed stagings by kind", ["kind"], registry=r)
        self.disk_capacity = Gauge(P + "disk_capacity_bytes", "Store disk capacity", ["disk"], registry=r)
        self.disk_free = Gauge(P + "disk_free_bytes", "Free for new models and KV (reservations subtracted)",
                               ["disk"], registry=r)
        self.disk_read = Gauge(P + "disk_read_bytes_per_second", "Probed sequential read bandwidth", ["disk"],
                               registry=r)
        self.disk_write = Gauge(P + "disk_write_bytes_per_second", "Probed sequential write bandwidth", ["disk"],
                                registry=r)
        self.gpu_h2d = Gauge(P + "gpu_h2d_bytes_per_second", "Probed host-to-device bandwidth", ["gpu"], registry=r)
        self.gpu_d2h = Gauge(P + "gpu_d2h_bytes_per_second", "Probed device-to-host bandwidth", ["gpu"], registry=r)
        self.models = Gauge(P + "models", "Models by state", ["state"], registry=r)
        self.pairs = Gauge(P + "gpu_ssd_pairs", "GPU<->SSD pairs on this node", registry=r)
        self.kv_quota = Gauge(P + "kv_quota_bytes", "KV space reserved for jobs", ["disk"], registry=r)
        self.kv_used = Gauge(P + "kv_used_bytes", "KV space used by jobs", ["disk"], registry=r)
        self.kv_over_quota = Gauge(P + "kv_over_quota_jobs", "Jobs using more than their KV quota", registry=r)
        self.jobs = Gauge(P + "jobs", "Job directories on this node", registry=r)
        self.kv_cache_budget = Gauge(P + "kv_cache_budget_bytes", "Bytes the prefix KV cache may take", registry=r)
        self.kv_cache_bytes = Gauge(P + "kv_cache_bytes", "Bytes of prefix KV blocks on the store disks", registry=r)
        self.kv_cache_blocks = Gauge(P + "kv_cache_blocks", "Prefix KV blocks on the store disks", registry=r)
        self.kv_cache_hits = Counter(P + "kv_cache_hits", "Prefix KV blocks jobs read from the node cache",
                                     registry=r)
        self.kv_cache_misses = Counter(P + "kv_cache_misses", "Prefix KV blocks jobs computed because the node "
                                       "cache lacked them", registry=r)
        self.kv_cache_tokens_saved = Counter(P + "kv_cache_prefill_tokens_saved", "Prompt tokens jobs did not "
                                             "prefill thanks to cached prefixes", registry=r)
        self.kv_cache_evicted_blocks = Counter(P + "kv_cache_evicted_blocks", "Prefix KV blocks removed to stay "
                                               "under the budget", registry=r)
        self.kv_cache_evicted_bytes = Counter(P + "kv_cache_evicted_bytes", "Bytes of prefix KV blocks removed to "
                                              "stay under the budget", registry=r)
        self.heartbeat = Gauge(P + "heartbeat_timestamp_seconds", "End of the last reconcile pass", registry=r)
        self.reconcile_errors = Counter(P + "reconcile_errors", "Reconcile passes that raised", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
