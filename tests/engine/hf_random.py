"""Random transformers models for parity tests: every weight random, the 1-D ones (norms, biases) perturbed too so
none stays at its default, float32, saved as safetensors."""

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
