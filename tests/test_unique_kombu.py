"""Unique keys through Kombu and Celery on real servers: a channel acks (and rejects) messages
that hold an x-unique-key in calls that release it; a batch reports a refused publish; a
Celery task applied twice with one key while the first waits runs once. Script-level cases:
tests/test_unique.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from conftest import requires_batch_publish
from helpers import message_count, read_messages
from kombu import Connection, Consumer, Producer, Queue

from kombu_streams.broker import Broker
from kombu_streams.keys import Keys
from tests.test_celery import QUEUE, celery_env, wait_for

K = Keys()




def _drain(conn: Connection, queue: Queue, settle: str) -> list[Any]:
    """Consume what ``queue`` holds, settling each message by ``settle`` (ack or reject)."""
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        getattr(message, settle)()

    with Consumer(conn.default_channel, [queue], callbacks=[on_message], accept=['json']):
        for _ in range(20):
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                if got:
                    break
            except OSError:  # socket.timeout on older Pythons
                if got:
                    break
    return got


@pytest.mark.parametrize('settle', ['ack', 'reject'])
def test_a_consumed_message_releases_its_key(any_url, caplog, settle):
    q = Queue('uq', routing_key='uq')
    with Connection(any_url) as conn:
        q(conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='uq')
        with caplog.at_level(logging.DEBUG, logger='kombu_streams.unique'):
            for n in range(3):
                producer.publish({'n': n}, headers={'x-unique-key': 'report-7'})
        assert message_count(conn, 'uq') == 1
        assert sum('report-7' in r.getMessage() for r in caplog.records) == 2
        assert _drain(conn, q, settle) == [{'n': 0}]
        conn.default_channel.flush_acks()  # deferred acks go now (no waiting for ACK_DELAY)
        client = conn.default_channel.client
        assert not client.hexists(K.unique('uq'), 'k:report-7')  # released by the settle
        producer.publish({'n': 3}, headers={'x-unique-key': 'report-7'})
        assert message_count(conn, 'uq') == 1


def test_keyed_acks_ride_in_the_next_read(any_url, monkeypatch):
    """A consumer's acks of messages with a key ride inside its next read, as other acks
    do: no ack call of their own while it keeps reading, and every key released."""
    alone: list[Any] = []
    ack_call = Broker.ack_call

    def spy(self: Broker, *args: Any, **kwargs: Any) -> Any:
        call = ack_call(self, *args, **kwargs)
        if call is not None:
            alone.append(call)
        return call

    monkeypatch.setattr(Broker, 'ack_call', spy)
    q = Queue('rq', routing_key='rq')
    with Connection(any_url) as conn:
        q(conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='rq')
        for n in range(5):
            producer.publish({'n': n}, headers={'x-unique-key': f'k{n}'})
        got: list[Any] = []
        with Consumer(conn.default_channel, [q], prefetch_count=1,
                      callbacks=[lambda body, m: (got.append(body), m.ack())]):
            while len(got) < 5:
                conn.drain_events(timeout=5)
            assert alone == []  # four acks rode in reads; the fifth waits for the next
            conn.default_channel.flush_acks()
        client = conn.default_channel.client
        assert [f for f in client.hkeys(K.unique('rq')) if f.startswith(b'k:')] == []
        assert message_count(conn, 'rq') == 0


@requires_batch_publish
def test_a_batch_reports_a_refused_key(any_url):
    with Connection(any_url) as conn:
        Queue('bq', routing_key='bq')(conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='bq', serializer='json')
        with producer.batch() as batch:
            for n in range(3):
                producer.publish({'n': n}, headers={'x-unique-key': 'k'})
        assert batch.state.session.duplicates == {1: ('bq', 'k'), 2: ('bq', 'k')}
        assert message_count(conn, 'bq') == 1


@pytest.mark.celery
@pytest.mark.slow
def test_apply_async_twice_with_one_key_runs_once(tmp_path, redis_url):
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as env:
        module = env.load()
        for tag in ('first', 'second'):  # the first still waits: no worker yet
            module.record.apply_async(args=[tag], headers={'x-unique-key': 'nightly'})
        module.record.apply_async(args=['other'])
        assert env.queue_length() == 2
        worker = env.worker('unique@ks', concurrency=1)
        wait_for(lambda: {'first', 'other'} <= set(env.done()), 60, what='the first tasks',
                 log=env.logs)
        # acked: the key is free again
        module.record.apply_async(args=['third'], headers={'x-unique-key': 'nightly'})
        wait_for(lambda: 'third' in env.done(), 60, what="the task 'third'", log=env.logs)
        worker.terminate()
        assert sorted(env.done()) == ['first', 'other', 'third'], env.logs()
        assert QUEUE == 'celery'


def test_cli_limits_and_status_show_the_unique_arguments_and_refusals(redis_url):
    from tests.test_cli import cli, cli_json
    c = redis.Redis.from_url(redis_url)
    b = Broker(c, K, [0, 3, 6, 9])
    b.declare('cq')
    out = cli_json(redis_url, 'limits', 'cq', '--set', 'x-unique-mode=replace',
                   'x-unique-ttl=60000')
    assert out['arguments'] == {'x-unique-mode': 'replace', 'x-unique-ttl': 60000}
    assert 'unique_refused' not in out
    b.publish('cq', 0, '{"body": "1"}', unique_key='k')
    assert len(read_messages(b, ['cq'], 'c1', 1)) == 1  # in flight: refused, not replaced
    b.publish('cq', 0, '{"body": "2"}', unique_key='k')
    assert cli_json(redis_url, 'limits', 'cq')['unique_refused'] == 1
    assert 'unique keys refused: 1' in cli(redis_url, 'limits', 'cq').stdout
    assert cli_json(redis_url, 'status', 'cq')['queues'][0]['unique_refused'] == 1
    assert '1 unique refused' in cli(redis_url, 'status', 'cq').stdout
    bad = cli(redis_url, 'limits', 'cq', '--set', 'x-unique-mode=last')
    assert bad.returncode == 2 and 'x-unique-mode' in bad.stderr
