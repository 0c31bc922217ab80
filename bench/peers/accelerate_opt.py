#!/usr/bin/env python3
"""Peer benchmark: transformers + accelerate disk offload of OPT (dummy fp16 weights), one command, one JSON result.

    python bench/peers/accelerate_opt.py --model opt-13b --offload-folder /root/acc-opt13 --json OUT.json \\
        --prompts 8 --prompt-len 512 --gen-len 32 --gpu-memory 12GiB [--gpu-layers 0] [--cold]

What is measured: one greedy `model.generate` (fp16, B random prompts of P tokens, exactly G new tokens each,
KV cache on the execution device), wall time from the call to its return with the GPU synchronized; prefill_s
is up to the first token's logits, decode_s the rest. A 1-token warm-up on a short prompt runs first (untimed).

How the weights are served: accelerate's own disk-offload format, one np.memmap `.dat` file per tensor plus
`index.json` (accelerate.utils.offload_weight / save_offload_index). The model is built on the meta device
(accelerate.init_empty_weights) and dispatched with accelerate.dispatch_model: every block (embeddings, each
decoder layer, final LayerNorm, lm_head) is mapped to "disk", except the first `--gpu-layers` decoder layers,
which are loaded once onto the execution device. accelerate hooks each disk block to read its tensors from the
folder onto the execution device before the block runs and free them after, so every generated token re-reads
all offloaded weights: the streaming regime of `kubeflash bench` and of FlexGen with weights 100% on disk.
dispatch_model (rather than accelerate.disk_offload, which hooks every Linear separately) is used for that
per-block granularity and for --gpu-layers.

Kept comparable with `kubeflash bench` runs:
- shape: OPTConfig is built here from the same presets as kubeflash's `dummy:opt-*` (hidden/layers/heads/ffn,
  vocab 50272, 2048 positions); no hub access;
- weights: written once into --offload-folder tensor by tensor (never the whole model in RAM) as small random
  fp16 values (normal std 0.02, LayerNorm weights 1, biases 0; lm_head tied to the token embedding), reused by
  later runs (an index.json for another model is refused);
- GPU memory: `--gpu-memory` caps this process's CUDA allocator (torch.cuda.set_per_process_memory_fraction);
  gpu_peak_bytes is torch.cuda.max_memory_allocated over the timed run;
- host memory and page cache: run it inside the same cgroup as the kubeflash cold runs (bench/gpu-suite.sh `cg`)
  and pass `--cold` to drop the page cache after the warm-up, before the timed run.

Result JSON: system, versions, model, device, prompts, prompt_len, gen_len, gpu_layers, prefill_s, decode_s,
total_s, generated_tokens, tokens_per_s (generated tokens / total_s), gpu_peak_bytes, gpu_memory_cap_bytes,
offload_folder_bytes, page_cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import accelerate
import torch
import transformers
from accelerate import dispatch_model, init_empty_weights
from accelerate.utils import OffloadedWeightsLoader, offload_weight, save_offload_index, set_module_tensor_to_device
from peer_common import add_workload_args, cap_gpu_memory, check_workload, timed_run, write_result
from tqdm import tqdm
from transformers import OPTConfig, OPTForCausalLM

# name: (hidden, decoder layers, heads, ffn, vocab). opt-tiny is for tests.
PRESETS = {
    "opt-125m": (768, 12, 12, 3072, 50272),
    "opt-1.3b": (2048, 24, 32, 8192, 50272),
    "opt-6.7b": (4096, 32, 32, 16384, 50272),
    "opt-13b": (5120, 40, 40, 20480, 50272),
    "opt-30b": (7168, 48, 56, 28672, 50272),
    "opt-tiny": (64, 2, 4, 128, 1000),
}
# OPT ties its output projection to the token embedding: the offload folder holds the same values under both names.
TIED = {"lm_head.weight": "model.decoder.embed_tokens.weight"}


def opt_config(preset: str) -> OPTConfig:
    hidden, layers, heads, ffn, vocab = PRESETS[preset]
    return OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                     do_layer_norm_before=True, enable_bias=True, dropout=0.0, attention_dropout=0.0,
                     pad_token_id=1, bos_token_id=2, eos_token_id=2)


def empty_model(config: OPTConfig) -> OPTForCausalLM:
    """The fp16 model with every tensor on the meta device (no memory)."""
    with init_empty_weights():
        return OPTForCausalLM(config).half().eval()


def ensure_weights(config: OPTConfig, folder: Path, seed: int = 0) -> bool:
    """Write the dummy weights into `folder` unless its index.json already holds them; True if written."""
    tensors = empty_model(config).state_dict()
    expected = {name: {"dtype": "float16", "shape": list(t.shape)} for name, t in tensors.items()}
    index_file = folder / "index.json"
    if index_file.is_file():
        if json.loads(index_file.read_text()) != expected:
            raise SystemExit(f"{index_file} describes another model than {config.hidden_size}-hidden "
                             f"{config.num_hidden_layers}-layer OPT: pass an empty --offload-folder")
        return False
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    index = {}
    with tqdm(total=sum(2 * t.numel() for t in tensors.values()), unit="B", unit_scale=True,
              desc=f"dummy weights -> {folder}") as bar:
        for name, meta in tensors.items():
            if name in TIED:
                shutil.copyfile(folder / f"{TIED[name]}.dat", folder / f"{name}.dat")
                index[name] = index[TIED[name]]
            else:
                value = torch.empty(meta.shape, dtype=torch.float16)
                if name.endswith(".bias"):
                    value.zero_()
                elif "layer_norm" in name:
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, 0.02, generator=generator)
                offload_weight(value, name, str(folder), index)
            bar.update(2 * meta.numel())
    save_offload_index(index, str(folder))  # last: a folder without index.json is rewritten from scratch
    return True


def dispatched_model(config: OPTConfig, folder: Path, device: str, gpu_layers: int = 0) -> OPTForCausalLM:
    """The model dispatched by accelerate: the first `gpu_layers` decoder layers loaded on `device`, every other
    block read from `folder` at each forward and run on `device`."""
    model = empty_model(config)
    decoder = "model.decoder"
    layers = [f"{decoder}.layers.{i}" for i in range(config.num_hidden_layers)]
    blocks = [f"{decoder}.embed_tokens", f"{decoder}.embed_positions", *layers, f"{decoder}.final_layer_norm",
              "lm_head"]
    device_map = dict.fromkeys(blocks, "disk")
    weights = OffloadedWeightsLoader(save_folder=str(folder))
    for block in layers[:gpu_layers]:
        device_map[block] = device
        for name, _ in model.get_submodule(block).named_parameters():
            set_module_tensor_to_device(model, f"{block}.{name}", device, value=weights[f"{block}.{name}"])
    return dispatch_model(model, device_map, main_device=device, offload_dir=str(folder))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time transformers generate on an OPT model that accelerate streams "
                                            "from a disk offload folder (dummy weights, no hub access).")
    p.add_argument("--model", required=True, choices=PRESETS, metavar="PRESET",
                   help="OPT shape: opt-125m, opt-1.3b, opt-6.7b, opt-13b or opt-30b")
    p.add_argument("--offload-folder", type=Path, required=True, metavar="DIR",
                   help="accelerate offload folder holding the weights (written there first if it has no index.json)")
    p.add_argument("--json", type=Path, required=True, metavar="FILE", help="write the result to this JSON file")
    add_workload_args(p, gen_default=32)
    p.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                   help="first N decoder layers kept loaded on the execution device; the rest stream from the "
                        "folder (default 0: all weights stream)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed 1-token warm-up on a short prompt")
    args = p.parse_args(argv)
    check_workload(p, args, positions=2048, family="OPT")
    layers = PRESETS[args.model][1]
    if not 0 <= args.gpu_layers <= layers:
        p.error(f"--gpu-layers {args.gpu_layers}: {args.model} has {layers} decoder layers")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = args.device == "cuda"
    device = "cuda:0" if cuda else "cpu"
    cap = cap_gpu_memory(args.gpu_memory) if cuda else None
    config = opt_config(args.model)
    ensure_weights(config, args.offload_folder, args.seed)
    model = dispatched_model(config, args.offload_folder, device, args.gpu_layers)

    measured = timed_run(model, config.vocab_size, args, args.offload_folder, warmup=args.warmup)
    result = {
        "system": "accelerate-disk-offload",
        "versions": {"transformers": transformers.__version__, "accelerate": accelerate.__version__,
                     "torch": torch.__version__},
        **measured, "gpu_layers": args.gpu_layers, "gpu_memory_cap_bytes": cap,
        "offload_folder_bytes": sum(f.stat().st_size for f in args.offload_folder.glob("*.dat")),
    }
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
