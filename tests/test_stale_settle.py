"""A consumer whose lease ran out cannot settle a message another consumer holds now.

A process stopped (SIGSTOP, a GC pause, a frozen network) for longer than its lease comes
back and settles what it held: Celery restores every unacked message at each reconnect.
Meanwhile its messages were reclaimed and another consumer runs them. Every settle names
its consumer and leaves alone what that consumer no longer owns (docs/design.rst, "Leases",
*Only the owner settles*): requeue, dead-letter, ack (ack.lua, fanout_ack.lua, and the acks
riding inside read.lua). Operators settle with ANY_OWNER.

The takeover is driven with XCLAIM (or reclaim.lua with lease 0), never by waiting for a
lease to run out. XCLAIM's IDLE sets the taken entry's idle time to an hour, so a settle
that claimed it again (resetting its idle time) changes the order of idle times.
"""

from __future__ import annotations

import logging

import pytest
import redis
from helpers import read_messages
from kombu import Connection, Exchange, Producer, Queue

from kombu_streams.broker import ANY_OWNER, HOLDER, Broker
from kombu_streams.keys import Keys
from kombu_streams.scripts import KeyTypeError

K = Keys()
LEVELS = [0, 3, 6, 9]
HOUR_MS = 3_600_000
A, B = 'consumer-a', 'consumer-b'
KINDS = ['requeue', 'dead-letter', 'ack', 'riding-ack']


def broker(c):
    return Broker(c, K, LEVELS)


def pel(c, key, group):
    """{id: (consumer, deliveries)} of a stream's PEL."""
    return {p['message_id']: (p['consumer'].decode(), p['times_delivered'])
            for p in c.xpending_range(key, group, min='-', max='+', count=10_000)}


def idle_order(c, key, group):
    """The PEL's ids, longest idle first (ties by id): a claim resets an entry's idle time."""
    rows = c.xpending_range(key, group, min='-', max='+', count=10_000)
    return [p['message_id'] for p in sorted(
        rows, key=lambda p: (-p['time_since_delivered'], p['message_id']))]


def idle_of(c, key, group, entry_id):
    rows = c.xpending_range(key, group, min=entry_id, max=entry_id, count=1)
    return rows[0]['time_since_delivered']


def state(c, key, group, dlq):
    """What a stale settle must not change: the stream, its PEL (the holder's part too),
    the order of idle times, the dead-letter stream."""
    return (c.xrange(key), pel(c, key, group), idle_order(c, key, group),
            [fields for _, fields in c.xrange(dlq)])


def take_over(c, key, group, entry_id, to=B):
    """``to`` takes the entry over, as reclaim and a read by it would; idle an hour."""
    assert c.xclaim(key, group, to, 0, [entry_id], idle=HOUR_MS, justid=True) == [entry_id]


def stolen_queue(c):
    """Queue q: A read x and z, B read y; then B took x over. Returns (x, y, z)."""
    b = broker(c)
    b.declare('q')
    x, z, y = (b.publish('q', 0, m) for m in (b'{"x": 1}', b'{"z": 1}', b'{"y": 1}'))
    assert [d.entry_id for d in read_messages(b, ['q'], A, 2)] == [x, z]
    assert [d.entry_id for d in read_messages(b, ['q'], B, 1)] == [y]
    take_over(c, K.stream('q', 0), 'q', x)
    return x, y, z


def settle(c, kind, consumer, entries, queue='q', exchange=None):
    """Settle (stream key, id) entries as ``consumer``: (settled, left alone). Broker
    methods say the second only in their log line; a read says it in its reply."""
    b = broker(c)
    if kind == 'requeue':
        return b.requeue(queue, entries, exchange, consumer)
    if kind == 'ack':
        return b.ack(queue, entries, exchange, consumer)
    if kind == 'dead-letter':
        return sum(b.dead_letter(queue, stream, entry_id, 'rejected', 1, exchange, consumer)
                   for stream, entry_id in entries)
    assert kind == 'riding-ack' and exchange is None
    (script, keys, args), parse = b.read_call(b.sources([queue]), consumer, 1, acks=entries)
    result = parse(script(c, keys, args))
    assert result.deliveries == []  # nothing is ready: the read only carried the acks
    return result.unsettled


def not_settled(caplog):
    return [r.getMessage() for r in caplog.records if 'not settled' in r.getMessage()]


@pytest.mark.parametrize('kind', KINDS)
def test_stale_settle_leaves_the_new_owner_alone(script_client, kind, caplog):
    c = script_client
    x, y, z = stolen_queue(c)
    key, dlq = K.stream('q', 0), K.dlq('q')
    before = state(c, key, 'q', dlq)
    assert before[1] == {x: (B, 1), y: (B, 1), z: (A, 1)}
    assert before[2][0] == x  # idle an hour: first
    caplog.set_level(logging.WARNING, logger='kombu_streams')
    got = settle(c, kind, A, [(key, x)])
    assert state(c, key, 'q', dlq) == before
    assert idle_of(c, key, 'q', x) >= HOUR_MS  # not claimed again
    assert not c.xpending_range(key, 'q', min='-', max='+', count=10, consumername=HOLDER)
    if kind == 'riding-ack':
        assert got == {('q', None): 1}
        assert not_settled(caplog) == []  # the channel logs a read's (see _learn)
    else:
        assert got == 0
        assert not_settled(caplog) == [
            f"kombu-streams: 1 message of queue 'q' not settled ({kind}): its lease was lost, "
            f"another consumer holds it now"]
    # the owner's settle works
    got = settle(c, kind, B, [(key, x)])
    assert got == ({} if kind == 'riding-ack' else 1)
    if kind == 'requeue':
        assert pel(c, key, 'q')[x] == (HOLDER, 1)
        assert [i for i, _ in c.xrange(key)] == [x, z, y]
    else:
        assert x not in pel(c, key, 'q')
        assert [i for i, _ in c.xrange(key)] == [z, y]
    letters = [f[b'id'] for _, f in c.xrange(dlq)]
    assert letters == ([x] if kind == 'dead-letter' else [])
    assert pel(c, key, 'q').get(z) == (A, 1) and pel(c, key, 'q').get(y) == (B, 1)


@pytest.mark.parametrize('kind', ['requeue', 'ack', 'riding-ack'])
def test_a_settle_takes_its_own_entries_and_leaves_the_rest(script_client, kind):
    """One call with an entry A still owns (z) and one B took (x): z is settled, x is not."""
    c = script_client
    x, y, z = stolen_queue(c)
    key = K.stream('q', 0)
    got = settle(c, kind, A, [(key, x), (key, z)])
    assert got == ({('q', None): 1} if kind == 'riding-ack' else 1)
    owners = pel(c, key, 'q')
    assert owners[x] == (B, 1) and owners[y] == (B, 1)
    if kind == 'requeue':
        assert owners[z] == (HOLDER, 1)
    else:
        assert z not in owners and [i for i, _ in c.xrange(key)] == [x, y]
    assert idle_of(c, key, 'q', x) >= HOUR_MS


@pytest.mark.parametrize('kind', ['requeue', 'dead-letter', 'ack'])
def test_stale_settle_on_a_fanout_group(script_client, kind):
    """The same on a queue's group of a fanout stream (fanout_ack.lua for the ack)."""
    c = script_client
    b = broker(c)
    b.declare('q')
    b.bind('ex', '\x06\x16\x06\x16q', 0, fanout_group='q')
    fan = K.fanout('ex')
    script, keys, args = b.fanout_publish_call('ex', b'{"x": 1}', [('q', '\x06\x16\x06\x16q')])
    x = script(c, keys, args)
    got = read_messages(b, ['q'], A, 1, fanout={'q': ['ex']})
    assert [(d.entry_id, d.exchange) for d in got] == [(x, 'ex')]
    take_over(c, fan, 'q', x)
    dlq = K.fanout_dlq('ex', 'q')
    before = state(c, fan, 'q', dlq)
    assert settle(c, kind, A, [(fan, x)], exchange='ex') == 0
    assert state(c, fan, 'q', dlq) == before
    assert idle_of(c, fan, 'q', x) >= HOUR_MS
    assert settle(c, kind, B, [(fan, x)], exchange='ex') == 1
    assert pel(c, fan, 'q').get(x) == ((HOLDER, 1) if kind == 'requeue' else None)
    assert len(c.xrange(dlq)) == (1 if kind == 'dead-letter' else 0)


@pytest.mark.parametrize('kind', ['requeue', 'ack'])
def test_ownership_is_read_in_pages(script_client, kind):
    """A owns 250 entries; a call for its first, last and one B took pages through A's own
    range (about n + 100 per XPENDING) and finds both of A's."""
    c = script_client
    b = broker(c)
    b.declare('q')
    key = K.stream('q', 0)
    ids = [b.publish('q', 0, b'{"n": %d}' % n) for n in range(250)]
    assert len(read_messages(b, ['q'], A, 250)) == 250
    take_over(c, key, 'q', ids[124])
    assert settle(c, kind, A, [(key, ids[0]), (key, ids[124]), (key, ids[249])]) == 2
    owners = pel(c, key, 'q')
    assert owners[ids[124]] == (B, 1)
    if kind == 'requeue':
        assert owners[ids[0]] == owners[ids[249]] == (HOLDER, 1)
    else:
        assert ids[0] not in owners and ids[249] not in owners
    assert sum(1 for who, _ in owners.values() if who == A) == 247


@pytest.mark.parametrize('kind', ['requeue', 'dead-letter', 'ack'])
def test_operators_settle_whoever_owns_the_entry(script_client, kind):
    c = script_client
    x, y, z = stolen_queue(c)
    key = K.stream('q', 0)
    assert settle(c, kind, ANY_OWNER, [(key, x)]) == 1
    assert pel(c, key, 'q').get(x) == ((HOLDER, 1) if kind == 'requeue' else None)


@pytest.mark.parametrize('consumer,trusted', [(A, False), (A, True), (ANY_OWNER, False)],
                         ids=['consumer', 'trusted', 'any-owner'])
def test_ack_checks_every_stream_type_before_its_first_write(script_client, consumer,
                                                             trusted):
    """An ack of entries in two streams, the second holding another type: nothing acked
    (trusted acks skip the ownership lookup, which is also the type check, so they get a
    TYPE instead when the call spans streams)."""
    c = script_client
    b = broker(c)
    b.declare('q')
    x = b.publish('q', 0, b'{"x": 1}')
    assert [d.entry_id for d in read_messages(b, ['q'], A, 1)] == [x]
    c.delete(K.stream('q', 3))
    c.set(K.stream('q', 3), b'someone else')
    with pytest.raises(KeyTypeError):
        b.ack('q', [(K.stream('q', 0), x, trusted), (K.stream('q', 3), b'1-1', trusted)],
              None, consumer)
    assert pel(c, K.stream('q', 0), 'q') == {x: (A, 1)}
    assert [i for i, _ in c.xrange(K.stream('q', 0))] == [x]


@pytest.mark.parametrize('kind', ['ack', 'riding-ack'])
def test_a_trusted_ack_is_made_without_the_ownership_lookup(script_client, kind):
    """An ack the consumer marks trusted (its lease surely holds: InFlight.surely_held) is
    made without looking the entry up: the flag is what spares the XPENDING. Shown by an
    entry B took over: A's trusted ack acks it (a consumer only trusts an ack when no
    reclaim can have happened), where A's looked-up ack leaves it to B."""
    c = script_client
    x, y, z = stolen_queue(c)
    key = K.stream('q', 0)
    got = settle(c, kind, A, [(key, z, True), (key, x, True)])
    assert got == ({} if kind == 'riding-ack' else 2)
    assert pel(c, key, 'q') == {y: (B, 1)}
    assert [i for i, _ in c.xrange(key)] == [y]


def test_trusted_and_looked_up_acks_in_one_call(script_client):
    """In one call: z (A's, trusted) is acked, x (B's, looked up) is left to B."""
    c = script_client
    x, y, z = stolen_queue(c)
    key = K.stream('q', 0)
    assert broker(c).ack('q', [(key, z, True), (key, x, False)], None, A) == 1
    assert pel(c, key, 'q') == {x: (B, 1), y: (B, 1)}


# -- through Kombu, on a real server -------------------------------------------------------


@pytest.mark.redis  # the server is fetched with getfixturevalue: conftest cannot see it
@pytest.mark.parametrize('which', ['redis_server', 'redis62_server'])
def test_a_stale_channel_leaves_its_messages_to_their_new_owner(request, which, caplog):
    """Channel A gets two messages; its lease runs out (reclaim with lease 0 gives them
    back) and channel B gets them. A's Message.requeue() and the restore of its unacked
    message at close leave them with B, and B's acks delete them."""
    server = request.getfixturevalue(which)
    raw = redis.Redis.from_url(server.url)
    raw.flushall()
    url = 'redis-streams://' + server.url[len('redis://'):]
    queue = Queue('stale', Exchange('stale', type='direct'), routing_key='stale')
    conn_a, conn_b = Connection(url), Connection(url)
    try:
        ch_a, ch_b = conn_a.channel(), conn_b.channel()
        producer = Producer(ch_a, serializer='json')
        for body in ('one', 'two'):
            producer.publish(body, exchange=queue.exchange, routing_key='stale',
                             declare=[queue])
        got_a = [queue.bind(ch_a).get(no_ack=False) for _ in range(2)]
        assert [m.payload for m in got_a] == ['one', 'two']
        key = K.stream('stale', 0)
        assert ch_b.broker.reclaim('stale', 0, 100).moved == 2
        got_b = [queue.bind(ch_b).get(no_ack=False) for _ in range(2)]
        assert [m.payload for m in got_b] == ['one', 'two']
        owned_by_b = {i: (ch_b.consumer_name, 2) for i, _ in raw.xrange(key)}
        assert pel(raw, key, 'stale') == owned_by_b and len(owned_by_b) == 2
        caplog.set_level(logging.WARNING, logger='kombu_streams')

        got_a[0].requeue()
        assert pel(raw, key, 'stale') == owned_by_b
        ch_a.close()  # restores its unacked message, 'two', as Celery does at reconnect
        assert pel(raw, key, 'stale') == owned_by_b
        assert not_settled(caplog) == [
            "kombu-streams: 1 message of queue 'stale' not settled (requeue): its lease was "
            "lost, another consumer holds it now"] * 2

        for message in got_b:
            message.ack()
        ch_b.flush_acks()
        assert pel(raw, key, 'stale') == {}
        assert raw.xlen(key) == 0
    finally:
        conn_a.release()
        conn_b.release()
        raw.close()


# ---------------------------------------------------------------------------
# leaving: a closed channel's consumer leaves the groups where it owns nothing
# ---------------------------------------------------------------------------


def test_leave_removes_a_consumer_only_where_it_owns_nothing(script_client):
    c = script_client
    b = Broker(c, K, LEVELS)
    b.declare('q')
    b.publish('q', 0, b'{}')
    b.publish('q', 3, b'{}')
    got = read_messages(b, ['q'], 'gone', 2)
    b.ack('q', [(got[0].stream, got[0].entry_id)])  # level 0: owns nothing now
    def names(lvl):
        return {n.decode() if isinstance(n, bytes) else n
                for n in (x['name'] for x in c.xinfo_consumers(K.stream('q', lvl), 'q'))}

    read_from = {K.stream('q', 0), K.stream('q', 3)}  # it joined the groups it read
    assert {lvl for lvl in LEVELS if 'gone' in names(lvl)} == {0, 3}
    # out of every group but level 3's, which still holds its message
    assert b.leave([('q', None)], 'gone') == len(LEVELS) - 1
    owner = got[1].stream
    assert owner in read_from and owner != got[0].stream
    assert {lvl for lvl in LEVELS if 'gone' in names(lvl)} == {3}
    assert c.xpending(owner, 'q')['pending'] == 1
    assert b.leave([('nothing-here', None)], 'gone') == 0  # no stream, no group


def test_a_closed_channel_leaves_its_groups(redis_url, redis_client):
    """XINFO CONSUMERS does not grow by one per closed channel: a channel's consumer leaves
    its queues' groups at close (what it still held was given back first)."""
    url = redis_url.replace('redis://', 'redis-streams://', 1)
    queue = Queue('leave-q', Exchange('leave-q'), 'leave-q')
    with Connection(url) as conn:
        producer = conn.Producer()
        for n in range(3):
            producer.publish({'n': n}, exchange=queue.exchange, routing_key='leave-q',
                             declare=[queue])
        for _ in range(5):  # five channels come and go, the last with a message unacked
            channel = conn.channel()
            message = queue(channel).get()
            assert message is not None
            name = channel.consumer_name
            channel.close()
            for level in LEVELS:
                names = [x['name'] for x in redis_client.xinfo_consumers(
                    K.stream('leave-q', level), 'leave-q')]
                assert name.encode() not in names and name not in names
        fresh = queue(conn.channel())
        assert fresh.get() is not None  # the message held at close came back


@pytest.mark.parametrize('prefetch', [1, 100])
def test_a_channel_trusts_only_acks_whose_lease_surely_holds(redis_url, redis_client,
                                                             prefetch, monkeypatch):
    """A message acked soon after its read is acked without the ownership lookup (every
    ack the channel sends, alone or riding in a read, is marked trusted); one whose read or
    renewal is more than half a lease old (a process stopped that long) is looked up, and
    a stale one is left to its new owner."""
    sent: list[tuple] = []  # every ack the channel hands to the call builders
    read_call, ack_args = Broker.read_call, Broker._ack_args

    def spy_read(self, *args, **kwargs):
        sent.extend(kwargs.get('acks', ()) or (args[6] if len(args) > 6 else ()))
        return read_call(self, *args, **kwargs)

    def spy_ack_args(entries):
        entries = list(entries)
        sent.extend(entries)
        return ack_args(entries)

    monkeypatch.setattr(Broker, 'read_call', spy_read)
    monkeypatch.setattr(Broker, '_ack_args', staticmethod(spy_ack_args))
    url = redis_url.replace('redis://', 'redis-streams://', 1)
    queue = Queue('trust', routing_key='trust')
    key = K.stream('trust', 0)
    with Connection(url) as conn:
        producer = conn.Producer()
        for i in range(5):
            producer.publish({'i': i}, routing_key='trust', declare=[queue])
        got = []
        with conn.Consumer([queue], callbacks=[lambda body, m: (got.append(body), m.ack())],
                           prefetch_count=prefetch):
            while len(got) < 5:
                conn.drain_events(timeout=5)
        conn.default_channel.flush_acks()
        assert redis_client.xlen(key) == 0
        assert len({entry[1] for entry in sent}) == 5
        assert all(len(entry) >= 3 and entry[2] is True for entry in sent), sent

        sent.clear()
        producer.publish({'i': 'old'}, routing_key='trust')
        channel = conn.channel()
        message = queue(channel).get(no_ack=False)
        msg = channel.consumer_state.get(message.delivery_tag)
        msg.leased_at -= channel.visibility_timeout  # as if stopped for a whole lease
        (entry_id,) = [i for i, _ in redis_client.xrange(key)]
        take_over(redis_client, key, 'trust', entry_id)
        message.ack()
        channel.flush_acks()
        assert [entry[2] for entry in sent] == [False]
        assert pel(redis_client, key, 'trust') == {entry_id: (B, 1)}  # left to B


def test_ack_arguments_number_each_stream_by_its_first_use() -> None:
    """An ack call's ARGV pairs: k, the stream's place among the call's KEYS in the order
    the acks first name it, negative for a trusted ack (2-tuples are not trusted)."""
    from kombu_streams.calls import Calls

    calls = Calls(K, [0, 3])
    s0, s3 = K.stream('q', 0), K.stream('q', 3)
    _, keys, args = calls.ack_call('q', [(s3, b'1-0'), (s0, b'2-0', True), (s3, b'3-0', False),
                                         (s0, b'4-0')], consumer=A)
    assert keys[:2] == [s3, s0]
    assert args[3:] == [1, b'1-0', -2, b'2-0', 1, b'3-0', 2, b'4-0']


def test_riding_ack_arguments_name_the_stream_by_its_place_in_the_read() -> None:
    """The acks riding in a read: their count, then k (the stream's place among the read's
    KEYS, negative for a trusted ack) and the id of each, last in ARGV."""
    from kombu_streams.calls import Calls

    calls = Calls(K, [0, 3])
    s0, s3 = K.stream('q', 0), K.stream('q', 3)
    (_, keys, args), _ = calls.read_call([('q', None)], A, 10,
                                         acks=[(s3, b'1-0', True), (s0, b'2-0'),
                                               (s0, b'3-0', False)])
    k0, k3 = keys.index(s0) + 1, keys.index(s3) + 1
    assert args[-7:] == [3, -k3, b'1-0', k0, b'2-0', k0, b'3-0']
