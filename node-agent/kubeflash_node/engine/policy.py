"""The offload policy: where weights, KV cache and activations live, and how work is batched.

One frozen dataclass, built once at the edge (job manifest, CLI flags or the cost model) and passed down.
"""

from __future__ import annotations

from dataclasses import dataclass

KV_TIERS = ("device", "cpu", "disk")
KV_BITS = (16, 8, 4)


@dataclass(frozen=True)
class Policy:
    """How one job runs (FlexGen's policy, plus our I/O knobs)."""

    gpu_batch_size: int = 8  # sequences per micro-batch
    num_gpu_batches: int = 1  # micro-batches per block; each layer is read once per block (zig-zag)
    weights_gpu_percent: float = 0.0  # share of layers resident on the compute device
    weights_cpu_percent: float = 0.0  # share of layers resident in (pinned) host memory; the rest stream from disk
    kv: str = "device"  # where the KV cache lives: device | cpu | disk
    kv_bits: int = 16  # 16: as computed; 8 / 4: group-wise quantized in every tier (quant.KVCodec)
    cpu_attention: bool = False  # kv=cpu: decode attention runs on the CPU where the KV lives (kvnear)
    kv_write_back: bool = False  # kv=disk: new K/V buffered in host memory, written in large chunks (kvnear)
    kv_write_back_bytes: int = 8 << 20  # write-back chunk: buffered bytes per layer/micro-batch before a write
    x_cache_percent: float = 0.0  # share of layers whose cache holds the input X, K/V recomputed (INF² X-cache)
    prefetch: int = 2  # stages read ahead of the one computing (weights of at most prefetch+1 stages in flight)
    io_threads: int = 4  # reader threads
    io_task_bytes: int = 16 << 20  # one read task; a stage file is split into tasks read in parallel
    io_backend: str = "auto"  # auto | posix | odirect | kvikio
    compute_dtype: str = "auto"  # auto: float32 on CPU, the store dtype on GPU
    all_experts: bool = False  # MoE: read every expert with its layer (dense streaming), not only the routed ones
    expert_cache_bytes: int = 0  # MoE: device memory kept for the most often routed experts across steps (0: none)
    expert_prefetch: bool = False  # MoE: predict a layer's experts before its attention and read them meanwhile

    def __post_init__(self):
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise ValueError("policy: gpu_batch_size and num_gpu_batches must be >= 1")
        if not (0 <= self.weights_gpu_percent <= 100 and 0 <= self.weights_cpu_percent <= 100
                and self.weights_gpu_percent + self.weights_cpu_percent <= 100):
            raise ValueError("policy: weights gpu + cpu percentages must lie in 0..100 and sum to at most 100")
        if self.kv not in KV_TIERS:
            raise ValueError(f"policy: kv tier {self.kv!r} is not one of {KV_TIERS}")
        if self.kv_bits not in KV_BITS:
            raise ValueError(f"policy: kv_bits {self.kv_bits} is not one of {KV_BITS}")
        if self.cpu_attention and self.kv != "cpu":
            raise ValueError("policy: cpu_attention needs the KV cache in CPU memory (kv=cpu)")
        if self.kv_write_back and self.kv != "disk":
            raise ValueError("policy: kv_write_back needs the KV cache on disk (kv=disk)")
        if not 0 <= self.x_cache_percent <= 100:
            raise ValueError("policy: x_cache_percent must lie in 0..100")
        if self.prefetch < 1:
            raise ValueError("policy: prefetch must be >= 1")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def x_layers(self, num_layers: int) -> set[int]:
        """The layers whose cache holds X instead of K and V (the first x_cache_percent of them)."""
        return set(range(round(num_layers * self.x_cache_percent / 100)))

    def placement(self, num_stages: int) -> list[str]:
        """Per stage: 'gpu' (resident on device), 'cpu' (resident in host memory) or 'disk' (streamed)."""
        n_gpu = round(num_stages * self.weights_gpu_percent / 100)
        n_cpu = round(num_stages * (self.weights_gpu_percent + self.weights_cpu_percent) / 100) - n_gpu
        return ["gpu"] * n_gpu + ["cpu"] * n_cpu + ["disk"] * (num_stages - n_gpu - n_cpu)


def make_policy(ceil=None, *, io_threads: int = 0, io_task_bytes: int = 0, default_io_threads: int = 4,
                **fields) -> Policy:
    """Every offload policy starts here (the manifest's, `kubeflash bench`'s flags, the cost model's base).

    `fields`: placement, batch shape and techniques, as Policy names them. Reader threads and the read task size:
    as given, else what this disk's probe found (`ceil`, a bench.Ceilings), else `default_io_threads` and 16 MiB.
    """
    return Policy(io_threads=io_threads or getattr(ceil, "disk_read_threads", 0) or default_io_threads,
                  io_task_bytes=io_task_bytes or getattr(ceil, "disk_read_task_bytes", 0) or 16 << 20, **fields)
