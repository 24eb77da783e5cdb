"""Reads bounded by bytes as well as by count (issue #23, item 2).

One read.lua call copies entries in batches sized to its byte budget (``max_read_bytes``),
and moves due delayed messages only as far as their sizes (HSTRLEN) fit it; one message
bigger than the budget is still delivered (or moved), alone. See lua/lib/serve.lua's header
and docs/design.rst, "Reads bounded by bytes". Script tests run on fakeredis, Redis 6.2 and
7.0 (``script_client``); the Kombu ones on a real server.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
from kombu import Connection, Consumer, Producer, Queue

import kombu_streams  # noqa: F401  (registers the redis-streams:// scheme)
from kombu_streams.broker import HOLDER, POPPED, READ, Broker, Delay, Delivery, ReadResult
from kombu_streams.keys import Keys
from kombu_streams.plan import ReadPlan

K = Keys()
LEVELS = [0, 3, 6, 9]
Q = 'q'


def broker(c) -> Broker:
    return Broker(c, K, LEVELS)


def body(i: int, size: int) -> bytes:
    """A payload of exactly ``size`` bytes that names its message."""
    head = f'{i:04d}:'.encode()
    return head + b'x' * (size - len(head))


def read(c, count: int, max_bytes: int, hints: dict | None = None, mode: str = READ
         ) -> ReadResult:
    """One read.lua call of queue Q with a byte budget."""
    b = broker(c)
    sources = b.sources([Q])
    (script, keys, args), parse = b.read_call(sources, 'c1', count, max_bytes=max_bytes,
                                              hints=hints, modes={s: mode for s in sources})
    return parse(script(c, keys, args))


def heads(deliveries: list[Delivery]) -> list[int]:
    return [int(d.payload.split(b':', 1)[0]) for d in deliveries]


def delayed_due_now(c, sizes: list[int]) -> None:
    """Delayed messages of Q with payloads of ``sizes`` bytes, all due already (the due
    time is set in the past directly: no clock to move on a real server)."""
    for i, size in enumerate(sizes):
        broker(c).publish(Q, 0, body(i, size), delay=Delay('+600000', 0, f'm{i}'))
    members = c.zrange(K.delayed(Q), 0, -1)
    assert len(members) == len(sizes)
    c.zadd(K.delayed(Q), {m: 1 for m in members}, xx=True)


# -- script: fresh entries ------------------------------------------------------------------

def test_a_budget_cuts_a_read_of_big_messages_and_keeps_the_rest_ready(script_client):
    c = script_client
    broker(c).declare(Q)
    ids = [broker(c).publish(Q, 0, body(i, 1000)) for i in range(6)]
    got = []
    for _ in range(3):
        result = read(c, 6, 2500)
        # 1,000-byte entries, 2,500 bytes: two fit, the third would not
        assert len(result.deliveries) == 2
        assert result.status == {(Q, None): '1'}
        got += result.deliveries
        assert broker(c).size(Q) == 6 - len(got)  # the rest stay ready
    assert read(c, 6, 2500).deliveries == []
    assert heads(got) == list(range(6))  # order kept, nothing lost, none twice
    assert [d.entry_id for d in got] == ids
    assert [d.deliveries for d in got] == [1] * 6
    pending = c.xpending_range(K.stream(Q, 0), Q, min='-', max='+', count=100)
    assert [(p['message_id'], p['times_delivered']) for p in pending] == [(i, 1) for i in ids]


def test_with_the_size_known_one_batch_fills_the_budget(script_client):
    c = script_client
    broker(c).declare(Q)
    for i in range(6):
        broker(c).publish(Q, 0, body(i, 1000))
    result = read(c, 6, 3100, hints={(Q, None): 1001})
    assert heads(result.deliveries) == [0, 1, 2]
    assert heads(read(c, 6, 3100, hints={(Q, None): 1001}).deliveries) == [3, 4, 5]


def test_small_messages_are_not_held_back(script_client):
    c = script_client
    broker(c).declare(Q)
    for i in range(50):
        broker(c).publish(Q, 0, body(i, 20))
    assert heads(read(c, 40, 4096).deliveries) == list(range(40))  # COUNT, not bytes
    assert heads(read(c, 40, 4096, hints={(Q, None): 21}).deliveries) == list(range(40, 50))


def test_a_message_bigger_than_the_budget_is_delivered_alone(script_client):
    c = script_client
    broker(c).declare(Q)
    for i, size in enumerate([5000, 5000, 10, 10]):
        broker(c).publish(Q, 0, body(i, size))
    first = read(c, 10, 1000)
    assert heads(first.deliveries) == [0]
    assert first.status == {(Q, None): '1'}
    assert heads(read(c, 10, 1000, hints={(Q, None): 5001}).deliveries) == [1]
    assert heads(read(c, 10, 1000).deliveries) == [2, 3]
    assert broker(c).size(Q) == 0


def test_the_size_hint_keeps_a_big_entry_out_of_a_batch_sized_for_small_ones(script_client):
    """The worst case the header names: a batch sized on small entries may carry big ones.
    A hint as big as the source's largest recent entry sizes the batch for it instead."""
    c = script_client
    broker(c).declare(Q)
    for i, size in enumerate([10, 5000, 10]):
        broker(c).publish(Q, 0, body(i, size))
    assert heads(read(c, 10, 1000, hints={(Q, None): 5001}).deliveries) == [0]
    assert heads(read(c, 10, 1000, hints={(Q, None): 5001}).deliveries) == [1]
    assert heads(read(c, 10, 1000, hints={(Q, None): 5001}).deliveries) == [2]


def test_a_cut_read_gives_a_popped_wake_up_back(script_client):
    c = script_client
    broker(c).declare(Q)
    for i in range(3):
        broker(c).publish(Q, 0, body(i, 1000))
    c.delete(K.wake(Q))  # popped by this consumer
    assert heads(read(c, 3, 1500, mode=POPPED).deliveries) == [0]
    assert c.zrange(K.wake(Q), 0, -1) == [b'w']  # the two left are not stranded
    assert heads(read(c, 3, 1500, hints={(Q, None): 1001}).deliveries) == [1]
    assert heads(read(c, 3, 1500).deliveries) == [2]


def test_the_budget_spans_the_levels_of_a_read(script_client):
    c = script_client
    broker(c).declare(Q)
    broker(c).publish(Q, 0, body(0, 1000))
    broker(c).publish(Q, 3, body(1, 1000))
    broker(c).publish(Q, 3, body(2, 1000))
    hint = {(Q, None): 1001}
    first = read(c, 10, 2500, hints=hint)
    assert [(d.level, heads([d])[0]) for d in first.deliveries] == [(0, 0), (3, 1)]
    assert [(d.level, heads([d])[0]) for d in read(c, 10, 2500, hints=hint).deliveries] == [
        (3, 2)]


# -- script: parked (requeued) entries ------------------------------------------------------

def test_parked_entries_are_claimed_within_the_budget(script_client):
    c = script_client
    broker(c).declare(Q)
    for i in range(4):
        broker(c).publish(Q, 0, body(i, 1000))
    got = read(c, 10, 1 << 20).deliveries
    assert heads(got) == [0, 1, 2, 3]
    # read ahead and given back unseen (count 0): served in batches, not as suspects
    broker(c).requeue(Q, [(d.stream, d.entry_id, 0) for d in got])
    again = []
    for _ in range(2):
        result = read(c, 10, 2500, hints={(Q, None): 1001})
        assert len(result.deliveries) == 2
        again += result.deliveries
    assert heads(again) == [0, 1, 2, 3]
    assert [d.entry_id for d in again] == [d.entry_id for d in got]
    assert [d.deliveries for d in again] == [1] * 4
    assert read(c, 10, 2500).deliveries == []
    owners = {p['consumer'] for p in
              c.xpending_range(K.stream(Q, 0), Q, min='-', max='+', count=10)}
    assert owners == {b'c1'} and HOLDER.encode() not in owners


# -- script: due delayed messages ------------------------------------------------------------

def test_moving_due_messages_is_bounded_by_bytes(script_client):
    c = script_client
    broker(c).declare(Q)
    delayed_due_now(c, [1000] * 5)
    first = read(c, 1, 2500)
    assert c.zcard(K.delayed(Q)) == 3  # two of 1,000 bytes moved; the third would not fit
    assert c.hlen(K.delayed_messages(Q)) == 3
    assert c.xlen(K.stream(Q, 0)) == 2
    assert first.dues == {(Q, None): 0}  # due, not moved yet
    assert first.status == {(Q, None): '1'}
    got = list(first.deliveries)
    for _ in range(10):
        got += read(c, 1, 2500).deliveries
    assert heads(got) == list(range(5))  # due order, nothing lost, none twice
    assert c.zcard(K.delayed(Q)) == 0 and c.hlen(K.delayed_messages(Q)) == 0


def test_a_due_message_bigger_than_the_budget_moves_alone(script_client):
    c = script_client
    broker(c).declare(Q)
    delayed_due_now(c, [5000, 5000, 10])
    assert heads(read(c, 10, 1000).deliveries) == [0]
    assert c.zcard(K.delayed(Q)) == 2
    assert heads(read(c, 10, 1000).deliveries) == [1]
    assert c.zcard(K.delayed(Q)) == 1
    assert heads(read(c, 10, 1000).deliveries) == [2]
    assert c.zcard(K.delayed(Q)) == 0


# -- the channel's size hints ----------------------------------------------------------------

def test_the_plan_learns_each_source_s_largest_entry_and_lets_it_fade():
    plan = ReadPlan()
    src, other = (Q, None), ('other', None)

    def learn(*sizes: int, source=src) -> None:
        out = [Delivery(source[0], 0, 's', b'1-1', 1, b'x' * n) for n in sizes]
        plan.learn({}, ReadResult(out, {source: '1'}, [], []))

    learn(10, 1000, 20)
    learn(5, source=other)
    assert plan.sizes == {src: 1001, other: 6}  # read.lua counts the field name too
    learn(10)
    assert plan.sizes[src] == 500  # halved: one big message is not forgotten at once
    learn(4000)
    assert plan.sizes[src] == 4001
    plan.forget([other])
    assert plan.sizes == {other: 6}


# -- through Kombu, on a real server ---------------------------------------------------------

def _count_reads(monkeypatch) -> list[tuple[int, int]]:
    """(messages, payload bytes) of every read.lua reply the transport decodes."""
    calls: list[tuple[int, int]] = []
    original = Broker.read_call

    def read_call(self, *args, **kwargs):
        call, parse = original(self, *args, **kwargs)

        def counting(reply):
            result = parse(reply)
            if result.deliveries:
                calls.append((len(result.deliveries),
                              sum(len(d.payload) for d in result.deliveries)))
            return result
        return call, counting

    monkeypatch.setattr(Broker, 'read_call', read_call)
    return calls


def _consume(conn: Connection, queue: Queue, n: int, prefetch: int) -> list[int]:
    got: list[int] = []

    def on_message(payload, message):
        got.append(payload['i'])
        message.ack()

    with conn.channel() as ch:
        ch.basic_qos(0, prefetch, False)
        with Consumer(ch, [queue], callbacks=[on_message], accept=['json']):
            while len(got) < n:
                conn.drain_events(timeout=60)
    return got


def test_kombu_reads_of_a_small_budget(redis_server, monkeypatch):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    url = 'redis-streams://' + redis_server.url[len('redis://'):]
    calls = _count_reads(monkeypatch)
    queue = Queue('budget', routing_key='budget')
    try:
        with Connection(url, transport_options={'max_read_bytes': 3000}) as conn:
            producer = Producer(conn.channel())
            for i in range(12):
                producer.publish({'i': i, 'pad': 'x' * 700}, routing_key='budget',
                                 declare=[queue])
            got = _consume(conn, queue, 12, prefetch=100)
        assert got == list(range(12))
        assert sum(n for n, _ in calls) == 12
        size = max(b // n for n, b in calls)  # every envelope has the same size
        assert size * 2 < 3000 < size * 4
        # each call within the budget, or one message alone (the first call sizes the
        # source's entries: a batch of one, then what fits)
        assert all(b <= 3000 or n == 1 for n, b in calls)
        assert max(n for n, _ in calls) > 1  # not one message per call either
    finally:
        client.flushall()
        client.close()


@pytest.mark.slow
def test_sixty_ten_mb_messages_through_kombu(redis_server, monkeypatch):
    """60 x 10 MB at prefetch 100 (before: a 7.6 s read, past the 5 s socket timeout, and
    nothing consumed): every read.lua call delivers one message, each is consumed once.
    The PING maximum of a second client is printed, not asserted."""
    n, mb = 60, 10
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    url = 'redis-streams://' + redis_server.url[len('redis://'):]
    calls = _count_reads(monkeypatch)
    queue = Queue('big', routing_key='big')
    worst, stop = [0.0], threading.Event()

    def pinger() -> None:
        other = redis.Redis.from_url(redis_server.url)
        try:
            while not stop.is_set():
                start = time.perf_counter()
                other.ping()
                worst[0] = max(worst[0], time.perf_counter() - start)
                stop.wait(0.005)
        finally:
            other.close()

    try:
        with Connection(url) as conn:
            producer = Producer(conn.channel())
            pad = 'x' * (mb << 20)
            for i in range(n):
                producer.publish({'i': i, 'pad': pad}, routing_key='big', declare=[queue])
            del pad
            thread = threading.Thread(target=pinger, daemon=True)
            thread.start()
            try:
                got = _consume(conn, queue, n, prefetch=100)
            finally:
                stop.set()
                thread.join()
        print(f'\n{n} x {mb} MB: {len(calls)} read calls with deliveries; '
              f'PING max {worst[0] * 1000:.0f} ms (not asserted)')
        assert sorted(got) == list(range(n))  # each once
        assert all(count == 1 for count, _ in calls)  # over the budget: alone, every time
        assert len(calls) == n
        assert client.xlen(K.stream('big', 0)) == 0  # all acked and deleted
    finally:
        client.flushall()
        client.close()
