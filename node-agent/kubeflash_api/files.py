"""Reading user files at the edge: manifests (one YAML document, no duplicate keys) and batch files (UTF-8 JSONL).

Every refusal names the file (and the line) and says what was expected; sizes are capped before reading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from kubeflash_api.errors import SpecError, show

MAX_MANIFEST_BYTES = 1 << 20
MAX_BATCH_BYTES = 256 << 20


MAX_DEPTH = 100  # nesting of YAML collections; an InferenceJob needs 6, `kubectl get -o yaml` about 15


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (kubectl --validate=strict does too) and nesting
    deeper than MAX_DEPTH (PyYAML's scanner slows quadratically with depth, then overflows the stack)."""

    _depth = 0

    def fetch_flow_collection_start(self, token_class):
        if self.flow_level >= MAX_DEPTH:  # the scanner reads a flow collection whole before the composer sees it
            raise yaml.scanner.ScannerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                            self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # `<<: *base` entries come first; the mapping's own keys override them
    merged = len(node.value) - own
    seen: dict[Any, Any] = {}
    seen_own: dict[Any, bool] = {}
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                    key_node.start_mark) from None
        if i >= merged and seen_own.get(key):  # a key given twice in the mapping itself
            name = repr(key) if isinstance(key, str) else show(key)
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {name}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=deep)
        seen_own[key] = i >= merged
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
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SpecError(str(path), f"cannot be read: {e.strerror}") from None
    if len(data) > limit:  # it grew since stat
        raise SpecError(str(path), f"is more than {limit} bytes; {what} may be at most {limit} bytes")
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
    except RecursionError:
        raise SpecError(str(path), "is not valid YAML: nested too deeply") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as e:  # a tagged or implicit scalar PyYAML's
        # constructors cannot build: 2025-13-45 (a date), a 5000-digit integer, `!!int abc`, `!!timestamp x`
        raise SpecError(str(path), f"is not valid YAML: a value cannot be read ({type(e).__name__}: "
                                   f"{str(e)[:80]})") from None
    if not docs:
        raise SpecError(str(path), "holds no YAML document; expected one InferenceJob")
    if len(docs) > 1:
        kinds = ", ".join(_kind(d) for d in docs[:8]) + (", …" if len(docs) > 8 else "")
        raise SpecError(str(path), f"holds {len(docs)} YAML documents ({kinds}); kubeflash run and plan take exactly one "
                                   f"InferenceJob per file")
    if not isinstance(docs[0], dict):
        raise SpecError(str(path), f"must hold a mapping (an InferenceJob), got {type(docs[0]).__name__}")
    return docs[0]


def _kind(doc: Any) -> str:
    """What a document is, for a message: its kind, or what it is when it has none."""
    if not isinstance(doc, dict):
        return f"a {type(doc).__name__}"
    kind = doc.get("kind")
    return kind[:60] if isinstance(kind, str) else "a mapping without kind" if kind is None else show(kind)


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

    def number(text):
        value = float(text)
        if not math.isfinite(value):
            raise SpecError(where, f"holds the number {text[:40]}, too large for a float")
        return value

    try:
        value = json.loads(line, object_pairs_hook=pairs, parse_constant=constant, parse_float=number)
    except SpecError:
        raise
    except json.JSONDecodeError as e:
        raise SpecError(where, f"is not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise SpecError(where, "is nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise SpecError(where, f"cannot be read: {str(e)[:80]}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise SpecError(where, f"holds a lone surrogate ({e.object[e.start]!r}, a \\uD800-\\uDFFF escape "
                               "without its pair), which is not Unicode text") from None
    except RecursionError:
        raise SpecError(where, "is nested too deeply") from None
    if not isinstance(value, dict):
        raise SpecError(where, f"must be a JSON object, got {type(value).__name__}")
    return value
