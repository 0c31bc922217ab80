"""The InferenceJob API: its schema (the CRD is generated from it), its frozen types and its one parser.

`parse_job(doc)` takes a whole manifest (kubeflash run), `parse_job_spec(spec, name=, namespace=)` the spec
kopf hands the operator; both answer with the same JobSpec or a SpecError naming the field path. What travels
onward (to the pod) is `to_canonical(spec)`, the spec with every default filled in, read back by
`from_canonical`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from kubeflash_api import schema as s
from kubeflash_api.contract import API_VERSION, DEFAULT_KV_DISK, JOB_KIND
from kubeflash_api.errors import SpecError, child, show
from kubeflash_api.metadata import METADATA, parse_metadata
from kubeflash_api.names import (
    CONFIG_KEY,
    MAX_JOB_NAME,
    check_relative,
    check_subdomain,
    model_id,
)
from kubeflash_api.quantity import parse_quantity

DTYPES = ("float16", "bfloat16", "float32")
QUANTIZATIONS = ("none", "int8", "int4")
COMPRESSIONS = ("none", "int8", "int4")
REDUCES = ("auto", "ring")  # spec.offload.reduce: how tensor-parallel ranks sum their partial results
POLICIES = ("auto", "explicit")
TIERS = ("gpu", "cpu", "disk")
MAX_TOKENS = 32768
MAX_PROMPTS = 100_000
MAX_PARALLELISM = 1000
MAX_INLINE_PROMPTS = 1024  # spec.input.prompts

# ------------------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class ModelSpec:
    uri: str
    dtype: str = "float16"
    quantization: str = "none"

    @property
    def id(self) -> str:
        """The path-safe id the model is staged under on every node (kubeflash_api.names.model_id)."""
        return model_id(self.uri, dtype=self.dtype, quantization=self.quantization)


@dataclass(frozen=True)
class Prompt:
    """One request: its custom_id and either chat messages, a completion prompt or token ids (synthetic)."""

    id: str
    messages: tuple[Mapping[str, str], ...] | None = None  # chat: ({role, content}, ...), content always a string
    text: str | None = None  # a /v1/completions prompt
    max_tokens: int | None = None
    token_ids: tuple[int, ...] | None = None  # synthetic prompts for tokenizer-free (dummy:) models

    @property
    def kind(self) -> str:
        """chat | completion | tokens: the shape its answer takes (docs/contract.md)."""
        return "chat" if self.messages is not None else "completion" if self.text is not None else "tokens"


@dataclass(frozen=True)
class ConfigMapKey:
    name: str
    key: str


@dataclass(frozen=True)
class Synthetic:
    count: int = 1
    prompt_length: int = 32


@dataclass(frozen=True)
class InputSpec:
    prompts: tuple[Prompt, ...] = ()  # inline and synthetic prompts; a file's once the edge has read it
    file: str | None = None  # a JSONL path relative to the input root (input.pvc's root, or the manifest's folder)
    config_map: ConfigMapKey | None = None
    pvc: str | None = None  # claim name holding `file`
    synthetic: Synthetic | None = None

    @property
    def source(self) -> str:
        return ("prompts" if not (self.file or self.config_map or self.synthetic) else
                "file" if self.file else "configMap" if self.config_map else "synthetic")


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Split:
    """Percent of one kind of tensor on each tier; gpu + cpu + disk = 100."""

    gpu: int = 0
    cpu: int = 0
    disk: int = 100


@dataclass(frozen=True)
class OffloadSpec:
    policy: str = "auto"  # auto | explicit
    weights: Split = Split()
    kv: Split = Split(gpu=100, disk=0)
    activations: Split = Split(gpu=100, disk=0)
    gpu_batch_size: int | None = None
    num_gpu_batches: int | None = None
    kv_write_back: bool = False
    x_cache: bool = False
    cpu_attention: bool = False
    compression: str = "none"
    sparsity: float | None = None  # target share of FFN activations skipped (engine/sparse.py); None: off, dense
    tensor_parallel: int = 1  # ranks every layer is split over (engine/tensorparallel.py); 1: one process
    reduce: str = "auto"  # tensor-parallel reduction: auto (NCCL on GPUs, gloo on CPU) | ring (the SSD ring)
    expert_cache: int | str = 0  # MoE hot-expert cache: bytes, or "auto" (engine/moeplan.py sizes it); 0: none
    expert_prefetch: str = "auto"  # MoE: read predicted experts during attention: auto (the cost model) | on | off


@dataclass(frozen=True)
class ResourcesSpec:
    gpus: int = 1
    gpu_memory: int | None = None  # bytes the engine may allocate on the GPU (None: the whole GPU)
    cpu_memory: int | None = None  # bytes of host memory for the job (None: what the machine has free)
    kv_disk: int = 10 << 30  # bytes of the paired SSD the job's KV cache may take


@dataclass(frozen=True)
class OutputSpec:
    path: str | None = None  # results file relative to the output root (the claim's, or the job folder)
    pvc: str | None = None
    config_map: str | None = None


@dataclass(frozen=True)
class CacheSpec:
    prefix: bool = False  # use and fill the node's prefix KV cache (on the paired SSD)


@dataclass(frozen=True)
class ShardSpec:
    """This job is shard `index` of `count` of a spec.parallelism job: it runs only the prompts sharding.py gives it."""

    index: int
    count: int
    prompt_index: tuple[int, ...] | None = None  # inline prompts: each one's index in the parent's (ids prompt-<i>)


@dataclass(frozen=True)
class JobSpec:
    name: str
    namespace: str
    model: ModelSpec
    input: InputSpec
    generation: GenerationSpec = GenerationSpec()
    offload: OffloadSpec = OffloadSpec()
    output: OutputSpec = OutputSpec()
    resources: ResourcesSpec = ResourcesSpec()
    backoff_limit: int = 3
    cache: CacheSpec = CacheSpec()
    image: str | None = None
    parallelism: int = 1  # shards the operator splits the prompts into (child InferenceJobs)
    shard: ShardSpec | None = None  # set by the operator on a shard job

    def with_prompts(self, prompts: tuple[Prompt, ...]) -> JobSpec:
        """The same job with its input file's prompts read in (by the edge that can reach the file)."""
        return replace(self, input=replace(self.input, prompts=tuple(prompts)))


# ----------------------------------------------------------------------------------------------- checks


_BUILTIN = re.compile(r"^builtin:[a-z0-9][a-z0-9._-]*$")
_DUMMY = re.compile(r"^dummy:[A-Za-z0-9][A-Za-z0-9._-]*(@[a-z]+)?$")
_HTTP = re.compile(r"^https?://[^/?#\s@]+(/[^\s]*)?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def check_uri(uri: str, path: str) -> str:
    """builtin:<name>, dummy:<preset>[@fill], http(s)://host/…, or an absolute path without '..'."""
    if uri != uri.strip() or any(c.isspace() for c in uri):
        raise SpecError(path, f"must not contain whitespace, got {uri!r}")
    if uri.startswith("/"):
        if ".." in uri.split("/"):
            raise SpecError(path, f"must be an absolute path without '..', got {uri!r}")
        return uri
    scheme = (_SCHEME.match(uri) or [None, None])[1]
    good = {"builtin": (_BUILTIN, "builtin:<name> with a lowercase name, e.g. builtin:smollm2-135m"),
            "dummy": (_DUMMY, "dummy:<preset> or dummy:<preset>@zeros, e.g. dummy:llama-3-8b"),
            "http": (_HTTP, "http(s)://<host>/<path> without credentials"),
            "https": (_HTTP, "http(s)://<host>/<path> without credentials")}
    if scheme is None:
        raise SpecError(path, f"must be builtin:<name>, dummy:<preset>, http(s)://… or an absolute path, got {uri!r}")
    if scheme not in good:
        raise SpecError(path, f"scheme {scheme!r} is not supported; use builtin:, dummy:, http(s):// or an "
                              f"absolute path (got {uri!r})")
    pattern, expected = good[scheme]
    if not pattern.match(uri):
        raise SpecError(path, f"must be {expected}, got {uri!r}")
    return uri


def _split_sum(v: dict, path: str) -> dict:
    total = v["gpu"] + v["cpu"] + v["disk"]
    if total != 100:
        raise SpecError(path, f"gpu + cpu + disk must sum to 100, got {total}")
    return v


def _relative(v: str, path: str) -> str:
    return check_relative(v, path)


def _subdomain(v: str, path: str) -> str:
    return check_subdomain(v, path)


def _config_key(v: str, path: str) -> str:
    if not CONFIG_KEY.fullmatch(v) or v in (".", ".."):  # fullmatch: "$" alone lets a final newline through
        raise SpecError(path, f"must be a ConfigMap key (letters, digits, '-', '_', '.'), got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------- schema


def _name(doc: str) -> s.Node:
    return s.string(doc, min_len=1, max_len=253, check=_subdomain)


MAX_SPARSITY = 0.95


def _sparsity(v: Any, path: str) -> float | None:
    """`off` -> None (dense); a number in [0, MAX_SPARSITY] -> that target. An unquoted `off` in YAML 1.1 (PyYAML,
    go-yaml, so kubectl too) arrives as false, which means off as well; true names no target and is refused."""
    if v == "off" or v is False:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(path, f"must be off or a target sparsity in [0, {MAX_SPARSITY}], got {show(v)}")
    if not 0 <= v <= MAX_SPARSITY:  # NaN fails this too
        raise SpecError(path, f"must be off or a target sparsity in [0, {MAX_SPARSITY}], got {v!r}")
    return float(v)


def _expert_cache(v: Any, path: str) -> int | str:
    """`auto` stays `auto` (the engine sizes it from the job's budgets); anything else is a quantity of bytes."""
    if v == "auto":
        return v
    if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)):
        return parse_quantity(v, path=path)
    raise SpecError(path, f"must be auto or a quantity of bytes such as 2Gi, got {show(v)}")


EXPERT_PREFETCH = ("auto", "on", "off")


def _expert_prefetch(v: Any, path: str) -> str:
    """auto | on | off. Unquoted `on` / `off` arrive as true / false from YAML 1.1 parsers (PyYAML, go-yaml, so
    kubectl too), and mean on / off."""
    if v is True or v is False:
        return "on" if v else "off"
    if v not in EXPERT_PREFETCH:
        raise SpecError(path, f"must be one of auto, on or off, got {show(v)}")
    return v


def _shard(v: dict, path: str) -> dict:
    if v["index"] >= v["count"]:
        raise SpecError(f"{path}.index", f"must be less than {path}.count ({v['count']}), got {v['index']}")
    return v


def _split(doc: str) -> s.Node:
    return s.obj(doc,
                 ("gpu", s.integer("Percent on the GPU.", lo=0, hi=100, default=0)),
                 ("cpu", s.integer("Percent in (pinned) host memory.", lo=0, hi=100, default=0)),
                 ("disk", s.integer("Percent on the paired SSD.", lo=0, hi=100, default=0)),
                 rules=(("self.gpu + self.cpu + self.disk == 100", "gpu + cpu + disk must sum to 100"),),
                 check=_split_sum)


MODEL = s.obj(
    "The model to run; staged into the node's layer store once and shared by every job that names it.",
    ("uri", s.string("builtin:<name> (e.g. builtin:smollm2-135m), dummy:<preset>[@zeros] (random weights, for "
                     "benchmarks), http(s)://… (an HF directory as .tar, or a GGUF file; the agent must allow "
                     "remote sources), or an absolute path on the node under the agent's allowed source roots.",
                     min_len=1, max_len=2048, check=check_uri)),
    ("dtype", s.string("Weight and compute dtype on the GPU (CPU runs compute in float32).", enum=DTYPES,
                       default="float16")),
    ("quantization", s.string("Group-wise weight quantization in the store: none, int8 or int4.", enum=QUANTIZATIONS,
                              default="none")),
    required=("uri",))

INPUT = s.obj(
    "The prompts: inline, synthetic, or a JSONL file in the OpenAI batch input format (one request a line). "
    "Exactly one of prompts, file, configMap or synthetic.",
    ("prompts", s.array("Chat prompts, one user message each; their custom_ids are prompt-0, prompt-1, …",
                        s.string("One user message.", min_len=1, max_len=65536), min_len=1,
                        max_len=MAX_INLINE_PROMPTS)),
    ("file", s.string("A JSONL file in the OpenAI batch input format, relative to the root of input.pvc in a "
                      "cluster, or to the manifest's folder with kubeflash run; '..' and absolute paths are refused.",
                      min_len=1, max_len=1024, check=_relative)),
    ("configMap", s.obj("A ConfigMap key holding the JSONL batch (cluster only).",
                        ("name", _name("The ConfigMap's name, in the job's namespace.")),
                        ("key", s.string("The key whose value is the JSONL batch.", min_len=1, max_len=253,
                                         check=_config_key)),
                        required=("name", "key"))),
    ("pvc", s.obj("The PersistentVolumeClaim that holds input.file (mounted read-only).",
                  ("claimName", _name("The claim's name, in the job's namespace.")), required=("claimName",))),
    ("synthetic", s.obj("Generated token-id prompts, for tokenizer-free (dummy:) models and benchmarks.",
                        ("count", s.integer("How many prompts.", lo=1, hi=MAX_PROMPTS, default=1)),
                        ("promptLength", s.integer("Tokens per prompt.", lo=1, hi=MAX_TOKENS, default=32)))),
    rules=(("[has(self.prompts), has(self.file), has(self.configMap), has(self.synthetic)].filter(x, x).size() == 1",
            "needs exactly one of prompts, file, configMap or synthetic"),
           ("!has(self.pvc) || has(self.file)", "pvc is only used together with file")))

GENERATION = s.obj(
    "Sampling settings, shared by every prompt (a batch line's max_tokens overrides maxNewTokens for that line).",
    ("maxNewTokens", s.integer("Most tokens generated per prompt.", lo=1, hi=MAX_TOKENS, default=32)),
    ("temperature", s.number("Sampling temperature; 0 is greedy.", lo=0, hi=100, default=0)),
    ("topP", s.number("Nucleus sampling: keep the smallest set of tokens whose probability reaches topP.", lo=0,
                      lo_open=True, hi=1, default=1)),
    ("seed", s.integer("Seed of the sampler, so sampled runs repeat.", lo=0, hi=2**53 - 1, default=0)),
    ("stop", s.array("Strings that end a generation (not included in the answer).",
                     s.string("One stop string.", min_len=1, max_len=256), max_len=16, default=[])),
    default={})

RESOURCES = s.obj(
    "What the job may use on its node; the engine plans within these budgets.",
    ("gpus", s.integer("GPU<->SSD pairs the job holds.", lo=1, hi=8, default=1)),
    ("gpuMemory", s.quantity("GPU memory the engine may allocate, e.g. 20Gi; the auto policy plans within it and the "
                             "CUDA allocator is capped at it.", lo=1)),
    ("cpuMemory", s.quantity("Host memory for the job, e.g. 64Gi; the pod's memory request and the auto policy's "
                             "host budget.", lo=1)),
    ("kvDisk", s.quantity("SSD space reserved for the job's KV cache on the paired disk; the engine refuses a policy "
                          "whose KV files would outgrow it.", default=DEFAULT_KV_DISK)),
    default={})

OFFLOAD = s.obj(
    "Where weights, KV cache and activations live (GPU, pinned host memory, SSD) and the INF² techniques.",
    ("policy", s.string("auto: the cost model picks the split from measured bandwidths and the budgets; explicit: "
                        "weights and kv below are used as given.", enum=POLICIES, default="auto")),
    ("weights", _split("Percent of the layers' weights resident on each tier (policy explicit).")),
    ("kv", _split("The KV cache's tier (policy explicit): 100 on one of gpu, cpu or disk.")),
    ("activations", _split("Activations' tier (policy explicit; default all on the GPU).")),
    ("gpuBatchSize", s.integer("Sequences per micro-batch (FlexGen's gpu_batch_size).", lo=1, hi=4096)),
    ("numGpuBatches", s.integer("Micro-batches per block; each layer is read once per block.", lo=1, hi=1024)),
    ("kvWriteBack", s.boolean("Buffer new KV in host memory and write large chunks (INF²); needs the KV on disk.",
                              default=False)),
    ("xCache", s.boolean("Store a layer's input X instead of K and V where that is smaller (INF²).", default=False)),
    ("cpuAttention", s.boolean("Compute decode attention where the KV lives (host memory); needs the KV in CPU "
                               "memory.", default=False)),
    ("compression", s.string("Group-wise compression of the KV cache: none, int8 or int4.", enum=COMPRESSIONS,
                             default="none")),
    ("sparsity", s.Node("any", "Activation sparsity: off (dense), or a target share of FFN activations to skip, in "
                               f"[0, {MAX_SPARSITY}]; only the active neurons' FFN rows and columns are used. Llama-"
                               "family models need `kubeflash calibrate` for that target first; OPT uses its ReLU "
                               "zeros. A number or the string off.", default="off", check=_sparsity)),
    ("tensorParallel", s.integer("Ranks every layer is split over (Megatron-style tensor parallelism), each "
                                 "streaming its own shard of the weights: 1 runs one process; N must divide the "
                                 "attention heads and the K/V heads (or be a multiple of them).", lo=1, hi=8,
                                 default=1)),
    ("reduce", s.string("How the tensor-parallel ranks sum their partial results: auto (NCCL between GPUs, gloo "
                        "on CPU) or ring (the SSD ring: each rank writes to its neighbour's disk; in a cluster pod "
                        "rank k's ring directory is on its own pair's KV volume). ring needs tensorParallel > 1.",
                        enum=REDUCES, default="auto")),
    ("expertCache", s.Node("any", "Mixture-of-experts models: memory for a hot-expert cache that keeps the most often "
                                  "routed experts on the compute device across steps, so a hot expert is read from "
                                  "disk once. A quantity of bytes (e.g. 2Gi; 0: no cache) or auto: an eighth of the "
                                  "GPU budget (spec.resources.gpuMemory, else the GPU's), or of the host budget on a "
                                  "CPU run. Dense models ignore it.", default=0, check=_expert_cache)),
    ("expertPrefetch", s.Node("any", "Mixture-of-experts models: predict each streamed layer's experts from the "
                                     "hidden state entering it and read them while its attention computes, instead "
                                     "of only after the router. auto (default): the cost model decides from the "
                                     "measured ceilings (what the reads overlap with attention against the bytes of "
                                     "mispredicted experts; off where no ceilings are measured); on; off. Outputs are "
                                     "the same either way. Dense models ignore it.", default="auto",
                              check=_expert_prefetch)),
    default={},
    rules=(("!has(self.policy) || self.policy != 'explicit' || (has(self.weights) && has(self.kv))",
            "policy explicit needs weights and kv percentages"),
           ("(has(self.policy) && self.policy == 'explicit') || !(has(self.weights) || has(self.kv) || "
            "has(self.activations))", "weights, kv and activations percentages need policy explicit")))

OUTPUT = s.obj(
    "Where a copy of the finished results goes, besides results.jsonl in the job's folder.",
    ("path", s.string("The results file, relative to the output root: the root of output.pvc, or the job's folder "
                      "with kubeflash run. Default: <job>.results.jsonl in a claim, results.jsonl otherwise.",
                      min_len=1, max_len=1024, check=_relative)),
    ("pvc", s.obj("A PersistentVolumeClaim the results are written to.",
                  ("claimName", _name("The claim's name, in the job's namespace.")), required=("claimName",))),
    ("configMap", s.obj("A ConfigMap the results are written to (created and owned by kubeflash).",
                        ("name", _name("The ConfigMap's name, in the job's namespace.")), required=("name",))),
    rules=(("!(has(self.pvc) && has(self.configMap))", "takes at most one of pvc or configMap"),))

CACHE = s.obj(
    "Reuse of computed KV cache. Prompts of one job that start with the same full token blocks compute that "
    "prefix once whether or not this is set.",
    ("prefix", s.boolean("Look each prompt's longest prefix (in blocks of 256 tokens) up in the node's prefix KV "
                         "cache on the paired SSD, load it instead of prefilling it, and add the job's new blocks to "
                         "the cache. Outputs are unchanged; the run report counts hits and prefill tokens saved.",
                         default=False)),
    default={})

SPEC = s.obj(
    "What to run: a model, prompts, sampling, resources and the offload policy.",
    ("model", MODEL), ("input", INPUT), ("generation", GENERATION), ("resources", RESOURCES), ("offload", OFFLOAD),
    ("output", OUTPUT), ("cache", CACHE),
    ("backoffLimit", s.integer("Failed attempts retried before the job is Failed.", lo=0, hi=20, default=3)),
    ("image", s.string("The engine image for this job's pod (the operator's default when unset).", min_len=1,
                       max_len=512)),
    ("parallelism", s.integer("Shards the prompts are split into (stable by custom_id): the operator runs each as "
                              "a child InferenceJob <name>-s<k>, placed, retried and rescheduled like any job; this "
                              "job's status sums them up. 1: the job runs itself.", lo=1, hi=MAX_PARALLELISM,
                              default=1)),
    ("shard", s.obj("Set by the operator on the child jobs of a spec.parallelism job: run only the prompts of shard "
                    "index of count (sha256 of custom_id mod count).",
                    ("index", s.integer("This shard's number, 0-based.", lo=0, hi=MAX_PARALLELISM - 1)),
                    ("count", s.integer("How many shards the prompts are split into.", lo=1, hi=MAX_PARALLELISM)),
                    ("promptIndex", s.array("With inline prompts: the index in the parent job's spec.input.prompts "
                                            "of each of this job's spec.input.prompts (the operator copies only the "
                                            "shard's own prompts), so they keep their custom_ids prompt-<index>.",
                                            s.integer("An index in the parent's spec.input.prompts.", lo=0,
                                                      hi=MAX_INLINE_PROMPTS - 1),
                                            min_len=1, max_len=MAX_INLINE_PROMPTS)),
                    required=("index", "count"),
                    rules=(("self.index < self.count", "index must be less than count"),), check=_shard)),
    required=("model", "input"),
    rules=(("self == oldSelf", "spec is immutable; delete the job and create a new one"),
           ("!has(self.shard) || !has(self.parallelism) || self.parallelism == 1",
            "shard is set by the operator on shard jobs and cannot be combined with parallelism > 1")))


# ------------------------------------------------------------------------------------------------ parse


def parse_job(doc: Any, *, namespace: str = "default") -> JobSpec:
    """A whole InferenceJob manifest (a mapping from YAML) -> JobSpec; `namespace` when metadata has none."""
    if not isinstance(doc, Mapping):
        raise SpecError("manifest", f"must be an object (an InferenceJob), got {type(doc).__name__}")
    for key in doc:
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            raise SpecError(child("", key), "is not a known top-level field (known: apiVersion, kind, metadata, spec)")
    if doc.get("apiVersion") != API_VERSION:
        raise SpecError("apiVersion", f"must be {API_VERSION}, got {show(doc.get('apiVersion'))}")
    if doc.get("kind") != JOB_KIND:
        raise SpecError("kind", f"must be {JOB_KIND}, got {show(doc.get('kind'))}")
    meta = parse_metadata(doc.get("metadata"), max_name=MAX_JOB_NAME)
    if doc.get("spec") is None:
        raise SpecError("spec", "is required")
    return parse_job_spec(doc["spec"], name=meta["name"], namespace=meta.get("namespace") or namespace)


def parse_job_spec(spec: Any, *, name: str, namespace: str, path: str = "spec") -> JobSpec:
    """An InferenceJob's spec -> JobSpec, or a SpecError naming the first bad field."""
    d = s.parse(SPEC, spec, path)
    off = _offload(d["offload"], f"{path}.offload")
    shard = _shard_spec(d, path)
    return JobSpec(
        name=name, namespace=namespace,
        model=ModelSpec(**{"uri": d["model"]["uri"], "dtype": d["model"]["dtype"],
                           "quantization": d["model"]["quantization"]}),
        input=_input(d["input"], f"{path}.input", shard.prompt_index if shard else None),
        generation=GenerationSpec(max_new_tokens=d["generation"]["maxNewTokens"],
                                  temperature=d["generation"]["temperature"], top_p=d["generation"]["topP"],
                                  seed=d["generation"]["seed"], stop=tuple(d["generation"]["stop"])),
        offload=off,
        output=_output(d.get("output") or {}, f"{path}.output"),
        resources=ResourcesSpec(gpus=d["resources"]["gpus"], gpu_memory=d["resources"].get("gpuMemory"),
                                cpu_memory=d["resources"].get("cpuMemory"), kv_disk=d["resources"]["kvDisk"]),
        backoff_limit=d["backoffLimit"], image=d.get("image"), cache=CacheSpec(prefix=d["cache"]["prefix"]),
        parallelism=d["parallelism"], shard=shard)


def _shard_spec(d: dict, path: str) -> ShardSpec | None:
    if "shard" not in d:
        return None
    if d["parallelism"] > 1:
        raise SpecError(f"{path}.shard", f"is set by the operator on shard jobs and cannot be combined with "
                                         f"{path}.parallelism > 1 (got {d['parallelism']})")
    where = d["shard"].get("promptIndex")
    if where is not None:
        inline = d["input"].get("prompts")
        if inline is None:
            raise SpecError(f"{path}.shard.promptIndex", "is only used with inline prompts (spec.input.prompts)")
        if len(where) != len(inline):
            raise SpecError(f"{path}.shard.promptIndex", f"must have one entry per spec.input.prompts entry "
                                                         f"({len(inline)}), got {len(where)}")
        if len(set(where)) != len(where):
            raise SpecError(f"{path}.shard.promptIndex", "must not repeat an index")
    return ShardSpec(index=d["shard"]["index"], count=d["shard"]["count"],
                     prompt_index=None if where is None else tuple(where))


def _input(d: dict, path: str, where: tuple[int, ...] | None = None) -> InputSpec:
    given = [k for k in ("prompts", "file", "configMap", "synthetic") if k in d]
    if len(given) != 1:
        raise SpecError(path, f"needs exactly one of prompts, file, configMap or synthetic, got {given or 'none'}")
    if "pvc" in d and "file" not in d:
        raise SpecError(f"{path}.pvc", "is only used together with file")
    if "prompts" in d:
        at = range(len(d["prompts"])) if where is None else where
        prompts = tuple(Prompt(id=f"prompt-{i}", messages=({"role": "user", "content": p},))
                        for i, p in zip(at, d["prompts"]))
        return InputSpec(prompts=prompts)
    if "synthetic" in d:
        syn = Synthetic(d["synthetic"]["count"], d["synthetic"]["promptLength"])
        return InputSpec(prompts=synthetic_prompts(syn), synthetic=syn)
    if "configMap" in d:
        return InputSpec(config_map=ConfigMapKey(d["configMap"]["name"], d["configMap"]["key"]))
    return InputSpec(file=d["file"], pvc=(d.get("pvc") or {}).get("claimName"))


def synthetic_prompts(syn: Synthetic) -> tuple[Prompt, ...]:
    """Deterministic token-id prompts (ids 3..1002, inside every preset's vocabulary)."""
    return tuple(Prompt(id=f"synthetic-{i}", token_ids=tuple((7 * i + 13 * j) % 1000 + 3
                                                             for j in range(syn.prompt_length)))
                 for i in range(syn.count))


def _offload(d: dict, path: str) -> OffloadSpec:
    explicit = d["policy"] == "explicit"
    given = [k for k in ("weights", "kv", "activations") if k in d]
    if not explicit and given:
        raise SpecError(f"{path}.{given[0]}", "needs spec.offload.policy: explicit (policy auto picks the split)")
    if explicit:
        for k in ("weights", "kv"):
            if k not in d:
                raise SpecError(f"{path}.{k}", "is required when spec.offload.policy is explicit")
    splits = {k: Split(**d[k]) for k in given}
    if d["reduce"] == "ring" and d["tensorParallel"] <= 1:
        raise SpecError(f"{path}.reduce", "ring needs spec.offload.tensorParallel > 1 (one ring directory per rank)")
    kv = splits.get("kv", OffloadSpec.kv)
    if explicit:
        if max(kv.gpu, kv.cpu, kv.disk) != 100:
            raise SpecError(f"{path}.kv", "must put 100 on one of gpu, cpu or disk (the KV cache is not split "
                                          f"across tiers), got gpu {kv.gpu}, cpu {kv.cpu}, disk {kv.disk}")
        if d["cpuAttention"] and kv.cpu != 100:
            raise SpecError(f"{path}.cpuAttention", "needs the KV cache in CPU memory (spec.offload.kv: {cpu: 100})")
        if d["kvWriteBack"] and kv.disk != 100:
            raise SpecError(f"{path}.kvWriteBack", "needs the KV cache on disk (spec.offload.kv: {disk: 100})")
    return OffloadSpec(policy=d["policy"], weights=splits.get("weights", OffloadSpec.weights), kv=kv,
                       activations=splits.get("activations", OffloadSpec.activations),
                       gpu_batch_size=d.get("gpuBatchSize"), num_gpu_batches=d.get("numGpuBatches"),
                       kv_write_back=d["kvWriteBack"], x_cache=d["xCache"], cpu_attention=d["cpuAttention"],
                       compression=d["compression"], sparsity=d["sparsity"], tensor_parallel=d["tensorParallel"],
                       reduce=d["reduce"], expert_cache=d["expertCache"], expert_prefetch=d["expertPrefetch"])


def _output(d: dict, path: str) -> OutputSpec:
    if "pvc" in d and "configMap" in d:
        raise SpecError(path, "takes at most one of pvc or configMap")
    return OutputSpec(path=d.get("path"), pvc=(d.get("pvc") or {}).get("claimName"),
                      config_map=(d.get("configMap") or {}).get("name"))


# -------------------------------------------------------------------------------------------- canonical


def to_canonical(spec: JobSpec) -> dict[str, Any]:
    """The spec with every default filled in, as the CRD spells it: what the operator hands the pod."""
    inp: dict[str, Any] = {}
    src = spec.input.source
    if src == "prompts":
        inp["prompts"] = [p.messages[0]["content"] for p in spec.input.prompts]
    elif src == "synthetic":
        inp["synthetic"] = {"count": spec.input.synthetic.count, "promptLength": spec.input.synthetic.prompt_length}
    elif src == "configMap":
        inp["configMap"] = {"name": spec.input.config_map.name, "key": spec.input.config_map.key}
    else:
        inp["file"] = spec.input.file
        if spec.input.pvc:
            inp["pvc"] = {"claimName": spec.input.pvc}
    o, r, g = spec.offload, spec.resources, spec.generation
    offload: dict[str, Any] = {"policy": o.policy, "kvWriteBack": o.kv_write_back, "xCache": o.x_cache,
                               "cpuAttention": o.cpu_attention, "compression": o.compression,
                               "sparsity": "off" if o.sparsity is None else o.sparsity,
                               "tensorParallel": o.tensor_parallel, "expertCache": o.expert_cache,
                               "expertPrefetch": o.expert_prefetch,
                               **({"reduce": o.reduce} if o.reduce != "auto" else {})}
    if o.policy == "explicit":
        for k in ("weights", "kv", "activations"):
            sp = getattr(o, k)
            offload[k] = {"gpu": sp.gpu, "cpu": sp.cpu, "disk": sp.disk}
    for key, v in (("gpuBatchSize", o.gpu_batch_size), ("numGpuBatches", o.num_gpu_batches)):
        if v is not None:
            offload[key] = v
    resources: dict[str, Any] = {"gpus": r.gpus, "kvDisk": r.kv_disk}
    for key, v in (("gpuMemory", r.gpu_memory), ("cpuMemory", r.cpu_memory)):
        if v is not None:
            resources[key] = v
    out: dict[str, Any] = {
        "model": {"uri": spec.model.uri, "dtype": spec.model.dtype, "quantization": spec.model.quantization},
        "input": inp,
        "generation": {"maxNewTokens": g.max_new_tokens, "temperature": g.temperature, "topP": g.top_p,
                       "seed": g.seed, "stop": list(g.stop)},
        "resources": resources, "offload": offload, "cache": {"prefix": spec.cache.prefix},
        "backoffLimit": spec.backoff_limit}
    output = {k: v for k, v in (("path", spec.output.path),
                                ("pvc", spec.output.pvc and {"claimName": spec.output.pvc}),
                                ("configMap", spec.output.config_map and {"name": spec.output.config_map})) if v}
    if output:
        out["output"] = output
    if spec.image:
        out["image"] = spec.image
    if spec.parallelism != 1:
        out["parallelism"] = spec.parallelism
    if spec.shard is not None:
        out["shard"] = {"index": spec.shard.index, "count": spec.shard.count}
        if spec.shard.prompt_index is not None:
            out["shard"]["promptIndex"] = list(spec.shard.prompt_index)
    return out


def from_canonical(data: Any, *, name: str, namespace: str) -> JobSpec:
    """Read back what `to_canonical` wrote (checked by the same parser: the pod trusts no transport)."""
    return parse_job_spec(data, name=name, namespace=namespace, path="spec")


def kv_disk_bytes(spec: Mapping[str, Any] | None) -> int:
    """spec.resources.kvDisk of a stored InferenceJob (the default when absent), for readers of raw objects."""
    raw = ((spec or {}).get("resources") or {}).get("kvDisk")
    return parse_quantity(DEFAULT_KV_DISK if raw is None else raw, path="spec.resources.kvDisk")


# The whole object, for the CRD (status is written by the operator and the agent; see flashnode.py for theirs).
from kubeflash_api.status import JOB_STATUS  # noqa: E402  (the status schema is long; it lives beside)

OBJECT = s.obj("An LLM inference batch whose weights stream layer by layer from a GPU's paired SSD.",
               ("apiVersion", s.string("kubeflash.io/v1alpha1.")), ("kind", s.string("InferenceJob.")),
               ("metadata", METADATA), ("spec", SPEC), ("status", JOB_STATUS), required=("spec",),
               rules=((f"self.metadata.name.size() <= {MAX_JOB_NAME}",
                       f"metadata.name must be at most {MAX_JOB_NAME} characters (its pods are named "
                       f"<name>-<attempt>)"),))


def check_cluster(spec: JobSpec) -> JobSpec:
    """What a cluster cannot run although the manifest is valid (kubeflash run can): refused by field path."""
    if spec.input.file and not spec.input.pvc:
        raise SpecError("spec.input.pvc", "is required in a cluster with spec.input.file (the claim that holds the "
                                          "file; without one the file is read next to the manifest, which only "
                                          "kubeflash run can do); or use spec.input.configMap")
    if spec.parallelism > 1:
        if spec.output.path and not spec.output.pvc:
            raise SpecError("spec.output.path", "needs spec.output.pvc with spec.parallelism > 1 (the shards run on "
                                                "different nodes: their part files meet on a claim every one of "
                                                "them can mount, ReadWriteMany), or use spec.output.configMap")
        longest = f"{spec.name}-s{spec.parallelism - 1}"
        if len(longest) > MAX_JOB_NAME:
            raise SpecError("metadata.name", f"is too long for spec.parallelism {spec.parallelism}: its shard jobs "
                                             f"are named <name>-s<k> ({longest!r} has {len(longest)} characters, "
                                             f"at most {MAX_JOB_NAME})")
    return spec
