"""wake.lua (Broker.give_back): popped markers go back in one call per wait, each only where
its source still exists, with the source's expiry, so giving markers back never brings back
the keys of a queue that expired (docs/design.rst, "Wake-ups"). Each test runs on fakeredis,
Redis 7.0 and Redis 6.2; expiry is driven directly (keys deleted, deadlines written), never
waited for.
"""

from __future__ import annotations

import pytest
from helpers import assert_same, snapshot
from redis.crc import key_slot
from redis.exceptions import ResponseError

from kombu_streams.broker import WAKE_MAX, Broker
from kombu_streams.keys import Keys
from kombu_streams.scripts import SCRIPTS, KeyTypeError

K = Keys()
LEVELS = [0, 3, 6, 9]
SEP = '\x06\x16'
HOUR = 3_600_000


def broker(c, keys=K):
    return Broker(c, keys, LEVELS)


def member(queue):
    return SEP.join(['', '', queue])


def keys_of(c, name):
    """Every key under the names of queue ``name``, its own or on an exchange."""
    return sorted(k for k in c.scan_iter(count=1000) if name.encode() in k)


def test_an_existing_queue_gets_its_marker_with_the_streams_expiry(script_client):
    c = script_client
    b = broker(c)
    b.declare('tmp')
    b.touch('tmp', HOUR)  # x-expires
    b.declare('keep')
    assert b.give_back([('tmp', None), ('keep', None)]) == []
    for q in ('tmp', 'keep'):
        assert c.zrange(K.wake(q), 0, -1, withscores=True) == [(b'w', 0.0)]
    stream_ttl, marker_ttl = c.pttl(K.stream('tmp', 0)), c.pttl(K.wake('tmp'))
    # the stream's expiry, give or take the millisecond PTTL and PEXPIRE may round apart
    assert 0 < marker_ttl <= stream_ttl + 2 and stream_ttl - marker_ttl < 30_000
    assert c.pttl(K.wake('keep')) == -1  # a queue that does not expire: nor does its marker


def test_a_marker_given_back_twice_is_one_marker(script_client):
    c = script_client
    b = broker(c)
    b.declare('q')
    b.give_back([('q', None)])
    b.give_back([('q', None), ('q', None)])
    assert c.zrange(K.wake('q'), 0, -1) == [b'w']


def test_a_gone_queue_gets_no_marker(script_client):
    """The leak of the issue: an x-expires queue (Celery's reply queue) expired while its
    consumer's wait was open; giving the wait's markers back must not bring any key back."""
    c = script_client
    b = broker(c)
    b.declare('tmpq')
    b.touch('tmpq', HOUR)
    b.bind('e', member('tmpq'), HOUR, fanout_group='tmpq')
    b.declare('live')
    c.delete(*K.streams('tmpq', LEVELS), K.wake('tmpq'))  # as if expired
    c.zadd(K.deadlines('e'), {member('tmpq'): 1})  # its binding's deadline has passed
    gone = b.give_back([('tmpq', None), ('tmpq', 'e'), ('live', None)],
                       {('tmpq', 'e'): member('tmpq')})
    assert gone == [('tmpq', None), ('tmpq', 'e')]
    assert c.exists(K.wake('tmpq'), K.fanout_wake('e', 'tmpq')) == 0
    assert [k for k in keys_of(c, 'tmpq') if b':wake' in k] == []
    assert c.exists(K.wake('live')) == 1
    b.route('e', fanout_sep=SEP)  # drops the binding and its group
    assert b.give_back([('tmpq', 'e')], {('tmpq', 'e'): member('tmpq')}) == [('tmpq', 'e')]
    assert keys_of(c, 'tmpq') == []


def test_a_fanout_group_whose_binding_is_gone_gets_no_marker(script_client):
    c = script_client
    b = broker(c)
    b.bind('e', member('a'), 0, fanout_group='a')
    b.bind('e', member('b'), 0, fanout_group='b')
    b.bind('e', member('b'), -1, fanout_group='b')  # unbound: its group is destroyed
    sources = [('a', 'e'), ('b', 'e'), ('never', 'e'), ('a', 'nowhere')]
    members = {src: member(src[0]) for src in sources}
    assert b.give_back(sources, members) == sources[1:]
    assert c.zrange(K.fanout_wake('e', 'a'), 0, -1) == [b'w']
    assert c.pttl(K.fanout_wake('e', 'a')) == -1  # a permanent binding
    for queue, ex in sources[1:]:
        assert c.exists(K.fanout_wake(ex, queue)) == 0
    assert not c.exists(K.fanout('nowhere'))


def test_a_fanout_marker_expires_at_the_bindings_deadline(script_client):
    c = script_client
    b = broker(c)
    b.bind('e', member('a'), HOUR, fanout_group='a')
    deadline = int(c.zscore(K.deadlines('e'), member('a')))
    assert b.give_back([('a', 'e')], {('a', 'e'): member('a')}) == []
    ttl = c.pttl(K.fanout_wake('e', 'a'))
    assert 0 < ttl <= HOUR
    server_ms = int(c.time()[0]) * 1000
    assert abs(server_ms + ttl - deadline) < 30_000


@pytest.mark.parametrize('where', ['queue marker', 'fanout marker', 'first stream',
                                   'fanout stream', 'deadlines'])
def test_a_wrong_type_is_an_error_that_changes_nothing(script_client, where):
    c = script_client
    b = broker(c)
    for q in ('a', 'b'):
        b.declare(q)
        b.bind('e', member(q), HOUR, fanout_group=q)
    key = {'queue marker': K.wake('b'), 'fanout marker': K.fanout_wake('e', 'b'),
           'first stream': K.stream('b', 0), 'fanout stream': K.fanout('e'),
           'deadlines': K.deadlines('e')}[where]
    c.delete(key)
    c.set(key, b'someone else')
    before = snapshot(c)
    sources = [('a', None), ('a', 'e'), ('b', None), ('b', 'e')]
    with pytest.raises(KeyTypeError) as info:
        b.give_back(sources, {src: member(src[0]) for src in sources if src[1]})
    assert 'WRONGTYPE' in str(info.value) and key in str(info.value)
    assert_same(before, snapshot(c))  # not even a's markers, which come first


def test_many_sources_of_many_queues_in_one_call(script_client):
    """WAKE_MAX sources of as many queues (different hash slots, one Redis) in one call;
    more go in chunks of WAKE_MAX."""
    c = script_client
    b = broker(c)
    names = [f'q{i}' for i in range(WAKE_MAX + 20)]
    for q in names[::2]:
        b.declare(q)
    b.bind('e', member('q1'), 0, fanout_group='q1')
    sources = [(q, None) for q in names] + [('q1', 'e')]
    assert len({key_slot(K.wake(q).encode()) for q in names[:WAKE_MAX]}) > 100
    (script, keys, args), = b.give_back_calls(sources[:WAKE_MAX])
    assert script(c, keys, args) == b''.join(b'1' if i % 2 == 0 else b'0'
                                             for i in range(WAKE_MAX))
    assert len(b.give_back_calls(sources)) == 2
    assert b.give_back_calls([]) == [] and b.give_back([]) == []
    gone = b.give_back(sources, {('q1', 'e'): member('q1')})
    assert gone == [(q, None) for q in names[1::2]]
    markers = {k for k in c.scan_iter(match='ks:*wake*', count=1000)}
    assert markers == {K.wake(q).encode() for q in names[::2]} | {K.fanout_wake('e', 'q1').encode()}


def test_more_than_the_maximum_is_refused(script_client):
    c = script_client
    b = broker(c)
    with pytest.raises(ValueError):
        b.give_back_call([('q', None)] * (WAKE_MAX + 1))
    keys = [K.wake('q'), K.stream('q', 0), K.wake('q')] * (WAKE_MAX + 1)
    with pytest.raises(ResponseError, match=r'^wake: expected '):
        SCRIPTS['wake'](c, keys, ['q', 'q', ''] * (WAKE_MAX + 1))
    with pytest.raises(ResponseError, match=r'^wake: expected kind q or f of source 2'):
        SCRIPTS['wake'](c, keys[:6], ['q', 'q', '', 'x', 'q', ''])
    assert c.exists(K.wake('q')) == 0


def test_on_cluster_one_call_per_slot():
    """Callers on Redis Cluster send one call per slot group (pure: no server)."""
    b = Broker(None, Keys(cluster=True), LEVELS)
    sources = [('{a}.x', None), ('{a}.reply', None), ('b', None), ('a', 'e'), ('c', 'e')]
    calls = b.give_back_calls(sources)
    assert sorted(len(keys) // 3 for _, keys, _ in calls) == [1, 2, 2]
    for _, keys, _ in calls:
        assert len({key_slot(k.encode()) for k in keys}) == 1
