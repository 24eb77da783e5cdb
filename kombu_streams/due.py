"""When a published message is due: Celery's ``eta`` header, or an ``x-delay`` header.

The publish script keeps a message due later than ``delayed_threshold`` in the queue's delayed
set and moves it to its stream when it is due, on the server's clock (lua/lib/delay.lua).
What this module reads:

* ``x-delay``: milliseconds from now, the convention of RabbitMQ's delayed-message exchange,
  for plain Kombu users: ``producer.publish(body, headers={'x-delay': 5000})``. Measured from
  when Redis runs the publish, so a client's clock does not matter.
* ``eta``: Celery's task message protocol 2 (``apply_async(eta=...)``, ``countdown=...``,
  ``retry(countdown=...)``) puts an ISO 8601 time in the headers. A time with an offset is
  exact; a naive one is read as UTC, as Celery's worker reads it (``maybe_make_aware`` with
  ``naive_as_utc``), whatever ``enable_utc`` and ``timezone`` say. It is an absolute time on
  the publisher's clock (Celery computed it there); the server's clock decides when it is due.

A value that cannot be read leaves the message to be published at once: Celery's worker then
handles it as it always did (an invalid eta is an InvalidTaskError; a naive one is waited for
in the worker). Protocol 1 messages (``eta`` in the body) are published at once as well.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Callable

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: Longest label (the task id) kept with a delayed message, for operators.
LABEL_MAX = 64

#: The latest due time kept (unix ms, the year 5138): Lua prints a number of 15 or more
#: digits in exponent form, which no reader of the delayed set could take back as ms.
MAX_DUE_MS = 10**14 - 1
#: The longest x-delay (ms, some 317 years): with any clock of this millennium the due time
#: stays within MAX_DUE_MS.
MAX_DELAY_MS = 10**13


class DueTooLate(ValueError):
    """A due time past what kombu-streams keeps: the message is not published."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f'{text[:37]}...'


def _iso_parser() -> Callable[[str], datetime]:
    """dateutil's ISO 8601 parser where it is installed (Celery needs it, so a Celery user
    has it, and it reads every form Celery's worker reads), else the standard library's."""
    try:
        from dateutil.parser import isoparse  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - Kombu without Celery or dateutil
        return lambda text: datetime.fromisoformat(text.replace('Z', '+00:00'))
    return isoparse


_parse_iso = _iso_parser()


def eta_ms(value: Any) -> int | None:
    """An ISO 8601 eta as unix ms (naive: UTC), or None when it cannot be read."""
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str) and value:
        try:
            when = _parse_iso(value)
        except (ValueError, OverflowError, TypeError):
            return None
    else:
        return None
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        when = when.replace(tzinfo=timezone.utc)
    try:  # whole µs, rounded up to the ms: a message is never due before its eta
        micros = (when - EPOCH) // timedelta(microseconds=1)
    except (OverflowError, ValueError):
        return None
    ms = -(-micros // 1000)
    if ms > MAX_DUE_MS:
        raise DueTooLate(f'kombu-streams: eta {_shown(value)} is later than the latest due time '
                         f'kept ({MAX_DUE_MS} ms after 1970, the year 5138); not published')
    return ms


def delay_ms(value: Any) -> int | None:
    """An ``x-delay`` header as whole ms (ints, floats and digit strings), or None; one
    longer than MAX_DELAY_MS (an infinite one included) raises DueTooLate."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        ms: float = value  # exact, however large: float() of 2**1100 would overflow
    else:
        try:
            ms = float(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if ms != ms:  # NaN
            return None
    if ms > MAX_DELAY_MS:
        raise DueTooLate(f'kombu-streams: x-delay {_shown(value)} is longer than the longest delay '
                         f'kept ({MAX_DELAY_MS} ms, some 317 years); not published')
    return int(ms) if ms > float('-inf') else None


def when(message: dict[str, Any]) -> tuple[str, str]:
    """(due, label) for publish.lua: due is '' (now), '+<ms>' or '@<unix ms>'."""
    headers = message.get('headers')
    if not isinstance(headers, dict):
        return '', ''
    label = headers.get('id')
    label = label[:LABEL_MAX] if isinstance(label, str) else ''
    if 'x-delay' in headers:
        ms = delay_ms(headers['x-delay'])
        if ms is not None and ms > 0:
            return f'+{ms}', label
    eta = headers.get('eta')
    if eta:
        at = eta_ms(eta)
        if at is not None:
            return f'@{at}', label
    return '', label


__all__ = ('when', 'eta_ms', 'delay_ms', 'DueTooLate', 'MAX_DUE_MS', 'MAX_DELAY_MS')
