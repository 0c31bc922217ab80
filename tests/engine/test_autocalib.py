"""Calibration on first use (engine/autocalib.py), on a tiny random Llama with a tokenizer (CPU): a job asking for a
sparsity target its store entry has no calibration for is calibrated once on the built-in text and then runs
sparse; two processes asking at once calibrate once (the other waits on the entry's lock and finds it done); a
calibration killed (SIGKILL) before its commit point leaves no thresholds file and no half-written file, and the
next job calibrates it whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_random import save_random_model
from tiny_jobs import run_tiny_job, tiny_job
from transformers import LlamaConfig

from kubeflash_node.engine.autocalib import LOCK, TEXT, ensure_calibrated, missing_targets
from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.bundles import DIR
from kubeflash_node.store.convert import convert

ROOT = Path(__file__).resolve().parents[2]
TARGET = 0.5


def _tokenizer(n: int):
    """Word-level: t0 .. t{n-1}, every other word t0 (the built-in text is then one token a word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("hf") / "tiny"
    save_random_model(cfg, out)
    _tokenizer(97).save_pretrained(out)
    return out


def _store(hf: Path, where: Path) -> Path:
    convert(str(hf), where, dtype="float32")
    return where


def _in_child(store: Path, code: str) -> subprocess.Popen:
    prog = ("import sys; from pathlib import Path; from kubeflash_node.engine.autocalib import ensure_calibrated\n"
            f"store = Path({str(store)!r})\n" + code)
    return subprocess.Popen([sys.executable, "-c", prog], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_job_calibrates_its_entry_once_then_runs_sparse(hf, tmp_path):
    """run_job with calibrate=True on an uncalibrated entry writes thresholds (the built-in text's sha256), neuron
    bundles and frequencies, then reads sparsely; the next job finds it calibrated (nothing rewritten); another
    target later adds itself and keeps the first."""
    store = _store(hf, tmp_path / "m")
    assert missing_targets(store, (TARGET,)) == (TARGET,)

    def run(name: str, target: float) -> dict:
        return run_tiny_job(tiny_job({"sparsity": target}, name=name), store, tmp_path / name, calibrate=True)[0]

    rep = run("first", TARGET)
    c = cal.load(store)
    assert set(c.thresholds) == {TARGET} and c.text_sha256 == _sha(TEXT)
    assert rep["sparsity"]["method"] == "input" and rep["sparsity"]["channel_bytes_read"] > 0  # input-channel files
    assert (store / DIR / f"freq_{TARGET:g}.npy").is_file()
    stamp = (store / cal.FILE).stat().st_mtime_ns
    run("again", TARGET)
    assert (store / cal.FILE).stat().st_mtime_ns == stamp  # not calibrated twice
    run("other", 0.25)
    assert set(cal.load(store).thresholds) == {0.25, TARGET}


def test_concurrent_first_uses_calibrate_once(hf, tmp_path):
    """Two processes asking for the same entry's calibration at once: one calibrates, the other waits on the lock
    and returns without calibrating."""
    store = _store(hf, tmp_path / "m")
    kids = [_in_child(store, f"print(ensure_calibrated(store, ({TARGET},), log=lambda m: None))") for _ in range(2)]
    outs = [k.communicate(timeout=300) for k in kids]
    assert all(k.returncode == 0 for k in kids), [o[1][-2000:] for o in outs]
    assert sorted(o[0].strip() for o in outs) == ["False", "True"]
    assert not missing_targets(store, (TARGET,))


def test_a_killed_calibration_leaves_nothing_half_written(hf, tmp_path):
    """SIGKILL after the bundles were written but before the thresholds file (the commit point): no sparsity.json
    and no temp file remain, the entry still counts as uncalibrated, the lock is free; a temp file a kill in the
    middle of a write leaves is removed by the next calibration, which completes."""
    store = _store(hf, tmp_path / "m")
    kid = _in_child(store, "import os, signal\nfrom kubeflash_node.engine import cli_calibrate\n"
                    "def die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                    "cli_calibrate.fit_predictor = die\n"
                    f"ensure_calibrated(store, ({TARGET},), log=lambda m: None)\n")
    kid.communicate(timeout=300)
    assert kid.returncode == -9
    assert (store / DIR / "layer_000.bin").is_file()  # it got as far as the bundles
    assert not (store / cal.FILE).exists() and missing_targets(store, (TARGET,)) == (TARGET,)
    assert not [p for p in store.rglob("*.tmp")]
    stray = store / DIR / ".layer_001.bin.tmp"  # what a kill in the middle of a bundle's write leaves
    stray.write_bytes(b"\0" * 100)
    assert ensure_calibrated(store, (TARGET,), log=lambda m: None) is True  # the dead child's lock was released
    assert not stray.exists() and not [p for p in store.rglob("*.tmp")]
    assert set(cal.load(store).thresholds) == {TARGET}
    assert json.loads((store / DIR / "index.json").read_text())["frequency"] == {f"{TARGET:g}": f"freq_{TARGET:g}.npy"}
    assert (store / LOCK).is_file() and os.path.getsize(store / LOCK) == 0


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
