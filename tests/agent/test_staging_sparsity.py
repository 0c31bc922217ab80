"""A model entry asking for sparsity is calibrated by a real agent while it stages it: the published store entry
holds the thresholds of every asked target (on the built-in text), the neuron bundles and their frequencies, is
verified and world-readable, and nothing of the calibration is left beside it; a sparse run can use it as is."""

from __future__ import annotations

import stat

from kubeflash_node.store import sparsity as cal
from kubeflash_node.store.bundles import DIR
from kubeflash_node.store.format import verify

from agent_harness import LOOPBACK_HTTP, model_id, staging_leftovers, write_tiny_llama


def _tokenizer(out, n: int) -> None:
    """A word-level tokenizer (t0 .. t{n-1}, any other word t0) saved beside the weights: the store needs one to
    read the calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(out)


def test_a_model_entry_asking_for_sparsity_is_staged_calibrated(tmp_path, agents):
    src = tmp_path / "sources" / "tiny-s"
    write_tiny_llama(src)
    _tokenizer(src, 256)
    disk = tmp_path / "ssd0"
    agent = agents({**LOOPBACK_HTTP, "disks": [{"name": "ssd0", "path": str(disk)}],
                    "allowedSourceRoots": [str(tmp_path / "sources")],
                    "models": [{"uri": str(src), "dtype": "float32", "sparsity": [0.5, 0.25]}]}).start()
    mid = model_id(str(src), dtype="float32")
    agent.wait_model(mid, timeout=300)
    d = disk / "models" / mid
    verify(d)  # every weight file's sha256 still holds
    c = cal.load(d)
    assert set(c.thresholds) == {0.25, 0.5} and c.model_id == mid
    assert len(cal.thresholds_for(d, 0.5, num_layers=2, field="spec.offload.sparsity")) == 2  # fresh, usable
    assert (d / DIR / "layer_000.bin").is_file() and (d / DIR / "freq_0.5.npy").is_file()
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in (d / DIR).iterdir() if f.is_file())
    assert staging_leftovers(disk) == [] and not list(d.rglob("*.tmp"))
