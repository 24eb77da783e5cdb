"""Values read from Redis, shown to people (CLI tables, migration reports, logs)."""

from __future__ import annotations

from typing import Any

#: Characters of an entry shown in a report.
PREVIEW = 80


def text(value: Any) -> str:
    """``value`` as text: bytes decoded as UTF-8, undecodable bytes replaced."""
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def preview(raw: Any) -> str:
    """The start of an entry, for reports."""
    s = text(raw)
    return s if len(s) <= PREVIEW else s[:PREVIEW - 3] + '...'


__all__ = ('PREVIEW', 'text', 'preview')
