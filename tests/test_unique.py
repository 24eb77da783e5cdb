"""Unique until done (x-unique-key): scripts on fakeredis, Redis 6.2 and 7.0
(``script_client``); a hypothesis model of publishes, reads, settles, reclaims and purges.
docs/design.rst, "Unique keys"; lua/lib/unique.lua. The Kombu and Celery side:
tests/test_unique_kombu.py.

No test sleeps: a lease runs out by reclaiming with a lease of 0 ms, a throttle by writing its
stored end in the past.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from helpers import read_messages
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kombu_streams.broker import Broker, Delay
from kombu_streams.keys import Keys
from kombu_streams.limits import stored_pairs, unique_pairs
from kombu_streams.unique import unique_key
from tests.test_scripts import PROPERTY
from tests.test_ttl import pass_deadlines

K = Keys()
LEVELS = [0, 3, 6, 9]
HOUR = 3_600_000
DUPLICATE = b'duplicate'
LATER = Delay('+600000', 1000, 'later')  # delayed for ten minutes: never due in a test


def queue(c: Any, name: str = 'q', **args: Any) -> Broker:
    b = Broker(c, K, LEVELS)
    b.declare(name, stored_pairs(name, {k.replace('_', '-'): v for k, v in args.items()}))
    return b


def body(n: Any) -> str:
    return json.dumps({'body': f'm{n}'})


def stored(c: Any, name: str = 'q') -> list[str]:
    """The bodies in the queue's streams (level by level), then its delayed messages, then
    those staged in its groups (x-fairness)."""
    out = [json.loads(f[b'm'])['body'] for lv in LEVELS
           for _, f in c.xrange(K.stream(name, lv)) if b'm' in f]
    values = [c.hget(K.delayed_messages(name), member)
              for member in c.zrange(K.delayed(name), 0, -1)]
    values += [v for f, v in sorted(c.hgetall(K.fair(name)).items()) if f.startswith(b'm:')]
    return out + [json.loads(v[v.index(b'{'):])['body'] for v in values if v]


def keyed_body(n: Any, key: str) -> str:
    """A message as Kombu stores it, with ``key`` in its headers (a dead letter's key is read
    from there when it is redriven)."""
    return json.dumps({'body': f'{n}', 'headers': {'x-unique-key': key}})


def held(c: Any, key: str, name: str = 'q') -> bool:
    """Whether the key store still has an entry for ``key``."""
    return c.hexists(K.unique(name), f'k:{key}')


#: The store's own fields beside the keys: the refused count and the sweep's place and count
#: (lua/lib/unique.lua)
OWN = {b'n', b'c', b'a', b't'}


def keys_of(c: Any, name: str = 'q') -> dict[bytes, bytes]:
    """The store's fields that name keys or their messages (k:, d:, g:), not its own."""
    return {f: v for f, v in c.hgetall(K.unique(name)).items() if f not in OWN}


def publish(b: Broker, n: Any, key: str, level: int = 0, **kw: Any) -> Any:
    return b.publish('q', level, body(n), unique_key=key, **kw)


def test_keep_first_refuses_a_second_message_with_the_key(script_client):
    c = script_client
    b = queue(c)
    assert publish(b, 1, 'k') not in (None, DUPLICATE)
    assert publish(b, 2, 'k') == DUPLICATE
    assert publish(b, 3, 'k', level=9) == DUPLICATE  # whatever its level
    assert publish(b, 4, 'other') not in (None, DUPLICATE)
    assert b.publish('q', 0, body(5)) not in (None, DUPLICATE)  # no key: never refused
    assert stored(c) == ['m1', 'm4', 'm5']
    assert b.unique_refused('q') == 2
    # still refused while it is in flight
    (d,) = read_messages(b, ['q'], 'c1', 1)
    assert publish(b, 6, 'k') == DUPLICATE
    b.ack('q', [(d.stream, d.entry_id)], consumer='c1', unique=['k'])
    assert not held(c, 'k')  # released by the ack's own call
    assert publish(b, 7, 'k') not in (None, DUPLICATE)
    assert stored(c) == ['m4', 'm5', 'm7']


def test_a_delayed_message_holds_its_key_and_a_purge_releases_it(script_client):
    c = script_client
    b = queue(c)
    assert publish(b, 1, 'k', delay=LATER).startswith(b'delayed:')
    assert publish(b, 2, 'k') == DUPLICATE
    assert publish(b, 3, 'k', delay=LATER) == DUPLICATE
    assert stored(c) == ['m1']
    b.purge('q')
    assert not held(c, 'k') and keys_of(c) == {}
    assert publish(b, 4, 'k') not in (None, DUPLICATE)
    assert stored(c) == ['m4']


def test_replace_replaces_a_ready_message(script_client):
    c = script_client
    b = queue(c, x_unique_mode='replace')
    publish(b, 1, 'k')
    publish(b, 2, 'other')
    assert publish(b, 3, 'k', level=3) not in (None, DUPLICATE)
    assert stored(c) == ['m2', 'm3']
    assert b.size('q') == 2
    (d1, d2) = read_messages(b, ['q'], 'c1', 2)
    assert json.loads(d2.payload)['body'] == 'm3'
    # in flight: never replaced, refused as with keep-first
    assert publish(b, 4, 'k') == DUPLICATE
    assert stored(c) == ['m2', 'm3'] and b.unique_refused('q') == 1
    b.ack('q', [(d2.stream, d2.entry_id)], consumer='c1', unique=['k'])
    assert publish(b, 5, 'k') not in (None, DUPLICATE)


def test_replace_replaces_a_delayed_message(script_client):
    c = script_client
    b = queue(c, x_unique_mode='replace')
    publish(b, 1, 'k', delay=LATER)
    assert publish(b, 2, 'k', delay=Delay('+900000', 1000, 'later')).startswith(b'delayed:')
    assert stored(c) == ['m2']
    assert c.zcard(K.delayed('q')) == 1 and c.hlen(K.delayed_messages('q')) == 1
    # the key store names the new one, and only it (reverse field included)
    assert sorted(keys_of(c)) == sorted([b'k:k', b'd:' + c.zrange(K.delayed('q'), 0, 0)[0]])
    assert publish(b, 3, 'k') not in (None, DUPLICATE)  # due now: ready, the delayed one goes
    assert stored(c) == ['m3'] and c.zcard(K.delayed('q')) == 0
    assert list(keys_of(c)) == [b'k:k']


def test_a_requeued_message_is_not_replaced(script_client):
    c = script_client
    b = queue(c, x_unique_mode='replace')
    publish(b, 1, 'k')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    b.requeue('q', [(d.stream, d.entry_id)])
    assert publish(b, 2, 'k') == DUPLICATE  # parked with the holder: treated as in flight
    assert stored(c) == ['m1']


def ride(b: Broker, consumer: str, d: Any, key: str, trusted: bool = False) -> list[Any]:
    """Ack ``d`` inside a read of ``consumer``, as a channel's next read carries its acks."""
    return read_messages(b, ['q'], consumer, 1, acks=[(d.stream, d.entry_id, trusted, key)])


def ack_as(b: Broker, how: str, consumer: str, d: Any, key: str) -> None:
    """Ack ``d`` for ``consumer`` releasing ``key``: in an ack call of its own ('ack') or
    riding in the consumer's next read, which must deliver nothing more ('ride')."""
    if how == 'ack':
        b.ack('q', [(d.stream, d.entry_id)], consumer=consumer, unique=[key])
    else:
        assert ride(b, consumer, d, key) == []


@pytest.mark.parametrize('how', ['ack', 'ride'])
def test_ttl_keeps_the_key_after_the_ack_then_frees_it(script_client, how):
    c = script_client
    b = queue(c, x_unique_ttl=HOUR)
    publish(b, 1, 'k')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    ack_as(b, how, 'c1', d, 'k')
    assert c.hget(K.unique('q'), 'k:k').startswith(b't:')
    assert publish(b, 2, 'k') == DUPLICATE  # throttled
    c.hset(K.unique('q'), 'k:k', 't:1')  # the throttle ran out
    assert publish(b, 3, 'k') not in (None, DUPLICATE)
    assert stored(c) == ['m3']


def test_a_dead_letter_releases_the_key_at_once_even_with_a_ttl(script_client):
    c = script_client
    b = queue(c, x_unique_ttl=HOUR)
    publish(b, 1, 'k')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    assert b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, 'c1', 'k') == 1
    assert not held(c, 'k')
    assert publish(b, 2, 'k') not in (None, DUPLICATE)


@pytest.mark.parametrize('how', ['ack', 'ride'])
def test_a_stale_settle_releases_nothing(script_client, how):
    """A consumer whose lease ran out (SIGKILLed, or stopped) and another took the message:
    its late ack (in a call of its own or riding in a read) or reject leaves the key and the
    entry with the message."""
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    (d,) = read_messages(b, ['q'], 'dead', 1)
    b.reclaim('q', 0, 100)  # its lease ran out
    (again,) = read_messages(b, ['q'], 'c2', 1)
    assert again.entry_id == d.entry_id
    ack_as(b, how, 'dead', d, 'k')
    assert b.dead_letter('q', d.stream, d.entry_id, 'late', 1, None, 'dead', 'k') == 0
    assert held(c, 'k') and c.xlen(K.stream('q', 0)) == 1
    assert publish(b, 2, 'k') == DUPLICATE
    ack_as(b, how, 'c2', again, 'k')
    assert not held(c, 'k')


@pytest.mark.parametrize('trusted', [False, True])
def test_an_ack_riding_in_a_read_releases_its_key(script_client, trusted):
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    publish(b, 2, 'j')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    (after,) = ride(b, 'c1', d, 'k', trusted)
    assert json.loads(after.payload)['body'] == 'm2'
    assert not held(c, 'k') and held(c, 'j')
    assert c.xlen(K.stream('q', 0)) == 1  # m1's entry went with its ack
    assert publish(b, 3, 'k') not in (None, DUPLICATE)


def test_keyed_and_plain_acks_ride_in_one_read(script_client):
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    b.publish('q', 3, body(2))
    publish(b, 3, 'j', level=3)
    got = read_messages(b, ['q'], 'c1', 3)
    assert len(got) == 3
    keys = {'m1': 'k', 'm2': '', 'm3': 'j'}
    acks = [(d.stream, d.entry_id, False, keys[json.loads(d.payload)['body']]) for d in got]
    assert read_messages(b, ['q'], 'c1', 1, acks=acks) == []
    assert not held(c, 'k') and not held(c, 'j')
    assert sum(c.xlen(K.stream('q', lv)) for lv in LEVELS) == 0


@pytest.mark.parametrize('ttl', [0, HOUR])
def test_one_ack_call_releases_every_key_it_acks(script_client, ttl):
    c = script_client
    b = queue(c, x_unique_ttl=ttl) if ttl else queue(c)
    for n, key in enumerate(['a', 'b', 'c']):
        publish(b, n, key)
    got = read_messages(b, ['q'], 'c1', 3)
    keys = {f'm{n}': key for n, key in enumerate(['a', 'b', 'c'])}
    assert b.ack('q', [(d.stream, d.entry_id) for d in got], consumer='c1',
                 unique=[keys[json.loads(d.payload)['body']] for d in got]) == 3
    refs = c.hmget(K.unique('q'), ['k:a', 'k:b', 'k:c'])
    assert all(r is not None and r.startswith(b't:') for r in refs) if ttl else refs == [None] * 3


def test_a_keyed_ack_naming_no_riding_ack_is_refused(script_client):
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    (script, keys, args), _ = b.read_call(b.sources(['q']), 'c1', 1,
                                          acks=[(d.stream, d.entry_id, False, 'k')])
    assert args[-3:] == [1, 1, 'k']  # U, then the ack's number and its key
    args[-2] = 2  # only one ack rides
    with pytest.raises(redis.ResponseError, match='ack pair number 1..1'):
        b.run((script, keys, args))
    assert held(c, 'k') and c.xpending(K.stream('q', 0), 'q')['pending'] == 1


def test_an_ack_of_a_fanout_stream_cannot_ride_along(script_client):
    """Acks riding in a read are of a queue's own streams (the channel never sends others):
    a pair naming a fanout stream (index 1 here) is refused before anything is written."""
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    (script, keys, args), _ = b.read_call(b.sources(['q'], {'q': ['bx']}), 'c1', 1)
    assert args[-1] == 0  # no acks: add one pair by hand, on the fanout stream
    args[-1:] = [1, 1, '1-0']
    with pytest.raises(redis.ResponseError, match='ack of fanout stream 1 cannot ride'):
        b.run((script, keys, args))
    assert c.xpending(K.stream('q', 0), 'q')['pending'] == 0  # nothing read either


def test_a_keyed_ack_with_a_broken_key_store_is_its_queues_problem(script_client):
    """Another program's key at the store's name: the acks riding along are made all the
    same (keyed or not: nothing is delivered twice for it), the keys are not released, and
    the read says why, naming the store, and goes on."""
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    b.publish('q', 0, body(2))
    b.publish('q', 0, body(3))
    got = read_messages(b, ['q'], 'c1', 2)
    c.delete(K.unique('q'))
    c.set(K.unique('q'), 'not a hash')
    call, parse = b.read_call(b.sources(['q']), 'c1', 1,
                              acks=[(got[0].stream, got[0].entry_id, False, 'k'),
                                    (got[1].stream, got[1].entry_id, False, '')])
    result = parse(b.run(call))
    assert [text for _, text in result.problems] == [
        f'WRONGTYPE {K.unique("q")} holds a string, not a hash (keys of acked messages not '
        'released)']
    assert [json.loads(x.payload)['body'] for x in result.deliveries] == ['m3']
    assert c.xpending(K.stream('q', 0), 'q')['pending'] == 1  # m1 and m2 acked
    assert c.get(K.unique('q')) == b'not a hash'


@pytest.mark.parametrize('how', ['ack', 'ride', 'reject'])
def test_a_settle_never_releases_the_key_a_delayed_message_holds(script_client, how):
    """A message redriven by hand without its key (redrive.lua without "k") carries the key
    in its headers but does not hold it; once a delayed message took the key, settling the
    redriven one (ack, an ack riding in a read, a dead letter) leaves the delayed one's key
    alone."""
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    assert b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, 'c1', 'k') == 1
    assert b.run(b.redrive_call('q', 10)) == [1, 0, 0]  # by hand, without its key
    assert publish(b, 2, 'k', delay=LATER).startswith(b'delayed:')  # the key is free: taken
    (again,) = read_messages(b, ['q'], 'c1', 1)  # the redriven one
    if how == 'reject':
        b.dead_letter('q', again.stream, again.entry_id, 'rejected', 1, None, 'c1', 'k')
    else:
        ack_as(b, how, 'c1', again, 'k')
    assert c.hget(K.unique('q'), 'k:k').startswith(b'd:')
    assert publish(b, 3, 'k') == DUPLICATE


def test_a_killed_consumers_message_keeps_its_key_until_reclaimed_and_acked(script_client):
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    read_messages(b, ['q'], 'killed', 1)  # then SIGKILLed: it never settles
    assert publish(b, 2, 'k') == DUPLICATE
    assert b.reclaim('q', 0, 100).moved == 1  # back with the holder, waiting
    assert publish(b, 3, 'k') == DUPLICATE
    (d,) = read_messages(b, ['q'], 'c2', 1)
    assert publish(b, 4, 'k') == DUPLICATE
    b.ack('q', [(d.stream, d.entry_id)], consumer='c2', unique=['k'])
    assert publish(b, 5, 'k') not in (None, DUPLICATE)
    assert stored(c) == ['m5']


def test_an_expired_message_frees_its_key(script_client):
    c = script_client
    b = queue(c)
    publish(b, 1, 'k', expiration=0)
    pass_deadlines(c, 'q')  # TTL 0: its deadline is at most a ms away
    assert read_messages(b, ['q'], 'c1', 1) == []  # set aside: past its TTL
    assert c.xlen(K.dlq('q')) == 1
    assert publish(b, 2, 'k') not in (None, DUPLICATE)


def reject(b: Broker, key: str, consumer: str = 'c1') -> None:
    """Read one message and dead-letter it (a reject), releasing ``key``."""
    (d,) = read_messages(b, ['q'], consumer, 1)
    assert b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, consumer, key) == 1


def test_a_redriven_letter_takes_its_key_back(script_client):
    c = script_client
    b = queue(c)
    b.publish('q', 3, keyed_body(1, 'k'), unique_key='k')
    reject(b, 'k')
    assert not held(c, 'k')
    assert b.redrive('q', 10) == (1, 0, 0)
    assert c.hget(K.unique('q'), 'k:k').startswith(b's:0:3:')  # its new entry, level 3
    assert publish(b, 2, 'k') == DUPLICATE  # one message per key alive, again
    (d,) = read_messages(b, ['q'], 'c1', 1)
    ack_as(b, 'ack', 'c1', d, 'k')
    assert not held(c, 'k') and publish(b, 3, 'k') not in (None, DUPLICATE)


def test_a_letter_whose_key_a_live_message_holds_stays(script_client):
    c = script_client
    b = queue(c)
    b.publish('q', 0, keyed_body(1, 'k'), unique_key='k')
    reject(b, 'k')
    publish(b, 2, 'k')  # the key was free: this one holds it now
    letters = c.xrange(K.dlq('q'))
    assert b.redrive('q', 10) == (0, 0, 1)
    assert c.xrange(K.dlq('q')) == letters and stored(c) == ['m2']
    assert b.redrive_all('q') == (0, 0, 1)
    (d,) = read_messages(b, ['q'], 'c1', 1)
    ack_as(b, 'ride', 'c1', d, 'k')
    assert b.redrive('q', 10, ids=[letters[0][0]]) == (1, 0, 0)  # free again: it goes
    assert stored(c) == ['1'] and held(c, 'k')


def test_two_letters_with_one_key_redrive_one(script_client):
    c = script_client
    b = queue(c)
    for n in (1, 2):
        b.publish('q', 0, keyed_body(n, 'k'), unique_key='k')
        reject(b, 'k')
    b.publish('q', 0, keyed_body(3, 'other'), unique_key='other')
    reject(b, 'other')
    assert b.redrive_all('q') == (2, 0, 1)  # the oldest with k, and the one with other
    assert sorted(stored(c)) == ['1', '3'] and c.xlen(K.dlq('q')) == 1


def test_a_redriven_letter_keeps_the_queues_throttle(script_client):
    c = script_client
    b = queue(c, x_unique_ttl=HOUR)
    b.publish('q', 0, keyed_body(1, 'k'), unique_key='k')
    reject(b, 'k')  # a dead letter frees the key at once, throttle or not
    assert b.redrive('q', 10) == (1, 0, 0)
    (d,) = read_messages(b, ['q'], 'c1', 1)
    ack_as(b, 'ack', 'c1', d, 'k')
    assert c.hget(K.unique('q'), 'k:k').startswith(b't:')  # kept x-unique-ttl after the ack
    assert publish(b, 2, 'k') == DUPLICATE


def test_a_big_letter_takes_its_key_back(script_client):
    c = script_client
    b = queue(c)
    b.publish_big('q', 0, keyed_body(1, 'k'), unique_key='k')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, 'c1', 'k')
    assert b.redrive('q', 10) == (1, 0, 0)
    assert held(c, 'k') and publish(b, 2, 'k') == DUPLICATE


def test_a_letters_key_is_read_as_a_consumer_decodes_it(script_client):
    """A UUID header, as Kombu's JSON writes it (a typed object): the key is its string, as
    the publish and the consumer's ack have it."""
    import uuid

    from kombu.utils.json import dumps, loads

    from kombu_streams.unique import unique_key
    c = script_client
    b = queue(c)
    payload = dumps({'body': '1', 'headers': {'x-unique-key': uuid.UUID(int=7)}})
    key = unique_key(loads(payload))
    assert key == str(uuid.UUID(int=7))
    b.publish('q', 0, payload, unique_key=key)
    reject(b, key)
    assert b.redrive('q', 10) == (1, 0, 0)
    assert held(c, key) and publish(b, 2, key) == DUPLICATE


def test_a_letter_whose_key_is_throttled_stays(script_client):
    c = script_client
    b = queue(c, x_unique_ttl=HOUR)
    b.publish('q', 0, keyed_body(1, 'k'), unique_key='k')
    reject(b, 'k')
    b.publish('q', 0, keyed_body(2, 'k'), unique_key='k')
    (d,) = read_messages(b, ['q'], 'c1', 1)
    ack_as(b, 'ack', 'c1', d, 'k')  # throttled for an hour
    assert b.redrive('q', 10) == (0, 0, 1)


def test_a_letter_without_a_message_or_key_moves_as_before(script_client):
    c = script_client
    b = queue(c)
    b.publish('q', 0, 'not json', unique_key='')
    b.publish('q', 0, body(2), unique_key='k')  # its body names no key: it goes back bare
    for _ in range(2):
        (d,) = read_messages(b, ['q'], 'c1', 1) or [None]
        if d is not None:
            b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, 'c1', '')
    assert c.xlen(K.dlq('q')) == 2
    assert b.redrive('q', 10) == (2, 0, 0)


def test_a_delivery_limit_frees_its_key(script_client):
    c = script_client
    b = queue(c)
    publish(b, 1, 'k')
    read_messages(b, ['q'], 'c1', 1)
    b.reclaim('q', 0, 100)
    assert read_messages(b, ['q'], 'c1', 1, max_deliveries=1) == []  # its second: set aside
    assert c.xlen(K.dlq('q')) == 1
    assert publish(b, 2, 'k') not in (None, DUPLICATE)


def test_purge_frees_ready_keys_and_keeps_those_in_flight(script_client):
    c = script_client
    b = queue(c)
    publish(b, 1, 'a')
    publish(b, 2, 'b')
    read_messages(b, ['q'], 'c1', 1)  # a: in flight
    b.purge('q')
    assert publish(b, 3, 'a') == DUPLICATE
    assert publish(b, 4, 'b') not in (None, DUPLICATE)


def test_delete_removes_the_store(script_client):
    c = script_client
    b = queue(c)
    publish(b, 1, 'a')
    publish(b, 2, 'a')
    assert c.exists(K.unique('q'))
    b.delete('q')
    assert not c.exists(K.unique('q'))
    b.declare('q')
    assert publish(b, 3, 'a') not in (None, DUPLICATE)


def test_a_big_message_holds_its_key_and_a_refused_one_leaves_no_body(script_client):
    c = script_client
    b = queue(c)
    b.publish_big('q', 0, body(1), unique_key='k')
    assert b.publish_big('q', 0, body(2), unique_key='k') == DUPLICATE
    assert c.hlen(K.big('q')) == 1
    (d,) = read_messages(b, ['q'], 'c1', 1)
    b.ack('q', [(d.stream, d.entry_id)], consumer='c1', big=True, unique=['k'])
    assert c.hlen(K.big('q')) == 0 and not held(c, 'k')


def test_an_expiring_queue_gives_its_store_its_expiry(script_client):
    c = script_client
    b = queue(c)
    b.touch('q', HOUR)
    publish(b, 1, 'k')
    assert 0 < c.pttl(K.unique('q')) <= HOUR


def test_touch_keeps_the_store_as_long_as_its_queue(script_client):
    """x-expires: the lease keeper's touch gives the key store the queue's new expiry, so the
    store cannot expire before the messages whose keys it names: a key in flight stays held
    for as long as its queue lives."""
    c = script_client
    b = queue(c)
    b.touch('q', HOUR)
    publish(b, 1, 'k')
    assert len(read_messages(b, ['q'], 'c1', 1)) == 1  # in flight
    b.touch('q', 10 * HOUR)
    assert 9 * HOUR < c.pttl(K.unique('q')) <= 10 * HOUR
    assert abs(c.pttl(K.unique('q')) - c.pttl(K.stream('q', 0))) < 60_000
    assert publish(b, 2, 'k') == DUPLICATE


def test_inspect_counts_the_refused_publishes(script_client):
    """What status and the exporter show: the store's count, 0 while there is no store."""
    c = script_client
    b = queue(c)
    assert b.inspect('q')['unique_refused'] == 0
    for n in range(3):
        publish(b, n, 'k')
    assert b.inspect('q')['unique_refused'] == 2 == b.unique_refused('q')


def test_the_key_of_a_message():
    """The header, as a string; a long one by its hash, as a deduplication id."""
    assert unique_key({'headers': {'x-unique-key': 'k'}}) == 'k'
    assert unique_key({'headers': {'x-unique-key': 7}}) == '7'
    assert unique_key({'headers': {}}) == '' and unique_key({}) == ''
    assert unique_key({'headers': {'x-unique-key': 'x' * 300}}).startswith('sha256:')


@pytest.mark.parametrize('arguments, says', [
    ({'x-unique-mode': 'last'}, 'keep-first or replace'),
    ({'x-unique-ttl': 0}, 'an integer >= 1'),
    ({'x-unique-ttl': 'soon'}, 'an integer >= 1'),
])
def test_invalid_unique_arguments_are_named(arguments, says):
    with pytest.raises(ValueError, match=says):
        stored_pairs('q', arguments)


def test_unique_arguments_as_stored():
    assert unique_pairs('q', {}) == []
    assert stored_pairs('q', {'x-unique-ttl': '5', 'x-unique-mode': 'replace',
                              'x-deduplication-window': 9}) == [
        'x-deduplication-window', '9', 'x-unique-mode', 'replace', 'x-unique-ttl', '5']


class UniqueModel(RuleBasedStateMachine):
    """Publishes with two keys (some delayed, some with a TTL already past), reads by two
    consumers, ack (in a call of its own or riding in a read), reject (dead letter),
    requeue, a reclaim of every lease, purge, redrive of the dead letters and delayed
    messages made due (moved to their stream by the next read), in any order. After each
    step: at most one live message per key, and a publish is refused exactly when a live
    message holds its key (never a key left behind its message, never one lost on a move)."""

    MODE: dict[str, str] = {}  # the queue's arguments
    GROUPS: tuple[str, ...] = ()  # x-fairness: the groups publishes take turns in

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.b = queue(self.c, **self.MODE)
        self.n = 0
        self.flight: dict[str, list[Any]] = {'c1': [], 'c2': []}

    def live(self) -> dict[str, int]:
        """key -> number of messages holding it, from what Redis holds."""
        counts: dict[str, int] = {}
        for body_ in stored(self.c):
            key = body_.split('/')[0]
            counts[key] = counts.get(key, 0) + 1
        return counts

    @rule(key=st.sampled_from(['a', 'b']), delayed=st.booleans(), expired=st.booleans(),
          level=st.sampled_from([0, 3]), turn=st.integers(0, 2))
    def publish(self, key: str, delayed: bool, expired: bool, level: int, turn: int) -> None:
        self.n += 1
        taken = self.live().get(key, 0) > 0
        group = {'group': self.GROUPS[turn % len(self.GROUPS)]} if self.GROUPS else {}
        reply = self.b.publish('q', level, keyed_body(f'{key}/{self.n}', key),
                               delay=LATER if delayed else None,
                               expiration=0 if expired and not delayed else None,
                               unique_key=key, **group)
        if self.MODE.get('x_unique_mode'):  # replace: refused only while one lives; stored
            # replaces a waiting one
            assert reply != DUPLICATE or taken, (key, reply, self.live())
        else:
            assert (reply == DUPLICATE) == taken, (key, reply, self.live())

    @rule(consumer=st.sampled_from(['c1', 'c2']))
    def read(self, consumer: str) -> None:
        for d in read_messages(self.b, ['q'], consumer, 1):
            self.flight[consumer].append(d)

    def _take(self, consumer: str) -> Any:
        return self.flight[consumer].pop(0)

    @precondition(lambda self: self.flight['c1'] or self.flight['c2'])
    @rule(consumer=st.sampled_from(['c1', 'c2']), how=st.sampled_from(['ack', 'ride',
                                                                       'reject', 'requeue']))
    def settle(self, consumer: str, how: str) -> None:
        if not self.flight[consumer]:
            return
        d = self._take(consumer)
        key = json.loads(d.payload)['body'].split('/')[0]
        if how == 'ack':
            self.b.ack('q', [(d.stream, d.entry_id)], consumer=consumer, unique=[key])
        elif how == 'ride':  # inside the consumer's next read, which may deliver one more
            self.flight[consumer] += read_messages(self.b, ['q'], consumer, 1,
                                                   acks=[(d.stream, d.entry_id, False, key)])
        elif how == 'reject':
            self.b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, consumer, key)
        else:
            self.b.requeue('q', [(d.stream, d.entry_id)], consumer=consumer)

    @rule()
    def reclaim(self) -> None:
        """Every lease runs out (a SIGKILLed consumer's included); their late settles go
        nowhere (they stay in self.flight and are tried, stale, later)."""
        self.b.reclaim('q', 0, 100)

    @rule()
    def purge(self) -> None:
        self.b.purge('q')

    @rule()
    def redrive(self) -> None:
        """Every dead letter back to the queue (an operator's redrive): a letter whose key a
        live message holds stays a dead letter."""
        self.b.redrive_all('q')

    @rule()
    def due(self) -> None:
        """Every delayed message due now (its score moved into the past): the next read
        moves it to its stream, with a new entry id, where it keeps its key."""
        for member in self.c.zrange(K.delayed('q'), 0, -1):
            self.c.zadd(K.delayed('q'), {member: 0})

    @invariant()
    def at_most_one_per_key(self) -> None:
        assert all(n <= 1 for n in self.live().values()), self.live()


TestUniqueModel = UniqueModel.TestCase
TestUniqueModel.settings = PROPERTY


class ReplaceModel(UniqueModel):
    """The same sequences with x-unique-mode replace: still at most one live message per key
    (a replaced one is gone), and a refusal only while one lives."""

    MODE = {'x_unique_mode': 'replace'}


TestReplaceModel = ReplaceModel.TestCase
TestReplaceModel.settings = PROPERTY


class FairUniqueModel(UniqueModel):
    """The same sequences on a queue with x-fairness, publishes taking turns in three groups:
    a keyed message waits staged in its group, the store naming the staged message, until a
    read moves it into its stream (or a purge deletes it)."""

    MODE = {'x_fairness': 'round-robin'}
    GROUPS = ('g1', 'g2', '')


TestFairUniqueModel = FairUniqueModel.TestCase
TestFairUniqueModel.settings = PROPERTY


class FairReplaceModel(FairUniqueModel):
    """The same with x-unique-mode replace: a staged message is replaced too."""

    MODE = {'x_fairness': 'round-robin', 'x_unique_mode': 'replace'}


TestFairReplaceModel = FairReplaceModel.TestCase
TestFairReplaceModel.settings = PROPERTY
