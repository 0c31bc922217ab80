"""Which model source URIs the store can read, checked before anything is fetched or converted.

Supported: builtin:<name>, dummy:<preset>, a local path (or file://), and http(s):// (downloaded, then
converted). Any other scheme (s3://, gs://, ftp://, hf://, ...) is refused by name rather than taken for a path.
"""

from __future__ import annotations

import re

from .format import StoreError

SUPPORTED = "builtin:, dummy:, a local path, or http(s)://"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class UnsupportedScheme(StoreError, ValueError):
    """A model URI names a scheme the store cannot fetch."""


def uri_scheme(uri: str) -> str | None:
    """The `scheme` of `scheme://…`, lower-cased; None for builtin:, dummy: and paths."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else None


def check_scheme(uri: str, *, field: str = "spec.model.uri") -> str:
    """Return `uri` when the store can read it; else raise UnsupportedScheme naming `field` and the scheme."""
    scheme = uri_scheme(uri)
    if scheme is not None and scheme not in ("http", "https", "file"):
        raise UnsupportedScheme(f"{field}: scheme {scheme!r} is not supported; use {SUPPORTED}")
    return uri
