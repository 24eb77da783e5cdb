"""The Kombu transport: connection pool, server check, error classes and the poller.

Use it by URL (``redis-streams://host:6379/0``, ``rediss-streams://`` for TLS,
``redis-streams-cluster://host:7000`` for Redis Cluster, ``sentinel-streams://`` for Sentinel;
see :mod:`kombu_streams.connection`) after ``import kombu_streams``, or with
``transport='kombu_streams.transport:Transport'`` (Celery: ``broker_transport``) and a plain
``redis://`` URL.
"""

from __future__ import annotations

import os
import socket
import weakref
from typing import Any

import redis
from kombu.transport import virtual

from .channel import Channel
from .cluster import make_cluster, wants_cluster
from .compat import BATCH_PUBLISH
from .connection import (
    DEFAULT_BULK_LIMIT,
    bulk_limit,
    close_pool,
    open_pool,
    pool_id,
    socket_timeout,
)
from .errors import ChannelClosed
from .leases import LeaseKeeper
from .options import DEFAULTS, warn_unknown
from .options import check as check_options
from .poller import Poller

#: The transports of this process, for the after-fork hook (weak: closed ones go).
_TRANSPORTS: weakref.WeakSet[Transport] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for transport in list(_TRANSPORTS):
        transport.after_fork()


# Every fork: Celery's prefork pool (billiard), multiprocessing, os.fork alike.
os.register_at_fork(after_in_child=_after_fork_in_child)


class Transport(virtual.Transport):
    """Redis Streams transport for Kombu and Celery."""

    Channel = Channel

    #: The poller blocks on wake markers, so Kombu must not sleep between polls.
    polling_interval = None
    default_port = 6379
    #: Celery keys fanout events, mingle, gossip and worker_disable_prefetch on 'redis'.
    driver_type = 'redis'
    driver_name = 'redis-streams'

    #: ``batch_publish`` only where Kombu has ``Producer.batch()`` (5.7+, see compat.py).
    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(['direct', 'topic', 'fanout']),
        **({'batch_publish': True} if BATCH_PUBLISH else {}),
    )

    connection_errors = virtual.Transport.connection_errors + (
        ChannelClosed,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.AuthenticationError,
        # A demoted primary answers writes with READONLY: reconnect (through Sentinel, or
        # a DNS name that follows the primary) instead of failing the channel.
        redis.exceptions.ReadOnlyError,
        socket.error,
        OSError,
        redis.exceptions.ClusterDownError,
        redis.exceptions.SlotNotCoveredError,
    )
    channel_errors = virtual.Transport.channel_errors + (
        redis.exceptions.ResponseError,
        redis.exceptions.DataError,
    )
    #: Kombu's ``ensure()`` (publish with retry, Celery's producer pool) reconnects and
    #: retries these up to ``max_retries``, also when they persist after a reconnect
    #: (NotReplicated through a failover, a Sentinel that still names the old primary).
    #: Without this attribute Kombu treats every error alike and gives up when one comes
    #: back after a successful reconnect: the second try of a retry policy of 100.
    recoverable_connection_errors = connection_errors
    #: The others (WRONGTYPE, OOM, a script error) are raised at once: retrying cannot help.
    recoverable_channel_errors = ()

    def __init__(self, client: Any, **kwargs: Any) -> None:
        options = client.transport_options
        warn_unknown(options)
        check_options(options)
        super().__init__(client, **kwargs)
        interval = options.get('polling_interval')
        #: Longest single blocking wait, in seconds (see :mod:`kombu_streams.poller`).
        self.wait_interval = float(DEFAULTS['polling_interval'] if interval is None
                                   else interval)
        self.polling_interval = None
        self.cycle = Poller(self)
        self.leases = LeaseKeeper(self)
        self._pool: redis.ConnectionPool | None = None
        self._blocking: redis.Redis | None = None
        scheme = client.transport_cls
        #: Redis Cluster (see :mod:`kombu_streams.cluster`): one client for all channels.
        self.cluster = wants_cluster(scheme if isinstance(scheme, str) else '', options)
        self._cluster: redis.RedisCluster | None = None
        #: (pool, its server_id): the last pool named, and its name
        self._server_named: tuple[redis.ConnectionPool, str] | None = None
        self.server_version: tuple[int, ...] | None = None
        #: The largest string the server takes in one command (proto-max-bulk-len)
        self.bulk_limit = DEFAULT_BULK_LIMIT
        _TRANSPORTS.add(self)

    def after_fork(self) -> None:
        """In a child process: nothing of the parent's consuming goes on here. The child
        forgets what the parent's channels hold (it must not renew, ack or requeue the
        parent's messages), drops the parent's pending waits and pooled sockets without
        using them (redis-py only closes a socket another process opened), and gets a lease
        keeper of its own, whose thread starts if the child consumes."""
        for channel in list(self.channels):
            channel.consumer_state.after_fork()
            channel.unpin(forked=True)
        self.cycle.after_fork()
        self.leases = LeaseKeeper(self)
        if self._pool is not None:
            self._pool.disconnect()

    def driver_version(self) -> str:
        return redis.__version__

    @property
    def pool(self) -> redis.ConnectionPool:
        if self._pool is None:
            scheme = self.client.transport_cls
            self._pool, self.server_version = open_pool(
                self.client, self.client.transport_options,
                scheme if isinstance(scheme, str) else '')
            self._cap_wait(self._pool)
            self.bulk_limit = bulk_limit(redis.Redis(connection_pool=self._pool))
        return self._pool

    def _cap_wait(self, pool: redis.ConnectionPool) -> None:
        """A blocking wait must end before the socket times out, whatever the timeout's
        source (the option, or redis-py's own default)."""
        timeout = socket_timeout(pool)
        if timeout:
            self.wait_interval = max(min(self.wait_interval, timeout * 0.8), 0.01)

    @property
    def server_id(self) -> str:
        """Identifies the server and database, for process-wide caches."""
        if self.cluster:
            nodes = self.make_client().nodes_manager.startup_nodes
            return 'cluster:' + ','.join(sorted(nodes))
        # every publish routes by it (the routing cache's key): named once per pool, which
        # reaches the same server and database (or Sentinel service) as long as it lives
        pool, named = self.pool, self._server_named
        if named is None or named[0] is not pool:
            named = self._server_named = (pool, pool_id(pool))
        return named[1]

    def make_client(self, pinned: bool = False) -> Any:
        """A client for script calls: on its own on the shared pool, or the cluster client
        (thread-safe, one per connection).

        ``pinned``: a client that holds one connection of the pool for all its commands
        (redis-py's ``single_connection_client``), for a channel's own calls. Checking a
        connection out of the pool and back in costs redis-py 8 about 40 us of CPU per
        command (its lock and observability hooks; a PING's round trip is about 60), more
        than a read.lua call at prefetch 1 costs Redis. Only where redis-py serialises the
        commands of such a client with a lock of its own (``single_connection_lock``; 6.4
        has it, 5.2 not): the lease keeper's thread may renew through the channel too.
        Otherwise, and on a cluster, the same client as without."""
        if pinned and not self.cluster:
            client = redis.Redis(connection_pool=self.pool, single_connection_client=True)
            if hasattr(client, 'single_connection_lock'):
                return client
            client.close()  # its connection back to the pool
        if self.cluster:
            if self._cluster is None:
                scheme = self.client.transport_cls
                self._cluster = make_cluster(self.client, self.client.transport_options,
                                             scheme if isinstance(scheme, str) else '')
                nodes = [self._cluster.get_redis_connection(node)
                         for node in self._cluster.get_primaries()]
                for node in nodes:
                    self._cap_wait(node.connection_pool)
                self.bulk_limit = min(bulk_limit(node) for node in nodes)
            return self._cluster
        return redis.Redis(connection_pool=self.pool)

    def blocking_client(self) -> Any:
        if self.cluster:
            return self.make_client()
        if self._blocking is None:
            self._blocking = self.make_client()
        return self._blocking

    def wait_pool(self, key: str) -> redis.ConnectionPool:
        """The pool of the server that holds ``key``, for a BZPOPMIN on a raw connection."""
        if self.cluster:
            client = self.make_client()
            return client.get_redis_connection(client.get_node_from_key(key)).connection_pool
        return self.pool

    def refresh_slots(self) -> None:
        """After MOVED / ASK on a wait: learn the cluster's slot map again."""
        if self._cluster is not None:
            self._cluster.nodes_manager.initialize()

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        self.cycle.drain(self._deliver, timeout)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Celery's hub: wait on a socket of our own instead of blocking the loop."""
        self.cycle.register(loop)

    def on_readable(self, fileno: int) -> None:
        self.cycle.on_readable(fileno)

    def close_connection(self, connection: Any) -> None:
        self.leases.stop()
        super().close_connection(connection)
        if self._pool is not None:
            close_pool(self._pool)
            self._pool = None
            self._blocking = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
