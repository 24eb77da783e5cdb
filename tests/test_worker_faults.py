"""Faults a worker really meets (issue #23): its connection dropped while a task runs, a
producer whose retries gave up once, a failover that refuses replica acks for a while.

Each fault comes from outside the process (CLIENT KILL on the server, a stopped primary),
never from a patched method, and each test checks what an operator would: the worker is
still alive, every task ran once per delivery, the producer publishes again by itself.
"""

from __future__ import annotations

import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue
from test_celery import CeleryEnv, celery_env, wait_for

from kombu_streams.errors import ChannelClosed

pytestmark = [pytest.mark.celery]


@pytest.fixture()
def env(tmp_path: Path, redis_url: str):
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as environment:
        yield environment


def kill_broker_clients(raw: redis.Redis, db: int = 3) -> int:
    """CLIENT KILL every connection on the broker's database (not the task records' DB 4,
    nor this test's own client): what a Redis restart or a network cut does to a worker."""
    me = raw.client_id()
    killed = 0
    for client in raw.client_list():
        if int(client['db']) == db and int(client['id']) != me:
            killed += raw.execute_command('CLIENT', 'KILL', 'ID', client['id'])
    return killed


def test_acks_late_worker_survives_a_dropped_connection_mid_task(env: CeleryEnv) -> None:
    """The connection drops while an acks_late task runs; the worker reconnects, the task
    ends and acks on the channel that was closed meanwhile. Before: AttributeError on
    ``channel.connection`` (None after close), "Unrecoverable error", the worker exited
    with every running task. Now the late ack is a no-op (the message was given back at
    the reconnect, so it runs once more: once per delivery) and the worker goes on."""
    module = env.load({'visibility_timeout': 3600})
    worker = env.worker('drop@ks', concurrency=2)
    worker.wait_ready()
    first = module.sleeper.delay(2).id
    wait_for(lambda: first in env.started(), 20, what='the task to start', log=env.logs)
    assert kill_broker_clients(env.raw_broker) >= 1
    wait_for(lambda: first in [x.decode() for x in env.store.lrange('done', 0, -1)], 30,
             what='the task to finish', log=env.logs)
    module.record.delay('after')
    wait_for(lambda: 'after' in env.done(), 30, what="a task sent after the drop",
             log=env.logs)
    time.sleep(3)  # a redelivered copy of the first task may run now: once more, no more
    assert worker.proc.poll() is None, f'the worker exited:\n{worker.log()[-4000:]}'
    log = worker.log()
    assert 'Unrecoverable error' not in log, log[-4000:]
    assert 'AttributeError' not in log, log[-4000:]
    runs = Counter(env.started())
    assert 1 <= runs[first] <= 2, (runs, log[-4000:])  # once per delivery
    # Celery 5.3's warm shutdown after a broker connection drop waits ~30 s on an idle
    # pool child (billiard's Pool.join; Kombu's redis:// does the same): not waited out.
    worker.terminate(timeout=5)


def test_a_closed_channel_raises_a_connection_error(redis_url: str) -> None:
    """Every operation on a channel Kombu closed (it sets ``channel.connection = None``)
    raises ChannelClosed, one of the transport's connection errors, so Kombu's ensure()
    and Celery reconnect instead of dying on an AttributeError; an ack of a message the
    channel gave back at close is a no-op."""
    url = redis_url.replace('redis://', 'redis-streams://', 1)
    queue = Queue('closed-q', Exchange('closed-q'), 'closed-q')
    with Connection(url) as conn:
        assert ChannelClosed in conn.connection_errors
        assert ChannelClosed in conn.recoverable_connection_errors
        channel = conn.channel()
        producer = Producer(channel)
        producer.publish({'n': 1}, exchange=queue.exchange, routing_key='closed-q',
                         declare=[queue])
        message = queue(channel).get()
        assert message is not None
        channel.close()
        assert channel.connection is None
        message.ack()  # given back at close: nothing to do, and no error
        with pytest.raises(ChannelClosed):
            producer.publish({'n': 2}, exchange=queue.exchange, routing_key='closed-q')
        with pytest.raises(ChannelClosed):
            queue(channel).get()
        # the message came back, once
        fresh = queue(conn.channel())
        again = fresh.get()
        assert again is not None and again.payload == {'n': 1}
        again.ack()
        assert fresh.get() is None


def test_producer_recovers_after_ensure_gave_up_once(redis_url: str) -> None:
    """A publish whose retries gave up closes the producer's channel; the next publish with
    retry=True reconnects and goes through (before: AttributeError in _payload, for ever)."""
    url = redis_url.replace('redis://', 'redis-streams://', 1)
    queue = Queue('revive-q', Exchange('revive-q'), 'revive-q')
    with Connection(url) as conn:
        producer = Producer(conn)  # as Celery's producer pool makes them
        producer.publish({'n': 0}, exchange=queue.exchange, routing_key='revive-q',
                         declare=[queue])
        producer.channel.close()  # what an ensure() that gave up leaves behind
        with pytest.raises(ChannelClosed):  # without retry: a connection error, clearly
            producer.publish({'n': -1}, exchange=queue.exchange, routing_key='revive-q')
        producer.publish({'n': 1}, exchange=queue.exchange, routing_key='revive-q',
                         retry=True, retry_policy={'max_retries': 3, 'interval_start': 0})
        channel = conn.channel()
        got = [m.payload['n'] for m in iter(lambda: queue(channel).get(no_ack=True), None)]
        assert got == [0, 1]


# ---------------------------------------------------------------------------
# values that used to block for ever, crash a reader or give a raw error (#23 item 7)
# ---------------------------------------------------------------------------


def _url(redis_url: str) -> str:
    return redis_url.replace('redis://', 'redis-streams://', 1)


def test_sub_millisecond_replica_timeout_does_not_wait_for_ever(redis_url: str) -> None:
    """publish_replica_timeout=0.0004 used to become WAIT 1 0, which blocks for ever on a
    server without replicas: the publish now waits 1 ms and raises NotReplicated."""
    from kombu_streams.scripts import NotReplicated

    opts = {'publish_min_replicas': 1, 'publish_replica_timeout': 0.0004,
            'socket_timeout': 30}
    outcome: list[BaseException | None] = []

    def publish() -> None:
        with Connection(_url(redis_url), transport_options=opts) as conn:
            queue = Queue('tiny-wait', routing_key='tiny-wait')
            try:
                conn.Producer().publish('x', routing_key='tiny-wait', declare=[queue])
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

    import threading
    worker = threading.Thread(target=publish, daemon=True)
    worker.start()
    worker.join(20)  # a liveness bound, far above the 1 ms it takes: not a timing assert
    assert not worker.is_alive(), 'the publish blocked (WAIT n 0)'
    assert isinstance(outcome[0], NotReplicated), outcome


def test_replica_timeout_must_be_shorter_than_the_socket_timeout(redis_url: str) -> None:
    opts = {'publish_min_replicas': 1, 'publish_replica_timeout': 5, 'socket_timeout': 2}
    with pytest.raises(ValueError, match='publish_replica_timeout .* socket_timeout'):
        Connection(_url(redis_url), transport_options=opts).channel()


@pytest.mark.parametrize('delay', [1e17, 2**1100, float('inf'), '1e400'])
def test_an_x_delay_too_long_is_refused_and_nothing_stored(redis_url: str, redis_client,
                                                           delay) -> None:
    from kombu_streams.due import DueTooLate

    with Connection(_url(redis_url)) as conn:
        queue = Queue('far-future', routing_key='far-future')
        producer = conn.Producer()
        producer.publish('first', routing_key='far-future', declare=[queue])
        with pytest.raises(DueTooLate, match='longest delay'):
            producer.publish('later', routing_key='far-future', headers={'x-delay': delay})
        channel = conn.channel()
        assert channel.broker.scheduled('far-future')['delayed'] == 0
        assert queue(channel).queue_declare(passive=True).message_count == 1


def test_scheduled_reads_a_due_time_stored_in_exponent_form(redis_url: str,
                                                            redis_client) -> None:
    """A due time written as 1e+17 (by an older release, or by hand) no longer crashes
    ``delayed list`` and Broker.scheduled."""
    with Connection(_url(redis_url)) as conn:
        channel = conn.channel()
        queue = Queue('exp-due', routing_key='exp-due')
        queue(channel).declare()
        keys = channel.keys
        redis_client.zadd(keys.delayed('exp-due'), {'1700000000000000:0:task-1': 1e17})
        redis_client.hset(keys.delayed_messages('exp-due'), '1700000000000000:0:task-1', '{}')
        listed = channel.broker.scheduled('exp-due')
        assert listed['messages'][0]['label'] == 'task-1'
        assert listed['messages'][0]['due_in_ms'] > 10**16


@pytest.mark.parametrize('name,value,allowed', [
    ('client_name', 'my worker', 'printable ASCII characters without spaces'),
    ('client_name', 'ok\n', 'printable ASCII'),
    ('socket_keepalive_options', {'TCP_KEEPIDLE': 30}, 'socket option numbers'),
    ('socket_keepalive_options', {4: '30'}, 'socket option numbers'),
])
def test_connection_options_get_an_error_naming_them(redis_url: str, name, value,
                                                     allowed) -> None:
    """Before: a raw ResponseError from CLIENT SETNAME, a TypeError deep in redis-py."""
    with pytest.raises(ValueError, match=f"'{name}' must be .*{allowed}"):
        Connection(_url(redis_url), transport_options={name: value}).channel()


def test_a_lost_lease_is_reported_once(redis_url: str, redis_client, caplog) -> None:
    """A message handed out whose lease another consumer took is logged once, not again at
    every lease round."""
    import logging

    with Connection(_url(redis_url), transport_options={'visibility_timeout': 60}) as conn:
        channel = conn.channel()
        queue = Queue('lost-once', routing_key='lost-once')
        conn.Producer().publish('x', routing_key='lost-once', declare=[queue])
        message = queue(channel).get()
        assert message is not None
        inflight = channel.consumer_state.get(message.delivery_tag)
        # another consumer has it now
        assert redis_client.xclaim(inflight.stream, 'lost-once', 'other', 0,
                                   [inflight.entry_id], justid=True)
        caplog.set_level(logging.WARNING, logger='kombu_streams')
        for _ in range(3):
            channel.leases.renew()
        lost = [r for r in caplog.records if 'lost the lease' in r.getMessage()]
        assert len(lost) == 1, [r.getMessage() for r in lost]


# ---------------------------------------------------------------------------
# waits with a deadline: a half-open connection is found dead (#23 item 4)
# ---------------------------------------------------------------------------


def test_drain_events_finds_a_half_open_connection_dead(redis_server) -> None:
    """The network drops silently while a consumer waits: its BZPOPMIN never gets an
    answer. drain_events raises DeadConnection (a connection error) by the wait's deadline
    (its timeout + socket_timeout) instead of waiting for ever; the consumer reconnects
    (new connections pass) and gets a message published meanwhile."""
    from faultproxy import FaultProxy

    from kombu_streams.errors import DeadConnection

    raw = redis.Redis(host='127.0.0.1', port=redis_server.port, db=5)
    raw.flushdb()
    with FaultProxy(redis_server.port) as proxy:
        url = f'redis-streams://127.0.0.1:{proxy.port}/5'
        opts = {'polling_interval': 0.5, 'socket_timeout': 1.0}
        queue = Queue('half-open', routing_key='half-open')
        got: list = []
        with Connection(url, transport_options=opts) as conn:
            consumer = conn.Consumer([queue], callbacks=[lambda body, m: (got.append(body),
                                                                         m.ack())])
            consumer.consume()
            with pytest.raises(socket.timeout):  # idle, nothing to get
                conn.drain_events(timeout=0.2)
            assert proxy.freeze() >= 1
            with Connection(f'redis-streams://127.0.0.1:{redis_server.port}/5') as pub:
                pub.Producer().publish('after the drop', routing_key='half-open')
            # the read before the wait, or the wait (DeadConnection), whichever meets the
            # frozen connection first: a connection error either way, never a hang
            with pytest.raises(conn.connection_errors):
                conn.drain_events(timeout=30)
            assert issubclass(DeadConnection, conn.connection_errors)
            # what Kombu's ensure / ConsumerMixin do: reconnect and consume again
            conn.close()
            conn.ensure_connection(max_retries=3)
            consumer.revive(conn.channel())
            consumer.consume()
            conn.drain_events(timeout=10)
        assert got == ['after the drop']
    raw.close()


def test_idle_celery_worker_behind_a_half_open_connection_recovers(
        tmp_path: Path, redis_server) -> None:
    """An idle prefork worker whose broker connections all go half-open (a proxy freezes
    them) consumes again by itself: its event-loop wait has a deadline, the worker
    reconnects. Before: 0 of 10 tasks in 90 s, and no answer to inspect ping."""
    from faultproxy import FaultProxy

    base = f'redis://127.0.0.1:{redis_server.port}'
    with FaultProxy(redis_server.port) as proxy, celery_env(tmp_path, base) as env:
        env.raw_broker.flushdb()
        env.store.flushdb()
        proxied = f'redis-streams://127.0.0.1:{proxy.port}/3'
        module = env.load({'polling_interval': 1.0, 'socket_timeout': 2.0})
        worker = env.worker('halfopen@ks', concurrency=1,
                            extra_env={'KS_E2E_BROKER': proxied})
        worker.wait_ready()
        module.record.delay('before')
        wait_for(lambda: 'before' in env.done(), 20, what='a task before the drop',
                 log=env.logs)
        time.sleep(1.0)  # idle: its wait is pending on the proxied connection
        assert proxy.freeze() >= 1
        tags = [f'after-{n}' for n in range(10)]
        for tag in tags:
            module.record.delay(tag)  # the test's own app publishes straight to Redis
        wait_for(lambda: set(env.done()) >= set(tags), 30,
                 what='the tasks sent after the drop', log=env.logs)
        assert worker.proc.poll() is None, worker.log()[-4000:]
        worker.terminate()


def test_a_consumer_with_1100_open_descriptors_waits_for_a_delayed_message(
        redis_url: str) -> None:
    """Waits use ``selectors``, not ``select.select``, which raised ValueError ("filedescriptor
    out of range in select()") for a wait's socket above 1023: a busy process (database
    connections, a threads pool) waiting for an x-delay message died of it."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f'the hard limit of open files ({hard}) is below 1,400')
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        got: list = []
        queue = Queue('many-fds', routing_key='many-fds')
        with Connection(_url(redis_url)) as conn:
            consumer = conn.Consumer([queue], callbacks=[lambda body, m: (got.append(body),
                                                                         m.ack())])
            consumer.consume()
            conn.Producer().publish('later', routing_key='many-fds', declare=[queue],
                                    headers={'x-delay': 1500})
            deadline = time.monotonic() + 20
            while not got and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except socket.timeout:
                    pass
        assert got == ['later']
        assert min(held) <= 1023 < max(held)  # so the wait's own socket is above 1023
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------------------
# loss is never silent (#23 item 6)
# ---------------------------------------------------------------------------


def _lost_data_logged(caplog, queue: str) -> bool:
    messages = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    return (any('Redis lost data under key prefix' in m for m in messages)
            and any(f"queue '{queue}' may have lost messages" in m for m in messages))


def test_a_restart_without_persistence_is_logged(tmp_path: Path, caplog) -> None:
    """A Redis restarted without persistence (no AOF, no RDB) forgets every message; the
    consumers connected to it say so (once per queue), within a lease round."""
    import logging

    from conftest import redis7_binary, start_redis, stop_redis
    from test_faults import Server

    proc, port = start_redis(redis7_binary(), tmp_path / 'nopersist')
    server = Server(proc, port, tmp_path / 'nopersist')
    caplog.set_level(logging.WARNING, logger='kombu_streams')
    try:
        queue = Queue('lossq', routing_key='lossq')
        with Connection(server.broker, transport_options={'visibility_timeout': 3}) as conn:
            consumer = conn.Consumer([queue], callbacks=[lambda body, m: None])
            consumer.consume()
            conn.Producer().publish('kept only in memory', routing_key='lossq')
            server.stop(signal.SIGKILL)
            server.restart()
            wait_for(lambda: _lost_data_logged(caplog, 'lossq'), 20,
                     what='the loss to be logged')
            time.sleep(2.5)  # more lease rounds: the same loss is not reported again
        errors = [r for r in caplog.records
                  if "queue 'lossq' may have lost messages" in r.getMessage()]
        assert len(errors) == 1
    finally:
        stop_redis(server.proc)


def test_an_evicted_or_flushed_layout_record_is_logged(redis_url: str, redis_client,
                                                       caplog) -> None:
    """The record is the least recently used key, so allkeys-lru evicts it early: its
    absence at a lease round is reported (here it is deleted, as eviction would)."""
    import logging

    caplog.set_level(logging.WARNING, logger='kombu_streams')
    queue = Queue('evictq', routing_key='evictq')
    with Connection(_url(redis_url), transport_options={'visibility_timeout': 60}) as conn:
        consumer = conn.Consumer([queue], callbacks=[lambda body, m: None])
        consumer.consume()
        conn.transport.leases.run_once()  # (the fixture's FLUSHDB may have removed it)
        caplog.clear()
        conn.transport.leases.run_once()
        assert not _lost_data_logged(caplog, 'evictq')  # nothing lost since
        assert redis_client.delete('ks:layout') == 1
        conn.transport.leases.run_once()
        assert _lost_data_logged(caplog, 'evictq')
        assert redis_client.get('ks:layout') is not None  # recorded again: reported once
