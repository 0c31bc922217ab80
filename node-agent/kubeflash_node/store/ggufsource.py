"""A GGUF file read into the converter's canonical tensors, for the families whose GGUF architecture names them.

general.architecture -> our family: llama / mistral (Llama 2/3, Mistral, SmolLM2; with {arch}.expert_count a
Mixtral), qwen2, qwen3, qwen3moe (Qwen3-MoE), phi3, gemma2, gemma3 (Gemma 3 text). Anything else is refused by
name. What llama.cpp's converter changed on the way in is undone here:
- llama-arch q/k rows (weights and biases) are permuted for its interleaved rotary pairs: permuted back;
- Gemma norms are stored as 1 + w (llama.cpp's RMSNorm multiplies by the weight): 1 is subtracted again;
- experts are stacked per layer (blk.N.ffn_{gate,up,down}_exps [E, ...]): split into e{j}.w_gate / w_up / w_down,
  written expert after expert; the router is blk.N.ffn_gate_inp;
- Phi-3 keeps its fused attn_qkv and ffn_up (gate rows, then up rows): split as the HF source splits them, and its
  LongRoPE factors are the tensors rope_factors_long / rope_factors_short.
GGUF has no query_pre_attn_scalar: like llama.cpp, Gemma uses {arch}.attention.scale when present, else
hidden / heads for the 27B shapes (46 Gemma 2 layers, 62 Gemma 3 layers) and head_dim otherwise.
Every tensor every layer needs is checked when the file is opened, before the converter writes anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .hf_config import SourceError
from .modelconfig import ModelConfig

# GGUF general.architecture -> ModelConfig.family ("" : the plain Llama family)
FAMILIES = {"llama": "", "mistral": "", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "phi3": "phi3",
            "gemma2": "gemma2", "gemma3": "gemma3_text"}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_OLD_EXPERTS = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")


class GGUFSource:
    """A GGUF file, dequantized to float32 with the gguf package (implements convert.Source)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        from .ggufcheck import CorruptGGUF, check

        self.path = path
        try:
            check(path)  # the layout first: a corrupt file refused by byte, field and what was expected
            self.reader = GGUFReader(str(path))
        except CorruptGGUF as e:
            raise SourceError(f"{path}: not a readable GGUF file: {e}") from None
        except Exception as e:  # what the check does not cover: gguf raises plain ValueError/numpy errors
            raise SourceError(f"{path}: not a readable GGUF file ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.arch = self._field("general.architecture")
        if arch not in FAMILIES:
            raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported; expected one of "
                              f"{', '.join(FAMILIES)}")
        self.config = self._config()
        self.description = f"gguf:{path}"
        for i in range(self.config.num_layers):
            for name in self._layer_names(i).values():
                if name not in self.tensors:
                    raise SourceError(f"{path}: GGUF tensor {name!r} missing")
        for name in ("token_embd.weight", "output_norm.weight"):
            if name not in self.tensors:
                raise SourceError(f"{path}: GGUF tensor {name!r} missing")

    # ------------------------------------------------------------------ metadata
    def _field(self, key: str, default=KeyError):
        f = self.reader.fields.get(key)
        if f is None:
            if default is KeyError:
                raise SourceError(f"{self.path}: GGUF metadata key {key!r} missing")
            return default
        return f.contents()

    def _refuse(self, key: str, value, expected: str) -> SourceError:
        return SourceError(f"{self.path}: GGUF {key} = {value!r} is not supported; expected {expected}")

    def _config(self) -> ModelConfig:
        a, arch = self.arch, self.arch
        gemma = arch in ("gemma2", "gemma3")
        hidden, heads = self._field(f"{a}.embedding_length"), self._field(f"{a}.attention.head_count")
        layers = self._field(f"{a}.block_count")
        if not isinstance(heads, int) or not isinstance(self._field(f"{a}.attention.head_count_kv", 0), int):
            raise self._refuse(f"{a}.attention.head_count", heads, "one head count for every layer")
        head_dim = self._field(f"{a}.attention.key_length", 0) or hidden // heads
        if self._field(f"{a}.attention.value_length", head_dim) != head_dim:
            raise self._refuse(f"{a}.attention.value_length", self._field(f"{a}.attention.value_length"),
                               f"{a}.attention.key_length ({head_dim})")
        rot = self._field(f"{a}.rope.dimension_count", head_dim)
        if rot != head_dim:
            raise self._refuse(f"{a}.rope.dimension_count", rot, f"the head size {head_dim} (partial RoPE)")
        if "rope_freqs.weight" in self.tensors:
            raise SourceError(f"{self.path}: GGUF tensor 'rope_freqs.weight' (precomputed RoPE frequencies, as "
                              "llama.cpp writes Llama 3.1's scaling) is not supported; convert the HF directory")
        max_pos = self._field(f"{a}.context_length", 2048)
        kw: dict = dict(family=FAMILIES[arch], max_position_embeddings=max_pos, num_kv_heads=self._field(
            f"{a}.attention.head_count_kv", 0), head_dim=head_dim,
            norm_eps=float(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._field(f"{a}.rope.freq_base", 10000.0)), rope_scaling=self._rope(max_pos, head_dim),
            qk_norm="blk.0.attn_q_norm.weight" in self.tensors,
            attention_bias="blk.0.attn_q.bias" in self.tensors, o_bias="blk.0.attn_output.bias" in self.tensors,
            mlp_bias="blk.0.ffn_up.bias" in self.tensors)
        window = self._field(f"{a}.attention.sliding_window", 0)
        if window and arch in ("llama", "mistral", "qwen2"):
            raise SourceError(f"{self.path}: GGUF {a}.attention.sliding_window is not supported for {arch} "
                              "(convert the HF directory)")
        if window:
            kw |= dict(sliding_window=window, window_layers=self._window_layers(layers))
        if gemma:
            kw |= self._gemma(hidden, heads, head_dim, layers)
        experts = self._field(f"{a}.expert_count", 0)
        if experts:
            kw |= self._experts(experts, layers)
        if arch == "mistral" or (arch == "llama" and experts):
            kw["family"] = "mixtral" if experts else ""
        ff = self._field(f"{a}.expert_feed_forward_length", 0) if experts else 0
        eos = self._field("tokenizer.ggml.eos_token_id", None)
        vocab = int(self.tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in self.tensors else 0
        try:
            return ModelConfig(
                architecture="llama", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=ff or self._field(f"{a}.feed_forward_length"), num_layers=layers, num_heads=heads,
                tie_word_embeddings="output.weight" not in self.tensors,
                bos_token_id=self._field("tokenizer.ggml.bos_token_id", None),
                eos_token_id=[eos] if eos is not None else [],
                pad_token_id=self._field("tokenizer.ggml.padding_token_id", None), **kw)
        except ValueError as e:
            raise SourceError(f"{self.path}: {e}") from None

    def _rope(self, max_pos: int, head_dim: int) -> dict | None:
        a = self.arch
        if "rope_factors_long.weight" in self.tensors:  # Phi-3 LongRoPE (llama.cpp writes no scaling type for it)
            orig = self._field(f"{a}.rope.scaling.original_context_length")
            long, short = (self._get(f"rope_factors_{k}.weight").tolist() for k in ("long", "short"))
            if len(long) != head_dim // 2 or len(short) != head_dim // 2:
                raise self._refuse("rope_factors_long/short", f"{len(long)}/{len(short)} values",
                                   f"head_dim / 2 = {head_dim // 2} values")
            out = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                   "original_max_position_embeddings": orig}
            attn = self._field(f"{a}.rope.scaling.attn_factor", None)
            return out | ({"attention_factor": float(attn)} if attn is not None else {})
        kind = self._field(f"{a}.rope.scaling.type", "none")
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._field(f"{a}.rope.scaling.factor"))}
        raise self._refuse(f"{a}.rope.scaling.type", kind, "none or linear (convert the HF directory for other "
                           "RoPE scalings)")

    def _window_layers(self, layers: int) -> list[int]:
        """Sliding layers: {arch}.attention.sliding_window_pattern (an interval, or one flag per layer) or the
        family's fixed pattern as llama.cpp sets it (Gemma 2 every other layer from the first, Gemma 3 five of
        six; Phi-3 and Qwen3 every layer)."""
        a = self.arch
        pattern = self._field(f"{a}.attention.sliding_window_pattern", None)
        if isinstance(pattern, list):
            if len(pattern) != layers:
                raise self._refuse(f"{a}.attention.sliding_window_pattern", f"{len(pattern)} flags", f"{layers}")
            return [j for j in range(layers) if pattern[j]]
        every = pattern or {"gemma2": 2, "gemma3": 6}.get(a, 0)
        return [j for j in range(layers) if (j + 1) % every] if every else list(range(layers))

    def _gemma(self, hidden: int, heads: int, head_dim: int, layers: int) -> dict:
        a = self.arch
        scale = self._field(f"{a}.attention.scale", None)
        if scale is None:
            scale = (hidden // heads if layers == _GEMMA_27B_LAYERS[a] else head_dim) ** -0.5
        attn_cap = float(self._field(f"{a}.attn_logit_softcapping", 0.0) or 0.0)
        if a == "gemma3" and attn_cap:
            raise self._refuse(f"{a}.attn_logit_softcapping", attn_cap, "none (Gemma 3 attention has no soft cap)")
        out = dict(hidden_act="gelu_pytorch_tanh", norm_plus_one=True, sandwich_norms=True, embed_scale=hidden ** 0.5,
                   attn_scale=float(scale), attn_softcap=attn_cap,
                   final_softcap=float(self._field(f"{a}.final_logit_softcapping", 0.0) or 0.0))
        if a == "gemma3":
            out["local_rope_theta"] = float(self._field(f"{a}.rope.freq_base_swa", 10000.0))
        return out

    def _experts(self, experts: int, layers: int) -> dict:
        a = self.arch
        if a not in ("llama", "qwen3moe"):
            raise self._refuse(f"{a}.expert_count", experts, "0 (experts are read for llama-arch Mixtral and "
                               "qwen3moe only)")
        old = next((n for n in self.tensors if _OLD_EXPERTS.match(n)), None)
        if old:
            raise SourceError(f"{self.path}: GGUF tensor {old!r} is one expert of an unknown (per-expert) layout; "
                              "expected the stacked blk.N.ffn_gate_exps / ffn_up_exps / ffn_down_exps")
        for key, ok in ((f"{a}.expert_shared_count", 0), (f"{a}.expert_group_count", 0),
                        (f"{a}.expert_weights_scale", 1.0), (f"{a}.expert_gating_func", 1)):  # 1: softmax
            value = self._field(key, ok)
            if value != ok:
                raise self._refuse(key, value, f"{ok} (softmax top-k routing over plain experts, as Mixtral and "
                                   "Qwen3-MoE route)")
        top = self._field(f"{a}.expert_used_count")
        for i in range(layers):
            for part in ("gate_inp", "gate_exps", "up_exps", "down_exps"):
                name = f"blk.{i}.ffn_{part}.weight"
                t = self.tensors.get(name)
                if t is None:
                    raise SourceError(f"{self.path}: GGUF tensor {name!r} missing")
                count = int(t.shape[-1])  # ggml dims run fastest first: the expert (or router row) count is last
                if count != experts:
                    raise SourceError(f"{self.path}: GGUF tensor {name!r} holds {count} experts but "
                                      f"{a}.expert_count is {experts}")
        return dict(num_experts=experts, num_experts_per_tok=top,
                    norm_topk_prob=bool(self._field(f"{a}.expert_weights_norm", True)))

    # ------------------------------------------------------------------ tensors
    def _layer_names(self, i: int) -> dict[str, str]:
        """Canonical name -> GGUF tensor name (without .weight unless a bias) of layer i."""
        c, p, a = self.config, f"blk.{i}.", self.arch
        names = {"attn_norm": "attn_norm"}
        names |= ({"wqkv": "attn_qkv"} if a == "phi3" else {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v"})
        names["wo"] = "attn_output"
        if c.attention_bias:
            names |= {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
        if c.o_bias:
            names["bo"] = "attn_output.bias"
        if c.qk_norm:
            names |= {"q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
        if c.sandwich_norms:
            names |= {"post_attn_norm": "post_attention_norm", "post_mlp_norm": "post_ffw_norm"}
        names["mlp_norm"] = "ffn_norm"
        if c.num_experts:
            names |= {"router": "ffn_gate_inp", "gate_exps": "ffn_gate_exps", "up_exps": "ffn_up_exps",
                      "down_exps": "ffn_down_exps"}
        elif a == "phi3":
            names |= {"w_gate_up": "ffn_up", "w_down": "ffn_down"}
        else:
            names |= {"w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
        if c.mlp_bias:
            names |= {"b_gate": "ffn_gate.bias", "b_up": "ffn_up.bias", "b_down": "ffn_down.bias"}
        return {k: p + (v if v.endswith(".bias") else v + ".weight") for k, v in names.items()}

    def _get(self, name: str):
        import torch
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise SourceError(f"{self.path}: GGUF tensor {name!r} missing")
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml stores dims fastest-first
        return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))

    @staticmethod
    def _unpermute(w, heads: int):
        """Undo llama.cpp's q/k row permutation (interleaved rotary pairs back to HF's half split)."""
        rows = w.shape[0]
        return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    def embed(self) -> dict:
        return {"tok_embed": self._get("token_embd.weight")}

    def layer(self, i: int) -> dict:
        c = self.config
        names = self._layer_names(i)
        stacked = {k: names.pop(k) for k in ("gate_exps", "up_exps", "down_exps") if k in names}
        out = {k: self._get(v) for k, v in names.items()}
        if self.arch in ("llama", "mistral"):  # only llama-arch q/k were permuted by llama.cpp's converter
            for k, heads in (("wq", c.num_heads), ("bq", c.num_heads), ("wk", c.num_kv_heads), ("bk", c.num_kv_heads)):
                if k in out:
                    out[k] = self._unpermute(out[k], heads)
        if c.norm_plus_one:
            for k in ("attn_norm", "q_norm", "k_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"):
                if k in out:
                    out[k] = out[k] - 1
        if "wqkv" in out:  # Phi-3: rows are q, then k, then v
            qkv = out.pop("wqkv")
            out = {"wq": qkv[:c.q_dim], "wk": qkv[c.q_dim:c.q_dim + c.kv_dim], "wv": qkv[c.q_dim + c.kv_dim:], **out}
        if "w_gate_up" in out:  # Phi-3: gate rows, then up rows
            gate_up = out.pop("w_gate_up")
            out |= {"w_gate": gate_up[:c.intermediate_size], "w_up": gate_up[c.intermediate_size:]}
        if stacked:  # [E, I, H], [E, I, H], [E, H, I] -> expert after expert, each one contiguous run
            gate, up, down = (self._get(stacked[k]) for k in ("gate_exps", "up_exps", "down_exps"))
            for j in range(c.num_experts):
                out |= {f"e{j}.w_gate": gate[j], f"e{j}.w_up": up[j], f"e{j}.w_down": down[j]}
        return out

    def head(self) -> dict:
        norm = self._get("output_norm.weight")
        out = {"norm": norm - 1 if self.config.norm_plus_one else norm}
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self._get("output.weight")
        return out

    def save_tokenizer(self, out: Path) -> bool:
        if "tokenizer.ggml.model" not in self.reader.fields:
            return False  # a tokenizer-free GGUF: the engine takes token ids
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        tok.save_pretrained(str(out))
        return True
