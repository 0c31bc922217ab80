"""The peer-benchmark runners (bench/peers): FlexGen's local tokenizer, argv split and result plumbing (FlexGen
itself needs CUDA; the tests that import it are skipped where the `flexgen` wheel is not installed), and the
accelerate disk-offload runner end to end on CPU with a tiny OPT, its outputs checked against an in-memory model
holding the same weights."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from argparse import ArgumentTypeError, Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "peers"))

import flexgen_opt  # noqa: E402
import peer_common  # noqa: E402
from flexgen_opt import LOG_FIELDS, PROMPT_IDS, LocalOptTokenizer  # noqa: E402

PROMPT = "Paris is the capital city of"
FG_ARGV = ["--model", "facebook/opt-13b", "--path", "_DUMMY_", "--offload-dir", "/tmp/fgoff", "--prompt-len", "512",
           "--gen-len", "32", "--percent", "0", "0", "100", "0", "100", "0", "--gpu-batch-size", "16",
           "--num-gpu-batches", "2", "--cut-gen-len", "4"]


# ---- shared helpers ----------------------------------------------------------------------------------------------

def test_parse_size_units_and_error():
    assert peer_common.parse_size("12GiB") == 12 << 30
    assert peer_common.parse_size("12Gi") == 12 << 30
    assert peer_common.parse_size("12G") == 12 * 10**9
    assert peer_common.parse_size("500MiB") == 500 << 20
    assert peer_common.parse_size("1.5GiB") == 3 << 29
    assert peer_common.parse_size("1073741824") == 1 << 30
    for bad in ("12 gigs", "GiB", "-1GiB", ""):
        with pytest.raises(ArgumentTypeError, match="expected a size like 12GiB"):
            peer_common.parse_size(bad)


def test_drop_page_cache_falls_back_to_fadvise(tmp_path, monkeypatch):
    """Without root, every file under the folder is fadvised DONTNEED (never the real drop_caches here)."""
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "a.dat", tmp_path / "sub" / "b.dat"]
    for f in files:
        f.write_bytes(b"x" * 4096)

    def refuse(self, *args, **kwargs):
        raise PermissionError(f"{self}: not root")

    advised = []
    monkeypatch.setattr(Path, "write_text", refuse)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: advised.append((off, n, advice)))
    assert peer_common.drop_page_cache(tmp_path) == "fadvise"
    assert advised == [(0, 0, os.POSIX_FADV_DONTNEED)] * len(files)


# ---- FlexGen -----------------------------------------------------------------------------------------------------

def test_local_tokenizer_left_pads_to_exactly_max_length():
    tok = LocalOptTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
    prompt_ids = [2] + PROMPT_IDS[PROMPT]
    for n in (len(prompt_ids), 32, 512, 2048):
        rows = tok([PROMPT, PROMPT], padding="max_length", max_length=n).input_ids
        assert len(rows) == 2 and all(len(r) == n for r in rows)
        assert rows[0][n - len(prompt_ids):] == prompt_ids  # the prompt is right-aligned, BOS first
        assert rows[0][:n - len(prompt_ids)] == [1] * (n - len(prompt_ids))  # OPT's pad id on the left
        assert all(type(i) is int for i in rows[0])
    with pytest.raises(ValueError, match="does not fit"):
        tok([PROMPT], padding="max_length", max_length=len(prompt_ids) - 1)
    with pytest.raises(KeyError):
        tok(["another prompt"], padding="max_length", max_length=32)
    with pytest.raises(ValueError, match="max_length only"):
        tok([PROMPT], padding="longest", max_length=32)


def test_local_tokenizer_batch_decode_returns_strings():
    tok = LocalOptTokenizer.from_pretrained("facebook/opt-30b")
    out = tok.batch_decode([[1, 1, 2, 16, 5], [2, 9]], skip_special_tokens=True)
    assert out == ["16 5", "9"]
    assert tok.batch_decode([[1, 2, 9]], skip_special_tokens=False) == ["1 2 9"]


def test_runner_argv_split_at_double_dash(capsys):
    args, fg_argv = flexgen_opt.parse_args(["--json", "r.json", "--gpu-memory", "12GiB", "--cold", "--copy-threads",
                                            "2", "--", *FG_ARGV])
    assert (args.json, args.gpu_memory, args.cold, args.copy_threads, fg_argv) == (
        Path("r.json"), 12 << 30, True, 2, FG_ARGV)
    assert flexgen_opt.parse_args(["--json", "r.json", "--"])[1] == []  # FlexGen's own defaults
    with pytest.raises(SystemExit):
        flexgen_opt.parse_args(["--json", "r.json", *FG_ARGV])
    assert "after `--`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flexgen_opt.parse_args(["--json", "r.json", "--gpu-memory", "12GB!", "--"])
    assert "expected a size like 12GiB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flexgen_opt.parse_args(["--json", "r.json", "--copy-threads", "0", "--"])
    assert "at least 1" in capsys.readouterr().err


def _flexgen_record(prompts: int, prompt_len: int, gen_len: int, projected: bool) -> dict:
    """write_benchmark_log's arguments as run_flexgen computes them (numpy scalars included)."""
    import numpy as np

    prefill, decode = np.float64(2.5), np.float64(40.0)
    return dict(zip(LOG_FIELDS, (
        26 * 2**30, 5 * 2**30, 2**28, 11 * 2**30, projected, prefill, prompts * prompt_len / prefill,
        decode, prompts * (gen_len - 1) / decode, prefill + decode, prompts * gen_len / (prefill + decode))))


def test_build_result_from_flexgen_log_arguments(tmp_path, capsys):
    fg = Namespace(model="facebook/opt-13b", gpu_batch_size=16, num_gpu_batches=2, prompt_len=512, gen_len=32)
    record = _flexgen_record(32, 512, 32, projected=True) | {"page_cache": "drop_caches"}
    result = flexgen_opt.build_result(fg, record, argv=FG_ARGV, version="0.1.8", cap_bytes=12 << 30,
                                      copy_threads=2)
    assert result["prompts"] == 32 and result["generated_tokens"] == 32 * 32
    assert result["total_s"] == pytest.approx(42.5) and result["prefill_s"] + result["decode_s"] == result["total_s"]
    assert result["tokens_per_s"] == pytest.approx(result["generated_tokens"] / result["total_s"])
    assert result["decode_tokens_per_s"] == pytest.approx(32 * 31 / 40.0)
    assert result["projected"] is True and result["gpu_peak_bytes"] == 11 * 2**30
    assert result["args"] == FG_ARGV and result["page_cache"] == "drop_caches" and result["copy_threads"] == 2
    assert all(type(result[k]) is float for k in ("prefill_s", "decode_s", "total_s", "tokens_per_s"))
    peer_common.write_result(tmp_path / "out" / "r.json", result)
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == result
    assert "flexgen facebook/opt-13b: 32 prompts x 512 tokens, 32 generated each: 42.50 s (projected), " \
           "24.094 generated tokens/s, GPU peak 11.00 GiB" in capsys.readouterr().out


@pytest.fixture
def fo(monkeypatch):
    """flexgen.flex_opt with its module attributes restored after the test (install_patches replaces them)."""
    if importlib.util.find_spec("flexgen") is None:
        pytest.skip("the flexgen wheel is not installed")
    module = flexgen_opt.import_flex_opt()
    for name in ("AutoTokenizer", "write_benchmark_log", "TorchDisk", "get_opt_config"):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(module.OptLM, "generate", module.OptLM.generate)
    return module


def test_flexgen_parser_and_early_checks(fo, tmp_path, capsys):
    fg = flexgen_opt.parse_flexgen_args(fo, FG_ARGV, tmp_path / "r.json")
    assert (fg.model, fg.percent, fg.gpu_batch_size, fg.num_gpu_batches, fg.cut_gen_len) == (
        "facebook/opt-13b", [0, 0, 100, 0, 100, 0], 16, 2, 4)
    assert fg.log_file == str(tmp_path / "r.flexgen.log")  # FlexGen's log lands next to the JSON
    bad = {"percent": ["--percent", "0", "0", "100"], "cut": ["--cut-gen-len", "3"],
           "path": ["--path", str(tmp_path / "nothing")], "model": ["--model", "facebook/opt-350m"]}
    for argv in bad.values():
        with pytest.raises(SystemExit):
            flexgen_opt.parse_flexgen_args(fo, FG_ARGV + argv, tmp_path / "r.json")
    err = capsys.readouterr().err
    assert "takes 6 numbers" in err and "4 <= N" in err and "no hub here" in err and "--model facebook/opt-350m" in err


def test_long_prompts_need_and_get_more_positions(fo, tmp_path, capsys):
    """OPT's 2048 learned positions stop a long prompt early, with the flag to raise them named; raised, FlexGen's
    config (which sizes its position embedding) has them, and the other fields are FlexGen's own."""
    long = FG_ARGV + ["--prompt-len", "8192"]
    with pytest.raises(SystemExit):
        flexgen_opt.parse_flexgen_args(fo, long, tmp_path / "r.json")
    err = capsys.readouterr().err
    assert "exceeds the model's 2048 learned positions" in err and "--max-seq-len" in err
    plain = fo.get_opt_config("facebook/opt-13b")
    flexgen_opt.raise_max_seq_len(fo, 8224)
    assert flexgen_opt.parse_flexgen_args(fo, long, tmp_path / "r.json").prompt_len == 8192
    raised = fo.get_opt_config("facebook/opt-13b")
    assert raised.max_seq_len == 8224 and raised.hidden_size == plain.hidden_size
    assert fo.get_opt_config("facebook/opt-13b", max_seq_len=4096).max_seq_len == 4096  # an explicit ask wins


def test_flexgen_projection_needs_four_steps(fo):
    """Why --cut-gen-len must be >= 4: project_decode_latency averages the decode steps after two warm-up ones."""
    import warnings

    costs = [3.0, 1.5, 1.2, 1.0]  # prefill, then 3 decode steps
    assert fo.project_decode_latency(costs, 512, 32) == pytest.approx(1.5 + 1.2 + 1.0 * 29)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(fo.project_decode_latency(costs[:3], 512, 32))


def test_patches_feed_flexgen_and_capture_its_log(fo, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(flexgen_opt, "drop_page_cache", lambda folder: calls.append(("drop", folder)) or "fadvise")
    monkeypatch.setattr(fo.OptLM, "generate", lambda self, inputs, **kw: calls.append(("generate", len(inputs))))
    disk_class = fo.TorchDisk
    record = flexgen_opt.install_patches(fo, cold_dir=str(tmp_path), copy_threads=2)
    assert fo.TorchDisk.func is disk_class and fo.TorchDisk.keywords == {"num_copy_threads": 2}

    tokenizer = fo.AutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
    inputs = fo.get_test_inputs(512, 32, tokenizer)  # what run_flexgen feeds OptLM.generate
    assert len(inputs) == 32 and all(len(row) == 512 and row[0] == 1 and row[-7] == 2 for row in inputs)
    fo.OptLM.generate(None, inputs, max_new_tokens=32)
    assert calls == [("drop", tmp_path), ("generate", 32)]  # the cache is dropped before each generate

    values = _flexgen_record(32, 512, 32, projected=False)
    log = fo.write_benchmark_log(str(tmp_path / "fg.log"), *values.values())
    assert "total throughput" in log and (tmp_path / "fg.log").read_text() == log + "\n"  # FlexGen's log still written
    assert record == values | {"page_cache": "fadvise"}
    fg = flexgen_opt.parse_flexgen_args(fo, FG_ARGV, tmp_path / "r.json")
    result = flexgen_opt.build_result(fg, record, argv=FG_ARGV, version="0.1.8", cap_bytes=None, copy_threads=None)
    assert result["projected"] is False and result["tokens_per_s"] == pytest.approx(values["total_throughput"])


def test_flexgen_main_wiring(fo, tmp_path, monkeypatch):
    """main() end to end with run_flexgen stood in for (it needs CUDA): the stand-in uses flex_opt's module
    globals the way run_flexgen does, so it sees the patched tokenizer and log writer."""
    import torch

    seen = {}

    def run_flexgen(args):
        tokenizer = fo.AutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
        seen["inputs"] = fo.get_test_inputs(args.prompt_len, args.gpu_batch_size * args.num_gpu_batches, tokenizer)
        values = _flexgen_record(32, args.prompt_len, args.gen_len, projected=bool(args.cut_gen_len))
        fo.write_benchmark_log(args.log_file, *values.values())

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fo, "run_flexgen", run_flexgen)
    out = tmp_path / "res" / "fg.json"
    result = flexgen_opt.main(["--json", str(out), "--", *FG_ARGV])
    assert json.loads(out.read_text()) == result
    assert len(seen["inputs"]) == 32 and {len(row) for row in seen["inputs"]} == {512}
    assert "total throughput" in (tmp_path / "res" / "fg.flexgen.log").read_text()
    assert result["version"] == "0.1.8" and result["projected"] is True and result["page_cache"] == "warm"
    assert (result["gpu_memory_cap_bytes"], result["copy_threads"]) == (None, None)


def test_flexgen_main_without_cuda(fo, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        flexgen_opt.main(["--json", str(tmp_path / "r.json"), "--", *FG_ARGV])


# ---- accelerate disk offload -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def acc():
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    import accelerate_opt

    return accelerate_opt


@pytest.fixture(scope="module")
def tiny_folder(acc, tmp_path_factory):
    folder = tmp_path_factory.mktemp("opt-tiny")
    assert acc.ensure_weights(acc.opt_config("opt-tiny"), folder, seed=0)
    return folder


def test_presets_match_kubeflash_opt_shapes(acc):
    from kubeflash_node.store.modelconfig import preset

    for name in ("opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b"):
        ours, engine = acc.opt_config(name), preset(name)
        assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.ffn_dim, ours.vocab_size,
                ours.max_position_embeddings, ours.word_embed_proj_dim) == (
            engine.hidden_size, engine.num_layers, engine.num_heads, engine.intermediate_size, engine.vocab_size,
            engine.max_position_embeddings, engine.hidden_size), name
        assert ours.do_layer_norm_before and ours.enable_bias
    model = acc.empty_model(acc.opt_config("opt-13b"))
    n_params = sum(p.numel() for n, p in model.named_parameters() if n not in acc.TIED)
    assert 12.8e9 < n_params < 12.9e9  # OPT-13B's 12.85e9


def test_dummy_weights_folder(acc, tiny_folder):
    import numpy as np

    state = acc.empty_model(acc.opt_config("opt-tiny")).state_dict()
    index = json.loads((tiny_folder / "index.json").read_text())
    assert set(index) == set(state)
    assert sorted(p.name for p in tiny_folder.iterdir()) == sorted([f"{k}.dat" for k in state] + ["index.json"])
    for name, t in state.items():
        assert index[name] == {"dtype": "float16", "shape": list(t.shape)}
        assert (tiny_folder / f"{name}.dat").stat().st_size == 2 * t.numel()

    def load(name):
        return np.memmap(tiny_folder / f"{name}.dat", dtype=np.float16, mode="r")

    assert (load("model.decoder.layers.0.self_attn_layer_norm.weight") == 1).all()
    assert (load("model.decoder.layers.1.fc2.bias") == 0).all()
    fc1 = load("model.decoder.layers.0.fc1.weight").astype(np.float32)
    assert 0.015 < fc1.std() < 0.025 and abs(fc1.mean()) < 0.005
    assert (load("lm_head.weight") == load("model.decoder.embed_tokens.weight")).all()  # tied
    assert not (load("model.decoder.layers.0.fc1.weight")[:64] == load("model.decoder.layers.1.fc1.weight")[:64]).all()


def test_existing_folder_is_reused_and_checked(acc, tiny_folder):
    mtimes = {p.name: p.stat().st_mtime_ns for p in tiny_folder.iterdir()}
    assert not acc.ensure_weights(acc.opt_config("opt-tiny"), tiny_folder)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_folder.iterdir()} == mtimes
    with pytest.raises(SystemExit, match="another model"):
        acc.ensure_weights(acc.opt_config("opt-125m"), tiny_folder)


def _reference_model(acc, config, folder):
    """A plain in-memory model holding the folder's weights (accelerate's own loader)."""
    from accelerate.utils import load_offloaded_weights

    model = acc.empty_model(config)
    load_offloaded_weights(model, json.loads((folder / "index.json").read_text()), str(folder))
    assert not any(p.is_meta for p in model.parameters())
    return model


def test_dispatched_model_computes_from_the_folder(acc, tiny_folder, tmp_path):
    import torch

    config = acc.opt_config("opt-tiny")
    reference = _reference_model(acc, config, tiny_folder)
    ids = torch.randint(4, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_logits = reference(ids).logits
    want_tokens = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False)
    assert len(set(want_tokens[:, 12:].flatten().tolist())) > 1  # the random weights give varied tokens

    for gpu_layers in (0, 1):
        model = acc.dispatched_model(config, tiny_folder, "cpu", gpu_layers)
        resident = {n for n, p in model.named_parameters() if not p.is_meta}
        layer0 = {n for n, _ in model.named_parameters() if n.startswith("model.decoder.layers.0.")}
        assert resident == (layer0 if gpu_layers else set())  # the rest is read from the folder at each forward
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want_logits)
        out, prefill_s, total_s = peer_common.timed_generate(model, ids, 6, lambda: None)
        assert torch.equal(out, want_tokens) and 0 < prefill_s < total_s

    other = tmp_path / "seed1"
    acc.ensure_weights(config, other, seed=1)
    with torch.no_grad():
        assert not torch.equal(acc.dispatched_model(config, other, "cpu")(ids).logits, want_logits)


def test_main_end_to_end_on_cpu(acc, tmp_path, monkeypatch, capsys):
    folder, out = tmp_path / "off", tmp_path / "r.json"
    argv = ["--model", "opt-tiny", "--offload-folder", str(folder), "--json", str(out), "--device", "cpu",
            "--prompts", "3", "--prompt-len", "10", "--gen-len", "5"]
    result = acc.main(argv)
    assert json.loads(out.read_text()) == result
    assert result["system"] == "accelerate-disk-offload" and set(result["versions"]) == {
        "transformers", "accelerate", "torch"}
    assert (result["prompts"], result["prompt_len"], result["gen_len"], result["generated_tokens"]) == (3, 10, 5, 15)
    assert result["tokens_per_s"] == pytest.approx(15 / result["total_s"])
    assert result["prefill_s"] + result["decode_s"] == pytest.approx(result["total_s"])
    assert result["offload_folder_bytes"] == sum(f.stat().st_size for f in folder.glob("*.dat")) > 0
    assert result["gpu_peak_bytes"] is None and result["gpu_memory_cap_bytes"] is None
    assert result["page_cache"] == "warm"
    assert "opt-tiny: 3 prompts x 10 tokens, 5 generated each" in capsys.readouterr().out

    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    monkeypatch.setattr(peer_common, "drop_page_cache", lambda f: "fadvise" if f == folder else "wrong folder")
    again = acc.main(argv + ["--cold", "--gpu-layers", "2", "--no-warmup"])
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes  # the folder is reused as is
    assert again["page_cache"] == "fadvise" and again["gpu_layers"] == 2 and again["generated_tokens"] == 15


def test_accelerate_cli_errors(acc, tmp_path, capsys):
    base = ["--model", "opt-tiny", "--offload-folder", str(tmp_path), "--json", str(tmp_path / "r.json")]
    cases = {"--gpu-memory needs --device cuda": ["--device", "cpu", "--gpu-memory", "4GiB"],
             "has 2 decoder layers": ["--device", "cpu", "--gpu-layers", "3"],
             "exceeds OPT's 2048 positions": ["--device", "cpu", "--prompt-len", "2040", "--gen-len", "9"],
             "invalid choice": ["--device", "cpu", "--model", "opt-175b"]}
    import torch

    if not torch.cuda.is_available():
        cases["no CUDA device: use --device cpu"] = []
    for message, extra in cases.items():
        with pytest.raises(SystemExit):
            acc.parse_args(base + extra)
        assert message in capsys.readouterr().err
