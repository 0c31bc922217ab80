"""Bounded polling for cluster and kind tests: wait until a condition holds, or fail showing the last value seen."""

from __future__ import annotations

import json
import time
from typing import Any, Callable


def wait_for(what: str, get: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 30.0,
             every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = get()
        if ok(value):
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {json.dumps(value, default=str)[:3000]}")
