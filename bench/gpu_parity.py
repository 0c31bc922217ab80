"""Greedy-token parity of the engine with transformers on one device, through every weight, KV and MoE path.

    python3 bench/gpu_parity.py --device cuda            # the whole matrix (bench/gpu-suite.sh parity)
    .venv/bin/python bench/gpu_parity.py --quick         # a subset, on the CPU unless cuda is there

Builds tiny random transformers models (tests/engine/hf_random.py: a Llama with GQA and llama3 rotary, an OPT, a
Qwen3-MoE), converts each to a kubeflash store in float32 under --work, and for every case runs the Engine on
--device and transformers' generate on the same weights on the same device, left-padded prompts of mixed lengths,
--new greedy tokens. Cases: weights resident on the device (fused Q/K/V and gate/up), in CPU memory, streamed from
disk (posix, and O_DIRECT where the file system takes it); KV on the device, in CPU memory with CPU attention, on
disk with write-back; MoE with the hot-expert cache off and on (task size cutting expert runs); input-channel sparse
reads at target 0, of the FFN and of the FFN and attention (every channel kept: transformers' tokens). One line per
case: PASS/FAIL, the case, and for a FAIL the first differing (sequence, position). Exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "engine"))
from hf_random import save_random_model  # noqa: E402

from kubeflash_node.engine.generate import Engine, GenParams  # noqa: E402
from kubeflash_node.engine.io import odirect_supported  # noqa: E402
from kubeflash_node.engine.policy import Policy  # noqa: E402
from kubeflash_node.store.convert import convert  # noqa: E402

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=256)
PROMPTS = [list(range(5, 25)), list(range(40, 47)), list(range(100, 131))]
KV = {"kv-device": {}, "kv-cpu-attention": dict(kv="cpu", cpu_attention=True),
      "kv-disk-writeback": dict(kv="disk", kv_write_back=True)}


def configs() -> dict:
    from transformers import LlamaConfig, OPTConfig, Qwen3MoeConfig

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    return {"llama-gqa": LlamaConfig(**SMALL, num_key_value_heads=2, rope_scaling=llama3, rope_theta=500000.0),
            "opt": OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=64),
            "qwen3-moe": Qwen3MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_experts=16,
                                        num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                                        max_position_embeddings=256)}


@dataclass
class Case:
    model: str
    name: str
    policy: dict
    sparse: bool = False  # input-channel sparsity at target 0 (the store calibrated and its channel files written)
    attention: bool = False  # with sparse: the attention's inputs too (q/k/v and o columns from attn_channels/)
    extra: dict = field(default_factory=dict)


def weight_tiers(store: Path) -> dict[str, dict]:
    """Where the weights live: resident on the device, in CPU memory, streamed from disk through each backend."""
    tiers = {"w-device": dict(weights_gpu_percent=100), "w-cpu": dict(weights_cpu_percent=100),
             "w-disk-posix": dict(io_backend="posix")}
    if odirect_supported(store / "manifest.json"):
        tiers["w-disk-odirect"] = dict(io_backend="odirect")
    return tiers


def cases(model: str, store: Path, quick: bool) -> list[Case]:
    """The matrix for one model; `quick`: every weight tier with KV on the device, every KV tier streamed."""
    out = []
    tiers = weight_tiers(store)
    for w, wp in tiers.items():
        for k, kp in KV.items():
            if quick and k != "kv-device" and w != "w-disk-posix":
                continue
            out.append(Case(model, f"{w} {k}", wp | kp))
    if model == "qwen3-moe":  # hot-expert cache on; small read tasks cut the routed runs inside experts
        for w in [t for t in tiers if t.startswith("w-disk")]:
            out.append(Case(model, f"{w} kv-device experts-cache", tiers[w] | dict(expert_cache_bytes=64 << 10,
                                                                                    io_task_bytes=8192)))
    if model == "llama-gqa":  # input-channel sparse reads (target 0: all channels kept)
        out.append(Case(model, "w-disk-posix kv-device sparse-input-t0", dict(io_backend="posix"), sparse=True))
        out.append(Case(model, "w-disk-posix kv-device sparse-input-attn-t0", dict(io_backend="posix"), sparse=True,
                        attention=True))
    return out


def build(name: str, work: Path, sparse: bool):
    """(transformers model, store dir): random weights saved and converted in float32."""
    root = work / name
    model = save_random_model(configs()[name], root / "hf")
    convert(str(root / "hf"), root / "store", dtype="float32")
    if sparse:
        from kubeflash_node.engine.cli_calibrate import calibrate
        from kubeflash_node.store.channels import write_attn_channels, write_channels

        ids = torch.randint(0, 300, (512,), generator=torch.Generator().manual_seed(1)).tolist()
        calibrate(root / "store", ids, (0.0,), window=256)
        write_channels(root / "store")
        write_attn_channels(root / "store")
    return model, root / "store"


def reference(model, device: str, new: int) -> list[list[int]]:
    """transformers' greedy tokens for PROMPTS, left padded as the engine pads them, on `device`."""
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS], device=device)
    model.to(device)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
    finally:
        model.to("cpu")
    return out[:, width:].tolist()


def engine_tokens(case: Case, store: Path, device: str, new: int, job_dir: Path) -> list[list[int]]:
    ffn = None
    if case.sparse:
        from kubeflash_node.engine import sparse
        from kubeflash_node.store.format import load_manifest
        from kubeflash_node.store.modelconfig import ModelConfig

        ffn = sparse.for_job(ModelConfig.from_dict(load_manifest(store).config), store, 0.0, gap=0, method="input",
                             attention=case.attention)
    engine = Engine(store, policy=Policy(gpu_batch_size=len(PROMPTS), compute_dtype="float32", **case.policy),
                    device=device, job_dir=job_dir, sparsity=ffn)
    try:
        return [c.tokens for c in engine.generate(PROMPTS, GenParams(max_new_tokens=new))]
    finally:
        engine.close()


def first_difference(got: list[list[int]], want: list[list[int]]) -> tuple[int, int] | None:
    for s, (g, w) in enumerate(zip(got, want)):
        for i in range(max(len(g), len(w))):
            if i >= len(g) or i >= len(w) or g[i] != w[i]:
                return s, i
    return None


def run(models: list[str], device: str, new: int, quick: bool, work: Path, only: list[str] | None = None) -> int:
    """Every case of `models` (`only`: those whose name is one of these); prints one line each, returns the number
    of FAILs."""
    fails = 0
    for name in models:
        t0 = time.monotonic()
        model, store = build(name, work, sparse=name == "llama-gqa")
        want = reference(model, device, new)
        print(f"# {name}: converted and transformers' reference on {device} in {time.monotonic() - t0:.1f}s",
              flush=True)
        for i, case in enumerate(cases(name, store, quick)):
            if only and case.name not in only:
                continue
            t = time.monotonic()
            try:
                got = engine_tokens(case, store, device, new, work / name / f"job{i}")
                diff = first_difference(got, want)
                verdict = "PASS" if diff is None else f"FAIL first differing (sequence, position) {diff}"
            except Exception as e:  # a crash in one path is that case's FAIL, the others still run
                verdict = f"FAIL {type(e).__name__}: {e}"
            fails += not verdict.startswith("PASS")
            print(f"{verdict[:4]} {device} {name} {case.name}{verdict[4:]} ({time.monotonic() - t:.1f}s)", flush=True)
    return fails


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device the engine and transformers run on (default: cuda if available, else cpu)")
    p.add_argument("--models", nargs="+", default=list(configs()), choices=list(configs()),
                   help="which tiny models (default: all)")
    p.add_argument("--new", type=int, default=8, help="greedy tokens generated per prompt (default 8)")
    p.add_argument("--quick", action="store_true",
                   help="a subset: every weight tier with KV on the device, every KV tier with streamed weights")
    p.add_argument("--only", nargs="+", metavar="CASE",
                   help="run only these cases, named as printed (e.g. 'w-disk-posix kv-device experts-cache')")
    p.add_argument("--work", type=Path, default=None, help="where models and stores are written (default: a temp dir, "
                                                           "removed afterwards)")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch sees no CUDA device")
    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
        fails = run(a.models, a.device, a.new, a.quick, a.work, a.only)
    else:
        with tempfile.TemporaryDirectory(prefix="kf-parity-", dir="/tmp") as d:
            fails = run(a.models, a.device, a.new, a.quick, Path(d), a.only)
    print(f"FAIL: {fails} case(s) failed" if fails else "PASS: every case")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
