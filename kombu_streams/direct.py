"""Hot script calls sent without redis-py's per-command path: EVALSHA packed here
(:mod:`kombu_streams.packing`, the SHA and KEYS kept packed) and written on a connection of
the client's own pool, the replies read back with the connection's public
``send_packed_command`` / ``read_response``. Part of the one executor (scripts.py calls it);
anything unusual goes the plain way (:data:`PLAIN`). A dropped connection is handled with
the installed redis-py's own failure handler (``_close_connection`` on 6+,
``_disconnect_raise`` on 4.6/5.x: private, as redis-py has no public one).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from redis import Redis
from redis import __version__ as redis_version
from redis import exceptions as redis_errors
from redis.client import Pipeline
from redis.exceptions import ResponseError

from .packing import pack_evalsha

__all__ = ('PLAIN', 'direct_evalsha', 'direct_evalshas')

#: What :func:`direct_evalsha` answers when the call must go the plain way (client.evalsha)
PLAIN: Any = object()
#: per client class: whether its calls may go direct (a plain or Sentinel redis.Redis, fakeredis)
_DIRECT: dict[type, bool] = {}
#: per pool class: whether its get_connection needs the command name (redis-py < 6)
_NAMED: dict[type, bool] = {}


def _direct_pool(client: Any) -> Any:
    """The pool to take a connection from for a direct call, or None where anything is
    unusual: Redis Cluster, a pipeline, a client holding one connection of its own without
    redis-py's lock for it, a client-side cache, another encoding than redis-py's default,
    an EVALSHA reply callback. (A client holding one connection with that lock is used
    through it: see :func:`direct_evalshas`.)"""
    kind = type(client)
    ok = _DIRECT.get(kind)
    if ok is None:
        ok = _DIRECT[kind] = issubclass(kind, Redis) and not issubclass(kind, Pipeline)
    if not ok or 'EVALSHA' in client.response_callbacks or (
            client.connection is not None and not hasattr(client, 'single_connection_lock')):
        return None
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if (kwargs.get('encoding', 'utf-8') != 'utf-8'
            or kwargs.get('encoding_errors', 'strict') != 'strict'
            or getattr(pool, 'cache', None) is not None):
        return None
    return pool


def _take(pool: Any) -> Any:
    """A connection from ``pool``, asked for as this redis-py's own calls do (4.6 and 5.x
    name the command; 6.x and later take no argument and warn about one)."""
    kind = type(pool)
    named = _NAMED.get(kind)
    if named is None:
        param = inspect.signature(kind.get_connection).parameters.get('command_name')
        named = _NAMED[kind] = param is not None and param.default is inspect.Parameter.empty
    return pool.get_connection('EVALSHA') if named else pool.get_connection()


def _ready(conn: Any, pool: Any) -> None:
    """Check a held connection before a call, as redis-py's pool checks one it hands out:
    connected, and nothing to read on it (the server closed it, e.g. CLIENT KILL or a
    restart, or a reply was left unread), else connected again. One poll of the socket:
    what the pool's check-out costs without its bookkeeping. (A close still on its way is
    met by the call itself: retried or raised as the connection's Retry says, as on a
    pooled connection.)"""
    conn.connect()  # nothing when connected
    # on RESP3 a pushed message (a maintenance notice) may wait there: not an error
    pushes = str(pool.connection_kwargs.get('protocol') or 2) == '3'
    try:  # a connection the server closed raises here (end of file)
        if conn.can_read() and not pushes:
            raise redis_errors.ConnectionError('Connection has data')
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
        conn.disconnect()
        conn.connect()


def direct_evalsha(client: Any, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """What ``client.evalsha`` does, packed here (:mod:`kombu_streams.packing`) and without
    redis-py's per-command hooks (its OpenTelemetry metrics and debug log are not recorded):
    error replies raised as redis-py's exceptions (NOSCRIPT as NoScriptError), a dropped
    connection as :func:`direct_evalshas` says; :data:`PLAIN` to go the plain way."""
    replies = direct_evalshas(client, [(sha, keys, args)], pipelined=False)
    if replies is PLAIN:
        return PLAIN
    if isinstance(replies[0], ResponseError):
        raise replies[0]
    return replies[0]


#: redis-py 4.x, whose pipeline retries no ConnectionError (5.x and later: as a command)
_OLD_PIPELINE = int(redis_version.split('.')[0]) < 5


def direct_evalshas(client: Any, calls: Sequence[tuple[str, Sequence[Any], Sequence[Any]]],
                    pipelined: bool = True) -> Any:
    """EVALSHA calls (sha, keys, args) in one round trip, as a redis-py pipeline without
    a transaction sends them: their replies in order, an error reply (redis-py's exception)
    in its call's place. A dropped connection is handled as redis-py does: the connection
    is disconnected, then everything sent again as the connection's Retry says and this
    redis-py's failure handler (of a pipeline, else of a command) allows, or the error
    raised; a connection redis-py asks to reconnect (maintenance notices, 7.x+) is.
    :data:`PLAIN` where the calls must go the plain way (see :func:`_direct_pool`)."""
    pool = _direct_pool(client)
    if pool is None:
        return PLAIN
    packed = [pack_evalsha('EVALSHA', sha, keys, args) for sha, keys, args in calls]
    if None in packed:
        return PLAIN
    # one write, as redis-py's; one call's bytes as they are (a publish's body: no copy)
    chunks = (packed[0] if len(packed) == 1 else b''.join(packed),)  # type: ignore[arg-type]
    # a channel's client holds one connection (Transport.make_client): used under its lock,
    # with no check-out of the pool, which costs redis-py 8 about 40 us of CPU per call
    lock = getattr(client, 'single_connection_lock', None) if client.connection else None
    if lock is not None:
        lock.acquire()
        conn = client.connection  # under the lock: close() may have given it back meanwhile
        if conn is None:
            lock.release()
            lock = None
    if lock is None:
        conn = _take(pool)
    close = getattr(client, '_close_connection', None)  # redis-py 6+; then retry as Retry says

    def fail(error: Exception) -> None:
        if close is not None:
            close(conn)
        elif pipelined and _OLD_PIPELINE:  # retries a timeout only, with retry_on_timeout
            conn.disconnect()
            if not (conn.retry_on_timeout and isinstance(error, redis_errors.TimeoutError)):
                raise error
        else:  # redis-py 4.6-5.x: disconnect; raise unless retry_on_error names the error
            client._disconnect_raise(conn, error)

    def send() -> list[Any]:
        conn.send_packed_command(chunks)  # an iterable of chunks, as redis-py's packer gives
        replies = []
        for _ in calls:
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    try:
        if lock is not None:
            _ready(conn, pool)
        return conn.retry.call_with_retry(send, fail)
    finally:
        try:
            reconnect = getattr(conn, 'should_reconnect', None)
            if reconnect is not None and reconnect():
                conn.disconnect()
                conn.connect()
        finally:
            if lock is not None:
                lock.release()
            else:
                pool.release(conn)
