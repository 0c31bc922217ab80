"""Reading user files at the edge: manifests (one YAML document, no duplicate keys) and batch files (UTF-8 JSONL).

Every refusal names the file (and the line) and says what was expected; sizes are capped before reading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kubeflash_api.errors import SpecError

MAX_MANIFEST_BYTES = 1 << 20
MAX_BATCH_BYTES = 256 << 20


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (kubectl --validate=strict does too)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                    key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_text(path: Path, *, what: str, limit: int) -> str:
    """A regular file's text: it exists, is at most `limit` bytes, is UTF-8 and not binary, and is not empty."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SpecError(str(path), f"does not exist (expected {what})") from None
    except OSError as e:
        raise SpecError(str(path), f"cannot be read: {e.strerror}") from None
    if not path.is_file():
        raise SpecError(str(path), f"is not a regular file (expected {what})")
    if st.st_size > limit:
        raise SpecError(str(path), f"is {st.st_size} bytes; {what} may be at most {limit} bytes")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if b"\0" in data:
        raise SpecError(str(path), f"is binary (holds NUL bytes); expected {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(str(path), f"is not UTF-8 (byte {e.start}); expected {what}") from None
    if not text.strip():
        raise SpecError(str(path), f"is empty; expected {what}")
    return text.removeprefix("\ufeff")


def load_manifest(path: Path) -> dict:
    """The one YAML document in a manifest file, as a mapping."""
    text = read_text(path, what="an InferenceJob manifest (YAML)", limit=MAX_MANIFEST_BYTES)
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(where, f"is not valid YAML: {problem}") from None
    if not docs:
        raise SpecError(str(path), "holds no YAML document; expected one InferenceJob")
    if len(docs) > 1:
        kinds = ", ".join(str(d.get("kind")) if isinstance(d, dict) else type(d).__name__ for d in docs)
        raise SpecError(str(path), f"holds {len(docs)} YAML documents ({kinds}); kubeflash run takes exactly one "
                                   f"InferenceJob per file")
    if not isinstance(docs[0], dict):
        raise SpecError(str(path), f"must hold a mapping (an InferenceJob), got {type(docs[0]).__name__}")
    return docs[0]


def json_object(line: str, where: str) -> dict:
    """One JSON object from a line, refusing duplicate keys, NaN/Infinity and non-objects."""
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise SpecError(where, f"has the key {k!r} twice")
            out[k] = v
        return out

    def constant(name):
        raise SpecError(where, f"holds {name}, which is not JSON")

    try:
        value = json.loads(line, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise SpecError(where, f"is not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise SpecError(where, "is nested too deeply") from None
    if not isinstance(value, dict):
        raise SpecError(where, f"must be a JSON object, got {type(value).__name__}")
    return value
