"""Transport options: every one is checked when a channel is made, with one clear error.

A wrong option should fail where it is set, not later as a spinning consumer, a raw Lua error
or a silent default: ``max_read_batch=0`` would make a consumer that never receives,
``dead_letter_rejected='no'`` would read as true. So each option a user can set has a rule
here, and :func:`check` raises ``ValueError`` naming the option, the value and what is
allowed. Booleans must be ``True`` or ``False`` (not ``'no'``, not ``0``); integers must be
integers (not ``True``, not ``'10'``); numbers must be finite.
"""

from __future__ import annotations

import math
from bisect import bisect
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

#: Kombu's default separator in priority list names and binding members.
SEP = '\x06\x16'


def priority_steps_error(steps: Any) -> str | None:
    """What is wrong with a ``priority_steps`` value, or None: Kombu's priorities are 0..9,
    and each step is the lowest priority of a level, so the steps must rise from 0."""
    if (isinstance(steps, (list, tuple)) and steps
            and all(_is_int(s) and 0 <= s <= 9 for s in steps)
            and list(steps) == sorted(set(steps)) and steps[0] == 0):
        return None
    return (f'must be increasing integers from 0 to 9 starting at 0, e.g. [0, 3, 6, 9]; '
            f'got {steps!r}')


def level_for(levels: Sequence[int], priority: int) -> int:
    """The level of a priority as Kombu's Redis transport picks it: the highest step not
    above it (level 0 is served first)."""
    return levels[bisect(levels, priority) - 1]


class Rule(NamedTuple):
    ok: Callable[[Any], bool]
    allowed: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _int_at_least(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f'an integer >= {low}')


def _or_none(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f'{rule.allowed}, or None')


POSITIVE = Rule(lambda v: _is_number(v) and v > 0, 'a positive number of seconds')
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, 'a number of seconds >= 0')
BOOL = Rule(lambda v: isinstance(v, bool), 'True or False')
TEXT = Rule(lambda v: isinstance(v, str), 'a string')
MAPPING = Rule(lambda v: isinstance(v, Mapping), 'a dict')
#: What Redis takes as a client name (CLIENT SETNAME): printable ASCII, no spaces.
CLIENT_NAME = Rule(lambda v: isinstance(v, str) and all('!' <= c <= '~' for c in v),
                   'a string of printable ASCII characters without spaces')
#: TCP keepalive settings as redis-py takes them: socket option number -> integer.
KEEPALIVE = Rule(lambda v: isinstance(v, Mapping)
                 and all(_is_int(k) and _is_int(n) for k, n in v.items()),
                 'a dict of socket option numbers (socket.TCP_KEEPIDLE, ...) to integers')

#: option -> rule, for every option that has no more specific check of its own
#: (priority_steps, queue_order_strategy, credential_provider and ssl are checked where
#: they are used, with messages of their own).
RULES: dict[str, Rule] = {
    # Kombu's Redis transport options
    'visibility_timeout': POSITIVE,
    'polling_interval': _or_none(POSITIVE),
    'sep': Rule(lambda v: isinstance(v, str) and v != '', 'a non-empty string'),
    'global_keyprefix': _or_none(TEXT),
    'socket_timeout': _or_none(POSITIVE),
    'socket_connect_timeout': _or_none(POSITIVE),
    'socket_keepalive': _or_none(BOOL),
    'socket_keepalive_options': _or_none(KEEPALIVE),
    'retry_on_timeout': _or_none(BOOL),
    'max_connections': _or_none(_int_at_least(2)),
    'health_check_interval': _or_none(NON_NEGATIVE),
    'client_name': _or_none(CLIENT_NAME),
    'master_name': _or_none(TEXT),
    'min_other_sentinels': _or_none(_int_at_least(0)),
    'sentinel_kwargs': _or_none(MAPPING),
    'deadletter_queue': _or_none(TEXT),
    # kombu-streams options
    'routing_cache_ttl': NON_NEGATIVE,
    'max_read_batch': _int_at_least(1),
    'max_read_bytes': _int_at_least(1),
    'purge_batch': _int_at_least(1),
    'reclaim_batch': _int_at_least(1),
    'max_deliveries': _int_at_least(0),
    'dead_letter_rejected': BOOL,
    'publish_min_replicas': _int_at_least(0),
    'publish_replica_timeout': POSITIVE,
    'max_message_size': _or_none(_int_at_least(1)),
    'cluster': BOOL,
    'delayed_delivery': BOOL,
    'delayed_threshold': NON_NEGATIVE,
}


def check(values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for the first option in ``values`` that breaks its rule."""
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is not None and not rule.ok(value):
            raise ValueError(f'kombu-streams: transport option {name!r} must be '
                             f'{rule.allowed}; got {value!r}')
