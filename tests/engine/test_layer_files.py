"""The writers of per-layer row files (store/bundles.write_bundles, store/channels.write_channels and
write_attn_channels) cut float matrices only: on an int8 store each refuses with its own message naming the store,
before it makes its directory."""

from __future__ import annotations

import pytest
from hf_random import save_random_model
from transformers import LlamaConfig

from kubeflash_node.store import bundles, channels
from kubeflash_node.store.convert import convert
from kubeflash_node.store.format import StoreError


@pytest.fixture(scope="module")
def int8_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    save_random_model(cfg, root / "hf")
    convert(str(root / "hf"), root / "store", dtype="float16", quantization="int8")
    return root / "store"


@pytest.mark.parametrize("write, sub, message", [
    (bundles.write_bundles, bundles.DIR, "quantized matrices are not bundled (bundle a float16/bfloat16/float32 "
                                         "store)"),
    (channels.write_channels, channels.DIR, "quantized matrices are not cut into channels (use a float store)"),
    (channels.write_attn_channels, channels.ATTN_DIR, "quantized matrices are not cut into channels (use a float "
                                                      "store)"),
], ids=["bundles", "channels", "attention-channels"])
def test_a_quantized_store_is_refused_with_the_writers_message(int8_store, write, sub, message):
    with pytest.raises(StoreError) as e:
        write(int8_store)
    assert str(e.value) == f"{int8_store}: {message}"
    assert not (int8_store / sub).exists()  # refused before its directory was made
