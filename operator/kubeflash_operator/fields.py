"""Typed access to one mapping of a spec, every error naming the field path (`spec.generation.topP must …`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^\+?(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[kMGTPE]|[eE]\+?[0-9]+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


class SpecError(ValueError):
    """A user's mistake in an InferenceJob spec; `path` is the offending field (spec.generation.topP)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path} {problem}")
        self.path = path
        self.problem = problem


def parse_quantity(value: Any, *, path: str) -> int:
    """A Kubernetes quantity (10Gi, 1.5G, 1e9, 4096) as whole bytes, rounded up."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(path, f"must be a quantity such as 10Gi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SpecError(path, f"must not be negative, got {value}")
        return value
    m = _QUANTITY.match(value.strip())
    if not m:
        raise SpecError(path, f"must be a quantity such as 10Gi, got {value!r}")
    number = Decimal(m["num"])  # the regex admits only decimals
    suffix = m["suffix"] or ""
    if suffix[:1] in ("e", "E"):
        number *= Decimal(10) ** int(suffix[1:].lstrip("+"))
    else:
        number *= _BINARY.get(suffix) or _DECIMAL.get(suffix) or 1
    return int(math.ceil(number))


class Reader:
    """Typed access to one mapping of the spec; every error names `<path>.<key>`."""

    def __init__(self, data: Any, path: str, *, present: bool = True):
        if data is None:
            data, present = {}, False
        if not isinstance(data, Mapping):
            raise SpecError(path, f"must be an object, got {type(data).__name__}")
        self.data, self.path, self.present = data, path, present

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def only(self, *allowed: str) -> None:
        for key in self.data:
            if key not in allowed:
                raise SpecError(f"{self.path}.{key}", f"is not a known field (known: {', '.join(allowed)})")

    def sub(self, key: str, *, required: bool = True) -> Reader:
        if required and not self.has(key):
            raise SpecError(f"{self.path}.{key}", "is required")
        return Reader(self.get(key), f"{self.path}.{key}", present=self.has(key))

    def string(self, key: str, *, default: Any = ...) -> Any:
        value = self._value(key, default)
        if value is default and default is not ...:
            return default
        if not isinstance(value, str) or not value:
            raise SpecError(f"{self.path}.{key}", f"must be a non-empty string, got {value!r}")
        return value

    def name(self, key: str) -> str:
        value = self.string(key)
        if len(value) > 253 or not K8S_NAME.match(value):
            raise SpecError(f"{self.path}.{key}", f"must be a Kubernetes object name, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, default: str) -> str:
        value = self._value(key, default)
        if value not in choices:
            raise SpecError(f"{self.path}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, key: str, *, default: Any = ..., lo: int | None = None, hi: int | None = None) -> Any:
        value = self._value(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{self.path}.{key}", f"must be an integer, got {value!r}")
        self._range(key, value, lo, hi)
        return value

    def number(self, key: str, *, default: float, lo: float | None = None) -> float:
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"{self.path}.{key}", f"must be a number, got {value!r}")
        self._range(key, value, lo, None)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._value(key, False)
        if not isinstance(value, bool):
            raise SpecError(f"{self.path}.{key}", f"must be true or false, got {value!r}")
        return value

    def quantity(self, key: str, *, default: Any = None) -> Any:
        value = self._value(key, default)
        return None if value is None else parse_quantity(value, path=f"{self.path}.{key}")

    def strings(self, key: str, *, min_items: int) -> list[str]:
        value = self.get(key)
        where = f"{self.path}.{key}"
        if not isinstance(value, list) or len(value) < min_items:
            raise SpecError(where, f"must be a list of at least {min_items} strings, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise SpecError(f"{where}[{i}]", f"must be a non-empty string, got {item!r}")
        return value

    def _value(self, key: str, default: Any) -> Any:
        value = self.get(key)
        if value is None:
            if default is ...:
                raise SpecError(f"{self.path}.{key}", "is required")
            return default
        return value

    def _range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
            raise SpecError(f"{self.path}.{key}", f"must be in {bounds}, got {value}")
