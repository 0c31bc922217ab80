"""Run one InferenceJob on this machine: tokenize, skip prompts already done, generate, append results,
keep progress.json current, and return the report. Shared by `kubeflash run` and the inference pod.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from kubeflash_api import JobSpec, SpecError
from ..store.format import atomic_write_json
from .generate import Engine, GenParams
from .policy import Policy, make_policy
from .report import build_report
from .results import ResultsFile, fingerprints, is_chat


@dataclass
class Tokenized:
    ids: list[list[int]]
    tokenizer: object | None


@dataclass(frozen=True)
class Machine:
    """What the automatic policy plans against: measured ceilings (bench.Ceilings) and memory budgets (bytes)."""

    ceilings: object
    gpu_bytes: int
    cpu_bytes: int


def probe_ceilings(probe: dict, measured: dict):
    """bench.Ceilings for an inference pod: the node agent's probe of the placed pair (KUBEFLASH_PROBE:
    diskReadGBps, diskWriteGBps, h2dGBps), completed by what the pod measured itself (`measured`: bench's keys,
    PCIe and matmul always, the disk when the agent had not). Without a page-cache figure the warm disk rate is
    taken as the cold one (no help from the page cache is assumed)."""
    from .bench import Ceilings

    c = Ceilings(**{k: v for k, v in measured.items() if k in Ceilings.__dataclass_fields__})
    named = {"diskReadGBps": "disk_read_cold", "diskWriteGBps": "disk_write", "h2dGBps": "h2d_pinned"}
    for key, value in probe.items():
        if key not in named:
            raise ValueError(f"KUBEFLASH_PROBE: unknown key {key!r}; expected {', '.join(named)}")
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"KUBEFLASH_PROBE.{key} must be a positive number of GB/s, got {value!r}")
        setattr(c, named[key], float(value))
    if "disk_read_warm" not in measured:
        c.disk_read_warm = c.disk_read_cold
    return c


def pod_machine(probe_env: str | None, scratch: Path) -> Machine:
    """The Machine an inference pod plans `policy: auto` against on a GPU: the agent's probe (measuring the
    disk under `scratch` only if the agent did not), PCIe and matmul measured here (~1 s), the GPU's memory and
    the host memory left to the pod (its cgroup limit or MemAvailable, the smaller)."""
    import json

    from .bench import measure_disk, measure_matmul, measure_pcie
    from .memory import gpu_total, mem_available

    try:
        probe = json.loads(probe_env) if probe_env else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"KUBEFLASH_PROBE is not JSON ({e}): the operator writes it from the FlashNode") from None
    if not isinstance(probe, dict):
        raise ValueError("KUBEFLASH_PROBE must be a JSON object")
    measured = measure_pcie(256 << 20) | measure_matmul(4096)
    if not probe.get("diskReadGBps") or not probe.get("diskWriteGBps"):
        measured |= measure_disk(scratch, 256 << 20, thread_options=(8,))
    cpu = mem_available()
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and limit.read_text().strip().isdigit():
        cpu = min(cpu, int(limit.read_text()))
    return Machine(probe_ceilings(probe, measured), gpu_total(), cpu)


def pinned(offload, config):
    """The cost model's filter for what the manifest pins under policy auto: the batch shape and the INF²
    switches (xCache: on wherever X is smaller than K + V, so it pins nothing for a GQA model)."""
    from .costmodel import x_cache_saves

    want_x = offload.x_cache and x_cache_saves(config)

    def keep(p: Policy) -> bool:
        return ((offload.gpu_batch_size is None or p.gpu_batch_size == offload.gpu_batch_size)
                and (offload.num_gpu_batches is None or p.num_gpu_batches == offload.num_gpu_batches)
                and (not offload.cpu_attention or p.cpu_attention) and (not offload.kv_write_back or p.kv_write_back)
                and (not want_x or p.x_cache_percent > 0))
    return keep


def job_shape(prompts: list[list[int]], gen_len: int):
    """The cost model's view of the prompts still to run (costmodel.JobShape)."""
    from .costmodel import JobShape

    return JobShape(prompts=len(prompts), prompt_len=max(len(p) for p in prompts), gen_len=gen_len)


def auto_plan(spec: JobSpec, *, manifest, job, machine: Machine):
    """The cost model's plan for `job` (costmodel.JobShape) on this machine (costmodel.Plan): placement, batch
    shape and the exact techniques; the store's quantization and the KV compression stay as the manifest says."""
    from ..store.modelconfig import ModelConfig
    from .costmodel import QUANT_BITS, Budget, plan, stage_sizes

    config = ModelConfig.from_dict(manifest.config)
    itemsize = 4 if manifest.dtype == "float32" else 2
    q = spec.model.quantization
    dense = stage_sizes(config, itemsize, q)[1]
    ceil = machine.ceilings
    base = make_policy(ceil)
    kv_bits = QUANT_BITS[spec.offload.compression]
    try:
        return plan(config=config, ceil=ceil, job=job,
                    budget=Budget(machine.gpu_bytes, machine.cpu_bytes, spec.resources.kv_disk),
                    sizes={q: (manifest.stage_bytes, dense)}, quantizations=(q,), kv_bits=(kv_bits,), base=base,
                    keep=pinned(spec.offload, config), itemsize=itemsize)
    except ValueError as e:  # nothing fits: say which manifest fields set the budgets
        raise SpecError(f"{e} (the budgets: spec.resources.gpuMemory, cpuMemory and kvDisk, within what this "
                        f"machine has; and what spec.offload pins)") from None


def _within_resources(spec: JobSpec, machine: Machine | None, device: str) -> Machine | None:
    """Apply spec.resources.gpuMemory / cpuMemory: the plan's budgets shrink to them, and on a GPU the caching
    allocator is capped at gpuMemory (an allocation beyond it fails as out of memory)."""
    r = spec.resources
    if r.gpu_memory and device.startswith("cuda"):
        from .memory import cap_gpu_allocator

        cap_gpu_allocator(r.gpu_memory, device)
    if machine is None:
        return None
    return replace(machine, gpu_bytes=min(machine.gpu_bytes, r.gpu_memory or machine.gpu_bytes),
                   cpu_bytes=min(machine.cpu_bytes, r.cpu_memory or machine.cpu_bytes))


def check_kv_disk(spec: JobSpec, policy: Policy, *, manifest, job) -> None:
    """Refuse, before anything runs, a policy whose KV files would outgrow spec.resources.kvDisk (the room the
    operator reserved for this job on the paired SSD); `job` is the costmodel.JobShape still to run."""
    from kubeflash_api.quantity import human
    from ..store.modelconfig import ModelConfig
    from .costmodel import Candidate, kv_disk_bytes

    need = kv_disk_bytes(Candidate(policy), config=ModelConfig.from_dict(manifest.config), job=job,
                         itemsize=4 if manifest.dtype == "float32" else 2)
    have = spec.resources.kv_disk
    if need > have:
        raise SpecError(f"spec.resources.kvDisk: the KV cache on disk needs {human(need)} for blocks of "
                        f"{min(policy.block_size, job.prompts)} prompts x {job.prompt_len + job.gen_len} tokens, "
                        f"more than the {human(have)} reserved; raise kvDisk, or lower spec.offload.gpuBatchSize"
                        f" x numGpuBatches, or move the KV cache (spec.offload.kv)")


def policy_for(spec: JobSpec, *, n_prompts: int, device: str, config=None) -> Policy:
    """Policy from the manifest: explicit percentages as given; for auto without measured ceilings (run_job
    plans with the cost model when it has them) the default streaming policy."""
    o = spec.offload
    g = o.gpu_batch_size or min(8, max(1, n_prompts))
    nb = o.num_gpu_batches or 1
    from .costmodel import QUANT_BITS

    kv_bits = QUANT_BITS[o.compression]  # weights: spec.model.quantization
    if o.policy == "auto":  # the INF² switches pick the KV tier they need
        kv_tier = "cpu" if o.cpu_attention else "disk" if o.kv_write_back else "device"
        return make_policy(gpu_batch_size=g, num_gpu_batches=nb, kv_bits=kv_bits, kv=kv_tier,
                           cpu_attention=o.cpu_attention, kv_write_back=o.kv_write_back)
    kv = {"gpu": "device", "cpu": "cpu", "disk": "disk"}
    full = [t for t in ("gpu", "cpu", "disk") if getattr(o.kv, t) == 100]
    if not full:
        raise SpecError("spec.offload.kv: splitting the KV cache across tiers is not supported; put 100 in one of gpu, cpu, disk")
    if o.cpu_attention and full[0] != "cpu":
        raise SpecError("spec.offload.cpuAttention needs the KV cache in CPU memory (spec.offload.kv: {cpu: 100})")
    if o.kv_write_back and full[0] != "disk":
        raise SpecError("spec.offload.kvWriteBack needs the KV cache on disk (spec.offload.kv: {disk: 100})")
    return make_policy(gpu_batch_size=g, num_gpu_batches=nb, weights_gpu_percent=o.weights.gpu,
                       weights_cpu_percent=o.weights.cpu, kv=kv[full[0]], kv_bits=kv_bits,
                       cpu_attention=o.cpu_attention, kv_write_back=o.kv_write_back,
                       x_cache_percent=100.0 if o.x_cache and _x_saves(spec, kv_bits, config) else 0.0)


def _x_saves(spec: JobSpec, kv_bits: int, config) -> bool:
    """xCache under an explicit policy: every layer, where X is smaller than K + V (never for GQA models)."""
    from ..store.convert import open_source
    from ..store.modelconfig import preset
    from .costmodel import x_cache_fits, x_cache_saves

    uri = spec.model.uri
    if config is None:
        config = preset(uri.split(":", 1)[1]) if uri.startswith(("dummy:", "builtin:")) else open_source(uri).config
    return x_cache_saves(config) and x_cache_fits(config, kv_bits)


def load_tokenizer(model_dir: Path, manifest):
    if not manifest.tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(model_dir) / manifest.tokenizer))


def tokenize(spec: JobSpec, tokenizer) -> list[list[int]]:
    out = []
    for p in spec.input.prompts:
        if p.token_ids is not None:
            out.append(list(p.token_ids))
        elif tokenizer is None:
            raise SpecError(f"spec.input: prompt {p.id!r} is text but model {spec.model.uri} has no tokenizer "
                            f"(dummy models take spec.input.synthetic)")
        elif p.messages is not None and getattr(tokenizer, "chat_template", None):
            out.append(list(tokenizer.apply_chat_template(list(p.messages), tokenize=True, add_generation_prompt=True,
                                                          return_dict=True)["input_ids"]))
        else:
            text = p.text if p.text is not None else "\n".join(m["content"] for m in p.messages)
            out.append(tokenizer(text)["input_ids"])
    return out


class Progress:
    """progress.json in the job directory (rewritten atomically), read by the node agent: the prompts that have a
    result and those results' completion tokens (as results.jsonl holds them); the rate counts this run's."""

    def __init__(self, job_dir: Path | None, total: int, done: int, tokens: int = 0):
        self.path = Path(job_dir) / "progress.json" if job_dir else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total, self.done, self.tokens, self.t0 = total, done, tokens, time.perf_counter()
        self.tokens0 = tokens

    def write(self, phase: str, timings: dict | None = None, message: str = "") -> None:
        if self.path is None:
            return
        dt = time.perf_counter() - self.t0
        atomic_write_json(self.path, {
            "phase": phase, "promptsDone": self.done, "promptsTotal": self.total, "tokens": self.tokens,
            "tokensPerSecond": round((self.tokens - self.tokens0) / dt, 3) if dt > 0 else 0.0,
            "timings": timings or {},
            "message": message, "updated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})


def run_job(spec: JobSpec, *, model_dir: Path, manifest, output: Path, device: str = "cpu",
            job_dir: Path | None = None, policy: Policy | None = None, machine: Machine | None = None,
            on_tokens: Callable[[int], None] | None = None, on_prompts: Callable[[int], None] | None = None) -> dict:
    """Generate every prompt of `spec` without a result of the same fingerprint in `output` (results.py); returns
    the report dict. `output` is left untouched until the first new result is written."""
    tokenizer = load_tokenizer(model_dir, manifest)
    ids = tokenize(spec, tokenizer)
    results = ResultsFile(output, fingerprints(spec, manifest=manifest, device=device), model=spec.model.uri)
    todo = [i for i, p in enumerate(spec.input.prompts) if p.id not in results.done]
    progress = Progress(job_dir, total=len(ids), done=len(ids) - len(todo), tokens=results.kept_tokens)
    progress.write("running")
    if not todo:
        results.commit()  # sets aside the lines of prompts no longer in the job
        results.close()
        progress.write("done", message="every prompt already has a result")
        return {"skipped": len(ids), "generated_tokens": 0}
    g = spec.generation
    max_new = max([g.max_new_tokens] + [spec.input.prompts[i].max_tokens or 0 for i in todo])
    chosen = None
    machine = _within_resources(spec, machine, device)
    shape = job_shape([ids[i] for i in todo], max_new)
    if policy is None and spec.offload.policy == "auto" and machine is not None:
        chosen = auto_plan(spec, manifest=manifest, job=shape, machine=machine)
        policy = chosen.best.candidate.policy
    if policy is None:
        from ..store.modelconfig import ModelConfig

        policy = policy_for(spec, n_prompts=len(todo), device=device, config=ModelConfig.from_dict(manifest.config))
    check_kv_disk(spec, policy, manifest=manifest, job=shape)
    engine = Engine(model_dir, policy=policy, device=device, job_dir=job_dir)
    eos = tuple(engine.config.eos_token_id) + ((tokenizer.eos_token_id,) if tokenizer is not None
                                                and tokenizer.eos_token_id is not None else ())
    params = GenParams(max_new_tokens=max_new, temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                       eos_token_ids=tuple(sorted(set(eos))))
    limits = [spec.input.prompts[i].max_tokens or g.max_new_tokens for i in todo]

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""

    def stop(k: int, tokens: list[int]) -> bool:
        if len(tokens) >= limits[k]:
            return True
        return bool(g.stop) and any(s in decode(tokens[-16:]) or s in decode(tokens) for s in g.stop)

    def on_block(done) -> None:
        for c in done:
            p = spec.input.prompts[todo[c.index]]
            text = decode(c.tokens)
            reason = c.finish_reason
            if len(c.tokens) >= limits[c.index] and reason == "stop" and not _hit_stop(text, g.stop):
                reason = "length"
            for s in g.stop:
                if s in text:
                    text, reason = text[:text.index(s)], "stop"
            results.append(p.id, text, chat=is_chat(p), finish_reason=reason, prompt_tokens=len(ids[todo[c.index]]),
                           completion_tokens=len(c.tokens), token_ids=c.tokens)
        progress.done += len(done)
        progress.tokens += sum(len(c.tokens) for c in done)
        progress.write("running", timings=_timings(engine))
        if on_prompts:
            on_prompts(len(done))

    def on_step(n: int) -> None:
        if on_tokens:
            on_tokens(n)

    try:
        engine.generate([ids[i] for i in todo], params, stop=stop, on_block=on_block, on_step=on_step)
        report = build_report(engine)
        if chosen is not None:
            from .costmodel import describe

            report["plan"] = {"chosen": describe(chosen.best), "why": chosen.best.why(),
                              "predicted_s": chosen.best.run_s, "considered": chosen.considered}
        progress.write("done", timings=_timings(engine))
        return report
    except BaseException as e:
        progress.write("failed", timings=_timings(engine), message=str(e)[:500])
        raise
    finally:
        results.close()
        engine.close()


def _hit_stop(text: str, stops) -> bool:
    return any(s in text for s in stops)


def _timings(engine) -> dict:
    t = engine.timings
    return {k: round(t.mean(k), 6) for k in ("load_weight", "compute_layer_prefill", "compute_layer_decode",
                                             "load_cache_decode", "store_cache_decode") if t.count[k]}
