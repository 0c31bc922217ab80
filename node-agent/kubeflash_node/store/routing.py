"""MoE routing counts on the node: the file format, and publishing a job's counts next to its model.

An engine counts, per layer file and expert, how often each expert was routed (engine/experts.py) and writes the counts
to `<model dir>/.routing.json`, or, where the model directory is read-only (a pod's model volume), to `<job dir>/
routing.json`. `publish_routing` is how the node agent carries a job's file over to the model's: it validates the
job's bytes against the model's manifest (layer files and expert ids the store has, positive integer counts), takes
per (layer, expert) the larger of the two counts and writes the result crash-safely (temp, fsync, rename). A job's
counts already include the counts it was seeded with, so the larger count accumulates sequential jobs without counting
a seed twice, and publishing the same file again changes nothing. The next pod on the node reads the model's file from
its read-only model volume and starts its hot-expert cache from it. Counts only choose which experts are kept in
memory: a job that writes made-up counts can slow a later job's cache, never change its outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .format import StoreError, atomic_write_bytes, load_manifest

ROUTING_FILE = ".routing.json"  # in the model's store directory
JOB_ROUTING_FILE = "routing.json"  # in the job directory, where the model directory is read-only
ROUTING_FORMAT = "kubeflash-routing/1"
MAX_BYTES = 16 << 20
MAX_COUNT = 1 << 53


def load_format(raw: bytes, fmt: str, *, where: str, max_bytes: int = MAX_BYTES) -> dict:
    """A small JSON file's object, its "format" `fmt`: ValueError naming `where` when it is too large, not JSON or
    not such an object."""
    if len(raw) > max_bytes:
        raise ValueError(f"{where}: {len(raw)} bytes, at most {max_bytes} expected")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{where}: expected a JSON object with format {fmt!r}")
    return data


def parse_routing(raw: bytes, experts: dict[str, int], *, where: str) -> dict[str, dict[str, int]]:
    """The `layers` of a routing file (layer file -> expert id -> count), checked against `experts` (layer file ->
    its number of experts): ValueError naming `where` and what was expected."""
    data = load_format(raw, ROUTING_FORMAT, where=where)
    if not isinstance(data.get("layers"), dict):
        raise ValueError(f"{where}: expected a JSON object with format {ROUTING_FORMAT!r} and layers")
    out: dict[str, dict[str, int]] = {}
    for layer, counts in data["layers"].items():
        if layer not in experts or not isinstance(counts, dict):
            raise ValueError(f"{where}: layers.{layer}: not a MoE layer file of this model")
        for j, n in counts.items():
            if not (j.isdigit() and int(j) < experts[layer]):
                raise ValueError(f"{where}: layers.{layer}.{j}: expected an expert id below {experts[layer]}")
            if type(n) is not int or not 0 < n <= MAX_COUNT:
                raise ValueError(f"{where}: layers.{layer}.{j}: expected a count in 1..{MAX_COUNT}")
            out.setdefault(layer, {})[str(int(j))] = n
    return out


def _experts(model_dir: Path) -> dict[str, int]:
    """Layer file -> number of experts, for the MoE layers of the model at `model_dir`."""
    m = load_manifest(model_dir)
    n = int(m.config.get("num_experts") or 0)
    return {name: n for name in m.stages if n and any(t.startswith("e0.") for t in m.files[name].tensors)}


def publish_routing(model_dir: Path, raw: bytes, *, where: str) -> bool:
    """Fold a job's routing file (`raw`, read by the caller from `where`) into `<model_dir>/.routing.json`: per layer
    and expert the larger count. True when the model's file changed; ValueError naming `where` for a bad file,
    StoreError for a model directory without a manifest."""
    model_dir = Path(model_dir)
    experts = _experts(model_dir)
    if not experts:
        raise StoreError(f"{model_dir}: not a mixture-of-experts model (no routing counts to keep)")
    theirs = parse_routing(raw, experts, where=where)
    path = model_dir / ROUTING_FILE
    try:
        ours = parse_routing(path.read_bytes(), experts, where=str(path))
    except (OSError, ValueError):
        ours = {}  # none yet, or one this code would not have written: replaced
    merged = {layer: dict(counts) for layer, counts in ours.items()}
    for layer, counts in theirs.items():
        for j, n in counts.items():
            merged.setdefault(layer, {})[j] = max(n, merged.get(layer, {}).get(j, 0))
    if merged == ours:
        return False
    doc = {"format": ROUTING_FORMAT,
           "layers": {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in sorted(merged.items())}}
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o644)  # pods read it, as the model
    return True
