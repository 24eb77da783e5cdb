"""A wait carries its read: an idle consumer's BZPOPMIN goes out with the channel's read.lua
call behind it, on the same connection, so a wake-up delivers in one round trip.

What must hold besides the saving (docs/design.rst, "A wait carries its read"): the credit
of a carried read is reserved (prefetch is never exceeded by a read meanwhile); a wait
ended early (close, cancel) gives what its read took back to the queue at once, not after
the lease; a carried read Redis refused (NOSCRIPT after SCRIPT FLUSH) falls back to a read
of its own. Real servers, 7.0 and 6.2; no timing asserted.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
import redis
from conftest import wait_until
from helpers import count_reads
from kombu import Connection, Consumer, Producer, Queue

from kombu_streams.broker import POPPED, WALK, Broker
from kombu_streams.keys import Keys

pytestmark = pytest.mark.redis


#: no wait times out by itself while a test runs; a socket timeout, without which no read is
#: carried (redis-py before 6 sets none)
QUIET = {'polling_interval': 30, 'socket_timeout': 5}


def _publish(url: str, name: str, n: int) -> None:
    with Connection(url) as conn:
        producer = Producer(conn, serializer='json')
        for i in range(n):
            producer.publish({'n': i}, routing_key=name, declare=[Queue(name, routing_key=name)])


def _consuming(conn: Any, url: str, name: str, **kwargs: Any) -> tuple[Any, Consumer]:
    """A new channel of ``conn`` consuming queue ``name`` (declared, empty), its scripts
    loaded (another test may have flushed them: a carried read would be answered NOSCRIPT)."""
    _publish(url, name, 0)
    channel = conn.channel()
    consumer = Consumer(channel, [Queue(name, routing_key=name)], accept=['json'], **kwargs)
    consumer.consume()
    channel.broker.load_scripts()
    return channel, consumer


def _send_carrying(conn: Any, channel: Any) -> int:
    """A wait on the markers of ``channel``'s queues, carrying its read; returns its fd."""
    wakes = channel.wake_keys()
    sources = list(wakes.values())
    return conn.transport.cycle.waits.send(tuple(wakes), None, 30,
                                           sources=tuple((channel, s) for s in sources),
                                           carried=channel.carried_read(sources, 30))


def _drain_while_publishing(conn: Any, url: str, name: str, timeout: float = 10,
                            before: Any = None) -> None:
    """One drain_events while another thread publishes one message to ``name`` a little
    later (the drain is waiting by then); ``before``: run first in that thread."""
    def publish() -> None:
        if before is not None:
            before()
        _publish(url, name, 1)

    later = threading.Timer(0.3, publish)
    later.start()
    try:
        conn.drain_events(timeout=timeout)
    finally:
        later.join()


def _spy_sends(monkeypatch: Any, waits: Any, seen: Any) -> None:
    """Call ``seen(kwargs, fd)`` after each wait ``waits`` sends (its keyword arguments and
    the fd it answers on)."""
    real_send = waits.send

    def send(*args: Any, **kwargs: Any) -> int:
        fd = real_send(*args, **kwargs)
        seen(kwargs, fd)
        return fd

    monkeypatch.setattr(waits, 'send', send)


def _read_ran(url: str, channel: Any) -> None:
    """Until the read a publish woke is in the PEL (Valkey may answer the wait first, in a
    write of its own)."""
    wait_until(lambda: _owned(url, channel.consumer_name) == 1, 10, 'the read')


def _owned(url: str, consumer: str) -> int:
    """PEL entries ``consumer`` owns, over every stream and group (a requeued message is
    parked with the holder, not with its last consumer)."""
    with redis.Redis.from_url(url.replace('redis-streams://', 'redis://', 1)) as raw:
        total = 0
        for key in raw.scan_iter('*'):
            if raw.type(key) == b'stream':
                for group in raw.xinfo_groups(key):
                    for c in raw.xinfo_consumers(key, group['name']):
                        if c['name'].decode() == consumer:
                            total += c['pending']
        return total


def test_a_wake_up_delivers_without_a_read_of_its_own(any_url, monkeypatch):
    """drain_events reads once (nothing), then waits; the publish that wakes the wait is
    delivered by the read behind it: no read of the channel's own between wait and
    delivery (without carried reads, one would follow the wake-up), nor before the next
    wait."""
    name = 'carried-wake'
    events: list[str] = []
    with Connection(any_url, transport_options=QUIET) as conn:
        _publish(any_url, name, 0)
        channel = conn.channel()
        waits = conn.transport.cycle.waits
        _spy_sends(monkeypatch, waits, lambda kwargs, fd: events.append(
            'wait' if kwargs.get('carried') is not None else 'plain wait'))
        reads = count_reads(monkeypatch, channel)
        with Consumer(channel, [Queue(name, routing_key=name)], accept=['json'],
                      callbacks=[lambda body, m: (events.append(f'got {body["n"]}'),
                                                  m.ack())]):
            for _ in range(2):
                _drain_while_publishing(conn, any_url, name)
    assert events[-4:] == ['wait', 'got 0', 'wait', 'got 0'], events
    # the one before the first wait; the next drain waits at once: the read behind the
    # wait saw the queue dry, so a read of its own would find only what the wait finds
    assert len(reads) == 1


def test_a_carried_read_reserves_its_credit(redis_url, monkeypatch):
    """On an event loop, a read meanwhile (a due time, a refill) takes only the credit the
    pending wait's read left: none, until its answer is taken (prefetch 4: the wait's read
    took the first of 10 publishes, which woke it; the read meanwhile takes none, not 4)."""
    from kombu.asynchronous import Hub

    url = redis_url.replace('redis://', 'redis-streams://', 1)
    name = 'carried-credit'
    hub = Hub()
    got: list = []
    with Connection(url, transport_options=QUIET) as conn:
        _publish(url, name, 0)
        channel = conn.channel()
        cycle = conn.transport.cycle
        with Consumer(channel, [Queue(name, routing_key=name)], accept=['json'],
                      callbacks=[lambda body, m: got.append(m)], prefetch_count=4):
            conn.transport.register_with_event_loop(conn.connection, hub)
            channel.broker.load_scripts()  # another test may have flushed them (NOSCRIPT)
            cycle.on_tick()  # the idle channel waits, its read of 4 behind the wait
            [(fd, wait)] = cycle.waits.pending.items()
            assert wait.carried is not None and wait.carried.credit == 4
            _publish(url, name, 10)
            _read_ran(url, channel)  # woken by the first publish: its read took 1
            reads = count_reads(monkeypatch, channel)
            cycle._deliver_channel(channel)  # a read now (as at a due time): no credit left
            assert reads == [] and got == []
            cycle.on_readable(fd)
            assert [m.payload['n'] for m in got] == [0]
            assert _owned(url, channel.consumer_name) == 1
            assert channel._reserved == 0
            for message in got:
                message.ack()
            channel.flush_acks()
    hub.close()


@pytest.mark.parametrize('end', ['close', 'cancel'])
def test_what_an_ended_wait_read_goes_back_at_once(any_url, end):
    """A wait whose read ran (a publish woke it) is ended before its answer was read: the
    message goes back to the queue now, not after the lease (an hour by default)."""
    name = f'carried-{end}'
    with Connection(any_url, transport_options=QUIET) as conn:
        cycle = conn.transport.cycle
        channel, consumer = _consuming(conn, any_url, name, prefetch_count=4)
        fd = _send_carrying(conn, channel)
        assert cycle.waits.pending[fd].carried is not None
        _publish(any_url, name, 1)
        _read_ran(any_url, channel)  # the message is in the PEL
        if end == 'close':
            channel.close()
        else:
            consumer.cancel()
        assert fd not in cycle.waits.pending
        assert _owned(any_url, channel.consumer_name) == 0  # requeued
        with Connection(any_url) as other:
            with other.SimpleQueue(name) as q:
                assert q.get(timeout=5).payload == {'n': 0}
        if end == 'cancel':
            channel.close()


def test_a_carried_read_refused_falls_back_to_a_read(any_url):
    """SCRIPT FLUSH while a consumer waits: its carried read is answered NOSCRIPT; the
    wake-up is followed by a read of its own, which loads the script again."""
    name = 'carried-noscript'
    got: list = []
    with Connection(any_url, transport_options=QUIET) as conn:
        channel, _ = _consuming(conn, any_url, name,
                                callbacks=[lambda body, m: (got.append(body), m.ack())])
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.2)

        def flush() -> None:
            with redis.Redis.from_url(any_url.replace('redis-streams://', 'redis://')) as r:
                r.script_flush()

        _drain_while_publishing(conn, any_url, name, before=flush)
        assert got == [{'n': 0}]
        assert channel._reserved == 0



def test_a_dead_wait_gives_back_what_its_read_took(any_url):
    """A wait whose answer never comes (a half-open connection): its read may have run and
    taken a message for this consumer. When the wait is found dead, that message is given
    back at once, not after its lease (an hour): another consumer gets it, as a first
    delivery (the one nobody saw is not counted)."""
    from kombu_streams.errors import DeadConnection

    name = 'carried-dead'
    with Connection(any_url, transport_options=QUIET) as conn:
        cycle = conn.transport.cycle
        channel, _ = _consuming(conn, any_url, name, prefetch_count=4)
        fd = _send_carrying(conn, channel)
        _publish(any_url, name, 1)
        _read_ran(any_url, channel)
        with pytest.raises(DeadConnection):
            cycle.waits.dead(fd)  # as if its answer never came by the deadline
        assert _owned(any_url, channel.consumer_name) == 0
        assert channel._reserved == 0
        with Connection(any_url) as other:
            with other.SimpleQueue(name) as q:
                message = q.get(timeout=5)
                assert message.payload == {'n': 0}
                assert message.delivery_info['delivery_count'] == 1
                message.ack()
        channel.close()


def test_a_channel_closed_by_another_thread_during_a_drain_strands_nothing(any_url):
    """close() from another thread while drain_events waits: the wait is the draining
    thread's, so close leaves it alone, and whichever comes first (the drain taking the
    answer, or the close) the message a publish woke it for ends delivered or back in the
    queue, never held by the closed channel's consumer."""
    name = 'carried-thread'
    got: list = []
    with Connection(any_url, transport_options=QUIET) as conn:
        _publish(any_url, name, 0)
        channel = conn.channel()
        consumer = Consumer(channel, [Queue(name, routing_key=name)], accept=['json'],
                            callbacks=[lambda body, m: (got.append(body), m.ack())])
        consumer.consume()
        errors: list = []

        def drain() -> None:
            try:  # a close before the wake-up leaves it waiting out its timeout
                conn.drain_events(timeout=3)
            except Exception as exc:  # the channel may go away under it
                errors.append(exc)

        drainer = threading.Thread(target=drain)
        drainer.start()
        try:
            waits = conn.transport.cycle.waits
            deadline = threading.Event()
            for _ in range(200):  # until the drain's wait is pending
                if any(w.carried is not None for w in waits.pending.values()):
                    break
                deadline.wait(0.01)
            _publish(any_url, name, 1)
            channel.close()
        finally:
            drainer.join(15)
        assert not drainer.is_alive()
        assert _owned(any_url, channel.consumer_name) == 0
        if not got:  # not delivered: back in the queue
            with Connection(any_url) as other:
                with other.SimpleQueue(name) as q:
                    assert q.get(timeout=5).payload == {'n': 0}


def test_no_read_is_carried_without_a_socket_timeout(any_url, monkeypatch):
    """A lost answer is made good on another connection, which only a socket timeout keeps
    from hanging on a dead network: without one, waits carry nothing (and still deliver)."""
    import kombu_streams.waits

    # the pool's socket timeout as redis-py before 6 leaves it by default
    monkeypatch.setattr(kombu_streams.waits, 'socket_timeout', lambda pool: None)
    name = 'carried-none'
    carried: list = []
    got: list = []
    with Connection(any_url, transport_options=QUIET) as conn:
        _publish(any_url, name, 0)
        channel = conn.channel()
        waits = conn.transport.cycle.waits
        _spy_sends(monkeypatch, waits,
                   lambda kwargs, fd: carried.append(waits.pending[fd].carried))
        with Consumer(channel, [Queue(name, routing_key=name)], accept=['json'],
                      callbacks=[lambda body, m: (got.append(body), m.ack())]):
            _drain_while_publishing(conn, any_url, name)
    assert got == [{'n': 0}]
    assert carried and all(c is None for c in carried)
    assert channel._reserved == 0


def test_a_look_only_drain_after_a_carried_read_still_reads(any_url):
    """drain_events(timeout=0) looks without waiting: right after a carried read it must
    read, not skip to a wait it will not make."""
    name = 'carried-look'
    got: list = []
    with Connection(any_url, transport_options=QUIET) as conn:
        _consuming(conn, any_url, name,
                   callbacks=[lambda body, m: (got.append(body['n']), m.ack())])
        _drain_while_publishing(conn, any_url, name)  # a wait; its read delivers
        assert conn.transport.cycle._dry
        _publish(any_url, name, 1)
        conn.drain_events(timeout=0)
    assert got == [0, 0]


@pytest.mark.parametrize('mode', [POPPED, WALK])
def test_an_unreached_source_of_a_carried_read_gets_its_marker_back(script_client, mode):
    """A carried read reads every source of its wait as popped, or walks it when its sweep
    is due: the wait may have popped its marker. When COUNT runs out before the read
    reaches it, its marker is set again in either mode, or its ready message would wait
    unmarked (docs/design.rst, "A wait carries its read")."""
    c = script_client
    keys = Keys()
    b = Broker(c, keys, [0, 3, 6, 9])
    b.publish('a', 0, '{"n": 0}')
    b.publish('b', 0, '{"n": 1}')
    c.delete(keys.wake('b'))  # popped by the wait
    sources = b.sources(['a', 'b'])
    call, parse = b.read_call(sources, 'c1', 1, modes={sources[0]: POPPED, sources[1]: mode})
    result = parse(b.run(call))
    assert [d.queue for d in result.deliveries] == ['a']
    assert c.exists(keys.wake('b')) == 1


def test_a_wait_that_cannot_be_sent_frees_its_reads_credit(any_url, monkeypatch):
    """No connection for the wait (the pool is full, Redis is down): the read it was to
    carry is not sent, and its reserved credit is free again, or the channel would wait
    with no credit to read for good."""
    import kombu_streams.waits

    with Connection(any_url, transport_options=QUIET) as conn:
        channel, _ = _consuming(conn, any_url, 'carried-noconn', prefetch_count=4)
        wakes = channel.wake_keys()
        sources = list(wakes.values())
        carried = channel.carried_read(sources, 30)
        assert channel._reserved == 4

        def refuse(pool: Any, name: str) -> Any:
            raise redis.ConnectionError('Too many connections')

        monkeypatch.setattr(kombu_streams.waits, 'pool_connection', refuse)
        with pytest.raises(redis.ConnectionError):
            conn.transport.cycle.waits.send(tuple(wakes), None, 30, carried=carried,
                                            sources=tuple((channel, s) for s in sources))
        assert channel._reserved == 0
        channel.close()
