"""Differences between the Kombu and redis-py releases kombu-streams supports, in one place.

Supported: Kombu 5.3.0 to 5.7.x and redis-py 4.6 to 8.x (docs/getting-started.rst,
"Supported versions"). Each difference is found by looking for the feature itself (an
attribute, an import, a signature), never by comparing version strings: a backport, a
patched distribution package or a release we have not seen then still gets the right branch.
"""

from __future__ import annotations

import inspect
from typing import Any

import kombu.exceptions
import redis
from kombu.messaging import Producer
from redis.connection import ConnectionPool

__all__ = ('BATCH_PUBLISH', 'BatchPublishError', 'conninfo_credential_provider',
           'pool_connection', 'close_sentinels')

#: Kombu 5.7 added ``Producer.batch()``, which asks the channel for ``create_publish_batch``
#: only when ``transport.implements.batch_publish`` is true. Older Kombu has neither, so the
#: transport offers batch publishing only where this is true.
BATCH_PUBLISH: bool = callable(getattr(Producer, 'batch', None))

#: Raised by a failed ``Producer.batch()`` flush. Kombu 5.7's own class where it exists;
#: before that no code path reaches it (there is no batch), so Kombu's base error stands in,
#: only to keep the module importable.
BatchPublishError: type[kombu.exceptions.KombuError] = getattr(
    kombu.exceptions, 'BatchPublishError', kombu.exceptions.KombuError)


def conninfo_credential_provider(conninfo: Any) -> Any:
    """The ``credential_provider`` given to ``kombu.Connection``: Kombu 5.6.1 added the
    argument; before it the attribute does not exist (the transport option still works)."""
    return getattr(conninfo, 'credential_provider', None)


#: pool class -> whether its ``get_connection`` still needs a command name
_NEEDS_COMMAND_NAME: dict[type, bool] = {}


def pool_connection(pool: ConnectionPool, command: str) -> Any:
    """``pool.get_connection()`` for sending ``command`` by hand.

    redis-py before 5.3 requires a command name (a positional argument it ignores); 5.3 and
    newer make it optional and warn that passing it is deprecated. So pass it only to a pool
    whose signature still requires it.
    """
    cls = type(pool)
    needs = _NEEDS_COMMAND_NAME.get(cls)
    if needs is None:
        param = inspect.signature(pool.get_connection).parameters.get('command_name')
        needs = param is not None and param.default is inspect.Parameter.empty
        _NEEDS_COMMAND_NAME[cls] = needs
    if needs:
        return pool.get_connection(command)
    return pool.get_connection()


def conn_fileno(conn: Any) -> int:
    """The socket descriptor of a connected redis-py connection, for an event loop or a
    selector to watch: a wait's answer is read only once its socket is readable.

    Why a private attribute: no supported redis-py (4.6 to 8.x) has a public way to reach
    the socket or its descriptor. ``Connection``, ``SSLConnection`` and
    ``UnixDomainSocketConnection`` keep it in ``_sock`` (None until connected) in every one
    of them; 8.x adds ``_get_socket()``, private as well. Kombu's own Redis transport reads
    the same ``_sock`` to register its BRPOP with the event loop, so a redis-py that renamed
    it would break Kombu alike. This function is the only place kombu-streams reads it. If
    redis-py changes it, waits fail here with the AttributeError below, naming this
    function, at the first wait (drain_events or Celery's event loop), before the wait's
    command is sent.
    """
    sock = getattr(conn, '_sock', None)
    if sock is None:
        raise AttributeError(
            f'kombu-streams: compat.conn_fileno found no socket on {type(conn).__name__} '
            f'(redis-py {redis.__version__}): this release of redis-py keeps it elsewhere, '
            f'or the connection is not connected')
    return int(sock.fileno())


def close_sentinels(manager: Any) -> None:
    """Close the connections a ``redis.sentinel.Sentinel`` keeps to the sentinels.

    ``Sentinel.close()`` exists only from redis-py 8.1; before it, close each sentinel
    client, which is what that method does."""
    close = getattr(manager, 'close', None)
    if callable(close):
        close()
        return
    for client in manager.sentinels:
        client.close()
