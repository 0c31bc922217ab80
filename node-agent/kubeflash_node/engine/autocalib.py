"""Calibrate a store entry once, on first use, so a job asking for sparsity never runs it uncalibrated.

`ensure_calibrated(model_dir, targets)` is what the agent's staging worker (a model entry asking for sparsity) and
`kubeflash run` (a job asking for a target the entry has no calibration for) call: when the entry's sparsity.json
lacks a target or is stale, it runs `kubeflash calibrate`'s steps with the built-in calibration text
(engine/data/calibration.txt: prose paragraphs of kubeflash's own README and docs, frozen on 2026-12-05 so
thresholds do not move when the docs do; the first `max_tokens` tokens), keeping every target already calibrated. Exactly once:

- an exclusive lock (`<model_dir>/.calibrate.lock`, flock): a second job arriving meanwhile waits, then finds the
  calibration written and does nothing;
- the thresholds file is the commit point, written last (temp + fsync + rename): the bundles, frequencies and
  predictors come first, each file itself written to a temp name and renamed, so a calibration killed at any
  point leaves no sparsity.json (the next job calibrates again) and no half-written file under a real name; the
  temp files a killed run left are removed under the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK = ".calibrate.lock"
TEXT = Path(__file__).with_name("data") / "calibration.txt"
MAX_TOKENS = 8192  # of the built-in text (about 8.8K tokens of SmolLM2's): 16 windows of 512, the predictors fit on them


def missing_targets(model_dir: Path, targets) -> tuple[float, ...]:
    """The targets the entry's calibration lacks (all of them when it has none or it is stale)."""
    from ..store import sparsity as cal

    c = cal.load(model_dir)
    if c is None or c.model_id != Path(model_dir).name or c.manifest_sha256 != cal.manifest_sha256(model_dir):
        return tuple(sorted(set(targets)))
    return tuple(sorted(t for t in set(targets) if not any(abs(t - h) < 1e-9 for h in c.thresholds)))


def needs_calibration(config) -> bool:
    """False where no calibration is needed (OPT's ReLU zeros) or none applies (mixture-of-experts)."""
    return not (getattr(config, "num_experts", 0) or (config.hidden_act == "relu" and config.architecture == "opt"))


def ensure_calibrated(model_dir: Path, targets, *, device: str = "cpu", text: Path = TEXT,
                      max_tokens: int = MAX_TOKENS, predictor_rank: int = 256, log=print) -> bool:
    """Calibrate `targets` into the entry unless it has them (True: it calibrated now). OSError when the entry
    cannot be written (a read-only model volume)."""
    from ..store import sparsity as cal
    from ..store.format import load_manifest
    from ..store.modelconfig import ModelConfig

    model_dir = Path(model_dir)
    if not needs_calibration(ModelConfig.from_dict(load_manifest(model_dir).config)) \
            or not missing_targets(model_dir, targets):
        return False
    fd = os.open(model_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a concurrent job's calibration finishes first
        want = missing_targets(model_dir, targets)
        if not want:
            return False
        _remove_temp_files(model_dir)
        old = cal.load(model_dir)
        keep = () if old is None or missing_targets(model_dir, old.thresholds) else tuple(old.thresholds)
        all_targets = tuple(sorted(set(keep) | set(want)))
        log(f"calibrating {model_dir.name} for sparsity {', '.join(f'{t:g}' for t in all_targets)} on the built-in "
            f"text ({text.name}, up to {max_tokens} tokens)")
        _calibrate(model_dir, all_targets, device=device, text=text, max_tokens=max_tokens,
                   predictor_rank=predictor_rank)
        return True
    finally:
        os.close(fd)  # releases the lock


def _calibrate(model_dir: Path, targets, *, device: str, text: Path, max_tokens: int, predictor_rank: int) -> None:
    from ..store import sparsity as cal
    from ..store.bundles import write_bundles
    from ..store.format import StoreError, load_manifest, sha256_file
    from .cli_calibrate import MIN_TOKENS, calibrate, fit_predictor
    from .prompts import load_tokenizer

    manifest = load_manifest(model_dir)
    if not manifest.tokenizer:
        raise StoreError(f"{model_dir}: has no tokenizer, so the built-in calibration text cannot be read; run "
                         "kubeflash calibrate with token ids of your own")
    ids = load_tokenizer(model_dir, manifest)(text.read_text(encoding="utf-8"))["input_ids"][:max_tokens]
    if len(ids) < MIN_TOKENS:
        raise ValueError(f"{text}: {len(ids)} tokens, calibration needs at least {MIN_TOKENS}")
    calibration, rec = calibrate(model_dir, ids, tuple(targets), device=device, text_sha256=sha256_file(text),
                                 recorder=True, write=False)
    th = calibration.thresholds
    write_bundles(model_dir, {t: rec.frequency_at(v) for t, v in th.items()})
    if manifest.config.get("architecture") != "opt":  # input sparsity's column files (store/channels.py)
        from ..store.channels import write_channels

        write_channels(model_dir, {t: rec.input_frequency_at(v) for t, v in calibration.inputs.items()})
    if predictor_rank:
        for t, v in th.items():
            fit_predictor(model_dir, rec, v, rank=predictor_rank, target=t)
    cal.save(model_dir, calibration)  # the commit point: last


def _remove_temp_files(model_dir: Path) -> None:
    """Temp files a killed calibration left (bundles, frequencies, predictors, channel files, the thresholds file)."""
    from ..store import channels
    from ..store.bundles import DIR

    for d in (model_dir, model_dir / DIR, model_dir / channels.DIR):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink()


def main(argv: list[str] | None = None) -> int:
    """`python -m kubeflash_node.engine.autocalib MODEL_DIR --sparsity T[,T...]`: what the agent's staging worker
    runs in the staging directory of a model entry that asks for sparsity."""
    import argparse
    import sys

    from ..store.format import StoreError
    from .cli_calibrate import targets
    from .cli_run import resolve_device

    p = argparse.ArgumentParser(prog="python -m kubeflash_node.engine.autocalib", description=main.__doc__)
    p.add_argument("model_dir", type=Path, help="a converted model (its store entry)")
    p.add_argument("--sparsity", type=targets, required=True, metavar="T[,T...]", help="targets, each in [0, 0.95]")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    a = p.parse_args(argv)
    try:
        ensure_calibrated(a.model_dir, a.sparsity, device=resolve_device(a.device))
    except (OSError, ValueError, StoreError) as e:
        print(f"calibration: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
