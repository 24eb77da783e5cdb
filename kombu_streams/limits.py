"""Queue arguments kept with a queue in Redis (``ks:q:{q}:args``): which ones, their checks,
and how they are stored, so that every publisher is bound by them, declared or not.

A Kombu ``Queue(..., queue_arguments={...})`` (Celery's ``task_queues``) or the transport
option ``queue_arguments`` (for queues an app never declares with arguments, such as Celery's
default ``celery`` queue) gives them; ``declare.lua`` records them with the queue, or refuses a
declare whose arguments differ from those recorded (RabbitMQ's PRECONDITION_FAILED), and
``publish.lua`` reads them on every publish. ``kombu-streams limits QUEUE`` shows and
changes them at run time. Why the length counts what it counts: docs/design.rst, "Queue
arguments and limits".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import redis

from .fair import GROUP_MAX_IN_FLIGHT, fairness_pairs
from .unique import MODE as UNIQUE_MODE
from .unique import MODES as UNIQUE_MODES
from .unique import TTL as UNIQUE_TTL

#: The arguments kombu-streams stores and enforces, in the order they are stored.
MAX_LENGTH, OVERFLOW = 'x-max-length', 'x-overflow'
#: The bytes of the messages a queue holds waiting to be served (ready, requeued, delayed,
#: staged; not in flight): RabbitMQ's x-max-length-bytes, with the same x-overflow
#: (lua/lib/bytes.lua, docs/design.rst "Queue arguments and limits"). Stored after
#: x-max-length, before x-overflow.
MAX_LENGTH_BYTES = 'x-max-length-bytes'
#: The field of a queue's counters hash where the scripts keep those bytes.
WAITING_BYTES = 'waiting-bytes'
#: The field where reads keep an upper bound of a queue's pending entries, with
#: x-max-in-flight (lua/lib/inflight.lua): state of the scripts, not a count to show.
IN_FLIGHT_BOUND = 'in-flight-bound'
#: Message TTL in ms (RabbitMQ's x-message-ttl; Kombu's ``Queue(message_ttl=seconds)``):
#: a message not delivered within it goes to the dead-letter stream (reason ``expired``).
MESSAGE_TTL = 'x-message-ttl'
STORED = (MAX_LENGTH, MAX_LENGTH_BYTES, OVERFLOW, MESSAGE_TTL)
#: x-overflow values: RabbitMQ's names.
OVERFLOWS = ('drop-head', 'reject-publish')
#: Limits known from RabbitMQ that are not enforced yet: refused, never silently ignored.
NOT_YET: dict[str, str] = {}


#: Idempotent publish (kombu_streams/dedup.py, lua/lib/dedup.lua): the window in ms within
#: which a message whose id the queue stored is not stored again, and the most ids remembered
#: (100,000 without it). Stored after the length arguments, in this order.
DEDUP_WINDOW, DEDUP_MAX_IDS = 'x-deduplication-window', 'x-deduplication-max-ids'
DEDUP_STORED = (DEDUP_WINDOW, DEDUP_MAX_IDS)
#: Arguments stored as integers (shown as such by :func:`as_dict`).
INTEGERS: tuple[str, ...] = (MAX_LENGTH, MAX_LENGTH_BYTES, MESSAGE_TTL, *DEDUP_STORED)

#: Unique keys (kombu_streams/unique.py, lua/lib/unique.lua): what a publish whose
#: x-unique-key is taken does (keep-first, the default, or replace the waiting one), and how
#: long (ms) the key stays taken after the ack (throttle). Stored after the deduplication
#: arguments, in this order.
UNIQUE_STORED = (UNIQUE_MODE, UNIQUE_TTL)
INTEGERS = (*INTEGERS, UNIQUE_TTL)


#: Retry backoff (lua/lib/delay.lua, docs/design.rst "Retry backoff"): 'min_ms,max_ms', RabbitMQ
#: 4.3's delayed-retry rule. A message given back (requeue, reject with requeue, reclaim)
#: after n deliveries waits min_ms x n, at most max_ms, in the delayed set. Stored last.
REQUEUE_DELAY = 'x-requeue-delay'
#: The longest max_ms taken: a day (a message waiting longer than a consumer's lease,
#: visibility_timeout, is given back by reclaim then: see the design).
REQUEUE_DELAY_MAX = 86_400_000
INTEGERS = (*INTEGERS, 'x-rate-burst')  # RATE_BURST, below

#: Global concurrency (lua/lib/inflight.lua, docs/design.rst "Global concurrency"): at most
#: this many messages of the queue delivered and not yet settled, over every consumer and
#: process (BullMQ's global concurrency; RabbitMQ has none). Stored after x-requeue-delay.
MAX_IN_FLIGHT = 'x-max-in-flight'
INTEGERS = (*INTEGERS, MAX_IN_FLIGHT)

#: Priority aging (lua/lib/aging.lua, docs/design.rst "Priority aging"): a ready message is
#: served as if one level higher for each this many ms it has waited (IBM CICS's PRTYAGE;
#: RabbitMQ, Kombu and BullMQ keep priorities strict). Stored after x-max-in-flight.
PRIORITY_AGING = 'x-priority-aging'
#: The longest period taken: a day (longer is strict priority in all but name).
PRIORITY_AGING_MAX = 86_400_000
INTEGERS = (*INTEGERS, PRIORITY_AGING, GROUP_MAX_IN_FLIGHT)


class QueueFull(redis.exceptions.ResponseError):
    """A publish refused because the queue holds ``x-max-length`` messages or
    ``x-max-length-bytes`` bytes waiting (``x-overflow`` ``reject-publish``; or a message
    bigger than ``x-max-length-bytes`` alone): nothing was stored. A channel error, not a
    connection error, so a publish with ``retry=True`` does not spin on it; the message
    names the queue and limit."""


class QueueArgumentsDiffer(redis.exceptions.ResponseError):
    """A declare whose queue arguments differ from those the queue has in Redis (as
    RabbitMQ's PRECONDITION_FAILED): nothing was changed; the message names both."""


def _error(queue: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f'kombu-streams: queue {queue!r}: argument {name}={value!r} is not '
                      f'valid: {allowed}')


def _positive(queue: str, name: str, value: Any) -> int:
    """``value`` as an int >= 1 (a digit string too: the CLI's), else ValueError naming it."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(queue, name, value, 'an integer >= 1')
    return value


def dedup_pairs(queue: str, args: Mapping[str, Any]) -> list[str]:
    """The deduplication arguments of ``args`` checked, as stored: [] without a window; a
    cap without a window is refused (it would mean nothing)."""
    window, cap = args.get(DEDUP_WINDOW), args.get(DEDUP_MAX_IDS)
    if window is None:
        if cap is not None:
            raise _error(queue, DEDUP_MAX_IDS, cap, f'it needs {DEDUP_WINDOW}')
        return []
    pairs = [DEDUP_WINDOW, str(_positive(queue, DEDUP_WINDOW, window))]
    if cap is not None:
        pairs += [DEDUP_MAX_IDS, str(_positive(queue, DEDUP_MAX_IDS, cap))]
    return pairs


def backoff_pairs(queue: str, args: Mapping[str, Any]) -> list[str]:
    """x-requeue-delay of ``args`` checked, as stored ('min_ms,max_ms'), or [] without it.
    Given as 'min_ms,max_ms' (the CLI's form), or a pair of ints; 1 <= min_ms <= max_ms <=
    REQUEUE_DELAY_MAX. Raises ValueError naming the queue, the argument and the rule."""
    value = args.get(REQUEUE_DELAY)
    if value is None:
        return []
    parts: Any = value
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(',')]
    rule = (f"'min_ms,max_ms' (RabbitMQ 4.3's delayed retry: min_ms x deliveries, at most "
            f'max_ms), integers with 1 <= min_ms <= max_ms <= {REQUEUE_DELAY_MAX}')
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        raise _error(queue, REQUEUE_DELAY, value, rule)
    numbers = []
    for part in parts:
        if isinstance(part, str) and part.isdigit():
            part = int(part)
        if isinstance(part, bool) or not isinstance(part, int):
            raise _error(queue, REQUEUE_DELAY, value, rule)
        numbers.append(part)
    low, high = numbers
    if not 1 <= low <= high <= REQUEUE_DELAY_MAX:
        raise _error(queue, REQUEUE_DELAY, value, rule)
    return [REQUEUE_DELAY, f'{low},{high}']


def unique_pairs(queue: str, args: Mapping[str, Any]) -> list[str]:
    """The unique-key arguments of ``args`` checked, as stored: [] for neither; the mode one
    of MODES, the ttl an integer >= 1 (ms)."""
    pairs: list[str] = []
    mode, ttl = args.get(UNIQUE_MODE), args.get(UNIQUE_TTL)
    if mode is not None:
        if mode not in UNIQUE_MODES:
            raise _error(queue, UNIQUE_MODE, mode, ' or '.join(UNIQUE_MODES))
        pairs += [UNIQUE_MODE, mode]
    if ttl is not None:
        pairs += [UNIQUE_TTL, str(_positive(queue, UNIQUE_TTL, ttl))]
    return pairs


def stored_pairs(queue: str, arguments: Mapping[str, Any] | None) -> list[str]:
    """The limit arguments of ``arguments`` (other ones, such as x-expires or
    x-max-priority, are left to the code that reads them) checked and as declare.lua stores
    them: a flat [field, value, ...] list of strings in a fixed order; [] for none. An
    x-overflow without a length (x-max-length or x-max-length-bytes) is refused (it would
    mean nothing); x-overflow defaults to drop-head, RabbitMQ's default. Raises ValueError
    naming the queue and argument."""
    args = dict(arguments or {})
    for name, why in NOT_YET.items():
        if name in args:
            raise _error(queue, name, args[name], f'not supported by kombu-streams yet ({why})')
    pairs: list[str] = []
    length, size = args.get(MAX_LENGTH), args.get(MAX_LENGTH_BYTES)
    overflow = args.get(OVERFLOW)
    if length is None and size is None:
        if overflow is not None:
            raise _error(queue, OVERFLOW, overflow,
                         f'it needs {MAX_LENGTH} or {MAX_LENGTH_BYTES}')
    else:
        if overflow is None:
            overflow = 'drop-head'
        if overflow not in OVERFLOWS:
            raise _error(queue, OVERFLOW, overflow, ' or '.join(OVERFLOWS))
        if length is not None:
            pairs += [MAX_LENGTH, str(_count(queue, MAX_LENGTH, length))]
        if size is not None:
            pairs += [MAX_LENGTH_BYTES, str(_count(queue, MAX_LENGTH_BYTES, size))]
        pairs += [OVERFLOW, overflow]
    # x-message-ttl: Celery's event queues (event_queue_ttl) and reply queues set it
    ttl = args.get(MESSAGE_TTL)
    if ttl is not None:
        pairs += [MESSAGE_TTL, str(_count(queue, MESSAGE_TTL, ttl))]
    return (pairs + dedup_pairs(queue, args) + unique_pairs(queue, args)
            + rate_pairs(queue, args) + backoff_pairs(queue, args) + inflight_pairs(queue, args)
            + aging_pairs(queue, args) + fairness_pairs(queue, args))


def inflight_pairs(queue: str, args: Mapping[str, Any]) -> list[str]:
    """x-max-in-flight of ``args`` checked (an integer >= 1, or its digits), as stored, or []
    without it. 0 is refused rather than read as "no limit" or "nothing ever": leave the
    argument out for no limit, so a stored limit always limits."""
    value = args.get(MAX_IN_FLIGHT)
    if value is None:
        return []
    return [MAX_IN_FLIGHT, str(_positive(queue, MAX_IN_FLIGHT, value))]


def aging_pairs(queue: str, args: Mapping[str, Any]) -> list[str]:
    """x-priority-aging of ``args`` checked (ms, an integer from 1 to PRIORITY_AGING_MAX, or
    its digits), as stored, or [] without it. 0 is refused rather than read as "off": leave
    the argument out for strict priority, so a stored period always ages."""
    value = args.get(PRIORITY_AGING)
    if value is None:
        return []
    n = _positive(queue, PRIORITY_AGING, value)
    if n > PRIORITY_AGING_MAX:
        raise _error(queue, PRIORITY_AGING, value, f'an integer from 1 to {PRIORITY_AGING_MAX}')
    return [PRIORITY_AGING, str(n)]


# -- Global rate limit (x-rate-limit, x-rate-burst): lua/lib/rate.lua; docs/design.rst,
# "Global rate limit". Stored after the deduplication arguments, in this order.
RATE_LIMIT, RATE_BURST = 'x-rate-limit', 'x-rate-burst'
RATE_STORED = (RATE_LIMIT, RATE_BURST)
#: Celery's rate units (``Task.rate_limit``): per second, minute, hour.
RATE_UNITS = ('s', 'm', 'h')
#: The largest burst taken: a burst is how many deliveries may go out at once after a pause.
MAX_BURST = 1_000_000
_RATE = re.compile(r'^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*$')


def rate_spec(queue: str, value: Any) -> str:
    """``value`` in Celery's rate syntax ('50/s', '100/m', '1000/h', or a number: per
    second) as stored: '<n>/<unit>' with n > 0 written plainly ('50/s', '0.5/s'); else the
    ValueError naming the queue and argument. 0, which Celery reads as "no limit", is
    refused: leave the argument out instead, so a stored limit always limits."""
    allowed = "a rate in Celery's syntax: a number > 0 per second, or '<n>/s', '<n>/m', '<n>/h'"
    if isinstance(value, bool):
        raise _error(queue, RATE_LIMIT, value, allowed)
    if isinstance(value, (int, float)):
        number, unit = float(value), 's'
    elif isinstance(value, str) and _RATE.match(value):
        m = _RATE.match(value)
        assert m is not None
        number, unit = float(m.group(1)), m.group(2) or 's'
    else:
        raise _error(queue, RATE_LIMIT, value, allowed)
    if not (number > 0 and number < 1e12):  # NaN and inf too
        raise _error(queue, RATE_LIMIT, value, allowed)
    text = str(int(number)) if number == int(number) else repr(number)
    if 'e' in text:  # Lua's pattern reads plain decimals only
        raise _error(queue, RATE_LIMIT, value, allowed + ', written without an exponent')
    return f'{text}/{unit}'


def rate_pairs(queue: str, args: Mapping[str, Any]) -> list[str]:
    """The rate-limit arguments of ``args`` checked, as stored: [] without a rate; a burst
    without a rate is refused (it would mean nothing); the burst (default 1) is stored only
    when given."""
    rate, burst = args.get(RATE_LIMIT), args.get(RATE_BURST)
    if rate is None:
        if burst is not None:
            raise _error(queue, RATE_BURST, burst, f'it needs {RATE_LIMIT}')
        return []
    pairs = [RATE_LIMIT, rate_spec(queue, rate)]
    if burst is not None:
        n = _positive(queue, RATE_BURST, burst)
        if n > MAX_BURST:
            raise _error(queue, RATE_BURST, burst, f'an integer from 1 to {MAX_BURST}')
        pairs += [RATE_BURST, str(n)]
    return pairs


def _count(queue: str, name: str, value: Any) -> int:
    """``value`` of argument ``name`` as an integer >= 0: an int, or its digits as a string
    (from the CLI or a config file); anything else raises the error naming it."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise _error(queue, name, value, 'an integer >= 0')


def as_dict(flat: list[Any]) -> dict[str, Any]:
    """A queue's arguments from their stored flat list (HGETALL): x-max-length as an int."""
    out: dict[str, Any] = {}
    for i in range(0, len(flat) - 1, 2):
        name = flat[i].decode() if isinstance(flat[i], bytes) else str(flat[i])
        value = flat[i + 1].decode() if isinstance(flat[i + 1], bytes) else str(flat[i + 1])
        out[name] = int(value) if name in INTEGERS and value.isdigit() else value
    return out


def counters_of(flat: list[Any]) -> dict[str, int]:
    """A queue's counters from their stored flat list (HGETALL), as ints: the scripts' own
    state (IN_FLIGHT_BOUND) is left out, and so is a field another program wrote that is
    not a whole number, so an operator's view never fails on what it reads."""
    out: dict[str, int] = {}
    for name, value in as_dict(flat).items():
        text = str(value)
        if name != IN_FLIGHT_BOUND and text.lstrip('-').isdigit():
            out[name] = int(text)
    return out


def expiration_ms(message: Mapping[str, Any]) -> int | None:
    """A message's own TTL in ms, from Kombu's ``expiration`` property (a string of ms:
    ``Producer.publish(expiration=seconds)``, and Celery's ``apply_async(expires=...)``, which
    passes the seconds left, 0 when past), or None. A negative value counts as 0 (already
    expired); one that is not a number raises ValueError, as RabbitMQ refuses it, rather
    than storing a message whose TTL would be ignored."""
    properties = message.get('properties') or {}
    value = properties.get('expiration')
    if value is None or value == '':
        return None
    try:
        ms = int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f'kombu-streams: message expiration {value!r} is not a number of '
                         f'milliseconds: not published') from None
    return max(ms, 0)


def check_option(value: Any) -> bool:
    """The rule of the ``queue_arguments`` transport option: queue name -> arguments, each
    valid (:func:`stored_pairs` raises the error that names what is wrong)."""
    if not isinstance(value, Mapping):
        return False
    for queue, arguments in value.items():
        if not isinstance(queue, str) or not isinstance(arguments, Mapping):
            return False
        stored_pairs(queue, arguments)
    return True


__all__ = ('QueueFull', 'QueueArgumentsDiffer', 'stored_pairs', 'as_dict', 'counters_of', 'STORED',
           'MAX_LENGTH', 'MAX_LENGTH_BYTES', 'WAITING_BYTES', 'IN_FLIGHT_BOUND', 'OVERFLOW',
           'OVERFLOWS',
           'MESSAGE_TTL', 'expiration_ms',
           'DEDUP_WINDOW', 'DEDUP_MAX_IDS', 'dedup_pairs', 'UNIQUE_STORED', 'unique_pairs',
           'RATE_LIMIT', 'RATE_BURST', 'rate_pairs', 'rate_spec', 'REQUEUE_DELAY',
           'backoff_pairs', 'MAX_IN_FLIGHT', 'inflight_pairs', 'PRIORITY_AGING',
           'aging_pairs')
