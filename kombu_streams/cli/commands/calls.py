"""``scripts --call NAME QUEUE``: script NAME's call for one queue, laid out by the Broker
builder the transport uses and with the values it passes (its defaults), so that the line
printed is the call the transport sends. Where a queue does not determine a value (an entry
id, a message), a placeholder ``<...>`` stands for it; the note printed with the line says
what was filled in."""

from __future__ import annotations

from collections.abc import Callable

from ...broker import PAGE, Broker, Delay
from ...leases import consumer_expiry_ms
from ...options import DEFAULTS, ms
from ...scripts import SCRIPTS, Call
from ..errors import USAGE, Failure

#: Placeholders, for what a queue alone does not determine.
ENTRY_ID = '<ENTRY-ID>'
PAYLOAD = '<PAYLOAD: a Kombu message envelope (JSON)>'
TASK_ID = '<TASK-ID>'
REASON = '<REASON>'
LAST_ID = '<LAST-ID>'
#: The consumer a ``read`` line reads as, and the ack, requeue and deadletter lines settle
#: as (only what it owns, as a channel does).
CALL_CONSUMER = 'kombu-streams-cli'
#: The lease of the transport's default ``visibility_timeout``, in ms.
LEASE_MS = ms(DEFAULTS['visibility_timeout'])
#: The transport's defaults the calls use (the option table's).
LIMIT, BUDGET, STEP = (DEFAULTS['max_deliveries'], DEFAULTS['reclaim_batch'],
                       DEFAULTS['purge_batch'])
#: Why ``scripts --call`` cannot lay out these scripts for a queue.
NOT_QUEUE_CALLS = {
    **dict.fromkeys(('bind', 'route', 'fanout_publish', 'fanout_ack', 'inspect_fanout'),
                    "its keys are an exchange's"),
    **dict.fromkeys(('migrate', 'migrate_unacked'),
                    "its keys include Kombu's (kombu-streams migrate runs it)"),
}
#: The calls that take the queue's x-expires (``--expires``).
EXPIRING = ('read', 'touch')

Built = tuple[Call, str]


def _read(b: Broker, queue: str, expires: int) -> Built:
    ttl = f'ttl {expires} ms (its x-expires)' if expires else 'no x-expires (ttl 0)'
    call = b.read_call(b.sources([queue]), CALL_CONSUMER, 1, LIMIT,
                       {queue: expires} if expires else {})[0]
    return call, (f'consumer {CALL_CONSUMER}, COUNT 1, delivery limit '
                  f'{LIMIT}, mode r (a consumer\'s read plan may pick p, m '
                  f'or w), {ttl}: what it delivers stays pending with that consumer until '
                  f'acked (or reclaimed after a lease)')


def _touch(b: Broker, queue: str, expires: int) -> Built:
    if not expires:
        raise Failure('scripts --call touch: only a queue declared with x-expires is touched '
                      '(its channel sets the expiry at declare and again each lease round); '
                      "give the queue's x-expires with --expires MS", USAGE)
    return b.touch_call(queue, expires), (
        f"ttl {expires} ms (its x-expires): sent at declare, then every third of it while "
        f'a channel consumes the queue')


def _publish(b: Broker, queue: str, expires: int) -> Built:
    lowest = b.levels[0]
    return (b.publish_call(queue, lowest, PAYLOAD, delay=Delay()),
            f'level {lowest}, due now (delayed delivery on), its first stream only (a '
            f'queue with x-max-length answers NEEDKEYS: see publish.lua); replace {PAYLOAD}')


def _ack(b: Broker, queue: str, expires: int) -> Built:
    stream = b.keys.stream(queue, b.levels[0])
    return (b.ack_calls(queue, [(stream, ENTRY_ID)], None, CALL_CONSUMER)[0],
            f"an entry of level {b.levels[0]} owned by {CALL_CONSUMER} ('' in its place: "
            f'whoever owns it): replace {ENTRY_ID}')


def _requeue(b: Broker, queue: str, expires: int) -> Built:
    stream = b.keys.stream(queue, b.levels[0])
    return (b.requeue_calls(queue, [(stream, ENTRY_ID)], None, CALL_CONSUMER)[0],
            f"an entry of level {b.levels[0]} owned by {CALL_CONSUMER} ('' in its place: "
            f'whoever owns it), delivery count kept as it is (-1; a channel passes the count '
            f'it delivered, one less for a message read ahead): replace {ENTRY_ID}')


def _renew(b: Broker, queue: str, expires: int) -> Built:
    stream = b.keys.stream(queue, b.levels[0])
    return (b.renew_call(queue, CALL_CONSUMER, stream, [ENTRY_ID]),
            f'an entry of level {b.levels[0]} owned by {CALL_CONSUMER}: replace {ENTRY_ID}')


def _deadletter(b: Broker, queue: str, expires: int) -> Built:
    stream = b.keys.stream(queue, b.levels[0])
    return (b.dead_letter_call(queue, stream, ENTRY_ID, REASON, 1, None, CALL_CONSUMER),
            f'an entry of level {b.levels[0]} delivered once, owned by {CALL_CONSUMER} '
            f"('' in its place: whoever owns it): replace {ENTRY_ID} and {REASON}")


def _reclaim(b: Broker, queue: str, expires: int) -> Built:
    expiry = consumer_expiry_ms(LEASE_MS)
    return (b.reclaim_call(queue, LEASE_MS, BUDGET, None, expiry)[0],
            f'lease {LEASE_MS} ms (visibility_timeout), budget {BUDGET}, '
            f'consumers idle {expiry} ms that own nothing removed, sweeps from the start')


def _purge(b: Broker, queue: str, expires: int) -> Built:
    return (b.purge_call(queue, STEP),
            f'one step of at most {STEP} entries per stream: repeat while the '
            f'second value of its reply is 1')


def _delete(b: Broker, queue: str, expires: int) -> Built:
    return b.delete_call(queue), (
        'unlinks the streams (every message: ready, delayed or in flight), wake marker, '
        'ready index, delayed keys and arguments; the dead-letter stream only when it is '
        'empty: dead letters stay, and so does the big messages\' hash with them '
        '(kombu-streams dlq purge first)')


def _cancel(b: Broker, queue: str, expires: int) -> Built:
    return (b.cancel_call(queue, [TASK_ID]),
            f'one scan step from cursor 0: replace {TASK_ID}, repeat with the cursor it '
            f'returns until it is 0')


#: Script name -> the function laying out its call for a queue, and a note on the values.
CALLS: dict[str, Callable[[Broker, str, int], Built]] = {
    'read': _read, 'publish': _publish, 'ack': _ack, 'requeue': _requeue, 'renew': _renew,
    'deadletter': _deadletter, 'reclaim': _reclaim, 'purge': _purge, 'delete': _delete,
    'cancel': _cancel, 'touch': _touch,
    'redrive': lambda b, q, _: (b.redrive_call(q, 1),
                                'the oldest dead letter, without its x-unique-key (kombu-streams '
                                'dlq redrive gives each letter its key)'),
    'dlq_purge': lambda b, q, _: (b.dlq_purge_call(q, LAST_ID, PAGE),
                                  f'dead letters up to id {LAST_ID} (inclusive), at most '
                                  f'{PAGE}: replace {LAST_ID}, repeat while the second value '
                                  f'of its reply is 1'),
    'scheduled': lambda b, q, _: (b.scheduled_call(q)[0], 'the 10 earliest, no bodies'),
    'peek': lambda b, q, _: (b.peek_call(q)[0], 'the next 10, from the start'),
    'inspect': lambda b, q, _: (b.inspect_call(q)[0], 'read-only'),
    'size': lambda b, q, _: (b.size_call(q), 'read-only'),
    'declare': lambda b, q, _: (b.declare_call(q), 'each level\'s stream with its group at '
                                'id 0; a queue with x-expires is touched next; no arguments '
                                'given: it takes those recorded (x-max-length ... as pairs '
                                'after the group record or check them)'),
    'limits': lambda b, q, _: (b.limits_call(q), 'read-only: the recorded arguments ("set" '
                               'followed by pairs replaces them, "set" alone clears them)'),
    'leave': lambda b, q, _: (b.leave_call(q, CALL_CONSUMER),
                              f'{CALL_CONSUMER} leaves the queue\'s group where it owns '
                              f'nothing (a channel does so at close)'),
    'wake': lambda b, q, _: (b.give_back_call([(q, None)]),
                             'sets its wake marker again if the queue exists'),
}


def queue_call(broker: Broker, name: str, queue: str, expires: int | None = None) -> Built:
    """Script ``name``'s call for ``queue`` as the transport makes it, and what was filled
    in; ``expires``: the queue's x-expires (ms). Failure(2) for a script whose call a queue
    does not determine."""
    if name in SCRIPTS and name not in CALLS:
        why = NOT_QUEUE_CALLS.get(name, "its keys are not a queue's")
        raise Failure(f'scripts --call: {name} is not a call of a queue ({why}); see its KEYS '
                      f'and ARGV in kombu-streams scripts', USAGE)
    if name not in CALLS:
        raise Failure(f'scripts --call: no script {name!r}; one of '
                      f"{', '.join(sorted(CALLS))}", USAGE)
    if expires and name not in EXPIRING:
        raise Failure(f"scripts --call: --expires is for {' and '.join(EXPIRING)} only; "
                      f"{name}'s call does not depend on it", USAGE)
    return CALLS[name](broker, queue, expires or 0)


__all__ = ('CALLS', 'queue_call', 'CALL_CONSUMER', 'ENTRY_ID', 'PAYLOAD', 'TASK_ID', 'REASON',
           'LAST_ID')
