"""Bad model sources and jobs as an outside tester makes them: each is refused in one line naming the config.json
key, the file or the prompt and what was expected, and nothing is written to the store.

(a) config.json options we do not compute, or of the wrong type or range: RoPE keys a rope_type does not read,
    RoPE values transformers would only warn about (factor "2", 0, -1; beta_fast "x"; llama3's high <= low
    frequency factor), rope_scaling that is not an object, sizes given as strings, a null epsilon, a flag "yes".
    Each family the README names (Llama, Qwen3-MoE, Gemma 2/3, Phi-3, Mixtral).
(b) A truncated safetensors file, a config.json that is not JSON, tensors whose shapes disagree with config.json,
    a directory saved without a tokenizer (generation_config.json alone is no tokenizer).
(c) `kubeflash run` of synthetic prompts on a model whose vocabulary is smaller than their token ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hf_random import assert_config_refused

from kubeflash_node.store.convert import SourceError, convert

LLAMA = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
QWEN3_MOE = {**LLAMA, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 16, "head_dim": 8}
MIXTRAL = {**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
PHI3 = {**LLAMA, "model_type": "phi3", "pad_token_id": 0}
GEMMA2 = {**LLAMA, "model_type": "gemma2", "head_dim": 8}
GEMMA3 = {**LLAMA, "model_type": "gemma3_text", "head_dim": 8}
LONG = [1.0] * 4  # head_dim / 2 of the tiny configs

REFUSED = [
    # RoPE options a rope_type does not read: refused by their key, for every family
    pytest.param({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "bogus": 1}},
                 "rope_scaling.bogus = 1", id="llama-linear-unknown-key"),
    pytest.param({**QWEN3_MOE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 16, "whatever": 1}},
                 "rope_scaling.whatever = 1", id="qwen3moe-yarn-unknown-key"),
    pytest.param({**MIXTRAL, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1,
                                              "high_freq_factor": 4, "extra_key": 3}},
                 "rope_scaling.extra_key = 3", id="mixtral-llama3-unknown-key"),
    pytest.param({**PHI3, "rope_scaling": {"type": "longrope", "short_factor": LONG, "long_factor": LONG,
                                           "frobnicate": 1}},
                 "rope_scaling.frobnicate = 1", id="phi3-longrope-unknown-key"),
    pytest.param({**GEMMA2, "rope_scaling": {"rope_type": "default", "factor": 2.0}},
                 "rope_scaling.factor = 2.0", id="gemma2-default-with-factor"),
    pytest.param({**GEMMA3, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6, "zzz": 2},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
                 "rope_parameters.full_attention.zzz = 2", id="gemma3-full-unknown-key"),
    pytest.param({**GEMMA3, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                                "sliding_attention": {"rope_type": "default", "extra": 1}}},
                 "rope_parameters.sliding_attention.extra = 1", id="gemma3-sliding-unknown-key"),
    pytest.param({**LLAMA, "rope_scaling": {"rope_type": "foo", "factor": 2.0}}, "rope_scaling.rope_type = 'foo'",
                 id="llama-unknown-type"),
    # RoPE values of the wrong type or range
    pytest.param({**LLAMA, "rope_scaling": "linear"}, "rope_scaling = 'linear'", id="rope-not-an-object"),
    pytest.param({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor = '2'",
                 id="factor-string"),
    pytest.param({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor = 0",
                 id="factor-zero"),
    pytest.param({**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": -1}}, "rope_scaling.factor = -1",
                 id="factor-negative"),
    pytest.param({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": "x"}},
                 "rope_scaling.beta_fast = 'x'", id="yarn-beta-string"),
    pytest.param({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4,
                                            "high_freq_factor": 1}},
                 "rope_scaling.high_freq_factor = 1", id="llama3-high-below-low"),
    pytest.param({**PHI3, "rope_scaling": {"type": "longrope", "short_factor": ["a"] * 4, "long_factor": LONG}},
                 "rope_scaling.short_factor = ['a', 'a', 'a', 'a']", id="phi3-longrope-strings"),
    pytest.param({**LLAMA, "rope_theta": "abc"}, "rope_theta = 'abc'", id="theta-string"),
    pytest.param({**LLAMA, "rope_theta": -5}, "rope_theta = -5", id="theta-negative"),
    # sizes, epsilons and flags
    pytest.param({**LLAMA, "hidden_size": "32"}, "hidden_size = '32'", id="hidden-size-string"),
    pytest.param({**LLAMA, "max_position_embeddings": 0}, "max_position_embeddings = 0", id="positions-zero"),
    pytest.param({**LLAMA, "num_hidden_layers": True}, "num_hidden_layers = True", id="layers-bool"),
    pytest.param({**LLAMA, "rms_norm_eps": None}, "rms_norm_eps = None", id="eps-null"),
    pytest.param({**QWEN3_MOE, "norm_topk_prob": "yes"}, "norm_topk_prob = 'yes'", id="qwen3moe-flag-string"),
    pytest.param({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size is missing",
                 id="hidden-size-missing"),
]


@pytest.mark.parametrize("cfg,names", REFUSED)
def test_config_options_are_refused_by_key(cfg, names, tmp_path):
    """convert refuses from config.json alone, before any weight is read, naming the key and its value."""
    assert_config_refused(cfg, names, tmp_path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random tiny Llama saved by transformers (config.json, model.safetensors, generation_config.json)."""
    from hf_random import save_random_model
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("hf") / "llama"
    save_random_model(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}), out)
    return out


def _copy(src: Path, dst: Path, **config) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config:
        cfg = json.loads((dst / "config.json").read_text()) | config
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_truncated_safetensors_is_refused_by_file(tiny_llama, tmp_path):
    src = _copy(tiny_llama, tmp_path / "hf")
    weights = src / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(SourceError, match=rf"^{weights}: not a readable safetensors file \("):
        convert(str(src), tmp_path / "store", dtype="float32")
    weights.write_bytes(b"\x10\x00")  # not even a header
    with pytest.raises(SourceError, match=rf"^{weights}: not a readable safetensors file \("):
        convert(str(src), tmp_path / "store", dtype="float32")
    assert not (tmp_path / "store").exists()


def test_config_json_that_is_not_json_is_refused_by_file(tiny_llama, tmp_path):
    src = _copy(tiny_llama, tmp_path / "hf")
    for text in ('{"model_type": "llama",', "[1, 2]", "\xff\xfe"):
        (src / "config.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(SourceError, match=rf"^{src / 'config.json'}: "):
            convert(str(src), tmp_path / "store", dtype="float32")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("config,tensor,shapes", [
    ({"head_dim": 6}, "model.layers.0.self_attn.q_proj.weight", "[32, 32] but config.json implies [24, 32]"),
    ({"vocab_size": 50}, "model.embed_tokens.weight", "[97, 32] but config.json implies [50, 32]"),
    ({"intermediate_size": 48}, "model.layers.0.mlp.gate_proj.weight", "[64, 32] but config.json implies [48, 32]"),
])
def test_tensor_shapes_that_disagree_with_config_are_refused(tiny_llama, tmp_path, config, tensor, shapes):
    src = _copy(tiny_llama, tmp_path / "hf", **config)
    with pytest.raises(SourceError) as e:
        convert(str(src), tmp_path / "store", dtype="float32")
    assert str(e.value).startswith(f"{src}: tensor {tensor!r} has shape {shapes}"), str(e.value)
    assert not (tmp_path / "store").exists()


def _job(path: Path, uri: str, *, prompt_length: int) -> Path:
    doc = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": path.stem},
           "spec": {"model": {"uri": uri, "dtype": "float32"},
                    "input": {"synthetic": {"count": 1, "promptLength": prompt_length}},
                    "generation": {"maxNewTokens": 2},
                    "offload": {"policy": "explicit", "weights": {"disk": 100}, "kv": {"gpu": 100}}}}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_directory_without_tokenizer_runs_synthetic_prompts_or_names_their_vocabulary(tiny_llama, tmp_path):
    """A model saved without a tokenizer converts with none (generation_config.json is not one) and runs
    synthetic prompts; ids past its 97-id vocabulary (a 16-token synthetic prompt reaches id 107) are refused
    naming spec.input.synthetic and vocab_size before anything runs; a prompt past its 64 positions names the
    context window."""
    store = tmp_path / "home"
    run = [sys.executable, "-m", "kubeflash_node.cli", "run", "--device", "cpu", "--store", str(store)]

    def kubeflash_run(name: str, length: int):
        return subprocess.run([*run, str(_job(tmp_path / f"{name}.yaml", str(tiny_llama), prompt_length=length))],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    r = kubeflash_run("fits", 8)  # ids 3..94
    assert r.returncode == 0, r.stderr
    [line] = (tmp_path / "kubeflash-out" / "fits" / "results.jsonl").read_text().splitlines()
    assert len(json.loads(line)["response"]["body"]["token_ids"]) == 2
    for name, length, message in [
            ("past-vocab", 16, "token id 107 is outside the model's vocabulary of 97 ids (0 to 96) (synthetic "
                               "prompts use token ids 3 to 1002)"),
            ("past-positions", 80, "80 tokens + max_new_tokens 2 = 82 tokens exceed the model's context window "
                                   "of 64 tokens")]:
        r = kubeflash_run(name, length)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        [error] = [x[x.index("kubeflash run: error:"):] for x in r.stderr.splitlines() if "kubeflash run: error:" in x]
        assert error.startswith("kubeflash run: error: spec.input.synthetic[0] (id synthetic-0): " + message), error
        results = tmp_path / "kubeflash-out" / name / "results.jsonl"
        assert not results.exists() or not results.read_text().strip()


@pytest.mark.parametrize("value,expected", [("fast", "a number >= 0"), (-1.0, "a number >= 0"), (True, "a number"),
                                            (None, "a number >= 0"), (float("nan"), "a number >= 0")])
def test_ceilings_file_values_of_the_wrong_type_are_refused_by_key(value, expected, tmp_path):
    """`--ceilings FILE` (kubeflash plan, bench, run): a value that is not a number >= 0 names the file and the key
    (it used to reach a format string: "Unknown format code 'f' for object of type 'str'")."""
    from kubeflash_node.engine.bench import Ceilings

    path = tmp_path / "ceilings.json"
    path.write_text(json.dumps({"ceilings": {"disk_read_cold": value, "h2d_pinned": 25.0}}))
    with pytest.raises(ValueError, match=rf"^{path}: disk_read_cold = .*; expected {expected}"):
        Ceilings.load(path)
    path.write_text(json.dumps({"disk_read_threads": 2.5}))
    with pytest.raises(ValueError, match=rf"^{path}: disk_read_threads = 2.5; expected an integer >= 0"):
        Ceilings.load(path)
    path.write_text(json.dumps({"disk_read_cold": 3, "h2d_pinned": 25.5, "disk_read_threads": 8, "other": "x"}))
    assert Ceilings.load(path).disk_read_cold == 3 and Ceilings.load(path).disk_read_threads == 8


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """A random Llama of 48 small layers (~30 MB in float32): long enough a conversion to kill between stages."""
    from hf_random import save_random_model
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("hf") / "deep"
    save_random_model(LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=48,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), out)
    return out


@pytest.mark.parametrize("overwrite,stages", [(False, ("embed.bin", "layer_024.bin")),
                                               (True, ("layer_000.bin", "head.bin"))], ids=["new", "overwrite"])
def test_convert_killed_at_any_stage_leaves_no_half_written_entry(deep_llama, tmp_path, overwrite, stages):
    """`kubeflash convert` killed with SIGKILL while it writes its first, a middle or its last stage file: the
    store holds no entry (or, with --overwrite, the old one, complete and unchanged: every file's sha256 checks),
    so nothing a later run would accept is half written; the next convert clears the killed ones' scratch
    directories and publishes a complete entry."""
    from kubeflash_node.store.format import STAGING, load_manifest, verify

    out = tmp_path / "store" / "m"
    cmd = [sys.executable, "-m", "kubeflash_node.cli", "convert", str(deep_llama), "--out", str(out),
           "--dtype", "float32"] + (["--overwrite"] if overwrite else [])
    old = None
    if overwrite:
        convert(str(deep_llama), out, dtype="float16")
        old = (out / "manifest.json").read_bytes()
    for stage in stages:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not list(out.parent.glob(f"{STAGING}m-*/{stage}")) and p.poll() is None:
                assert time.monotonic() < deadline, f"convert never wrote {stage}"
                time.sleep(0.0005)
            assert p.poll() is None, f"convert finished before it could be killed at {stage}"
        finally:
            p.kill()
            p.wait()
        if overwrite:
            assert (out / "manifest.json").read_bytes() == old, stage
            verify(out, load_manifest(out))
        else:
            assert not out.exists(), stage
    convert(str(deep_llama), out, dtype="float32", overwrite=overwrite)
    m = load_manifest(out)
    assert m.dtype == "float32" and len(m.stages) == 50
    verify(out, m)
    assert not list(out.parent.glob(f"{STAGING}*"))  # the killed runs' scratch directories are gone


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_cached_model_is_named_with_the_way_back(tiny_llama, tmp_path, damage):
    """kubeflash run's cache (ensure_model): a stage file cut short or with a flipped byte, or a manifest that is
    not JSON, is refused naming the file, and the error says how to get the model back (remove the entry, run
    again); after that the model converts anew and verifies."""
    import shutil

    from kubeflash_node.store.cache import ensure_model
    from kubeflash_node.store.format import StoreError

    model_dir, _ = ensure_model(str(tiny_llama), dtype="float32", root=tmp_path, progress_bar=False)
    target = model_dir / ("manifest.json" if damage == "manifest" else "layer_001.bin")
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 3] ^= 0xFF
        target.write_bytes(data)
    else:
        target.write_text('{"broken')
    with pytest.raises(StoreError) as e:
        ensure_model(str(tiny_llama), dtype="float32", root=tmp_path, progress_bar=False)
    assert str(e.value).startswith(str(target)), str(e.value)
    assert str(e.value).endswith(f"the cached model {model_dir} is damaged: remove that directory and run again to "
                                 "convert it anew"), str(e.value)
    shutil.rmtree(model_dir)
    again, manifest = ensure_model(str(tiny_llama), dtype="float32", root=tmp_path, progress_bar=False)
    assert again == model_dir and len(manifest.stages) == 4


def test_a_bad_source_is_refused_before_torch_is_imported(tiny_llama, tmp_path):
    """The refusals above come within a second: config.json, the safetensors headers and the tensor shapes are
    checked before torch (seconds to import) is loaded. One process tries each bad source in turn."""
    bad_rope = _copy(tiny_llama, tmp_path / "rope", rope_scaling={"rope_type": "linear", "factor": 2.0, "x": 1})
    bad_shape = _copy(tiny_llama, tmp_path / "shape", head_dim=6)
    cut = _copy(tiny_llama, tmp_path / "cut")
    os.truncate(cut / "model.safetensors", (cut / "model.safetensors").stat().st_size - 1)
    code = ("import sys\nfrom kubeflash_node.store.convert import SourceError, convert\n"
            f"for src in {[str(bad_rope), str(bad_shape), str(cut)]!r}:\n"
            "    try:\n        convert(src, src + '-store')\n    except SourceError as e:\n        print(e)\n"
            "    else:\n        raise SystemExit('converted ' + src)\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("config.json rope_scaling.x = 1") and "has shape [32, 32]" in lines[1], lines
    assert "truncated or damaged" in lines[2] and lines[3] == "no torch", lines


def test_calibrate_takes_a_hugging_face_directory(tiny_llama, tmp_path):
    """`kubeflash calibrate MODEL` with MODEL a Hugging Face directory (as its --help says it may be) converts it
    into the store first, instead of reading the directory as a store entry ("manifest.json: missing"); this one
    was saved without a tokenizer, which the error then names."""
    text = tmp_path / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r = subprocess.run([sys.executable, "-m", "kubeflash_node.cli", "calibrate", str(tiny_llama), "--text", str(text),
                        "--device", "cpu", "--store", str(tmp_path / "home"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "manifest.json" not in r.stderr, r.stderr
    assert f"MODEL {tiny_llama}: has no tokenizer (a dummy: model, or a directory saved without" in r.stderr, r.stderr
    [entry] = [p for p in (tmp_path / "home" / "models").iterdir() if not p.name.startswith(".")]
    assert (entry / "manifest.json").is_file()


@pytest.mark.parametrize("damage", ["rope", "shape", "truncated"])
def test_run_refuses_a_bad_hugging_face_directory_before_torch(tiny_llama, tmp_path, damage):
    """`kubeflash run` on a job whose spec.model.uri is a Hugging Face directory with an option we do not compute,
    a tensor of the wrong shape or a truncated safetensors file: one line naming spec.model.uri and the key, tensor
    or file, before torch is imported (python -X importtime lists every module the process imported)."""
    src = _copy(tiny_llama, tmp_path / "hf", **({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "zz": 1}}
                                                 if damage == "rope" else {"vocab_size": 50} if damage == "shape"
                                                 else {}))
    if damage == "truncated":
        os.truncate(src / "model.safetensors", 100)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "kubeflash_node.cli", "run",
                        str(_job(tmp_path / "bad.yaml", str(src), prompt_length=4)), "--device", "cpu",
                        "--store", str(tmp_path / "home")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    [error] = [x for x in r.stderr.splitlines() if x.startswith("kubeflash run: error:")]
    expected = {"rope": "spec.model.uri: config.json rope_scaling.zz = 1 is not supported",
                "shape": f"spec.model.uri: {src}: tensor 'model.embed_tokens.weight' has shape [97, 32]",
                "truncated": f"spec.model.uri: {src / 'model.safetensors'}: not a readable safetensors file"}[damage]
    assert error.startswith("kubeflash run: error: " + expected), error
    imported = {x.rsplit("|", 1)[-1].strip() for x in r.stderr.splitlines() if x.startswith("import time:")}
    assert "numpy" in imported and "torch" not in imported
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


MANIFEST_DAMAGE = [
    pytest.param(lambda m: m["stages"].__setitem__(1, "../../../../etc/passwd"),
                 "stages[1] = '../../../../etc/passwd' is not one of its files", id="stage-outside"),
    pytest.param(lambda m: m["config"].__setitem__("hidden_size", "32"), "config.hidden_size = '32' is not of type int",
                 id="config-string"),
    pytest.param(lambda m: m["config"].__setitem__("num_layers", 5), "2 layer stages, but config.num_layers is 5",
                 id="layer-count"),
    pytest.param(lambda m: m.__setitem__("dtype", "int3"), "dtype 'int3' is not one of float16, bfloat16, float32",
                 id="dtype"),
    pytest.param(lambda m: m["files"]["layer_000.bin"]["tensors"]["wq"].__setitem__("offset", 10**12),
                 "files.layer_000.bin.tensors.wq: bytes 1000000000000..1000000004096 lie outside the file's",
                 id="offset-past-file"),
    pytest.param(lambda m: m["files"]["layer_000.bin"]["tensors"]["wq"].__setitem__("shape", [8, 8]),
                 "files.layer_000.bin.tensors.wq: shape [8, 8] of float32 is 256 bytes, but nbytes is 4096",
                 id="shape-vs-bytes"),
    pytest.param(lambda m: m["files"]["layer_000.bin"]["tensors"]["wq"].__setitem__("dtype", "float64"),
                 "files.layer_000.bin.tensors.wq.dtype 'float64' is not one of", id="tensor-dtype"),
]


@pytest.mark.parametrize("edit,message", MANIFEST_DAMAGE)
def test_a_manifest_edited_in_place_is_refused_by_field(tiny_llama, tmp_path, edit, message):
    """The stage files' sha256 sit in the manifest, so a manifest damaged or edited by hand is checked for itself
    when loaded: a stage outside its files, config values of the wrong type, a layer count, dtype, tensor shape or
    offset that disagree are refused naming the field (before: a traceback, or weights read as another shape)."""
    from kubeflash_node.store.format import StoreError, load_manifest, verify_model

    store = tmp_path / "store"
    convert(str(tiny_llama), store, dtype="float32")
    good = json.loads((store / "manifest.json").read_text())
    bad = json.loads(json.dumps(good))
    edit(bad)
    (store / "manifest.json").write_text(json.dumps(bad))
    for load in (load_manifest, verify_model):
        with pytest.raises(StoreError) as e:
            load(store)
        assert str(e.value).startswith(f"{store / 'manifest.json'}: {message}"), str(e.value)
    (store / "manifest.json").write_text(json.dumps(good))
    assert load_manifest(store).num_layers == 2


def test_overwrite_never_replaces_the_source_or_a_folder_that_is_not_a_model(tiny_llama, tmp_path):
    """`kubeflash convert SRC --out SRC --overwrite` used to convert the model and then replace its own Hugging Face
    directory with the store (config.json and safetensors gone); `--out <any folder> --overwrite` replaced that
    folder whatever it held. Both are refused now, naming the folder, and nothing is touched; --overwrite still
    replaces a model kubeflash convert wrote."""
    src = _copy(tiny_llama, tmp_path / "hf")
    before = sorted(p.name for p in src.iterdir())
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("precious")
    cli = [sys.executable, "-m", "kubeflash_node.cli", "convert", str(src), "--dtype", "float32", "--overwrite", "--out"]
    for out, message in [(src, f"{src}: is the source {src} or a folder holding it"),
                         (tmp_path, f"{tmp_path}: is the source {src} or a folder holding it"),
                         (notes, f"{notes}: exists and is not a kubeflash model (no manifest.json)")]:
        r = subprocess.run([*cli, str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"kubeflash convert: error: {message}" in r.stderr, r.stderr
    assert sorted(p.name for p in src.iterdir()) == before
    assert (notes / "keep.txt").read_text() == "precious" and len(list(notes.iterdir())) == 1
    convert(str(src), tmp_path / "store", dtype="float32")
    convert(str(src), tmp_path / "store", dtype="float16", overwrite=True)
    from kubeflash_node.store.format import load_manifest

    assert load_manifest(tmp_path / "store").dtype == "float16"


def test_results_never_replace_the_manifest_or_the_input_batch(tmp_path):
    """`kubeflash run job.yaml --output prompts.jsonl` (the job's own input file), or `--output job.yaml`, or
    spec.output.path naming the input under --job-dir at the manifest's folder: refused before anything runs and
    both files left as they were (results used to replace them, the originals set aside as .stale)."""
    import shutil

    ROOT = Path(__file__).resolve().parents[2]
    shutil.copy(ROOT / "examples" / "prompts.jsonl", tmp_path / "prompts.jsonl")
    doc = {"apiVersion": "kubeflash.io/v1alpha1", "kind": "InferenceJob", "metadata": {"name": "io"},
           "spec": {"model": {"uri": "dummy:opt-125m"}, "input": {"file": "prompts.jsonl"}}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    (tmp_path / "job2.yaml").write_text(yaml.safe_dump({**doc, "spec": {**doc["spec"],
                                                                        "output": {"path": "prompts.jsonl"}}}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    run = [sys.executable, "-m", "kubeflash_node.cli", "run", "--store", str(tmp_path / "home")]
    for args, message in [([str(job), "--output", str(tmp_path / "prompts.jsonl")],
                           f"--output {tmp_path / 'prompts.jsonl'}: is spec.input.file"),
                          ([str(job), "--output", str(job)], f"--output {job}: is the manifest"),
                          ([str(tmp_path / "job2.yaml"), "--job-dir", str(tmp_path)],
                           f"spec.output.path {tmp_path / 'prompts.jsonl'}: is spec.input.file")]:
        r = subprocess.run([*run, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"kubeflash run: error: {message}; expected another file" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
