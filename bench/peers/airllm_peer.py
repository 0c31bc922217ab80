#!/usr/bin/env python3
"""Peer benchmark: AirLLM (4.0.0) layer streaming of an OPT or Llama shape with dummy fp16 weights, one JSON result.

    python bench/peers/airllm_peer.py --model opt-13b --hf-dir /root/air-opt13 --json OUT.json \\
        --prompts 16 --prompt-len 512 --gen-len 4 --gpu-memory 12GiB [--cold]

AirLLM is not a dependency of kubeflash: carry its wheel (`pip download --no-deps airllm==4.0.0`) to the GPU machine,
whose image has the rest (transformers, accelerate, safetensors, huggingface_hub, tqdm).

What is measured: one greedy `generate` of AirLLM's model (B random prompts of P tokens, exactly G new tokens each),
wall time from the call to its return with the GPU synchronized; prefill_s is up to the first token's logits,
decode_s the rest. A 1-token warm-up on a short prompt runs first (untimed). AirLLM re-reads every layer from its
per-layer files for each forward pass (its design: one layer in GPU memory at a time, the next one read ahead on a
thread), so every generated token re-reads all the weights, the streaming regime of `kubeflash bench --weights disk`.

How the weights are served: a Hugging Face directory (config.json, one safetensors shard per decoder layer and
model.safetensors.index.json) written once into --hf-dir tensor by tensor as small random fp16 values (normal std
0.02, norms 1, biases 0); AirLLM then splits it into its own per-layer files under --hf-dir/splitted_model (its
`find_or_create_local_splitted_path`), both outside the timed run. Reused by later runs.

Adapting AirLLM (said here because it changes what runs): its generic streamer names the Llama-style modules
(model.embed_tokens, model.layers, model.norm, lm_head). For OPT this script gives it OPT's names (model.decoder.*)
and keeps the learned positional embedding resident (AirLLM's `resident` list, loaded once); OPT's output projection
is written untied (its own lm_head tensor, the same bytes as the embedding) so AirLLM streams it like the other
heads. No tokenizer is written: the prompts are token ids, so the tokenizer AirLLM would load is skipped.

Result JSON: system, versions, model, device, prompts, prompt_len, gen_len, prefill_s, decode_s, total_s,
generated_tokens, tokens_per_s, gpu_peak_bytes, gpu_memory_cap_bytes, checkpoint_bytes, page_cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from accelerate_opt import PRESETS as OPT_PRESETS
from accelerate_opt import opt_config
from peer_common import add_workload_args, cap_gpu_memory, check_workload, timed_run, write_result
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

AIRLLM_MAX_SEQ = 4096  # the sequence length AirLLM's model is built for (prompt + generated tokens)
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


def _shard_of(name: str) -> str:
    """The shard a tensor goes to: one per decoder layer, one for everything else."""
    parts = name.split(".")
    if "layers" in parts:
        return f"layer-{int(parts[parts.index('layers') + 1]):05d}"
    return "other"


def ensure_checkpoint(config, folder: Path, seed: int = 0) -> bool:
    """Write the dummy HF checkpoint into `folder` unless its index already describes this model; True if written."""
    with init_empty_weights():
        tensors = AutoModelForCausalLM.from_config(config).half().state_dict()
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if set(weight_map) != set(tensors):
            raise SystemExit(f"{index_file} describes another model than {config.architectures[0]} "
                             f"with {config.num_hidden_layers} layers: pass an empty --hf-dir")
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
            save_file(out, str(folder / files[shard]), metadata={"format": "pt"})
    config.save_pretrained(folder)
    total = sum(2 * t.numel() for t in tensors.values())
    # last: a folder without the index is rewritten from scratch
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return True


def airllm_model(preset: str, folder: Path, device: str):
    """AirLLM's generic streaming model over `folder`, given OPT's module names where the shape is OPT."""
    from airllm.airllm_base import AirLLMBaseModel

    class Streamed(AirLLMBaseModel):
        def set_layer_names_dict(self):
            if preset in OPT_PRESETS:
                self.layer_names_dict = {"embed": "model.decoder.embed_tokens", "layer_prefix": "model.decoder.layers",
                                         "norm": "model.decoder.final_layer_norm", "lm_head": "lm_head",
                                         "resident": ["model.decoder.embed_positions"]}
            else:
                super().set_layer_names_dict()

        def get_tokenizer(self, hf_token=None):
            return None  # the prompts are token ids

    return Streamed(str(folder), device=device, dtype=torch.float16, max_seq_len=AIRLLM_MAX_SEQ)


def parse_args(argv: list[str]) -> argparse.Namespace:
    presets = [*OPT_PRESETS, *LLAMA_PRESETS]
    p = argparse.ArgumentParser(description="Time AirLLM's generate on an OPT or Llama shape streamed layer by layer "
                                            "from disk (dummy fp16 weights, no hub access).")
    p.add_argument("--model", required=True, choices=presets, metavar="PRESET", help=", ".join(presets))
    p.add_argument("--hf-dir", type=Path, required=True, metavar="DIR",
                   help="HF checkpoint folder (written there first unless its index describes this model); AirLLM's "
                        "split files go to DIR/splitted_model")
    p.add_argument("--json", type=Path, required=True, metavar="FILE", help="write the result to this JSON file")
    add_workload_args(p, gen_default=4)
    args = p.parse_args(argv)
    config = hf_config(args.model)
    check_workload(p, args, positions=min(config.max_position_embeddings, AIRLLM_MAX_SEQ),
                   family=f"{args.model} under AirLLM")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = args.device == "cuda"
    device = "cuda:0" if cuda else "cpu"
    cap = cap_gpu_memory(args.gpu_memory) if cuda else None
    config = hf_config(args.model)
    ensure_checkpoint(config, args.hf_dir, args.seed)
    model = airllm_model(args.model, args.hf_dir, device)

    measured = timed_run(model, config.vocab_size, args, args.hf_dir)
    import airllm

    result = {
        "system": "airllm",
        "versions": {"airllm": getattr(airllm, "__version__", "4.0.0"), "transformers": transformers.__version__,
                     "torch": torch.__version__},
        **measured, "gpu_memory_cap_bytes": cap,
        "checkpoint_bytes": sum(f.stat().st_size for f in args.hf_dir.glob("*.safetensors")),
    }
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
