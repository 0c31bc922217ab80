"""Tensor parallelism on CPU: real processes (gloo or the SSD ring) give the single-process engine's numbers.

One decoder layer (Llama GQA with K/V heads split, Llama with one K/V head copied to both ranks, biases that are
added after the reduction, OPT) and a whole random model's last-position logits and greedy tokens (Llama GQA, OPT)
match the single-process engine in float32 over 2 ranks, as do SmolLM2-135M's real weights over 3. Each rank
streams only its own shard store (engine/tpshards.py), and the shards reassemble to the original tensors byte for
byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hf_random import save_random_model

from kubeflash_node.engine.generate import Engine, GenParams
from kubeflash_node.engine.kvcache import LayerKV
from kubeflash_node.engine.model import LAYERS, make_batch
from kubeflash_node.engine.policy import Policy
from kubeflash_node.engine.rope import Rope
from kubeflash_node.engine.ssdring import RingConfig, SSDRing
from kubeflash_node.engine.tensorparallel import (
    TP_LAYERS,
    TensorParallelError,
    TPEngine,
    gloo_reduce,
    init_gloo,
    local_config,
    plan,
    ring_reduce,
    shard_layer,
)
from kubeflash_node.engine.tpshards import merge_shards, shard_store
from kubeflash_node.store.convert import convert
from kubeflash_node.store.modelconfig import ModelConfig

TOL = dict(atol=2e-5, rtol=2e-5)
LAYER_CONFIGS = {
    "llama-gqa": ModelConfig(architecture="llama", vocab_size=50, hidden_size=64, intermediate_size=90,
                             num_layers=1, num_heads=4, num_kv_heads=2),
    "llama-one-kv-head-biases": ModelConfig(architecture="llama", vocab_size=50, hidden_size=64, intermediate_size=96,
                                            num_layers=1, num_heads=4, num_kv_heads=1, attention_bias=True,
                                            o_bias=True, mlp_bias=True),
    "opt": ModelConfig(architecture="opt", vocab_size=50, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=4, attention_bias=True, o_bias=True, mlp_bias=True),
}


def _layer_weights(c: ModelConfig) -> dict[str, torch.Tensor]:
    """Random weights of one layer under the store's names (biases and norms perturbed too)."""
    g = torch.Generator().manual_seed(3)
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    one = lambda n: 1 + r(n)  # noqa: E731
    if c.architecture == "opt":
        return {"attn_norm_w": one(h), "attn_norm_b": r(h), "wq": r(h, h), "bq": r(h), "wk": r(h, h), "bk": r(h),
                "wv": r(h, h), "bv": r(h), "wo": r(h, h), "bo": r(h), "mlp_norm_w": one(h), "mlp_norm_b": r(h),
                "fc1_w": r(i, h), "fc1_b": r(i), "fc2_w": r(h, i), "fc2_b": r(h)}
    w = {"attn_norm": one(h), "wq": r(q, h), "wk": r(kv, h), "wv": r(kv, h), "wo": r(h, q), "mlp_norm": one(h),
         "w_gate": r(i, h), "w_up": r(i, h), "w_down": r(h, i)}
    if c.attention_bias:
        w |= {"bq": r(q), "bk": r(kv), "bv": r(kv)}
    if c.o_bias:
        w["bo"] = r(h)
    if c.mlp_bias:
        w |= {"b_gate": r(i), "b_up": r(i), "b_down": r(h)}
    return w


def _reducer(kind: str, rank: int, tmp: Path, world: int, session: str):
    if kind == "gloo":
        return gloo_reduce
    return ring_reduce(SSDRing(rank, RingConfig(dirs=tuple(tmp / f"ssd{r}" for r in range(world)),
                                                session=session, timeout_s=60)))


def _layer_worker(rank: int, world: int, tmp: str, kind: str) -> None:
    """Each config's layer: TP on this rank's shard vs the whole layer (model.LAYERS), prefill of a padded batch
    then one decode step over the cache (rank 0 writes both differences)."""
    torch.set_num_threads(1)  # forked: the parent's OpenMP pool hangs a child that enters it
    tmp = Path(tmp)
    init_gloo(rank, world, f"file://{tmp}/pg", timeout_s=60)
    out = {}
    for name, c in LAYER_CONFIGS.items():
        w = _layer_weights(c)
        s = plan(c, rank, world)
        lc, mine = local_config(c, s), shard_layer(c, w, s)
        reduce = _reducer(kind, rank, tmp, world, name)
        x = torch.randn(2, 6, c.hidden_size, generator=torch.Generator().manual_seed(5))
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
        errs = []
        caches = {"full": LayerKV(None, None, False), "tp": LayerKV(None, None, False)}
        for start, new, xs in ((0, 6, x), (6, 1, x[:, -1:] * 0.5)):
            batch = make_batch(mask, start, new)
            rope = Rope(c)(batch.positions, torch.float32) if c.architecture == "llama" else None
            batch.rope_at = (lambda pos, c=c: Rope(c)(pos, torch.float32))
            want = LAYERS[c.architecture](c, w, xs, batch, caches["full"], rope)
            got = TP_LAYERS[c.architecture](lc, mine, xs, batch, caches["tp"], rope, reduce=reduce)
            errs.append((got - want).abs().max().item())
            for key in caches:  # keep what each cache saw as the prefix of the decode step
                k, v, _ = caches[key].new
                caches[key] = LayerKV(k, v, False)
        out[name] = errs
    if rank == 0:
        (tmp / f"layer-{kind}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["gloo", "ssd-ring"])
def test_one_layer_matches_single_process(kind, tmp_path):
    """Prefill and a decode step of one layer, split over 2 ranks, equal the whole layer within float32 rounding."""
    for r in range(2):
        (tmp_path / f"ssd{r}").mkdir()
    mp.start_processes(_layer_worker, args=(2, str(tmp_path), kind), nprocs=2, start_method="fork")
    errs = json.loads((tmp_path / f"layer-{kind}.json").read_text())
    assert set(errs) == set(LAYER_CONFIGS)
    for name, (prefill, decode) in errs.items():
        assert prefill < 2e-5 and decode < 2e-5, (name, prefill, decode)


def _random_store(name: str, tmp: Path) -> Path:
    from transformers import LlamaConfig, OPTConfig

    small = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128)
    cfg = (LlamaConfig(**small, intermediate_size=128, num_key_value_heads=2) if name == "llama-gqa" else
           OPTConfig(**small, ffn_dim=128, word_embed_proj_dim=64))
    save_random_model(cfg, tmp / "hf")
    convert(str(tmp / "hf"), tmp / "store", dtype="float32")
    return tmp / "store"


PROMPTS = [[5, 17, 33, 2, 9], [44, 1, 250, 7, 7, 7, 100, 12, 3, 8, 61]]


def _model_worker(rank: int, world: int, tmp: str, kind: str) -> None:
    torch.set_num_threads(1)  # forked: see _layer_worker
    tmp = Path(tmp)
    init_gloo(rank, world, f"file://{tmp}/pg", timeout_s=60)
    eng = TPEngine(tmp / f"shard{rank}", rank=rank, world=world, reduce=_reducer(kind, rank, tmp, world, "m"),
                   policy=Policy(gpu_batch_size=2))
    try:
        logits = eng.prefill_logits(PROMPTS)
        done = eng.generate(PROMPTS, GenParams(max_new_tokens=4, temperature=0.0))
    finally:
        eng.close()
    host = TPEngine(tmp / f"shard{rank}", rank=rank, world=world, reduce=_reducer(kind, rank, tmp, world, "h"),
                    policy=Policy(gpu_batch_size=1, num_gpu_batches=2, kv="cpu"))  # per-rank heads in host KV
    try:
        on_host = host.generate(PROMPTS, GenParams(max_new_tokens=4, temperature=0.0))
    finally:
        host.close()
    torch.save({"logits": logits, "tokens": [c.tokens for c in done], "host": [c.tokens for c in on_host]},
               tmp / f"out{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["gloo", "ssd-ring"])
@pytest.mark.parametrize("name", ["llama-gqa", "opt"])
def test_model_matches_single_process(name, kind, tmp_path):
    """A 2-layer random model, each rank streaming its own shard store: logits and greedy tokens of both ranks
    (KV on the device, and in host memory with two micro-batches) equal the single-process Engine's."""
    store = _random_store(name, tmp_path)
    shard_store(store, [tmp_path / "shard0", tmp_path / "shard1"])
    for r in range(2):
        (tmp_path / f"ssd{r}").mkdir()
    mp.start_processes(_model_worker, args=(2, str(tmp_path), kind), nprocs=2, start_method="fork")
    eng = Engine(store, policy=Policy(gpu_batch_size=2))
    try:
        want = eng.prefill_logits(PROMPTS)
        tokens = [c.tokens for c in eng.generate(PROMPTS, GenParams(max_new_tokens=4, temperature=0.0))]
    finally:
        eng.close()
    for r in range(2):
        got = torch.load(tmp_path / f"out{r}.pt")
        torch.testing.assert_close(got["logits"], want, **TOL)
        assert got["tokens"] == tokens and got["host"] == tokens


@pytest.mark.parametrize("name,world", [("llama-gqa", 2), ("llama-gqa", 4), ("opt", 2)])
def test_shards_reassemble_to_the_original_bytes(name, world, tmp_path):
    """Split into `world` shard stores (K/V heads copied when fewer than ranks), merged back: every tensor equals the
    original byte for byte; embed and head files are identical copies; each layer file is about 1/world the size."""
    store = _random_store(name, tmp_path)
    shards = [tmp_path / f"shard{r}" for r in range(world)]
    shard_store(store, shards)
    from kubeflash_node.store.convert import StoreSource

    src = StoreSource(store)
    merged = merge_shards(shards)
    n = len(src.m.stages)
    for i, stage in enumerate(src.m.stages):
        orig = src.embed() if i == 0 else src.head() if i == n - 1 else src.layer(i - 1)
        assert list(merged[i]) == list(orig), stage
        for t in orig:
            assert merged[i][t].shape == orig[t].shape and merged[i][t].numpy().tobytes() == orig[t].numpy().tobytes()
    for d in shards:
        assert hashlib.sha256((d / "embed.bin").read_bytes()).hexdigest() == src.m.files["embed.bin"].sha256
        size = (d / "layer_000.bin").stat().st_size
        assert size < src.m.files["layer_000.bin"].size * (0.75 if world == 2 else 0.5)


def test_bad_splits_are_refused(tmp_path):
    """Shapes that cannot be split name the field; a shard opened as the wrong rank is refused."""
    c = LAYER_CONFIGS["llama-gqa"]
    with pytest.raises(TensorParallelError, match="num_heads 4 is not a multiple of the 3 ranks"):
        plan(c, 0, 3)
    from dataclasses import replace

    with pytest.raises(TensorParallelError, match="num_kv_heads 3 must be a multiple or a divisor of the 2 ranks"):
        plan(replace(c, num_heads=6, num_kv_heads=3), 0, 2)
    store = _random_store("llama-gqa", tmp_path)
    shard_store(store, [tmp_path / "s0", tmp_path / "s1"])
    with pytest.raises(TensorParallelError, match=r"s1: manifest extra.tensor_parallel is .*expected the shard of rank 0"):
        TPEngine(tmp_path / "s1", rank=0, world=2, reduce=gloo_reduce)


def _smol_worker(rank: int, world: int, tmp: str, prompts: list) -> None:
    torch.set_num_threads(1)  # forked: see _layer_worker
    tmp = Path(tmp)
    init_gloo(rank, world, f"file://{tmp}/pg", timeout_s=120)
    eng = TPEngine(tmp / f"shard{rank}", rank=rank, world=world, reduce=gloo_reduce, policy=Policy(gpu_batch_size=2))
    try:
        torch.save(eng.prefill_logits(prompts), tmp / f"out{rank}.pt")
    finally:
        eng.close()
    torch.distributed.destroy_process_group()


def test_smollm2_three_ranks_match_single_process(smol_store, tmp_path):
    """Real weights: SmolLM2-135M (9 query heads over 3 K/V heads) split over 3 ranks, one K/V head each; rank 0's
    last-position logits of two real prompts are within float32 rounding of the single-process engine's."""
    prompts = [[1, 504, 3458, 314, 4114, 282], [1, 4521, 28, 940, 359, 346, 47, 2227, 314, 253, 1345, 30]]
    shard_store(smol_store, [tmp_path / f"shard{r}" for r in range(3)])
    mp.start_processes(_smol_worker, args=(3, str(tmp_path), prompts), nprocs=3, start_method="fork")
    eng = Engine(smol_store, policy=Policy(gpu_batch_size=2))
    try:
        want = eng.prefill_logits(prompts)
    finally:
        eng.close()
    got = torch.load(tmp_path / "out0.pt")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
