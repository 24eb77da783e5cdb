"""Turn a Kombu ``Connection`` plus transport options into a redis-py connection pool.

Accepts the connection options of Kombu's Redis transport under the same names, so a switch
of URL scheme keeps an app's settings working. Also checks the server: Redis 6.2 or newer
(XAUTOCLAIM, exclusive ranges), and warns when the server may evict our keys.
"""

from __future__ import annotations

import logging
import ssl as _ssl
import warnings
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from kombu.utils.imports import symbol_by_name

logger = logging.getLogger(__name__)

MIN_VERSION = (6, 2, 0)

#: Options passed through to redis-py's connection pool, as Kombu's Redis transport does.
POOL_OPTIONS = (
    'socket_timeout', 'socket_connect_timeout', 'socket_keepalive',
    'socket_keepalive_options', 'retry_on_timeout', 'max_connections',
    'health_check_interval', 'client_name',
)

#: Kombu Redis transport options that have no meaning here, and why.
REMOVED_OPTIONS = {
    'ack_emulation': 'unacked messages always stay in the stream PEL',
    'unacked_key': 'there is no unacked hash: the PEL is the record',
    'unacked_index_key': 'there is no unacked index: the PEL keeps delivery times',
    'unacked_mutex_key': 'reclaim needs no mutex',
    'unacked_mutex_expire': 'reclaim needs no mutex',
    'unacked_restore_limit': 'reclaim works in bounded batches by itself',
    'unacked_restore_throttle': 'reclaim works in bounded batches by itself',
    'fanout_prefix': 'fanout does not use PUB/SUB here',
    'fanout_patterns': 'fanout does not use PUB/SUB here',
}


class UnsupportedServer(redis.exceptions.ConnectionError):
    """The Redis server is too old for Redis Streams consumer groups as we use them."""


def warn_removed_options(options: dict[str, Any]) -> None:
    for name, why in REMOVED_OPTIONS.items():
        if name in options:
            warnings.warn(
                f'kombu-streams ignores transport option {name!r}: {why}',
                UserWarning, stacklevel=3)


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split('.')[:3]:
        digits = ''.join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_server(client: redis.Redis) -> tuple[int, ...]:
    """Refuse servers older than 6.2; warn when keys may be evicted. Returns the version."""
    info = client.info('server')
    found = str(info.get('redis_version', '0'))
    version = parse_version(found)
    if version < MIN_VERSION:
        raise UnsupportedServer(
            f'kombu-streams needs Redis 6.2 or newer (XAUTOCLAIM, consumer groups); '
            f'the server at {client.connection_pool.connection_kwargs.get("host", "?")} '
            f'runs Redis {found}')
    try:
        policy = client.config_get('maxmemory-policy').get('maxmemory-policy')
    except redis.exceptions.ResponseError:  # CONFIG may be disabled by ACL or renamed
        policy = None
    if policy and policy != 'noeviction':
        logger.warning(
            'kombu-streams: Redis maxmemory-policy is %r; Redis may evict queue keys and '
            'lose messages. Use maxmemory-policy noeviction for a broker.', policy)
    return version


def _ssl_params(conninfo: Any, scheme: str) -> dict[str, Any] | None:
    ssl = conninfo.ssl
    if not ssl and not scheme.startswith('rediss'):
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
    for name in POOL_OPTIONS:
        if options.get(name) is not None:
            kwargs[name] = options[name]
    kwargs.setdefault('max_connections', 10)
    kwargs.setdefault('health_check_interval', 25)
    ssl = _ssl_params(conninfo, scheme)
    if ssl is not None:
        kwargs['connection_class'] = redis.SSLConnection
        kwargs.update(ssl)
    if '://' in host:  # e.g. redis-streams+socket:///path/to/redis.sock
        scheme_, _, rest = host.partition('://')
        if scheme_ == 'socket':
            path, _, query = rest.partition('?')
            kwargs['connection_class'] = redis.UnixDomainSocketConnection
            kwargs['path'] = '/' + unquote(path).lstrip('/')
            kwargs.update(parse_qsl(query))
            for name in ('host', 'port', 'socket_connect_timeout', 'socket_keepalive',
                         'socket_keepalive_options'):
                kwargs.pop(name, None)
    provider = conninfo.credential_provider or options.get('credential_provider')
    if provider:
        if isinstance(provider, str):
            provider = symbol_by_name(provider)()
        if not isinstance(provider, redis.CredentialProvider):
            raise ValueError('credential_provider must be a redis.CredentialProvider')
        kwargs['credential_provider'] = provider
        kwargs.pop('username', None)
        kwargs.pop('password', None)
    return kwargs


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
