"""Transport options: one table (:data:`OPTIONS`) says each option's name, type, default,
rule, the part of the transport that reads it, and its help; everything else derives from it.

Derived from the table: the Channel's class attributes and ``from_transport_options``
(:func:`channel_names`, :func:`set_defaults`), the pool's options (:data:`POOL_OPTIONS`),
the checks (:func:`check`), the warnings for unknown names (:func:`warn_unknown`), the
CLI's defaults (:data:`DEFAULTS`) and the documentation's option reference (:func:`rst`,
rendered into docs/reference/options.rst when the docs are built, so it cannot go stale;
``python -m kombu_streams.options --rst`` prints it). A new option is one row here (and,
for a channel option, its type annotation on ``Channel`` for mypy; a test checks that the
two agree).

Why every option is checked where it is set: a wrong one should fail there, not later as a
spinning consumer, a raw Lua error or a silent default (``max_read_batch=0`` would make a
consumer that never receives, ``dead_letter_rejected='no'`` would read as true). So
:func:`check` raises ``ValueError`` naming the option, the value and what is allowed.
Booleans must be ``True`` or ``False`` (not ``'no'``, not ``0``); integers must be integers
(not ``True``, not ``'10'``); numbers must be finite.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
import warnings
from bisect import bisect
from collections.abc import Mapping, Sequence
from copy import copy
from typing import Any, Callable, NamedTuple

import redis
from kombu.transport import virtual
from kombu.utils.scheduling import cycle_by_name

from .limits import check_option as check_queue_arguments

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


def ms(seconds: float) -> int:
    """A duration option in seconds as whole milliseconds for Redis: rounded up, and at
    least 1, because Redis reads 0 ms as "forever" or "no wait" (BZPOPMIN 0, WAIT n 0, an
    XPENDING IDLE of 0 that takes every lease as run out). The rounding to 6 places first
    keeps float noise (1.1 * 1000 = 1100.0000000000002) from adding a millisecond."""
    return max(math.ceil(round(seconds * 1000, 6)), 1)


# -- rules -------------------------------------------------------------------------------------


class Rule(NamedTuple):
    ok: Callable[[Any], bool]
    #: what is allowed, for error messages and the docs ("an integer >= 1")
    allowed: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _int_at_least(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f'an integer >= {low}')


def _or_none(rule: Rule) -> Rule:
    allowed = 'True, False or None' if rule is BOOL else f'{rule.allowed}, or None'
    return Rule(lambda v: v is None or rule.ok(v), allowed)


def _cycle_ok(v: Any) -> bool:
    try:  # Kombu's names, or a dotted path to a cycle class
        return isinstance(v, str) and cycle_by_name(v) is not None
    except (KeyError, ImportError, AttributeError, ValueError):
        return False


POSITIVE = Rule(lambda v: _is_number(v) and v > 0, 'a positive number of seconds')
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, 'a number of seconds >= 0')
BOOL = Rule(lambda v: isinstance(v, bool), 'True or False')
TEXT = Rule(lambda v: isinstance(v, str), 'a string')


def _queue_arguments_ok(value: Any) -> bool:
    """A dict of queue name -> arguments, each valid; a wrong argument raises the ValueError
    that names the queue and argument (clearer than the rule's generic text)."""
    try:
        return check_queue_arguments(value)
    except ValueError as exc:
        raise ValueError(f'kombu-streams: transport option \'queue_arguments\': {exc}') from None


QUEUE_ARGUMENTS = Rule(_queue_arguments_ok,
                       "a dict of queue name -> dict of queue arguments, e.g. "
                       "{'celery': {'x-max-length': 10000, 'x-overflow': 'reject-publish'}}")
MAPPING = Rule(lambda v: isinstance(v, Mapping), 'a dict')
#: What Redis takes as a client name (CLIENT SETNAME): printable ASCII, no spaces.
CLIENT_NAME = Rule(lambda v: isinstance(v, str) and all('!' <= c <= '~' for c in v),
                   'a string of printable ASCII characters without spaces')
#: TCP keepalive settings as redis-py takes them: socket option number -> integer.
KEEPALIVE = Rule(lambda v: isinstance(v, Mapping)
                 and all(_is_int(k) and _is_int(n) for k, n in v.items()),
                 'a dict of socket option numbers (socket.TCP_KEEPIDLE, ...) to integers')
PRIORITY_STEPS = Rule(lambda v: priority_steps_error(v) is None,
                      'increasing integers from 0 to 9 starting at 0, e.g. [0, 3, 6, 9]')
CYCLE = Rule(_cycle_ok, "'round_robin', 'priority' or 'sorted'")
#: Kombu's virtual channel encodes bodies with one of its codecs; '' and None: as they are.
BODY_ENCODING = Rule(lambda v: v is None or v == '' or v in virtual.Channel.codecs,
                     ' or '.join([*map(repr, sorted(virtual.Channel.codecs)), 'None']))
CREDENTIAL_PROVIDER = Rule(lambda v: v is None or isinstance(v, (str, redis.CredentialProvider)),
                           'a redis.CredentialProvider, its dotted class name, or None')


#: Bytes one read call copies by default (``max_read_bytes``): about 10 ms of Redis time
#: (docs/design.rst, "Reads bounded by bytes"); a message bigger than this goes alone.
READ_BYTES = 2 * 1024 * 1024

#: Messages of at least this many bytes are stored apart (``big_message_bytes``): copying one
#: through a script costs Redis some 3 to 6 ms per MB, so above this a script would take
#: more than a few ms (docs/design.rst, "Big messages").
BIG_BYTES = 512 * 1024

# -- the table -------------------------------------------------------------------------------

#: Who reads an option (the docs group the list by it).
CHANNEL = 'channel'      # Kombu sets it on each channel (Channel.from_transport_options)
TRANSPORT = 'transport'  # the transport reads it when it is made or connects
POOL = 'pool'            # given to redis-py's connection pool as it is
SENTINEL = 'sentinel'    # sentinel-streams:// only
CLUSTER = 'cluster'      # Redis Cluster only

COMPONENTS = {
    CHANNEL: 'Read by each channel:',
    TRANSPORT: 'Read by the transport:',
    POOL: "Given to redis-py's connection pool as they are:",
    SENTINEL: 'Sentinel (``sentinel-streams://``, see `Connecting`_):',
    CLUSTER: 'Redis Cluster (see `Redis Cluster`_):',
}


class Option(NamedTuple):
    name: str
    #: the type as ``Channel`` annotates it (a test compares the two for channel options)
    type: str
    default: Any
    rule: Rule
    component: str
    #: one to three sentences, RST
    help: str
    #: the same name and meaning as in Kombu's Redis transport
    kombu: bool = False


#: The one table of transport options: a row per option, in the order the docs list them.
OPTIONS: tuple[Option, ...] = (
    # -- channel ---------------------------------------------------------------------------
    Option('sep', 'str', SEP,
           Rule(lambda v: isinstance(v, str) and v != '', 'a non-empty string'), CHANNEL,
           'Separator between the routing key, pattern and queue of a binding in the routing '
           'table.', kombu=True),
    Option('priority_steps', 'list[int]', [0, 3, 6, 9], PRIORITY_STEPS, CHANNEL,
           'The priority levels, one stream each: a step is the lowest priority of its level, '
           'and level 0 is served first. The operator commands need the same '
           '``--priority-steps``.', kombu=True),
    Option('queue_order_strategy', 'str', 'round_robin', CYCLE, CHANNEL,
           'The order in which a consumer of several queues reads them.', kombu=True),
    Option('visibility_timeout', 'float', 3600, POSITIVE, CHANNEL,
           'The lease: how long after a crash a message comes back. A live '
           'process renews what it holds every third of it (at most every 30 s), so a task may '
           'run longer.', kombu=True),
    Option('global_keyprefix', 'str', '', _or_none(TEXT), CHANNEL,
           'Put in front of every key, including every key a script touches; None: no '
           'prefix.', kombu=True),
    Option('body_encoding', 'str | None', 'base64', BODY_ENCODING, CHANNEL,
           'How a message body is encoded in the stored envelope; None: stored as it is.',
           kombu=True),
    Option('deadletter_queue', 'str | None', None, _or_none(TEXT), CHANNEL,
           'The queue that gets messages no binding routes; None: they are dropped.',
           kombu=True),
    Option('routing_cache_ttl', 'float', 1.0, NON_NEGATIVE, CHANNEL,
           'How long a routing table read from Redis is reused; bindings made through this '
           'process are seen at once. 0 reads the table on every publish.'),
    Option('max_read_batch', 'int', 100, _int_at_least(1), CHANNEL,
           'The most messages one read script call may deliver, whatever the prefetch limit '
           'allows.'),
    Option('max_read_bytes', 'int', READ_BYTES, _int_at_least(1), CHANNEL,
           'The bytes one read script call may copy (about 10 ms of Redis time at the '
           'default 2 MiB), so a backlog of big messages never blocks Redis for long; a '
           'message bigger than this is still delivered, alone.'),
    Option('purge_batch', 'int', 1000, _int_at_least(1), CHANNEL,
           'Entries one purge script call deletes per stream; a purge calls again until the '
           'queue is empty.'),
    Option('reclaim_batch', 'int', 100, _int_at_least(1), CHANNEL,
           'PEL entries one reclaim call moves or looks at, over all streams of a queue; the '
           'lease keeper calls again while more are due.'),
    Option('max_deliveries', 'int', 20, _int_at_least(0), CHANNEL,
           "A message delivered this many times (rejects with requeue and crashes alike) goes "
           "to its queue's dead-letter stream instead of being delivered again. 0: no limit."),
    Option('dead_letter_rejected', 'bool', False, BOOL, CHANNEL,
           "``reject(requeue=False)`` moves the message to the dead-letter stream instead of "
           "dropping it (Kombu's Redis transport drops it)."),
    Option('publish_min_replicas', 'int', 0, _int_at_least(0), CHANNEL,
           'A publish returns only once this many replicas have the message (``WAIT`` in the '
           'same round trip), else raises ``NotReplicated``, a connection error, so a retrying '
           'publish sends it again (see `Connecting`_). 0: no waiting; not on Redis Cluster.'),
    Option('publish_replica_timeout', 'float', 1.0, POSITIVE, CHANNEL,
           'How long a publish waits for those replicas (rounded up to whole ms); it must be '
           'shorter than ``socket_timeout``.'),
    Option('max_message_size', 'int | None', None, _or_none(_int_at_least(1)), CHANNEL,
           'The largest message (encoded envelope, bytes) a publish sends; a larger one '
           'raises ``MessageTooLarge`` before anything is sent. None: what the server takes in '
           "one command (``proto-max-bulk-len``, read at connect; 512 MiB where ``CONFIG GET`` "
           "is refused)."),
    Option('big_message_bytes', 'int', BIG_BYTES, _int_at_least(0), CHANNEL,
           "A message (encoded envelope) of at least this many bytes is stored apart, in its "
           "queue's hash of big messages, and its stream entry holds a reference: no script "
           "copies its body, so it never blocks Redis for longer than one HSET or HGET of it "
           "(see `Reliability`_). 0: never; fanout messages always go inline."),
    Option('delayed_delivery', 'bool', True, BOOL, CHANNEL,
           "A message with a due time waits in Redis until it is due (see `Delayed "
           "delivery`_). False: published at once, as Kombu's Redis transport does."),
    Option('delayed_threshold', 'float', 1.0, NON_NEGATIVE, CHANNEL,
           'A message due sooner than this is published at once.'),
    Option('queue_arguments', 'dict[str, dict[str, Any]]', {}, QUEUE_ARGUMENTS, CHANNEL,
           "Queue name -> queue arguments (``x-max-length``, ``x-max-length-bytes``, "
           "``x-message-ttl``, "
           "``x-rate-limit``, ``x-fairness``, ``x-group-max-in-flight`` ... each checked as "
           "at a declare) for queues "
           "declared without them, such as Celery's default ``celery`` queue: recorded in "
           "Redis at the queue's declare, binding every publisher (see `Flow control`_)."),
    # -- transport -------------------------------------------------------------------------
    Option('polling_interval', 'float | None', 1.0, _or_none(POSITIVE), TRANSPORT,
           'The longest single blocking wait (a safety net: a publish wakes a '
           'waiting consumer at once); None: the default. Kept below the socket timeout in '
           "force, redis-py's own (5 s in redis-py 6 and newer) included.", kombu=True),
    Option('credential_provider', 'redis.CredentialProvider | str | None', None,
           CREDENTIAL_PROVIDER, TRANSPORT,
           "For rotating passwords or tokens; it replaces the URL's user and password.",
           kombu=True),
    # -- redis-py's connection pool ---------------------------------------------------------
    Option('socket_timeout', 'float | None', None, _or_none(POSITIVE), POOL,
           "How long a command may wait for its reply; None: redis-py's default (none in "
           "redis-py 4 and 5, 5 s in 6 and newer). Without one, an idle consumer's wait "
           "carries no read and a wake-up takes two round trips (see `Connecting`_).",
           kombu=True),
    Option('socket_connect_timeout', 'float | None', None, _or_none(POSITIVE), POOL,
           "How long a connection attempt may take; None: redis-py's default.", kombu=True),
    Option('socket_keepalive', 'bool | None', None, _or_none(BOOL), POOL,
           'TCP keepalive on the connections to Redis (see `Reliability`_).', kombu=True),
    Option('socket_keepalive_options', 'dict[int, int] | None', None, _or_none(KEEPALIVE),
           POOL, 'The keepalive settings, e.g. ``{socket.TCP_KEEPIDLE: 60}``.', kombu=True),
    Option('retry_on_timeout', 'bool | None', None, _or_none(BOOL), POOL,
           'redis-py sends a command again after a timeout.', kombu=True),
    Option('max_connections', 'int | None', 10, _or_none(_int_at_least(2)), POOL,
           'Connections the pool may open; a waiting consumer holds one of its own.',
           kombu=True),
    Option('health_check_interval', 'float | None', 25, _or_none(NON_NEGATIVE), POOL,
           'How long a connection may sit idle before redis-py checks it with ``PING`` '
           'before use; 0: never checked.', kombu=True),
    Option('client_name', 'str | None', None, _or_none(CLIENT_NAME), POOL,
           'The name of each connection (``CLIENT SETNAME``), shown in ``CLIENT LIST``.',
           kombu=True),
    # -- Sentinel --------------------------------------------------------------------------
    Option('master_name', 'str | None', None, _or_none(TEXT), SENTINEL,
           'The name Sentinel monitors the primary under; required with '
           '``sentinel-streams://``.', kombu=True),
    Option('sentinel_kwargs', 'dict | None', None, _or_none(MAPPING), SENTINEL,
           'Connection arguments for the sentinels themselves (e.g. their password); None: '
           'the socket options only.', kombu=True),
    Option('min_other_sentinels', 'int | None', 0, _or_none(_int_at_least(0)), SENTINEL,
           'A sentinel is believed only when it sees at least this many other sentinels.',
           kombu=True),
    # -- Redis Cluster ---------------------------------------------------------------------
    Option('cluster', 'bool', False, BOOL, CLUSTER,
           'Redis Cluster with a ``redis-streams://`` URL, as ``redis-streams-cluster://``.'),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
#: option -> default (the CLI's defaults, and what None stands for where None is allowed)
DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}
#: Options passed through to redis-py's connection pool, as Kombu's Redis transport does.
POOL_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.component == POOL)

#: Kombu Redis transport options that have no meaning here, and why: warned about (each
#: time a transport is made) and ignored.
REMOVED_OPTIONS = {
    'ack_emulation': 'unacked messages always stay in the stream PEL',
    'unacked_key': 'there is no unacked hash: the PEL is the record',
    'unacked_index_key': 'there is no unacked index: the PEL keeps delivery times',
    'unacked_mutex_key': 'reclaim needs no mutex',
    'unacked_mutex_expire': 'reclaim needs no mutex',
    'unacked_restore_limit': 'reclaim works in bounded batches by itself',
    'unacked_restore_throttle': 'reclaim works in bounded batches by itself',
    'unacked_restore_interval': 'the lease keeper reclaims as visibility_timeout says',
    'fanout_prefix': 'fanout does not use PUB/SUB here',
    'fanout_patterns': 'fanout does not use PUB/SUB here',
    'sentinel_fanout_compat': 'fanout does not use PUB/SUB here',
    'reauth_check_interval': 'each connection goes back to the pool after one wait, where '
                             'redis-py re-authenticates it',
}

#: Names Kombu and Celery themselves put in the options of every transport, taken without a
#: warning (and without effect here): Producer.publish(retry=True) copies its retry policy
#: (Celery's task_publish_retry_policy), whose keys are Connection.ensure()'s arguments, into
#: the connection's transport_options, and a clone carries them to a new transport;
#: Connection reads its failover settings from there; py-amqp's confirm_publish is often
#: left in a broker_transport_options shared with RabbitMQ.
PASSED_BY_KOMBU = frozenset({
    'max_retries', 'interval_start', 'interval_step', 'interval_max', 'errback',
    'on_revive', 'retry_errors', 'connect_retries_timeout', 'confirm_publish',
})

#: Unknown names already warned about in this process.
_warned: set[str] = set()


def channel_names(inherited: Sequence[str] = ()) -> tuple[str, ...]:
    """``Channel.from_transport_options``: ``inherited`` (Kombu's virtual channel's own,
    kept whatever a Kombu release adds) and every channel option of the table."""
    names = list(inherited) + [o.name for o in OPTIONS if o.component == CHANNEL]
    return tuple(dict.fromkeys(names))


def set_defaults(cls: type) -> None:
    """Give ``cls`` (the Channel) each channel option's default as a class attribute: the
    value an instance has unless Kombu's ``from_transport_options`` sets one of its own."""
    for option in OPTIONS:
        if option.component == CHANNEL:
            setattr(cls, option.name, copy(option.default))


def check(values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for the first option in ``values`` that breaks its rule."""
    for name, value in values.items():
        option = BY_NAME.get(name)
        if option is not None and not option.rule.ok(value):
            raise ValueError(f'kombu-streams: transport option {name!r} must be '
                             f'{option.rule.allowed}; got {value!r}')


def warn_unknown(values: Mapping[str, Any]) -> None:
    """Warn (``UserWarning``) about options this transport does not take: a removed Kombu
    Redis option each time, with why; any other unknown name once per process, with the
    known ones. Celery passes only what the user set, so an unknown name is a typo whose
    setting silently does nothing.

    ``warnings.warn``, not logging, as for the removed options: Celery's worker routes
    warnings into its log (``logging.captureWarnings``), and an app's test suite with
    ``-W error`` fails on the typo. The once-per-name set, not the warnings registry, keeps
    the line from repeating for every connection Celery opens (filters such as ``always``,
    and ``catch_warnings``, reset or bypass the registry)."""
    for name in values:
        why = REMOVED_OPTIONS.get(name)
        if why is not None:
            warnings.warn(f'kombu-streams ignores transport option {name!r}: {why}',
                          UserWarning, stacklevel=3)
        elif name not in BY_NAME and name not in PASSED_BY_KOMBU and name not in _warned:
            _warned.add(name)
            warnings.warn(f'kombu-streams: unknown transport option {name!r} ignored (a '
                          f'typo?); known: {", ".join(sorted(BY_NAME))}',
                          UserWarning, stacklevel=3)


# -- the documentation's list --------------------------------------------------------------


def _wrap(text: str, indent: str) -> list[str]:
    """Wrap RST text at 96 columns without breaking an inline literal."""
    protected = re.sub(r'``.+?``', lambda m: m.group(0).replace(' ', '\0'), text)
    return [line.replace('\0', ' ') for line in textwrap.wrap(
        protected, 96, initial_indent=indent, subsequent_indent=indent,
        break_on_hyphens=False, break_long_words=False)]


def rst() -> str:
    """The option list as reStructuredText, from the table: the docs' reference page renders
    it at build time (docs/_ext/ksdocs.py), so no default or rule is written twice. Section
    links in the help (```Connecting`_``) are left for the docs to resolve."""
    out = ["*(Kombu)*: the same name and meaning as in Kombu's Redis transport.", '']
    for component, title in COMPONENTS.items():
        out += [title, '']
        for o in OPTIONS:
            if o.component != component:
                continue
            out.append(f'``{o.name}`` = ``{o.default!r}``' + (' *(Kombu)*' if o.kombu else ''))
            allowed = o.rule.allowed[0].upper() + o.rule.allowed[1:]
            out += _wrap(f'{allowed}. {o.help}', '    ')
        out.append('')
    out += ['Ignored with a warning, because the design has no use for them:', '']
    for name, why in REMOVED_OPTIONS.items():
        lines = _wrap(f'``{name}``: {why}', '  ')
        out += ['* ' + lines[0][2:], *lines[1:]]
    out += ['']
    out += _wrap('Taken without a warning: '
                 + ', '.join(f'``{n}``' for n in sorted(PASSED_BY_KOMBU - {'confirm_publish'}))
                 + " (Kombu's own retry and failover settings, which Kombu and Celery put in "
                 "every transport's options) and py-amqp's ``confirm_publish`` (no effect "
                 "here).", '')
    return '\n'.join(out) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m kombu_streams.options',
                                     description='The transport options, from the table.')
    parser.add_argument('--rst', action='store_true',
                        help='print the option list of the docs (reStructuredText)')
    args = parser.parse_args(argv)
    if args.rst:
        sys.stdout.write(rst())
    else:
        parser.print_help()
    return 0


if __name__ == '__main__':
    sys.exit(main())
