"""The direct EVALSHA path (kombu_streams/packing.py, direct.py): the bytes are
redis-py's, and what redis-py's own path gives (replies, error classes, NOSCRIPT reload, a
dropped connection disconnected and retried or raised as its Retry says) stays."""

from __future__ import annotations

import enum
import hashlib
import select

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kombu_streams import direct, scripts
from kombu_streams.packing import HEADS_KEPT, pack_evalsha
from kombu_streams.scripts import PLAIN, Script, direct_evalsha

SHA = hashlib.sha1(b'x').hexdigest()

ARGS = [
    'plain', '', 'caf\u00e9 \u2713 \u65e5\u672c', '\U0001f600', b'', b'\x00\xff\r\n bytes',
    0, 1, -1, 2 ** 70, -(2 ** 63), 1.5, -0.25, 1e300, 3.0,
    'x' * 7000, b'y' * 10000,  # past redis-py's buffer cutoff (6000), which chunks them
]
KEYS = ['{q}:stream', '{q}:\u00e9t\u00e9', b'{q}:raw\xff']


def packers():
    """redis-py's packers: the connection's own (hiredis's where it is installed and this
    redis-py uses it) and, where it exists, the pure Python one."""
    found = [lambda *a: redis.Connection().pack_command(*a)]
    python = getattr(redis.connection, 'PythonRespSerializer', None)
    if python is not None:
        encoder = redis.connection.Encoder('utf-8', 'strict', False)
        found.append(python(6000, encoder.encode).pack)
    return found


@pytest.mark.parametrize('pack', packers())
@pytest.mark.parametrize('keys, args', [
    ([], []), (KEYS, []), ([], ARGS), (KEYS, ARGS), (['k'], [ARGS[2], 7, b'z']),
    (['{q}:s'] * 40, list(range(-5, 300))),
])
def test_bytes_are_redis_pys(pack, keys, args):
    mine = pack_evalsha('EVALSHA', SHA, keys, args)
    assert mine == b''.join(pack('EVALSHA', SHA, len(keys), *keys, *args))
    # the kept head gives the same bytes the second time
    assert pack_evalsha('EVALSHA', SHA, keys, args) == mine


class Level(enum.IntEnum):
    HIGH = 1


class Text(str):
    pass


@pytest.mark.parametrize('odd', [True, Level.HIGH, Text('t'), memoryview(b'm'), None, [1]])
def test_other_types_go_the_plain_way(odd):
    assert pack_evalsha('EVALSHA', SHA, ['k'], ['a', odd]) is None
    assert pack_evalsha('EVALSHA', SHA, ['k', odd], ['a']) is None


def test_equal_numbers_as_keys_are_not_confused():
    """1, 1.0 and True are equal dict keys; each is packed (or refused) as redis-py does."""
    assert pack_evalsha('EVALSHA', SHA, [1], []) == pack_evalsha('EVALSHA', SHA, [1], [])
    assert b'$3\r\n1.0\r\n' in pack_evalsha('EVALSHA', SHA, [1.0], [])
    assert pack_evalsha('EVALSHA', SHA, [True], []) is None


def test_kept_heads_are_bounded():
    for i in range(HEADS_KEPT * 2):
        pack_evalsha('EVALSHA', SHA, [f'k{i}'], [])
    assert len(direct.pack_evalsha.__globals__['_heads']) <= HEADS_KEPT


COUNT = Script('count', "return redis.call('INCR', KEYS[1])",
               hashlib.sha1(b"return redis.call('INCR', KEYS[1])").hexdigest())
SHAPES = ("return {1, 'two', {3, {'four', false}}, redis.call('GET', KEYS[1]), ARGV[1], "
          "#ARGV}")


def _no_plain(client, monkeypatch):
    """Make the plain path fail the test: what runs must be the direct one."""
    def refuse(*args, **kwargs):
        raise AssertionError('plain path taken')
    monkeypatch.setattr(client, 'evalsha', refuse)


@pytest.mark.parametrize('protocol', [2, 3])
def test_replies_and_errors_as_redis_pys(redis_url, protocol, monkeypatch):
    if protocol == 3 and int(redis.__version__.split('.')[0]) < 5:
        pytest.skip('RESP3 needs redis-py 5+')
    kwargs = {'protocol': 3} if protocol == 3 else {}
    client = redis.Redis.from_url(redis_url, **kwargs)
    try:
        sha = client.script_load(SHAPES)
        client.set('{q}:s', 'caf\u00e9')
        args = ['\u65e5\u672c', 5, b'\xff']
        plain = client.evalsha(sha, 1, '{q}:s', *args)
        assert direct_evalsha(client, sha, ['{q}:s'], args) == plain
        assert plain[:3] == [1, b'two', [3, [b'four', None]]]
        client.hset('{q}:h', 'f', 'v')
        with pytest.raises(redis.ResponseError) as expected:
            COUNT(client, ['{q}:h'])  # loads it: a plain call below must not need NOSCRIPT
        _no_plain(client, monkeypatch)
        with pytest.raises(redis.ResponseError) as got:
            COUNT(client, ['{q}:h'])
        assert type(got.value) is type(expected.value)
        assert str(got.value) == str(expected.value)
        assert 'WRONGTYPE' in str(got.value)  # explained: scripts.KeyTypeError
        assert isinstance(got.value, scripts.KeyTypeError)
    finally:
        client.close()


def test_noscript_reloads_and_runs_once(redis_client, monkeypatch):
    assert COUNT(redis_client, ['{q}:n']) == 1
    redis_client.script_flush()
    _no_plain(redis_client, monkeypatch)
    assert COUNT(redis_client, ['{q}:n']) == 2
    assert redis_client.script_exists(COUNT.sha) == [True]


def _cut_on_checkout(client):
    """Cut the (one idle) pooled connection server-side right after the next call takes it
    from the pool (which checks a connection it hands out), as a restart or a network cut
    would mid-call: that call's send or read meets a closed socket."""
    pool = client.connection_pool
    conn = direct._take(pool)
    try:
        conn.send_command('CLIENT', 'ID')
        own = conn.read_response()
    finally:
        pool.release(conn)
    take = pool.get_connection
    cut = []

    def get_connection(*args, **kwargs):
        taken = take(*args, **kwargs)
        if not cut:
            killer = redis.Redis(**{k: v for k, v in pool.connection_kwargs.items()
                                    if k in ('host', 'port', 'db')})
            try:
                cut.append(killer.client_kill_filter(_id=own))
            finally:
                killer.close()
        return taken

    pool.get_connection = get_connection
    return cut


def _outcome(redis_url, retries, call):
    """(result or exception class, the counter after, connections cut) of ``call`` on a
    client whose pooled connection is cut mid-call, with a Retry of ``retries``."""
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), retries),
                                  retry_on_error=[redis.ConnectionError])
    try:
        client.delete('{q}:c')
        client.script_load(COUNT.source)
        cut = _cut_on_checkout(client)
        try:
            result = call(client)
        except Exception as exc:  # compared below with redis-py's own outcome
            result = type(exc)
        return result, client.get('{q}:c'), cut
    finally:
        client.close()


@pytest.mark.parametrize('retries', [0, 1])
def test_dropped_connection_as_redis_pys(redis_url, retries):
    """The connection is disconnected and given back to the pool; the call retried or the
    error raised exactly as redis-py's own EVALSHA does with the same Retry, and never run
    twice."""
    def mine(client):
        reply = direct_evalsha(client, COUNT.sha, ['{q}:c'], [])
        assert reply is not PLAIN
        return reply

    theirs = _outcome(redis_url, retries, lambda c: c.evalsha(COUNT.sha, 1, '{q}:c'))
    assert _outcome(redis_url, retries, mine) == theirs
    if retries:
        assert theirs == (1, b'1', [1])
    else:
        assert theirs == (redis.ConnectionError, None, [1])


def test_unusual_clients_go_the_plain_way(redis_url):
    single = redis.Redis.from_url(redis_url, single_connection_client=True)
    latin = redis.Redis.from_url(redis_url, encoding='latin-1')
    # a client holding one connection goes direct only where redis-py locks it (5.x+)
    locked = hasattr(single, 'single_connection_lock')
    try:
        for client in (latin, single.pipeline(), *(() if locked else (single,))):
            assert direct_evalsha(client, COUNT.sha, ['{q}:c'], []) is PLAIN
        assert COUNT(latin, ['{q}:c']) == 1 and COUNT(single, ['{q}:c']) == 2
    finally:
        single.close()
        latin.close()


def _held(redis_url):
    client = redis.Redis.from_url(redis_url, single_connection_client=True)
    if not hasattr(client, 'single_connection_lock'):
        client.close()
        pytest.skip('this redis-py does not lock a client holding one connection')
    return client


def test_a_held_connection_is_used_under_its_lock_without_the_pool(redis_url, monkeypatch):
    """A channel's client (Transport.make_client(pinned=True)): every call on the one
    connection it holds, the pool never asked, calls of several threads serialised."""
    import threading
    client = _held(redis_url)
    try:
        COUNT(client, ['{q}:held'])  # loaded
        _no_plain(client, monkeypatch)
        taken = []
        monkeypatch.setattr(client.connection_pool, 'get_connection',
                            lambda *a, **k: taken.append(1))
        threads = [threading.Thread(target=lambda: [COUNT(client, ['{q}:held'])
                                                    for _ in range(200)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert client.get('{q}:held') == b'801' and taken == []
    finally:
        client.close()


def test_a_held_connection_the_server_closed_is_replaced_before_use(redis_url, monkeypatch):
    """As the pool checks what it hands out: a held connection killed while idle (CLIENT
    KILL, a restart) is connected again before the call, which runs once."""
    client = _held(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        COUNT(client, ['{q}:killed'])
        _no_plain(client, monkeypatch)
        mine = client.client_id()
        assert admin.client_kill_filter(_id=mine) == 1
        # the server's close has reached this side (a close still on its way is met by the
        # call itself, and retried or raised as the connection's Retry says, as on a pool)
        assert select.select([client.connection._sock], [], [], 5)[0]
        assert COUNT(client, ['{q}:killed']) == 2
        assert client.client_id() != mine
    finally:
        client.close()
        admin.close()


def test_connection_goes_back_to_the_pool(redis_url, monkeypatch):
    """After a reply and after an error reply: a pool of one connection serves every call."""
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=1)
    client = redis.Redis(connection_pool=pool)
    try:
        client.hset('{q}:h', 'f', 'v')
        COUNT(client, ['{q}:n'])  # loaded
        _no_plain(client, monkeypatch)
        for _ in range(3):
            assert COUNT(client, ['{q}:n']) > 1
            with pytest.raises(scripts.KeyTypeError):
                COUNT(client, ['{q}:h'])
        assert client.get('{q}:n') == b'4'
    finally:
        client.close()
        pool.disconnect()


def test_pipelined_calls_reply_in_place_and_reload(redis_client, monkeypatch):
    """Several calls go direct in one round trip: replies in order, an error reply in its
    call's place (explained), NOSCRIPT after SCRIPT FLUSH reloaded and each call run once."""
    redis_client.hset('{q}:h', 'f', 'v')
    redis_client.script_flush()
    monkeypatch.setattr(redis_client, 'pipeline', lambda *a, **k: pytest.fail('pipeline'))
    _no_plain(redis_client, monkeypatch)
    calls = [(COUNT, ['{q}:a'], []), (COUNT, ['{q}:h'], []), (COUNT, ['{q}:a'], [])]
    replies = scripts.run_calls(redis_client, calls, raise_errors=False)
    assert replies[0] == 1 and replies[2] == 2
    assert isinstance(replies[1], scripts.KeyTypeError)
    assert redis_client.get('{q}:a') == b'2'
    with pytest.raises(scripts.KeyTypeError):
        scripts.run_calls(redis_client, calls)


@pytest.mark.parametrize('retries', [0, 1])
def test_dropped_connection_in_pipelined_calls_as_redis_pys(redis_url, retries):
    def mine(client):
        replies = direct.direct_evalshas(client, [(COUNT.sha, ['{q}:c'], [])] * 2)
        assert replies is not PLAIN
        return tuple(replies)

    def theirs(client):
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(COUNT.sha, 1, '{q}:c')
        pipe.evalsha(COUNT.sha, 1, '{q}:c')
        return tuple(pipe.execute())

    plain = _outcome(redis_url, retries, theirs)
    assert _outcome(redis_url, retries, mine) == plain
    retried = retries and not direct._OLD_PIPELINE  # redis-py 4.x: a pipeline does not
    assert plain == (((1, 2), b'2', [1]) if retried else (redis.ConnectionError, None, [1]))
