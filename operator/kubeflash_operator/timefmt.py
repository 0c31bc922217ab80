"""RFC 3339 timestamps as Kubernetes writes them (second precision, `Z`), parsed and formatted in one place."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    """2025-01-02T03:04:05Z — the metav1.Time wire format."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    """Parse an RFC 3339 timestamp (Z or offset, optional fraction); None for missing or malformed values."""
    if not value or not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
