"""A llama-3-8b-shaped 2-layer Llama (H 4096, I 14336, 32/8 heads, vocab 1024) saved as an HF dir, float16."""
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
c = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=512, rope_theta=500000.0,
                torch_dtype="float16")
with torch.device("cpu"):
    m = LlamaForCausalLM(c).to(torch.float16)
m.save_pretrained(sys.argv[1], safe_serialization=True)
print("saved")
