#!/usr/bin/env python3
"""Peer benchmark: DeepSpeed ZeRO-Inference (ZeRO stage 3 with parameters offloaded to NVMe through DeepSpeed's async
I/O) of an OPT, Llama or Qwen3-MoE shape with dummy weights, one JSON result.

    python bench/peers/zero_inference.py --model opt-13b --nvme-dir /root/zero-opt13 --json OUT.json \\
        --prompts 16 --prompt-len 512 --gen-len 4 --gpu-memory 12GiB [--cold]
    python bench/peers/zero_inference.py --model qwen3-30b-a3b --layers 16 --nvme-dir /root/zeromoe --json OUT.json \\
        --prompts 4 --prompt-len 8 --gen-len 3 --gpu-memory 12GiB --cold

Qwen3-MoE runs through transformers' Qwen3MoeForCausalLM (`qwen3-30b-a3b`: the shape of Qwen/Qwen3-30B-A3B's
config.json; `qwen3-moe-tiny` for CPU checks), random weights; --layers keeps its first N decoder layers (fp16 swap
files of all 48 layers would take ~61 GB of disk). In transformers 5 a Qwen3-MoE layer holds its experts in two 3-D
parameters (`experts.gate_up_proj` [experts, 2 x moe_intermediate, hidden] and `experts.down_proj`); ZeRO-3 gathers
whole parameters before a module runs, so every forward reads all of a layer's experts from NVMe, whatever the router
picks (ZeRO-Inference's regime is every-expert streaming).

DeepSpeed is not a dependency of kubeflash. On a machine without network, carry its sdist (deepspeed-0.19.8.tar.gz)
and the wheels of einops, hjson, msgpack, ninja and py-cpuinfo, install them with `pip install --no-deps
--no-build-isolation` (DS_BUILD_OPS=0: ops are built at first use), and libaio's headers and library (the async_io
op compiles against them when the run starts).

What is measured: one greedy `generate` of the ZeRO-3 engine's module (B random prompts of P tokens, exactly G new
tokens each), wall time from the call to its return with the GPU synchronized; prefill_s is up to the first token's
logits, decode_s the rest; the async_io op is built and a 1-token warm-up on a short prompt runs first (untimed).
ZeRO-3 gathers each layer's parameters from their NVMe swap files before the layer runs and releases them after
(DeepSpeed's parameter prefetch reads ahead), so every generated token re-reads every weight from the disk: the
regime of `kubeflash bench --weights disk`.

How the weights are served: the model is built inside `deepspeed.zero.Init` with the NVMe offload config, so each
parameter is initialised (the model's own random init, the dummy weights), partitioned and swapped out to
--nvme-dir as it is created; nothing is read from a checkpoint. The offload settings are DeepSpeed's documented
ZeRO-Inference ones: `offload_param: {device: nvme, pin_memory: true}`, buffers large enough for the largest tensor,
`stage3_param_persistence_threshold: 0` (every tensor streamed), and the `aio` section below.

Where the time goes: --log FILE appends timestamped lines for every phase (DeepSpeed's import and init, the build of
its async_io op, building the model under zero.Init, which writes the swap files, with a line every 15 s saying how
many bytes are in --nvme-dir, the warm-up and the generate), every forward (its input shape and seconds) and every
decoder layer of it (seconds since the forward began), so a run stopped by a time limit still says where it was.
--time-limit S (SIGALRM) or a SIGTERM (e.g. from `timeout`) stops the run; the JSON is then written with "complete":
false, the phases and forwards finished so far, and the exit status is 124.

Result JSON: system, versions, model, device, prompts, prompt_len, gen_len, prefill_s, decode_s, total_s,
generated_tokens, tokens_per_s, gpu_peak_bytes, gpu_memory_cap_bytes, nvme_bytes, page_cache, ds_config, complete,
phases ({name: seconds}), forwards ([{tokens, seconds}]).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import transformers
from accelerate_opt import PRESETS as OPT_PRESETS
from airllm_peer import GB, LLAMA_PRESETS, PhaseLog, Stopped, _write_json, arm_stop, disarm_stop, hf_config
from peer_common import add_workload_args, cap_gpu_memory, check_workload, timed_run, write_result
from transformers import AutoModelForCausalLM

# Qwen/Qwen3-30B-A3B's config.json (every layer a MoE layer), and a tiny one of the same family for CPU checks
MOE_PRESETS = {
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, max_position_embeddings=40960, bos_token_id=151643,
                          eos_token_id=151645),
    # experts big enough (4 and 2 MiB in float32) for ZeRO to swap them to NVMe: it keeps tensors under its aio block
    # size (1 MiB) in CPU memory
    "qwen3-moe-tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           num_experts=8, num_experts_per_tok=2, max_position_embeddings=512, bos_token_id=1,
                           eos_token_id=2),
}


def peer_config(preset: str, layers: int = 0):
    """The transformers config of `preset` (OPT, Llama or Qwen3-MoE), with its first `layers` decoder layers only
    when given."""
    if preset in MOE_PRESETS:
        c = transformers.Qwen3MoeConfig(**MOE_PRESETS[preset], norm_topk_prob=True, rope_theta=1000000.0,
                                        rms_norm_eps=1e-6, tie_word_embeddings=False, decoder_sparse_step=1,
                                        mlp_only_layers=[])
        c.torch_dtype = "float16"
        c.architectures = ["Qwen3MoeForCausalLM"]
    else:
        c = hf_config(preset)
    if layers:
        c.num_hidden_layers = layers
    return c


def ds_config(nvme: Path, *, dtype: torch.dtype, largest: int, buffers: int = 5) -> dict:
    """ZeRO-3 with every parameter on NVMe: pinned swap buffers of `largest` elements each."""
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": str(nvme), "pin_memory": True,
                              "buffer_count": buffers, "buffer_size": largest, "max_in_cpu": 0},
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": largest,
            "stage3_max_live_parameters": largest * 2,
            "stage3_max_reuse_distance": 0,
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 16, "thread_count": 4, "single_submit": False,
                "overlap_events": True},
    }
    if dtype == torch.float16:
        cfg["fp16"] = {"enabled": True}
    elif dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def zero_model(config, nvme: Path, device: str, dtype: torch.dtype):
    """The ZeRO-3 engine's module, its parameters swapped out to `nvme` as they are created."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    largest = max(t.numel() for t in shapes.values())
    cfg = ds_config(nvme, dtype=dtype, largest=largest)
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841  (transformers builds under zero.Init while this object lives)
    with deepspeed.zero.Init(config_dict_or_path=cfg, remote_device="nvme", pin_memory=True, dtype=dtype):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    engine = deepspeed.initialize(model=model, config=cfg)[0]
    engine.module.eval()
    return engine.module, cfg


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class Heartbeat:
    """While a phase runs, log every `every` seconds how many bytes `folder` holds and at what rate it grew."""

    def __init__(self, log, folder: Path, every: float = 15.0):
        self.log, self.folder, self.every = log, folder, every
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start, last_b, last_t = time.perf_counter(), 0, time.perf_counter()
        while not self.done.wait(self.every):
            b, t = dir_bytes(self.folder), time.perf_counter()
            self.log(f"  {self.folder}: {b / GB:.2f} GB after {t - start:.0f} s ({(b - last_b) / GB / (t - last_t):.2f} GB/s "
                     "in the last interval)")
            last_b, last_t = b, t

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()


def trace_forwards(model, sync, log, records: list):
    """Log every forward of `model` (prefill, then one per generated token) and each of its decoder layers' end, and
    append {tokens, seconds} per forward to `records`. Returns a function describing the forward in progress."""
    state: dict = {}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        sync()
        state.update(start=time.perf_counter(), shape=tuple(ids.shape) if ids is not None else (), index=len(records),
                     layers=0)

    def post(module, args, kwargs, output):
        sync()
        seconds = time.perf_counter() - state["start"]
        n = len(records)
        records.append({"tokens": list(state["shape"]), "seconds": seconds})
        kind = "prefill" if state["shape"] and state["shape"][-1] > 1 else "decode step"  # the first is the warm-up's
        log(f"forward {n + 1} ({kind}, input {'x'.join(map(str, state['shape']))}): {seconds:.2f} s")
        return output

    def layer_done(module, args, output):
        if "start" in state:
            sync()
            state["layers"] += 1
            log(f"  forward {len(records) + 1}: layer {state['layers']} done at "
                f"{time.perf_counter() - state['start']:.2f} s")
        return output

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    inner = model.model
    for layer in (inner.decoder.layers if hasattr(inner, "decoder") else inner.layers):  # OPT / Llama, Qwen3-MoE
        layer.register_forward_hook(layer_done)

    def in_progress() -> dict | None:
        if "start" not in state or len(records) > state["index"]:
            return None
        return {"tokens": list(state["shape"]), "seconds_so_far": time.perf_counter() - state["start"],
                "layers_done": state["layers"]}

    return in_progress


def parse_args(argv: list[str]) -> argparse.Namespace:
    presets = [*OPT_PRESETS, *LLAMA_PRESETS, *MOE_PRESETS]
    p = argparse.ArgumentParser(description="Time DeepSpeed ZeRO-Inference (ZeRO-3, parameters on NVMe) on an OPT, "
                                            "Llama or Qwen3-MoE shape with dummy weights.")
    p.add_argument("--model", required=True, choices=presets, metavar="PRESET", help=", ".join(presets))
    p.add_argument("--layers", type=int, default=0, metavar="N",
                   help="keep the model's first N decoder layers only (default: all)")
    p.add_argument("--nvme-dir", type=Path, required=True, metavar="DIR",
                   help="where ZeRO swaps the parameters out (emptied first)")
    p.add_argument("--json", type=Path, required=True, metavar="FILE", help="write the result to this JSON file")
    p.add_argument("--log", type=Path, metavar="FILE", help="append a timestamped line per phase, forward and layer")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="stop after S seconds, writing the partial result (also done on SIGTERM)")
    add_workload_args(p, gen_default=4)
    args = p.parse_args(argv)
    config = peer_config(args.model)
    if not 0 <= args.layers <= config.num_hidden_layers:
        p.error(f"--layers must be between 1 and {args.model}'s {config.num_hidden_layers} layers (0: all)")
    check_workload(p, args, positions=config.max_position_embeddings, family=args.model)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log = PhaseLog(args.log)
    records: list[dict] = []
    running = lambda: None  # noqa: E731 - replaced once the model is traced
    cuda = args.device == "cuda"
    device = "cuda:0" if cuda else "cpu"
    result: dict = {"system": "deepspeed-zero-inference", "model": args.model, "device": device,
                    "prompts": args.prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                    "versions": {"transformers": transformers.__version__, "torch": torch.__version__}}
    arm_stop(args.time_limit)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29512")):
        os.environ.setdefault(k, v)
    # DeepSpeed 0.19.8's op builder reads TORCH_CUDA_ARCH_LIST as plain numbers and fails on an arch suffix
    # ("ValueError: invalid literal for int() with base 10: '0a'" for the GPU image's "9.0a", seen on the H100):
    # its async_io op has no CUDA code, so the suffix is dropped for the build
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(
            dict.fromkeys(re.sub(r"(?<=\d)[a-z]+(?=(\+PTX)?$)", "", a) for a in re.split(r"[;\s]+", arch.strip()) if a))
    config = peer_config(args.model, args.layers)
    log(f"zero_inference {args.model} ({config.num_hidden_layers} layers): {args.prompts} prompts x "
        f"{args.prompt_len} tokens, {args.gen_len} generated, device {device}, swap files in {args.nvme_dir}")
    try:
        with log.phase("init", "import deepspeed, init_distributed"):
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        result["versions"]["deepspeed"] = deepspeed.__version__
        with log.phase("op", "DeepSpeed's async_io op (compiled with ninja at first use, then loaded from "
                             "~/.cache/torch_extensions)"):
            from deepspeed.ops.op_builder import AsyncIOBuilder

            AsyncIOBuilder().load(verbose=False)
        cap = cap_gpu_memory(args.gpu_memory) if cuda else None
        torch.manual_seed(args.seed)
        dtype = torch.float16 if cuda else torch.float32
        shutil.rmtree(args.nvme_dir, ignore_errors=True)
        args.nvme_dir.mkdir(parents=True)
        with log.phase("build", "the model under zero.Init (every parameter initialised and swapped out to NVMe)"), \
                Heartbeat(log, args.nvme_dir):
            model, cfg = zero_model(config, args.nvme_dir, device, dtype)
        result["nvme_bytes"] = dir_bytes(args.nvme_dir)
        log(f"  swap files: {result['nvme_bytes'] / GB:.2f} GB")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        running = trace_forwards(model, sync, log, records)
        with log.phase("run", "1-token warm-up, then the timed generate "
                              f"({'cold' if args.cold else 'warm'} page cache)"):
            measured = timed_run(model, config.vocab_size, args, args.nvme_dir)
        signal.setitimer(signal.ITIMER_REAL, 0)
        del records[0]  # the warm-up's forward
        result.update(layers=config.num_hidden_layers, **measured, gpu_memory_cap_bytes=cap, ds_config=cfg,
                      complete=True, phases=log.phases, forwards=records)
        write_result(args.json, result)
        log(f"result: {args.json}")
        return result
    except Stopped as e:
        disarm_stop()
        log(f"STOPPED by {e}: phases done {log.phases}; {len(records)} forwards done (the first is the warm-up)")
        now = running()
        if now:
            log(f"  forward {len(records) + 1} was running for {now['seconds_so_far']:.1f} s, "
                f"{now['layers_done']} layers done")
        result.update(complete=False, stopped_by=str(e), phases=log.phases, forwards=records, forward_in_progress=now,
                      nvme_bytes=dir_bytes(args.nvme_dir) if args.nvme_dir.exists() else 0)
        _write_json(args.json, result)
        log(f"partial result: {args.json}")
        sys.stdout.flush()
        os._exit(124)  # without joining DeepSpeed's threads


if __name__ == "__main__":
    main()
