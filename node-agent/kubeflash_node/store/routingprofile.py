"""A MoE model's measured routing profile on the node: what the cost model prices routed expert reads with.

Every routed MoE run counts, per read shape (sequences sharing a layer read, tokens of each), the routed experts its
layer reads requested and how many layer reads that was (engine/generate.py); the run report's `routing_profile` is
their mean. The engine adds its run's sums to the model's `.routing-profile.json` in the store entry when it closes
(temp, fsync, rename), beside the hot-expert counts' `.routing.json` (store/routing.py), or, where the model directory
is read-only (a pod's model volume), writes the sum of the model's profile and its run to `<job dir>/routing-profile.
json`, which the node agent copies over the model's (`publish_profile`) when it belongs to the same model and counts
more runs. `kubeflash plan`, `kubeflash run`, `kubeflash bench` and the pod's `policy: auto` price routed reads with it
(engine/moeplan.py `stored_routing`); without one, under uniform routing.

The file names the model it was measured on: `model_id` (the store entry's directory name, also the pod's mount name)
and `manifest_sha256` (the manifest names every file's checksum). A profile of another model or of an earlier
version of this one (re-converted), and a file that is not a profile, are ignored with a warning naming the file
(`load`): the plan then says it assumed uniform routing and why. A profile only prices reads; it never changes what
a job computes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .format import MANIFEST, atomic_write_bytes
from .routing import load_format

PROFILE_FILE = ".routing-profile.json"  # in the model's store directory
JOB_PROFILE_FILE = "routing-profile.json"  # in the job directory, where the model directory is read-only
PROFILE_FORMAT = "kubeflash-routing-profile/1"
MAX_BYTES = 1 << 20
MAX_SHAPES = 4096


@dataclass(frozen=True)
class StoredProfile:
    """The sums of every run recorded for one model: per read shape (sequences, tokens of each) the routed experts
    requested over its routed layer reads and the number of those reads."""

    model_id: str
    manifest_sha256: str
    runs: int
    shapes: tuple[tuple[int, int, int, int], ...]  # (sequences, tokens of each, experts requested, layer reads)

    def points(self) -> tuple[tuple[int, int, float], ...]:
        """(sequences, tokens of each, mean distinct experts a layer read): costmodel.RoutingProfile's points."""
        return tuple((s, t, req / reads) for s, t, req, reads in self.shapes)

    def add(self, run: dict[tuple[int, int], tuple[int, int]]) -> StoredProfile:
        """This profile with one more run's sums ((sequences, tokens) -> (requests, layer reads)) added."""
        sums = {(s, t): [req, reads] for s, t, req, reads in self.shapes}
        for (s, t), (req, reads) in run.items():
            got = sums.setdefault((int(s), int(t)), [0, 0])
            got[0] += int(req)
            got[1] += int(reads)
        shapes = tuple((s, t, req, reads) for (s, t), (req, reads) in sorted(sums.items()) if reads > 0)
        return StoredProfile(self.model_id, self.manifest_sha256, self.runs + 1, shapes)

    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT, "model_id": self.model_id, "manifest_sha256": self.manifest_sha256,
                "runs": self.runs, "shapes": [list(x) for x in self.shapes]}


def manifest_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / MANIFEST).read_bytes()).hexdigest()


def _int(v, lo: int, where: str) -> int:
    if type(v) is not int or not lo <= v < 1 << 53:
        raise ValueError(f"{where}: expected an integer >= {lo}, got {v!r}")
    return v


def parse_profile(raw: bytes, *, where: str) -> StoredProfile:
    """A profile file's contents, checked: ValueError naming `where` and what was expected."""
    data = load_format(raw, PROFILE_FORMAT, where=where, max_bytes=MAX_BYTES)
    if not isinstance(data.get("model_id"), str) or not isinstance(data.get("manifest_sha256"), str):
        raise ValueError(f"{where}: expected model_id and manifest_sha256 strings")
    runs = _int(data.get("runs"), 1, f"{where}: runs")
    shapes = data.get("shapes")
    if not isinstance(shapes, list) or not 0 < len(shapes) <= MAX_SHAPES:
        raise ValueError(f"{where}: shapes: expected a list of 1..{MAX_SHAPES} [sequences, tokens, requests, reads]")
    out = []
    for i, x in enumerate(shapes):
        at = f"{where}: shapes[{i}]"
        if not isinstance(x, list) or len(x) != 4:
            raise ValueError(f"{at}: expected [sequences, tokens of each, experts requested, layer reads]")
        s, t, req, reads = (_int(v, lo, at) for v, lo in zip(x, (1, 1, 0, 1)))
        if not math.isfinite(req / reads):
            raise ValueError(f"{at}: not a finite mean")
        out.append((s, t, req, reads))
    return StoredProfile(data["model_id"], data["manifest_sha256"], runs, tuple(sorted(out)))


def load(model_dir: Path, path: Path | None = None) -> tuple[StoredProfile | None, str | None]:
    """(the profile measured on the model at `model_dir`, None) from `path` (default its `.routing-profile.json`);
    (None, None) where there is none; (None, why) where the file is unreadable, not a profile, or another model's or
    an earlier version's: the caller prints `why` (it names the file) and prices uniform routing."""
    model_dir = Path(model_dir)
    path = Path(path) if path is not None else model_dir / PROFILE_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path}: ignored, unreadable ({e.strerror or e})"
    try:
        got = parse_profile(raw, where=str(path))
    except ValueError as e:
        return None, f"{e} (ignored)"
    if got.model_id != model_dir.name:
        return None, f"{path}: ignored, measured on model {got.model_id!r}, not {model_dir.name!r}"
    try:
        digest = manifest_sha256(model_dir)
    except OSError as e:
        return None, f"{path}: ignored, the model's manifest is unreadable ({e.strerror or e})"
    if got.manifest_sha256 != digest:
        return None, f"{path}: ignored, measured on another version of {model_dir.name} (its manifest changed since)"
    return got, None


def record(model_dir: Path, run: dict[tuple[int, int], tuple[int, int]], *,
           job_dir: Path | None = None) -> tuple[Path | None, str | None]:
    """Add one run's sums to the model's profile (a missing, bad or stale one starts over) and write it, crash-safely,
    to `<model_dir>/.routing-profile.json`, else (a read-only model directory) `<job_dir>/routing-profile.json`.
    (the file written or None, the warning about a profile that was replaced or None)."""
    model_dir = Path(model_dir)
    if not any(reads for _, reads in run.values()):
        return None, None
    old, why = load(model_dir)
    base = old or StoredProfile(model_dir.name, manifest_sha256(model_dir), 0, ())
    raw = (json.dumps(base.add(run).to_json(), indent=1) + "\n").encode()
    for path in [model_dir / PROFILE_FILE] + ([Path(job_dir) / JOB_PROFILE_FILE] if job_dir is not None else []):
        try:
            atomic_write_bytes(path, raw, mode=0o644)  # pods read it, as the model
        except OSError:
            continue
        return path, why
    return None, why


def publish_profile(model_dir: Path, raw: bytes, *, where: str) -> bool:
    """Make a job's profile (`raw`, read by the caller from `where`: the model's profile plus the job's run) the
    model's, where it was measured on this model as it is and counts more runs than the model's. True when the model's
    file changed; ValueError naming `where` for a bad or foreign file."""
    model_dir = Path(model_dir)
    theirs = parse_profile(raw, where=where)
    if theirs.model_id != model_dir.name or theirs.manifest_sha256 != manifest_sha256(model_dir):
        raise ValueError(f"{where}: measured on model {theirs.model_id!r} (manifest {theirs.manifest_sha256[:12]}), "
                         f"not this node's {model_dir.name!r} as stored")
    ours, _ = load(model_dir)
    if ours is not None and ours.runs >= theirs.runs:
        return False
    atomic_write_bytes(model_dir / PROFILE_FILE, (json.dumps(theirs.to_json(), indent=1) + "\n").encode(), mode=0o644)
    return True
