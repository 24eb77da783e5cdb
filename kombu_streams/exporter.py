"""Prometheus metrics of a kombu-streams broker: queue depth per priority level, in flight,
delayed, dead letters, consumers, age of the oldest ready message, publishes refused for a
taken x-unique-key, fanout lag; for a queue with x-max-in-flight its messages in flight
against the limit, with x-rate-limit the deliveries allowed now and when the next is.

    kombu-streams --url redis-streams://... exporter --port 9808 [QUEUE...] [-x EXCHANGE]

or, inside an application, :func:`make_wsgi_app` (any WSGI server) or :class:`Collector`
registered in a ``prometheus_client`` registry. Needs ``prometheus_client``
(``pip install kombu-streams[prometheus]``).

Every scrape reads Redis through the read-only inspect scripts (``inspect.lua``,
``inspect_fanout.lua``: no writes, EVALSHA_RO on Redis 7, so a replica can serve them), one
bounded call per queue or exchange; queues are found by SCAN (at most ``max_queues``) unless
named. A scrape of 1,000 queues is 1,000 small calls one after another, never one long one:
other clients of the server wait behind one call at a time. Names follow Prometheus'
conventions (``_messages``, ``_seconds``, base units). A scrape that fails (no connection)
answers with ``kombu_streams_scrape_errors_total`` raised and no queue series, rather than
an HTTP error, so alerts can tell "broker unreachable" from "exporter down".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Union

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client import make_wsgi_app as _wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .broker import Broker
from .limits import WAITING_BYTES

logger = logging.getLogger(__name__)

PREFIX = 'kombu_streams'


class Collector:
    """Collects the broker's metrics at each scrape."""

    def __init__(self, broker: Broker, queues: Sequence[str] = (),
                 exchanges: Sequence[str] = (), max_queues: int = 1000) -> None:
        self.broker = broker
        self.queues, self.exchanges = list(queues), list(exchanges)
        self.max_queues = max_queues
        self.errors = 0

    def _names(self) -> tuple[list[str], list[str]]:
        if self.queues or self.exchanges:
            return self.queues, self.exchanges
        queues, _ = self.broker.discover('q', self.max_queues)
        exchanges, _ = self.broker.discover('x', self.max_queues)
        return queues, exchanges

    def collect(self) -> Iterator[Metric]:
        start = time.perf_counter()
        families = _families()
        count = 0
        try:
            queues, exchanges = self._names()
            for queue in queues:
                info = self.broker.inspect(queue)
                if info['exists'] or info['dlq']:
                    _add_queue(families, info)
                    count += 1
            for exchange in exchanges:
                info = self.broker.inspect_fanout(exchange)
                if info['exists']:
                    _add_fanout(families, exchange, info)
        except Exception as exc:  # an unreachable broker is a metric, not a failed scrape
            self.errors += 1
            logger.warning('kombu-streams exporter: scrape failed: %r', exc)
            families = _families()
            count = 0
        yield from families.values()
        yield _gauge('scrape_duration_seconds', 'Time the last scrape took',
                     time.perf_counter() - start)
        yield _gauge('scrape_queues', 'Queues in the last scrape', count)
        errors = CounterMetricFamily(f'{PREFIX}_scrape_errors', 'Scrapes that failed')
        errors.add_metric([], self.errors)
        yield errors


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(f'{PREFIX}_{name}', doc)
    g.add_metric([], value)
    return g


#: name -> (help, labels)
QUEUE_METRICS = {
    'queue_ready_messages': ('Messages ready to be delivered (requeued ones included)',
                             ['queue', 'level']),
    'queue_requeued_messages': ('Ready messages that were requeued or reclaimed (served '
                                'first)', ['queue', 'level']),
    'queue_pending_messages': ('Messages delivered and not acknowledged yet (in flight)',
                               ['queue', 'level']),
    'queue_delayed_messages': ('Messages waiting for their due time (eta, countdown, '
                               'x-delay)', ['queue']),
    'queue_next_due_seconds': ('Seconds until the next delayed message is due', ['queue']),
    'queue_dead_letter_messages': ('Messages in the dead-letter stream', ['queue']),
    'queue_staged_messages': ('Messages staged per group, not in a stream yet (x-fairness; '
                              'ready, not counted in queue_ready_messages)', ['queue']),
    'queue_group_staged_messages': ('Messages staged of the groups with the most staged '
                                    '(x-fairness; the top 10)', ['queue', 'group']),
    'queue_consumers': ('Consumers holding or recently reading messages', ['queue']),
    'queue_oldest_ready_age_seconds': ('Age of the oldest ready message', ['queue']),
    'queue_expired_messages': ('Messages set aside unread past their TTL (x-message-ttl, '
                               'expiration), counted while the queue lives', ['queue']),
    'queue_argument': ('A numeric queue argument recorded for the queue (x-max-length, ...; '
                       'kombu-streams limits)', ['queue', 'argument']),
    'queue_waiting_bytes': ('Bytes of the messages waiting (ready, requeued, delayed, '
                            'staged), as x-max-length-bytes counts them (queues with that '
                            'limit)', ['queue']),
    'queue_in_flight_messages': ('Messages delivered and not settled, as x-max-in-flight '
                                 'counts them (queues with that limit)', ['queue']),
    'queue_in_flight_limit_messages': ('The queue\'s x-max-in-flight: most messages in '
                                       'flight at once over all consumers', ['queue']),
    'queue_rate_tokens': ('Deliveries the queue\'s x-rate-limit lets through now (its '
                          'burst credit)', ['queue']),
    'queue_rate_next_delivery_seconds': ('Seconds until the queue\'s x-rate-limit lets the '
                                         'next delivery through (0: now)', ['queue']),
    'fanout_lag_messages': ('Fanout messages a bound queue has not read yet',
                            ['exchange', 'queue']),
    'fanout_pending_messages': ('Fanout messages delivered to a bound queue, not '
                                'acknowledged', ['exchange', 'queue']),
    'fanout_consumers': ('Consumers of a bound queue on a fanout exchange',
                         ['exchange', 'queue']),
}


#: name -> (help, labels) of the counters (samples ``..._total``). Each is kept in Redis with
#: its queue and goes with it (a delete, an expiry): a drop back to 0 is a counter reset.
QUEUE_COUNTERS = {
    'queue_unique_refused': ('Publishes not stored because a live message of the queue held '
                             'their x-unique-key', ['queue']),
    'queue_refused_publishes': ('Publishes refused because the queue was full (x-max-length, '
                                'x-max-length-bytes; QueueFull)', ['queue']),
    'queue_overflowed_messages': ('Messages x-overflow drop-head set aside to the dead-letter '
                                  'stream', ['queue']),
}

Families = dict[str, Union[GaugeMetricFamily, CounterMetricFamily]]


def _families() -> Families:
    families: Families = {name: GaugeMetricFamily(f'{PREFIX}_{name}', doc, labels=labels)
                          for name, (doc, labels) in QUEUE_METRICS.items()}
    for name, (doc, labels) in QUEUE_COUNTERS.items():
        families[name] = CounterMetricFamily(f'{PREFIX}_{name}', doc, labels=labels)
    return families


def _add_queue(f: Families, info: dict[str, Any]) -> None:
    queue = info['queue']
    for lv in info['levels']:
        level = str(lv['level'])
        f['queue_ready_messages'].add_metric([queue, level], lv['ready'])
        f['queue_requeued_messages'].add_metric([queue, level], lv['held'])
        f['queue_pending_messages'].add_metric([queue, level], lv['pending'])
    f['queue_delayed_messages'].add_metric([queue], info['delayed'])
    if info['next_due_ms'] is not None:
        f['queue_next_due_seconds'].add_metric([queue], info['next_due_ms'] / 1000)
    f['queue_dead_letter_messages'].add_metric([queue], info['dlq'])
    f['queue_staged_messages'].add_metric([queue], info.get('staged', 0))
    for name, waiting in info.get('groups', {}).get('top', []):
        f['queue_group_staged_messages'].add_metric([queue, name], waiting)
    f['queue_consumers'].add_metric([queue], len(info['consumers']))
    if info['oldest_ready_ms'] is not None:
        f['queue_oldest_ready_age_seconds'].add_metric([queue], info['oldest_ready_ms'] / 1000)
    f['queue_expired_messages'].add_metric([queue], info.get('counters', {}).get('expired', 0))
    f['queue_unique_refused'].add_metric([queue], info.get('unique_refused', 0))
    counters = info.get('counters', {})
    f['queue_refused_publishes'].add_metric([queue], counters.get('refused', 0))
    f['queue_overflowed_messages'].add_metric([queue], counters.get('overflowed', 0))
    if WAITING_BYTES in counters:  # kept while the queue has x-max-length-bytes
        f['queue_waiting_bytes'].add_metric([queue], counters[WAITING_BYTES])
    if info.get('in_flight_limit') is not None:  # what the reads count, and the cap
        f['queue_in_flight_messages'].add_metric([queue], info['in_flight'])
        f['queue_in_flight_limit_messages'].add_metric([queue], info['in_flight_limit'])
    if info.get('rate_tokens') is not None:  # the limiter's state, read, not moved
        f['queue_rate_tokens'].add_metric([queue], info['rate_tokens'])
        f['queue_rate_next_delivery_seconds'].add_metric([queue], info['rate_next_ms'] / 1000)
    for name, value in sorted(info.get('arguments', {}).items()):
        number = _number(value)
        if number is not None:  # x-overflow's mode is not a number: status shows it
            f['queue_argument'].add_metric([queue, name], number)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _add_fanout(f: Families, exchange: str, info: dict[str, Any]) -> None:
    for g in info['groups']:
        f['fanout_lag_messages'].add_metric([exchange, g['group']], g['lag'])
        f['fanout_pending_messages'].add_metric([exchange, g['group']], g['pending'])
        f['fanout_consumers'].add_metric([exchange, g['group']], g['consumers'])


def registry_for(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def make_wsgi_app(broker: Broker, **options: Any) -> Any:
    """A WSGI app serving the broker's metrics (``Collector`` options as keywords)."""
    return _wsgi_app(registry_for(Collector(broker, **options)))


def serve(broker: Broker, port: int, addr: str = '127.0.0.1', **options: Any) -> None:
    """Serve /metrics on ``addr:port`` until interrupted."""
    start_http_server(port, addr=addr, registry=registry_for(Collector(broker, **options)))
    while True:
        time.sleep(3600)


__all__ = ('Collector', 'make_wsgi_app', 'serve', 'registry_for', 'QUEUE_METRICS',
           'QUEUE_COUNTERS')
