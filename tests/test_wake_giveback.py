"""Wake markers given back (wake.lua) never outlive their queue.

A wait dropped unread (a channel closed or cancelled while its BZPOPMIN was pending, the
answer perhaps on its way) gives its markers back. Before, that was a ZADD per key with no
expiry: every Celery pidbox or reply queue (x-expires) left ``ks:q:{q}:wake`` and
``ks:x:{e}:wake:q`` behind for ever at each worker shutdown, and a wait of 1,000 queues cost
1,000 round trips to close. Now one wake.lua call per slot group sets a marker only where its
source still exists, with its expiry.
"""

from __future__ import annotations

import socket
import time

import pytest
from kombu import Connection, Consumer, Exchange, Queue

from kombu_streams.keys import Keys


def _url(redis_url: str) -> str:
    return redis_url.replace('redis://', 'redis-streams://', 1)


def _left(redis_client, name: str) -> list[bytes]:
    return sorted(redis_client.scan_iter(match=f'*{name}*', count=1000))


def test_an_expired_queue_leaves_no_key_behind_after_an_event_loop_close(
        redis_url: str, redis_client) -> None:
    """Celery's path: a channel on Kombu's hub waits on an expiring queue bound to a fanout
    exchange (as a pidbox queue is); the connection closes with the wait pending; once the
    queue expires, no key of it is left."""
    from kombu.asynchronous import Hub

    hub = Hub()
    queue = Queue('tmpq-hub', Exchange('bcast-hub', 'fanout'), expires=1.5)
    with Connection(_url(redis_url)) as conn:
        channel = conn.channel()
        conn.transport.register_with_event_loop(conn.connection, hub)
        consumer = Consumer(channel, [queue], callbacks=[lambda body, m: m.ack()])
        consumer.consume()
        loop = hub.create_loop()
        for _ in range(5):
            next(loop)
        conn.transport.cycle.on_tick()  # what the hub's next turn does: a wait is sent
        assert conn.transport.cycle.waits.pending, 'the wait is pending'
        assert _left(redis_client, 'tmpq-hub')
    hub.close()
    keys = Keys()
    for key in (keys.wake('tmpq-hub'), keys.fanout_wake('bcast-hub', 'tmpq-hub')):
        assert redis_client.pttl(key) != -1, key  # given back with an expiry, or not at all
    deadline = time.monotonic() + 10
    while _left(redis_client, 'tmpq-hub') and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _left(redis_client, 'tmpq-hub') == []


def test_cancel_gives_popped_markers_back_only_where_the_queue_still_exists(
        redis_url: str, redis_client) -> None:
    """A consumer woken for a queue it then cancels gives that wake-up back: the marker is
    set again while the queue exists (another consumer finds the work), and not recreated
    for a queue deleted meanwhile."""
    keys = Keys()
    with Connection(_url(redis_url)) as conn, Connection(_url(redis_url)) as pub:
        for name in ('kept', 'gone'):
            queue = Queue(name, routing_key=name)
            channel = conn.channel()
            queue(channel).declare()
            consumer = Consumer(channel, [queue], callbacks=[lambda body, m: None],
                                prefetch_count=1)
            consumer.consume()
            pub.Producer().publish('one', routing_key=name)
            pub.Producer().publish('two', routing_key=name)
            conn.drain_events(timeout=5)  # 'one' handed out; credit used up
            source = (name, None)
            channel.plan.woke(source)  # as if its marker had been popped meanwhile
            redis_client.delete(keys.wake(name))
            if name == 'gone':
                pub.default_channel.queue_delete(name)
            consumer.cancel()
            if name == 'kept':
                assert redis_client.exists(keys.wake(name))
            else:
                assert _left(redis_client, name) == []


def test_closing_a_wait_on_many_queues_is_one_call(redis_url: str, redis_client) -> None:
    """Giving back the markers of a 300-queue wait costs one wake.lua call (it was one ZADD
    round trip per queue)."""
    names = [f'many-{n}' for n in range(300)]
    queues = [Queue(n, routing_key=n) for n in names]
    with Connection(_url(redis_url)) as conn:
        channel = conn.channel()
        for q in queues:
            q(channel).declare()
        consumer = Consumer(channel, queues, callbacks=[lambda body, m: None])
        consumer.consume()
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.2)
        before = redis_client.info('commandstats')
        sources = list(channel.consumer_state.reading.sources)
        channel.give_back(sources)
        after = redis_client.info('commandstats')
        calls = (after.get('cmdstat_evalsha', {}).get('calls', 0)
                 - before.get('cmdstat_evalsha', {}).get('calls', 0))
        zadds = (after.get('cmdstat_zadd', {}).get('calls', 0)
                 - before.get('cmdstat_zadd', {}).get('calls', 0))
        assert calls == 1 and zadds == 300
        assert all(redis_client.exists(Keys().wake(n)) for n in names)
