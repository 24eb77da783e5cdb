"""Queue arguments in Redis and the length limit (x-max-length, x-overflow): scripts on
fakeredis, Redis 6.2 and 7.0 (``script_client``); the Kombu API on a real Redis 7.0.
docs/design.rst, "Queue arguments and limits"."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from conftest import requires_batch_publish
from helpers import assert_same, read_messages, snapshot
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kombu import Connection, Exchange, Producer, Queue

from kombu_streams import QueueArgumentsDiffer, QueueFull
from kombu_streams.batch import BatchRefused
from kombu_streams.broker import Broker, Delay
from kombu_streams.keys import Keys
from kombu_streams.limits import stored_pairs
from kombu_streams.scripts import NeedsAllStreams
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]


def broker(c: Any) -> Broker:
    return Broker(c, K, LEVELS)


def limited(c: Any, queue: str, length: int, overflow: str) -> Broker:
    b = broker(c)
    b.declare(queue, stored_pairs(queue, {'x-max-length': length, 'x-overflow': overflow}))
    return b


def body(n: int) -> str:
    return json.dumps({'body': f'm{n}'})


def bodies(deliveries: Any) -> list[str]:
    return [json.loads(d.payload)['body'] for d in deliveries]


def held(c: Any, queue: str) -> int:
    """What counts against the limit: every entry of the queue's streams, and its delayed."""
    return sum(c.xlen(K.stream(queue, lv)) for lv in LEVELS) + c.zcard(K.delayed(queue))


def letters(b: Broker, queue: str) -> list[tuple[str, str]]:
    return [(f[b'reason'].decode(), json.loads(f[b'f:m'])['body'])
            for _, f in b.dead_letters(queue)]


def counted_out(c: Any, after: dict, queue: str, **counts: int) -> dict:
    """``after`` (a snapshot) with the queue's counters as they were before the publish
    that counted ``counts``, which are checked: a refusal changes nothing else."""
    assert {k: int(v) for k, v in c.hgetall(K.counters(queue)).items()} == {
        k.encode(): v for k, v in counts.items()}
    return {k: v for k, v in after.items() if k != K.counters(queue).encode()}


def test_reject_publish_refuses_exactly_at_the_limit_and_stores_nothing(script_client):
    c = script_client
    b = limited(c, 'q', 3, 'reject-publish')
    for n in range(3):
        assert b.publish('q', 0, body(n))
    before = snapshot(c)
    with pytest.raises(QueueFull) as info:
        b.publish('q', 9, body(3))
    assert "queue q is full: x-max-length 3" in str(info.value)
    assert 'reject-publish' in str(info.value)
    assert_same(before, counted_out(c, snapshot(c), 'q', refused=1))
    assert bodies(read_messages(b, ['q'], 'c1', 10)) == ['m0', 'm1', 'm2']


def test_a_big_message_refused_leaves_no_body(script_client):
    c = script_client
    b = limited(c, 'q', 1, 'reject-publish')
    b.publish('q', 0, body(0))
    with pytest.raises(QueueFull):
        b.publish_big('q', 0, body(1))
    assert not c.exists(K.big('q'))


def test_drop_head_dead_letters_the_oldest_ready_one_and_keeps_the_count(script_client):
    c = script_client
    b = limited(c, 'q', 3, 'drop-head')
    for n in range(5):
        assert b.publish('q', 0, body(n))
        assert held(c, 'q') == min(n + 1, 3)
    assert letters(b, 'q') == [('max-length', 'm0'), ('max-length', 'm1')]
    assert bodies(read_messages(b, ['q'], 'c1', 10)) == ['m2', 'm3', 'm4']
    assert b.limits_and_counters('q')[1] == {'overflowed': 2}  # operators see it


def test_drop_head_takes_the_next_served_requeued_first_priorities_kept(script_client):
    """The one set aside is the one a read would serve next: level 0 before level 9, a
    requeued (parked) one before the fresh ones of its level; the rest keep their order."""
    c = script_client
    b = limited(c, 'q', 4, 'drop-head')
    b.publish('q', 9, body(0))
    b.publish('q', 0, body(1))
    b.publish('q', 0, body(2))
    first = read_messages(b, ['q'], 'c1', 1)  # m1, then requeued: parked, served first
    assert bodies(first) == ['m1']
    b.requeue('q', [(first[0].stream, first[0].entry_id)])
    b.publish('q', 9, body(3))  # full now: m0 m1 m2 m3
    b.publish('q', 9, body(4))  # m1 (parked, level 0) goes
    assert letters(b, 'q') == [('max-length', 'm1')]
    b.publish('q', 9, body(5))  # m2 (fresh, level 0) goes
    assert letters(b, 'q') == [('max-length', 'm1'), ('max-length', 'm2')]
    assert bodies(read_messages(b, ['q'], 'c1', 10)) == ['m0', 'm3', 'm4', 'm5']
    letter = b.dead_letters('q')[0][1]
    assert letter[b'deliveries'] == b'1'  # the parked one's count went with it


def test_in_flight_and_delayed_count_and_are_never_dropped(script_client):
    """All held by consumers: drop-head has nothing ready to set aside, so it refuses."""
    c = script_client
    b = limited(c, 'q', 2, 'drop-head')
    b.publish('q', 0, body(0))
    b.publish('q', 0, body(1))
    assert len(read_messages(b, ['q'], 'c1', 10)) == 2
    before = snapshot(c)
    with pytest.raises(QueueFull, match='no ready message left'):
        b.publish('q', 0, body(2))
    assert_same(before, counted_out(c, snapshot(c), 'q', refused=1))


def test_a_lowered_limit_sets_aside_down_to_it(script_client):
    c = script_client
    b = limited(c, 'q', 10, 'drop-head')
    for n in range(6):
        b.publish('q', 0, body(n))
    b.limits('q', stored_pairs('q', {'x-max-length': 3}))
    b.publish('q', 0, body(6))
    assert held(c, 'q') == 3
    assert [m for _, m in letters(b, 'q')] == ['m0', 'm1', 'm2', 'm3']


def test_a_declare_with_other_arguments_is_refused_naming_both(script_client):
    c = script_client
    b = limited(c, 'q', 3, 'drop-head')
    before = snapshot(c)
    with pytest.raises(QueueArgumentsDiffer) as info:
        b.declare('q', stored_pairs('q', {'x-max-length': 4}))
    text = str(info.value)
    assert 'x-max-length=3' in text and 'x-max-length=4' in text and 'queue q' in text
    assert_same(before, snapshot(c))
    b.declare('q', stored_pairs('q', {'x-max-length': 3}))  # the same: fine
    b.declare('q')  # none given: takes what is recorded
    assert b.limits('q') == {'x-max-length': 3, 'x-overflow': 'drop-head'}


def test_a_queue_without_arguments_is_unlimited(script_client):
    b = broker(script_client)
    b.declare('q')
    for n in range(50):
        b.publish('q', 0, body(n))
    assert b.limits('q') == {}
    assert b.size('q') == 50


def test_arguments_get_the_queue_expiry_and_go_with_it(script_client):
    c = script_client
    b = limited(c, 'q', 3, 'drop-head')
    b.touch('q', 60_000)
    assert 0 < c.pttl(K.args('q')) <= 60_000
    b.delete('q')
    assert not c.exists(K.args('q'))


def test_limits_set_needs_the_queue(script_client):
    with pytest.raises(Exception, match='limits: no queue'):
        broker(script_client).limits('nope', stored_pairs('nope', {'x-max-length': 3}))


@pytest.mark.parametrize('arguments, says', [
    ({'x-max-length': -1}, 'an integer >= 0'),
    ({'x-max-length': '3x'}, 'an integer >= 0'),
    ({'x-max-length': True}, 'an integer >= 0'),
    ({'x-max-length': 3, 'x-overflow': 'reject-publish-dlx'}, 'drop-head or reject-publish'),
    ({'x-overflow': 'drop-head'}, 'it needs x-max-length'),
    ({'x-max-length-bytes': -1}, 'an integer >= 0'),
    ({'x-max-length-bytes': '1k'}, 'an integer >= 0'),
    ({'x-max-length-bytes': 9, 'x-fairness': 'round-robin'},
     'with x-max-length-bytes only with x-overflow reject-publish'),
])
def test_invalid_arguments_are_named(arguments, says):
    with pytest.raises(ValueError, match=says) as info:
        stored_pairs('q', arguments)
    assert "queue 'q'" in str(info.value)


class LimitedQueue(RuleBasedStateMachine):
    """Publish, read, ack, requeue and reject under a limit of 4 with drop-head: never more
    held than the limit, and every message published is served, in flight, acked, rejected
    or in the dead-letter stream with reason max-length: none lost."""

    LIMIT = 4

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.b = limited(self.c, 'q', self.LIMIT, 'drop-head')
        self.n = 0
        self.in_flight: dict[str, Any] = {}
        self.done: set[str] = set()
        self.refused: set[str] = set()

    @rule(level=st.sampled_from(LEVELS))
    def publish(self, level: int) -> None:
        self.n += 1
        try:
            self.b.publish('q', level, body(self.n))
        except QueueFull:
            assert len(self.in_flight) >= self.LIMIT  # only when none is ready
            self.refused.add(f'm{self.n}')

    @rule(count=st.integers(1, 3))
    def read(self, count: int) -> None:
        for d in read_messages(self.b, ['q'], 'c1', count):
            self.in_flight[json.loads(d.payload)['body']] = d

    @precondition(lambda self: self.in_flight)
    @rule(how=st.sampled_from(['ack', 'requeue', 'reject']), data=st.data())
    def settle(self, how: str, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        d = self.in_flight.pop(name)
        if how == 'requeue':
            self.b.requeue('q', [(d.stream, d.entry_id)])
        else:
            self.b.ack('q', [(d.stream, d.entry_id)])
            self.done.add(name)

    @invariant()
    def within_the_limit_and_none_lost(self) -> None:
        assert held(self.c, 'q') <= self.LIMIT
        stored = {json.loads(f[b'm'])['body'] for lv in LEVELS
                  for _, f in self.c.xrange(K.stream('q', lv))}
        dropped = letters(self.b, 'q')
        assert all(reason == 'max-length' for reason, _ in dropped)
        seen = stored | self.done | self.refused | {m for _, m in dropped}
        assert seen == {f'm{i}' for i in range(1, self.n + 1)}
        assert set(self.in_flight) <= stored


TestLimitedQueue = LimitedQueue.TestCase
TestLimitedQueue.settings = PROPERTY


def test_queue_arguments_of_a_kombu_queue_bind_every_publisher(url):
    with Connection(url) as conn:
        q = Queue('jobs', queue_arguments={'x-max-length': 2, 'x-overflow': 'reject-publish'})
        producer = Producer(conn.channel())
        q(producer.channel).declare()
        with Connection(url) as other:  # never declared it
            p2 = Producer(other.channel(), routing_key='jobs')
            p2.publish({'n': 1})
            p2.publish({'n': 2})
            with pytest.raises(QueueFull, match='queue jobs is full: x-max-length 2'):
                p2.publish({'n': 3})
            assert isinstance(QueueFull('x'), other.transport.channel_errors)
            assert not isinstance(QueueFull('x'), other.transport.connection_errors)
        other_args = Queue('jobs', queue_arguments={'x-max-length': 5})
        with pytest.raises(QueueArgumentsDiffer, match='x-max-length=2'):
            other_args(producer.channel).declare()


def test_the_transport_option_binds_a_queue_declared_without_arguments(url):
    options = {'queue_arguments': {'celery': {'x-max-length': 1,
                                              'x-overflow': 'reject-publish'}}}
    with Connection(url, transport_options=options) as conn:
        Queue('celery')(conn.channel()).declare()  # as Celery declares its default queue
        with Connection(url) as other:
            p = Producer(other.channel(), routing_key='celery')
            p.publish({'n': 1})
            with pytest.raises(QueueFull):
                p.publish({'n': 2})


def test_the_transport_option_is_checked(url):
    with pytest.raises(ValueError, match="queue_arguments.*'celery'.*x-overflow"):
        Connection(url, transport_options={
            'queue_arguments': {'celery': {'x-max-length': 1, 'x-overflow': 'nope'}}},
        ).channel()


@requires_batch_publish
def test_a_batch_reports_which_messages_were_refused(url, redis_url):
    with Connection(url, transport_options={'big_message_bytes': 2000}) as conn:
        Queue('b', queue_arguments={'x-max-length': 3, 'x-overflow': 'reject-publish'})(
            conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='b', serializer='json')
        with pytest.raises(BatchRefused) as info:
            with producer.batch(max_size=2):
                for i in range(5):
                    producer.publish('x' * (3000 if i == 4 else 1))  # 4: a big message
        assert sorted(info.value.refused) == [3, 4]
        assert all('queue b is full' in str(e) for e in info.value.refused.values())
        assert conn.default_channel.queue_declare('b', passive=True).message_count == 3


def test_cli_limits_shows_sets_and_clears(redis_url):
    from tests.test_cli import cli, cli_json
    c = redis.Redis.from_url(redis_url)
    b = broker(c)
    b.declare('lq')
    assert cli_json(redis_url, 'limits', 'lq') == {'queue': 'lq', 'arguments': {},
                                                   'counters': {}}
    out = cli(redis_url, 'limits', 'lq', '--set', 'x-max-length=2',
              'x-overflow=reject-publish')
    assert out.returncode == 0 and out.stdout.strip() == (
        'lq: x-max-length=2 x-overflow=reject-publish')
    b.publish('lq', 0, body(0))
    b.publish('lq', 0, body(1))
    with pytest.raises(QueueFull):
        b.publish('lq', 0, body(2))
    status = cli_json(redis_url, 'status', 'lq')['queues'][0]
    assert status['limits'] == {'x-max-length': 2, 'x-overflow': 'reject-publish'}
    assert '2 reject-publish' in cli(redis_url, 'status', 'lq').stdout
    bad = cli(redis_url, 'limits', 'lq', '--set', 'x-overflow=sometimes')
    assert bad.returncode == 2 and 'x-overflow' in bad.stderr
    assert cli_json(redis_url, 'limits', 'lq', '--set', 'x-max-length=5')['arguments'] == {
        'x-max-length': 5, 'x-overflow': 'reject-publish'}  # the others are kept
    assert cli_json(redis_url, 'limits', 'lq', '--clear')['arguments'] == {}
    b.publish('lq', 0, body(2))
    assert cli(redis_url, 'limits', 'nope').returncode == 3


def test_drop_head_on_a_queue_whose_levels_were_never_created(script_client):
    """A queue made by publishes alone (no declare: only the streams written exist), limited
    by an operator: drop-head skips the missing levels and the missing group."""
    c = script_client
    b = broker(c)
    for n in range(3):
        b.publish('p', 0 if n == 0 else 9, body(n))
    assert not c.exists(K.stream('p', 3))
    b.limits('p', stored_pairs('p', {'x-max-length': 3}))
    b.publish('p', 9, body(3))  # m0 goes: level 0 is empty after it, 3 and 6 missing
    b.publish('p', 9, body(4))
    assert letters(b, 'p') == [('max-length', 'm0'), ('max-length', 'm1')]
    assert held(c, 'p') == 3


def test_delayed_messages_count_and_promotion_keeps_the_count(script_client):
    c = script_client
    b = limited(c, 'q', 2, 'drop-head')
    b.publish('q', 0, body(0), delay=Delay('+600000', 1000, 'later'))
    b.publish('q', 0, body(1), delay=Delay('+600000', 1000, 'later'))
    with pytest.raises(QueueFull, match='no ready message left'):  # both wait: none to drop
        b.publish('q', 0, body(2), delay=Delay())
    c.zadd(K.delayed('q'), {m: 1 for m in c.zrange(K.delayed('q'), 0, -1)})  # due now
    assert bodies(read_messages(b, ['q'], 'c1', 1)) == ['m0']  # promoted: still held
    assert held(c, 'q') == 2
    b.publish('q', 0, body(3), delay=Delay())  # m1, ready now, is set aside
    assert letters(b, 'q') == [('max-length', 'm1')]


def test_a_full_queue_does_not_keep_a_routed_copy_from_the_others(url):
    """Direct exchange, two queues on one routing key; the full one comes first (the
    lookup's order is the routing table's, so it is made sorted here)."""
    ex = Exchange('lx', 'direct')
    full = Queue('a-full', ex, 'k', queue_arguments={'x-max-length': 1,
                                                     'x-overflow': 'reject-publish'})
    other = Queue('b-open', ex, 'k')
    with Connection(url) as conn:
        channel = conn.default_channel
        for q in (full, other):
            q(channel).declare()
        lookup = channel._lookup
        channel._lookup = lambda *a, **k: sorted(lookup(*a, **k))
        producer = Producer(conn.default_channel, exchange=ex, routing_key='k')
        producer.publish({'n': 1})
        with pytest.raises(QueueFull, match='queue a-full is full'):
            producer.publish({'n': 2})
        counts = [q(conn.default_channel).queue_declare(passive=True).message_count
                  for q in (full, other)]
        assert counts == [1, 2]


@pytest.mark.parametrize('overflow', ['reject-publish', 'drop-head'])
def test_a_publish_laid_out_for_an_unlimited_queue_asks_for_every_stream(script_client,
                                                                          overflow):
    """A publisher that does not know the queue is limited sends its first stream only
    (Calls.publish_call); the script writes nothing and asks for them all (NEEDKEYS), even
    when the queue is full and drop-head would set its head aside."""
    c = script_client
    limited(c, 'q', 2, overflow)
    first = broker(c)
    assert first.publish('q', 3, body(0)) and first.publish('q', 3, body(1))
    other = broker(c)  # a publisher that never met the limit
    call = other.publish_call('q', 9, body(2))
    assert len(call[1]) == 9 and K.stream('q', 6) not in call[1]
    before = snapshot(c)
    with pytest.raises(NeedsAllStreams, match='queue q has x-max-length'):
        other.run(call)
    assert_same(before, snapshot(c))
    if overflow == 'reject-publish':
        with pytest.raises(QueueFull):
            other.publish('q', 9, body(2))
    else:
        assert other.publish('q', 9, body(2))
        assert letters(other, 'q') == [('max-length', 'm0')]
    # from now on laid out with every stream, at once
    assert [K.stream('q', lv) for lv in LEVELS] == other.publish_call('q', 0, body(3))[1][7:11]
    assert bodies(read_messages(other, ['q'], 'c1', 10)) == (
        ['m0', 'm1'] if overflow == 'reject-publish' else ['m1', 'm2'])


@requires_batch_publish
def test_a_limit_learnt_while_publishing_keeps_order_and_refusals(url):
    """Publishers learn a length limit set after their first publish: a single publish and a
    batch (interleaved with an unlimited queue) store every message once, in order, and
    refuse exactly what the limit refuses; the internal NEEDKEYS never reaches the user."""
    with Connection(url) as conn, Connection(url) as admin:
        producer = Producer(conn.default_channel, serializer='json')
        for name in ('a', 'b'):
            Queue(name)(conn.default_channel).declare()
            producer.publish({'n': -1}, routing_key=name)  # laid out unlimited
        admin_broker = admin.default_channel.broker
        admin_broker.run(admin_broker.limits_call('b', stored_pairs(
            'b', {'x-max-length': 5, 'x-overflow': 'reject-publish'})))
        producer.publish({'n': 0}, routing_key='b')
        with pytest.raises(BatchRefused) as info:
            with producer.batch(max_size=100):
                for n in range(1, 7):
                    producer.publish({'n': n}, routing_key='b')
                    producer.publish({'n': n}, routing_key='a')
        # b held 2: 1, 2, 3 fit; 4, 5, 6 (numbers 6, 8 and 10 of the batch) refused
        assert sorted(info.value.refused) == [6, 8, 10]
        for name, want in (('a', [-1, 1, 2, 3, 4, 5, 6]), ('b', [-1, 0, 1, 2, 3])):
            queue = conn.SimpleQueue(name)
            got = []
            while True:
                try:
                    message = queue.get(timeout=0.5)
                except queue.Empty:
                    break
                got.append(message.payload['n'])
                message.ack()
            assert got == want, name


def test_a_routed_publish_to_a_gone_queue_is_neither_refused_nor_counted(script_client):
    """A routed publish (through an exchange) that a limit would refuse, to a queue whose
    first stream is gone, stores nothing and answers nil: it is not refused and not counted,
    whether the queue is full by length, full by bytes, or the message alone is over
    x-max-length-bytes. Only these paths ask whether the queue exists (one EXISTS); one that
    fits goes the way of a queue without limits (stored if its level's stream exists)."""
    c = script_client
    b = broker(c)
    for n in range(2):
        b.publish('p', 9, body(n))  # level 9 only: the first stream (level 0) never made
    for args in ({'x-max-length': 1}, {'x-max-length-bytes': 20}, {'x-max-length-bytes': 5}):
        c.delete(K.args('p'))
        c.hset(K.args('p'), mapping=dict(zip(*[iter(stored_pairs('p', args))] * 2)))
        c.hset(K.counters('p'), 'waiting-bytes', 30)  # as if both waited
        assert b.publish('p', 9, body(7), routed=True) is None, args
        assert c.xlen(K.stream('p', 9)) == 2
        assert c.hget(K.counters('p'), 'waiting-bytes') == b'30'
        assert c.hget(K.counters('p'), 'refused') is None
