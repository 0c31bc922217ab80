"""Names the operator, the agent, the CSI driver and the engine pod agree on (docs/contract.md)."""

from __future__ import annotations

GROUP = "kubeflash.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
JOB_KIND = "InferenceJob"
NODE_KIND = "FlashNode"

# The engine pod's environment, set by the operator (engine/cli_pod.py reads it).
ENV_JOB_SPEC = "KUBEFLASH_JOB_SPEC"  # the job's canonical spec (kubeflash_api.canonical), JSON
ENV_JOB_NAME = "KUBEFLASH_JOB_NAME"
ENV_JOB_NAMESPACE = "KUBEFLASH_JOB_NAMESPACE"
ENV_MODEL_DIR = "KUBEFLASH_MODEL_DIR"
ENV_JOB_DIR = "KUBEFLASH_JOB_DIR"
ENV_INPUT_FILE = "KUBEFLASH_INPUT_FILE"  # the mounted batch file (configMap or pvc input)
ENV_OUTPUT_DIR = "KUBEFLASH_OUTPUT_DIR"  # the mounted output claim's root
ENV_PROBE = "KUBEFLASH_PROBE"
ENV_DEVICE = "KUBEFLASH_DEVICE"
ENV_GPUS = "KUBEFLASH_GPUS"
ENV_KV_CACHE_DIR = "KUBEFLASH_KV_CACHE_DIR"  # the mounted node prefix KV cache (spec.cache.prefix)
ENV_KV_CACHE_BUDGET = "KUBEFLASH_KV_CACHE_BUDGET"  # its byte budget (a quantity), the agent's kvCache.budget
# spec.offload.tensorParallel N > 1 (docs/multi-gpu.md): os.pathsep-separated lists, one entry per rank, in order
ENV_SHARD_DIRS = "KUBEFLASH_SHARD_DIRS"  # rank k's shard store, on pair k's disk (required when N > 1)
ENV_RANK_DIRS = "KUBEFLASH_RANK_DIRS"  # optional: rank k's KV/progress dir (pair k's KV volume); default <job>/tp
ENV_RING_DIRS = "KUBEFLASH_RING_DIRS"  # optional: the SSD ring's directory per rank; set: reduce through the ring

# Files in a job's directory (written by the engine, read by the agent as hostile input).
RESULTS_FILE = "results.jsonl"
PROGRESS_FILE = "progress.json"
REPORT_FILE = "report.json"

JOB_LABEL = "kubeflash.io/job"

# The CSI driver (docs/csi.md): its name and the inline-volume attributes the operator sets and the driver reads.
CSI_DRIVER = "kubeflash.io"
CSI_MODEL_ID = "kubeflash.io/model-id"  # a staged model, mounted read-only
CSI_KV_SIZE = "kubeflash.io/kv-size"  # a sized KV space (bytes or a quantity)
CSI_JOB = "kubeflash.io/job"  # the job's directory in the pod's namespace
CSI_DISK = "kubeflash.io/disk"  # optional: the store disk's name
CSI_KV_CACHE = "kubeflash.io/kv-cache"  # the node's prefix KV cache of one model, in the pod's namespace
CSI_SHARD = "kubeflash.io/shard"  # with CSI_MODEL_ID and CSI_TENSOR_PARALLEL: that rank's shard, read-only
CSI_TENSOR_PARALLEL = "kubeflash.io/tensor-parallel"  # how many shards the model was cut into (docs/multi-gpu.md)
CSI_MIN_KV = 16 << 20  # the smallest KV volume (an ext4 image smaller than this is mostly metadata)
DEFAULT_KV_DISK = "10Gi"
