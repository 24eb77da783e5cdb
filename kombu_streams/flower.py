"""Flower's Broker tab and ``/api/queues/length`` for kombu-streams.

Flower 2.x picks the code that counts queue lengths from the broker URL's scheme and knows
``redis://``, ``amqp://`` and a few others; for ``redis-streams://`` (or an app configured
with ``broker_transport='kombu_streams.transport:Transport'``, whose URL then starts with
that path) it answers 404 "broker is not supported". Load this module in Flower's config
file, which Flower runs at start::

    # flowerconfig.py
    import kombu_streams.flower  # noqa: F401

    $ celery -A proj flower --conf=flowerconfig.py

It adds our schemes to Flower's broker lookup (``flower.utils.broker.Broker``); nothing of
Flower's files is changed, and other schemes go on to Flower's own code. Lengths come from
the read-only inspect script, one bounded call per queue, run in a thread so Flower's event
loop is never blocked. Per queue: ``messages`` and ``messages_ready`` are the ready messages
(what waits; as Flower's Redis broker counts), ``messages_unacknowledged`` those delivered
and not acknowledged, ``consumers`` the consumers, ``delayed`` those waiting for their due
time, ``arguments`` the queue's recorded arguments (its limits: ``kombu-streams limits``),
``in_flight`` and ``in_flight_limit`` the messages x-max-in-flight counts and its value,
``rate_tokens`` the deliveries x-rate-limit lets through now and ``rate_next_ms`` the ms
until it lets the next one through, ``waiting_bytes`` the bytes of the messages waiting as
x-max-length-bytes counts them (each None without its limit; the API shows them,
Flower's Broker page has fixed columns). The transport options of
Flower's Celery app (``broker_transport_options``: ``global_keyprefix``,
``priority_steps``...) apply.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from flower.utils import broker as flower_broker  # type: ignore[import-untyped]
from kombu import Connection

from .limits import WAITING_BYTES

#: URL schemes (and the transport path of ``broker_transport``) handled here.
SCHEMES = ('redis-streams', 'rediss-streams', 'redis-streams-cluster',
           'rediss-streams-cluster', 'sentinel-streams', 'sentinels-streams')
TRANSPORT_PATH = 'kombu_streams.transport:Transport'


def _ours(broker_url: str) -> bool:
    scheme = broker_url.partition('://')[0].partition('+')[0]
    return scheme in SCHEMES or broker_url.startswith(TRANSPORT_PATH)


class StreamsBroker(flower_broker.BrokerBase):
    """Queue lengths of a kombu-streams broker, for Flower."""

    _connections: dict[tuple[str, str], Connection] = {}
    _lock = threading.Lock()

    def __init__(self, broker_url: str, *args: Any, broker_options: Any = None,
                 **kwargs: Any) -> None:
        if broker_url.startswith(TRANSPORT_PATH):  # broker_transport: the rest is the URL
            broker_url = 'redis-streams' + broker_url[len(TRANSPORT_PATH):]
        self.url = broker_url
        self.options = dict(broker_options or {})

    def _channel(self) -> Any:
        """One connection per URL and options, kept: Flower makes a broker per request."""
        key = (self.url, repr(sorted(self.options.items())))
        with self._lock:
            conn = self._connections.get(key)
            if conn is None:
                conn = Connection(self.url, transport_options=self.options)
                self._connections[key] = conn
            return conn.default_channel

    def _lengths(self, names: list[str]) -> list[dict[str, Any]]:
        broker = self._channel().broker
        out = []
        for name in names:
            info = broker.inspect(name)
            out.append({'name': name, 'messages': info['ready'],
                        'messages_ready': info['ready'],
                        'messages_unacknowledged': info['pending'],
                        'consumers': len(info['consumers']), 'delayed': info['delayed'],
                        'arguments': info['arguments'],
                        'in_flight': info['in_flight'],
                        'in_flight_limit': info['in_flight_limit'],
                        'rate_tokens': info['rate_tokens'],
                        'rate_next_ms': info['rate_next_ms'],
                        'waiting_bytes': (info.get('counters') or {}).get(WAITING_BYTES)})
        return out

    async def queues(self, names: Any) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._lengths, list(names))


_flower_new = flower_broker.Broker.__new__


def _broker_new(cls: type, broker_url: str, *args: Any, **kwargs: Any) -> Any:
    if _ours(broker_url):
        return StreamsBroker(broker_url, *args, **kwargs)
    return _flower_new(cls, broker_url, *args, **kwargs)


if getattr(flower_broker.Broker.__new__, '__name__', '') != '_broker_new':  # imported once
    flower_broker.Broker.__new__ = staticmethod(_broker_new)

__all__ = ('StreamsBroker', 'SCHEMES')
