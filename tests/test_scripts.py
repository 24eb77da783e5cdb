"""Unit tests of every Lua script in ``lua/``, each run on fakeredis, Redis 7.0 and Redis 6.2.

The helpers below call the scripts exactly as ``kombu_streams.channel`` does (same KEYS and
ARGV layout), and the tests check Redis's state afterwards with plain commands, so a test
fails on any difference in what a script stores, deletes or returns.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import NoScriptError

from kombu_streams.broker import HOLDER, Broker
from kombu_streams.keys import Keys
from kombu_streams.scripts import SCRIPTS, KeyTypeError, execute_pipeline, load_all, lua_dir

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
            for d in broker(c, levels).read(queues, consumer, count, limit)]


def ack(c, queue, entries):
    return broker(c).ack(queue, [(K.stream(queue, lv), i) for lv, i in entries])


def requeue(c, queue, entries):
    return broker(c).requeue(queue, [(K.stream(queue, lv), i) for lv, i in entries])


def size(c, queue, levels=LEVELS):
    return broker(c, levels).size(queue)


def purge(c, queue, batch=1000, levels=LEVELS):
    """One purge.lua call (Broker.purge loops until done): [purged, more]."""
    return SCRIPTS['purge'](c, K.streams(queue, levels), [queue, HOLDER, batch])


def delete(c, queue, levels=LEVELS):
    return broker(c, levels).delete(queue)


def deadletter(c, queue, level, entry_id, reason, deliveries):
    return broker(c).dead_letter(queue, K.stream(queue, level), entry_id, reason, deliveries)


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


def marker(c, queue):
    return c.zrange(K.wake(queue), 0, -1, withscores=True)


def groups(c, key):
    return {b(g['name']): b(g['last-delivered-id']) for g in c.xinfo_groups(key)}


def payloads(delivered):
    return [d[4] for d in delivered]


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
    again = read(c, ['q'], 10, consumer='c2')
    assert [(d[1], d[2], d[3]) for d in again] == [
        (0, m[0], 2), (0, m[2], 2), (0, m[3], 1), (9, fresh9, 1)]
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
    assert [(d[2], d[3]) for d in read(c, ['q'], 10)] == [(high, 1), (low, 2)]


def test_read_held_partially_when_count_is_small(script_client):
    c = script_client
    declare(c, 'q')
    m = [publish(c, 'q', b'x') for _ in range(3)]
    read(c, ['q'], 3)
    requeue(c, 'q', [(0, i) for i in m])
    assert [(d[2], d[3]) for d in read(c, ['q'], 2, consumer='c2')] == [(m[0], 2), (m[1], 2)]
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert pel(c, K.stream('q', 0), 'q')[m[2]] == (b(HOLDER), 1)
    assert [(d[2], d[3]) for d in read(c, ['q'], 2, consumer='c2')] == [(m[2], 2)]
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
    good1 = publish(c, 'q', b'good1')
    c.xadd(K.stream('q', 0), {b'other': b''})
    good2 = publish(c, 'q', b'good2')
    c.delete(K.wake('q'))
    assert [d[2] for d in read(c, ['q'], 2)] == [good1]  # COUNT 2 read two entries
    assert marker(c, 'q') == [(b'w', 0.0)]  # so good2 is not stranded
    assert [d[2] for d in read(c, ['q'], 2)] == [good2]
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
    c.delete(K.wake('q'))
    assert len(read(c, ['q'], 2)) == 2  # filled COUNT, one left
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert len(read(c, ['q'], 2)) == 1  # drained
    assert marker(c, 'q') == []
    assert read(c, ['q'], 2) == []
    assert marker(c, 'q') == []


def test_wake_marker_set_for_queues_not_reached(script_client):
    c = script_client
    declare(c, 'a')
    declare(c, 'b')
    publish(c, 'a', b'a')
    publish(c, 'b', b'b', level=9)
    c.delete(K.wake('a'), K.wake('b'))
    assert payloads(read(c, ['a', 'b'], 1)) == [b'a']
    assert marker(c, 'a') == []  # COUNT filled, but with the stream's last entry
    assert marker(c, 'b') == [(b'w', 0.0)]  # never looked at, and not empty
    assert payloads(read(c, ['a', 'b'], 5)) == [b'b']
    assert marker(c, 'a') == [] and marker(c, 'b') == []


def test_wake_marker_removed_after_draining_requeued(script_client):
    c = script_client
    declare(c, 'q')
    m = publish(c, 'q', b'x')
    read(c, ['q'], 1)
    requeue(c, 'q', [(0, m)])
    assert marker(c, 'q') == [(b'w', 0.0)]
    assert [d[2] for d in read(c, ['q'], 2)] == [m]  # the only ready message
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
    assert delete(c, 'q') == 5  # 4 streams + marker
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
            want = sorted(ready, key=lambda m: (m[0], sid(m[1])))[:n]
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


def test_execute_pipeline_reruns_only_noscript(script_client):
    c = script_client
    c.script_flush()
    c.script_load(SCRIPTS['publish'].source)  # publish is loaded, declare is not
    pipe = c.pipeline(transaction=False)
    calls = []

    def add(name, keys, args):
        SCRIPTS[name].queue(pipe, keys, args)
        calls.append((SCRIPTS[name], keys, args))

    add('publish', [K.stream('q', 0), K.wake('q')], [b'one'])
    add('declare', K.streams('q', LEVELS), ['q'])
    add('publish', [K.stream('q', 0), K.wake('q')], [b'two'])
    add('declare', K.streams('r', LEVELS), ['r'])
    results = execute_pipeline(pipe, calls)
    assert results[1] == 4 and results[3] == 4
    assert [(e, f[b'm']) for e, f in c.xrange(K.stream('q', 0))] == [
        (results[0], b'one'), (results[2], b'two')]
    assert c.script_exists(SCRIPTS['declare'].sha) == [True]
    # a second run needs no reload and returns the replies in order
    add2 = [(SCRIPTS['size'], K.streams('q', LEVELS), ['q', HOLDER])]
    SCRIPTS['size'].queue(pipe, *add2[0][1:])
    assert execute_pipeline(pipe, add2) == [2]


def test_execute_pipeline_raises_key_type_error(script_client):
    c = script_client
    c.set(K.stream('q', 0), b'not a stream')
    pipe = c.pipeline(transaction=False)
    call = (SCRIPTS['publish'], [K.stream('q', 0), K.wake('q')], [b'x'])
    SCRIPTS['publish'].queue(pipe, *call[1:])
    with pytest.raises(KeyTypeError, match=r'ks:q:\{q\}:0'):
        execute_pipeline(pipe, [call])


# For each script: (key to occupy with a string, call) -- the call must meet WRONGTYPE.
_WRONGTYPE = {
    'publish': (K.stream('q', 0), lambda c: publish(c, 'q', b'x')),
    'publish-marker': (K.wake('q'), lambda c: publish(c, 'q', b'x')),
    'declare': (K.stream('q', 6), lambda c: declare(c, 'q')),
    'read': (K.stream('q', 3), lambda c: read(c, ['q'], 5)),
    'read-marker': (K.wake('q'), lambda c: read(c, ['q'], 5)),
    'ack': (K.stream('q', 0), lambda c: ack(c, 'q', [(0, b'1-1')])),
    'requeue': (K.stream('q', 0), lambda c: requeue(c, 'q', [(0, b'1-1')])),
    'size': (K.stream('q', 9), lambda c: size(c, 'q')),
    'purge': (K.stream('q', 3), lambda c: purge(c, 'q')),
    'delete': (K.dlq('q'), lambda c: delete(c, 'q')),
    'deadletter': (K.stream('q', 0), lambda c: deadletter(c, 'q', 0, b'1-1', 'r', 1)),
}


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


def test_every_script_is_tested_for_wrong_type():
    assert {case.split('-')[0] for case in _WRONGTYPE} == set(SCRIPTS)


def test_scripts_load_with_their_sha(script_client):
    for script in SCRIPTS.values():
        assert script_client.script_load(script.source) == script.sha


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
        assert 'local function try(' in script.source
    assert script.source.count('--[[') == 1  # one header, nothing else starts a block comment


def test_registry_covers_every_lua_file():
    names = {p.stem for p in lua_dir().glob('*.lua')}
    assert set(SCRIPTS) == names == {
        'ack', 'deadletter', 'declare', 'delete', 'publish', 'purge', 'read', 'requeue', 'size'}
    assert load_all() == SCRIPTS
