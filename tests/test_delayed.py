"""Delayed delivery: messages with a due time wait in Redis and reach consumers when due.

Script tests run on fakeredis (with a clock the test moves: fakeredis answers TIME from
``time.time`` of its server module) and on real servers (short real delays); the Kombu API
tests use real servers and real waits.
"""

from __future__ import annotations

import json
import re
import socket
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from helpers import read_messages
from hypothesis import given
from hypothesis import strategies as st
from kombu import Connection, Consumer, Producer, Queue

from kombu_streams import due
from kombu_streams.broker import Broker, Delay
from kombu_streams.keys import Keys
from kombu_streams.scripts import KeyTypeError
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]


def broker(c):
    return Broker(c, K, LEVELS)


class Clock:
    """fakeredis's TIME, moved by the test."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.ms = start_ms

    def time(self) -> float:
        return self.ms / 1000.0


@pytest.fixture
def clock(monkeypatch):
    from fakeredis.commands_mixins import server_mixin
    c = Clock()
    monkeypatch.setattr(server_mixin, 'time', SimpleNamespace(time=c.time))
    return c


@pytest.fixture
def fake(fake_client, clock):
    broker(fake_client).declare('q')
    return fake_client


def pub(c, body, level=0, due_spec='', threshold=0, label='', queue='q', delayed_on=True):
    payload = json.dumps({'b': body})
    delay = Delay(due_spec, threshold, label) if delayed_on else None
    return broker(c).publish(queue, level, payload, delay=delay)


def read(c, count=100, queue='q'):
    return [json.loads(d.payload)['b'] for d in read_messages(broker(c), [queue], 'c1', count)]


def read_result(c, count=100, queues=('q',)):
    b = broker(c)
    sources = b.sources(list(queues))
    call, parse = b.read_call(sources, 'c1', count)
    script, keys, args = call
    return parse(script(c, keys, args))


# -- the header -----------------------------------------------------------------------------


def test_due_from_headers():
    assert due.when({'headers': {'x-delay': 1500}}) == ('+1500', '')
    assert due.when({'headers': {'x-delay': '250', 'id': 't1'}}) == ('+250', 't1')
    assert due.when({'headers': {'x-delay': 0}}) == ('', '')
    assert due.when({'headers': {'x-delay': 'soon'}}) == ('', '')
    assert due.when({'headers': {'x-delay': True}}) == ('', '')
    assert due.when({'headers': None}) == ('', '')
    assert due.when({}) == ('', '')
    at = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    ms = int(at.timestamp() * 1000)
    assert due.when({'headers': {'eta': at.isoformat(), 'id': 'x' * 100}}) == (
        f'@{ms}', 'x' * due.LABEL_MAX)
    # an offset is exact; a naive time is UTC, as Celery's worker reads it
    plus2 = at.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert due.when({'headers': {'eta': plus2}})[0] == f'@{ms}'
    assert due.when({'headers': {'eta': at.replace(tzinfo=None).isoformat()}})[0] == f'@{ms}'
    assert due.when({'headers': {'eta': '2030-01-02T03:04:05.678Z'}})[0] == f'@{ms}'
    assert due.when({'headers': {'eta': 'tomorrow'}}) == ('', '')
    assert due.when({'headers': {'eta': None}}) == ('', '')


def test_naive_eta_matches_celery_worker():
    """Whatever the app's timezone, Celery's worker reads a naive eta as UTC."""
    celery_time = pytest.importorskip('celery.utils.time')
    naive = '2031-06-01T12:00:00'
    for tz in ('UTC', 'Europe/Berlin', 'America/New_York'):
        from zoneinfo import ZoneInfo
        worker = celery_time.maybe_make_aware(celery_time.maybe_iso8601(naive), ZoneInfo(tz))
        assert int(worker.timestamp() * 1000) == due.eta_ms(naive)


# -- scripts on fakeredis with a moving clock -------------------------------------------------


def test_kept_until_due_then_served(fake, clock):
    r = pub(fake, 'later', due_spec='+5000')
    assert re.match(rb'delayed:\d{16}:0:$', r)
    assert pub(fake, 'now') != r
    assert read(fake) == ['now']
    assert fake.zcard(K.delayed('q')) == 1
    clock.ms += 4999
    assert read(fake) == []
    clock.ms += 1
    assert read(fake) == ['later']
    assert fake.zcard(K.delayed('q')) == 0
    assert fake.hlen(K.delayed_messages('q')) == 0
    assert b'd' not in fake.smembers(K.ready('q'))


def test_threshold_publishes_soon_messages_at_once(fake, clock):
    pub(fake, 'soon', due_spec='+999', threshold=1000)
    pub(fake, 'past', due_spec=f'@{clock.ms - 10_000}', threshold=1000)
    assert fake.exists(K.delayed('q')) == 0
    assert read(fake) == ['soon', 'past']


def test_absolute_due_and_priority_kept(fake, clock):
    pub(fake, 'low', level=9, due_spec=f'@{clock.ms + 2000}')
    pub(fake, 'high', level=0, due_spec=f'@{clock.ms + 3000}')
    pub(fake, 'mid', level=3)
    clock.ms += 3000
    # both promoted in one read; each goes to its own level's stream: high first
    assert read(fake) == ['high', 'mid', 'low']


def test_due_order_and_never_early(fake, clock):
    for i, d in enumerate([3000, 1000, 2000, 1000]):
        pub(fake, f'm{i}:{d}', due_spec=f'+{d}')
    clock.ms += 1000
    assert read(fake) == ['m1:1000', 'm3:1000']
    clock.ms += 1500
    assert read(fake) == ['m2:2000']
    clock.ms += 500
    assert read(fake) == ['m0:3000']


def test_read_reports_next_due(fake, clock):
    pub(fake, 'a', due_spec='+1500')
    result = read_result(fake)
    assert result.dues == {('q', None): 1500}
    clock.ms += 1500
    result = read_result(fake)
    assert [d.payload for d in result.deliveries] == [b'{"b": "a"}']
    assert result.dues == {('q', None): -1}


def test_publish_after_a_due_time_queues_up_behind_it(fake, clock):
    """A message published after another one's due time is served after it, even when no
    consumer read in between."""
    pub(fake, 'delayed', due_spec='+1000')
    clock.ms += 2000
    pub(fake, 'after')
    assert read(fake) == ['delayed', 'after']


def test_publish_behind_a_due_backlog_keeps_order(fake, clock):
    n = 250  # more than one publish moves (100)
    for i in range(n):
        pub(fake, i, due_spec=f'+{1000 + i}')
    clock.ms += 5000
    pub(fake, 'after')
    got = []
    while True:
        batch = read(fake, count=100)
        if not batch:
            break
        got += batch
    assert got == list(range(n)) + ['after']


def test_read_moves_at_most_a_batch_per_call(fake, clock):
    # a few more than the batch (PROMOTE, 500, in read.lua): fakeredis's sorted sets make
    # each publish slower the more are delayed (1,200 took 20 s)
    for i in range(520):
        pub(fake, i, due_spec='+1000')
    clock.ms += 1000
    result = read_result(fake, count=10)
    assert len(result.deliveries) == 10
    assert fake.zcard(K.delayed('q')) == 20  # 500 moved by this call
    assert result.dues == {('q', None): 0}
    assert result.status == {('q', None): '1'}


def test_new_earliest_sets_the_marker(fake, clock):
    fake.delete(K.wake('q'))
    pub(fake, 'a', due_spec='+5000')
    assert fake.zcard(K.wake('q')) == 1  # a consumer wakes and learns the due time
    read(fake)
    assert fake.zcard(K.wake('q')) == 0
    pub(fake, 'b', due_spec='+9000')  # not the earliest: the known due time still holds
    assert fake.zcard(K.wake('q')) == 0
    pub(fake, 'c', due_spec='+2000')
    assert fake.zcard(K.wake('q')) == 1


def test_a_read_that_moves_due_messages_sets_the_marker(fake, clock):
    """Moving due messages makes work ready: even a read that did not pop the marker (a
    hot one, mode 'r') sets it, so other consumers wake for what it left."""
    for body in 'abc':
        pub(fake, body, due_spec='+1000')
    read(fake)  # learns the due time; nothing is ready yet
    assert fake.zcard(K.wake('q')) == 0
    clock.ms += 1000
    assert read(fake, count=1) == ['a']
    assert fake.zcard(K.wake('q')) == 1
    assert read(fake, count=1) == ['b']  # moved nothing: the marker is left as it was
    fake.delete(K.wake('q'))
    assert read(fake, count=1) == ['c']
    assert fake.zcard(K.wake('q')) == 0


def test_same_message_twice_is_kept_twice(fake, clock):
    pub(fake, 'same', due_spec='+1000')
    pub(fake, 'same', due_spec='+1000')
    assert fake.zcard(K.delayed('q')) == 2
    clock.ms += 1000
    assert read(fake) == ['same', 'same']


def test_label_names_the_member(fake, clock):
    pub(fake, 'x', level=3, due_spec='+1000', label='task-1')
    [member] = fake.zrange(K.delayed('q'), 0, -1)
    assert re.match(rb'\d{16}:3:task-1$', member)


def test_routed_copy_to_missing_queue_is_dropped(fake, clock):
    b = broker(fake)
    assert b.publish('gone', 0, '{}', routed=True, delay=Delay('+5000', 0, '')) is None
    assert fake.keys('*gone*') == []


def test_purge_and_delete_take_delayed_messages(fake, clock):
    for i in range(5):
        pub(fake, i, due_spec='+1000')
    pub(fake, 'now')
    assert broker(fake).size('q') == 1  # ready only
    assert broker(fake).purge('q', batch=2) == 6
    assert fake.exists(K.delayed('q'), K.delayed_messages('q')) == 0
    pub(fake, 'again', due_spec='+1000')
    broker(fake).delete('q')
    assert fake.keys('*') == []


def test_member_not_ours_goes_to_first_stream(fake, clock):
    fake.zadd(K.delayed('q'), {'junk': clock.ms})
    fake.hset(K.delayed_messages('q'), 'junk', json.dumps({'b': 'junk'}))
    fake.zadd(K.delayed('q'), {'1800000000000000:0:orphan': clock.ms})  # its message is gone
    fake.sadd(K.ready('q'), 'd')
    assert read(fake) == ['junk']
    assert fake.zcard(K.delayed('q')) == 0


def test_walk_finds_delayed_set_the_index_lost(fake, clock):
    pub(fake, 'a', due_spec='+1000')
    fake.delete(K.ready('q'))  # the index is lost: the next read walks
    clock.ms += 1000
    assert read(fake) == ['a']


def test_wrong_type_delayed_key_is_a_problem_of_that_queue(fake, clock):
    broker(fake).declare('ok')
    fake.sadd(K.ready('q'), 'd')
    fake.set(K.delayed('q'), 'not a zset')
    pub(fake, 'fine', queue='ok')
    result = read_result(fake, queues=('q', 'ok'))
    assert [json.loads(d.payload)['b'] for d in result.deliveries] == ['fine']
    assert [s for s, _ in result.problems] == [('q', None)]
    # a publish to it is refused and writes nothing: types first (docs/design.rst)
    before = fake.xlen(K.stream('q', 0))
    with pytest.raises(KeyTypeError):
        pub(fake, 'still')
    assert fake.xlen(K.stream('q', 0)) == before


def test_delayed_off_publishes_at_once(fake, clock):
    pub(fake, 'x', due_spec='+5000', delayed_on=False)
    assert read(fake) == ['x']


def test_expiring_queue_keys_expire_together(fake, clock):
    b = broker(fake)
    b.touch('q', 60_000)
    pub(fake, 'x', due_spec='+5000')
    assert 0 < fake.pttl(K.delayed('q')) <= 60_000
    assert 0 < fake.pttl(K.delayed_messages('q')) <= 60_000


def test_promoted_entry_that_is_no_message_goes_to_the_envelope_check(fake, clock):
    pub(fake, 'good', due_spec='+1000')
    fake.zadd(K.delayed('q'), {'1800000000000001:0:': clock.ms + 1000})
    fake.hset(K.delayed_messages('q'), '1800000000000001:0:', 'not json')
    clock.ms += 1000
    got = read_messages(broker(fake), ['q'], 'c1', 10)
    # read.lua hands both out; the channel's envelope check dead-letters the bad one
    assert sorted(d.payload for d in got) == [b'not json', b'{"b": "good"}']


def test_prefixed_keys(fake_client, clock):
    b = Broker(fake_client, Keys('app1:'), LEVELS)
    b.declare('q')
    b.publish('q', 0, '{"b": 1}', delay=Delay('+1000', 0, ''))
    assert fake_client.zcard('app1:ks:q:{q}:delayed') == 1
    clock.ms += 1000
    assert [d.payload for d in read_messages(b, ['q'], 'c1', 10)] == [b'{"b": 1}']


def test_scheduled_lists_earliest_first(fake, clock):
    pub(fake, 'b', level=3, due_spec='+2000', label='task-b')
    pub(fake, 'a', due_spec='+1000', label='task-a')
    data = broker(fake).scheduled('q', 10, bodies=True)
    assert data['delayed'] == 2
    assert [(m['label'], m['level'], m['due_in_ms']) for m in data['messages']] == [
        ('task-a', 0, 1000), ('task-b', 3, 2000)]
    assert json.loads(data['messages'][0]['message']) == {'b': 'a'}
    assert broker(fake).scheduled('q', 1)['messages'][0].get('message') is None


def test_cancel_by_label_in_bounded_steps(fake, clock):
    for i in range(30):
        pub(fake, i, due_spec='+1000', label=f't{i % 10}')
    pub(fake, 'same-id', due_spec='+1000', label='t3')  # same label, same µs: a counter
    gone = broker(fake).cancel('q', ['t3', 't7', 'nope'], step=5)
    assert len(gone) == 7
    assert fake.zcard(K.delayed('q')) == fake.hlen(K.delayed_messages('q')) == 24
    clock.ms += 1000
    left = read(fake)
    assert sorted(left) == sorted(i for i in range(30) if i % 10 not in (3, 7))
    assert broker(fake).cancel('q', ['t3']) == []


# -- the model: time advances ---------------------------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just('pub'), st.integers(0, 3000), st.sampled_from(LEVELS)),
    st.tuples(st.just('tick'), st.integers(0, 2500)),
    st.tuples(st.just('read'), st.integers(1, 20)),
), max_size=40)


@PROPERTY
@given(ops=OPS)
def test_model_time_advances(fake_client, clock, ops):
    """Nothing is delivered early; nothing is lost; once due, a message is served before any
    message published later; each level gets its delayed messages in due order."""
    fake_client.flushall()
    broker(fake_client).declare('q')
    threshold = 1000
    published = {}  # body -> (due ms, publish ms, level)
    delivered = []
    n = 0

    def take(count):
        for d in read_messages(broker(fake_client), ['q'], 'c1', count):
            body = json.loads(d.payload)['b']
            assert published[body][0] <= clock.ms, 'delivered before it was due'
            delivered.append(body)
            broker(fake_client).ack('q', [(d.stream, d.entry_id)])

    for op in ops:
        if op[0] == 'pub':
            _, delay, level = op
            body = f'm{n}'
            n += 1
            published[body] = (clock.ms + (delay if delay >= threshold else 0), clock.ms, level)
            pub(fake_client, body, level=level, due_spec=f'+{delay}' if delay else '',
                threshold=threshold)
        elif op[0] == 'tick':
            clock.ms += op[1]
        else:
            take(op[1])
    while True:  # drain what is due now
        before = len(delivered)
        take(100)
        if len(delivered) == before:
            break
    due_now = {b for b, (d, _, _) in published.items() if d <= clock.ms}
    assert set(delivered) == due_now, 'a due message was not delivered, or one twice'
    assert len(delivered) == len(set(delivered))
    left = fake_client.zcard(K.delayed('q'))
    assert left == len(published) - len(due_now)
    position = {b: i for i, b in enumerate(delivered)}
    for level in LEVELS:
        late = [b for b in delivered if published[b][2] == level and published[b][0] >
                published[b][1]]
        assert [published[b][0] for b in late] == sorted(published[b][0] for b in late)
    for a, (due_a, pub_a, lvl_a) in published.items():
        for b, (_, pub_b, lvl_b) in published.items():
            if (a in position and b in position and lvl_a == lvl_b and due_a > pub_a
                    and pub_b > due_a and position[b] < position[a]):
                # b was published after a was due, yet served first: only allowed if b
                # was read before a became due... which cannot be
                pytest.fail(f'{b} (published at {pub_b}) overtook {a} (due {due_a})')


# -- real servers ---------------------------------------------------------------------------


def test_promotion_on_real_server(script_client):
    c = script_client
    broker(c).declare('q')
    pub(c, 'later', due_spec='+150')
    pub(c, 'now')
    assert read(c) == ['now']
    result = read_result(c)
    assert 0 < result.dues[('q', None)] <= 151  # the due ms is rounded up
    time.sleep(0.2)
    assert read(c) == ['later']
    assert c.exists(K.delayed('q'), K.delayed_messages('q')) == 0


def test_publish_after_a_due_time_queues_up_behind_it_on_real_server(script_client):
    c = script_client
    broker(c).declare('q')
    pub(c, 'delayed-a', level=3, due_spec='+60')
    pub(c, 'delayed-b', level=3, due_spec='+80')
    time.sleep(0.1)
    pub(c, 'after', level=3)  # queues up behind both: they were due before it was published
    assert read(c) == ['delayed-a', 'delayed-b', 'after']


def test_cancel_and_scheduled_on_real_server(script_client):
    c = script_client
    broker(c).declare('q')
    for i in range(12):
        pub(c, i, due_spec='+60000', label=f't{i % 4}')
    data = broker(c).scheduled('q', 3)
    assert data['delayed'] == 12 and len(data['messages']) == 3
    assert 59_000 < data['messages'][0]['due_in_ms'] <= 60_001
    assert len(broker(c).cancel('q', ['t1'], step=2)) == 3
    assert c.zcard(K.delayed('q')) == c.hlen(K.delayed_messages('q')) == 9


def _consume(url, queue, n, timeout=10.0, start=None, **options):
    """Consume n messages through Kombu's API: [(body, seconds after ``start``)]."""
    got = []
    start = time.time() if start is None else start
    with Connection(url, transport_options=options) as conn:
        def on_message(body, message):
            got.append((body, time.time() - start))
            message.ack()
        with Consumer(conn, [queue], callbacks=[on_message], accept=['json']):
            deadline = start + timeout
            while len(got) < n and time.time() < deadline:
                try:
                    conn.drain_events(timeout=deadline - time.time())
                except socket.timeout:
                    break
    return got


def test_x_delay_through_kombu(url, redis_client):
    queue = Queue('kd', routing_key='kd')
    start = time.time()
    with Connection(url) as conn:
        producer = Producer(conn, serializer='json')
        producer.publish({'n': 'late'}, routing_key='kd', declare=[queue],
                         headers={'x-delay': 1200})
        producer.publish({'n': 'now'}, routing_key='kd', declare=[queue])
        with conn.channel() as ch:
            assert ch.queue_declare('kd', passive=True).message_count == 1  # ready only
    assert redis_client.zcard(K.delayed('kd')) == 1
    # polling_interval 30 s: the wait ends at the due time, not at the next poll
    got = _consume(url, queue, 2, start=start, polling_interval=30)
    assert [b['n'] for b, _ in got] == ['now', 'late']
    assert got[1][1] >= 1.2, 'delivered early'
    assert got[1][1] < 5.0, 'not woken by the due time'


def test_delayed_delivery_off_through_kombu(url, redis_client):
    queue = Queue('ko', routing_key='ko')
    with Connection(url, transport_options={'delayed_delivery': False}) as conn:
        Producer(conn, serializer='json').publish(
            {'n': 1}, routing_key='ko', declare=[queue], headers={'x-delay': 60_000})
    assert redis_client.exists(K.delayed('ko')) == 0
    assert [b['n'] for b, _ in _consume(url, queue, 1)] == [1]


@pytest.mark.parametrize('bad', [('delayed_delivery', 'yes'), ('delayed_threshold', -1),
                                 ('delayed_threshold', 'x')])
def test_options_checked(url, bad):
    name, value = bad
    with pytest.raises(ValueError, match=name):
        with Connection(url, transport_options={name: value}) as conn:
            conn.channel()


def test_purge_counts_delayed_through_kombu(url, redis_client):
    queue = Queue('kp', routing_key='kp')
    with Connection(url) as conn:
        producer = Producer(conn, serializer='json')
        for i in range(3):
            producer.publish({'n': i}, routing_key='kp', declare=[queue],
                             headers={'x-delay': 60_000})
        with conn.channel() as ch:
            assert ch.queue_purge('kp') == 3
    assert redis_client.exists(K.delayed('kp')) == 0



def test_wait_is_ended_at_the_due_time(url, redis_client):
    """A quiet server answers a BZPOPMIN timeout only at its next cron tick (every 100 ms
    at hz 10): a wait that a due time ends is cut with CLIENT UNBLOCK instead. The server
    runs at hz 1 here (a tick a second), so a timeout answered at a tick cannot end these
    waits first on a loaded machine, where the unblock may run 100 ms late."""
    queue = Queue('ku', routing_key='ku')
    with Connection(url) as conn:
        producer = Producer(conn, serializer='json')
        for n, delay in enumerate((1100, 1400, 1700)):
            producer.publish({'n': n}, routing_key='ku', declare=[queue],
                             headers={'x-delay': delay})
    hz = redis_client.config_get('hz')['hz']
    redis_client.config_set('hz', 1)
    try:
        redis_client.config_resetstat()
        got = _consume(url, queue, 3, polling_interval=30)
    finally:
        redis_client.config_set('hz', hz)
    assert [b['n'] for b, _ in got] == [0, 1, 2]
    stats = redis_client.info('commandstats')
    assert stats.get('cmdstat_client|unblock', {}).get('calls', 0) >= 1, stats.keys()
