"""The broker a command works on: its URL turned into the transport's, the connection made as
the transport makes it, and the queues found on it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from ..broker import Broker
from ..connection import close_pool
from ..keys import Keys
from .errors import NOT_FOUND, USAGE, Failure

DEFAULT_URL = 'redis-streams://127.0.0.1:6379/0'
#: URL schemes of plain Redis, and the transport schemes they stand for here.
SCHEMES = {'redis': 'redis-streams', 'rediss': 'rediss-streams',
           'redis-streams': 'redis-streams', 'rediss-streams': 'rediss-streams',
           'redis-streams-cluster': 'redis-streams-cluster',
           'rediss-streams-cluster': 'rediss-streams-cluster',
           'sentinel-streams': 'sentinel-streams', 'sentinels-streams': 'sentinels-streams',
           'sentinel': 'sentinel-streams'}
#: Discovery by SCAN stops after this many names, or this many SCAN calls (of COUNT 1000).
DISCOVER_LIMIT = 1000
SCAN_CALLS = 10000


def transport_url(url: str) -> str:
    """``url`` with its scheme turned into the transport's (redis:// -> redis-streams://)."""
    scheme, sep, rest = url.partition('://')
    base, plus, tail = scheme.partition('+')  # e.g. redis-streams+socket:///run/redis.sock
    if not sep or base not in SCHEMES:
        raise Failure(f'unsupported URL {maybe_sanitize_url(url)!r}: use redis-streams://, '
                      f'rediss-streams://, redis://, rediss://, redis-streams-cluster:// or '
                      f'sentinel-streams://', USAGE)
    return f'{SCHEMES[base]}{plus}{tail}://{rest}'


def connect(args: argparse.Namespace) -> Broker:
    """A Broker on the server of ``--url``, connected as the transport connects."""
    options: dict[str, Any] = {'socket_connect_timeout': 5, 'socket_timeout': 30}
    if args.master_name:
        options['master_name'] = args.master_name
    if args.sentinel_password:
        options['sentinel_kwargs'] = {'password': args.sentinel_password}
    conn = Connection(transport_url(args.url), transport_options=options)
    try:
        client = conn.transport.make_client()  # builds the pool, checks the server's version
    except ValueError as exc:  # e.g. a database that is not a number
        raise Failure(str(exc).replace('kombu-streams: ', '', 1), USAGE) from None
    return Broker(client, Keys(args.prefix, cluster=conn.transport.cluster),
                  args.priority_steps)


def disconnect(broker: Broker) -> None:
    """Close the broker's connections (a cluster client holds one pool per node)."""
    if broker.keys.cluster:
        broker.client.close()
    else:
        close_pool(broker.client.connection_pool)


def offline(args: argparse.Namespace) -> Broker:
    """A Broker with no client, for commands that only lay out calls: its keys are named as
    on the server of ``--url`` (a cluster URL gives them their Cluster form)."""
    cluster = 'cluster' in args.url.partition('://')[0]
    return Broker(None, Keys(args.prefix, cluster=cluster), args.priority_steps)


def discover(broker: Broker, kind: str) -> list[str]:
    """Names of the queues (kind 'q') or fanout exchanges (kind 'x') under the prefix, with a
    note on stderr when the search stopped early (see :meth:`Broker.discover`)."""
    names, complete = broker.discover(kind, DISCOVER_LIMIT, SCAN_CALLS)
    if not complete:
        print(f'kombu-streams: stopped looking after {len(names)} names; name them to see '
              f'others', file=sys.stderr)
    return names


def existing_queue(broker: Broker, queue: str) -> dict[str, Any]:
    """The queue's snapshot; Failure(3) when neither its streams nor dead letters exist."""
    info = broker.inspect(queue)
    if not info['exists'] and not info['dlq']:
        raise Failure(f'queue {queue!r} not found (prefix {broker.keys.prefix!r})', NOT_FOUND)
    return info


__all__ = ('DEFAULT_URL', 'SCHEMES', 'transport_url', 'connect', 'disconnect', 'offline',
           'discover', 'existing_queue')
