"""Redis Cluster: build the cluster client from a Kombu connection, check every primary.

A cluster is named by the ``redis-streams-cluster://host:port`` scheme (``rediss-streams-
cluster://`` for TLS), or by the transport option ``cluster=True`` with a ``redis-streams://``
URL. The host (and any ``;``-separated alternates) are startup nodes; redis-py's
:class:`~redis.cluster.RedisCluster` discovers the rest and follows MOVED / ASK.

Nothing else changes shape: every script touches the keys of one hash slot (a queue's keys
share its ``{queue}`` tag, an exchange's keys its ``{exchange}`` tag), the channel splits a
read over several queues into one call per slot, and the poller waits per slot.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from .connection import addresses, check_server, pool_kwargs

#: URL schemes that mean Redis Cluster.
CLUSTER_SCHEMES = ('redis-streams-cluster', 'rediss-streams-cluster')


def wants_cluster(scheme: str, options: dict[str, Any]) -> bool:
    """Whether a connection is to a Redis Cluster (by its scheme or ``cluster`` option)."""
    return bool(options.get('cluster')) or scheme in CLUSTER_SCHEMES


def make_cluster(conninfo: Any, options: dict[str, Any], scheme: str) -> RedisCluster:
    """A connected cluster client; raises ConnectionError when no startup node answers and
    UnsupportedServer when a primary runs Redis older than 6.2."""
    tls = scheme.startswith('rediss') or bool(conninfo.ssl)
    kwargs = pool_kwargs(conninfo, options, 'rediss' if tls else 'redis')
    if kwargs.pop('db', 0):
        raise ValueError('kombu-streams: Redis Cluster has only database 0; drop the '
                         'database number from the URL')
    if 'path' in kwargs:
        raise ValueError('kombu-streams: Redis Cluster needs TCP startup nodes, not a socket')
    del kwargs['host'], kwargs['port']  # the startup nodes name them
    nodes = [ClusterNode(host, port) for host, port in addresses(
        conninfo, (*CLUSTER_SCHEMES, 'redis-streams', 'rediss-streams'), 6379)]
    if kwargs.pop('connection_class', None) is redis.SSLConnection:
        kwargs['ssl'] = True
    try:
        client = RedisCluster(startup_nodes=nodes, **kwargs)
    except RedisClusterException as exc:
        names = ', '.join(f'{n.host}:{n.port}' for n in nodes)
        raise redis.exceptions.ConnectionError(
            f'kombu-streams: no Redis Cluster node answered at {names}: {exc}') from exc
    try:
        for node in client.get_primaries():
            check_server(client.get_redis_connection(node))
    except Exception:
        client.close()
        raise
    return client
