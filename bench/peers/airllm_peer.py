#!/usr/bin/env python3
"""Peer benchmark: AirLLM (4.0.0) layer streaming of an OPT or Llama shape with dummy fp16 weights, one JSON result
and a timestamped log of every phase.

    python bench/peers/airllm_peer.py --model opt-13b --dir /root/air13 --json OUT.json --log OUT.log \\
        --prompts 16 --prompt-len 512 --gen-len 4 --gpu-memory 12GiB [--cold] [--time-limit 360]
    python bench/peers/airllm_peer.py --model opt-13b --dir /root/air13 --log OUT.log --setup-only

AirLLM is not a dependency of kubeflash: carry its wheel (`pip download --no-deps airllm==4.0.0`) to the GPU machine,
whose image has the rest (transformers, accelerate, safetensors, huggingface_hub, tqdm).

What is measured: one greedy `generate` of AirLLM's model (B random prompts of P tokens, exactly G new tokens each),
wall time from the call to its return with the GPU synchronized; prefill_s is up to the first token's logits,
decode_s the rest. Every forward pass (the prefill, then one per further token) is logged with its time, the bytes
AirLLM read and how long its reads took on its prefetch thread (`load_layer_to_cpu`: safetensors' mmap-backed
load plus, on CUDA, the copy into pinned memory, which is where the file pages are faulted in), the main thread's
time in AirLLM's per-layer pre-hooks (waiting for that prefetch, copying to the GPU) and post-hooks (its
gc.collect/malloc_trim/empty_cache after every layer), and whether the last logits are finite.

KV cache (read in AirLLM 4.0.0's airllm_base.py, confirmed on CPU by airllm_check.py): AirLLM's `generate` is
transformers' own `generate` on the real model built on the meta device, with forward hooks that load each
module's weights before it runs and drop them after. transformers keeps its KV cache (use_cache defaults on), so
the prefill runs the whole prompt once and each later token runs one position per sequence; but every forward
re-reads every layer's weights from its file, so G generated tokens read the whole model G times. At opt-13b
(25.7 GB of fp16) and G = 4 that is 103 GB read: about 79 s if AirLLM reads at a 1.3 GB/s disk's cold rate, more
where its reads (page faults on safetensors' memory map, one thread) fall short of that rate; the log says which.

How the weights are served (set-up, untimed; --setup-only does it alone, e.g. outside a cgroup): AirLLM runs from
its own split, one safetensors file per module named `<module>.safetensors` plus an empty
`<module>.safetensors.done` marker in DIR/splitted_model, and `find_or_create_local_splitted_path` skips its split
when every module the checkpoint index names has both files. So this script writes those files directly: DIR gets
config.json, then DIR/splitted_model/* (each file to a temporary name, fsynced, renamed, then its marker), and
model.safetensors.index.json last, mapping every tensor to its split file (transformers loads the same folder).
No Hugging Face checkpoint is written and nothing is split or copied. The values: every distinct tensor shape gets
one buffer of N(0, 0.02^2) fp16 values drawn once from a generator seeded by --seed, reused for each tensor of that
shape (all decoder layers hold the same values, q/k/v/out projections share one buffer, lm_head equals the token
embedding); LayerNorm/RMSNorm weights are 1, biases 0. They are not all zero, and the run checks that every
forward's logits are finite in fp16 (airllm_check.py --fp16-shape checks it on CPU at a real shape). The files
are real bytes on disk, read back like any checkpoint. --via-checkpoint instead writes a Hugging Face checkpoint
(one shard per decoder layer, fresh random values per tensor) and lets AirLLM split it, which hard-links the
one-layer shards and copies only the embeddings, norm and head (airllm_check.py checks that both ways give the
same file layout: names, tensors, shapes, dtypes).

Warm-up: one untimed 1-token generate on an 8-token prompt through a one-decoder-layer view of the same files
(DIR/warmup: its config says 1 layer, its split files are hard links), which pays CUDA's and AirLLM's first-use
costs (CUDA context, cuBLAS, pinned host buffers of the layer's sizes) without reading the whole model once more.
--cold then drops the page cache before the timed run.

Adapting AirLLM (said here because it changes what runs): its generic streamer names the Llama-style modules
(model.embed_tokens, model.layers, model.norm, lm_head). For OPT this script gives it OPT's names (model.decoder.*)
and keeps the learned positional embedding resident (AirLLM's `resident` list, loaded once); OPT's output projection
is untied (its own lm_head tensor) so AirLLM streams it like the other heads. No tokenizer is written: the prompts
are token ids, so the tokenizer AirLLM would load is skipped.

Stopping early: --time-limit S (SIGALRM) or a SIGTERM (e.g. from `timeout`) stops the run; the JSON is then
written with "complete": false, the phases and forwards finished so far, and the exit status is 124.

Result JSON: system, versions, model, device, prompts, prompt_len, gen_len, prefill_s, decode_s, total_s,
generated_tokens, tokens_per_s, gpu_peak_bytes, gpu_memory_cap_bytes, weights_bytes, weights_written_by,
page_cache, complete, phases ({name: seconds}), forwards ([{tokens, seconds, read_bytes, read_s, pre_hook_s,
post_hook_s, logits_finite}]).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from accelerate_opt import PRESETS as OPT_PRESETS
from accelerate_opt import opt_config
from peer_common import add_workload_args, cap_gpu_memory, check_workload, timed_generate, timed_run, write_result
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from kubeflash_node.store.format import fsync_dir

AIRLLM_MAX_SEQ = 4096  # the sequence length AirLLM's model is built for (prompt + generated tokens)
SPLIT = "splitted_model"  # AirLLM's folder of per-module files
INDEX = "model.safetensors.index.json"
GB = 1e9
# name: (hidden, layers, heads, kv heads, ffn, vocab, positions); llama-tiny is for tests
LLAMA_PRESETS = {
    "llama-3-8b": (4096, 32, 32, 8, 14336, 128256, 8192),
    "llama-tiny": (64, 2, 4, 2, 128, 1000, 512),
}


def hf_config(preset: str):
    if preset in OPT_PRESETS:
        c = opt_config(preset)
        c.tie_word_embeddings = False
    else:
        hidden, layers, heads, kv, ffn, vocab, pos = LLAMA_PRESETS[preset]
        c = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=pos,
                        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2)
    c.torch_dtype = "float16"
    c.architectures = [type(c).__name__.replace("Config", "ForCausalLM")]
    return c


def layer_names(preset: str) -> dict:
    """AirLLM's `layer_names_dict` for this shape: the modules it streams, in order, and the resident ones."""
    if preset in OPT_PRESETS:
        return {"embed": "model.decoder.embed_tokens", "layer_prefix": "model.decoder.layers",
                "norm": "model.decoder.final_layer_norm", "lm_head": "lm_head",
                "resident": ["model.decoder.embed_positions"]}
    return {"embed": "model.embed_tokens", "layer_prefix": "model.layers", "norm": "model.norm", "lm_head": "lm_head"}


def empty_state(config) -> dict[str, torch.Tensor]:
    """The fp16 model's tensors on the meta device (names, shapes; no memory)."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config).half().state_dict()


# ---- the log ---------------------------------------------------------------------------------------------------


class PhaseLog:
    """Timestamped lines to stdout and (appended) to a log file; remembers each phase's seconds for the JSON."""

    def __init__(self, path: Path | None):
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a", buffering=1)

    def __call__(self, message: str) -> None:
        now = datetime.now(timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        line = f"{now} +{time.perf_counter() - self.t0:7.1f}s {message}"
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")

    @contextlib.contextmanager
    def phase(self, name: str, what: str):
        """Log `what` starting, then its duration; the seconds land in self.phases[name]."""
        self(f"{name}: {what} ...")
        start = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - start
        self(f"{name}: done in {self.phases[name]:.1f} s")

    def quiet(self):
        """Send what third-party code prints (AirLLM's progress lines) to the log file only."""
        return contextlib.redirect_stdout(self.file) if self.file else contextlib.nullcontext()


# ---- the weights -----------------------------------------------------------------------------------------------


def _owner(name: str, modules: list[str]) -> str | None:
    """The module file a tensor goes to: the longest module prefix (with its dot) that names it, as AirLLM's split."""
    owners = [m for m in modules if name.startswith(m + ".")]
    return max(owners, key=len) if owners else None


def split_modules(config, preset: str, tensors) -> dict[str, list[str]]:
    """{module: its tensor names} in AirLLM's split layout, in AirLLM's order (embed, layers, norm, head, residents).
    Refuses a tensor no module owns (AirLLM would leave it on the meta device)."""
    names = layer_names(preset)
    modules = [names["embed"], *(f"{names['layer_prefix']}.{i}" for i in range(config.num_hidden_layers)),
               names["norm"], names["lm_head"], *names.get("resident", [])]
    out: dict[str, list[str]] = {m: [] for m in modules}
    for name in tensors:
        owner = _owner(name, modules)
        if owner is None:
            raise SystemExit(f"tensor {name!r} of {preset} belongs to none of AirLLM's modules {modules}")
        out[owner].append(name)
    return {m: t for m, t in out.items() if t}


def _write_atomic(path: Path, write) -> None:
    """`write(tmp_path)`, fsync, rename onto `path` (nothing half-written under the real name)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write fp16 `tensors` in the safetensors format (8-byte little-endian header length, JSON header padded with
    spaces to 8 bytes, then each tensor's bytes in order), straight from their memory: tensors may share one buffer,
    which safetensors' save_file refuses, and nothing is copied into one big bytes object first."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        if t.dtype != torch.float16 or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous float16 tensor, got {t.dtype}")
        size = t.numel() * 2
        header[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            f.write(memoryview(t.view(torch.uint8).numpy()))


def split_complete(folder: Path, modules) -> bool:
    """AirLLM's own test for "already split": every module's file and its .done marker exist."""
    split = folder / SPLIT
    return all((split / f"{m}.safetensors").is_file() and (split / f"{m}.safetensors.done").is_file()
               for m in modules)


def _index_matches(folder: Path, tensors, what: str) -> bool:
    """True if DIR's index names exactly these tensors; False if there is none; refuses another model's index."""
    index_file = folder / INDEX
    if not index_file.is_file():
        return False
    if set(json.loads(index_file.read_text())["weight_map"]) != set(tensors):
        raise SystemExit(f"{index_file} describes another model than {what}: pass an empty --dir")
    return True


def dummy_values(seed: int = 0):
    """`value(name, shape)` -> the fp16 tensor the direct split writes for that tensor: zeros for biases, ones for
    norms, else one N(0, 0.02^2) buffer per distinct shape, drawn once (in first-asked order) and reused."""
    generator = torch.Generator().manual_seed(seed)
    buffers: dict[tuple[int, ...], torch.Tensor] = {}

    def value(name: str, shape) -> torch.Tensor:
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=torch.float16)
        if "norm" in name:
            return torch.ones(shape, dtype=torch.float16)
        key = tuple(shape)
        if key not in buffers:
            buffers[key] = torch.empty(key, dtype=torch.float16).normal_(0.0, 0.02, generator=generator)
        return buffers[key]

    return value


def ensure_split(config, preset: str, folder: Path, seed: int = 0, log=print) -> bool:
    """Write AirLLM's split files for the dummy model straight into `folder` (module docstring), unless its index
    already describes this model and every split file is there. True if written."""
    tensors = empty_state(config)
    modules = split_modules(config, preset, tensors)
    what = f"{config.architectures[0]} with {config.num_hidden_layers} layers"
    if _index_matches(folder, tensors, what):
        if split_complete(folder, modules):
            return False
        (folder / INDEX).unlink()  # written last: without it the folder is rewritten below
    split = folder / SPLIT
    split.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    value = dummy_values(seed)
    total = sum(2 * t.numel() for t in tensors.values())
    start = time.perf_counter()
    weight_map = {}
    done = 0
    for i, (module, names) in enumerate(modules.items()):
        out = {name: value(name, tensors[name].shape) for name in names}
        (split / f"{module}.safetensors.done").unlink(missing_ok=True)
        _write_atomic(split / f"{module}.safetensors", lambda tmp, out=out: write_safetensors(out, tmp))
        (split / f"{module}.safetensors.done").touch()
        weight_map.update(dict.fromkeys(names, f"{SPLIT}/{module}.safetensors"))
        done += sum(2 * v.numel() for v in out.values())
        if i % 10 == 9 or i == len(modules) - 1:
            log(f"  {i + 1}/{len(modules)} module files, {done / GB:.1f} of {total / GB:.1f} GB, "
                f"{done / GB / (time.perf_counter() - start):.2f} GB/s")
    fsync_dir(split)
    _write_atomic(folder / INDEX, lambda tmp: tmp.write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)))
    fsync_dir(folder)
    return True


def _shard_of(name: str) -> str:
    """The HF checkpoint shard a tensor goes to: one per decoder layer, one for everything else."""
    parts = name.split(".")
    if "layers" in parts:
        return f"layer-{int(parts[parts.index('layers') + 1]):05d}"
    return "other"


def ensure_checkpoint(config, folder: Path, seed: int = 0) -> bool:
    """Write a dummy Hugging Face checkpoint into `folder` (fresh N(0, 0.02^2) values per tensor, norms 1, biases
    0), for AirLLM to split itself, unless its index already describes this model; True if written."""
    tensors = empty_state(config)
    if _index_matches(folder, tensors, f"{config.architectures[0]} with {config.num_hidden_layers} layers"):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards: dict[str, list[str]] = {}
    for name in tensors:
        shards.setdefault(_shard_of(name), []).append(name)
    weight_map = {}
    files = {shard: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, shard in enumerate(shards)}  # HF's names
    with tqdm(total=sum(2 * t.numel() for t in tensors.values()), unit="B", unit_scale=True,
              desc=f"dummy HF checkpoint -> {folder}") as bar:
        for shard, names in shards.items():
            out = {}
            for name in names:
                value = torch.empty(tensors[name].shape, dtype=torch.float16)
                if name.endswith(".bias"):
                    value.zero_()
                elif "norm" in name:
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, 0.02, generator=generator)
                out[name] = value
                weight_map[name] = files[shard]
                bar.update(2 * value.numel())
            _write_atomic(folder / files[shard],
                          lambda tmp, out=out: save_file(out, str(tmp), metadata={"format": "pt"}))
    config.save_pretrained(folder)
    total = sum(2 * t.numel() for t in tensors.values())
    # last: a folder without the index is rewritten from scratch
    _write_atomic(folder / INDEX, lambda tmp: tmp.write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)))
    return True


def warmup_view(config, preset: str, folder: Path) -> Path:
    """DIR/warmup: a one-decoder-layer model over the same split files (hard links, or symlinks across file systems),
    for the warm-up. Returns its folder."""
    small = type(config).from_dict(config.to_dict())
    small.num_hidden_layers = 1
    view = folder / "warmup"
    tensors = empty_state(small)
    modules = split_modules(small, preset, tensors)
    (view / SPLIT).mkdir(parents=True, exist_ok=True)
    small.save_pretrained(view)
    weight_map = {}
    for module, names in modules.items():
        for suffix in (".safetensors", ".safetensors.done"):
            src, dst = folder / SPLIT / f"{module}{suffix}", view / SPLIT / f"{module}{suffix}"
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    dst.symlink_to(src.resolve())
        weight_map.update(dict.fromkeys(names, f"{SPLIT}/{module}.safetensors"))
    (view / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return view


# ---- AirLLM, instrumented --------------------------------------------------------------------------------------


class Counters:
    """What AirLLM's hooks spent during the current forward (reset by the model-level pre-hook)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.read_bytes = 0
        self.read_s = 0.0  # load_layer_to_cpu, on whichever thread ran it (mostly the prefetch thread)
        self.pre_s = 0.0  # main thread in the per-module pre-hooks: prefetch wait + copy to the device
        self.post_s = 0.0  # main thread in the per-module post-hooks: drop to meta + clean_memory


def airllm_model(preset: str, folder: Path, device: str):
    """AirLLM's generic streaming model over `folder`, given OPT's module names where the shape is OPT, with
    timing counters (`model.counters`) around its load and its per-module hooks."""
    from airllm.airllm_base import AirLLMBaseModel

    counters = Counters()

    class Streamed(AirLLMBaseModel):
        def set_layer_names_dict(self):
            self.layer_names_dict = layer_names(preset)

        def get_tokenizer(self, hf_token=None):
            return None  # the prompts are token ids

        def load_layer_to_cpu(self, layer_name):
            start = time.perf_counter()
            state = super().load_layer_to_cpu(layer_name)
            counters.read_s += time.perf_counter() - start
            counters.read_bytes += sum(v.numel() * v.element_size() for v in state.values())
            return state

        def _pre_hook(self, module, args):
            start = time.perf_counter()
            super()._pre_hook(module, args)
            counters.pre_s += time.perf_counter() - start

        def _post_hook(self, module, args, output):
            start = time.perf_counter()
            output = super()._post_hook(module, args, output)
            counters.post_s += time.perf_counter() - start
            return output

    model = Streamed(str(folder), device=device, dtype=torch.float16, max_seq_len=AIRLLM_MAX_SEQ)
    model.counters = counters
    return model


def trace_forwards(model, sync, log, records: list):
    """Log every forward of `model` (prefill, then one per generated token) and append its record to `records`.
    Returns a function that describes the forward in progress (None when none is)."""
    counters = model.counters
    state = {}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        sync()
        counters.reset()
        state["start"], state["shape"] = time.perf_counter(), tuple(ids.shape) if ids is not None else None
        state["index"] = len(records)

    def post(module, args, kwargs, output):
        sync()
        seconds = time.perf_counter() - state["start"]
        logits = getattr(output, "logits", None)
        finite = bool(torch.isfinite(logits[:, -1]).all()) if logits is not None else None
        n = len(records)
        records.append({"tokens": list(state["shape"] or ()), "seconds": seconds, "read_bytes": counters.read_bytes,
                        "read_s": counters.read_s, "pre_hook_s": counters.pre_s, "post_hook_s": counters.post_s,
                        "logits_finite": finite})
        rate = counters.read_bytes / GB / counters.read_s if counters.read_s else 0.0
        kind = "prefill" if n == 0 else f"token {n + 1}"
        log(f"forward {n + 1} ({kind}, input {'x'.join(map(str, state['shape'] or ()))}): {seconds:.2f} s; "
            f"read {counters.read_bytes / GB:.2f} GB in {counters.read_s:.2f} s ({rate:.2f} GB/s, load_layer_to_cpu); "
            f"main thread {counters.pre_s:.2f} s in layer pre-hooks (prefetch wait + copy to device), "
            f"{counters.post_s:.2f} s in post-hooks (gc/malloc_trim/empty_cache), "
            f"{max(seconds - counters.pre_s - counters.post_s, 0.0):.2f} s other (compute); "
            f"logits {'finite' if finite else 'NOT FINITE'}")
        if finite is False:
            raise SystemExit(f"forward {n + 1}: the logits are not finite in fp16")
        return output

    def in_progress() -> dict | None:
        """The forward running now (for a stopped run's log and JSON), or None."""
        if "start" not in state or len(records) > state["index"]:
            return None
        return {"tokens": list(state["shape"] or ()), "seconds_so_far": time.perf_counter() - state["start"],
                "read_bytes_so_far": counters.read_bytes, "read_s_so_far": counters.read_s}

    model.model.register_forward_pre_hook(pre, with_kwargs=True)
    model.model.register_forward_hook(post, with_kwargs=True)
    return in_progress


def clean_memory_ms() -> str:
    """Time the parts of AirLLM's clean_memory (utils.py: gc.collect, malloc_trim, torch.cuda.empty_cache) once."""
    import ctypes
    import gc

    times = []
    for part in (gc.collect, lambda: ctypes.CDLL("libc.so.6").malloc_trim(0), torch.cuda.empty_cache):
        start = time.perf_counter()
        part()
        times.append((time.perf_counter() - start) * 1e3)
    return (f"gc.collect {times[0]:.0f} ms over {len(gc.get_objects())} objects, malloc_trim {times[1]:.0f} ms, "
            f"empty_cache {times[2]:.1f} ms")


# ---- the run ---------------------------------------------------------------------------------------------------


class Stopped(BaseException):
    """Raised from the SIGTERM/SIGALRM handler (a BaseException, so no library code swallows it)."""


def _raise_stopped(signum, _frame):
    raise Stopped(signal.Signals(signum).name)


def arm_stop(time_limit: float | None) -> None:
    """SIGTERM, and SIGALRM after `time_limit` seconds when given, raise Stopped in the main thread."""
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGALRM, _raise_stopped)
    if time_limit:
        signal.setitimer(signal.ITIMER_REAL, time_limit)


def disarm_stop() -> None:
    """No further Stopped: the timer off and both signals ignored (a second signal must not interrupt writing the
    partial result)."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig in (signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)


def parse_args(argv: list[str]) -> argparse.Namespace:
    presets = [*OPT_PRESETS, *LLAMA_PRESETS]
    p = argparse.ArgumentParser(description="Time AirLLM's generate on an OPT or Llama shape streamed layer by layer "
                                            "from disk (dummy fp16 weights written as AirLLM's split files, no hub "
                                            "access); logs every phase with timestamps.")
    p.add_argument("--model", required=True, choices=presets, metavar="PRESET", help=", ".join(presets))
    p.add_argument("--dir", "--hf-dir", dest="dir", type=Path, required=True, metavar="DIR",
                   help="weights folder: config.json, AirLLM's split files in DIR/splitted_model and the index, written "
                        "first unless the index describes this model")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the result to this JSON file (required unless "
                                                            "--setup-only)")
    p.add_argument("--log", type=Path, metavar="FILE", help="also append the timestamped log to this file")
    p.add_argument("--setup-only", action="store_true",
                   help="write the weights, let AirLLM split or check them, and exit (no GPU)")
    p.add_argument("--via-checkpoint", action="store_true",
                   help="write a Hugging Face checkpoint instead and let AirLLM split it (slower; for checks)")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="stop after S seconds, writing the partial result (also done on SIGTERM)")
    add_workload_args(p, gen_default=4)
    args = p.parse_args(argv)
    if not args.setup_only and args.json is None:
        p.error("--json is required unless --setup-only")
    config = hf_config(args.model)
    if not args.setup_only:
        check_workload(p, args, positions=min(config.max_position_embeddings, AIRLLM_MAX_SEQ),
                       family=f"{args.model} under AirLLM")
    return args


def airllm_split(preset: str, folder: Path) -> Path:
    """AirLLM's own `find_or_create_local_splitted_path` on `folder`: splits a HF checkpoint, or (the direct files
    in place) only checks that every module's file and marker are there. Returns the split folder."""
    from airllm.utils import find_or_create_local_splitted_path

    return Path(find_or_create_local_splitted_path(str(folder), layer_names=layer_names(preset))[1])


def _write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log = PhaseLog(args.log)
    records: list[dict] = []
    running = lambda: None  # noqa: E731 - replaced once the model is traced
    cuda = args.device == "cuda"
    result = {"system": "airllm", "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
              "model": args.model, "device": "cuda:0" if cuda else "cpu", "prompts": args.prompts,
              "prompt_len": args.prompt_len, "gen_len": args.gen_len,
              "weights_written_by": "airllm (split of a HF checkpoint)" if args.via_checkpoint
              else "airllm_peer.py (AirLLM's split files directly)"}
    arm_stop(args.time_limit)
    log(f"airllm_peer {args.model}: " + ("weights only (--setup-only)" if args.setup_only else
        f"{args.prompts} prompts x {args.prompt_len} tokens, {args.gen_len} generated, device {result['device']}")
        + f", weights in {args.dir}")
    try:
        config = hf_config(args.model)
        with log.phase("weights", "AirLLM's split files" + (" (via a HF checkpoint)" if args.via_checkpoint else "")):
            if args.via_checkpoint:
                written = ensure_checkpoint(config, args.dir, args.seed)
            else:
                written = ensure_split(config, args.model, args.dir, args.seed, log)
            log(f"  {'written' if written else 'reused'}: {args.dir}")
        import airllm

        result["versions"]["airllm"] = getattr(airllm, "__version__", "4.0.0")
        with log.phase("airllm_split", "AirLLM's find_or_create_local_splitted_path (its split, or its check that "
                                       "the split files are all there)"), log.quiet():
            airllm_split(args.model, args.dir)
        if args.setup_only:
            return result
        cap = cap_gpu_memory(args.gpu_memory) if cuda else None
        device = result["device"]
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        with log.phase("warmup", "1-token generate on 8 tokens through a one-layer view of the same files"):
            with log.quiet():
                small = airllm_model(args.model, warmup_view(config, args.model, args.dir), device)
            ids = torch.randint(4, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(args.seed))
            timed_generate(small, ids.to(device), 1, sync)
            del small
        with log.phase("model_load", "AirLLM's model (split check, meta model, resident modules, hooks)"), log.quiet():
            model = airllm_model(args.model, args.dir, device)
        log(f"  AirLLM's clean_memory after every streamed module, timed once here: {clean_memory_ms()}")
        result["weights_bytes"] = sum(f.stat().st_size for f in (args.dir / SPLIT).glob("*.safetensors"))
        running = trace_forwards(model, sync, log, records)
        with log.phase("generate", f"timed generate ({'cold' if args.cold else 'warm'} page cache)"):
            measured = timed_run(model, config.vocab_size, args, args.dir / SPLIT, warmup=False)
        signal.setitimer(signal.ITIMER_REAL, 0)
        result.update(measured, gpu_memory_cap_bytes=cap, complete=True, phases=log.phases, forwards=records)
        write_result(args.json, result)
        log(f"result: {args.json}")
        return result
    except Stopped as e:
        disarm_stop()
        done = sum(r["seconds"] for r in records)
        log(f"STOPPED by {e}: {len(records)} of {args.gen_len} forwards done ({done:.1f} s); partial result")
        now = running()
        if now:
            log(f"  forward {len(records) + 1} was running for {now['seconds_so_far']:.1f} s: "
                f"{now['read_bytes_so_far'] / GB:.2f} GB read in {now['read_s_so_far']:.1f} s so far")
        if args.json:
            result.update(complete=False, stopped_by=str(e), phases=log.phases, forwards=records,
                          forward_in_progress=now)
            _write_json(args.json, result)
            log(f"partial result: {args.json}")
        sys.stdout.flush()
        os._exit(124)  # without joining AirLLM's prefetch thread


if __name__ == "__main__":
    main()
