"""The engine's progress.json (docs/contract.md) mapped onto InferenceJob.status; pure.

The file is written by the pod, so it is treated as untrusted: size-capped by the caller, every field
type-checked, timings limited to numeric values under short word-like keys.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_BYTES = 64 << 10  # progress.json is a few hundred bytes; anything larger is refused unread
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")


def parse(text: str) -> dict[str, Any] | None:
    """The progress document, or None when it is not a JSON object (e.g. caught mid-write by an old engine)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _count(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return None
    return int(v)


def _rate(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return None
    return round(float(v), 3)


def status_patch(doc: dict[str, Any]) -> dict[str, Any]:
    """{progress, throughput, timings} for a merge patch of InferenceJob.status (only fields that are valid)."""
    progress: dict[str, Any] = {}
    for key in ("promptsDone", "promptsTotal", "tokens"):
        if (n := _count(doc.get(key))) is not None:
            progress[key] = n
    if "promptsDone" in progress and "promptsTotal" in progress:
        progress["summary"] = f"{progress['promptsDone']}/{progress['promptsTotal']}"
    if isinstance(doc.get("updated"), str) and len(doc["updated"]) <= 40:
        progress["updated"] = doc["updated"]
    throughput = {k: r for k in ("tokensPerSecond", "prefillTokensPerSecond", "decodeTokensPerSecond")
                  if (r := _rate(doc.get(k))) is not None}
    raw = doc.get("timings") if isinstance(doc.get("timings"), dict) else {}
    timings = {k: r for k, v in raw.items() if _KEY.match(k) and (r := _rate(v)) is not None}
    patch: dict[str, Any] = {}
    if progress:
        patch["progress"] = progress
    if throughput:
        patch["throughput"] = throughput
    if timings:
        patch["timings"] = dict(sorted(timings.items())[:64])
    return patch
