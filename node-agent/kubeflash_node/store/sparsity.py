"""Activation-sparsity calibration in a model's store entry: per-layer FFN thresholds for each target sparsity.

`kubeflash calibrate` writes `<model_dir>/sparsity.json`; a sparse run reads it back. The file records the model
it was made for (the directory's model id and the sha256 of its manifest.json, which holds every weight file's
sha256), so a calibration of another model, or of this model before it was converted again, is refused rather
than silently applied. Written crash-safely (temp + fsync + rename). Knows nothing of torch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kubeflash_api.inferencejob import MAX_SPARSITY

from .format import MANIFEST, StoreError, atomic_write_json

FILE = "sparsity.json"
FORMAT = "kubeflash-sparsity/1"  # magnitude criterion: what every kubeflash so far reads
# a criterion other than magnitude: its thresholds mean something else (|x| * c, not |x|), so a reader of /1 must
# refuse the file by its format rather than apply them as magnitudes
FORMAT_SCALED = "kubeflash-sparsity/2"
# input sparsity's criterion (`kubeflash calibrate --criterion`): keep input channel i when |x_i| exceeds the layer's
# threshold (TEAL), or when |x_i| * c_i does, c_i the norm of the weight columns channel i multiplies (WINA: over
# the concatenated columns of the matrices sharing the input: q|k|v, gate|up); `scales` holds those c
CRITERIA = ("magnitude", "wina")
# `scales` keys, each [layers, channels] float32: attention input (q|k|v columns), attention output (o columns),
# FFN input (gate|up columns), intermediate (down columns)
SCALES = ("attn_in", "attn_out", "ffn_in", "ffn_mid")
MAX_TARGET = MAX_SPARSITY  # the most a target may ask (the API's bound, spec.offload.sparsity)
METHOD = "ffn-magnitude"  # a neuron is active for a token when |its activation| exceeds its layer's threshold


class CalibrationError(StoreError):
    """A sparse run cannot use this model's calibration (none, stale, target not calibrated); says what to run."""


@dataclass(frozen=True)
class Calibration:
    """Per-layer thresholds on |FFN activation| for each calibrated target sparsity."""

    model_id: str  # the model directory's name: its id in the store
    manifest_sha256: str  # sha256 of manifest.json when calibrated (it holds every weight file's sha256)
    tokens: int  # calibration tokens seen
    text_sha256: str  # of the calibration text file
    thresholds: dict[float, tuple[float, ...]]  # target sparsity -> one threshold per decoder layer
    method: str = METHOD
    # target sparsity -> per decoder layer (threshold on |FFN input|, on |intermediate activation|): input
    # sparsity (TEAL), engine/sparse.py's method "input"; empty in calibrations made before it
    inputs: dict[float, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    # target sparsity -> per decoder layer (threshold on |attention input|, on |attention output before o|):
    # attention input sparsity (engine/sparse.py, SparseAttention); empty in calibrations made before it
    attention: dict[float, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    # how the input and attention thresholds share each target out: "uniform" (every layer and input at the target),
    # "greedy" or "greedy-global" (engine/allocate.py: per input, where the output error per byte saved is least,
    # each layer at the target, or over all layers)
    allocation: str = "uniform"
    # greedy only: target -> per decoder layer the level of (attention input, attention output, FFN input,
    # intermediate) whose byte-weighted mean is the target; empty for uniform calibrations
    levels: dict[float, tuple[tuple[float, ...], ...]] = field(default_factory=dict)
    # what the input and attention thresholds are compared with (CRITERIA): |x| ("magnitude"), or |x| * c ("wina",
    # c per channel from `scales`); the gate method's `thresholds` are magnitudes either way
    criterion: str = "magnitude"
    # wina only: SCALES key -> [layers, channels] float32 column norms (the weights', so the manifest check covers
    # them); empty for magnitude
    scales: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict:
        scaled = self.criterion != "magnitude"  # magnitude files stay byte for byte what they were (format /1)
        extra = {"criterion": self.criterion, "scales": {k: _pack(self.scales[k]) for k in SCALES}} if scaled else {}
        return {"format": FORMAT_SCALED if scaled else FORMAT, "method": self.method, "allocation": self.allocation,
                "model_id": self.model_id,
                "manifest_sha256": self.manifest_sha256, "tokens": self.tokens, "text_sha256": self.text_sha256,
                **extra,
                "targets": [{"sparsity": t, "thresholds": list(th),
                             **({"inputs": [list(p) for p in self.inputs[t]]} if t in self.inputs else {}),
                             **({"attention": [list(p) for p in self.attention[t]]} if t in self.attention else {}),
                             **({"levels": [list(p) for p in self.levels[t]]} if t in self.levels else {})}
                            for t, th in sorted(self.thresholds.items())]}

    @classmethod
    def from_json(cls, data: dict, *, where: str) -> Calibration:
        if not isinstance(data, dict) or data.get("format") not in (FORMAT, FORMAT_SCALED):
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise StoreError(f"{where}: format is {got!r}, expected {FORMAT!r} or {FORMAT_SCALED!r}")
        criterion = str(data.get("criterion", "magnitude"))
        if criterion not in CRITERIA:
            raise StoreError(f"{where}: criterion {criterion!r} is not one this kubeflash applies (kubeflash calibrate "
                             f"--criterion {'|'.join(CRITERIA)}); calibrate the model again")
        if (criterion == "magnitude") != (data["format"] == FORMAT):
            raise StoreError(f"{where}: format {data['format']!r} with criterion {criterion!r} (magnitude is "
                             f"{FORMAT!r}, any other {FORMAT_SCALED!r}); calibrate the model again (kubeflash "
                             "calibrate --criterion)")
        try:
            scales = {k: _unpack(data["scales"][k]) for k in SCALES} if criterion != "magnitude" else {}
            th = {float(e["sparsity"]): tuple(float(x) for x in e["thresholds"]) for e in data["targets"]}
            ins = {float(e["sparsity"]): tuple((float(a), float(b)) for a, b in e["inputs"])
                   for e in data["targets"] if "inputs" in e}
            att = {float(e["sparsity"]): tuple((float(a), float(b)) for a, b in e["attention"])
                   for e in data["targets"] if "attention" in e}
            lev = {float(e["sparsity"]): tuple(tuple(float(x) for x in p) for p in e["levels"])
                   for e in data["targets"] if "levels" in e}
            return cls(model_id=str(data["model_id"]), manifest_sha256=str(data["manifest_sha256"]),
                       tokens=int(data["tokens"]), text_sha256=str(data["text_sha256"]), thresholds=th,
                       method=str(data.get("method", METHOD)), inputs=ins, attention=att,
                       allocation=str(data.get("allocation", "uniform")), levels=lev, criterion=criterion,
                       scales=scales)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed calibration ({type(e).__name__}: {e})") from e


def _pack(a: np.ndarray) -> dict:
    """A float32 array as JSON: its shape and its little-endian bytes in base64 (a fifth of the text of decimals)."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "float32_base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack(d: dict) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(d["float32_base64"], validate=True), dtype="<f4")
    return a.reshape([int(n) for n in d["shape"]]).astype(np.float32)


def check_target(value: float, *, name: str) -> float:
    """A target sparsity in [0, MAX_TARGET]; ValueError naming the option or field otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_TARGET:
        raise ValueError(f"{name}: a target sparsity must be a number in [0, {MAX_TARGET}], got {value!r}")
    return float(value)


def manifest_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / MANIFEST).read_bytes()).hexdigest()


def save(model_dir: Path, cal: Calibration) -> Path:
    path = Path(model_dir) / FILE
    atomic_write_json(path, cal.to_json())
    return path


def load(model_dir: Path) -> Calibration | None:
    """The model's calibration as written (None when it has none); StoreError when the file is unreadable."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: not a readable calibration ({e})") from e
    return Calibration.from_json(data, where=str(path))


def thresholds_for(model_dir: Path, target: float, *, num_layers: int, field: str) -> tuple[float, ...]:
    """The per-layer thresholds of `target` for the model in `model_dir`, refused (CalibrationError naming
    `field`) when the model has no calibration, it was made for another model or version, or lacks `target`."""
    model_dir = Path(model_dir)
    redo = f"run `kubeflash calibrate {model_dir} --text FILE --sparsity {target:g}`"
    cal = load(model_dir)
    if cal is None:
        raise CalibrationError(f"{field} {target:g}: the model in {model_dir} has no calibration data "
                               f"({FILE} missing); {redo}, or set {field}: off")
    here = manifest_sha256(model_dir)
    if cal.model_id != model_dir.name or cal.manifest_sha256 != here:
        raise CalibrationError(f"{field} {target:g}: {model_dir / FILE} is stale: it was calibrated for model "
                               f"{cal.model_id} (manifest {cal.manifest_sha256[:12]}…), this is {model_dir.name} "
                               f"(manifest {here[:12]}…); {redo}")
    got = next((th for t, th in cal.thresholds.items() if abs(t - target) < 1e-9), None)
    if got is None:
        have = ", ".join(f"{t:g}" for t in sorted(cal.thresholds)) or "none"
        raise CalibrationError(f"{field} {target:g}: not calibrated for this model (calibrated: {have}); {redo}")
    if len(got) != num_layers:
        raise CalibrationError(f"{model_dir / FILE}: {len(got)} layer thresholds for a model of {num_layers} layers; "
                               f"{redo}")
    return got


def input_thresholds_for(model_dir: Path, target: float, *, num_layers: int, field: str,
                         criteria: tuple[str, ...] = ("magnitude",)) -> tuple[tuple[float, float], ...] | None:
    """Per layer (threshold on |FFN input|, on |intermediate activation|) of `target` (input sparsity, TEAL), or
    None when the calibration predates them; refused like thresholds_for when there is none or it is stale, or when
    it was made with a criterion not in `criteria` (those the caller applies: scales_for gives wina's c)."""
    return _pairs_for(model_dir, target, num_layers, field, "inputs", criteria)


def attention_thresholds_for(model_dir: Path, target: float, *, num_layers: int, field: str,
                             criteria: tuple[str, ...] = ("magnitude",)) -> tuple[tuple[float, float], ...] | None:
    """Per layer (threshold on |attention input|, on |attention output before o|) of `target`, or None when the
    calibration predates them; refused like input_thresholds_for."""
    return _pairs_for(model_dir, target, num_layers, field, "attention", criteria)


def scales_for(model_dir: Path, *, num_layers: int) -> dict[str, np.ndarray] | None:
    """The calibration's per-channel column norms (SCALES keys, [num_layers, channels] each) its input and attention
    thresholds are compared against (|x| * c), or None when its criterion is magnitude (|x| alone)."""
    cal = load(Path(model_dir))
    if cal is None or cal.criterion == "magnitude":
        return None
    bad = [k for k in SCALES if cal.scales[k].ndim != 2 or cal.scales[k].shape[0] != num_layers]
    if bad:
        raise CalibrationError(f"{Path(model_dir) / FILE}: {', '.join(bad)} column norms are not one row per layer of "
                               f"{num_layers}; run `kubeflash calibrate {model_dir} --text FILE --criterion "
                               f"{cal.criterion}` again")
    return cal.scales


def _pairs_for(model_dir: Path, target: float, num_layers: int, field: str, kind: str, criteria: tuple[str, ...]):
    thresholds_for(model_dir, target, num_layers=num_layers, field=field)  # the same refusals
    cal = load(Path(model_dir))
    if cal.criterion not in criteria:
        raise CalibrationError(f"{field} {target:g}: {Path(model_dir) / FILE} was calibrated with --criterion "
                               f"{cal.criterion}, whose thresholds this caller cannot apply (it applies "
                               f"{', '.join(criteria)})")
    got = next((v for t, v in getattr(cal, kind).items() if abs(t - target) < 1e-9), None)
    if got is not None and len(got) != num_layers:
        raise CalibrationError(f"{Path(model_dir) / FILE}: {len(got)} layer {kind} thresholds for a model of "
                               f"{num_layers} layers; run `kubeflash calibrate {model_dir} --text FILE` again")
    return got
