"""The one error a user's mistake in an InferenceJob or FlashNode becomes: the field path and what was expected."""

from __future__ import annotations

import re
import reprlib
from typing import Any


class SpecError(ValueError):
    """A bad manifest, input file or field; `path` names it (`spec.generation.topP`, `prompts.jsonl:3`)."""

    def __init__(self, path: str, problem: str | None = None):
        if problem is None:  # one whole sentence that already names its field
            path, problem = "", path
        super().__init__(f"{path} {problem}" if path else problem)
        self.path = path
        self.problem = problem


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def show(value: Any, limit: int = 60) -> str:
    """`type value` for a message, bounded in time and length whatever the value is (a YAML alias bomb, an
    integer of a million digits, a deeply nested list)."""
    return f"{type(value).__name__} {_brief(value, limit)}"


def _brief(value: Any, limit: int) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        text = repr(value)
    elif isinstance(value, int):
        bits = value.bit_length()
        text = repr(value) if bits < 200 else f"<an integer of about {int(bits * 0.30103) + 1} digits>"
    elif isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
    else:
        text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class _BoundedRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        return _brief(x, self.maxother)


_REPR = _BoundedRepr()
_REPR.maxlevel, _REPR.maxother, _REPR.maxstring = 3, 40, 40


def child(path: str, key: Any) -> str:
    """The path of `key` under `path`: `spec.model.uri`, or `metadata.labels['app.kubernetes.io/name']` for a key
    that is not a plain word (so a key holding dots or nothing at all still names one place)."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]" if isinstance(key, str) else f"{path}[{show(key)}]"
