"""Turn a Kombu ``Connection`` plus transport options into a redis-py connection pool.

Accepts the connection forms and options of Kombu's Redis transport under the same names, so
a switch of URL scheme keeps an app's settings working: TCP, TLS (``ssl``), unix sockets
(``redis-streams+socket:///path``), ACL users and ``credential_provider``, and Sentinel
(``sentinel-streams://``, ``master_name``, ``sentinel_kwargs``). Also checks the server:
Redis 6.2 or newer (XAUTOCLAIM, exclusive ranges), and warns when the server may evict our
keys. The transport only calls :func:`open_pool`, :func:`pool_id` and :func:`close_pool`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import ssl as _ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from kombu.utils.imports import symbol_by_name
from kombu.utils.url import parse_url
from redis.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from .admin import config_value, server_info
from .compat import close_sentinels, conninfo_credential_provider
from .options import DEFAULTS, POOL_OPTIONS

logger = logging.getLogger(__name__)

MIN_VERSION = (6, 2, 0)

#: Redis's default ``proto-max-bulk-len``: the largest string one command may carry.
DEFAULT_BULK_LIMIT = 512 * 1024 * 1024

#: URL schemes (registered in ``kombu_streams/__init__.py``) that find the primary through
#: Redis Sentinel; the ``s`` form uses TLS to the Redis servers, as ``rediss`` does.
SENTINEL_SCHEMES = frozenset({'sentinel-streams', 'sentinels-streams'})
#: Schemes that imply TLS even without an ``ssl`` argument (certificates are verified).
TLS_SCHEMES = frozenset({'rediss', 'rediss-streams', 'sentinels-streams'})
DEFAULT_SENTINEL_PORT = 26379

#: Query parameters accepted in the unix socket form ``redis-streams+socket:///path?...``.
SOCKET_QUERY = {'virtual_host': int, 'db': int, 'socket_timeout': float,
                'credential_provider': str}

class UnsupportedServer(redis.exceptions.ConnectionError):
    """The Redis server is too old for Redis Streams consumer groups as we use them."""


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split('.')[:3]:
        digits = ''.join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_server(client: redis.Redis) -> tuple[int, ...]:
    """Refuse servers older than 6.2; warn when keys may be evicted. Returns the version."""
    info = server_info(client)
    found = str(info.get('redis_version', '0'))
    version = parse_version(found)
    if version < MIN_VERSION:
        raise UnsupportedServer(
            f'kombu-streams needs Redis 6.2 or newer (XAUTOCLAIM, consumer groups); '
            f'the server at {pool_id(client.connection_pool)} runs Redis {found}')
    policy = config_value(client, 'maxmemory-policy')
    if policy and policy != 'noeviction':
        logger.warning(
            'kombu-streams: Redis maxmemory-policy is %r; Redis may evict queue keys and '
            'lose messages. Use maxmemory-policy noeviction for a broker.', policy)
    return version


def bulk_limit(client: redis.Redis) -> int:
    """The largest message the server takes in one command (``proto-max-bulk-len``); Redis's
    default when CONFIG GET is not allowed (ACL) or renamed."""
    value = config_value(client, 'proto-max-bulk-len')
    try:
        return int(value) if value else DEFAULT_BULK_LIMIT
    except ValueError:
        return DEFAULT_BULK_LIMIT


def _ssl_params(conninfo: Any, scheme: str) -> dict[str, Any] | None:
    ssl = conninfo.ssl
    if not ssl and scheme not in TLS_SCHEMES:
        return None
    params: dict[str, Any] = {}
    if isinstance(ssl, dict):
        params.update(ssl)
    if isinstance(params.get('ssl_cert_reqs'), str):
        name = params['ssl_cert_reqs'].upper()
        name = name if name.startswith('CERT_') else f'CERT_{name}'
        params['ssl_cert_reqs'] = getattr(_ssl, name)
    return params


def pool_kwargs(conninfo: Any, options: dict[str, Any], scheme: str) -> dict[str, Any]:
    """Keyword arguments for :class:`redis.ConnectionPool` from Kombu's connection info."""
    host = conninfo.hostname or '127.0.0.1'
    kwargs: dict[str, Any] = {
        'host': host,
        'port': conninfo.port or 6379,
        'db': _db(conninfo.virtual_host),
        'username': conninfo.userid or None,
        'password': conninfo.password or None,
    }
    for name in POOL_OPTIONS:  # None (or not given): the table's default, if it has one
        value = options.get(name)
        value = DEFAULTS[name] if value is None else value
        if value is not None:
            kwargs[name] = value
    ssl = _ssl_params(conninfo, scheme)
    if ssl is not None:
        kwargs['connection_class'] = redis.SSLConnection
        kwargs.update(ssl)
    provider = conninfo_credential_provider(conninfo) or options.get('credential_provider')
    if '://' in host:  # e.g. redis-streams+socket:///path/to/redis.sock?virtual_host=1
        provider = _socket_kwargs(host, kwargs) or provider
    if provider:
        if isinstance(provider, str):
            provider = symbol_by_name(provider)()
        if not isinstance(provider, redis.CredentialProvider):
            raise ValueError('credential_provider must be a redis.CredentialProvider')
        kwargs['credential_provider'] = provider
        kwargs.pop('username', None)
        kwargs.pop('password', None)
    return kwargs


def _socket_kwargs(host: str, kwargs: dict[str, Any]) -> str | None:
    """Rewrite ``kwargs`` for the unix socket form, where Kombu leaves ``socket:///path?query``
    in the host name (the scheme's ``+socket`` suffix). Returns a ``credential_provider``
    named in the query, which wins over the other places one may be given."""
    scheme, _, rest = host.partition('://')
    if scheme != 'socket':
        raise ValueError(f'kombu-streams: cannot connect to host {host!r}; the only '
                         f'transport+URL form is redis-streams+socket:///path/to/redis.sock')
    if kwargs.get('connection_class') is redis.SSLConnection:
        raise ValueError('kombu-streams: TLS over a unix socket is not supported')
    path, _, query = rest.partition('?')
    kwargs['connection_class'] = redis.UnixDomainSocketConnection
    kwargs['path'] = '/' + unquote(path).lstrip('/')
    for name in ('host', 'port', 'socket_connect_timeout', 'socket_keepalive',
                 'socket_keepalive_options'):
        kwargs.pop(name, None)
    provider = None
    for name, value in parse_qsl(query):
        if name not in SOCKET_QUERY:
            raise ValueError(f'kombu-streams: unknown query parameter {name!r} in the unix '
                             f'socket URL; known: {", ".join(sorted(SOCKET_QUERY))}')
        if name in ('virtual_host', 'db'):
            kwargs['db'] = _db(value)
        elif name == 'credential_provider':
            provider = value
        else:
            kwargs[name] = SOCKET_QUERY[name](value)
    return provider


# -- pools ---------------------------------------------------------------------------------


def make_pool(conninfo: Any, options: dict[str, Any], scheme: str) -> redis.ConnectionPool:
    """A connection pool for the URL scheme: a plain pool, or a Sentinel-managed one."""
    kwargs = pool_kwargs(conninfo, options, scheme)
    if scheme in SENTINEL_SCHEMES:
        return sentinel_pool(conninfo, options, kwargs)
    return redis.ConnectionPool(**kwargs)


def open_pool(conninfo: Any, options: dict[str, Any],
              scheme: str) -> tuple[redis.ConnectionPool, tuple[int, ...]]:
    """:func:`make_pool`, then :func:`check_server` through it; returns the pool and the
    server's version. A refused server (or an unreachable one) leaves no sockets behind."""
    pool = make_pool(conninfo, options, scheme)
    try:
        version = check_server(redis.Redis(connection_pool=pool))
    except BaseException:
        close_pool(pool)
        raise
    return pool, version


def close_pool(pool: redis.ConnectionPool) -> None:
    """Disconnect a pool, and for Sentinel also the connections to the sentinels, which
    redis-py keeps in the ``Sentinel`` object rather than in the pool."""
    pool.disconnect()
    if isinstance(pool, SentinelConnectionPool):
        close_sentinels(pool.sentinel_manager)


def socket_timeout(pool: redis.ConnectionPool) -> float | None:
    """The socket timeout a pool's connections get: the one set, or else the connection
    class's own default (None in redis-py 4 and 5, 5 s in redis-py 6 and newer). A blocking
    wait must end before it, or the wait fails with a TimeoutError instead of returning."""
    if 'socket_timeout' in pool.connection_kwargs:
        return pool.connection_kwargs['socket_timeout']
    return _default_socket_timeout(pool.connection_class)


@functools.cache
def _default_socket_timeout(connection_class: Any) -> float | None:
    """A connection class's own default socket timeout. Cached: inspecting the signatures
    costs about 60 us, and every wait asks."""
    for cls in connection_class.__mro__:
        param = inspect.signature(cls.__init__).parameters.get('socket_timeout')
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return None


def pool_id(pool: redis.ConnectionPool) -> str:
    """Names the server and database a pool reaches, for process-wide caches and messages.

    A Sentinel pool is named by its service and its sentinels, not by the current primary:
    routing tables cached before a failover stay valid after it (they were replicated)."""
    kw = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        sentinels = sorted(
            '{host}:{port}'.format_map(s.connection_pool.connection_kwargs)
            for s in pool.sentinel_manager.sentinels)
        return f"sentinel:{pool.service_name}@{','.join(sentinels)}:{kw.get('db')}"
    return f"{kw.get('host')}:{kw.get('port')}:{kw.get('path')}:{kw.get('db')}"


def sentinel_pool(conninfo: Any, options: dict[str, Any],
                  kwargs: dict[str, Any]) -> SentinelConnectionPool:
    """A pool whose connections ask Sentinel for the current primary of ``master_name``.

    redis-py's :class:`SentinelConnectionPool` re-resolves the primary whenever a connection
    is made, disconnects idle connections when the primary moved, and turns a READONLY reply
    (a demoted primary) into a ``ConnectionError``: so a failover surfaces as a connection
    error, and Kombu's or Celery's reconnect lands on the new primary.

    As in Kombu's ``sentinel://`` transport, the URL's user and password (and ``ssl``) are
    for the Redis servers; the sentinels get ``sentinel_kwargs`` (for example their own
    password), or else only the socket options.
    """
    master_name = options.get('master_name')
    if not master_name:
        raise ValueError(
            "kombu-streams: a sentinel-streams:// URL needs the transport option "
            "'master_name', the name Sentinel monitors the primary under "
            "(transport_options={'master_name': 'mymaster'})")
    if 'path' in kwargs:
        raise ValueError('kombu-streams: Sentinel reaches Redis over TCP, not a unix socket')
    kwargs = dict(kwargs)
    kwargs.pop('host', None)
    kwargs.pop('port', None)
    if not conninfo.password and not kwargs.get('credential_provider'):
        # Kombu moves to the next ';' alternate after connection errors and then loses the
        # first URL's credentials: take them from whichever alternate carries them.
        for url in conninfo.alt or ():
            parts = parse_url(url)
            if parts.get('password'):
                kwargs['username'] = parts.get('userid') or None
                kwargs['password'] = parts['password']
                break
    ssl = kwargs.pop('connection_class', None) is redis.SSLConnection
    kwargs['connection_class'] = (
        SentinelManagedSSLConnection if ssl else SentinelManagedConnection)
    sentinel_kwargs = options.get('sentinel_kwargs')
    if sentinel_kwargs is None:
        sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith('socket_')}
    others = options.get('min_other_sentinels')
    manager = Sentinel(
        sentinel_addresses(conninfo),
        min_other_sentinels=DEFAULTS['min_other_sentinels'] if others is None else others,
        sentinel_kwargs=sentinel_kwargs)
    return SentinelConnectionPool(master_name, manager, **kwargs)


def addresses(conninfo: Any, schemes: Iterable[str], default_port: int
              ) -> list[tuple[str, int]]:
    """(host, port) of the URL Kombu currently uses, then of the other ``;``-separated
    alternates (Kombu keeps them in ``Connection.alt``) whose scheme is one of ``schemes``:
    the sentinels of a Sentinel URL, the startup nodes of a Cluster URL."""
    schemes = set(schemes)
    found = [(conninfo.hostname or '127.0.0.1', conninfo.port or default_port)]
    for url in conninfo.alt or ():
        parts = parse_url(url)
        if parts.get('transport') in schemes:
            address = (parts.get('hostname') or '127.0.0.1', parts.get('port') or default_port)
            if address not in found:
                found.append(address)
    return found


def sentinel_addresses(conninfo: Any) -> list[tuple[str, int]]:
    """(host, port) of every sentinel."""
    return addresses(conninfo, SENTINEL_SCHEMES, DEFAULT_SENTINEL_PORT)


def _db(vhost: Any) -> int:
    if isinstance(vhost, int):
        return vhost
    if not vhost or vhost == '/':
        return 0
    try:
        return int(str(vhost).lstrip('/'))
    except ValueError:
        raise ValueError(
            f'kombu-streams: the virtual host is the Redis database number, not {vhost!r}'
        ) from None
