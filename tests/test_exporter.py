"""The Prometheus exporter on a real redis-server: the CLI's HTTP endpoint scraped for real,
the text format parsed with prometheus_client's own parser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_until
from kombu import Connection, Exchange, Queue

prometheus = pytest.importorskip('prometheus_client')
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kombu_streams.broker import Broker  # noqa: E402
from kombu_streams.exporter import Collector, make_wsgi_app, registry_for  # noqa: E402
from kombu_streams.keys import Keys  # noqa: E402

CLI = Path(sys.executable).with_name('kombu-streams')


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def loaded(redis_url):
    """Queue 'work': 5 messages at level 9 (priority 9) and 1 at level 0 (priority 0, served
    first); 3 taken by a channel (the level-0 one rejected to the dead letters, 2 held),
    1 delayed; a length limit of 100 (reject-publish);
    fanout 'bcast' with 'bq' bound and 2 broadcasts unread."""
    options = {'dead_letter_rejected': True}
    with Connection(redis_url, transport='kombu_streams.transport:Transport',
                    transport_options=options) as conn:
        ch = conn.channel()
        q = Queue('work', Exchange('work'), 'work', max_priority=9,
                  queue_arguments={'x-max-length': 100, 'x-overflow': 'reject-publish'})
        q(ch).declare()
        bcast = Exchange('bcast', type='fanout')
        Queue('bq', bcast)(ch).declare()
        producer = conn.Producer(ch)
        for priority in (9, 9, 9, 9, 9, 0):
            producer.publish({'p': priority}, exchange='work', routing_key='work',
                             priority=priority)
        producer.publish({'later': 1}, exchange='work', routing_key='work',
                         headers={'x-delay': 600_000})
        producer.publish({'b': 1}, exchange=bcast)
        producer.publish({'b': 2}, exchange=bcast)
        taken = [ch.basic_get('work') for _ in range(3)]
        taken[0].reject(requeue=False)
        yield redis_url


def test_http_scrape_of_the_cli_exporter(loaded):
    port = free_port()
    proc = subprocess.Popen([str(CLI), '--url', loaded, 'exporter', '--port', str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        def scrape():
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return None
        text = wait_until(scrape, 20, 'the exporter to answer')
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    got = samples(text)
    work = (('queue', 'work'),)
    assert got[('kombu_streams_queue_ready_messages', (('level', '0'), ('queue', 'work')))] == 0
    assert got[('kombu_streams_queue_ready_messages', (('level', '9'), ('queue', 'work')))] == 3
    assert got[('kombu_streams_queue_pending_messages', (('level', '9'), ('queue', 'work')))] == 2
    assert got[('kombu_streams_queue_delayed_messages', work)] == 1
    assert 590 < got[('kombu_streams_queue_next_due_seconds', work)] <= 600
    assert got[('kombu_streams_queue_dead_letter_messages', work)] == 1
    assert got[('kombu_streams_queue_consumers', work)] == 1
    assert got[('kombu_streams_queue_oldest_ready_age_seconds', work)] >= 0
    arguments = {labels: v for (name, labels), v in got.items()
                 if name == 'kombu_streams_queue_argument'}
    assert arguments == {(('argument', 'x-max-length'), ('queue', 'work')): 100}
    bq = (('exchange', 'bcast'), ('queue', 'bq'))
    assert got[('kombu_streams_fanout_lag_messages', bq)] == 2
    assert got[('kombu_streams_fanout_pending_messages', bq)] == 0
    assert got[('kombu_streams_scrape_errors_total', ())] == 0
    assert got[('kombu_streams_scrape_queues', ())] == 2  # work and bq
    assert got[('kombu_streams_scrape_duration_seconds', ())] > 0


def test_wsgi_app_and_an_unreachable_broker(redis_client):
    import redis
    broker = Broker(redis.Redis(host='127.0.0.1', port=free_port(), socket_timeout=1),
                    Keys(), [0, 3, 6, 9])
    app = make_wsgi_app(broker, queues=['work'])
    status = []
    body = b''.join(app({'REQUEST_METHOD': 'GET', 'PATH_INFO': '/metrics',
                         'QUERY_STRING': ''}, lambda s, h: status.append(s)))
    assert status == ['200 OK']
    got = samples(body.decode())
    assert got[('kombu_streams_scrape_errors_total', ())] == 1
    assert not any(name.startswith('kombu_streams_queue_') for name, _ in got)


def test_refused_unique_keys_are_a_counter_per_queue(redis_client):
    """Publishes refused because a live message held their x-unique-key: the count kept in
    the queue's key store, read by the same inspect call; 0 for a queue without a store."""
    broker = Broker(redis_client, Keys(), [0, 3, 6, 9])
    for queue in ('u', 'v'):
        broker.declare(queue)
    for _ in range(3):
        broker.publish('u', 0, '{}', unique_key='k')
    got = samples(generate_latest(registry_for(Collector(broker, queues=['u', 'v']))).decode())
    assert got[('kombu_streams_queue_unique_refused_total', (('queue', 'u'),))] == 2
    assert got[('kombu_streams_queue_unique_refused_total', (('queue', 'v'),))] == 0


def test_a_full_queue_counts_its_refusals_and_overflows(redis_client):
    """x-max-length's outcomes, counted in the queue's counters hash by the publish: the
    publishes reject-publish refused, and the messages drop-head set aside."""
    from kombu_streams import QueueFull
    from kombu_streams.limits import stored_pairs
    broker = Broker(redis_client, Keys(), [0, 3, 6, 9])
    for queue, overflow in (('r', 'reject-publish'), ('d', 'drop-head')):
        broker.declare(queue, stored_pairs(queue, {'x-max-length': 1, 'x-overflow': overflow}))
        broker.publish(queue, 0, '{}')
        for _ in range(2):
            try:
                broker.publish(queue, 0, '{}')
            except QueueFull:
                pass
    got = samples(generate_latest(registry_for(Collector(broker, queues=['r', 'd']))).decode())
    assert got[('kombu_streams_queue_refused_publishes_total', (('queue', 'r'),))] == 2
    assert got[('kombu_streams_queue_overflowed_messages_total', (('queue', 'r'),))] == 0
    assert got[('kombu_streams_queue_refused_publishes_total', (('queue', 'd'),))] == 0
    assert got[('kombu_streams_queue_overflowed_messages_total', (('queue', 'd'),))] == 2


def test_a_queue_with_max_length_bytes_shows_what_waits(redis_client):
    """x-max-length-bytes: the bytes waiting as the scripts count them, beside the limit (a
    numeric argument); a queue without it has no such sample."""
    from kombu_streams.limits import stored_pairs
    broker = Broker(redis_client, Keys(), [0, 3, 6, 9])
    broker.declare('b', stored_pairs('b', {'x-max-length-bytes': 5000}))
    broker.declare('n', [])
    for queue in ('b', 'n'):
        broker.publish(queue, 0, '{"x": 1}')
    got = samples(generate_latest(registry_for(Collector(broker, queues=['b', 'n']))).decode())
    assert got[('kombu_streams_queue_waiting_bytes', (('queue', 'b'),))] == 8
    assert got[('kombu_streams_queue_argument',
                (('argument', 'x-max-length-bytes'), ('queue', 'b')))] == 5000
    assert ('kombu_streams_queue_waiting_bytes', (('queue', 'n'),)) not in got


def test_scrape_of_many_queues_is_one_bounded_call_each(redis_client):
    """300 queues, found by SCAN: one inspect call per queue, nothing more."""
    broker = Broker(redis_client, Keys(), [0, 3, 6, 9])
    for i in range(300):
        broker.declare(f'q{i:03}')
        broker.publish(f'q{i:03}', 0, '{}')
    redis_client.config_resetstat()
    got = {m.name: m for m in Collector(broker).collect()}
    assert len(got['kombu_streams_queue_delayed_messages'].samples) == 300
    stats = redis_client.info('commandstats')
    calls = sum(v['calls'] for k, v in stats.items()
                if k in ('cmdstat_evalsha', 'cmdstat_evalsha_ro'))
    assert 300 <= calls <= 302  # one per queue (a first NOSCRIPT may repeat one)


def test_limited_queues_show_in_flight_against_the_limit_and_the_next_rate_slot(redis_client):
    """x-max-in-flight: the messages the reads count against it and the limit; x-rate-limit:
    the deliveries allowed now and the seconds until the next one may go. From the same
    inspect call (the limiter's state is read, never moved); no such series for a queue
    without those limits."""
    from helpers import read_messages

    from kombu_streams.limits import stored_pairs
    broker = Broker(redis_client, Keys(), [0, 3, 6, 9])
    broker.declare('cap', stored_pairs('cap', {'x-max-in-flight': 3}))
    broker.declare('slow', stored_pairs('slow', {'x-rate-limit': '1/h', 'x-rate-burst': 2}))
    broker.declare('fast', stored_pairs('fast', {'x-rate-limit': '1/h', 'x-rate-burst': 2}))
    broker.declare('plain')
    for queue, n in (('cap', 4), ('slow', 3), ('fast', 1), ('plain', 1)):
        for _ in range(n):
            broker.publish(queue, 0, '{}')
    assert len(read_messages(broker, ['cap'], 'c1', 2)) == 2
    assert len(read_messages(broker, ['slow'], 'c1', 5)) == 2  # the burst: no credit left
    got = samples(generate_latest(registry_for(Collector(
        broker, queues=['cap', 'slow', 'fast', 'plain']))).decode())
    assert got[('kombu_streams_queue_in_flight_messages', (('queue', 'cap'),))] == 2
    assert got[('kombu_streams_queue_in_flight_limit_messages', (('queue', 'cap'),))] == 3
    assert got[('kombu_streams_queue_rate_tokens', (('queue', 'slow'),))] == 0
    next_slot = got[('kombu_streams_queue_rate_next_delivery_seconds', (('queue', 'slow'),))]
    assert 3500 < next_slot <= 3600  # two slots used, one interval of tolerance (burst 2)
    assert got[('kombu_streams_queue_rate_tokens', (('queue', 'fast'),))] == 2
    assert got[('kombu_streams_queue_rate_next_delivery_seconds', (('queue', 'fast'),))] == 0
    limited = {'kombu_streams_queue_in_flight_messages': {'cap'},
               'kombu_streams_queue_in_flight_limit_messages': {'cap'},
               'kombu_streams_queue_rate_tokens': {'slow', 'fast'},
               'kombu_streams_queue_rate_next_delivery_seconds': {'slow', 'fast'}}
    for name, queues in limited.items():
        assert {dict(labels)['queue'] for n, labels in got if n == name} == queues
