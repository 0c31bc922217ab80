"""Random transformers models for parity tests (every weight random, the 1-D ones (norms, biases) perturbed too so
none stays at its default, float32, saved as safetensors), and transformers' side of a comparison: a batch left
padded as the engine pads it, and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import torch


def save_random_model(cfg, out: Path):
    """The model `cfg` describes, seeded (0), saved under `out`; returns it (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return model


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [B, S]: `prompts` left padded with 0 to the longest, as the engine pads a batch."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' `new` greedy tokens per prompt (no end-of-sequence stop) for the left-padded batch `prompts`."""
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def tiny_llama_store(root: Path):
    """(transformers model, store dir, calibration ids) for the sparsity tests' tiny random Llama (hidden 64,
    intermediate 256, 3 layers, vocabulary 97): saved under root/hf, converted to float32 under root/store; the ids
    are 768 seeded random tokens to calibrate it on."""
    from transformers import LlamaConfig

    from kubeflash_node.store.convert import convert

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = save_random_model(cfg, root / "hf")
    store = root / "store"
    convert(str(root / "hf"), store, dtype="float32")
    ids = torch.randint(0, 97, (768,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, store, ids


def assert_config_refused(cfg: dict, names: str, tmp: Path) -> None:
    """`kubeflash convert` of a directory holding only `cfg` as its config.json is refused from the config alone,
    before any weight is read: a SourceError starting with "config.json NAMES", and no store written."""
    import json

    from kubeflash_node.store.convert import SourceError, convert

    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text(json.dumps(cfg))
    try:
        convert(str(tmp / "hf"), tmp / "store", dtype="float32")
    except SourceError as e:
        assert str(e).startswith(f"config.json {names}"), str(e)
    else:
        raise AssertionError(f"convert accepted a config.json that should be refused naming {names!r}")
    assert not (tmp / "store").exists()
