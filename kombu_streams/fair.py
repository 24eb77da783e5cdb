"""Fair share between the groups of a queue: which group a message belongs to, and the queue
argument that turns it on.

A queue declared with ``x-fairness: 'round-robin'`` serves, within each priority level, its
groups in turn: a message's group is its ``x-group`` header (Celery:
``apply_async(headers={'x-group': customer_id})``; none: the default group ''). Publishes
stage each message in its group's FIFO and a read moves them into the level's stream in
rotation order just before reading them (``lua/lib/fair.lua``; docs/design.rst, "Fair
share"). On a queue without the argument the header means nothing: the message is stored as
any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .dedup import short

#: The header that names a message's group.
HEADER = 'x-group'
#: The queue argument, and the values it takes.
ARGUMENT = 'x-fairness'
VALUES = ('round-robin',)
#: The per-group cap (BullMQ Pro's group concurrency): at most this many messages of one
#: group handed out by the rotation and not settled yet; the group's turn passes while it is
#: there (lua/lib/fair.lua's fair_gate). Only with x-fairness. Stored after it.
GROUP_MAX_IN_FLIGHT = 'x-group-max-in-flight'
#: Its largest value: a group's list of moves (one string in the staging hash, rewritten by
#: the read that moves one) holds up to this many, about 20 bytes each.
GROUP_MAX_IN_FLIGHT_MAX = 10_000


def group(message: Mapping[str, Any]) -> str | None:
    """The group of ``message`` (a Kombu envelope): its ``x-group`` header as a string (a long
    one by its SHA-256, as a deduplication id), or None without one (the publish then sends
    no group, unless its queue is known to have x-fairness: kombu_streams/calls.py)."""
    headers = message.get('headers')
    if not isinstance(headers, dict):
        return None
    given = headers.get(HEADER)
    if given is None:
        return None
    return short(str(given))


def fairness_pairs(queue: str, args: Mapping[str, Any]) -> list[str]:
    """x-fairness of ``args`` checked, as stored, with x-group-max-in-flight (an integer >=
    1) after it, or [] without it. With x-max-length (or x-max-length-bytes) only with
    x-overflow reject-publish:
    drop-head sets aside the message a read would serve next, and it does not look at staged
    messages yet; never with x-priority-aging, which looks at the streams only
    (docs/design.rst, "Fair share"). x-group-max-in-flight without x-fairness is refused:
    it would mean nothing."""
    value, cap = args.get(ARGUMENT), args.get(GROUP_MAX_IN_FLIGHT)
    if value is None:
        if cap is not None:
            raise ValueError(f'kombu-streams: queue {queue!r}: argument '
                             f'{GROUP_MAX_IN_FLIGHT}={cap!r} is not valid: it needs '
                             f"{ARGUMENT} 'round-robin' (groups to cap)")
        return []
    if value not in VALUES:
        raise ValueError(f'kombu-streams: queue {queue!r}: argument {ARGUMENT}={value!r} is '
                         f'not valid: {" or ".join(VALUES)}')
    for length in ('x-max-length', 'x-max-length-bytes'):
        if args.get(length) is not None and args.get('x-overflow') != 'reject-publish':
            raise ValueError(f'kombu-streams: queue {queue!r}: argument {ARGUMENT}={value!r} '
                             f'is not valid: with {length} only with x-overflow '
                             f'reject-publish (drop-head does not set staged messages aside '
                             f'yet)')
    if args.get('x-priority-aging') is not None:
        raise ValueError(f'kombu-streams: queue {queue!r}: argument {ARGUMENT}={value!r} is '
                         f'not valid with x-priority-aging (aging looks at the streams, and '
                         f'a staged message is in none until a read moves it: it would not '
                         f'age)')
    if cap is None:
        return [ARGUMENT, value]
    if isinstance(cap, str) and cap.isdigit():
        cap = int(cap)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= GROUP_MAX_IN_FLIGHT_MAX:
        raise ValueError(f'kombu-streams: queue {queue!r}: argument {GROUP_MAX_IN_FLIGHT}='
                         f'{cap!r} is not valid: an integer from 1 to '
                         f'{GROUP_MAX_IN_FLIGHT_MAX:,}')
    return [ARGUMENT, value, GROUP_MAX_IN_FLIGHT, str(cap)]


__all__ = ('HEADER', 'ARGUMENT', 'VALUES', 'GROUP_MAX_IN_FLIGHT', 'group', 'fairness_pairs')
