"""Unique keys (x-unique-key) where a message moves or goes by a path that does not release
its key: a delayed message a read moves to its stream keeps the key (read.lua re-points the
key store to its new entry), a retry waiting out its backoff keeps it (same entry), and the
fields of messages gone by expiry or cancel are swept a few per keyed publish, so the store
stays bounded. Scripts on fakeredis, Redis 6.2 and 7.0 (``script_client``); docs/design.rst,
"Unique keys". No test sleeps: a delayed message is made due by moving its score into the
past, a TTL deadline is passed by waiting for the server's clock (tests/test_ttl.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import read_messages

from kombu_streams.broker import Delay
from tests.test_backoff import make_due, owner
from tests.test_ttl import pass_deadlines
from tests.test_unique import DUPLICATE, HOUR, LATER, K, body, keys_of, publish, queue, stored


def taken(reply: Any) -> bool:
    return reply == DUPLICATE


@pytest.mark.parametrize('ttl', [0, HOUR])
def test_a_delayed_message_made_due_keeps_its_key(script_client, ttl):
    """Ready (moved, not delivered yet), in flight, then acked: refused, refused, stored."""
    c = script_client
    b = queue(c, **({'x_unique_ttl': ttl} if ttl else {}))
    assert b.publish('q', 0, body('first')) not in (None, DUPLICATE)  # served before it
    assert publish(b, 1, 'k', level=3, delay=LATER).startswith(b'delayed:')
    make_due(c)
    assert len(read_messages(b, ['q'], 'c1', 1)) == 1  # moves the due one, delivers 'first'
    assert c.zcard(K.delayed('q')) == 0 and stored(c) == ['mfirst', 'm1']
    [(entry_id, _)] = c.xrange(K.stream('q', 3))
    # the store names the new entry at its level, with its ttl; the reverse field is gone
    assert keys_of(c) == {b'k:k': f's:{ttl}:3:'.encode() + entry_id}
    assert taken(publish(b, 2, 'k'))  # ready
    (d1,) = read_messages(b, ['q'], 'c1', 1)
    assert d1.entry_id == entry_id
    assert taken(publish(b, 3, 'k'))  # in flight
    b.ack('q', [(d1.stream, d1.entry_id)], consumer='c1', unique=['k'])
    if ttl:  # throttled after the ack, as a message published ready would be
        assert c.hget(K.unique('q'), 'k:k').startswith(b't:')
        assert taken(publish(b, 4, 'k'))
        c.hset(K.unique('q'), 'k:k', 't:1')
    assert not taken(publish(b, 5, 'k'))
    assert stored(c) == ['mfirst', 'm5'] and b.unique_refused('q') == (3 if ttl else 2)


def test_a_due_message_replaced_while_ready_and_a_keyless_one_moves_alone(script_client):
    """With replace, a moved message is a ready one: replaced. A delayed message without a
    key moves without touching the store."""
    c = script_client
    b = queue(c, x_unique_mode='replace')
    publish(b, 1, 'k', level=3, delay=LATER)
    b.publish('q', 6, body('plain'), delay=LATER)
    b.publish('q', 0, body('first'))
    make_due(c)
    read_messages(b, ['q'], 'c1', 1)  # moves both due ones, delivers 'first'
    before = keys_of(c)
    assert len(before) == 1 and before[b'k:k'].startswith(b's:0:3:')
    assert not taken(publish(b, 2, 'k', level=9))  # replaces the moved one, still ready
    assert stored(c) == ['mfirst', 'mplain', 'm2']


def test_a_store_of_another_type_stops_the_move_not_the_read(script_client):
    """Types first: a key of another type at the store's name is a problem of that source
    (reported); its delayed messages stay where they are, nothing is lost."""
    c = script_client
    b = queue(c)
    b.publish('q', 0, body('later'), delay=LATER)
    c.delete(K.unique('q'))
    c.rpush(K.unique('q'), 'not ours')
    make_due(c)
    call, parse = b.read_call(b.sources(['q']), 'c1', 1)
    result = parse(b.run(call))
    assert [why for _, why in result.problems] == [
        f'WRONGTYPE {K.unique("q")} holds a list, not a hash (key {K.unique("q")})']
    assert c.zcard(K.delayed('q')) == 1 and c.lrange(K.unique('q'), 0, -1) == [b'not ours']
    c.delete(K.unique('q'))
    (d,) = read_messages(b, ['q'], 'c1', 1)  # the store fixed: moved and delivered
    assert d.payload == body('later').encode()


@pytest.mark.parametrize('how', ['requeue', 'reclaim'])
def test_a_retry_waiting_out_its_backoff_keeps_its_key(script_client, how):
    """x-requeue-delay parks the entry with ~backoff and points to it from the delayed set,
    without a value and without a new id: the key stays held by the same entry throughout."""
    c = script_client
    b = queue(c, x_requeue_delay='600000,600000')
    publish(b, 1, 'k')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    if how == 'requeue':
        b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
    else:  # the consumer was killed: its lease runs out
        b.reclaim('q', 0, 100)
    assert owner(c, d.stream, d.entry_id) == b'~backoff'
    assert taken(publish(b, 2, 'k'))  # waiting out its backoff
    make_due(c)
    (again,) = read_messages(b, ['q'], 'c2', 1)
    assert again.entry_id == d.entry_id
    assert taken(publish(b, 3, 'k'))  # in flight again
    b.ack('q', [(again.stream, again.entry_id)], consumer='c2', unique=['k'])
    assert not taken(publish(b, 4, 'k'))
    assert stored(c) == ['m4']


#: Keys published per round of the sweep test, and rounds: without the sweep the store would
#: end with ROUNDS x ROUND fields.
ROUND, ROUNDS = 40, 8


def test_fields_of_expired_messages_are_swept_and_the_store_stays_bounded(script_client):
    """Distinct keys whose messages all expire (set aside by a read): the store holds this
    round's fields and at most a round more, whatever the rounds (bound: 2 x ROUND + 3: the
    live round; the rounds before, left until a look finds the store over 32 fields beyond
    two per message of the queue, then swept by a cycle; the sweep's c, a and t)."""
    c = script_client
    b = queue(c)
    n = 0
    for _ in range(ROUNDS):
        for _ in range(ROUND):
            n += 1
            assert not taken(publish(b, n, f'key{n}', expiration=0))
        assert c.hlen(K.unique('q')) <= 2 * ROUND + 3
        pass_deadlines(c, 'q')
        assert read_messages(b, ['q'], 'c1', 1) == []  # all set aside: past their TTL
    assert c.xlen(K.dlq('q')) == ROUND * ROUNDS
    # then keys that live: the last round's expired ones go as they are published
    for j in range(ROUND):
        assert not taken(publish(b, j, f'live{j}'))
    fields = {f.decode() for f in c.hkeys(K.unique('q'))}
    assert {f'k:live{j}' for j in range(ROUND)} <= fields
    assert len(fields) <= 2 * ROUND + 3


def test_fields_of_cancelled_delayed_messages_are_swept(script_client):
    """cancel.lua removes a delayed message without the store in its KEYS: its key counts as
    free at once (the store names a member that is gone), and its two fields are swept."""
    c = script_client
    b = queue(c)
    for n in range(ROUND):
        assert publish(b, n, f'key{n}', delay=Delay('+600000', 1000, f'task{n}')).startswith(
            b'delayed:')
        b.run(b.cancel_call('q', [f'task{n}']))
        assert not taken(publish(b, n, f'key{n}', delay=LATER))  # free at once
        b.run(b.cancel_call('q', ['later']))
    assert c.zcard(K.delayed('q')) == 0
    # 32 over the room (none: nothing delayed), what 8 delayed publishes add between two
    # looks, the sweep's c, a and t
    assert c.hlen(K.unique('q')) <= 32 + 2 * 8 + 3


@pytest.mark.parametrize('consumer', [False, True])
def test_fields_of_messages_drop_head_set_aside_are_swept_unread(script_client, consumer):
    """drop-head sets aside the oldest ready message of a full queue, never delivered: the
    sweep tells its entry is gone without reading it (before the first ready entry left),
    with no consumer at all, or with one holding a message unacked in front of them, so the
    store stays bounded however long the queue keeps overflowing."""
    c = script_client
    b = queue(c, x_max_length=2, x_overflow='drop-head')
    if consumer:
        publish(b, 0, 'held')
        assert len(read_messages(b, ['q'], 'c1', 1)) == 1  # in flight, never acked
    for n in range(1, 401):
        assert not taken(publish(b, n, f'key{n}'))
    assert c.xlen(K.dlq('q')) >= 398
    # 32 over the room (2 per message held, at most 3), what 8 publishes add between two
    # looks, the sweep's c, a and t
    assert c.hlen(K.unique('q')) <= 32 + 2 * 3 + 8 + 3
