"""Unit tests of every Lua script in ``lua/``, each run on fakeredis, Redis 7.0 and Redis 6.2.

The helpers below call the scripts exactly as ``kombu_streams.channel`` does (same KEYS and
ARGV layout), and the tests check Redis's state afterwards with plain commands, so a test
fails on any difference in what a script stores, deletes or returns.
"""

from __future__ import annotations

import re
import time

import pytest
from fakeredis import FakeRedis
from helpers import read_messages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import NoScriptError

from kombu_streams.broker import HOLDER, Broker, Delay, LayoutMismatch
from kombu_streams.keys import LAYOUT, Keys
from kombu_streams.scripts import SCRIPTS, KeyTypeError, load_all, lua_dir, run_calls

K = Keys()
LEVELS = [0, 3, 6, 9]

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- helpers: one per script, with the channel's key/argument layout -------------------------


def b(s):
    return s.encode() if isinstance(s, str) else s


def broker(c, levels=LEVELS):
    return Broker(c, K, levels)


def publish(c, queue, payload, level=0):
    return broker(c).publish(queue, level, payload)


def declare(c, queue, levels=LEVELS):
    return broker(c, levels).declare(queue)


def read(c, queues, count, consumer='c1', levels=LEVELS, limit=0):
    """Run read.lua; return [(queue, level, id, deliveries, payload), ...] in delivery order."""
    return [(d.queue, d.level, d.entry_id, d.deliveries, d.payload)
            for d in read_messages(broker(c, levels), queues, consumer, count, limit)]


def read_popped(c, queues, count):
    """Read as the consumer that popped the queues' wake markers (mode 'p'); payloads."""
    sources = Broker.sources(queues)
    (script, keys, args), parse = broker(c).read_call(
        sources, 'c1', count, modes={src: 'p' for src in sources})
    return [d.payload for d in parse(script(c, keys, args)).deliveries]


def ack(c, queue, entries):
    """An ack of ordinary messages, as the channel sends it (big messages: test_big.py)."""
    return broker(c).ack(queue, [(K.stream(queue, lv), i) for lv, i in entries], big=False)


def requeue(c, queue, entries):
    return broker(c).requeue(queue, [(K.stream(queue, lv), i) for lv, i in entries])


def size(c, queue, levels=LEVELS):
    return broker(c, levels).size(queue)


def purge(c, queue, batch=1000, levels=LEVELS):
    """One purge.lua call (Broker.purge loops until done): [purged, more]."""
    script, keys, args = broker(c, levels).purge_call(queue, batch)
    return script(c, keys, args)


def delete(c, queue, levels=LEVELS):
    return broker(c, levels).delete(queue)


def deadletter(c, queue, level, entry_id, reason, deliveries):
    return broker(c).dead_letter(queue, K.stream(queue, level), entry_id, reason, deliveries)


def reclaim(c, queue, min_idle=0, batch=100, cursors=None, expiry=0):
    """Run reclaim.lua once: (reclaimed, [cursor per level]).

    Waits 3 ms first: fakeredis's XPENDING IDLE n matches idle > n (Redis: idle >= n, and no
    filter at all for 0), so an entry delivered in the same millisecond would be missed with
    min_idle 0 on fakeredis only.
    """
    time.sleep(0.003)
    done = broker(c).reclaim(queue, min_idle, batch, cursors, expiry)
    return done.moved, done.cursors


#: A lease (ms) no test outlives: what must have lost its lease is aged (``age``), and what
#: must keep it stays far inside it, however slow the machine (CONTRIBUTING: no sleeps that
#: make a test flaky).
LEASE = 60_000
#: Where a consumer itself must have stopped (its idle time, which no command sets), the
#: test waits this long, and what must stay alive is touched in the same MULTI/EXEC as the
#: reclaim call (``reclaim_after``): no pause of the test process falls between the two.
STOP_MS = 300


def age(c, queue, entries, ms=2 * LEASE):
    """Make (level, id, consumer) entries idle for ``ms``: XCLAIM to their own consumer with
    IDLE, JUSTID so the delivery count stays. Their lease runs out without waiting for it."""
    for level, entry_id, consumer in entries:
        c.xclaim(K.stream(queue, level), queue, consumer, 0, [entry_id], idle=ms, justid=True)


def reclaim_after(c, touches, queue, lease, budget, cursors=None, expiry=0):
    """reclaim.lua in one MULTI/EXEC after ``touches`` (each ``touch(pipe)``), which keep
    what must look alive fresh up to the call itself: (moved, more, next_ms, cursors)."""
    time.sleep(0.003)  # as in reclaim(): fakeredis's idle filter is strict
    (script, keys, args), parse = broker(c).reclaim_call(queue, lease, budget, cursors, expiry)
    c.script_load(script.source)
    with c.pipeline(transaction=True) as pipe:
        for touch in touches:
            touch(pipe)
        script.queue(pipe, keys, args)
        return parse(pipe.execute()[-1])


def keep_entry(queue, level, entry_id, consumer):
    """A touch: ``entry_id`` claimed by its own consumer now (idle 0, count kept)."""
    return lambda pipe: pipe.xclaim(K.stream(queue, level), queue, consumer, 0, [entry_id],
                                    justid=True)


def keep_consumer(c, queue, level, consumer):
    """A touch that leaves ``consumer`` owning what it owned: it reads one entry added for it
    and acks it. (Redis 6.2 and 7.0 count a consumer as seen only when a command gives it an
    entry; an empty read or claim does not.) The entry's id is the next after the stream's
    last one, so the transaction can ack it."""
    key = K.stream(queue, level)

    def touch(pipe):
        ms, seq = c.xinfo_stream(key)['last-generated-id'].split(b'-')
        tick = b'%s-%d' % (ms, int(seq) + 1)
        pipe.xadd(key, {'m': 'tick'}, id=tick)
        pipe.xreadgroup(queue, consumer, {key: '>'}, count=1)
        pipe.xack(key, queue, tick)
    return touch


def renew(c, queue, consumer, entries):
    """Run renew.lua for (level, id) entries; return the lost ones as (stream key, id)."""
    return broker(c).renew(queue, consumer, [(K.stream(queue, lv), i) for lv, i in entries])


def redrive(c, queue, count=100, ids=()):
    return broker(c).redrive(queue, count, ids)


def read_all(c, queues, count, consumer='c1', levels=LEVELS, limit=0):
    """read() until it returns nothing; a list of the replies of each call."""
    calls = []
    while True:
        got = read(c, queues, count, consumer, levels, limit)
        if not got:
            return calls
        calls.append(got)


def sid(entry_id):
    """A stream id as a sortable (ms, seq) tuple."""
    ms, seq = entry_id.split(b'-')
    return int(ms), int(seq)


def ids(c, key):
    return [e[0] for e in c.xrange(key)]


def pel(c, key, group):
    """The PEL as {id: (consumer, deliveries)}."""
    return {p['message_id']: (p['consumer'], p['times_delivered'])
            for p in c.xpending_range(key, group, min='-', max='+', count=1000)}


def idle(c, key, group):
    """Milliseconds since each PEL entry was last delivered or claimed: {id: ms}."""
    return {p['message_id']: p['time_since_delivered']
            for p in c.xpending_range(key, group, min='-', max='+', count=1000)}


def consumers(c, key, group):
    """The group's consumers as {name: pending}."""
    return {b(x['name']): x['pending'] for x in c.xinfo_consumers(key, group)}


def dead(c, queue):
    """The dead letters of ``queue`` as [(dlq id, fields)]."""
    return c.xrange(K.dlq(queue))


def marker(c, queue):
    return c.zrange(K.wake(queue), 0, -1, withscores=True)


def groups(c, key):
    return {b(g['name']): b(g['last-delivered-id']) for g in c.xinfo_groups(key)}


def payloads(delivered):
    return [d[4] for d in delivered]


def check_ready_index(c, queue, levels=LEVELS):
    """The ready index names every stream with ready work: entries the group has not
    delivered (key), entries parked with the holder (h:key). An index without its complete
    member '' may name less: the next read walks every stream. And a queue with ready work
    has its wake marker (nothing pops it here)."""
    index = c.smembers(K.ready(queue))
    ready = False
    for lv in levels:
        key = K.stream(queue, lv)
        if c.exists(key):
            last = groups(c, key).get(b(queue), b'0-0')
            ready = ready or any(sid(e) > sid(last) for e in ids(c, key)) or any(
                owner == b(HOLDER) for owner, _ in pel(c, key, queue).values())
    assert not ready or marker(c, queue), 'ready work without a wake marker'
    if b'' not in index:
        return
    for lv in levels:
        key = K.stream(queue, lv)
        if not c.exists(key):
            continue
        last = groups(c, key).get(b(queue))
        if last is None:  # no group yet: every entry is new to it
            assert c.xlen(key) == 0 or b(key) in index, f'{key} not indexed'
            continue
        if any(sid(e) > sid(last) for e in ids(c, key)):
            assert b(key) in index, f'{key}: new entries, not indexed'
        if any(owner == b(HOLDER) for owner, _ in pel(c, key, queue).values()):
            assert b'h:' + b(key) in index, f'{key}: held entries, not indexed'


# fanout exchanges: one stream per exchange, one consumer group per bound queue

SEP = '\x06\x16'  # the channel's separator in binding members


def member(queue, routing_key=''):
    """The binding member of ``queue`` in a routing table, as the channel writes it."""
    return SEP.join([routing_key, '', queue])


def fbind(c, queue, ttl_ms=0, ex='ex'):
    """Bind ``queue`` to fanout exchange ``ex`` (bind.lua with its group); -1 unbinds."""
    return broker(c).bind(ex, member(queue), ttl_ms, fanout_group=queue)


def froute(c, sweep=100, ex='ex'):
    return broker(c).route(ex, sweep, fanout_sep=SEP)


def fpublish(c, payload, queues, ex='ex'):
    """Run fanout_publish.lua for the bound ``queues``; the entry id or None."""
    script, keys, args = broker(c).fanout_publish_call(ex, payload,
                                                       [(q, member(q)) for q in queues])
    return script(c, keys, args)


def fread(c, queue, count, consumer='c1', ex='ex', limit=0, hints=None):
    """read.lua for ``queue`` bound to ``ex`` (its group first, then its own streams);
    [(id, deliveries, payload)] of what came through the fanout stream."""
    got = read_messages(broker(c), [queue], consumer, count, limit, fanout={queue: [ex]},
                        hints=hints)
    assert all(d.exchange == ex and d.stream == K.fanout(ex) for d in got)
    return [(d.entry_id, d.deliveries, d.payload) for d in got]


def fread_all(c, queue, count, consumer='c1', ex='ex'):
    calls = []
    while True:
        got = fread(c, queue, count, consumer, ex)
        if not got:
            return calls
        calls.append(got)


def fack(c, queue, entry_ids, ex='ex'):
    return broker(c).ack(queue, [(K.fanout(ex), i) for i in entry_ids], exchange=ex)


def frequeue(c, queue, entry_ids, ex='ex'):
    return broker(c).requeue(queue, [(K.fanout(ex), i) for i in entry_ids], exchange=ex)


def freclaim(c, queue, min_idle=0, batch=100, ex='ex'):
    """reclaim.lua on ``queue``'s group of the fanout stream (3 ms first: see reclaim())."""
    time.sleep(0.003)
    done = broker(c).reclaim(queue, min_idle, batch, exchange=ex)
    return done.moved, done.cursors


def two_groups(c, n):
    """Queues 'a' and 'b' bound to fanout exchange 'ex', then ``n`` messages published to
    both: (the fanout stream's key, their ids)."""
    fbind(c, 'a')
    fbind(c, 'b')
    return K.fanout('ex'), [fpublish(c, b'%d' % i, ['a', 'b']) for i in range(n)]


def fdeadletter(c, queue, entry_id, reason, deliveries, ex='ex'):
    return broker(c).dead_letter(queue, K.fanout(ex), entry_id, reason, deliveries, exchange=ex)


def fmarker(c, queue, ex='ex'):
    return c.zrange(K.fanout_wake(ex, queue), 0, -1, withscores=True)


# -- publish -----------------------------------------------------------------------------------


def test_publish_appends_field_m_and_sets_marker(script_client):
    c = script_client
    first = publish(c, 'q', b'{"a": 1}', level=3)
    second = publish(c, 'q', b'\xff\x00binary', level=3)
    assert isinstance(first, bytes) and sid(first) < sid(second)
    assert c.xrange(K.stream('q', 3)) == [(first, {b'm': b'{"a": 1}'}),
                                          (second, {b'm': b'\xff\x00binary'})]
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert c.exists(K.stream('q', 0)) == 0  # only the message's level is touched
    assert c.type(K.wake('q')) == b'zset'


def test_publish_never_creates_a_group(script_client):
    c = script_client
    publish(c, 'q', b'x')
    assert c.xinfo_groups(K.stream('q', 0)) == []


# -- declare -----------------------------------------------------------------------------------


def test_declare_creates_stream_and_group_per_level_idempotently(script_client):
    c = script_client
    assert declare(c, 'q') == 4
    for key in K.streams('q', LEVELS):
        assert c.type(key) == b'stream'
        assert c.xlen(key) == 0
        assert groups(c, key) == {b'q': b'0-0'}
    assert declare(c, 'q') == 0
    assert c.exists(K.wake('q'), K.dlq('q')) == 0
    assert sorted(c.keys('*')) == sorted(b(k) for k in K.streams('q', LEVELS))


def test_declare_counts_only_missing_groups(script_client):
    c = script_client
    assert declare(c, 'q', levels=[0, 6]) == 2
    assert declare(c, 'q') == 2


def test_declare_after_publish_delivers_earlier_messages(script_client):
    c = script_client
    early = publish(c, 'q', b'early', level=3)
    assert declare(c, 'q') == 4  # the group is created on the existing stream, at id 0
    assert groups(c, K.stream('q', 3)) == {b'q': b'0-0'}
    assert read(c, ['q'], 10) == [('q', 3, early, 1, b'early')]


# -- read --------------------------------------------------------------------------------------


def test_read_serves_level_major_across_queues(script_client):
    c = script_client
    declare(c, 'a')
    declare(c, 'b')
    plan = [('a', 9, 'a9'), ('b', 0, 'b0-1'), ('a', 3, 'a3'), ('a', 0, 'a0'),
            ('b', 6, 'b6'), ('b', 0, 'b0-2'), ('b', 3, 'b3'), ('a', 0, 'a0-2')]
    for q, lv, p in plan:
        publish(c, q, p.encode(), level=lv)
    got = read(c, ['a', 'b'], 100)
    assert payloads(got) == [b'a0', b'a0-2', b'b0-1', b'b0-2', b'a3', b'b3', b'b6', b'a9']
    assert [(q, lv, n) for q, lv, _, n, _ in got] == [
        ('a', 0, 1), ('a', 0, 1), ('b', 0, 1), ('b', 0, 1),
        ('a', 3, 1), ('b', 3, 1), ('b', 6, 1), ('a', 9, 1)]
    # the queue order given by the caller wins inside a level
    for q, lv, p in plan:
        publish(c, q, p.encode(), level=lv)
    assert payloads(read(c, ['b', 'a'], 3)) == [b'b0-1', b'b0-2', b'a0']


def test_read_respects_count_and_records_delivery(script_client):
    c = script_client
    declare(c, 'q')
    sent = [publish(c, 'q', f'm{i}'.encode()) for i in range(5)]
    first = read(c, ['q'], 2, consumer='c1')
    assert [d[2] for d in first] == sent[:2]
    second = read(c, ['q'], 2, consumer='c2')
    assert [d[2] for d in second] == sent[2:4]
    third = read(c, ['q'], 2, consumer='c1')
    assert [(d[2], d[3], d[4]) for d in third] == [(sent[4], 1, b'm4')]
    assert read(c, ['q'], 2) == []
    assert pel(c, K.stream('q', 0), 'q') == {
        sent[0]: (b'c1', 1), sent[1]: (b'c1', 1), sent[2]: (b'c2', 1),
        sent[3]: (b'c2', 1), sent[4]: (b'c1', 1)}
    assert c.xlen(K.stream('q', 0)) == 5  # read never deletes


def test_read_count_spans_levels(script_client):
    c = script_client
    declare(c, 'q')
    low = publish(c, 'q', b'low', level=9)
    high = [publish(c, 'q', b'high', level=0) for _ in range(2)]
    assert [d[2] for d in read(c, ['q'], 3)] == [*high, low]


def test_requeued_served_first_with_delivery_count(script_client):
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', f'm{i}'.encode()) for i in range(4)]
    fresh9 = publish(c, 'q', b'p9', level=9)
    got = read(c, ['q'], 3)
    assert [d[2] for d in got] == m[:3]
    # requeue out of order: the held ones come back in id order, before m3, and count 2
    assert requeue(c, 'q', [(0, m[2]), (0, m[0])]) == 2
    # each message that was delivered before comes back alone (it may be what crashes a
    # consumer), in id order, before m3
    again = read_all(c, ['q'], 10, consumer='c2')
    assert [[(d[1], d[2], d[3]) for d in got] for got in again] == [
        [(0, m[0], 2)], [(0, m[2], 2)], [(0, m[3], 1), (9, fresh9, 1)]]
    assert pel(c, K.stream('q', 0), 'q') == {
        m[0]: (b'c2', 2), m[1]: (b'c1', 1), m[2]: (b'c2', 2), m[3]: (b'c2', 1)}
    # a second round trip: count 3, and the holder has nothing left
    assert requeue(c, 'q', [(0, m[0])]) == 1
    assert [(d[2], d[3]) for d in read(c, ['q'], 10)] == [(m[0], 3)]
    assert all(owner != b(HOLDER) for owner, _ in pel(c, K.stream('q', 0), 'q').values())


def test_requeued_lower_level_waits_for_higher_level(script_client):
    c = script_client
    declare(c, 'q')
    low = publish(c, 'q', b'low', level=6)
    assert [d[2] for d in read(c, ['q'], 1)] == [low]
    requeue(c, 'q', [(6, low)])
    high = publish(c, 'q', b'high', level=3)
    assert [(d[2], d[3]) for d in read(c, ['q'], 10)] == [(high, 1)]
    assert [(d[2], d[3]) for d in read(c, ['q'], 10)] == [(low, 2)]  # alone: seen before


def test_read_held_partially_when_count_is_small(script_client):
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', b'x') for _ in range(3)]
    read(c, ['q'], 3)
    requeue(c, 'q', [(0, i) for i in m])
    assert [(d[2], d[3]) for d in read(c, ['q'], 2, consumer='c2')] == [(m[0], 2)]  # alone
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert pel(c, K.stream('q', 0), 'q')[m[2]] == (b(HOLDER), 1)
    assert [(d[2], d[3]) for d in read(c, ['q'], 2, consumer='c2')] == [(m[1], 2)]
    assert [(d[2], d[3]) for d in read(c, ['q'], 2, consumer='c2')] == [(m[2], 2)]
    assert read(c, ['q'], 2, consumer='c2') == []
    assert marker(c, 'q') == []


def test_read_creates_missing_group_lazily(script_client):
    c = script_client
    one = publish(c, 'q', b'one', level=3)  # no declare: stream without group
    assert read(c, ['q'], 5) == [('q', 3, one, 1, b'one')]
    assert groups(c, K.stream('q', 3)) == {b'q': one}
    for lv in (0, 6, 9):  # levels that do not exist stay absent
        assert c.exists(K.stream('q', lv)) == 0


def test_read_skips_missing_streams_without_creating_keys(script_client):
    c = script_client
    declare(c, 'b', levels=[3])
    there = publish(c, 'b', b'there', level=3)
    assert [d[2] for d in read(c, ['ghost', 'b'], 5)] == [there]
    assert c.keys(b'*ghost*') == []
    assert read(c, ['ghost'], 5) == []
    assert c.keys(b'*ghost*') == []


def test_read_entry_without_m_goes_to_dlq(script_client):
    c = script_client
    declare(c, 'q')
    key = K.stream('q', 0)
    good1 = publish(c, 'q', b'good1')
    bad = c.xadd(key, {b'x': b'1', b'body': b'\xfe'})
    good2 = publish(c, 'q', b'good2')
    got = read(c, ['q'], 10)
    assert [(d[2], d[4]) for d in got] == [(good1, b'good1'), (good2, b'good2')]
    assert ids(c, key) == [good1, good2]
    assert set(pel(c, key, 'q')) == {good1, good2}
    dead = c.xrange(K.dlq('q'))
    assert len(dead) == 1
    assert dead[0][1] == {
        b'reason': b'malformed: no m field', b'stream': b(key), b'group': b'q',
        b'id': bad, b'deliveries': b'1', b'f:x': b'1', b'f:body': b'\xfe'}


def test_read_malformed_entry_uses_no_count_but_keeps_marker(script_client):
    c = script_client
    declare(c, 'q')
    publish(c, 'q', b'good1')
    c.xadd(K.stream('q', 0), {b'other': b''})
    publish(c, 'q', b'good2')
    c.delete(K.wake('q'))  # popped by this consumer
    assert read_popped(c, ['q'], 2) == [b'good1']  # COUNT 2 read two entries
    assert marker(c, 'q') == [(b'w', 0.0)]  # so good2 is not stranded
    assert read_popped(c, ['q'], 2) == [b'good2']
    assert marker(c, 'q') == []
    assert c.xrange(K.dlq('q'))[0][1][b'f:other'] == b''


def test_read_dlq_is_per_queue(script_client):
    c = script_client
    declare(c, 'a')
    declare(c, 'b')
    publish(c, 'a', b'ok')
    c.xadd(K.stream('b', 3), {b'junk': b'1'})
    assert payloads(read(c, ['a', 'b'], 10)) == [b'ok']
    assert c.exists(K.dlq('a')) == 0
    assert c.xlen(K.dlq('b')) == 1
    assert c.xlen(K.stream('b', 3)) == 0


def test_wake_marker_follows_what_is_left(script_client):
    c = script_client
    declare(c, 'q')
    for i in range(3):
        publish(c, 'q', b'%d' % i)
    c.delete(K.wake('q'))  # popped by this consumer
    assert len(read_popped(c, ['q'], 2)) == 2  # filled COUNT, one left
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert len(read_popped(c, ['q'], 2)) == 1  # drained
    assert marker(c, 'q') == []
    assert read(c, ['q'], 2) == []
    assert marker(c, 'q') == []


@pytest.mark.parametrize('popped_elsewhere', [False, True])
def test_hot_read_leaves_the_marker_as_it_was(script_client, popped_elsewhere):
    """A read that did not pop the marker (mode 'r') and made nothing ready only took work
    away: a marker of a source with more is left as it was (set, or popped by another
    consumer, whose read sets it again); a source seen dry loses it."""
    c = script_client
    declare(c, 'q')
    for i in range(4):
        publish(c, 'q', b'%d' % i)
    assert len(read(c, ['q'], 1)) == 1  # the first read walks (the index is not complete)
    assert marker(c, 'q') == [(b'w', 0.0)]  # and a walk that finds work sets the marker
    if popped_elsewhere:
        c.delete(K.wake('q'))
    before = marker(c, 'q')
    assert len(read(c, ['q'], 1)) == 1
    assert marker(c, 'q') == before
    assert read_popped(c, ['q'], 1) == [b'2']  # the other consumer's read
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert len(read(c, ['q'], 5)) == 1  # drained
    assert marker(c, 'q') == []


def test_wake_markers_of_sources_not_reached(script_client):
    """A read that runs out of COUNT leaves the markers of the sources it did not reach as
    they were (whoever set them keeps the invariant), except one this consumer popped: that
    wake-up is given back."""
    c = script_client
    declare(c, 'a')
    declare(c, 'b')
    declare(c, 'd')
    publish(c, 'a', b'a')
    publish(c, 'b', b'b', level=9)
    publish(c, 'd', b'd', level=9)
    c.delete(K.wake('a'), K.wake('b'), K.wake('d'))
    sources = Broker.sources(['a', 'b', 'd'])
    (script, keys, args), parse = broker(c).read_call(
        sources, 'c1', 1, modes={('a', None): 'r', ('b', None): 'r', ('d', None): 'p'})
    result = parse(script(c, keys, args))
    assert [x.payload for x in result.deliveries] == [b'a']
    assert result.status == {('a', None): '1', ('b', None): '-', ('d', None): '-'}
    # COUNT filled: more may be ready (read.lua does not probe); its first read walked it
    # (its index was not complete yet), and a walk that leaves work sets the marker
    assert marker(c, 'a') == [(b'w', 0.0)]
    assert marker(c, 'b') == []  # not reached: as it was
    assert marker(c, 'd') == [(b'w', 0.0)]  # popped and not reached: given back
    assert payloads(read(c, ['a', 'b', 'd'], 5)) == [b'b', b'd']
    assert marker(c, 'a') == [] and marker(c, 'b') == [] and marker(c, 'd') == []


def test_wake_marker_removed_after_draining_requeued(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'x')
    read(c, ['q'], 1)
    requeue(c, 'q', [(0, m)])
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert [d[2] for d in read(c, ['q'], 2)] == [m]  # the only ready message, served alone
    assert read(c, ['q'], 2) == []  # a read after one served alone clears the marker
    assert marker(c, 'q') == []


def test_read_drops_held_entry_deleted_meanwhile(script_client):
    c = script_client
    declare(c, 'q')
    gone, kept = publish(c, 'q', b'gone'), publish(c, 'q', b'kept')
    read(c, ['q'], 2)
    requeue(c, 'q', [(0, gone), (0, kept)])
    c.xdel(K.stream('q', 0), gone)  # by hand (Redis 6.2 keeps its PEL record)
    assert [(d[2], d[3]) for d in read(c, ['q'], 5)] == [(kept, 2)]
    assert pel(c, K.stream('q', 0), 'q') == {kept: (b'c1', 2)}


# -- ack ---------------------------------------------------------------------------------------


def test_ack_deletes_acked_entries(script_client):
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', b'x', level=lv) for lv in (0, 0, 3)]
    read(c, ['q'], 3)
    assert ack(c, 'q', [(0, m[0]), (3, m[2])]) == 2
    assert ids(c, K.stream('q', 0)) == [m[1]]
    assert c.xlen(K.stream('q', 3)) == 0
    assert pel(c, K.stream('q', 0), 'q') == {m[1]: (b'c1', 1)}
    assert pel(c, K.stream('q', 3), 'q') == {}
    assert ack(c, 'q', [(0, m[0]), (3, m[2])]) == 0  # twice: harmless
    assert ack(c, 'q', [(0, m[1]), (0, m[1])]) == 1
    assert c.xlen(K.stream('q', 0)) == 0


def test_ack_of_undelivered_id_deletes_nothing(script_client):
    c = script_client
    declare(c, 'q')
    first, second = publish(c, 'q', b'1'), publish(c, 'q', b'2')
    read(c, ['q'], 1)
    assert ack(c, 'q', [(0, second)]) == 0
    assert ids(c, K.stream('q', 0)) == [first, second]
    assert [d[2] for d in read(c, ['q'], 5)] == [second]


def test_ack_mixing_pending_acked_and_undelivered_ids(script_client):
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', b'%d' % i) for i in range(5)]
    read(c, ['q'], 3)
    assert ack(c, 'q', [(0, m[0])]) == 1
    # m0 acked already, m1 and m2 pending, m3 and m4 never delivered
    assert ack(c, 'q', [(0, i) for i in m]) == 2
    assert ids(c, K.stream('q', 0)) == [m[3], m[4]]
    assert pel(c, K.stream('q', 0), 'q') == {}
    assert [d[2] for d in read(c, ['q'], 5)] == [m[3], m[4]]


def test_ack_of_many_ids_in_one_call(script_client):
    c = script_client
    declare(c, 'q')
    pipe = c.pipeline(transaction=False)
    for i in range(2500):
        pipe.xadd(K.stream('q', 3), {'m': b'%d' % i})
    pipe.execute()
    got = read(c, ['q'], 2400)
    assert len(got) == 2400
    before = _calls(c)
    assert ack(c, 'q', [(3, d[2]) for d in got]) == 2400
    after = _calls(c)
    assert c.xlen(K.stream('q', 3)) == 100
    assert pel(c, K.stream('q', 3), 'q') == {}
    if before is not None:  # one XACK and one XDEL per 1000 ids (none may have run before)
        assert after['xack'] - before.get('xack', 0) == 3
        assert after['xdel'] - before.get('xdel', 0) == 3

def test_ack_after_queue_deleted_is_harmless(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'x')
    read(c, ['q'], 1)
    delete(c, 'q')
    assert ack(c, 'q', [(0, m)]) == 0
    assert c.keys('*') == []


def test_ack_of_requeued_message(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'x')
    read(c, ['q'], 1)
    requeue(c, 'q', [(0, m)])
    assert ack(c, 'q', [(0, m)]) == 1  # a late ack still settles it
    assert c.xlen(K.stream('q', 0)) == 0
    assert read(c, ['q'], 1) == []


# -- requeue -----------------------------------------------------------------------------------


def test_requeue_moves_pel_record_to_holder(script_client):
    c = script_client
    declare(c, 'q')
    a, z = publish(c, 'q', b'a'), publish(c, 'q', b'z', level=9)
    read(c, ['q'], 2)
    c.delete(K.wake('q'))
    assert requeue(c, 'q', [(0, a), (9, z)]) == 2
    assert pel(c, K.stream('q', 0), 'q') == {a: (b(HOLDER), 1)}
    assert pel(c, K.stream('q', 9), 'q') == {z: (b(HOLDER), 1)}
    assert ids(c, K.stream('q', 0)) == [a]  # not copied, same id
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert size(c, 'q') == 2


def test_requeue_of_settled_or_undelivered_is_noop(script_client):
    c = script_client
    declare(c, 'q')
    a, never = publish(c, 'q', b'a'), publish(c, 'q', b'never')
    read(c, ['q'], 1)
    ack(c, 'q', [(0, a)])
    c.delete(K.wake('q'))
    assert requeue(c, 'q', [(0, a), (0, never)]) == 0
    assert marker(c, 'q') == []
    assert pel(c, K.stream('q', 0), 'q') == {}
    assert [(d[2], d[3]) for d in read(c, ['q'], 5)] == [(never, 1)]


# -- size --------------------------------------------------------------------------------------


def test_size_counts_ready_messages(script_client):
    c = script_client
    assert size(c, 'q') == 0
    m = [publish(c, 'q', b'x', level=lv) for lv in (0, 0, 3, 9)]
    assert size(c, 'q') == 4  # before any group exists
    declare(c, 'q')
    assert size(c, 'q') == 4
    read(c, ['q'], 3)
    assert size(c, 'q') == 1
    requeue(c, 'q', [(0, m[1]), (3, m[2])])
    assert size(c, 'q') == 3
    ack(c, 'q', [(0, m[0])])
    assert size(c, 'q') == 3
    read(c, ['q'], 1)
    assert size(c, 'q') == 2
    assert size(c, 'q', levels=[9]) == 1


# -- purge -------------------------------------------------------------------------------------


def test_purge_fast_path_trims_everything(script_client):
    c = script_client
    declare(c, 'q')
    for lv in (0, 0, 3, 9, 9):
        publish(c, 'q', b'x', level=lv)
    assert purge(c, 'q', batch=2) == [5, 0]  # XTRIM ignores the batch
    for key in K.streams('q', LEVELS):
        assert c.xlen(key) == 0
        assert groups(c, key) == {b'q': b'0-0'}  # the queue itself stays
    assert size(c, 'q') == 0
    assert purge(c, 'q') == [0, 0]


def test_purge_without_group_or_streams(script_client):
    c = script_client
    assert purge(c, 'q') == [0, 0]
    publish(c, 'q', b'x', level=6)
    assert purge(c, 'q') == [1, 0]
    assert c.keys('*ks:q:{q}:[0-9]') == [b(K.stream('q', 6))]


def test_purge_keeps_delivered_unacked(script_client):
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', b'%d' % i) for i in range(6)]
    low = publish(c, 'q', b'low', level=3)
    read(c, ['q'], 3)
    requeue(c, 'q', [(0, m[1])])  # held: ready again, so purged
    assert purge(c, 'q') == [5, 0]  # m1 (held), m3..m5, low
    assert ids(c, K.stream('q', 0)) == [m[0], m[2]]
    assert c.xlen(K.stream('q', 3)) == 0
    assert pel(c, K.stream('q', 0), 'q') == {m[0]: (b'c1', 1), m[2]: (b'c1', 1)}
    assert size(c, 'q') == 0
    assert read(c, ['q'], 10) == []
    assert ack(c, 'q', [(0, m[0]), (0, m[2])]) == 2
    assert c.xlen(K.stream('q', 0)) == 0
    del low


def test_purge_in_batches_reports_more(script_client):
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', b'%d' % i) for i in range(8)]
    read(c, ['q'], 3)
    requeue(c, 'q', [(0, m[0]), (0, m[1])])
    # call 1: 2 held (batch full) + m3, m4; call 2: m5, m6; call 3: m7; call 4: nothing
    assert purge(c, 'q', batch=2) == [4, 1]
    assert purge(c, 'q', batch=2) == [2, 1]
    assert purge(c, 'q', batch=2) == [1, 0]
    assert ids(c, K.stream('q', 0)) == [m[2]]
    assert purge(c, 'q', batch=2) == [0, 0]
    assert ack(c, 'q', [(0, m[2])]) == 1


# -- delete ------------------------------------------------------------------------------------


def test_delete_removes_streams_and_marker_keeps_dead_letters(script_client):
    c = script_client
    declare(c, 'q')
    publish(c, 'q', b'x')
    c.xadd(K.stream('q', 3), {b'junk': b'1'})
    read(c, ['q'], 10)
    publish(c, 'q', b'y', level=9)
    assert c.xlen(K.dlq('q')) == 1
    assert delete(c, 'q') == 6  # 4 streams + marker + ready index
    assert c.keys('*') == [b(K.dlq('q'))]
    assert c.xlen(K.dlq('q')) == 1
    assert delete(c, 'q') == 0


def test_delete_removes_empty_dlq(script_client):
    c = script_client
    declare(c, 'q', levels=[0])
    dead = c.xadd(K.dlq('q'), {b'reason': b'r'})
    c.xdel(K.dlq('q'), dead)
    assert c.exists(K.dlq('q')) == 1
    assert delete(c, 'q') == 2  # level 0 + empty dlq (no marker)
    assert c.keys('*') == []


# -- deadletter --------------------------------------------------------------------------------


def test_deadletter_moves_entry_with_fields(script_client):
    c = script_client
    declare(c, 'q')
    key = K.stream('q', 3)
    bad = publish(c, 'q', b'not json', level=3)
    keep = publish(c, 'q', b'ok', level=3)
    read(c, ['q'], 2)
    assert deadletter(c, 'q', 3, bad, 'undecodable: ValueError()', 4) == 1
    assert ids(c, key) == [keep]
    assert pel(c, key, 'q') == {keep: (b'c1', 1)}
    [(_, fields)] = c.xrange(K.dlq('q'))
    assert fields == {b'reason': b'undecodable: ValueError()', b'stream': b(key),
                      b'group': b'q', b'id': bad, b'deliveries': b'4', b'f:m': b'not json'}


def test_deadletter_of_missing_id_returns_0(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'x')
    read(c, ['q'], 1)
    ack(c, 'q', [(0, m)])
    assert deadletter(c, 'q', 0, m, 'late', 1) == 0
    assert deadletter(c, 'q', 0, b'1-1', 'never', 1) == 0
    assert c.exists(K.dlq('q')) == 0
    assert deadletter(c, 'ghost', 0, b'1-1', 'no stream', 1) == 0
    assert c.keys('*ghost*') == []


# -- read: delivery limit ----------------------------------------------------------------------


def test_read_delivery_limit_dead_letters_held_entry(script_client):
    c = script_client
    declare(c, 'q')
    key = K.stream('q', 0)
    m = publish(c, 'q', b'payload')
    for n in (1, 2):
        assert [(d[2], d[3]) for d in read(c, ['q'], 5, limit=2)] == [(m, n)]
        requeue(c, 'q', [(0, m)])
    fresh = publish(c, 'q', b'fresh')
    # m's next delivery would be its third: set aside, and the read goes on to the next message
    assert read(c, ['q'], 5, limit=2) == [('q', 0, fresh, 1, b'fresh')]
    assert ids(c, key) == [fresh]
    assert pel(c, key, 'q') == {fresh: (b'c1', 1)}
    [(_, fields)] = dead(c, 'q')
    assert fields == {b'reason': b'delivery limit', b'stream': b(key), b'group': b'q',
                      b'id': m, b'deliveries': b'2', b'f:m': b'payload'}
    assert marker(c, 'q') == []


def test_read_delivery_limit_counts_reclaimed_redeliveries(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'crash loop', level=6)
    for n, consumer in enumerate(['c1', 'c2', 'c3'], 1):  # each consumer dies holding m
        assert [(d[2], d[3]) for d in read(c, ['q'], 1, consumer=consumer, limit=3)] == [(m, n)]
        assert reclaim(c, 'q') == (1, ['-'] * 4)
    assert read(c, ['q'], 1, consumer='c4', limit=3) == []
    [(_, fields)] = dead(c, 'q')
    assert (fields[b'reason'], fields[b'id'], fields[b'deliveries']) == (
        b'delivery limit', m, b'3')
    assert c.xlen(K.stream('q', 6)) == 0
    assert pel(c, K.stream('q', 6), 'q') == {}


def test_read_delivery_limit_zero_means_no_limit(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'x')
    for n in range(1, 8):
        assert [(d[2], d[3]) for d in read(c, ['q'], 1, limit=0)] == [(m, n)]
        requeue(c, 'q', [(0, m)])
    assert c.exists(K.dlq('q')) == 0


def test_read_delivery_limit_never_applies_to_fresh_entries(script_client):
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', b'%d' % i, level=lv) for i, lv in enumerate((0, 3, 9))]
    assert [(d[2], d[3]) for d in read(c, ['q'], 5, limit=1)] == [(i, 1) for i in m]
    assert c.exists(K.dlq('q')) == 0
    requeue(c, 'q', [(3, m[1])])  # delivered once: a second delivery would exceed 1
    assert read(c, ['q'], 5, limit=1) == []
    assert [f[b'id'] for _, f in dead(c, 'q')] == [m[1]]


def test_read_delivery_limit_keeps_every_field(script_client):
    c = script_client
    declare(c, 'q')
    key = K.stream('q', 3)
    m = c.xadd(key, {b'm': b'body', b'extra': b'\xff', b'empty': b''})
    assert read(c, ['q'], 1) == [('q', 3, m, 1, b'body')]
    requeue(c, 'q', [(3, m)])
    assert read(c, ['q'], 1, limit=1) == []
    [(_, fields)] = dead(c, 'q')
    assert fields == {b'reason': b'delivery limit', b'stream': b(key), b'group': b'q',
                      b'id': m, b'deliveries': b'1', b'f:m': b'body', b'f:extra': b'\xff',
                      b'f:empty': b''}


def test_read_delivery_limit_serves_next_held_before_fresh(script_client):
    c = script_client
    declare(c, 'q')
    h1, h2, fresh = publish(c, 'q', b'h1'), publish(c, 'q', b'h2'), publish(c, 'q', b'fresh')
    read(c, ['q'], 2)
    requeue(c, 'q', [(0, h1)])
    assert [(d[2], d[3]) for d in read(c, ['q'], 1)] == [(h1, 2)]
    requeue(c, 'q', [(0, h1), (0, h2)])
    # h1 is set aside; the next message in serving order is h2 (held), not the fresh one
    assert [(d[2], d[3]) for d in read(c, ['q'], 1, limit=2)] == [(h2, 2)]
    assert [f[b'id'] for _, f in dead(c, 'q')] == [h1]
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert [(d[2], d[3]) for d in read(c, ['q'], 5, limit=2)] == [(fresh, 1)]


def test_read_sets_aside_a_bounded_number_per_call(script_client):
    """A backlog of messages past the delivery limit is set aside COUNT + 100 per call (a
    call's work stays bounded); the call says more may be ready, and the next ones go on."""
    c = script_client
    declare(c, 'q')
    ids_ = [publish(c, 'q', b'%d' % i) for i in range(150)]
    read(c, ['q'], 150)
    requeue(c, 'q', [(0, i) for i in ids_])
    sources = Broker.sources(['q'])
    (script, keys, args), parse = broker(c).read_call(sources, 'c2', 5, max_deliveries=1)
    first = parse(script(c, keys, args))
    assert (len(first.aside), first.deliveries, first.status) == (105, [], {('q', None): '1'})
    assert marker(c, 'q') == [(b'w', 0.0)]
    second = parse(script(c, keys, args))
    assert (len(second.aside), second.deliveries) == (45, [])
    assert len(dead(c, 'q')) == 150


# -- reclaim -----------------------------------------------------------------------------------


def test_reclaim_moves_stalled_entries_to_holder_keeping_count(script_client):
    c = script_client
    declare(c, 'q')
    a, bb, d, e = (publish(c, 'q', p) for p in (b'a', b'b', b'd', b'e'))
    z = publish(c, 'q', b'z', level=9)
    read(c, ['q'], 2, consumer='c1')               # a, b
    requeue(c, 'q', [(0, bb)])
    read(c, ['q'], 2, consumer='c2')               # b (2nd delivery, alone)
    read(c, ['q'], 1, consumer='c2')               # d
    read(c, ['q'], 2, consumer='c1')               # e, z
    requeue(c, 'q', [(0, e)])                      # e stays parked
    c.delete(K.wake('q'))
    assert reclaim(c, 'q') == (4, ['-'] * 4)
    h = b(HOLDER)
    assert pel(c, K.stream('q', 0), 'q') == {a: (h, 1), bb: (h, 2), d: (h, 1), e: (h, 1)}
    assert pel(c, K.stream('q', 9), 'q') == {z: (h, 1)}
    assert ids(c, K.stream('q', 0)) == [a, bb, d, e]  # not copied
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert size(c, 'q') == 5
    assert [[(x[2], x[3]) for x in got] for got in read_all(c, ['q'], 10, consumer='c3')] == [
        [(a, 2)], [(bb, 3)], [(d, 2)], [(e, 2)], [(z, 2)]]  # each alone: delivered before


def test_reclaim_leaves_held_entries_alone(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'x')
    read(c, ['q'], 1)
    requeue(c, 'q', [(0, m)])
    c.delete(K.wake('q'))
    time.sleep(0.05)
    assert reclaim(c, 'q') == (0, ['-'] * 4)
    assert pel(c, K.stream('q', 0), 'q') == {m: (b(HOLDER), 1)}
    assert idle(c, K.stream('q', 0), 'q')[m] >= 50  # not even re-claimed by the holder
    assert marker(c, 'q') == []  # nothing reclaimed, so no wake-up


def test_reclaim_leaves_entries_idle_less_than_min_idle(script_client):
    c = script_client
    declare(c, 'q')
    old = publish(c, 'q', b'old')
    read(c, ['q'], 1, consumer='c1')
    new = publish(c, 'q', b'new')
    read(c, ['q'], 1, consumer='c2')
    age(c, 'q', [(0, old, 'c1')])
    c.delete(K.wake('q'))
    assert reclaim(c, 'q', min_idle=LEASE) == (1, ['-'] * 4)
    assert pel(c, K.stream('q', 0), 'q') == {old: (b(HOLDER), 1), new: (b'c2', 1)}
    assert marker(c, 'q') == [(b'w', 0.0)]
    c.delete(K.wake('q'))
    assert reclaim(c, 'q', min_idle=LEASE) == (0, ['-'] * 4)
    assert pel(c, K.stream('q', 0), 'q') == {old: (b(HOLDER), 1), new: (b'c2', 1)}
    assert marker(c, 'q') == []


def test_reclaim_sweep_gives_back_stale_leases_of_a_live_consumer(script_client):
    """A live consumer can own a message whose lease ran out (a read reply it never got):
    the sweep finds it, a page per stream and call, whatever the consumer's own idle time.
    Real servers only: fakeredis derives a consumer's idle time from the entries it owns, so
    taking its stale entries away makes it look stopped (Redis keeps the time of its last
    command)."""
    c = script_client
    if isinstance(c, FakeRedis):
        pytest.skip('fakeredis: consumer idle time follows its entries (see docstring)')
    declare(c, 'q')
    m = [publish(c, 'q', b'%d' % i) for i in range(5)]
    read(c, ['q'], 5, consumer='c1')
    age(c, 'q', [(0, i, 'c1') for i in m])
    x = publish(c, 'q', b'x')
    read(c, ['q'], 1, consumer='c1')  # c1 is alive: its idle time starts again
    br, pages, cursors = broker(c), [], None
    for _ in range(4):  # budget 8 over 4 streams: pages of 2
        done = br.reclaim('q', LEASE, 8, cursors)
        cursors = done.cursors
        pages.append((done.moved, done.more, cursors[0], cursors[1:]))
    s = [i.decode() for i in m]
    assert pages == [(2, False, s[1], ['-'] * 3), (2, False, s[3], ['-'] * 3),
                     (1, False, x.decode(), ['-'] * 3), (0, False, '-', ['-'] * 3)]
    assert 0 < done.next_ms <= LEASE  # when c1's own lease could run out
    h = b(HOLDER)
    assert pel(c, K.stream('q', 0), 'q') == {**{i: (h, 1) for i in m}, x: (b'c1', 1)}
    assert marker(c, 'q') == [(b'w', 0.0)]


def test_reclaim_finds_a_stopped_consumer_through_its_own_pel(script_client):
    """A consumer idle for a whole lease has renewed nothing: all it owns comes back, in
    calls of at most the budget (more says call again), without looking at other PELs.
    'dead' waits out the lease for real (no command sets a consumer's idle time); 'alive'
    and its message are touched in each call's own transaction, so they never look old."""
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', b'%d' % i) for i in range(5)]
    read(c, ['q'], 5, consumer='dead')
    time.sleep(STOP_MS / 1000)
    live = publish(c, 'q', b'live')
    read(c, ['q'], 1, consumer='alive')
    alive = [keep_entry('q', 0, live, 'alive')]
    first = reclaim_after(c, alive, 'q', STOP_MS, 3)
    assert (first.moved, first.more) == (3, True)
    assert 0 < first.next_ms <= STOP_MS  # 'alive' holds a lease that has not run out
    second = reclaim_after(c, alive, 'q', STOP_MS, 3, first.cursors)
    assert (second.moved, second.more) == (2, False)
    h = b(HOLDER)
    assert pel(c, K.stream('q', 0), 'q') == {**{i: (h, 1) for i in m}, live: (b'alive', 1)}
    assert reclaim_after(c, alive, 'q', STOP_MS, 3).moved == 0
    ack(c, 'q', [(0, live)])
    assert broker(c).reclaim('q', STOP_MS, 3).next_ms == -1  # nobody holds anything


def test_reclaim_forgets_idle_consumers_that_own_nothing(script_client):
    """c2, c3 and the holder wait out the expiry for real (no command sets a consumer's
    idle time); c4 is seen in each call's own transaction, so it never looks idle."""
    c = script_client
    declare(c, 'q')
    key = K.stream('q', 0)
    a, bb, h = publish(c, 'q', b'a'), publish(c, 'q', b'b'), publish(c, 'q', b'h')
    read(c, ['q'], 1, consumer='c1')                  # c1 keeps a
    read(c, ['q'], 1, consumer='c2')
    ack(c, 'q', [(0, bb)])                             # c2 owns nothing
    read(c, ['q'], 1, consumer='c3')
    requeue(c, 'q', [(0, h)])                          # c3 owns nothing
    read(c, ['q'], 1, consumer='c2')
    ack(c, 'q', [(0, h)])                              # the holder owns nothing
    time.sleep(STOP_MS / 1000)
    k = publish(c, 'q', b'k')
    read(c, ['q'], 1, consumer='c4')
    ack(c, 'q', [(0, k)])                              # c4: seen just now, owns nothing
    c4 = [keep_consumer(c, 'q', 0, 'c4')]
    everyone = {b'c1': 1, b'c2': 0, b'c3': 0, b'c4': 0, b(HOLDER): 0}
    assert consumers(c, key, 'q') == everyone

    def call(lease, expiry):
        done = reclaim_after(c, c4, 'q', lease, 100, expiry=expiry)
        return done.moved, done.cursors

    assert call(LEASE, expiry=0) == (0, ['-'] * 4)
    assert consumers(c, key, 'q') == everyone          # expiry 0: nobody is removed
    assert call(LEASE, expiry=STOP_MS) == (0, ['-'] * 4)
    assert consumers(c, key, 'q') == {b'c1': 1, b'c4': 0, b(HOLDER): 0}
    # c1 died: its message is reclaimed, and then c1 owns nothing and goes too
    assert call(0, expiry=STOP_MS) == (1, ['-'] * 4)
    assert consumers(c, key, 'q') == {b'c4': 0, b(HOLDER): 1}
    assert pel(c, key, 'q') == {a: (b(HOLDER), 1)}


def test_reclaim_without_streams_or_group(script_client):
    c = script_client
    assert reclaim(c, 'q', expiry=1) == (0, ['-'] * 4)
    publish(c, 'q', b'x', level=3)  # a stream without a group
    assert reclaim(c, 'q', expiry=1) == (0, ['-'] * 4)
    assert c.xinfo_groups(K.stream('q', 3)) == []
    assert sorted(c.keys('*')) == sorted([b(K.stream('q', 3)), b(K.wake('q')),
                                          b(K.ready('q'))])


# -- renew -------------------------------------------------------------------------------------


def test_renew_resets_idle_and_keeps_delivery_count(script_client):
    c = script_client
    declare(c, 'q')
    key = K.stream('q', 0)
    a, z = publish(c, 'q', b'a'), publish(c, 'q', b'z', level=9)
    read(c, ['q'], 1)
    requeue(c, 'q', [(0, a)])
    read(c, ['q'], 2)                                   # a (2nd delivery, alone)
    read(c, ['q'], 2)                                   # z
    age(c, 'q', [(0, a, 'c1'), (9, z, 'c1')])           # both past the lease
    assert renew(c, 'q', 'c1', [(0, a)]) == []
    assert idle(c, key, 'q')[a] < LEASE
    assert idle(c, K.stream('q', 9), 'q')[z] >= 2 * LEASE
    assert pel(c, key, 'q') == {a: (b'c1', 2)}
    assert pel(c, K.stream('q', 9), 'q') == {z: (b'c1', 1)}
    # the renewed lease survives a reclaim that takes the stale one
    assert reclaim(c, 'q', min_idle=LEASE) == (1, ['-'] * 4)
    assert pel(c, key, 'q') == {a: (b'c1', 2)}
    assert pel(c, K.stream('q', 9), 'q') == {z: (b(HOLDER), 1)}


def test_renew_reports_lost_leases_and_never_takes_them_back(script_client):
    c = script_client
    declare(c, 'q')
    key = K.stream('q', 0)
    a, bb, d, e, f = (publish(c, 'q', p) for p in (b'a', b'b', b'd', b'e', b'f'))
    read(c, ['q'], 1, consumer='c1')
    reclaim(c, 'q')                                    # c1 stalled: a is given to c2
    read(c, ['q'], 1, consumer='c2')
    read(c, ['q'], 4, consumer='c1')                   # b, d, e, f
    ack(c, 'q', [(0, bb)])                             # acked meanwhile
    requeue(c, 'q', [(0, d)])                          # parked again
    c.xdel(key, e)                                     # deleted (its PEL record stays)
    entries = [(0, a), (0, bb), (0, d), (0, e), (0, f)]
    assert renew(c, 'q', 'c1', entries) == [(key, a), (key, bb), (key, d), (key, e)]
    left = pel(c, key, 'q')
    left.pop(e, None)  # Redis 7 drops the PEL record of a deleted entry on XCLAIM; 6.2 keeps it
    assert left == {a: (b'c2', 2), d: (b(HOLDER), 1), f: (b'c1', 1)}
    assert renew(c, 'q', 'c2', [(0, a)]) == []
    assert renew(c, 'q', 'c3', [(0, a), (0, f)]) == [(key, a), (key, f)]
    assert pel(c, key, 'q')[a] == (b'c2', 2)


def test_renew_after_queue_deleted_reports_everything_lost(script_client):
    c = script_client
    declare(c, 'q')
    a, z = publish(c, 'q', b'a'), publish(c, 'q', b'z', level=9)
    read(c, ['q'], 2)
    delete(c, 'q')
    assert renew(c, 'q', 'c1', [(0, a), (9, z)]) == [(K.stream('q', 0), a),
                                                     (K.stream('q', 9), z)]
    assert c.keys('*') == []
    again = publish(c, 'q', b'again', level=9)         # recreated by a producer, no group
    assert renew(c, 'q', 'c1', [(9, again)]) == [(K.stream('q', 9), again)]
    assert c.xinfo_groups(K.stream('q', 9)) == []


# -- redrive -----------------------------------------------------------------------------------


def _dead_letters(c, queue, plan):
    """Publish, deliver and dead-letter one message per (payload, level), in plan order."""
    sent = [(publish(c, queue, p, level=lv), lv) for p, lv in plan]
    read(c, [queue], len(plan))
    for entry_id, lv in sent:
        assert deadletter(c, queue, lv, entry_id, 'rejected', 1) == 1
    return [e for e, _ in dead(c, queue)]


def test_redrive_moves_dead_letters_back_oldest_first(script_client):
    c = script_client
    declare(c, 'q')
    _dead_letters(c, 'q', [(b'y', 3), (b'b', 0), (b'x', 3), (b'd', 9)])
    c.delete(K.wake('q'))
    assert redrive(c, 'q', 10) == (4, 0, 0)
    assert c.xlen(K.dlq('q')) == 0
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert [f for _, f in c.xrange(K.stream('q', 3))] == [{b'm': b'y'}, {b'm': b'x'}]
    got = read(c, ['q'], 10, limit=1)
    assert [(d[1], d[3], d[4]) for d in got] == [(0, 1, b'b'), (3, 1, b'y'), (3, 1, b'x'),
                                                 (9, 1, b'd')]
    assert c.xlen(K.dlq('q')) == 0


def test_redrive_count_and_ids(script_client):
    c = script_client
    declare(c, 'q')
    dl = _dead_letters(c, 'q', [(b'p%d' % i, 0) for i in range(5)])
    key = K.stream('q', 0)

    def ready():
        return [f[b'm'] for _, f in c.xrange(key)]

    assert redrive(c, 'q', 2) == (2, 0, 0)
    assert ready() == [b'p0', b'p1']
    assert redrive(c, 'q', 10, ids=[dl[4], dl[2]]) == (2, 0, 0)  # in the order given
    assert ready() == [b'p0', b'p1', b'p4', b'p2']
    assert redrive(c, 'q', 10, ids=[dl[0], b'1-1']) == (0, 0, 0)  # gone or never there
    assert redrive(c, 'q', 10, ids=[dl[3], dl[3]]) == (1, 0, 0)   # moved once, not twice
    assert ready() == [b'p0', b'p1', b'p4', b'p2', b'p3']
    assert c.xlen(K.dlq('q')) == 0
    assert redrive(c, 'q', 10) == (0, 0, 0)


def test_redrive_count_limits_moves_given_by_id(script_client):
    c = script_client
    declare(c, 'q')
    dl = _dead_letters(c, 'q', [(b'p%d' % i, 0) for i in range(3)])
    assert redrive(c, 'q', 1, ids=[dl[2], dl[0]]) == (1, 0, 0)
    assert [f[b'm'] for _, f in c.xrange(K.stream('q', 0))] == [b'p2']
    assert [e for e, _ in dead(c, 'q')] == [dl[0], dl[1]]
    assert redrive(c, 'q', 0) == (0, 0, 0)


def test_redrive_skips_and_keeps_letters_it_cannot_place(script_client):
    c = script_client
    declare(c, 'q')
    c.xadd(K.stream('q', 0), {b'x': b'1'})
    read(c, ['q'], 1)                                  # malformed: dead letter without f:m
    dlq = K.dlq('q')
    base = {b'reason': b'r', b'group': b'q', b'id': b'1-1', b'deliveries': b'1', b'f:m': b'p'}
    c.xadd(dlq, {**base, b'stream': b(K.stream('other', 0))})  # another queue's stream
    c.xadd(dlq, {**base, b'stream': b(K.stream('q', 5))})      # not one of q's levels
    c.xadd(dlq, base)                                          # no stream at all
    good = _dead_letters(c, 'q', [(b'good', 6)])[-1]
    before = dead(c, 'q')
    c.delete(K.wake('q'))
    assert redrive(c, 'q', 10) == (1, 4, 0)
    assert dead(c, 'q') == [e for e in before if e[0] != good]
    assert [f for _, f in c.xrange(K.stream('q', 6))] == [{b'm': b'good'}]
    assert c.keys('*other*') == [] and c.exists(K.stream('q', 5)) == 0
    assert marker(c, 'q') == [(b'w', 0.0)]
    c.delete(K.wake('q'))
    assert redrive(c, 'q', 10) == (0, 4, 0)
    assert marker(c, 'q') == []  # nothing moved, no wake-up
    assert dead(c, 'q') == [e for e in before if e[0] != good]


def test_redrive_after_delivery_limit_starts_counting_again(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'again', level=3)
    read(c, ['q'], 1, limit=1)
    requeue(c, 'q', [(3, m)])
    assert read(c, ['q'], 1, limit=1) == []
    assert redrive(c, 'q', 1) == (1, 0, 0)
    [(_, new, n, payload)] = [d[1:] for d in read(c, ['q'], 5, limit=1)]
    assert (n, payload) == (1, b'again') and sid(new) > sid(m)
    assert c.xlen(K.dlq('q')) == 0


def test_redrive_to_a_deleted_queue_recreates_its_stream(script_client):
    c = script_client
    declare(c, 'q')
    _dead_letters(c, 'q', [(b'x', 9)])
    delete(c, 'q')                                     # the dead letters stay
    assert redrive(c, 'q', 5) == (1, 0, 0)
    assert [f for _, f in c.xrange(K.stream('q', 9))] == [{b'm': b'x'}]
    assert [d[4] for d in read(c, ['q'], 5)] == [b'x']  # read creates the group lazily



# -- ready index -------------------------------------------------------------------------------


def test_ready_index_follows_publish_read_requeue(script_client):
    c = script_client
    declare(c, 'q')
    assert not c.exists(K.ready('q'))  # made by the first read, which walks every stream
    m = publish(c, 'q', b'a', level=3)
    assert c.smembers(K.ready('q')) == {b(K.stream('q', 3))}
    assert len(read(c, ['q'], 5)) == 1
    assert c.smembers(K.ready('q')) == {b''}  # walked: complete, nothing ready
    requeue(c, 'q', [(3, m)])
    assert c.smembers(K.ready('q')) == {b'', b'h:' + b(K.stream('q', 3))}
    publish(c, 'q', b'b', level=6)
    assert [d[4] for d in read(c, ['q'], 1)] == [b'a']  # delivered alone: more may be held
    assert c.smembers(K.ready('q')) == {b'', b'h:' + b(K.stream('q', 3)), b(K.stream('q', 6))}
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert [d[4] for d in read(c, ['q'], 5)] == [b'b']
    assert c.smembers(K.ready('q')) == {b''}
    assert marker(c, 'q') == []


def test_read_looks_only_at_indexed_streams(script_client):
    c = script_client
    queues = [f'q{i}' for i in range(20)]
    levels = list(range(10))
    for q in queues:
        declare(c, q, levels)
    read(c, queues, 10, levels=levels)  # the walk: makes every index complete
    for q in queues:
        assert c.smembers(K.ready(q)) == {b''}
    broker(c, levels).publish('q7', 4, b'x')
    broker(c, levels).publish('q3', 9, b'y')
    before = _calls(c)
    hints = {(q, None): 2 for q in queues}  # sizes known, as a channel learns them
    got = read_messages(broker(c, levels), queues, 'c1', 10, hints=hints)
    after = _calls(c)
    assert [(d.queue, d.level, d.payload) for d in got] == [('q7', 4, b'x'), ('q3', 9, b'y')]
    if before is not None:
        ran = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        ran.pop('info', None)
        # one SMEMBERS and one ZREM per queue; one HMGET (x-rate-limit) per queue with work
        # served; XREADGROUP on the two indexed streams only
        assert ran.pop('smembers') == 20 and ran.pop('zrem') == 20 and ran.pop('hmget') == 2
        assert ran == {'evalsha': 1, 'xreadgroup': 2, 'srem': 2}


def test_read_walks_again_when_the_index_is_lost_or_asked_to(script_client):
    c = script_client
    declare(c, 'q')
    read(c, ['q'], 1)
    publish(c, 'q', b'a', level=0)
    c.delete(K.ready('q'))  # evicted, or written by an older version
    c.xadd(K.stream('q', 6), {'m': b'b'})  # a publisher that does not know the index
    assert [d[4] for d in read(c, ['q'], 1)] == [b'a']
    # not read, so not looked into: the walk names both parts of a non-empty stream (and
    # level 0 stays named: COUNT was filled there, so more may be ready)
    assert c.smembers(K.ready('q')) == {b'', b(K.stream('q', 0)), b(K.stream('q', 6)),
                                        b'h:' + b(K.stream('q', 6))}
    assert [d[4] for d in read(c, ['q'], 5)] == [b'b']
    c.xadd(K.stream('q', 9), {'m': b'c'})  # not indexed, index complete: not seen...
    assert read(c, ['q'], 5) == []
    got = read_messages(broker(c), ['q'], 'c1', 5, walk=True)  # ...until a walk
    assert [d.payload for d in got] == [b'c']
    check_ready_index(c, 'q')


def test_read_of_an_indexed_stream_without_group_makes_it(script_client):
    c = script_client
    declare(c, 'q')
    read(c, ['q'], 1)
    c.xgroup_destroy(K.stream('q', 3), 'q')
    publish(c, 'q', b'a', level=3)
    assert [d[4] for d in read(c, ['q'], 5)] == [b'a']
    assert b'q' in groups(c, K.stream('q', 3))
    c.delete(K.stream('q', 3))
    c.sadd(K.ready('q'), K.stream('q', 3))  # names a stream that is gone
    assert read(c, ['q'], 5) == []
    assert c.smembers(K.ready('q')) == {b''}
    assert not c.exists(K.stream('q', 3))


def test_read_of_missing_queue_makes_no_index(script_client):
    c = script_client
    assert read(c, ['nope'], 5) == []
    assert c.keys('*') == []


def test_ready_index_expires_with_the_queue(script_client):
    c = script_client
    declare(c, 'q')
    read(c, ['q'], 1)
    assert broker(c).touch('q', 5000) == 5  # 4 streams and the index
    assert 0 < c.pttl(K.ready('q')) <= 5000
    c.delete(K.ready('q'))
    publish(c, 'q', b'x')  # a new index takes the queue's expiry
    assert 0 < c.pttl(K.ready('q')) <= 5000
    read(c, ['q'], 5)  # the walk adds the complete member, keeping the expiry
    assert c.smembers(K.ready('q')) == {b''}
    assert 0 < c.pttl(K.ready('q')) <= 5000


def test_reclaim_and_redrive_index_what_they_bring_back(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'a', level=6)
    read(c, ['q'], 5)
    assert c.smembers(K.ready('q')) == {b''}
    assert reclaim(c, 'q', min_idle=0)[0] == 1
    assert c.smembers(K.ready('q')) == {b'', b'h:' + b(K.stream('q', 6))}
    got = read(c, ['q'], 5, limit=1)  # over the delivery limit: dead-lettered
    assert got == [] and len(dead(c, 'q')) == 1
    assert c.smembers(K.ready('q')) == {b''}
    assert redrive(c, 'q', 5) == (1, 0, 0)
    assert c.smembers(K.ready('q')) == {b'', b(K.stream('q', 6))}
    assert [d[4] for d in read(c, ['q'], 5)] == [b'a']
    assert m not in ids(c, K.stream('q', 6))  # a redriven letter is a new entry

# -- properties --------------------------------------------------------------------------------

_publishes = st.lists(st.tuples(st.sampled_from(['a', 'b', 'c']), st.sampled_from(LEVELS)),
                      max_size=25)


@PROPERTY
@given(plan=_publishes, counts=st.lists(st.integers(1, 7), min_size=1, max_size=5),
       declared=st.booleans())
def test_property_read_order_is_level_queue_publish(script_client, plan, counts, declared):
    c = script_client
    c.flushall()
    queues = ['a', 'b', 'c']
    if declared:
        for q in queues:
            declare(c, q)
    sent = []
    for n, (q, lv) in enumerate(plan):
        sent.append((lv, queues.index(q), n, publish(c, q, b'%d' % n, level=lv)))
    assert sum(size(c, q) for q in queues) == len(plan)
    got = []
    i = 0
    while True:
        count = counts[i % len(counts)]
        i += 1
        batch = read(c, queues, count)
        assert len(batch) <= count
        got += batch
        if len(batch) < count:
            break
    assert [(d[2], d[4]) for d in got] == [(eid, b'%d' % n) for _, _, n, eid in sorted(sent)]
    assert all(d[3] == 1 for d in got)
    assert all(marker(c, q) == [] for q in queues)


@PROPERTY
@given(ops=st.lists(st.tuples(st.sampled_from(['pub', 'read', 'ack', 'requeue', 'purge']),
                              st.integers(0, 3), st.integers(1, 4)), max_size=30))
def test_property_size_and_redelivery_model(script_client, ops):
    """A model of ready/in-flight messages agrees with size, read, ack, requeue and purge."""
    c = script_client
    c.flushall()
    declare(c, 'q')
    # messages are (level, id): ids of different levels may be equal
    ready: set[tuple[int, bytes]] = set()      # waiting (fresh or requeued)
    inflight: set[tuple[int, bytes]] = set()   # delivered, unacked
    counts: dict[tuple[int, bytes], int] = {}  # deliveries so far
    for op, lv_i, n in ops:
        if op == 'pub':
            ready.add((LEVELS[lv_i], publish(c, 'q', b'x', level=LEVELS[lv_i])))
        elif op == 'read':
            want = []
            for m in sorted(ready, key=lambda m: (m[0], sid(m[1]))):
                if len(want) == n:
                    break
                if counts.get(m):  # delivered before: served alone, first in a read
                    if not want:
                        want.append(m)
                    break
                want.append(m)
            got = read(c, ['q'], n)
            assert [(d[1], d[2]) for d in got] == want
            for _, lv, eid, deliveries, _ in got:
                counts[lv, eid] = counts.get((lv, eid), 0) + 1
                assert deliveries == counts[lv, eid]
                ready.remove((lv, eid))
                inflight.add((lv, eid))
        elif op in ('ack', 'requeue') and inflight:
            chosen = sorted(inflight, key=lambda m: (sid(m[1]), m[0]))[:n]
            if op == 'ack':
                assert ack(c, 'q', chosen) == len(chosen)
            else:
                assert requeue(c, 'q', chosen) == len(chosen)
                ready.update(chosen)
            inflight.difference_update(chosen)
        elif op == 'purge':
            total, more = 0, 1
            while more:
                purged, more = purge(c, 'q', batch=n)
                total += purged
            assert total == len(ready)
            ready.clear()
        assert size(c, 'q') == len(ready)
        assert sum(c.xlen(k) for k in K.streams('q', LEVELS)) == len(ready) + len(inflight)
        check_ready_index(c, 'q')


@settings(PROPERTY, max_examples=100)
@given(ops=st.lists(st.tuples(st.sampled_from(['pub', 'pub', 'read', 'read', 'ack', 'requeue']),
                              st.integers(0, 2), st.integers(0, 3),
                              st.lists(st.sampled_from('rpmw'), min_size=3, max_size=3),
                              st.integers(1, 2)), min_size=5, max_size=40))
def test_property_read_modes_keep_the_wake_invariant(script_client, ops):
    """Reads of three queues in any mix of modes (a read, a popped marker, gated on the
    marker, a walk), with COUNT often running out before the last ones: after every step a
    queue with ready work has its wake marker, and the ready index names that work. A read in
    mode 'p' follows a real pop of the marker, as the poller does."""
    c = script_client
    c.flushall()
    queues = ['a', 'b', 'd']
    for q in queues:
        declare(c, q)
    inflight: list[tuple[str, int, bytes]] = []
    for op, qi, lv_i, modes, n in ops:
        q = queues[qi]
        if op == 'pub':
            publish(c, q, b'x', level=LEVELS[lv_i])
        elif op == 'read':
            mode_of = {}
            for queue, mode in zip(queues, modes):
                if mode == 'p' and not c.zpopmin(K.wake(queue)):
                    mode = 'r'  # nothing to pop: a plain read
                mode_of[(queue, None)] = mode
            (script, keys, args), parse = broker(c).read_call(
                Broker.sources(queues), 'c1', n, modes=mode_of)
            result = parse(script(c, keys, args))
            assert result.problems == [] and result.aside == []
            inflight += [(d.queue, d.level, d.entry_id) for d in result.deliveries]
        elif op in ('ack', 'requeue') and inflight:
            chosen = [m for m in inflight if m[0] == q][:n]
            entries = [(lv, eid) for _, lv, eid in chosen]
            if op == 'ack':
                assert ack(c, q, entries) == len(chosen)
            else:
                assert requeue(c, q, entries) == len(chosen)
            inflight = [m for m in inflight if m not in chosen]
        for queue in queues:
            check_ready_index(c, queue)


def _accounting(c, queue):
    """Every payload held by ``queue``: its stream entries (ready or pending) and dead letters.

    Also checks that no entry is stranded: an entry at or before the group's last-delivered
    id that is not in the PEL would never be delivered again.
    """
    found = []
    for lv in LEVELS:
        key = K.stream(queue, lv)
        entries = c.xrange(key)
        found += [f[b'm'] for _, f in entries]
        last = groups(c, key).get(b(queue), b'0-0') if c.exists(key) else b'0-0'
        pending = set(pel(c, key, queue)) if c.exists(key) else set()
        assert pending <= {e for e, _ in entries}, 'PEL record of a missing entry'
        stranded = [e for e, _ in entries if sid(e) <= sid(last) and e not in pending]
        assert stranded == [], f'delivered, not pending, never coming back: {stranded}'
    found += [f.get(b'f:m') for _, f in dead(c, queue)]
    return found


_crash_ops = st.lists(
    st.tuples(st.sampled_from(['pub', 'read', 'ack', 'ackall', 'requeue', 'crash', 'reclaim',
                               'renew', 'reject', 'redrive']),
              st.integers(0, 2), st.integers(0, 3), st.integers(1, 4)),
    max_size=30)


@PROPERTY
@given(ops=_crash_ops)
def test_property_crashes_and_reclaims_lose_and_duplicate_nothing(script_client, ops):
    """Ready + pending + dead payloads are always exactly the published ones minus the acked."""
    c = script_client
    c.flushall()
    declare(c, 'q')
    published: list[bytes] = []
    acked: set[bytes] = set()
    # what each consumer believes it holds: (level, id) -> payload
    holding: dict[str, dict[tuple[int, bytes], bytes]] = {f'c{i}': {} for i in range(3)}
    cursors = None
    for op, who, x, n in ops:
        me = f'c{who}'
        mine = holding[me]
        chosen = sorted(mine, key=lambda m: (sid(m[1]), m[0]))[x:x + n]
        if op == 'pub':
            payload = b'%d' % len(published)
            published.append(payload)
            publish(c, 'q', payload, level=LEVELS[x])
        elif op == 'read':
            for _, lv, eid, deliveries, payload in read(c, ['q'], n, consumer=me,
                                                        limit=(0, 2)[x % 2]):
                assert payload not in acked and deliveries >= 1
                mine[lv, eid] = payload
        elif op == 'ack':
            for m in chosen:
                if ack(c, 'q', [m]) == 1:
                    assert mine[m] not in acked
                    acked.add(mine[m])
                del mine[m]
        elif op == 'ackall':  # one call, some ids perhaps stale (reclaimed, acked elsewhere)
            stale = [(lv, eid) for lv, eid in mine if x == 0]  # also ids acked already
            pending = {(lv, eid) for lv, eid in set(chosen) | set(stale)
                       if eid in pel(c, K.stream('q', lv), 'q')}
            assert ack(c, 'q', chosen + stale) == len(pending)
            for m in pending:
                assert mine[m] not in acked
                acked.add(mine[m])
            for m in chosen:
                del mine[m]
        elif op == 'requeue':
            requeue(c, 'q', chosen)
            for m in chosen:
                del mine[m]
        elif op == 'reject':
            for lv, eid in chosen:
                deadletter(c, 'q', lv, eid, 'rejected', 1)
                del mine[lv, eid]
        elif op == 'crash':
            mine.clear()  # its PEL records stay until someone reclaims them
        elif op == 'reclaim':
            _, cursors = reclaim(c, 'q', min_idle=0, batch=n, cursors=cursors, expiry=x % 2)
        elif op == 'renew':
            lost = renew(c, 'q', me, list(mine))
            for stream, eid in lost:
                del mine[LEVELS[K.streams('q', LEVELS).index(stream)], eid]
            for lv, eid in mine:
                assert pel(c, K.stream('q', lv), 'q')[eid][0] == b(me)
        elif op == 'redrive':
            redrive(c, 'q', n)
        found = _accounting(c, 'q')
        assert sorted(found) == sorted(p for p in published if p not in acked)
        check_ready_index(c, 'q')
    # and everything left can still be delivered, exactly once
    reclaim(c, 'q', min_idle=0, batch=1000)
    redrive(c, 'q', 1000)
    left = [p for got in read_all(c, ['q'], 1000, consumer='last') for p in payloads(got)]
    assert sorted(left) == sorted(p for p in published if p not in acked)


# -- registry: loading, NOSCRIPT, pipelines, errors, headers -------------------------------------


def test_noscript_after_flush_reloads(script_client):
    c = script_client
    first = publish(c, 'q', b'1')
    sha = SCRIPTS['publish'].sha
    assert c.script_exists(sha) == [True]
    c.script_flush()
    assert c.script_exists(sha) == [False]
    with pytest.raises(NoScriptError):
        c.evalsha(sha, 2, K.stream('q', 0), K.wake('q'), b'raw')
    second = publish(c, 'q', b'2')
    assert c.script_exists(sha) == [True]
    assert ids(c, K.stream('q', 0)) == [first, second]  # the failed EVALSHA wrote nothing


def test_run_calls_reruns_only_noscript(script_client):
    c = script_client
    c.script_flush()
    c.script_load(SCRIPTS['publish'].source)  # publish is loaded, declare is not
    calls = [
        (SCRIPTS['publish'], *broker(c).publish_call('q', 0, b'one')[1:]),
        broker(c).declare_call('q'),
        (SCRIPTS['publish'], *broker(c).publish_call('q', 0, b'two')[1:]),
        broker(c).declare_call('r'),
    ]
    results = run_calls(c, calls)
    assert results[1] == 4 and results[3] == 4
    assert [(e, f[b'm']) for e, f in c.xrange(K.stream('q', 0))] == [
        (results[0], b'one'), (results[2], b'two')]
    assert c.script_exists(SCRIPTS['declare'].sha) == [True]
    # a second run needs no reload and returns the replies in order
    assert run_calls(c, [(SCRIPTS['size'], K.streams('q', LEVELS), ['q', HOLDER])]) == [2]


def test_run_calls_raises_key_type_error(script_client):
    c = script_client
    c.set(K.stream('q', 0), b'not a stream')
    call = broker(c).publish_call('q', 0, b'x')
    with pytest.raises(KeyTypeError, match=r'ks:q:\{q\}:0'):
        run_calls(c, [call])


# For each script: (key to occupy with a string, call) -- the call must meet WRONGTYPE.
_WRONGTYPE = {
    'publish': (K.stream('q', 0), lambda c: publish(c, 'q', b'x')),
    'publish-marker': (K.wake('q'), lambda c: publish(c, 'q', b'x')),
    'publish-delayed': (K.delayed('q'), lambda c: broker(c).publish(
        'q', 0, b'x', delay=Delay('+5000', 0, ''))),
    'cancel': (K.delayed('q'), lambda c: broker(c).cancel('q', ['t1'])),
    'cancel-messages': (K.delayed_messages('q'), lambda c: broker(c).cancel('q', ['t1'])),
    'scheduled': (K.delayed('q'), lambda c: broker(c).scheduled('q')),
    'purge-delayed': (K.delayed_messages('q'), lambda c: purge(c, 'q')),
    'inspect': (K.stream('q', 3), lambda c: broker(c).inspect('q')),
    'inspect-dlq': (K.dlq('q'), lambda c: broker(c).inspect('q')),
    'peek': (K.stream('q', 3), lambda c: broker(c).peek('q')),
    'leave': (K.stream('q', 3), lambda c: broker(c).leave([('q', None)], 'c1')),
    'inspect_fanout': (K.fanout('x'), lambda c: broker(c).inspect_fanout('x')),
    'bind': (K.bindings('x'), lambda c: broker(c).bind('x', 'rk', 0)),
    'bind-deadlines': (K.deadlines('x'), lambda c: broker(c).bind('x', 'rk', 1000)),
    'route': (K.bindings('x'), lambda c: broker(c).route('x')),
    'bind-fanout': (K.fanout('x'), lambda c: fbind(c, 'q', ex='x')),
    'bind-unbind': (K.fanout('x'), lambda c: fbind(c, 'q', -1, ex='x')),
    'route-fanout': (K.fanout('x'), lambda c: (_expired_by_hand(c), froute(c, ex='x'))),
    'fanout_publish': (K.fanout('x'), lambda c: fpublish(c, b'x', ['q'], ex='x')),
    'fanout_publish-marker': (K.fanout_wake('x', 'q'),
                              lambda c: (_fanout_group_by_hand(c),
                                         fpublish(c, b'x', ['q'], ex='x'))),
    'fanout_publish-deadlines': (K.deadlines('x'),
                                 lambda c: (_fanout_group_by_hand(c),
                                            fpublish(c, b'x', ['q'], ex='x'))),
    'fanout_ack': (K.fanout('x'), lambda c: fack(c, 'q', [b'1-1'], ex='x')),
    'deadletter-fanout': (K.fanout('x'), lambda c: fdeadletter(c, 'q', b'1-1', 'r', 1, ex='x')),
    'declare': (K.stream('q', 6), lambda c: declare(c, 'q')),
    'limits': (K.args('q'), lambda c: broker(c).limits('q')),
    'ack': (K.stream('q', 0), lambda c: ack(c, 'q', [(0, b'1-1')])),
    'ack-big': (K.big('q'), lambda c: broker(c).ack('q', [(K.stream('q', 0), b'1-1')])),
    'publish-big': (K.big('q'), lambda c: broker(c).publish_big('q', 0, b'{"x": 1}')),
    'dlq_purge': (K.big('q'), lambda c: broker(c).purge_dead_letters('q', '1-1')),
    'requeue': (K.stream('q', 0), lambda c: requeue(c, 'q', [(0, b'1-1')])),
    'size': (K.stream('q', 9), lambda c: size(c, 'q')),
    'purge': (K.stream('q', 3), lambda c: purge(c, 'q')),
    'delete': (K.dlq('q'), lambda c: delete(c, 'q')),
    'deadletter': (K.stream('q', 0), lambda c: deadletter(c, 'q', 0, b'1-1', 'r', 1)),
    'reclaim': (K.stream('q', 3), lambda c: reclaim(c, 'q')),
    'reclaim-marker': (K.wake('q'), lambda c: (_stalled_by_hand(c), reclaim(c, 'q'))),
    'renew': (K.stream('q', 0), lambda c: renew(c, 'q', 'c1', [(0, b'1-1')])),
    'redrive': (K.dlq('q'), lambda c: redrive(c, 'q', 10)),
    'redrive-stream': (K.stream('q', 6), lambda c: (_letter_by_hand(c, 6), redrive(c, 'q', 10))),
    'redrive-marker': (K.wake('q'), lambda c: (_letter_by_hand(c, 0), redrive(c, 'q', 10))),
    'migrate': ('kq', lambda c: broker(c).migrate_list('kq', 'q', 0, 5)),
    'migrate-stream': (K.stream('q', 6), lambda c: (_kombu_list_by_hand(c),
                                                     broker(c).migrate_list('kq', 'q', 0, 5))),
    'migrate-marker': (K.wake('q'), lambda c: (_kombu_list_by_hand(c),
                                               broker(c).migrate_list('kq', 'q', 0, 5))),
    'migrate_unacked': ('unacked', lambda c: _migrate_unacked(c)),
    'migrate_unacked-stream': (K.stream('r', 0), lambda c: _migrate_unacked(c)),
    'migrate_unacked-marker': (K.wake('r'), lambda c: _migrate_unacked(c)),
    'touch': (K.wake('q'), lambda c: broker(c).touch('q', 5000)),
    'wake': (K.fanout_wake('x', 'q'), lambda c: broker(c).give_back([('q', None), ('q', 'x')])),
}


def _kombu_list_by_hand(c):
    """Kombu's list kq holding an invalid entry (oldest) and a message of priority 6: the
    WRONGTYPE cases check that both are still there afterwards."""
    c.rpush('kq', b'{"body": "", "properties": {"priority": 6}}', b'junk')


def _migrate_unacked(c):
    """Restore tag t to queues q and r; the WRONGTYPE cases check nothing moved."""
    hash_ok = c.type('unacked') in (b'none', b'hash')  # the case where it is another type
    if hash_ok:
        c.hset('unacked', 't', 'v')
    try:
        broker(c).migrate_unacked('unacked', 'unacked_index', 't', 'v', 'P', [('q', 0), ('r', 0)])
    finally:
        assert c.xlen(K.stream('q', 0)) == 0
        assert not hash_ok or c.hget('unacked', 't') == b'v'


def _stalled_by_hand(c):
    """A pending entry of q made with plain commands (the scripts would touch the marker)."""
    key = K.stream('q', 0)
    c.xadd(key, {b'm': b'x'})
    c.xgroup_create(key, 'q', '0')
    c.xreadgroup('q', 'c1', {key: '>'})


def _expired_by_hand(c):
    """A binding of q to fanout exchange x whose deadline has passed (bind.lua would fail)."""
    c.sadd(K.bindings('x'), member('q'))
    c.zadd(K.deadlines('x'), {member('q'): 1})


def _fanout_group_by_hand(c):
    """q's group on fanout exchange x, made with plain commands."""
    c.xgroup_create(K.fanout('x'), 'q', '$', mkstream=True)


def _letter_by_hand(c, level):
    c.xadd(K.dlq('q'), {b'reason': b'r', b'stream': b(K.stream('q', level)), b'f:m': b'x'})


@pytest.mark.parametrize('case', sorted(_WRONGTYPE))
def test_wrong_type_key_raises_key_type_error(script_client, case):
    c = script_client
    key, call = _WRONGTYPE[case]
    declare(c, 'other')
    c.set(key, b'someone else')
    with pytest.raises(KeyTypeError) as info:
        call(c)
    text = str(info.value)
    assert key in text and 'WRONGTYPE' in text
    assert f"script {case.split('-')[0]!r}" in text
    assert c.get(key) == b'someone else'


@pytest.mark.parametrize('part', ['stream', 'marker', 'index', 'dlq'])
def test_read_wrong_type_key_is_a_problem_of_its_queue_only(script_client, part):
    """Another program's key at one of queue 'bad''s names: the read reports it against
    'bad' (naming the key), serves the healthy queue 'ok' around it, and strands nothing."""
    c = script_client
    declare(c, 'bad')
    declare(c, 'ok')
    publish(c, 'bad', b'good')  # level 0, read before the broken level 3
    publish(c, 'ok', b'ok', level=9)
    junk = c.xadd(K.stream('bad', 0), {'x': 'no m field'})  # to be set aside
    key = {'stream': K.stream('bad', 3), 'marker': K.wake('bad'), 'index': K.ready('bad'),
           'dlq': K.dlq('bad')}[part]
    c.delete(key)
    c.set(key, b'someone else')
    sources = Broker.sources(['bad', 'ok'])
    (script, keys, args), parse = broker(c).read_call(
        sources, 'c1', 10, modes={s: 'w' for s in sources})
    result = parse(script(c, keys, args))
    assert c.get(key) == b'someone else'
    assert [(src, 'WRONGTYPE' in err and key in err) for src, err in result.problems] \
        == [(('bad', None), True)] * len(result.problems) and result.problems
    assert result.status[('bad', None)] == 'e'
    got = {d.payload for d in result.deliveries}
    assert b'ok' in got
    if part == 'index':
        assert got == {b'ok'}  # 'bad' was not opened: nothing taken from it
        assert pel(c, K.stream('bad', 0), 'bad') == {}
    else:
        assert b'good' in got
    if part == 'dlq':  # not lost, not stuck with c1: parked until a lease has passed
        assert pel(c, K.stream('bad', 0), 'bad')[junk][0] == b'~unfiled'
    delivered = {d.entry_id for d in result.deliveries}
    for level in LEVELS:  # everything c1 owns was handed to it
        if part == 'stream' and level == 3:
            continue
        owned = {i for i, (who, _) in pel(c, K.stream('bad', level), 'bad').items()
                 if who == b'c1'}
        assert owned <= delivered


def test_bind_checks_every_key_before_writing(script_client):
    """A fanout exchange whose stream name holds another type: the binding is not recorded
    (the routing table and deadlines stay as they were), so no copy is routed to a queue
    whose group could not be made."""
    c = script_client
    c.set(K.fanout('x'), b'someone else')
    with pytest.raises(KeyTypeError):
        fbind(c, 'q', 1000, ex='x')
    assert not c.exists(K.bindings('x')) and not c.exists(K.deadlines('x'))


def test_every_script_is_tested_for_wrong_type():
    # read reports it per source instead of failing (its own test above); layout's key is a
    # string, so the case above is a foreign value there (test_layout_* below); marked only
    # asks EXISTS, so a foreign key counts as set and the read then reports it (tests of
    # the Cluster waits); every key of every call: tests/test_types_first.py
    assert ({case.split('-')[0] for case in _WRONGTYPE} | {'read', 'layout', 'marked'}
            == set(SCRIPTS))


def test_layout_is_recorded_once_and_reported(script_client):
    c = script_client
    b = broker(c)
    b.check_layout()
    assert c.get(K.layout()) == str(LAYOUT).encode()
    b.check_layout()  # the same version: fine, nothing rewritten
    Broker(c, Keys('app:'), LEVELS).check_layout()
    assert c.get('app:ks:layout') == str(LAYOUT).encode()  # each prefix has its own


@pytest.mark.parametrize('found, says', [
    (b'4', "key layout '4'"),
    (b'someone else', "key layout 'someone else'"),
])
def test_layout_of_another_version_stops_the_client(script_client, found, says):
    c = script_client
    c.set(K.layout(), found)
    with pytest.raises(LayoutMismatch) as info:
        broker(c).check_layout()
    assert says in str(info.value) and f'layout {LAYOUT}' in str(info.value)
    assert c.get(K.layout()) == found  # left as it was


def test_layout_key_of_another_type_is_named(script_client):
    c = script_client
    c.rpush(K.layout(), b'x')
    with pytest.raises(LayoutMismatch, match='another program uses this name'):
        broker(c).check_layout()
    assert c.lrange(K.layout(), 0, -1) == [b'x']


def test_scripts_load_with_their_sha(script_client):
    for script in SCRIPTS.values():
        assert script_client.script_load(script.source) == script.sha


def test_lua_lines_fit_100_columns():
    """The Lua sources follow the Python line length (ruff's 100): read side by side."""
    long = [f'{p.name}:{n}' for p in sorted(lua_dir().rglob('*.lua'))
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 100]
    assert long == []


@pytest.mark.parametrize('name', sorted(SCRIPTS))
def test_script_header_and_flattening(name):
    script = SCRIPTS[name]
    header = script.header
    assert header.startswith(f'{name}:')
    for word in ('KEYS', 'ARGV', 'Reply', 'Minimum Redis'):
        assert word in header, f'{name}.lua header lacks {word}'
    assert not re.search(r'^--@include', script.source, re.M)
    raw = (lua_dir() / f'{name}.lua').read_text()
    if '--@include common' in raw:
        assert '-- begin include common' in script.source
        if 'check_args(' in raw:  # what a script calls is defined in its flat text
            assert 'local function check_args(' in script.source
    assert script.source.count('--[[') == 1  # one header, nothing else starts a block comment


def test_registry_covers_every_lua_file():
    names = {p.stem for p in lua_dir().glob('*.lua')}
    assert set(SCRIPTS) == names == {
        'ack', 'bind', 'deadletter', 'declare', 'delete', 'fanout_ack', 'fanout_publish',
        'inspect', 'inspect_fanout', 'publish', 'purge', 'read', 'reclaim', 'redrive', 'renew',
        'requeue', 'route', 'size', 'touch', 'migrate', 'migrate_unacked', 'cancel',
        'scheduled', 'peek', 'layout', 'wake', 'marked', 'leave', 'dlq_purge', 'limits'}
    assert load_all() == SCRIPTS


# -- publish to bound queues, bindings with deadlines, x-expires (bind, route, touch) ----------


def test_routed_publish_never_recreates_a_deleted_queue(script_client):
    c = script_client
    assert broker(c).publish('gone', 3, b'x', routed=True) is None
    assert c.keys(b'*gone*') == []
    declare(c, 'here')
    entry = broker(c).publish('here', 3, b'x', routed=True)
    assert ids(c, K.stream('here', 3)) == [entry]
    assert marker(c, 'here') == [(b'w', 0.0)]
    # the default exchange creates the queue, as Kombu's Redis transport does
    assert broker(c).publish('fresh', 0, b'y') is not None
    assert c.xlen(K.stream('fresh', 0)) == 1


def _calls(c):
    """Commands Redis ran so far, by name (real servers only; None on fakeredis)."""
    try:
        stats = c.info('commandstats')
    except Exception:
        return None
    return {k[len('cmdstat_'):]: v['calls'] for k, v in stats.items()} if stats else None


def test_routed_publish_to_an_existing_level_needs_no_lookup(script_client):
    c = script_client
    declare(c, 'q')
    c.delete(K.stream('q', 3))  # the first stream still says the queue exists
    assert broker(c).publish('q', 3, b'a', routed=True) is not None
    before = _calls(c)
    assert broker(c).publish('q', 3, b'b', routed=True) is not None
    after = _calls(c)
    assert c.xlen(K.stream('q', 3)) == 2
    if before is not None:
        ran = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        ran.pop('info', None)
        # TYPE: the index, written after the XADD (the marker's ZADD comes first and fails
        # alone, and is undone if the XADD after it fails); the first stream is only asked
        # its TTL; HMGET: the queue's arguments (no limit)
        assert ran == {'evalsha': 1, 'type': 1, 'xadd': 1, 'zadd': 1, 'sadd': 1, 'hmget': 1}


def test_publish_keeps_the_expiry_of_a_set_marker(script_client):
    c = script_client
    declare(c, 'q')
    broker(c).touch('q', 5000)
    publish(c, 'q', b'x')
    c.pexpire(K.wake('q'), 3000)  # as touch.lua would refresh it
    publish(c, 'q', b'y')
    assert 0 < c.pttl(K.wake('q')) <= 3000
    c.delete(K.wake('q'))  # popped by a consumer: the next publish sets it anew
    publish(c, 'q', b'z')
    assert 3000 < c.pttl(K.wake('q')) <= 5000

def test_marker_of_an_expiring_queue_expires_with_it(script_client):
    c = script_client
    declare(c, 'q')
    assert broker(c).touch('q', 5000) == 4  # the streams; the marker does not exist yet
    publish(c, 'q', b'x')
    assert 0 < c.pttl(K.wake('q')) <= 5000
    read(c, ['q'], 1)
    requeue(c, 'q', [(0, ids(c, K.stream('q', 0))[0])])
    assert 0 < c.pttl(K.wake('q')) <= 5000
    declare(c, 'forever')
    publish(c, 'forever', b'x')
    assert c.pttl(K.wake('forever')) == -1


def test_touch_sets_expiry_on_existing_keys_only(script_client):
    c = script_client
    declare(c, 'q', levels=[0, 3])
    assert broker(c, [0, 3]).touch('q', 2000) == 2
    assert all(0 < c.pttl(k) <= 2000 for k in K.streams('q', [0, 3]))
    assert c.exists(K.wake('q')) == 0


def test_bind_route_and_deadlines(script_client):
    c = script_client
    b_ = broker(c)
    assert b_.bind('ex', 'rk\x06\x16\x06\x16a', 0) == 1
    assert b_.bind('ex', 'rk\x06\x16\x06\x16a', 0) == 0
    assert b_.bind('ex', 'rk\x06\x16\x06\x16b', 60_000) == 1
    assert c.zscore(K.deadlines('ex'), 'rk\x06\x16\x06\x16b') is not None
    assert sorted(b_.route('ex')) == [b'rk\x06\x16\x06\x16a', b'rk\x06\x16\x06\x16b']
    assert b_.bind('ex', 'rk\x06\x16\x06\x16c', 1) == 1  # expires in 1 ms
    import time
    time.sleep(0.01)
    assert sorted(b_.route('ex')) == [b'rk\x06\x16\x06\x16a', b'rk\x06\x16\x06\x16b']
    assert c.zscore(K.deadlines('ex'), 'rk\x06\x16\x06\x16c') is None
    # a permanent re-bind clears the deadline; removal drops both records
    assert b_.bind('ex', 'rk\x06\x16\x06\x16b', 0) == 0
    assert c.zscore(K.deadlines('ex'), 'rk\x06\x16\x06\x16b') is None
    assert b_.bind('ex', 'rk\x06\x16\x06\x16a', -1) == 1
    assert b_.bind('ex', 'rk\x06\x16\x06\x16a', -1) == 0
    assert b_.route('ex') == [b'rk\x06\x16\x06\x16b']


def test_route_sweeps_a_bounded_number(script_client):
    c = script_client
    b_ = broker(c)
    for i in range(5):
        b_.bind('ex', f'm{i}', 1)
    import time
    time.sleep(0.01)
    assert len(b_.route('ex', sweep=2)) == 3
    assert len(b_.route('ex', sweep=2)) == 1
    assert b_.route('ex', sweep=2) == []


def test_route_reads_a_large_table_in_bounded_pages(script_client):
    """A routing table of unknown size is read in SSCAN pages, one call each; expired
    bindings are dropped only as the first page is read."""
    c = script_client
    b_ = broker(c)
    members = {f'rk{i}{SEP}{SEP}q{i}'.encode() for i in range(300)}
    c.sadd(K.bindings('ex'), *members)
    assert sorted(b_.route('ex', page=50)) == sorted(members)
    (script, keys, args), pages, cursor = b_.route_call('ex', page=50), [], '0'
    while True:
        cursor, *found = script(c, keys, [*args[:1], cursor, *args[2:]])
        pages.append(found)
        if cursor in (b'0', 0):
            break
    assert len(pages) >= 3 and max(len(p) for p in pages) <= 100
    c.zadd(K.deadlines('ex'), {b'rk0' + b(SEP) + b(SEP) + b'q0': 1})  # past its deadline
    script(c, keys, [args[0], b'1', *args[2:]])  # a later page: nothing dropped
    assert c.sismember(K.bindings('ex'), b'rk0' + b(SEP) + b(SEP) + b'q0')
    assert len(b_.route('ex', page=50)) == 299


# -- fanout exchanges: one stream, one group per bound queue (bind, route, fanout_publish, read,
#    fanout_ack, requeue, reclaim, deadletter) --------------------------------------------------


def test_bind_creates_group_at_new_messages(script_client):
    c = script_client
    fan = K.fanout('ex')
    assert fbind(c, 'b') == 1
    assert groups(c, fan) == {b'b': b'0-0'}
    early = fpublish(c, b'early', ['b'])
    assert fbind(c, 'a') == 1
    assert groups(c, fan) == {b'a': early, b'b': b'0-0'}  # starts at new messages
    late = fpublish(c, b'late', ['a', 'b'])
    assert fread(c, 'a', 10) == [(late, 1, b'late')]
    assert fread(c, 'b', 10) == [(early, 1, b'early'), (late, 1, b'late')]
    # binding again keeps the group where it is
    assert fbind(c, 'a') == 0
    assert groups(c, fan) == {b'a': late, b'b': late}
    assert fread(c, 'a', 10) == []
    assert pel(c, fan, 'a') == {late: (b'c1', 1)}


def test_fanout_two_groups_each_receive_every_message_once(script_client):
    c = script_client
    fan, m = two_groups(c, 3)
    assert ids(c, fan) == m  # stored once
    assert fmarker(c, 'a') == fmarker(c, 'b') == [(b'w', 0.0)]
    for q in ('a', 'b'):
        got = fread_all(c, q, 2, consumer=f'{q}1')
        assert got == [[(m[0], 1, b'0'), (m[1], 1, b'1')], [(m[2], 1, b'2')]]
        assert pel(c, fan, q) == {i: (b(f'{q}1'), 1) for i in m}
        assert fmarker(c, q) == []
    assert fmarker(c, 'a') == fmarker(c, 'b') == []
    # the queues' own streams are untouched
    assert c.keys('*ks:q:*') == []


def test_fanout_offline_group_keeps_entries_until_it_acks(script_client):
    c = script_client
    fan, m = two_groups(c, 3)  # b's consumers are offline: its group reads nothing for a while
    assert [x[0] for x in fread(c, 'a', 10)] == m
    assert fack(c, 'a', m) == 3
    assert ids(c, fan) == m  # b has not read them: nothing is trimmed
    assert [x[0] for x in fread(c, 'b', 10)] == m
    assert fack(c, 'b', m[:2]) == 2
    assert ids(c, fan) == m[2:]
    assert fack(c, 'b', m[2:]) == 1
    assert fack(c, 'b', m[2:]) == 0  # twice is harmless
    assert ids(c, fan) == []  # every group is done with every entry: none remains
    n = fpublish(c, b'n', ['a', 'b'])
    for q in ('a', 'b'):
        assert [x[0] for x in fread(c, q, 10)] == [n]
        assert fack(c, q, [n]) == 1
    assert ids(c, fan) == []  # and so on: the stream holds only what some group needs


def test_fanout_pending_entry_is_never_trimmed(script_client):
    c = script_client
    fan, m = two_groups(c, 5)
    fread(c, 'a', 10)
    fread(c, 'b', 10)
    assert fack(c, 'b', m) == 5
    assert fack(c, 'a', [m[0], m[2], m[3], m[4]]) == 4  # a still holds m1
    assert ids(c, fan) == m[1:]
    assert frequeue(c, 'a', [m[1]]) == 1  # parked under the holder: still pending
    assert fack(c, 'b', m) == 0
    assert ids(c, fan) == m[1:]
    assert fread(c, 'a', 10, consumer='c2') == [(m[1], 2, b'1')]
    assert ids(c, fan) == m[1:]
    assert fack(c, 'a', [m[1]]) == 1
    assert ids(c, fan) == []  # no group needs any entry now


def test_fanout_requeue_returns_entry_to_its_group_first(script_client):
    c = script_client
    fan, m = two_groups(c, 3)
    assert [x[0] for x in fread(c, 'a', 2)] == m[:2]
    for q in ('a', 'b'):
        c.delete(K.fanout_wake('ex', q))
    assert frequeue(c, 'a', [m[0]]) == 1
    assert pel(c, fan, 'a') == {m[0]: (b(HOLDER), 1), m[1]: (b'c1', 1)}
    assert pel(c, fan, 'b') == {}
    assert fmarker(c, 'a') == [(b'w', 0.0)]
    assert fmarker(c, 'b') == []  # the other group is not disturbed
    assert c.keys('*ks:q:*') == []
    # served first, alone (delivered before), with its delivery count
    assert fread(c, 'a', 10, consumer='c2') == [(m[0], 2, b'0')]
    assert fread(c, 'a', 10, consumer='c2') == [(m[2], 1, b'2')]
    assert frequeue(c, 'a', [b'1-1']) == 0  # never delivered: nothing to give back
    # b reads each message once, fresh
    assert fread(c, 'b', 10) == [(i, 1, b'%d' % n) for n, i in enumerate(m)]
    assert ids(c, fan) == m


def test_fanout_reclaim_returns_entries_to_their_group_first(script_client):
    c = script_client
    fan, m = two_groups(c, 3)
    fread(c, 'a', 2, consumer='c1')     # c1 dies holding m0, m1
    fread(c, 'b', 3, consumer='b1')     # b's consumer is alive and holds all three
    fack(c, 'a', [m[1]])
    for q in ('a', 'b'):
        c.delete(K.fanout_wake('ex', q))
    assert freclaim(c, 'a') == (1, ['-'])
    assert pel(c, fan, 'a') == {m[0]: (b(HOLDER), 1)}
    assert pel(c, fan, 'b') == {i: (b'b1', 1) for i in m}  # the other group's leases stay
    assert fmarker(c, 'a') == [(b'w', 0.0)]
    assert fmarker(c, 'b') == []
    assert [[x[:2] for x in got] for got in fread_all(c, 'a', 10, consumer='c2')] == [
        [(m[0], 2)], [(m[2], 1)]]
    assert ids(c, fan) == m


def test_fanout_deadletter_acks_for_one_group_only(script_client):
    c = script_client
    fan, m = two_groups(c, 2)
    fread(c, 'a', 10)
    assert fack(c, 'a', [m[1]]) == 1
    # a rejects m0: set aside for a, not deleted (b has not read it)
    assert fdeadletter(c, 'a', m[0], 'rejected', 1) == 1
    [(_, fields)] = dead(c, 'a')
    assert fields == {b'reason': b'rejected', b'stream': b(fan), b'group': b'a', b'id': m[0],
                      b'deliveries': b'1', b'f:m': b'0'}
    assert pel(c, fan, 'a') == {}
    assert ids(c, fan) == m
    assert fdeadletter(c, 'a', m[0], 'again', 1) == 0  # no longer a's: no duplicate letter
    assert len(dead(c, 'a')) == 1
    assert fread(c, 'b', 10) == [(m[0], 1, b'0'), (m[1], 1, b'1')]
    assert fdeadletter(c, 'b', m[0], 'rejected', 1) == 1
    assert [f[b'group'] for _, f in dead(c, 'b')] == [b'b']
    # every group is done with m0: trimmed (without waiting for another ack)
    assert ids(c, fan) == m[1:]
    assert fack(c, 'b', [m[1]]) == 1
    assert ids(c, fan) == []  # every group is done with m1 too


def test_fanout_malformed_entry_is_dead_lettered_by_each_group(script_client):
    c = script_client
    fan, _ = two_groups(c, 0)
    bad = c.xadd(fan, {b'x': b'1'})
    good = fpublish(c, b'good', ['a', 'b'])
    assert fread(c, 'a', 10) == [(good, 1, b'good')]
    [(_, fields)] = dead(c, 'a')
    assert fields == {b'reason': b'malformed: no m field', b'stream': b(fan), b'group': b'a',
                      b'id': bad, b'deliveries': b'1', b'f:x': b'1'}
    assert pel(c, fan, 'a') == {good: (b'c1', 1)}
    assert ids(c, fan) == [bad, good]  # b still has its copy
    # entry sizes known (one batch): b has read past bad when it sets it aside
    assert fread(c, 'b', 10, hints={('b', 'ex'): 10}) == [(good, 1, b'good')]
    [(_, fields)] = dead(c, 'b')
    assert (fields[b'group'], fields[b'id']) == (b'b', bad)
    assert ids(c, fan) == [good]  # both set it aside: trimmed
    assert fack(c, 'a', [good]) == fack(c, 'b', [good]) == 1
    assert ids(c, fan) == []  # every group is done with it


def test_fanout_unbind_destroys_group_and_trims(script_client):
    c = script_client
    fan, m = two_groups(c, 3)
    fread(c, 'a', 1)  # a holds m0 and has not read the rest
    fread(c, 'b', 10)
    fack(c, 'b', m)
    assert ids(c, fan) == m
    assert fbind(c, 'a', -1) == 1
    assert groups(c, fan) == {b'b': m[2]}
    assert c.smembers(K.bindings('ex')) == {b(member('b'))}
    assert ids(c, fan) == []  # b is done with m2: the stream is empty
    assert fbind(c, 'a', -1) == 0  # again: harmless
    assert fread(c, 'a', 10) == []  # never recreated by a read
    assert groups(c, fan) == {b'b': m[2]}
    # the last group gone, nothing is kept, and a publish adds nothing
    assert fbind(c, 'b', -1) == 1
    assert groups(c, fan) == {}
    assert c.xlen(fan) == 0
    assert fpublish(c, b'late', ['b']) is None
    assert c.xlen(fan) == 0


def test_fanout_route_sweep_destroys_expired_group(script_client):
    c = script_client
    fan = K.fanout('ex')
    fbind(c, 'gone', ttl_ms=1)
    fbind(c, 'a.b')  # a queue name with a dot; the member's routing key holds the separator
    c.srem(K.bindings('ex'), member('a.b'))
    assert broker(c).bind('ex', member('a.b', routing_key=f'x{SEP}y'), 0,
                          fanout_group='a.b') == 1
    m = [fpublish(c, b'%d' % i, ['gone', 'a.b']) for i in range(2)]
    fread(c, 'a.b', 10)
    fack(c, 'a.b', m)
    assert ids(c, fan) == m  # held back by the expired queue's group
    time.sleep(0.01)
    assert froute(c) == [b(member('a.b', routing_key=f'x{SEP}y'))]
    assert groups(c, fan) == {b'a.b': m[1]}
    assert c.zrange(K.deadlines('ex'), 0, -1) == []
    assert ids(c, fan) == []  # a.b is done with both
    assert froute(c) == [b(member('a.b', routing_key=f'x{SEP}y'))]  # nothing more to sweep


def test_fanout_route_sweep_of_the_last_group_empties_the_stream(script_client):
    c = script_client
    fan = K.fanout('ex')
    fbind(c, 'gone', ttl_ms=1)
    fpublish(c, b'x', ['gone'])
    time.sleep(0.01)
    assert froute(c) == []
    assert groups(c, fan) == {} and c.xlen(fan) == 0
    assert fpublish(c, b'y', ['gone']) is None


def test_fanout_publish_without_groups_adds_nothing(script_client):
    c = script_client
    assert fpublish(c, b'x', ['a']) is None
    assert c.keys('*') == []  # neither the stream nor a marker
    c.xadd(K.fanout('ex'), {b'm': b'old'})  # a stream with no group (all unbound)
    assert fpublish(c, b'x', ['a']) is None
    assert c.xlen(K.fanout('ex')) == 1
    assert c.exists(K.fanout_wake('ex', 'a')) == 0


def test_fanout_markers_of_expiring_bindings_get_a_ttl(script_client):
    c = script_client
    fbind(c, 'brief', ttl_ms=5000)
    fbind(c, 'forever')
    assert fpublish(c, b'x', ['brief', 'forever']) is not None
    assert fmarker(c, 'brief') == fmarker(c, 'forever') == [(b'w', 0.0)]
    assert 0 < c.pttl(K.fanout_wake('ex', 'brief')) <= 5000
    assert c.pttl(K.fanout_wake('ex', 'forever')) == -1
    # the deadline moves with the binding's refresh
    fbind(c, 'brief', ttl_ms=60_000)
    fpublish(c, b'y', ['brief', 'forever'])
    assert 5000 < c.pttl(K.fanout_wake('ex', 'brief')) <= 60_000


def test_fanout_ack_after_unbind_is_harmless(script_client):
    c = script_client
    fbind(c, 'a')
    fbind(c, 'b')
    m = fpublish(c, b'x', ['a', 'b'])
    fread(c, 'a', 1)
    fbind(c, 'a', -1)
    assert fack(c, 'a', [m]) == 0
    assert ids(c, K.fanout('ex')) == [m]  # b has not read it
    assert fdeadletter(c, 'a', m, 'rejected', 1) == 0  # nothing filed for a gone group
    assert c.exists(K.dlq('a')) == 0
    assert fack(c, 'a', [m], ex='never-bound') == 0
    assert c.exists(K.fanout('never-bound')) == 0
    assert ids(c, K.fanout('ex')) == [m]


_fanout_ops = st.lists(
    st.tuples(st.sampled_from(['pub', 'pub', 'bind', 'read', 'ack', 'requeue', 'crash',
                               'reclaim']),
              st.integers(0, 2), st.integers(0, 2), st.integers(1, 4)),
    max_size=40)


@PROPERTY
@given(n_groups=st.integers(2, 3), bound_first=st.integers(1, 3), ops=_fanout_ops)
def test_property_fanout_groups_each_get_every_message_once(script_client, n_groups,
                                                            bound_first, ops):
    """Each group gets each message published while it was bound once (again only after a
    requeue or reclaim, then counted), the stream keeps whatever a group has not acked, and
    once every group acked everything at most one entry is left."""
    c = script_client
    c.flushall()
    fan = K.fanout('ex')
    queues = ['g0', 'g1', 'g2'][:n_groups]
    bound: list[str] = []
    payload_of: dict[bytes, bytes] = {}
    expected = {q: set() for q in queues}   # ids published while q was bound
    acked = {q: set() for q in queues}
    count = {q: {} for q in queues}         # id -> deliveries so far, per group
    owed = {q: set() for q in queues}       # requeued or reclaimed: may come again
    # what each consumer of each group believes it holds (may be stale after a reclaim)
    holding = {(q, k): set() for q in queues for k in range(3)}

    def bind_(q):
        assert fbind(c, q) == 1
        bound.append(q)

    def take(q, got, mine):
        for eid, deliveries, payload in got:
            assert q in bound and eid in expected[q] and eid not in acked[q]
            assert payload == payload_of[eid]
            before = count[q].get(eid, 0)
            if before:  # a redelivery: only of what was given back, flagged by its count
                assert eid in owed[q]
                owed[q].discard(eid)
            count[q][eid] = before + 1
            assert deliveries == before + 1
            mine.add(eid)

    def ack_(q, eid):
        if fack(c, q, [eid]) == 1:
            assert eid not in acked[q]
            acked[q].add(eid)

    for q in queues[:min(bound_first, n_groups)]:
        bind_(q)
    for op, gi, who, n in ops:
        q = queues[gi % n_groups]
        mine = holding[q, who]
        chosen = sorted(mine, key=sid)[:n]
        if op == 'pub':
            payload = b'%d' % len(payload_of)
            entry = fpublish(c, payload, bound)
            assert entry is not None  # at least one queue is bound from the start
            payload_of[entry] = payload
            for g in bound:
                expected[g].add(entry)
        elif op == 'bind' and q not in bound:
            bind_(q)
        elif op == 'read':
            got = fread(c, q, n, consumer=f'c{who}')
            if q not in bound:
                assert got == []
            take(q, got, mine)
        elif op == 'ack':
            for eid in chosen:
                ack_(q, eid)
                mine.discard(eid)
        elif op == 'requeue' and chosen:
            pending = set(pel(c, fan, q))
            assert frequeue(c, q, chosen) == len(pending.intersection(chosen))
            owed[q].update(pending.intersection(chosen))
            mine.difference_update(chosen)
        elif op == 'crash':
            mine.clear()  # its PEL records stay until a reclaim
        elif op == 'reclaim' and q in bound:
            pending = pel(c, fan, q)
            leased = [i for i in pending if pending[i][0] != b(HOLDER)]
            moved, _ = freclaim(c, q, batch=n)  # lease 0: every consumer counts as stopped
            assert moved == min(n, len(leased))
            now = pel(c, fan, q)
            stalled = [i for i in leased if now[i][0] == b(HOLDER)]
            assert len(stalled) == moved
            owed[q].update(stalled)
        # no group's unacked message is ever trimmed away
        left = set(ids(c, fan))
        for g in bound:
            assert expected[g] - acked[g] <= left, f'{g} lost a message'
    # every group, drained by one last consumer, ends up with exactly its messages
    for q in bound:
        owed[q].update(pel(c, fan, q))
        freclaim(c, q, batch=1000)
        last = set()
        for got in fread_all(c, q, 1000, consumer='last'):
            take(q, got, last)
        for eid in sorted(last, key=sid):
            ack_(q, eid)
        assert acked[q] == expected[q]
        assert pel(c, fan, q) == {}
    assert c.xlen(fan) <= 1
    assert set(ids(c, fan)) <= set(payload_of)


class _AnyCursor:
    """Equal to any cursor a reclaim call may return."""

    def __eq__(self, other):
        return isinstance(other, str)


ANY_CURSOR = _AnyCursor()


def test_acks_ride_inside_a_read(script_client):
    """read.lua acks (XACK + XDEL) the entries it is given before it reads, in the same call;
    an id acked twice is harmless."""
    c = script_client
    declare(c, 'q')
    first = publish(c, 'q', b'a', level=3)
    publish(c, 'q', b'b', level=3)
    assert payloads(read(c, ['q'], 1)) == [b'a']
    sources = Broker.sources(['q'])
    for _ in range(2):
        (script, keys, args), parse = broker(c).read_call(
            sources, 'c1', 1, acks=[(K.stream('q', 3), first)])
        result = parse(script(c, keys, args))
    assert [d.payload for d in result.deliveries] == []  # 'b' went to the first of the two
    assert c.xrange(K.stream('q', 3), first, first) == []  # acked and deleted
    assert c.xpending(K.stream('q', 3), 'q')['pending'] == 1  # 'b', delivered, not acked


def test_a_read_trims_a_fanout_stream_once_however_many_it_sets_aside(redis_client):
    """A read that sets many entries of a fanout stream aside trims it once, at its end: the
    trim is O(groups), and per set-aside entry it made a read O(COUNT x groups)."""
    c = redis_client
    for q in ('a', *(f'g{i}' for i in range(20))):
        fbind(c, q)
    fan = K.fanout('ex')
    for _ in range(30):
        c.xadd(fan, {'junk': 'no m field'})  # not a message: a read sets it aside

    def xinfo_calls():  # Redis 7 counts XINFO GROUPS as cmdstat_xinfo|groups
        stats = c.info('commandstats')
        return sum(v['calls'] for k, v in stats.items() if k.startswith('cmdstat_xinfo'))

    before = xinfo_calls()
    assert fread(c, 'a', 50) == []
    trims = xinfo_calls() - before
    assert c.xlen(K.fanout_dlq('ex', 'a') if K.cluster else K.dlq('a')) == 30
    assert 1 <= trims <= 2, trims  # one trim (XINFO GROUPS), not one per entry (30)
