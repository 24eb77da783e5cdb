"""Global rate limit: the queue arguments x-rate-limit (Celery's syntax) and x-rate-burst,
enforced inside read.lua by a GCRA whose state is the queue's rate key: at most what the
limiter allows is delivered, over all consumers; the rest stays ready in Redis, and the
read's reply says when the next slot comes (the due time the consumer already waits for).

Scripts run on fakeredis, Redis 6.2 and 7.0 (``script_client``). Time is driven without
sleeping: by writing the limiter's stored state (a deleted key is a limiter that has been
idle long enough for a full burst; a TAT in the future is a slot that far away), or on
fakeredis with its clock driven (``FakeClock``). docs/design.rst, "Global rate limit".
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from helpers import FakeClock, install_clock, server_ms
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kombu import Connection, Consumer, Producer, Queue

from kombu_streams.broker import READ, Broker, Delay, ReadResult
from kombu_streams.keys import Keys
from kombu_streams.limits import rate_spec, stored_pairs
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]
HOUR = 3_600_000


def broker(c: Any) -> Broker:
    return Broker(c, K, LEVELS)


def limited(c: Any, queue: str, rate: Any, burst: int | None = None) -> Broker:
    b = broker(c)
    args: dict[str, Any] = {'x-rate-limit': rate}
    if burst is not None:
        args['x-rate-burst'] = burst
    b.declare(queue, stored_pairs(queue, args))
    return b


def body(n: int) -> str:
    return json.dumps({'body': f'm{n}'})


def bodies(result: ReadResult) -> list[str]:
    return [json.loads(d.payload)['body'] for d in result.deliveries]


def read(b: Broker, queues: Sequence[str], consumer: str, count: int) -> ReadResult:
    """One read.lua call over ``queues`` as a channel lays it out, every source read."""
    sources = b.sources(list(queues))
    call, parse = b.read_call(sources, consumer, count, 0, None,
                              {s: READ for s in sources})
    return parse(b.run(call))


def next_window(c: Any, queue: str) -> None:
    """As if the queue's limiter had been idle long enough for a full burst."""
    c.delete(K.rate(queue))


# -- arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize('given, stored', [
    ('50/s', '50/s'), ('100/m', '100/m'), ('1000/h', '1000/h'), (5, '5/s'), ('5', '5/s'),
    (2.5, '2.5/s'), ('0.5/h', '0.5/h'), (' 10 / m ', '10/m'), ('.5/s', '0.5/s'),
])
def test_rates_in_celerys_syntax_are_stored_plainly(given, stored):
    assert rate_spec('q', given) == stored
    assert stored_pairs('q', {'x-rate-limit': given}) == ['x-rate-limit', stored]


@pytest.mark.parametrize('arguments, says', [
    ({'x-rate-limit': '0/s'}, "x-rate-limit='0/s' is not valid: a rate in Celery's syntax"),
    ({'x-rate-limit': 0}, 'x-rate-limit=0 is not valid'),
    ({'x-rate-limit': '10/d'}, "x-rate-limit='10/d' is not valid"),
    ({'x-rate-limit': 'fast'}, "x-rate-limit='fast' is not valid"),
    ({'x-rate-limit': -3}, 'x-rate-limit=-3 is not valid'),
    ({'x-rate-limit': True}, 'x-rate-limit=True is not valid'),
    ({'x-rate-limit': float('nan')}, 'x-rate-limit=nan is not valid'),
    ({'x-rate-limit': '1e3/s'}, "x-rate-limit='1e3/s' is not valid"),
    ({'x-rate-burst': 5}, 'x-rate-burst=5 is not valid: it needs x-rate-limit'),
    ({'x-rate-limit': '1/s', 'x-rate-burst': 0}, 'x-rate-burst=0 is not valid: an integer'),
    ({'x-rate-limit': '1/s', 'x-rate-burst': '2.5'}, "x-rate-burst='2.5' is not valid"),
    ({'x-rate-limit': '1/s', 'x-rate-burst': 10**7}, 'x-rate-burst=10000000 is not valid'),
])
def test_invalid_rate_arguments_are_named(arguments, says):
    with pytest.raises(ValueError, match=f"queue 'q': argument {says}".replace('(', r'\(')
                       .replace(')', r'\)').replace('?', r'\?')):
        stored_pairs('q', arguments)


# -- the limiter in read.lua ---------------------------------------------------------------

def test_a_limited_queue_serves_its_burst_then_says_when_the_next_slot_is(script_client):
    """'2/h' with a burst of 2: two deliveries at once, then none, over two consumers; the
    rest stays ready, the marker is removed (no consumer is woken to be refused) and the
    reply's due time is the next slot, half an hour away."""
    c = script_client
    b = limited(c, 'q', '2/h', 2)
    for n in range(5):
        b.publish('q', 0, body(n))
    first = read(b, ['q'], 'c1', 10)
    assert bodies(first) == ['m0', 'm1']
    assert first.status[('q', None)] == '0'
    assert HOUR // 2 - 5_000 < first.dues[('q', None)] <= HOUR // 2
    assert c.exists(K.wake('q')) == 0
    second = read(b, ['q'], 'c2', 10)  # another consumer: the limit is the queue's
    assert bodies(second) == [] and second.status[('q', None)] == '0'
    assert HOUR // 2 - 5_000 < second.dues[('q', None)] <= HOUR // 2
    assert b.size('q') == 3 and c.xlen(K.stream('q', 0)) == 5  # 2 in flight: none lost
    assert 0 < c.pttl(K.rate('q')) <= HOUR  # the state expires once it is past


def test_the_slot_is_where_the_stored_state_puts_it(script_client):
    """A theoretical arrival time a minute ahead (burst 1): nothing now, due in a minute;
    one in the past: one delivery, and the next slot one interval on."""
    c = script_client
    b = limited(c, 'q', '2/h')
    b.publish('q', 0, body(1))
    b.publish('q', 0, body(2))
    now = server_ms(c)
    c.set(K.rate('q'), str(now + 60_000))
    r = read(b, ['q'], 'c1', 10)
    assert bodies(r) == [] and 55_000 < r.dues[('q', None)] <= 60_000
    c.set(K.rate('q'), str(now - 10))
    r = read(b, ['q'], 'c1', 10)
    assert bodies(r) == ['m1'] and HOUR // 2 - 5_000 < r.dues[('q', None)] <= HOUR // 2


def test_deliveries_per_window_never_exceed_the_rate_over_consumers(script_client):
    c = script_client
    b = limited(c, 'q', '2/h')
    for n in range(6):
        b.publish('q', 0, body(n))
    got = []
    for _ in range(3):
        per_window = []
        for consumer in ('c1', 'c2', 'c1', 'c2'):
            per_window += bodies(read(b, ['q'], consumer, 3))
        assert len(per_window) == 1
        got += per_window
        next_window(c, 'q')
    assert got == ['m0', 'm1', 'm2']


def test_a_queue_without_the_argument_is_not_limited_and_writes_no_state(script_client):
    c = script_client
    b = broker(c)
    b.declare('q', stored_pairs('q', {'x-max-length': 100}))
    for n in range(5):
        b.publish('q', 0, body(n))
    r = read(b, ['q'], 'c1', 10)
    assert len(r.deliveries) == 5 and r.dues[('q', None)] == -1
    assert c.exists(K.rate('q')) == 0


def test_priorities_and_requeued_first_hold_under_the_limit(script_client):
    c = script_client
    b = limited(c, 'q', '1/h')
    b.publish('q', 9, body(1))
    b.publish('q', 0, body(2))
    b.publish('q', 3, body(3))
    order = []
    for _ in range(3):
        order += bodies(read(b, ['q'], 'c1', 10))
        next_window(c, 'q')
    assert order == ['m2', 'm3', 'm1']
    b.publish('q', 3, body(4))
    b.publish('q', 3, body(5))
    [d] = read(b, ['q'], 'c1', 10).deliveries
    b.requeue('q', [(d.stream, d.entry_id)])
    assert read(b, ['q'], 'c1', 10).deliveries == []  # requeued, but the slot is used
    next_window(c, 'q')
    [again] = read(b, ['q'], 'c2', 10).deliveries
    assert again.entry_id == d.entry_id and again.deliveries == 2
    next_window(c, 'q')
    assert [json.loads(x.payload)['body'] for x in read(b, ['q'], 'c1', 10).deliveries] == [
        'm5']


def test_a_delayed_message_due_before_the_slot_is_the_due_time(script_client):
    c = script_client
    b = limited(c, 'q', '1/h')
    b.publish('q', 0, body(1))
    b.publish('q', 0, body(2))
    b.publish('q', 0, body(3), delay=Delay('+60000', 0, 'later'))
    r = read(b, ['q'], 'c1', 10)
    assert bodies(r) == ['m1']
    assert 55_000 < r.dues[('q', None)] <= 60_001  # the delayed one (ms rounded up)


def test_several_queues_in_one_read_each_keep_their_own_limit(script_client):
    c = script_client
    b = limited(c, 'q', '1/h')
    limited(c, 's', '2/h', 2)
    b.declare('r')
    for n in range(3):
        for queue in ('q', 'r', 's'):
            b.publish(queue, 0, json.dumps({'body': f'{queue}{n}'}))
    r = read(b, ['q', 'r', 's'], 'c1', 10)
    assert bodies(r) == ['q0', 'r0', 'r1', 'r2', 's0', 's1']
    assert r.dues[('r', None)] == -1
    assert HOUR - 5_000 < r.dues[('q', None)] <= HOUR
    assert HOUR // 2 - 5_000 < r.dues[('s', None)] <= HOUR // 2
    assert r.status == {('q', None): '0', ('r', None): '0', ('s', None): '0'}
    # the limit cut q's share, not the call: COUNT left over went to the queues after it
    r = read(b, ['q', 'r', 's'], 'c2', 10)
    assert r.deliveries == []


def test_a_wrong_type_at_the_rate_state_or_arguments_stops_that_queue_only(script_client):
    c = script_client
    b = limited(c, 'q', '1/h')
    b.declare('r')
    b.publish('q', 0, body(1))
    b.publish('r', 0, body(2))
    c.rpush(K.rate('q'), 'not ours')
    r = read(b, ['q', 'r'], 'c1', 10)
    assert bodies(r) == ['m2']
    [(source, error)] = r.problems
    assert source == ('q', None) and K.rate('q') in error and r.status[('q', None)] == 'e'
    c.delete(K.rate('q'))
    assert bodies(read(b, ['q'], 'c1', 10)) == ['m1']


def test_an_unreadable_stored_rate_is_a_problem_not_ignored(script_client):
    c = script_client
    b = limited(c, 'q', '1/h')
    b.publish('q', 0, body(1))
    c.hset(K.args('q'), 'x-rate-limit', 'lots')  # another program wrote it
    r = read(b, ['q'], 'c1', 10)
    assert r.deliveries == [] and 'invalid x-rate-limit lots' in r.problems[0][1]
    assert c.xlen(K.stream('q', 0)) == 1


def test_expired_messages_do_not_use_the_allowance(fake_clock):
    c, clock = fake_clock
    b = broker(c)
    b.declare('q', stored_pairs('q', {'x-rate-limit': '1/h', 'x-message-ttl': 100}))
    b.publish('q', 0, body(1))
    b.publish('q', 0, body(2))
    clock.ms += 200
    b.publish('q', 0, body(3))
    r = read(b, ['q'], 'c1', 10)
    assert bodies(r) == ['m3'] and [a[3] for a in r.aside] == ['expired', 'expired']


def test_the_burst_refills_one_interval_at_a_time(fake_clock):
    """GCRA, not a fixed window: '4/s' burst 2 lets 2 through, then one per 250 ms."""
    c, clock = fake_clock
    b = limited(c, 'q', '4/s', 2)
    for n in range(10):
        b.publish('q', 0, body(n))
    assert len(read(b, ['q'], 'c1', 10).deliveries) == 2
    clock.ms += 249
    r = read(b, ['q'], 'c2', 10)
    assert r.deliveries == [] and r.dues[('q', None)] == 1
    clock.ms += 1
    assert len(read(b, ['q'], 'c1', 10).deliveries) == 1
    clock.ms += 1000  # idle for longer than the burst needs: at most the burst
    assert len(read(b, ['q'], 'c2', 10).deliveries) == 2


class RateLimitedQueue(RuleBasedStateMachine):
    """Publish, read by two consumers, ack and requeue while fakeredis's clock moves, on a
    queue limited to '4/s' with a burst of 2: no stretch of time ever sees more deliveries
    than the burst plus one per interval, every read delivers exactly what a GCRA of its
    own allows (never fewer: nothing is held back needlessly), and every message published
    is ready, in flight or acked: none lost. (A requeued message, delivered before, goes
    out alone, so a read may then deliver fewer, never none.)"""

    INTERVAL, BURST = 250.0, 2

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.clock = FakeClock(server_ms(self.c))
        self.restore_clock = install_clock(self.clock)
        self.b = limited(self.c, 'q', '4/s', self.BURST)
        self.n = 0
        self.tat = 0.0
        self.times: list[int] = []
        self.in_flight: dict[str, Any] = {}
        self.acked: set[str] = set()
        self.requeued: set[str] = set()  # parked with the holder, delivered before

    def teardown(self) -> None:
        self.restore_clock()

    @rule(level=st.sampled_from(LEVELS))
    def publish(self, level: int) -> None:
        self.n += 1
        self.b.publish('q', level, json.dumps({'body': f'm{self.n}'}))

    @rule(ms=st.sampled_from([1, 50, 249, 250, 700, 5000]))
    def advance(self, ms: int) -> None:
        self.clock.ms += ms

    @rule(consumer=st.sampled_from(['c1', 'c2']), count=st.integers(1, 3))
    def read(self, consumer: str, count: int) -> None:
        now = math.floor(self.clock.ms)
        ready = self.n - len(self.in_flight) - len(self.acked)
        tat = max(self.tat, now)
        tau = (self.BURST - 1) * self.INTERVAL
        allow = math.floor((now + tau - tat) / self.INTERVAL) + 1 if tat - now <= tau else 0
        got = read(self.b, ['q'], consumer, count).deliveries
        expected = min(count, ready, allow)
        if self.requeued:  # a message delivered before goes alone (a suspect): maybe fewer
            assert min(expected, 1) <= len(got) <= expected
        else:
            assert len(got) == expected
        self.tat = tat + len(got) * self.INTERVAL
        for d in got:
            name = json.loads(d.payload)['body']
            self.in_flight[name] = d
            self.requeued.discard(name)
            self.times.append(now)

    @precondition(lambda self: self.in_flight)
    @rule(how=st.sampled_from(['ack', 'requeue']), data=st.data())
    def settle(self, how: str, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        d = self.in_flight.pop(name)
        if how == 'requeue':
            self.b.requeue('q', [(d.stream, d.entry_id)])
            self.requeued.add(name)
        else:
            self.b.ack('q', [(d.stream, d.entry_id)])
            self.acked.add(name)

    @invariant()
    def never_more_than_the_rate_allows(self) -> None:
        times = self.times
        for i in range(len(times)):
            for j in range(i, len(times)):
                allowed = self.BURST + math.floor((times[j] - times[i]) / self.INTERVAL)
                assert j - i + 1 <= allowed, (times[i], times[j], j - i + 1)

    @invariant()
    def none_lost(self) -> None:
        stored = {json.loads(f[b'm'])['body'] for lv in LEVELS
                  for _, f in self.c.xrange(K.stream('q', lv))}
        assert not (stored & self.acked)
        assert stored | self.acked == {f'm{i}' for i in range(1, self.n + 1)}
        assert set(self.in_flight) <= stored


TestRateLimitedQueue = RateLimitedQueue.TestCase
TestRateLimitedQueue.settings = PROPERTY


# -- Kombu, the CLI ------------------------------------------------------------------------

def _script_calls(c: Any) -> int:
    stats = c.info('commandstats')
    return sum(int(stats.get(f'cmdstat_{name}', {}).get('calls', 0))
               for name in ('evalsha', 'eval'))


def test_a_consumer_waits_for_the_slot_without_polling(url, redis_url):
    """'4/s', burst 1: a consumer drains three messages one slot apart. Its reads are told
    the next slot and it waits until then: a handful of script calls, where a consumer
    spinning on a limited queue would make hundreds in the same half second."""
    c = redis.Redis.from_url(redis_url)
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        message.ack()

    # polling_interval 30: no wait ends by itself while the test runs
    with Connection(url, transport_options={'polling_interval': 30}) as conn:
        queue = Queue('slow', queue_arguments={'x-rate-limit': '4/s'})
        producer = Producer(conn.default_channel, serializer='json')
        for n in range(3):
            producer.publish({'n': n}, routing_key='slow', declare=[queue])
        before = _script_calls(c)
        channel = conn.channel()
        with Consumer(channel, [queue], callbacks=[on_message], accept=['json']):
            for _ in range(200):
                if len(got) == 3:
                    break
                try:
                    conn.drain_events(timeout=5)
                except socket.timeout:  # TimeoutError from Python 3.10
                    pass
        assert got == [{'n': 0}, {'n': 1}, {'n': 2}]
        calls = _script_calls(c) - before
        assert calls <= 20, calls


def test_kombu_queue_arguments_carry_the_rate_and_bad_ones_fail_at_declare(url, redis_url):
    c = redis.Redis.from_url(redis_url)
    with Connection(url) as conn:
        Queue('rq', queue_arguments={'x-rate-limit': 100, 'x-rate-burst': 10})(
            conn.default_channel).declare()
        assert broker(c).limits('rq') == {'x-rate-limit': '100/s', 'x-rate-burst': 10}
        with pytest.raises(ValueError, match="'rq2': argument x-rate-limit='often'"):
            Queue('rq2', queue_arguments={'x-rate-limit': 'often'})(
                conn.default_channel).declare()


def test_cli_limits_shows_and_changes_the_rate(redis_url):
    from tests.test_cli import cli, cli_json
    c = redis.Redis.from_url(redis_url)
    b = broker(c)
    b.declare('lq')
    out = cli(redis_url, 'limits', 'lq', '--set', 'x-rate-limit=30/m', 'x-rate-burst=3')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'lq: x-rate-burst=3 x-rate-limit=30/m'
    for n in range(5):
        b.publish('lq', 0, body(n))
    assert len(read(b, ['lq'], 'c1', 10).deliveries) == 3  # the burst, set at run time
    assert 'rate 30/m burst 3' in cli(redis_url, 'status', 'lq').stdout
    bad = cli(redis_url, 'limits', 'lq', '--set', 'x-rate-limit=30/week')
    assert bad.returncode == 2 and 'x-rate-limit' in bad.stderr
    assert cli_json(redis_url, 'limits', 'lq', '--clear')['arguments'] == {}
    assert len(read(b, ['lq'], 'c1', 10).deliveries) == 2  # no limit: the rest
