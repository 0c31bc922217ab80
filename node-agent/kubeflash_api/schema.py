"""A small schema language: one description of each API field gives both the strict parser and the CRD schema.

Every node carries its description, so the generated CRDs explain every field (`kubectl explain`), and the parser
and the API server can only disagree where a rule is written twice on purpose (the CEL `rules` beside the Python
checks of the same rule, tested against each other in tests/unit/api).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeflash_api.errors import SpecError, child, show
from kubeflash_api.quantity import PATTERN as QUANTITY_PATTERN
from kubeflash_api.quantity import parse_quantity

MISSING: Any = object()


@dataclass(frozen=True)
class Node:
    """One field's schema: `kind` is string | integer | number | boolean | quantity | object | array | map | any."""

    kind: str
    doc: str
    default: Any = MISSING
    enum: tuple = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    min_len: int | None = None
    max_len: int | None = None
    pattern: str | None = None
    fields: tuple[tuple[str, Node], ...] = ()  # object: (key, node) in order
    required: tuple[str, ...] = ()  # object: keys that must be present
    items: Node | None = None  # array: the item schema; map: the value schema
    rules: tuple[tuple[str, str], ...] = ()  # CEL (rule, message) pairs the API server checks
    fmt: str | None = None  # openAPI format (date-time, int64)
    list_map_keys: tuple[str, ...] = ()  # array of objects keyed like a map (conditions)
    check: Callable[[Any, str], Any] | None = None  # extra Python check of the parsed value (value, path) -> value
    preserve_unknown: bool = False  # metadata: the API server's own schema

    def field(self, key: str) -> Node:
        return dict(self.fields)[key]


def obj(doc: str, *fields: tuple[str, Node], required: tuple[str, ...] = (), **kw) -> Node:
    return Node("object", doc, fields=fields, required=required, **kw)


def string(doc: str, **kw) -> Node:
    return Node("string", doc, **kw)


def integer(doc: str, **kw) -> Node:
    return Node("integer", doc, **kw)


def number(doc: str, **kw) -> Node:
    return Node("number", doc, **kw)


def boolean(doc: str, **kw) -> Node:
    return Node("boolean", doc, **kw)


def quantity(doc: str, **kw) -> Node:
    return Node("quantity", doc, **kw)


def array(doc: str, items: Node, **kw) -> Node:
    return Node("array", doc, items=items, **kw)


def mapping(doc: str, values: Node, **kw) -> Node:
    return Node("map", doc, items=values, **kw)


# ------------------------------------------------------------------------------------------------ parsing


_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "object": "an object", "array": "a list", "map": "an object of strings"}


def parse(node: Node, value: Any, path: str) -> Any:
    """`value` checked against `node` (strictly: unknown keys, wrong types, NaN and out-of-range values are errors),
    with defaults filled in; every error is a SpecError naming the field path."""
    out = _parse(node, value, path)
    return node.check(out, path) if node.check else out


def _parse(node: Node, value: Any, path: str) -> Any:
    k = node.kind
    if k == "object":
        return _object(node, value, path)
    if k == "array":
        if not isinstance(value, list):
            raise SpecError(path, f"must be a list, got {_show(value)}")
        _length(node, len(value), path, "items")
        return [parse(node.items, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if k == "map":
        if not isinstance(value, Mapping):
            raise SpecError(path, f"must be an object, got {_show(value)}")
        _length(node, len(value), path, "entries")
        return {_key(kk, path): parse(node.items, v, child(path, kk)) for kk, v in value.items()}
    if k == "quantity":
        return parse_quantity(value, path=path, lo=int(node.lo or 0), **({"hi": int(node.hi)} if node.hi else {}))
    if k == "any":
        return value
    if k == "boolean":
        if not isinstance(value, bool):
            raise SpecError(path, f"must be true or false, got {_show(value)}")
        return value
    if k == "string":
        return _string(node, value, path)
    return _number(node, value, path)


def _object(node: Node, value: Any, path: str) -> dict:
    if node.preserve_unknown and isinstance(value, Mapping) and not node.fields:
        return dict(value)
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be an object, got {_show(value)}")
    known = dict(node.fields)
    for key in value:
        _key(key, path)
        if key not in known:
            names = ", ".join(known) or "none"
            raise SpecError(child(path, key), f"is not a known field (known fields: {names})")
    out = {}
    for key, sub in node.fields:
        where = f"{path}.{key}"
        v = value.get(key)
        if v is None:  # YAML `key:` with nothing after it is the same as leaving the key out
            if key in node.required:
                raise SpecError(where, f"is required ({sub.doc.split('.')[0].lower()})")
            if sub.default is not MISSING:
                out[key] = parse(sub, _copy(sub.default), where)
            continue
        out[key] = parse(sub, v, where)
    return out


def _string(node: Node, value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise SpecError(path, f"must be a string, got {_show(value)}")
    if "\0" in value:
        raise SpecError(path, "must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from a "\ud800" escape: no file or tokenizer takes it
            raise SpecError(path, f"must be valid Unicode, got a lone surrogate {value[e.start]!r} at character "
                                  f"{e.start}") from None
    _length(node, len(value), path, "characters")
    if node.enum and value not in node.enum:
        raise SpecError(path, f"must be one of {', '.join(node.enum)}, got {value!r}")
    return value


def _number(node: Node, value: Any, path: str) -> int | float:
    if node.kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, f"must be an integer, got {_show(value)}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, f"must be a number, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range
            raise SpecError(path, f"must be a finite number, got {_show(value)}") from None
        if not math.isfinite(value):
            raise SpecError(path, f"must be a finite number, got {value!r}")
    lo_bad = node.lo is not None and (value <= node.lo if node.lo_open else value < node.lo)
    if lo_bad or (node.hi is not None and value > node.hi):
        lo = "" if node.lo is None else f"{'>' if node.lo_open else '>='} {node.lo:g}"
        hi = "" if node.hi is None else f"<= {node.hi:g}"
        got = f"{value:g}" if isinstance(value, float) else show(value).split(" ", 1)[1]
        raise SpecError(path, f"must be {' and '.join(s for s in (lo, hi) if s)}, got {got}")
    return value


def _length(node: Node, n: int, path: str, what: str) -> None:
    if node.min_len is not None and n < node.min_len:
        raise SpecError(path, f"must have at least {node.min_len} {what}, got {n}")
    if node.max_len is not None and n > node.max_len:
        raise SpecError(path, f"must have at most {node.max_len} {what}, got {n}")


def _key(key: Any, path: str) -> str:
    if not isinstance(key, str):
        raise SpecError(path, f"has a key that is not a string: {_show(key)}")
    return key


def _show(value: Any) -> str:
    return show(value)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------- openAPI (CRDs)


def openapi(node: Node) -> dict[str, Any]:
    """The node as a CRD openAPIV3Schema fragment, descriptions included."""
    out: dict[str, Any] = {}
    if node.kind == "quantity":
        out.update({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": QUANTITY_PATTERN})
    elif node.kind == "map":
        out.update({"type": "object", "additionalProperties": openapi(node.items)})
    elif node.kind == "any":
        out["x-kubernetes-preserve-unknown-fields"] = True
    else:
        out["type"] = node.kind
    out["description"] = node.doc
    if node.fmt:
        out["format"] = node.fmt
    if node.enum:
        out["enum"] = list(node.enum)
    if node.default is not MISSING:
        out["default"] = node.default
    _bounds(node, out)
    if node.kind == "object":
        if node.preserve_unknown and not node.fields:
            return {"type": "object"}  # metadata: the API server allows nothing else there (kubectl explain has it)
        if node.required:
            out["required"] = list(node.required)
        out["properties"] = {k: openapi(v) for k, v in node.fields}
    if node.kind == "array":
        out["items"] = openapi(node.items)
        if node.list_map_keys:
            out["x-kubernetes-list-type"] = "map"
            out["x-kubernetes-list-map-keys"] = list(node.list_map_keys)
    if node.rules:
        out["x-kubernetes-validations"] = [{"rule": r, "message": m} for r, m in node.rules]
    return out


def _bounds(node: Node, out: dict[str, Any]) -> None:
    if node.kind in ("integer", "number"):
        if node.lo is not None:
            out["minimum"] = _num(node.lo)
            if node.lo_open:
                out["exclusiveMinimum"] = True
        if node.hi is not None:
            out["maximum"] = _num(node.hi)
    names = {"string": ("minLength", "maxLength"), "array": ("minItems", "maxItems"),
             "map": ("minProperties", "maxProperties")}.get(node.kind)
    if names:
        if node.min_len is not None:
            out[names[0]] = node.min_len
        if node.max_len is not None:
            out[names[1]] = node.max_len
    if node.pattern and node.kind == "string":
        out["pattern"] = node.pattern


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def walk(node: Node, path: str = "") -> list[tuple[str, Node]]:
    """Every (path, node) under `node`, depth first: the fields `kubectl explain` shows."""
    out = [(path, node)]
    for key, sub in node.fields:
        out += walk(sub, f"{path}.{key}" if path else key)
    if node.items is not None:
        out += walk(node.items, f"{path}[]")
    return out
