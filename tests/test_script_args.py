"""Every script checks the number of its KEYS and ARGV before anything else: a call with too
few of either gets an error reply that starts with the script's name, not a Lua error at a
line of the flattened text (docs/design.rst, "Every script"). Run on fakeredis: the checks
are plain Lua, the same on every server.
"""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from kombu_streams.broker import HOLDER
from kombu_streams.keys import Keys
from kombu_streams.scripts import SCRIPTS

K = Keys()
Q, X = 'q', 'x'
S0 = K.stream(Q, 0)
FAN, FWAKE = K.fanout(X), K.fanout_wake(X, Q)
QUEUE_KEYS = [K.wake(Q), K.ready(Q), K.delayed(Q), K.delayed_messages(Q), K.big(Q)]
PUBLISH_KEYS = [S0, K.wake(Q), K.ready(Q), K.args(Q), K.dlq(Q), K.delayed(Q),
                K.delayed_messages(Q), S0, K.dedup(Q)]
#: A limited queue's, a keyed or a big message's publish: every stream, and the counters
#: (then the key store and the staging hash, as ARGV says, and last the big hash).
PUBLISH_WIDE = [*PUBLISH_KEYS, K.counters(Q)]

#: The smallest valid call of each script, laid out as kombu_streams/broker.py does (one
#: priority level, one entry; the fanout form where a queue's call has one key more): a
#: call with any of its KEYS or ARGV cut off the end fits no layout of the script.
MINIMAL = {
    'ack': ([S0], [Q, 'c1', 1, '1-1']),
    'bind': ([K.bindings(X), K.deadlines(X)], ['rk', 0]),
    'cancel': ([K.delayed(Q), K.delayed_messages(Q), K.big(Q)], ['0', 10]),
    'deadletter': ([S0, K.dlq(Q)], [Q, 'c1', '1-1', 'why', 1, '0']),
    'declare': ([S0, K.args(Q)], [Q]),
    'delete': ([S0, *QUEUE_KEYS[:4], K.args(Q), K.counters(Q), K.dedup(Q), K.unique(Q),
                K.fair(Q), K.big(Q), K.dlq(Q)], []),
    'dlq_purge': ([K.dlq(Q), K.big(Q)], ['1-0', 10]),
    'fanout_ack': ([FAN], [Q, 'c1', '1-1']),
    'fanout_publish': ([FAN, K.deadlines(X)], ['m']),
    'inspect': ([S0, K.dlq(Q), K.delayed(Q), K.args(Q), K.counters(Q), K.unique(Q),
                 K.rate(Q), K.fair(Q)],
                [Q, HOLDER, 0]),
    'inspect_fanout': ([FAN], [10, 0, 100]),
    'layout': (['ks:layout'], [1]),
    'migrate': (['kq', S0, K.wake(Q), K.ready(Q)], [10, 0, 1, 0]),
    'migrate_unacked': (['unacked', 'unacked_index', S0, K.wake(Q), K.ready(Q)],
                        ['t', 'v', 'm']),
    'peek': ([S0, K.fair(Q)], [Q, HOLDER, 1, 1, 'h', '']),
    'limits': ([K.args(Q), S0, K.counters(Q)], ['get']),
    'publish': (PUBLISH_KEYS, ['m', '0', 1, Q, HOLDER, '0', '']),
    'purge': ([S0, K.delayed(Q), K.delayed_messages(Q), K.big(Q), K.unique(Q), K.fair(Q),
               K.counters(Q)],
              [Q, HOLDER, 10]),
    'read': ([S0, K.wake(Q), K.dlq(Q), *QUEUE_KEYS[1:], K.counters(Q), K.args(Q), K.rate(Q),
              K.unique(Q), K.capped(Q), K.fair(Q)],
             ['c1', 10, HOLDER, 0, 1, 1, 4096, Q, 'q', 'r', 0, 0, 0]),
    'reclaim': ([FAN, FWAKE], [Q, HOLDER, 1000, 100, 0, '-']),
    'redrive': ([K.dlq(Q), S0, K.wake(Q), K.ready(Q)], [10]),
    'renew': ([S0], [Q, 'c1', '1-1']),
    'requeue': ([FAN, FWAKE], [Q, 'c1', HOLDER, 1, '1-1', -1]),
    'route': ([K.bindings(X), K.deadlines(X)], [100, '0', 1000]),
    'marked': ([K.wake(Q)], []),
    'leave': ([S0], [Q, 'c1']),
    'scheduled': ([K.delayed(Q), K.delayed_messages(Q)], [10, '0']),
    'size': ([S0], [Q, HOLDER]),
    'touch': ([S0, *QUEUE_KEYS, K.args(Q), K.counters(Q), K.unique(Q), K.fair(Q)], [1000]),
    'wake': ([K.wake(Q), S0, K.wake(Q)], ['q', Q, '']),
}

#: Larger valid layouts: one KEY or one ARGV fewer than these fits none either. (A queue's
#: reclaim or requeue call with one key fewer is a valid call of its fanout form.)
LARGER = {
    'bind': ([K.bindings(X), K.deadlines(X), FAN], ['rk', 0, Q]),
    'route': ([K.bindings(X), K.deadlines(X), FAN], [100, '0', 1000, '\x06']),
    'publish': (PUBLISH_KEYS, ['m', '0', 1, Q, HOLDER, '1', '', '+5000', 1000]),
    'declare': ([S0, K.args(Q)], [Q, 'x-max-length', '5']),
    'ack': ([S0, K.big(Q)], [Q, 'c1', 'b', 1, '1-1']),
    'wake': ([FWAKE, FAN, K.deadlines(X), K.wake(Q), S0, K.wake(Q)],
             ['f', Q, 'm', 'q', Q, '']),
    'read': ([S0, K.wake(Q), K.dlq(Q), *QUEUE_KEYS[1:], K.counters(Q), K.args(Q), K.rate(Q),
              K.unique(Q), K.capped(Q), K.fair(Q)],
             ['c1', 10, HOLDER, 0, 1, 1, 4096, Q, 'q', 'r', 0, 0, 1, 1, '1-1']),
}
#: With a unique key (x-unique-key): its store in KEYS and the key in ARGV, one layout more.
KEYED = {
    'publish': ([*PUBLISH_WIDE, K.unique(Q), K.big(Q)],
                ['m', '0', 1, Q, HOLDER, '0', '', '', '', '', '', 'k']),
    'ack': ([S0, K.unique(Q)], [Q, 'c1', 'u', 1, 'k', 1, '1-1']),
    'deadletter': ([S0, K.dlq(Q), K.unique(Q)], [Q, 'c1', '1-1', 'why', 1, '0', 'k']),
    'redrive': ([K.dlq(Q), S0, K.wake(Q), K.ready(Q), K.unique(Q), K.args(Q), K.delayed(Q),
                 K.fair(Q), K.counters(Q), K.big(Q)], [10, 'k', Q, '1-1', 'k', 'g']),
}

#: With the in-flight flag and marker (x-max-in-flight: a settle that frees a slot wakes a
#: consumer): the layouts the channel sends.
FLAG = [K.capped(Q), K.wake(Q)]
CAPPED = {
    'ack': ([S0, *FLAG], [Q, 'c1', 'c', 1, '1-1']),
    'deadletter': ([S0, K.dlq(Q), K.unique(Q), *FLAG], [Q, 'c1', '1-1', 'why', 1, '0', '',
                                                          'c']),
    'requeue': ([S0, K.wake(Q), K.ready(Q), K.args(Q), K.delayed(Q), K.capped(Q)],
                [Q, 'c1', HOLDER, 1, '1-1', -1]),
    'reclaim': ([S0, K.wake(Q), K.ready(Q), K.args(Q), K.delayed(Q), K.capped(Q)],
                [Q, HOLDER, 1000, 100, 0, '-']),
}


def too_few(keys, args, every_prefix=True):
    """(what, keys, args) with KEYS or ARGV cut short: every shorter prefix, or one fewer."""
    cut = range(len(keys)) if every_prefix else range(max(len(keys) - 1, 0), len(keys))
    out = [(f'{n} of {len(keys)} keys', keys[:n], args) for n in cut]
    cut = range(len(args)) if every_prefix else range(max(len(args) - 1, 0), len(args))
    return out + [(f'{n} of {len(args)} args', keys, args[:n]) for n in cut]


def test_every_script_has_a_minimal_call():
    assert set(MINIMAL) == set(SCRIPTS)


@pytest.mark.parametrize('name', sorted(MINIMAL))
def test_too_few_keys_or_args_give_an_error_naming_the_script(fake_client, name):
    keys, args = MINIMAL[name]
    cases = too_few(keys, args)
    if name in LARGER:
        cases += too_few(*LARGER[name], every_prefix=False)
    if name in KEYED:
        cases += too_few(*KEYED[name], every_prefix=False)
    if name in CAPPED and name not in ('requeue', 'reclaim'):  # one key fewer: the backoff form
        cases += too_few(*CAPPED[name], every_prefix=False)
    assert cases
    for what, k, a in cases:
        with pytest.raises(ResponseError) as info:
            SCRIPTS[name](fake_client, k, a)
        assert str(info.value).startswith(f'{name}: expected '), (what, str(info.value))
    # the layouts themselves are accepted
    for k, a in [MINIMAL[name], *([LARGER[name]] if name in LARGER else []),
                 *([KEYED[name]] if name in KEYED else []),
                 *([CAPPED[name]] if name in CAPPED else [])]:
        SCRIPTS[name](fake_client, k, a)


def test_a_stream_index_outside_keys_is_named(fake_client):
    """Entries name their stream by index: one past the streams in KEYS is a named error."""
    c = fake_client
    for index in (2, 0, 'x'):
        with pytest.raises(ResponseError, match=r'^ack: expected a stream index 1\.\.1 at'):
            SCRIPTS['ack'](c, [S0], [Q, 'c1', index, '1-1'])
    with pytest.raises(ResponseError, match=r'^requeue: expected '):
        SCRIPTS['requeue'](c, [S0, K.wake(Q), K.ready(Q)], [Q, 'c1', HOLDER, 3, '1-1', -1])


def test_a_read_whose_streams_fit_no_layout_is_refused(fake_client):
    """read.lua works out which source each stream is of (fanout ones first, then the queue
    sources' by level): a stream count that is not fanout sources + queue sources x levels
    is refused before anything is read."""
    b = 'b'
    source_keys = [*[K.wake(Q), K.dlq(Q), *QUEUE_KEYS[1:], K.counters(Q), K.args(Q),
                     K.rate(Q), K.unique(Q), K.capped(Q), K.fair(Q)],
                   *[K.wake(b), K.dlq(b), K.ready(b), K.delayed(b), K.delayed_messages(b),
                     K.big(b), K.counters(b), K.args(b), K.rate(b), K.unique(b),
                     K.capped(b), K.fair(b)]]
    head = ['c1', 10, HOLDER, 0]
    per_source = [Q, 'q', 'r', 0, 0, b, 'q', 'r', 0, 0]
    streams = [S0, K.stream(b, 0), K.stream(Q, 3)]  # two queue sources, three streams
    with pytest.raises(ResponseError, match=r'^read: expected 3 streams, 2 sources'):
        SCRIPTS['read'](fake_client, [*streams, *source_keys],
                        [*head, 3, 2, 4096, *per_source, 0])
    streams.append(K.stream(b, 3))  # two levels of each: fits
    reply = SCRIPTS['read'](fake_client, [*streams, *source_keys],
                            [*head, 4, 2, 4096, *per_source, 0])
    assert reply[0] in (b'00', '00')  # nothing ready in either queue
