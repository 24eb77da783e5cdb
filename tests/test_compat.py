"""kombu_streams.compat: each branch picked by the feature itself, on the installed releases
and on stand-ins shaped like the other releases (the matrix in noxfile.py runs this file on
every supported stack)."""

from __future__ import annotations

import warnings

import pytest
import redis
from kombu import Connection, Producer

from kombu_streams import compat


class OldPool:
    """redis-py < 5.3: the command name is required."""

    def get_connection(self, command_name, *keys, **options):
        return ('old', command_name)


class NewPool:
    """redis-py >= 5.3: optional, and deprecated when given."""

    def get_connection(self, command_name=None, *keys, **options):
        return ('new', command_name)


def test_pool_connection_passes_a_command_name_only_where_required():
    assert compat.pool_connection(OldPool(), 'BZPOPMIN') == ('old', 'BZPOPMIN')
    assert compat.pool_connection(NewPool(), 'BZPOPMIN') == ('new', None)


@pytest.mark.redis
def test_pool_connection_on_the_installed_redis_py_warns_nothing(redis_url):
    pool = redis.ConnectionPool.from_url(redis_url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # a DeprecationWarning fails the test
            conn = compat.pool_connection(pool, 'BZPOPMIN')
        conn.send_command('PING')
        assert conn.read_response() in (b'PONG', 'PONG')
        pool.release(conn)
    finally:
        pool.disconnect()


class _Client:
    closed = False

    def close(self):
        self.closed = True


class SentinelWithoutClose:
    """redis-py < 8.1: no Sentinel.close(); its clients are in ``sentinels``."""

    def __init__(self):
        self.sentinels = [_Client(), _Client()]


def test_close_sentinels_without_sentinel_close():
    manager = SentinelWithoutClose()
    compat.close_sentinels(manager)
    assert all(c.closed for c in manager.sentinels)


def test_close_sentinels_uses_sentinel_close_where_it_exists():
    manager = SentinelWithoutClose()
    manager.close = lambda: setattr(manager, 'called', True)
    compat.close_sentinels(manager)
    assert manager.called and not any(c.closed for c in manager.sentinels)


def test_credential_provider_read_only_where_kombu_has_it():
    conn = Connection('redis-streams://127.0.0.1:1/0')
    assert compat.conninfo_credential_provider(conn) is None
    assert compat.conninfo_credential_provider(object()) is None  # Kombu < 5.6.1's shape


def test_batch_detection_follows_kombu():
    assert compat.BATCH_PUBLISH is hasattr(Producer, 'batch')
    if compat.BATCH_PUBLISH:
        from kombu.exceptions import BatchPublishError
        assert compat.BatchPublishError is BatchPublishError


class ConnectionWithoutSock:
    """A redis-py that keeps its socket elsewhere than ``_sock``."""


def test_conn_fileno_names_itself_when_redis_py_moved_the_socket():
    with pytest.raises(AttributeError, match=r'compat\.conn_fileno.*ConnectionWithoutSock'):
        compat.conn_fileno(ConnectionWithoutSock())


@pytest.mark.redis
def test_conn_fileno_of_a_pooled_connection_is_its_socket(redis_url):
    pool = redis.ConnectionPool.from_url(redis_url)
    try:
        conn = compat.pool_connection(pool, 'BZPOPMIN')
        fd = compat.conn_fileno(conn)
        assert fd >= 0 and fd == conn._sock.fileno()
        pool.release(conn)
    finally:
        pool.disconnect()
