"""x-max-length-bytes: the bytes of the messages a queue holds waiting (ready, requeued,
delayed, staged; not in flight), kept in its counters hash by every script that moves a
message into or out of waiting (lua/lib/bytes.lua). Scripts on fakeredis, Redis 6.2 and 7.0
(``script_client``), a hypothesis model of the count under every move, and the Kombu API
on a real Redis. docs/design.rst, "Queue arguments and limits"."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import read_messages
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kombu import Connection, Exchange, Producer, Queue

from kombu_streams import QueueFull
from kombu_streams.broker import Broker, Delay
from kombu_streams.keys import Keys
from kombu_streams.limits import stored_pairs
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]


def limited(c: Any, size: int, overflow: str = 'reject-publish', queue: str = 'q',
            **more: Any) -> Broker:
    b = Broker(c, K, LEVELS)
    b.declare(queue, stored_pairs(queue, {'x-max-length-bytes': size, 'x-overflow': overflow,
                                          **more}))
    return b


def msg(name: str, size: int) -> str:
    """An envelope of exactly ``size`` bytes naming ``name``."""
    head = json.dumps({'body': name, 'pad': ''})
    text = json.dumps({'body': name, 'pad': 'x' * (size - len(head))})
    assert len(text) == size
    return text


def name_of(payload: Any) -> str:
    return json.loads(payload)['body']


def waiting(c: Any, queue: str = 'q') -> int | None:
    v = c.hget(K.counters(queue), 'waiting-bytes')
    return None if v is None else int(v)


def test_reject_publish_refuses_past_the_bytes_and_a_delivery_makes_room(script_client):
    c = script_client
    b = limited(c, 300)
    b.publish('q', 0, msg('a', 100))
    b.publish('q', 0, msg('b', 200))
    assert waiting(c) == 300
    with pytest.raises(QueueFull, match='x-max-length-bytes 300 reached'):
        b.publish('q', 0, msg('c', 30))
    assert int(c.hget(K.counters('q'), 'refused')) == 1
    got = read_messages(b, ['q'], 'c1', 1)  # in flight: counts no more
    assert [name_of(d.payload) for d in got] == ['a']
    assert waiting(c) == 200
    b.publish('q', 0, msg('c', 100))
    assert waiting(c) == 300
    b.ack('q', [(got[0].stream, got[0].entry_id)])  # an ack changes nothing
    assert waiting(c) == 300


def test_a_message_over_the_limit_alone_is_never_stored(script_client):
    c = script_client
    b = limited(c, 100, 'drop-head')
    b.publish('q', 0, msg('a', 60))
    with pytest.raises(QueueFull, match='a message of 101 bytes is over its x-max-length'):
        b.publish('q', 0, msg('big', 101))
    assert [name_of(d.payload) for d in read_messages(b, ['q'], 'c1', 5)] == ['a']
    assert b.dead_letters('q') == []


def test_drop_head_sets_aside_as_many_heads_as_the_new_message_needs(script_client):
    c = script_client
    b = limited(c, 300, 'drop-head')
    for name in 'abc':
        b.publish('q', 0, msg(name, 100))
    b.publish('q', 9, msg('d', 250))  # three heads must go, in serving order
    letters = [(f[b'reason'], name_of(f[b'f:m'])) for _, f in b.dead_letters('q')]
    assert letters == [(b'max-length', 'a'), (b'max-length', 'b'), (b'max-length', 'c')]
    assert int(c.hget(K.counters('q'), 'overflowed')) == 3
    assert waiting(c) == 250
    assert [name_of(d.payload) for d in read_messages(b, ['q'], 'c1', 5)] == ['d']
    assert waiting(c) == 0


def test_requeue_and_reclaim_count_a_message_back(script_client):
    c = script_client
    b = limited(c, 1000)
    b.publish('q', 0, msg('a', 100))
    b.publish('q', 0, msg('b', 200))
    a, bb = read_messages(b, ['q'], 'c1', 2)
    assert waiting(c) == 0
    b.requeue('q', [(a.stream, a.entry_id)], consumer='c1')
    assert waiting(c) == 100
    b.requeue('q', [(a.stream, a.entry_id)])  # an operator's, of one waiting: once
    assert waiting(c) == 100
    assert b.reclaim('q', 0, 100).moved == 1  # b's lease ran out: it waits again
    assert waiting(c) == 300
    got = read_messages(b, ['q'], 'c2', 5) + read_messages(b, ['q'], 'c2', 5)  # one each:
    assert sorted(name_of(d.payload) for d in got) == ['a', 'b']  # redelivered, alone
    assert waiting(c) == 0


def test_delayed_messages_count_and_cancel_frees_them(script_client):
    c = script_client
    b = limited(c, 250)
    b.publish('q', 0, msg('later', 200), delay=Delay('+600000', 1000, 'job-1'))
    assert waiting(c) == 200
    with pytest.raises(QueueFull):
        b.publish('q', 0, msg('now', 100))
    assert len(b.cancel('q', ['job-1'])) == 1
    assert waiting(c) == 0
    b.publish('q', 0, msg('now', 100))
    assert waiting(c) == 100


def test_purge_leaves_nothing_waiting(script_client):
    c = script_client
    b = limited(c, 10_000)
    for n in range(5):
        b.publish('q', LEVELS[n % 4], msg(f'm{n}', 100))
    b.publish('q', 0, msg('later', 100), delay=Delay('+600000', 1000, 'x'))
    (d,) = read_messages(b, ['q'], 'c1', 1)
    assert waiting(c) == 500
    assert b.purge('q', batch=2) == 5  # in several calls; the last one sets 0
    assert waiting(c) == 0
    b.ack('q', [(d.stream, d.entry_id)])
    assert waiting(c) == 0


def test_big_messages_count_by_their_body(script_client):
    c = script_client
    b = limited(c, 3000)
    b.publish_big('q', 0, msg('big', 2500))
    assert waiting(c) == 2500
    with pytest.raises(QueueFull):
        b.publish('q', 0, msg('small', 600))
    (d,) = read_messages(b, ['q'], 'c1', 1)
    assert waiting(c) == 0
    b.requeue('q', [(d.stream, d.entry_id)])
    assert waiting(c) == 2500


def test_a_count_that_drifted_heals_when_nothing_waits(script_client):
    """Set on a queue that already held messages, the count starts at 0 and is low until the
    queue runs dry; one too high (changed behind our back) refuses nothing once nothing
    waits. Never a queue stuck full with nothing in it."""
    c = script_client
    b = limited(c, 500)
    c.hset(K.counters('q'), 'waiting-bytes', 10_000)
    b.publish('q', 0, msg('a', 100))  # nothing waits: the count is reset, then this one
    assert waiting(c) == 100
    c.hset(K.counters('q'), 'waiting-bytes', 450)  # drifted up while 'a' waits
    with pytest.raises(QueueFull):
        b.publish('q', 0, msg('b', 100))
    read_messages(b, ['q'], 'c1', 5)  # the read that leaves nothing waiting sets 0
    assert waiting(c) == 0


def test_limits_at_run_time_start_a_new_count(script_client):
    c = script_client
    b = Broker(c, K, LEVELS)
    b.declare('q', [])
    b.publish('q', 0, msg('old', 100))  # before the limit: not counted
    b.limits('q', stored_pairs('q', {'x-max-length-bytes': 150}))
    b.publish('q', 0, msg('new', 100))
    assert waiting(c) == 100  # counted from here on (low by what waited before)
    read_messages(b, ['q'], 'c1', 1)  # 'old' goes: the count cannot go below 0
    assert waiting(c) == 0
    b.limits('q', [])  # no limit: no count kept
    assert waiting(c) is None
    b.publish('q', 0, msg('free', 1000))
    assert waiting(c) is None


def test_a_queue_without_the_argument_keeps_no_count(script_client):
    c = script_client
    b = Broker(c, K, LEVELS)
    b.declare('q', stored_pairs('q', {'x-max-length': 10}))
    b.publish('q', 0, msg('a', 100))
    (d,) = read_messages(b, ['q'], 'c1', 1)
    b.requeue('q', [(d.stream, d.entry_id)])
    b.purge('q')
    assert waiting(c) is None


class WaitingBytes(RuleBasedStateMachine):
    """Publish (now or delayed, some big), read, ack, requeue, reclaim, dead-letter, cancel
    and purge on a queue with x-max-length-bytes and drop-head: the count is always the sum
    of the sizes of the messages waiting, and none is lost; a publish that stores leaves the
    queue within the limit (a message given back is never refused, so it may go over)."""

    LIMIT = 1000

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.b = limited(self.c, self.LIMIT, 'drop-head')
        self.n = 0
        self.size: dict[str, int] = {}
        self.in_flight: dict[str, Any] = {}
        self.delayed: set[str] = set()
        self.gone: set[str] = set()  # acked, cancelled, purged, refused

    @rule(size=st.integers(50, 600), level=st.sampled_from(LEVELS), later=st.booleans(),
          big=st.booleans())
    def publish(self, size: int, level: int, later: bool, big: bool) -> None:
        self.n += 1
        name = f'm{self.n}'
        self.size[name] = size
        delay = Delay('+600000', 1000, name) if later else None
        try:
            if big:
                self.b.publish_big('q', level, msg(name, size), delay=delay)
            else:
                self.b.publish('q', level, msg(name, size), delay=delay)
        except QueueFull:
            self.gone.add(name)
            return
        if later:
            self.delayed.add(name)
        assert waiting(self.c) <= self.LIMIT

    @rule(count=st.integers(1, 3))
    def read(self, count: int) -> None:
        for d in read_messages(self.b, ['q'], 'c1', count):
            payload = d.payload if d.token is None else self.b.bodies('q', [d.token])[0]
            self.in_flight[name_of(payload)] = d

    @precondition(lambda self: self.in_flight)
    @rule(how=st.sampled_from(['ack', 'requeue', 'reclaim', 'deadletter']), data=st.data())
    def settle(self, how: str, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        d = self.in_flight.pop(name)
        if how == 'requeue':
            self.b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')
        elif how == 'reclaim':  # every lease of c1 has run out: all it holds goes back
            self.b.reclaim('q', 0, 1000)
            self.in_flight.clear()
        elif how == 'deadletter':
            self.b.dead_letter('q', d.stream, d.entry_id, 'test', d.deliveries)
        else:
            self.b.ack('q', [(d.stream, d.entry_id)])
            self.gone.add(name)

    @precondition(lambda self: self.delayed)
    @rule(data=st.data())
    def cancel(self, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.delayed)))
        if self.b.cancel('q', [name]):
            self.delayed.discard(name)
            self.gone.add(name)

    @rule()
    def purge(self) -> None:
        self.b.purge('q', batch=2)
        self.gone |= self._waiting() | self.delayed
        self.delayed.clear()

    def _letters(self) -> set[str]:
        out = set()
        for _, f in self.b.dead_letters('q'):
            m = f.get(b'f:m')
            if m is None:
                m = self.b.bodies('q', [f[b'f:r']])[0]
            out.add(name_of(m))
        return out

    def _waiting(self) -> set[str]:
        return (set(self.size) - set(self.in_flight) - self.gone - self.delayed
                - self._letters())

    @invariant()
    def the_count_is_what_waits(self) -> None:
        expected = sum(self.size[m] for m in self._waiting() | self.delayed)
        assert (waiting(self.c) or 0) == expected


TestWaitingBytes = WaitingBytes.TestCase
TestWaitingBytes.settings = PROPERTY


def test_a_kombu_queue_with_max_length_bytes(url):
    q = Queue('bq', Exchange('bq', 'direct'), 'bq',
              queue_arguments={'x-max-length-bytes': 2000, 'x-overflow': 'reject-publish'})
    with Connection(url) as conn:
        ch = conn.channel()
        q(ch).declare()
        producer = Producer(ch)
        stored = 0
        with pytest.raises(QueueFull, match='x-max-length-bytes 2000'):
            for n in range(100):
                producer.publish({'n': n, 'pad': 'x' * 100}, exchange='bq', routing_key='bq')
                stored += 1
        assert 2 <= stored < 10
        got = []
        while True:
            m = q(ch).get()
            if m is None:
                break
            got.append(m.payload['n'])
            m.ack()
        assert got == list(range(stored))
        producer.publish({'n': 'after'}, exchange='bq', routing_key='bq')


def test_staged_messages_of_a_fair_queue_count(script_client):
    c = script_client
    b = limited(c, 300, **{'x-fairness': 'round-robin'})
    b.publish('q', 0, msg('a1', 100), group='a')
    b.publish('q', 0, msg('b1', 100), group='b')
    b.publish('q', 0, msg('a2', 100), group='a')
    assert waiting(c) == 300
    with pytest.raises(QueueFull):
        b.publish('q', 0, msg('b2', 100), group='b')
    got = read_messages(b, ['q'], 'c1', 2)  # moved from staging, then delivered
    assert [name_of(d.payload) for d in got] == ['a1', 'b1']
    assert waiting(c) == 100


def test_replace_mode_counts_the_new_body_not_both(script_client):
    c = script_client
    b = limited(c, 1000, **{'x-unique-mode': 'replace'})
    b.publish('q', 0, msg('first', 100), unique_key='k')
    b.publish('q', 0, msg('second', 300), unique_key='k')
    assert waiting(c) == 300
    b.publish('q', 0, msg('later', 200), unique_key='j', delay=Delay('+600000', 1000, 'x'))
    b.publish('q', 0, msg('later2', 50), unique_key='j', delay=Delay('+600000', 1000, 'x'))
    assert waiting(c) == 350


def one_dead_letter(c: Any, size: int, limit: int) -> Broker:
    """A queue limited to ``limit`` bytes whose one message (``size`` bytes) was delivered
    and set aside: nothing waits."""
    b = limited(c, limit)
    b.publish('q', 0, msg('a', size))
    (d,) = read_messages(b, ['q'], 'c1', 1)
    b.dead_letter('q', d.stream, d.entry_id, 'bad', d.deliveries)
    assert waiting(c) == 0
    return b


def test_a_redriven_message_waits_again(script_client):
    c = script_client
    b = one_dead_letter(c, 120, 1000)
    assert b.redrive('q', 10).moved == 1
    assert waiting(c) == 120


def test_a_retry_waiting_out_its_backoff_counts(script_client):
    import time
    c = script_client
    b = limited(c, 1000, **{'x-requeue-delay': '1,5'})
    b.publish('q', 0, msg('a', 150))
    (d,) = read_messages(b, ['q'], 'c1', 1)
    b.requeue('q', [(d.stream, d.entry_id)], consumer='c1')  # waits 1 ms, parked
    assert waiting(c) == 150
    time.sleep(0.05)
    got = read_messages(b, ['q'], 'c1', 1) or read_messages(b, ['q'], 'c1', 1)
    assert [name_of(x.payload) for x in got] == ['a']
    assert waiting(c) == 0


def test_a_message_the_read_sets_aside_waits_no_more(script_client):
    """Expired (its TTL) or past the delivery limit, an entry the read files in the
    dead-letter stream leaves the count, as a delivery does."""
    import time
    c = script_client
    b = limited(c, 10_000)
    b.publish('q', 0, msg('short', 100), expiration=1)
    b.publish('q', 0, msg('a', 200))
    b.publish('q', 0, msg('b', 300))
    time.sleep(0.01)
    (d,) = read_messages(b, ['q'], 'c1', 1)
    assert name_of(d.payload) == 'a'
    assert [f[b'reason'] for _, f in b.dead_letters('q')] == [b'expired']
    assert waiting(c) == 300
    b.requeue('q', [(d.stream, d.entry_id)])  # a delivered once: the limit sets it aside
    assert waiting(c) == 500
    (e,) = read_messages(b, ['q'], 'c1', 1, max_deliveries=1)
    assert name_of(e.payload) == 'b'
    assert [f[b'reason'] for _, f in b.dead_letters('q')] == [b'expired', b'delivery limit']
    assert waiting(c) == 0


def test_an_id_requeued_twice_in_one_call_counts_once(script_client):
    c = script_client
    b = limited(c, 1000)
    b.publish('q', 0, msg('a', 100))
    (d,) = read_messages(b, ['q'], 'c1', 1)
    b.requeue('q', [(d.stream, d.entry_id), (d.stream, d.entry_id)], consumer='c1')
    assert waiting(c) == 100


def test_a_redrive_counts_on_a_queue_that_never_took_a_publish(script_client):
    """The count follows the argument, not a publish having made the field."""
    c = script_client
    b = one_dead_letter(c, 120, 150)
    c.delete(K.counters('q'))  # as after a delete and a declare: the letters stay
    assert b.redrive('q', 10).moved == 1
    assert waiting(c) == 120
    with pytest.raises(QueueFull):
        b.publish('q', 0, msg('b', 100))


def test_drop_head_sets_nothing_aside_when_that_cannot_make_room(script_client):
    """With the rest delayed (or in flight), setting the ready ones aside would not make
    room: the publish is refused and they stay."""
    c = script_client
    b = limited(c, 1000, 'drop-head')
    b.publish('q', 0, msg('later', 850), delay=Delay('+600000', 1000, 'x'))
    b.publish('q', 0, msg('a', 70))
    b.publish('q', 0, msg('b', 70))
    with pytest.raises(QueueFull, match='no ready message left'):
        b.publish('q', 0, msg('c', 200))
    assert b.dead_letters('q') == []
    assert waiting(c) == 990


def test_replace_mode_credits_the_message_it_replaces(script_client):
    c = script_client
    b = limited(c, 300, **{'x-unique-mode': 'replace'})
    b.publish('q', 0, msg('k1', 200), unique_key='k')
    b.publish('q', 0, msg('other', 100))
    b.publish('q', 0, msg('k2', 150), unique_key='k')  # 250 after: fits
    assert waiting(c) == 250
    got = [name_of(d.payload) for d in read_messages(b, ['q'], 'c1', 5)]
    assert sorted(got) == ['k2', 'other']


def test_replace_mode_with_drop_head_never_drops_the_one_it_replaces(script_client):
    c = script_client
    b = limited(c, 300, 'drop-head', **{'x-unique-mode': 'replace'})
    b.publish('q', 0, msg('k1', 100), unique_key='k')
    b.publish('q', 0, msg('other', 200))
    b.publish('q', 0, msg('k2', 250), unique_key='k')  # 'other' must go, 'k1' is replaced
    assert [name_of(f[b'f:m']) for _, f in b.dead_letters('q')] == ['other']
    assert waiting(c) == 250
    assert [name_of(d.payload) for d in read_messages(b, ['q'], 'c1', 5)] == ['k2']


def test_reclaim_sizes_what_it_gives_back_within_a_copy_budget(script_client):
    """Sizing a message given back copies its entry: a call copies about 4 MiB at most, and
    says there is more; the next calls give back the rest, each counted once."""
    c = script_client
    b = limited(c, 100 * 1024 * 1024)
    for n in range(12):
        b.publish('q', 0, msg(f'm{n}', 500_000))
    got = 0
    while got < 12:  # a read is bounded by bytes too
        got += len(read_messages(b, ['q'], 'c1', 12))
    assert waiting(c) == 0
    first = b.reclaim('q', 0, 100)
    assert first.more and 0 < first.moved < 12
    assert waiting(c) == first.moved * 500_000
    total = first.moved
    while total < 12:
        total += b.reclaim('q', 0, 100).moved
    assert total == 12 and waiting(c) == 12 * 500_000


def test_celery_apply_async_to_a_full_default_queue_raises_at_once(url):
    """Celery's default queue, limited by the transport option: apply_async with retry
    raises QueueFull naming the limit (a channel error: the publish is not retried), and
    what was stored counts its task messages' bytes."""
    from celery import Celery
    app = Celery('bytes', broker=url)
    app.conf.broker_transport_options = {'queue_arguments': {'celery': {
        'x-max-length-bytes': 4000, 'x-overflow': 'reject-publish'}}}
    sent = 0
    with pytest.raises(QueueFull, match='x-max-length-bytes 4000'):
        for i in range(20):
            app.send_task('tasks.add', (i, 'x' * 200), retry=True)
            sent += 1
    assert 1 <= sent < 4
    with Connection(url) as conn:
        waiting_bytes = conn.default_channel.broker.limits_and_counters('celery')[1]
    assert 0 < waiting_bytes['waiting-bytes'] <= 4000
    assert waiting_bytes['refused'] == 1
