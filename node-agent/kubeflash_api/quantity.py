"""The one parser of Kubernetes quantities (`10Gi`, `1.5G`, `1e9`, `4096`) as whole bytes."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from kubeflash_api.errors import SpecError, show

# The grammar of k8s.io/apimachinery/pkg/api/resource (signed numbers are not byte counts, so no sign but '+').
_QUANTITY = re.compile(
    r"^\+?(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[kMGTPE]|[eE][+-]?[0-9]+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
MAX_BYTES = 2**60  # 1 EiB: anything larger is a typo, not a disk
PATTERN = _QUANTITY.pattern  # what the CRDs check at apply time


def parse_quantity(value: object, *, path: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
    """`value` (an integer or a quantity string) as bytes, rounded up; SpecError naming `path` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(path, f"must be a quantity such as 10Gi or 500M (an integer or a string), got {show(value)}")
    if isinstance(value, int):
        n = value
    else:
        # fullmatch, no strip: the API server checks PATTERN with Go's `$` (end of text), so " 1Gi" or "1Gi\n"
        # must be refused here too, or kubeflash run would take what kubectl apply refuses
        m = _QUANTITY.fullmatch(value) if len(value) <= 64 else None
        if not m:
            raise SpecError(path, f"must be a quantity such as 10Gi, 500M or 1e9, got {value!r}")
        suffix = m["suffix"] or ""
        try:
            number = Decimal(m["num"])
            if suffix and suffix not in _BINARY and suffix not in _DECIMAL:  # an exponent ("E" is exa, "Ei" exbi)
                exp = int(suffix[1:])
                if exp > 30:
                    raise SpecError(path, f"must be at most {human(hi)}, got {_given(value)}")
                number = number.scaleb(exp)
            else:
                number *= _BINARY.get(suffix) or _DECIMAL.get(suffix) or 1
        except InvalidOperation:
            raise SpecError(path, f"must be a quantity such as 10Gi, got {value!r}") from None
        n = int(math.ceil(number))
    if n < lo:
        raise SpecError(path, f"must be at least {human(lo)}, got {_given(value)}")
    if n > hi:
        raise SpecError(path, f"must be at most {human(hi)}, got {_given(value)}")
    return n


def _given(value: int | str) -> str:
    return repr(value) if isinstance(value, str) else show(value).split(" ", 1)[1]


def human(n: int) -> str:
    """Bytes in the largest binary unit that keeps one decimal: 10.0 GiB."""
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
