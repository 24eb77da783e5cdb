"""Retry backoff, x-requeue-delay 'min_ms,max_ms' (RabbitMQ 4.3's delayed-retry rule): a
message given back after n deliveries (requeue, reject with requeue, reclaim of a stopped
consumer's) waits min_ms x n, at most max_ms, before it is served again, keeping its entry,
level, delivery count, TTL deadline and fields; the delivery limit still ends a loop.

Scripts on fakeredis, Redis 6.2 and 7.0 (``script_client``). Due times are checked against
the server's clock read around the call (TIME), never a wall-clock wait; a message is made
due by moving its score into the past (the state driven directly). docs/design.rst,
"Retry backoff".
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from helpers import STALE, FakeClock, install_clock, read_messages, server_ms
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kombu_streams.broker import Broker, Delay
from kombu_streams.keys import Keys
from kombu_streams.limits import QueueFull, stored_pairs
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]
LEASE = 60_000
BACKOFF = b'~backoff'


def declare(c: Any, queue: str = 'q', delay: Any = '1000,2500', **more: Any) -> Broker:
    b = Broker(c, K, LEVELS)
    args = dict(more)
    if delay is not None:
        args['x-requeue-delay'] = delay
    b.declare(queue, stored_pairs(queue, args))
    return b


def body(n: int) -> str:
    return json.dumps({'body': f'm{n}'})


def pointers(c: Any, queue: str = 'q') -> list[tuple[bytes, int, bytes]]:
    """(member, due ms, what it holds) of the queue's delayed set, earliest first: a retry's
    pointer "b:<id>:<holder>:<group>" (the member's tail: it has no value), else the
    delayed message's value."""
    members = c.zrange(K.delayed(queue), 0, -1, withscores=True)
    return [(m, int(s), c.hget(K.delayed_messages(queue), m) or m.split(b':', 2)[2])
            for m, s in members]


def make_due(c: Any, queue: str = 'q') -> None:
    """Every delayed message of ``queue`` due now: its score moved into the past."""
    for m, _, _ in pointers(c, queue):
        c.zadd(K.delayed(queue), {m: 0})


def owner(c: Any, stream: str, entry_id: bytes, queue: str = 'q') -> bytes | None:
    p = c.xpending_range(stream, queue, entry_id, entry_id, 1)
    return p[0]['consumer'] if p else None


def waiting(c: Any, queue: str = 'q') -> int:
    """How many entries of ``queue`` wait parked with the backoff consumer."""
    n = 0
    for level in LEVELS:
        stream = K.stream(queue, level)
        try:
            n += len(c.xpending_range(stream, queue, '-', '+', 10_000, consumername=BACKOFF))
        except redis.ResponseError:  # no stream or group (yet)
            pass
    return n


def requeue_timed(c: Any, b: Broker, entries: list[tuple[Any, ...]],
                  consumer: str = 'c1') -> tuple[int, int]:
    """Requeue ``entries``; the server's clock just before and just after the call."""
    before = server_ms(c)
    b.requeue('q', entries, consumer=consumer)
    return before, server_ms(c)


def test_requeue_waits_min_times_deliveries_capped(script_client):
    c = script_client
    b = declare(c)
    b.publish('q', 0, body(1))
    for n in (1, 2, 3):
        [d] = read_messages(b, ['q'], 'c1', 10)
        assert d.deliveries == n
        before, after = requeue_timed(c, b, [(d.stream, d.entry_id)])
        [(_, due, value)] = pointers(c)
        assert before + min(1000 * n, 2500) <= due <= after + min(1000 * n, 2500)
        assert value == b'b:' + d.entry_id + b':~requeued:q'
        assert owner(c, d.stream, d.entry_id) == BACKOFF  # it never left its stream
        assert read_messages(b, ['q'], 'c2', 10) == []  # not before it is due
        make_due(c)
    [d2] = read_messages(b, ['q'], 'c1', 10)
    assert (d2.entry_id, d2.deliveries, d2.level) == (d.entry_id, 4, 0)
    assert pointers(c) == []


def test_delivery_limit_dead_letters_after_n(script_client):
    c = script_client
    b = declare(c, delay='50,50')
    b.publish('q', 0, body(1))
    for n in (1, 2, 3):
        [d] = read_messages(b, ['q'], 'c1', 10, max_deliveries=3)
        assert d.deliveries == n
        b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
        assert len(pointers(c)) == 1
        make_due(c)
    assert read_messages(b, ['q'], 'c1', 10, max_deliveries=3) == []
    [(_, letter)] = b.dead_letters('q')
    assert letter[b'reason'] == b'delivery limit' and letter[b'deliveries'] == b'3'
    assert b.size('q') == 0 and pointers(c) == []


def test_count_given_by_the_channel_decides(script_client):
    """A read-ahead message given back unseen (count lowered to 0) is served at once; one
    handed out (the count the channel keeps, 1) waits."""
    c = script_client
    b = declare(c)
    b.publish('q', 0, body(1))
    b.publish('q', 0, body(2))
    d1, d2 = read_messages(b, ['q'], 'c1', 10)
    before, after = requeue_timed(c, b, [(d1.stream, d1.entry_id, 0),
                                         (d2.stream, d2.entry_id, 1)])
    [(_, due, value)] = pointers(c)
    assert value.startswith(b'b:' + d2.entry_id + b':')
    assert before + 1000 <= due <= after + 1000
    [again] = read_messages(b, ['q'], 'c2', 10)
    assert (again.entry_id, again.deliveries) == (d1.entry_id, 1)


def test_level_ttl_and_fields_kept(script_client):
    c = script_client
    b = declare(c, **{'x-message-ttl': 10 ** 9})
    b.publish('q', 6, body(1))
    stream = K.stream('q', 6)
    [(entry_id, fields)] = c.xrange(stream)
    assert b'e' in fields
    [d] = read_messages(b, ['q'], 'c1', 10)
    b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
    assert c.xrange(stream) == [(entry_id, fields)]  # the same entry, nothing copied
    b.publish('q', 6, body(2))  # published while it waits: served first
    [first] = read_messages(b, ['q'], 'c1', 1)
    assert json.loads(first.payload)['body'] == 'm2'
    make_due(c)
    [back] = read_messages(b, ['q'], 'c2', 10)
    assert (back.entry_id, back.level, back.deliveries) == (entry_id, 6, 2)
    assert json.loads(back.payload)['body'] == 'm1'


def test_reclaim_of_a_stopped_consumer_waits(script_client):
    c = script_client
    b = declare(c)
    b.publish('q', 3, body(1))
    [d] = read_messages(b, ['q'], 'c1', 10)
    c.xclaim(d.stream, 'q', 'c1', 0, [d.entry_id], idle=STALE, justid=True)
    before = server_ms(c)
    got = b.reclaim('q', LEASE, 100)
    after = server_ms(c)
    assert got.moved == 1
    [(_, due, _)] = pointers(c)
    assert before + 1000 <= due <= after + 1000
    assert owner(c, d.stream, d.entry_id) == BACKOFF
    assert read_messages(b, ['q'], 'c2', 10) == []
    assert b.reclaim('q', LEASE, 100).moved == 0  # waiting is not a lost lease
    make_due(c)
    [back] = read_messages(b, ['q'], 'c2', 10)
    assert (back.entry_id, back.deliveries) == (d.entry_id, 2)


def test_a_lost_pointer_comes_back_after_a_lease(script_client):
    """An operator removed the pointer (by hand): reclaim gives the entry back after a
    lease, at once (no second wait), and it is not lost."""
    c = script_client
    b = declare(c)
    b.publish('q', 0, body(1))
    [d] = read_messages(b, ['q'], 'c1', 10)
    b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
    c.delete(K.delayed('q'), K.delayed_messages('q'))
    c.xclaim(d.stream, 'q', BACKOFF.decode(), 0, [d.entry_id], idle=STALE, justid=True)
    assert b.reclaim('q', LEASE, 100).moved == 1
    assert pointers(c) == []
    [back] = read_messages(b, ['q'], 'c2', 10)
    assert (back.entry_id, back.deliveries) == (d.entry_id, 2)


def test_reclaim_never_cuts_a_wait_short(script_client):
    """A message waiting with its pointer in place is due within max_ms (2.5 s here) of its
    parking: reclaim's sweep leaves it alone until it has been idle that and a lease more."""
    c = script_client
    b = declare(c)
    b.publish('q', 0, body(1))
    [d] = read_messages(b, ['q'], 'c1', 10)
    b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
    c.xclaim(d.stream, 'q', BACKOFF.decode(), 0, [d.entry_id], idle=LEASE + 2000, justid=True)
    assert b.reclaim('q', LEASE, 100).moved == 0
    assert owner(c, d.stream, d.entry_id) == BACKOFF and len(pointers(c)) == 1
    c.xclaim(d.stream, 'q', BACKOFF.decode(), 0, [d.entry_id], idle=LEASE + 2600, justid=True)
    assert b.reclaim('q', LEASE, 100).moved == 1  # past any due time: given back, not lost
    [back] = read_messages(b, ['q'], 'c2', 10)
    assert (back.entry_id, back.deliveries) == (d.entry_id, 2)


def test_a_waiting_retry_counts_once_against_the_length_limit(script_client):
    """It is still an entry of its stream; its pointer in the delayed set has no value."""
    c = script_client
    b = declare(c, **{'x-max-length': 3, 'x-overflow': 'reject-publish'})
    b.publish('q', 0, body(1))
    b.publish('q', 0, body(2))
    [d] = read_messages(b, ['q'], 'c1', 1)
    b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
    assert len(pointers(c)) == 1
    b.publish('q', 0, body(3))  # 3 held: the waiting one, m2 and this one
    with pytest.raises(QueueFull):
        b.publish('q', 0, body(4))


def test_a_stale_pointer_is_dropped(script_client):
    """The entry came back by reclaim and another consumer has it: its pointer, once due,
    takes nothing from that consumer."""
    c = script_client
    b = declare(c)
    b.publish('q', 0, body(1))
    [d] = read_messages(b, ['q'], 'c1', 10)
    b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
    c.xclaim(d.stream, 'q', BACKOFF.decode(), 0, [d.entry_id], idle=STALE, justid=True)
    assert b.reclaim('q', LEASE, 100).moved == 1
    [back] = read_messages(b, ['q'], 'c2', 10)
    make_due(c)
    assert read_messages(b, ['q'], 'c3', 10) == []
    assert owner(c, d.stream, back.entry_id) == b'c2' and pointers(c) == []


def test_a_queue_without_the_argument_is_served_at_once(script_client):
    c = script_client
    b = declare(c, delay=None)
    b.publish('q', 0, body(1))
    [d] = read_messages(b, ['q'], 'c1', 10)
    b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
    assert pointers(c) == []
    [again] = read_messages(b, ['q'], 'c2', 10)
    assert (again.entry_id, again.deliveries) == (d.entry_id, 2)


def test_changed_at_run_time(script_client):
    """``kombu-streams limits --set`` writes the argument; the next requeue follows it."""
    c = script_client
    b = declare(c, delay=None)
    b.publish('q', 0, body(1))
    [d] = read_messages(b, ['q'], 'c1', 10)
    c.hset(K.args('q'), 'x-requeue-delay', '7000,9000')
    before, after = requeue_timed(c, b, [(d.stream, d.entry_id)])
    [(_, due, _)] = pointers(c)
    assert before + 7000 <= due <= after + 7000


def test_a_delayed_publish_and_a_waiting_retry_share_the_set(script_client):
    c = script_client
    b = declare(c, delay='600000,600000')
    b.publish('q', 0, body(1))
    b.publish('q', 0, body(2), delay=Delay('+300000', 1000, 'eta'))
    [d] = read_messages(b, ['q'], 'c1', 10)
    b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
    assert [v[:2] for _, _, v in pointers(c)] == [b'{"', b'b:']  # eta first, then the retry
    make_due(c)
    got = read_messages(b, ['q'], 'c2', 10)  # the retry, a suspect, goes alone
    got += read_messages(b, ['q'], 'c2', 10)
    assert sorted(json.loads(x.payload)['body'] for x in got) == ['m1', 'm2']


@pytest.mark.parametrize('value', ['1000,60000', '5,5', (1, 2), [3, 86_400_000]])
def test_valid_values_stored_canonical(value):
    low, high = (value.split(',') if isinstance(value, str) else value)
    assert stored_pairs('q', {'x-requeue-delay': value}) == [
        'x-requeue-delay', f'{int(low)},{int(high)}']


@pytest.mark.parametrize('value', ['0,5', '5,1', 'a,b', '5', '', (1, 2, 3), True, 1000,
                                   '1,86400001', (1.5, 2), '-1,5'])
def test_invalid_values_refused_naming_the_rule(value):
    with pytest.raises(ValueError) as info:
        stored_pairs('jobs', {'x-requeue-delay': value})
    text = str(info.value)
    assert "'jobs'" in text and 'x-requeue-delay' in text and 'min_ms <= max_ms' in text


class BackoffQueue(RuleBasedStateMachine):
    """Publish, read by two consumers, ack, requeue, and crash a consumer (its entries aged
    past the lease, then reclaim) while fakeredis's clock moves: nothing is lost (every
    message is in its stream, acked, or dead-lettered at the delivery limit), none is
    served before the due time the rule gives it, delivery counts go up by one per
    delivery, and every waiting entry has exactly one pointer."""

    MIN, MAX, LIMIT = 20, 100, 4

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.clock = FakeClock(server_ms(self.c))
        self.restore_clock = install_clock(self.clock)
        self.b = declare(self.c, delay=f'{self.MIN},{self.MAX}')
        self.n = 0
        self.due: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self.in_flight: dict[str, tuple[Any, str]] = {}
        self.acked: set[str] = set()

    def teardown(self) -> None:
        self.restore_clock()

    def _wait(self, name: str, deliveries: int) -> None:
        self.due[name] = self.clock.ms + min(self.MIN * deliveries, self.MAX)

    @rule(level=st.sampled_from(LEVELS))
    def publish(self, level: int) -> None:
        self.n += 1
        name = f'm{self.n}'
        self.b.publish('q', level, json.dumps({'body': name}))
        self.count[name] = 0

    @rule(ms=st.sampled_from([1, 10, 30, 120]))
    def advance(self, ms: int) -> None:
        self.clock.ms += ms

    @rule(consumer=st.sampled_from(['c1', 'c2']), count=st.integers(1, 3))
    def read(self, consumer: str, count: int) -> None:
        for d in read_messages(self.b, ['q'], consumer, count, max_deliveries=self.LIMIT):
            name = json.loads(d.payload)['body']
            assert self.clock.ms >= self.due.get(name, 0), f'{name} served before due'
            assert name not in self.in_flight and name not in self.acked
            assert d.deliveries == self.count[name] + 1 <= self.LIMIT
            self.count[name] = d.deliveries
            self.in_flight[name] = (d, consumer)

    @precondition(lambda self: self.in_flight)
    @rule(how=st.sampled_from(['ack', 'requeue']), data=st.data())
    def settle(self, how: str, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        d, consumer = self.in_flight.pop(name)
        if how == 'requeue':
            self.b.requeue('q', [(d.stream, d.entry_id)], consumer=consumer)
            self._wait(name, d.deliveries)
        else:
            self.b.ack('q', [(d.stream, d.entry_id)], consumer=consumer)
            self.acked.add(name)

    @rule(consumer=st.sampled_from(['c1', 'c2']))
    def crash(self, consumer: str) -> None:
        mine = {n: d for n, (d, who) in self.in_flight.items() if who == consumer}
        for d in mine.values():
            self.c.xclaim(d.stream, 'q', consumer, 0, [d.entry_id], idle=STALE, justid=True)
        assert self.b.reclaim('q', LEASE, 1000).moved == len(mine)
        for name, d in mine.items():
            del self.in_flight[name]
            self._wait(name, d.deliveries)

    @invariant()
    def none_lost_none_early_limit_kept(self) -> None:
        stored = {json.loads(f[b'm'])['body'] for lv in LEVELS
                  for _, f in self.c.xrange(K.stream('q', lv))}
        dropped = [(f[b'reason'], json.loads(f[b'f:m'])['body'], int(f[b'deliveries']))
                   for _, f in self.b.dead_letters('q', 100_000)]
        for reason, name, deliveries in dropped:
            assert reason == b'delivery limit' and deliveries == self.LIMIT
            assert self.count[name] == self.LIMIT
        names = {name for _, name, _ in dropped}
        assert not (names & (stored | self.acked))
        assert stored | self.acked | names == {f'm{i}' for i in range(1, self.n + 1)}
        assert waiting(self.c) == len(pointers(self.c))


TestBackoffQueue = BackoffQueue.TestCase
TestBackoffQueue.settings = PROPERTY


def test_kombu_requeue_reject_and_restore_at_close_wait(url, redis_url):
    """Kombu's three ways back, on a queue declared with x-requeue-delay: message.requeue(),
    message.reject(requeue=True), and the restore of unacked messages when the channel
    closes. Each waits min_ms x 1 in the delayed set, its entry kept."""
    from kombu import Connection, Producer, Queue
    c = redis.Redis.from_url(redis_url)
    queue = Queue('bq', queue_arguments={'x-requeue-delay': '600000,900000'})
    with Connection(url) as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        assert Broker(c, K, [0]).limits('bq') == {'x-requeue-delay': '600000,900000'}
        producer = Producer(conn.default_channel, routing_key='bq')
        for n in range(3):
            producer.publish({'n': n})
        before = server_ms(c)
        first, second, third = bound.get(), bound.get(), bound.get()
        first.requeue()
        second.reject(requeue=True)
        assert third is not None and bound.get() is None
    after = server_ms(c)
    due = [d for _, d, _ in pointers(c, 'bq')]
    assert len(due) == 3 and all(before + 600_000 <= d <= after + 600_000 for d in due)
    assert waiting(c, 'bq') == 3 and c.xlen(K.stream('bq', 0)) == 3


def test_kombu_declare_refuses_a_bad_value(url):
    from kombu import Connection, Queue
    with Connection(url) as conn:
        with pytest.raises(ValueError, match=r"x-requeue-delay='5,1'.*min_ms <= max_ms"):
            Queue('bad', queue_arguments={'x-requeue-delay': '5,1'})(
                conn.default_channel).declare()


def one_waiting(c: Any) -> tuple[Broker, Any, Any]:
    """Two messages delivered to c1; the first requeued, so it waits (x-requeue-delay)."""
    b = declare(c)
    for n in (1, 2):
        b.publish('q', 0, body(n))
    first, second = read_messages(b, ['q'], 'c1', 10)
    b.requeue('q', [(first.stream, first.entry_id)], consumer='c1')
    return b, first, second


def test_purge_deletes_a_waiting_retry_with_its_pointer(script_client):
    """A retry waiting with x-requeue-delay is a message of the queue: purge deletes its
    entry with its pointer, so no reclaim brings it back; one in flight stays."""
    c = script_client
    b, first, second = one_waiting(c)
    assert waiting(c) == 1 and len(pointers(c)) == 1
    assert b.purge('q') == 1
    assert pointers(c) == [] and waiting(c) == 0
    assert [e for e, _ in c.xrange(K.stream('q', 0))] == [second.entry_id]
    c.xclaim(second.stream, 'q', 'c1', 0, [second.entry_id], idle=STALE, justid=True)
    assert b.reclaim('q', LEASE, 100).moved == 1  # c1's stalled one waits in turn
    make_due(c)
    assert [d.entry_id for d in read_messages(b, ['q'], 'c2', 10)] == [second.entry_id]
    assert read_messages(b, ['q'], 'c2', 10) == []


def test_operators_see_a_waiting_retry_once_as_delayed(script_client):
    """inspect counts a retry waiting with x-requeue-delay once, as delayed (its pointer),
    not also as pending nor ~backoff as a consumer; ``delayed list`` names its entry."""
    c = script_client
    b, first, second = one_waiting(c)
    seen = b.inspect('q')
    assert (seen['ready'], seen['pending'], seen['delayed']) == (0, 1, 1)
    assert [con['name'] for con in seen['consumers']] == ['c1']
    [retry] = b.scheduled('q')['messages']
    assert retry['retry_of'] == first.entry_id.decode() and retry['label'] == ''
