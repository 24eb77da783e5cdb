"""Every connection form of Kombu's Redis transport, each proven against real servers.

* Sentinel: ``sentinel-streams://`` with ``master_name`` and ``sentinel_kwargs``; a consumer
  keeps consuming across ``SENTINEL FAILOVER`` while a producer keeps publishing.
* TLS: ``rediss-streams://`` with Kombu's ``ssl`` argument and with the URL query form,
  against a server that also demands a client certificate; a wrong CA fails at once.
* ACL: a user with only the permissions docs/guide.rst lists; a wrong password fails at once.
* ``credential_provider``: as an object and as a dotted name in the transport options.
* Unix socket: ``redis-streams+socket:///path``.
* ``global_keyprefix``: every key on the server carries the prefix.

Servers listen on 127.0.0.1 (or a unix socket in a tmp dir) on free ports; each fixture
stops what it started, by pid. Missing ``redis-server``/``openssl`` skips locally and fails
in CI (see ``conftest.missing``).
"""

from __future__ import annotations

import inspect
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import HOST, free_port, missing, redis7_binary, start_redis, stop_redis, wait_until
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.mixins import ConsumerMixin
from redis.sentinel import (
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

import kombu_streams  # noqa: F401  (registers the URL schemes)
from kombu_streams.connection import make_pool, pool_id

ROOT = Path(__file__).resolve().parent.parent

#: The ACL rule docs/guide.rst (Connecting) documents: only what kombu-streams needs. Commands
#: run by the Lua scripts are checked against the calling user too, hence the stream/zset/set
#: commands.
ACL_RULE = (
    'resetkeys ~ks:* resetchannels -@all '
    '+@stream +zadd +zrem +zscore +zrange +zrangebyscore +zcard +bzpopmin '
    '+sadd +sscan +smembers +smismember +srem +hset +hmget +hstrlen +hdel '
    '+hget +hexists +hgetall +hincrby +hlen +zincrby +zscan '
    '+del +unlink +exists +type +pexpire +pexpireat +pttl +time +get +set '
    '+evalsha +script|load +info +ping +select +client|setname +client|id +client|unblock'
)


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------


def _binary() -> str:
    return redis7_binary()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:])
    except OSError:
        return '<no log>'


def spawn(make_argv: Callable[[int], list[str]], ready: Callable[[int], bool],
          tmpdir: Path, name: str, attempts: int = 4) -> tuple[subprocess.Popen, int]:
    """Start ``make_argv(port)`` on a free port until ``ready(port)``; for servers that
    ``conftest.start_redis`` cannot start (TLS only, sentinels). Retries with a new port
    when the process exits early (the port was taken between picking and binding)."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    error = 'no attempt'
    for attempt in range(attempts):
        port = free_port()
        log = tmpdir / f'{name}-{port}-{attempt}.log'
        with open(log, 'wb') as out:
            proc = subprocess.Popen(make_argv(port), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=tmpdir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if ready(port):
                return proc, port
            time.sleep(0.05)
        if proc.poll() is None:
            stop_redis(proc)
            raise RuntimeError(f'{name} did not get ready on port {port}:\n{_tail(log)}')
        error = f'{name} exited with {proc.returncode}:\n{_tail(log)}'
    raise RuntimeError(error)


def _answers(**kwargs: Any) -> bool:
    client = redis.Redis(socket_timeout=1, socket_connect_timeout=1, **kwargs)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


@pytest.fixture(scope='module')
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A server of this module's own (ACL users, key scans): yields its port."""
    proc, port = start_redis(_binary(), tmp_path_factory.mktemp('conn-plain'))
    try:
        yield port
    finally:
        stop_redis(proc)


@pytest.fixture
def admin(plain_server: int) -> Iterator[redis.Redis]:
    """Default-user client of ``plain_server``, flushed before the test."""
    client = redis.Redis(host=HOST, port=plain_server)
    client.flushall()
    client.script_flush()
    try:
        yield client
    finally:
        client.close()


def round_trip(conn: Connection, tag: str, count: int = 3) -> None:
    """Publish, consume and ack on a direct queue and a fanout exchange; requeue one message,
    then purge and delete: every script path a worker uses. Fails on loss or extras."""
    direct = Queue(f'{tag}-q', Exchange(f'{tag}-x', 'direct'), routing_key=tag)
    fan = Queue(f'{tag}-fan', Exchange(f'{tag}-fx', 'fanout'))
    bodies = [{'tag': tag, 'n': n} for n in range(count)]
    with conn.channel() as ch:
        for queue in (direct, fan):
            queue(ch).declare()
        producer = Producer(ch, serializer='json')
        for body in bodies:
            producer.publish(body, exchange=direct.exchange, routing_key=tag)
        producer.publish({'tag': tag, 'fan': 1}, exchange=fan.exchange, routing_key='')
        got: list[Any] = []

        def on_message(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()

        with Consumer(ch, [direct, fan], callbacks=[on_message], accept=['json']):
            while len(got) < count + 1:
                conn.drain_events(timeout=5)
            with pytest.raises(socket.timeout):
                conn.drain_events(timeout=0.2)
        assert [b for b in got if 'n' in b] == bodies
        assert [b for b in got if 'fan' in b] == [{'tag': tag, 'fan': 1}]

        producer.publish({'tag': tag, 'again': 1}, exchange=direct.exchange, routing_key=tag)
        first = direct(ch).get(accept=['json'])
        first.requeue()
        again = direct(ch).get(accept=['json'])
        assert again.payload == {'tag': tag, 'again': 1} and again.delivery_info['redelivered']
        again.ack()
        assert direct(ch).queue_declare(passive=True).message_count == 0
        producer.publish({'tag': tag, 'purged': 1}, exchange=direct.exchange, routing_key=tag)
        assert direct(ch).purge() == 1
        fan(ch).delete()
        direct(ch).delete()


# ---------------------------------------------------------------------------
# unix socket
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def unix_socket() -> Iterator[str]:
    """A server listening on a unix socket in a short tmp dir (sun_path is ~107 bytes)."""
    tmpdir = Path(tempfile.mkdtemp(prefix='ks-sock-'))
    path = tmpdir / 'redis.sock'
    proc, _port = start_redis(_binary(), tmpdir,
                              ['--unixsocket', str(path), '--unixsocketperm', '700'])
    try:
        yield str(path)
    finally:
        stop_redis(proc)
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_unix_socket_round_trip(unix_socket: str) -> None:
    with Connection(f'redis-streams+socket://{unix_socket}') as conn:
        round_trip(conn, 'sock')
        kwargs = conn.transport.pool.connection_kwargs
        assert kwargs['path'] == unix_socket and kwargs['db'] == 0
        assert conn.transport.pool.connection_class is redis.UnixDomainSocketConnection
        assert unix_socket in conn.transport.server_id


def test_server_id_names_the_pool_in_use(redis_url: str) -> None:
    """The transport names its pool once (every publish routes by the name), and names it
    again when the pool is replaced: a name kept from the old pool would share routing
    tables between two databases."""
    with Connection(redis_url.replace('redis://', 'redis-streams://', 1)) as conn:
        transport = conn.transport
        first = transport.server_id
        assert first == pool_id(transport.pool) and transport.server_id is first
        mine, other = transport.pool, redis.ConnectionPool.from_url(redis_url)
        other.connection_kwargs['db'] = 5
        transport._pool = other
        try:
            assert transport.server_id == pool_id(other) and transport.server_id.endswith(':5')
        finally:
            transport._pool = mine
            other.disconnect()
        assert transport.server_id == first


def test_unix_socket_database_in_query(unix_socket: str) -> None:
    raw = redis.Redis(unix_socket_path=unix_socket, db=3)
    try:
        raw.flushdb()
        with Connection(f'redis-streams+socket://{unix_socket}?virtual_host=3') as conn:
            queue = Queue('sock-db3', Exchange('sock-db3', 'direct'), routing_key='r')
            with conn.Producer(serializer='json') as producer:
                producer.publish('x', exchange=queue.exchange, routing_key='r', declare=[queue])
            assert conn.transport.pool.connection_kwargs['db'] == 3
            assert [k for k in raw.scan_iter() if b'sock-db3' in k]
        with pytest.raises(ValueError, match='unknown query parameter'):
            Connection(f'redis-streams+socket://{unix_socket}?bogus=1').connect()
    finally:
        raw.flushdb()
        raw.close()


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    wrong_ca: str


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(['openssl', *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f'openssl {" ".join(args)} failed:\n{done.stderr}')


def _make_ca(cwd: Path, name: str) -> None:
    _openssl('req', '-x509', '-new', '-nodes', '-newkey', 'rsa:2048', '-days', '2',
             '-keyout', f'{name}.key', '-out', f'{name}.crt', '-subj', f'/CN=kombu-streams {name}',
             '-addext', 'basicConstraints=critical,CA:TRUE',
             '-addext', 'keyUsage=critical,keyCertSign,cRLSign', cwd=cwd)


def _make_leaf(cwd: Path, name: str, usage: str) -> None:
    (cwd / f'{name}.ext').write_text(
        'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n'
        f'extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n'
        'subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n')
    _openssl('req', '-new', '-nodes', '-newkey', 'rsa:2048', '-keyout', f'{name}.key',
             '-out', f'{name}.csr', '-subj', f'/CN=kombu-streams {name}', cwd=cwd)
    _openssl('x509', '-req', '-in', f'{name}.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key',
             '-CAcreateserial', '-days', '2', '-out', f'{name}.crt',
             '-extfile', f'{name}.ext', cwd=cwd)


@pytest.fixture(scope='session')
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server and a client certificate signed by it, and an unrelated CA."""
    if shutil.which('openssl') is None:
        missing('openssl not installed')
    d = tmp_path_factory.mktemp('tls')
    _make_ca(d, 'ca')
    _make_ca(d, 'wrong-ca')
    _make_leaf(d, 'server', 'serverAuth')
    _make_leaf(d, 'client', 'clientAuth')
    return Certs(ca=str(d / 'ca.crt'), server_cert=str(d / 'server.crt'),
                 server_key=str(d / 'server.key'), client_cert=str(d / 'client.crt'),
                 client_key=str(d / 'client.key'), wrong_ca=str(d / 'wrong-ca.crt'))


@pytest.fixture(scope='module')
def tls_port(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A TLS-only server (``--port 0``) that requires a client certificate."""
    binary = _binary()
    tmpdir = tmp_path_factory.mktemp('conn-tls')

    def argv(port: int) -> list[str]:
        return [binary, '--port', '0', '--tls-port', str(port), '--bind', HOST,
                '--tls-cert-file', certs.server_cert, '--tls-key-file', certs.server_key,
                '--tls-ca-cert-file', certs.ca, '--tls-auth-clients', 'yes',
                '--save', '', '--appendonly', 'no', '--dir', str(tmpdir)]

    def ready(port: int) -> bool:
        return _answers(host=HOST, port=port, ssl=True, ssl_ca_certs=certs.ca,
                        ssl_certfile=certs.client_cert, ssl_keyfile=certs.client_key)

    proc, port = spawn(argv, ready, tmpdir, 'redis-tls')
    try:
        yield port
    finally:
        stop_redis(proc)


#: "Fails promptly": a connection refused for good (an untrusted certificate, a wrong
#: password) is tried this many times at most (Kombu's connect() retries once), never
#: retried on and on. Counted, not timed.
PROMPT_ATTEMPTS = 2


def count_connects(monkeypatch: pytest.MonkeyPatch, port: int,
                   username: str | None = None) -> list[str]:
    """Every redis-py connection attempt to PORT (as USERNAME, if given) from now on (its
    class name). Only those: a thread another test of this process left running (a
    consumer, an exporter) may connect meanwhile."""
    attempts: list[str] = []
    real = redis.connection.Connection.connect

    def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, 'port', None) == port and username in (None, self.username):
            attempts.append(type(self).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.Connection, 'connect', connect)
    return attempts


def _ssl(certs: Certs, ca: str | None = None) -> dict[str, Any]:
    return {'ssl_cert_reqs': 'required', 'ssl_ca_certs': ca or certs.ca,
            'ssl_certfile': certs.client_cert, 'ssl_keyfile': certs.client_key}


def test_tls_round_trip_with_ssl_argument(tls_port: int, certs: Certs) -> None:
    with Connection(f'rediss-streams://{HOST}:{tls_port}/0', ssl=_ssl(certs)) as conn:
        round_trip(conn, 'tls-arg')
        pool = conn.transport.pool
        assert pool.connection_class is redis.SSLConnection
        assert pool.connection_kwargs['ssl_ca_certs'] == certs.ca


def test_tls_round_trip_with_url_query(tls_port: int, certs: Certs) -> None:
    url = (f'rediss-streams://{HOST}:{tls_port}/0?ssl_cert_reqs=CERT_REQUIRED'
           f'&ssl_ca_certs={certs.ca}&ssl_certfile={certs.client_cert}'
           f'&ssl_keyfile={certs.client_key}')
    with Connection(url) as conn:
        round_trip(conn, 'tls-url')
        assert conn.transport.pool.connection_class is redis.SSLConnection


@pytest.mark.parametrize('how', ['wrong CA', 'no CA given'])
def test_tls_untrusted_server_fails_promptly(tls_port: int, certs: Certs, how: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """rediss-streams:// verifies the server even without an ``ssl`` argument."""
    ssl = _ssl(certs, certs.wrong_ca) if how == 'wrong CA' else None
    conn = Connection(f'rediss-streams://{HOST}:{tls_port}/0', ssl=ssl or False,
                      transport_options={'socket_connect_timeout': 3})
    attempts = count_connects(monkeypatch, tls_port)
    try:
        with pytest.raises(conn.connection_errors) as info:
            conn.connect()
    finally:
        conn.release()
    assert 1 <= len(attempts) <= PROMPT_ATTEMPTS, attempts  # promptly: not retried on
    assert 'certificate verify failed' in str(info.value).lower()


# ---------------------------------------------------------------------------
# ACL users and credential providers
# ---------------------------------------------------------------------------


@pytest.fixture
def acl_user(admin: redis.Redis) -> Iterator[tuple[str, str]]:
    """A user with exactly ``ACL_RULE``; yields (name, password)."""
    name, password = 'ks-worker', 'ks-secret-1'
    admin.execute_command('ACL', 'SETUSER', name, 'reset', 'on', f'>{password}',
                          *ACL_RULE.split())
    admin.execute_command('ACL', 'LOG', 'RESET')
    try:
        yield name, password
    finally:
        admin.execute_command('ACL', 'DELUSER', name)


def _denied(admin: redis.Redis, user: str) -> list[str]:
    """What the ACL refused ``user`` since the log was reset. Not counted: CONFIG GET (the
    eviction-policy check skips itself without it) and CLIENT SETINFO (redis-py sends it on
    Redis 7.2+ and ignores a refusal)."""
    return [str(e.get('object')) for e in admin.acl_log()
            if str(e.get('username')) == user
            and e.get('object') not in ('config|get', 'client|setinfo')]


def test_the_docs_document_the_acl_rule() -> None:
    guide = ' '.join((ROOT / 'docs' / 'guide.rst').read_text().split())
    assert ACL_RULE in guide


def test_acl_user_round_trip(plain_server: int, admin: redis.Redis,
                             acl_user: tuple[str, str]) -> None:
    user, password = acl_user
    url = f'redis-streams://{user}:{password}@{HOST}:{plain_server}/1'
    options = {'visibility_timeout': 1.5, 'client_name': 'ks-acl'}
    with Connection(url, transport_options=options) as conn:
        round_trip(conn, 'acl')
        # hold one message past a lease renewal and a reclaim pass: both are scripts too
        queue = Queue('acl-held', Exchange('acl-held', 'direct'), routing_key='h')
        with conn.Producer(serializer='json') as producer:
            producer.publish('held', exchange=queue.exchange, routing_key='h', declare=[queue])
        with conn.channel() as ch:
            held = queue(ch).get(accept=['json'])
            time.sleep(1.2)
            held.ack()
    users = {c.get('user') for c in admin.client_list() if c.get('name') == 'ks-acl'}
    assert users <= {user}
    assert _denied(admin, user) == []


def test_acl_rule_without_get_set_still_works(plain_server: int, admin: redis.Redis,
                                             caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule README documented before the key layout check (no +get +set): the check is
    refused and skipped with a warning; the app keeps working."""
    from kombu_streams import channel
    monkeypatch.setattr(channel, '_LAYOUT_SEEN', set())  # not checked yet in this process
    name, password = 'ks-old-rule', 'ks-secret-2'
    rule = ACL_RULE.replace(' +get +set', '')
    assert rule != ACL_RULE
    admin.execute_command('ACL', 'SETUSER', name, 'reset', 'on', f'>{password}', *rule.split())
    try:
        url = f'redis-streams://{name}:{password}@{HOST}:{plain_server}/1'
        with caplog.at_level('WARNING', logger='kombu_streams.broker'):
            with Connection(url) as conn:
                round_trip(conn, 'old-acl')
        assert any('could not check the key layout' in r.getMessage() for r in caplog.records)
    finally:
        admin.execute_command('ACL', 'DELUSER', name)


def test_acl_wrong_password_fails_promptly(plain_server: int, acl_user: tuple[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    user, _ = acl_user
    conn = Connection(f'redis-streams://{user}:wrong@{HOST}:{plain_server}/0')
    attempts = count_connects(monkeypatch, plain_server, user)
    try:
        with pytest.raises(redis.AuthenticationError):
            conn.connect()
    finally:
        conn.release()
    assert 1 <= len(attempts) <= PROMPT_ATTEMPTS, attempts  # promptly: not retried on


class StaticCredentials(redis.CredentialProvider):
    """Hands out the credentials a test put on the class (the way a provider would fetch
    rotating ones from a secret store); counts its calls to prove it was asked."""

    username = ''
    password = ''
    calls = 0

    def get_credentials(self) -> tuple[str, str]:
        type(self).calls += 1
        return type(self).username, type(self).password


@pytest.mark.parametrize('how', ['connection argument', 'object option', 'dotted option'])
def test_credential_provider(plain_server: int, admin: redis.Redis,
                             acl_user: tuple[str, str], how: str) -> None:
    StaticCredentials.username, StaticCredentials.password = acl_user
    StaticCredentials.calls = 0
    url = f'redis-streams://{HOST}:{plain_server}/0'
    options: dict[str, Any] = {'client_name': 'ks-provider'}
    kwargs: dict[str, Any] = {}
    if how == 'connection argument':
        if 'credential_provider' not in inspect.signature(Connection).parameters:
            pytest.skip("this Kombu's Connection has no credential_provider argument (new in "
                        "Kombu 5.6.1); the transport option works on every Kombu")
        kwargs['credential_provider'] = StaticCredentials()
    elif how == 'object option':
        options['credential_provider'] = StaticCredentials()
    else:
        options['credential_provider'] = f'{__name__}:StaticCredentials'
    with Connection(url, transport_options=options, **kwargs) as conn:
        round_trip(conn, 'provider')
        users = {c.get('user') for c in admin.client_list() if c.get('name') == 'ks-provider'}
        assert users == {acl_user[0]}
    assert StaticCredentials.calls >= 1
    StaticCredentials.password = 'rotated-away'
    with Connection(url, transport_options=options, **kwargs) as conn:
        with pytest.raises(redis.AuthenticationError):
            conn.connect()


def test_credential_provider_must_be_a_provider(plain_server: int) -> None:
    conn = Connection(f'redis-streams://{HOST}:{plain_server}/0',
                      transport_options={'credential_provider': 'builtins:object'})
    with pytest.raises(ValueError, match='CredentialProvider'):
        conn.connect()


# ---------------------------------------------------------------------------
# global_keyprefix
# ---------------------------------------------------------------------------


def test_global_keyprefix_every_key_on_the_server(plain_server: int,
                                                  admin: redis.Redis) -> None:
    url = f'redis-streams://{HOST}:{plain_server}/0'
    with Connection(url, transport_options={'global_keyprefix': 'tenant7:'}) as conn:
        queue = Queue('kp', Exchange('kp', 'direct'), routing_key='kp')
        fan = Queue('kp-fan', Exchange('kp-fx', 'fanout'))
        with conn.channel() as ch:
            queue(ch).declare()
            fan(ch).declare()
            producer = Producer(ch, serializer='json')
            producer.publish('d', exchange=queue.exchange, routing_key='kp')
            producer.publish('f', exchange=fan.exchange, routing_key='')
            keys = sorted(k.decode() for k in admin.scan_iter(count=1000))
            assert keys and all(k.startswith('tenant7:ks:') for k in keys), keys
            assert any(':fanout' in k for k in keys) and any('{kp}' in k for k in keys)
            got = {queue(ch).get(accept=['json']).payload,
                   fan(ch).get(accept=['json']).payload}
            assert got == {'d', 'f'}
        round_trip(conn, 'kp-rt')
    keys = [k.decode() for k in admin.scan_iter(count=1000)]
    assert all(k.startswith('tenant7:') for k in keys), keys


# ---------------------------------------------------------------------------
# Sentinel
# ---------------------------------------------------------------------------

MASTER = 'ksmaster'
DATA_PASSWORD = 'ks-data-pw'
SENTINEL_PASSWORD = 'ks-sentinel-pw'


@dataclass
class SentinelSetup:
    primary: int
    replica: int
    sentinel: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    def data(self, port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, password=DATA_PASSWORD, socket_timeout=5)

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.sentinel, password=SENTINEL_PASSWORD,
                           socket_timeout=5, decode_responses=True)

    def url(self, dead_sentinel: int) -> str:
        """The Kombu ``;`` form: this sentinel, then one that is down (Kombu moves to it
        after errors, so the credentials must survive the switch)."""
        return (f'sentinel-streams://:{DATA_PASSWORD}@{HOST}:{self.sentinel}/0;'
                f'sentinel-streams://{HOST}:{dead_sentinel}/0')

    def options(self, **extra: Any) -> dict[str, Any]:
        return {'master_name': MASTER, 'sentinel_kwargs': {'password': SENTINEL_PASSWORD},
                'socket_timeout': 3, 'socket_connect_timeout': 2, **extra}


def _replica_ready(setup: SentinelSetup) -> bool:
    client = setup.sentinel_client()
    try:
        replicas = client.sentinel_slaves(MASTER)
    except redis.RedisError:
        return False
    finally:
        client.close()
    return any(r['port'] == setup.replica and r.get('master-link-status') == 'ok'
               and not r['is_sdown'] for r in replicas)


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    """Primary + replica (both with a password) + one sentinel (own password, quorum 1,
    5 s down-after, 5 s failover-timeout), all on free loopback ports. Failovers here are
    asked for (SENTINEL FAILOVER); the long down-after keeps a loaded machine's slow replies
    from starting another one on its own."""
    binary = _binary()
    procs: list[subprocess.Popen] = []
    try:
        primary_proc, primary = start_redis(binary, tmp_path / 'primary')
        procs.append(primary_proc)
        replica_proc, replica = start_redis(binary, tmp_path / 'replica')
        procs.append(replica_proc)
        for port in (primary, replica):  # masterauth on both: they swap roles later
            client = redis.Redis(host=HOST, port=port)
            client.config_set('masterauth', DATA_PASSWORD)
            # a full sync starts at once, not after the default 5 s wait for more replicas
            client.config_set('repl-diskless-sync-delay', 0)
            if port == replica:
                client.replicaof(HOST, primary)
            client.config_set('requirepass', DATA_PASSWORD)
            client.close()
        setup = SentinelSetup(primary, replica, 0, procs)
        wait_until(lambda: setup.data(replica).info('replication').get('master_link_status')
                   == 'up', 10, 'the replica to sync')
        sentinel_dir = tmp_path / 'sentinel'
        sentinel_dir.mkdir()

        def argv(port: int) -> list[str]:
            conf = sentinel_dir / f'sentinel-{port}.conf'
            conf.write_text(
                f'port {port}\nbind {HOST}\ndir {sentinel_dir}\n'
                f'requirepass {SENTINEL_PASSWORD}\n'
                f'sentinel monitor {MASTER} {HOST} {primary} 1\n'
                f'sentinel auth-pass {MASTER} {DATA_PASSWORD}\n'
                f'sentinel down-after-milliseconds {MASTER} 5000\n'
                f'sentinel failover-timeout {MASTER} 5000\n')
            return [binary, str(conf), '--sentinel']

        sentinel_proc, setup.sentinel = spawn(
            argv, lambda port: _answers(host=HOST, port=port, password=SENTINEL_PASSWORD),
            sentinel_dir, 'sentinel')
        procs.insert(0, sentinel_proc)  # stopped first, so it starts no failover at teardown
        wait_until(lambda: _replica_ready(setup), 30, 'the sentinel to see the replica')
        yield setup
    finally:
        for proc in procs:
            stop_redis(proc)


def test_sentinel_schemes_registered() -> None:
    from kombu.transport import resolve_transport

    from kombu_streams.transport import Transport

    for scheme in ('sentinel-streams', 'sentinels-streams'):
        assert resolve_transport(scheme) is Transport


def test_sentinel_requires_master_name() -> None:
    conn = Connection(f'sentinel-streams://{HOST}:{free_port()}/0')
    try:
        with pytest.raises(ValueError, match="transport option 'master_name'"):
            conn.connect()
    finally:
        conn.release()


def test_sentinel_pool_options_without_servers() -> None:
    """Credentials survive Kombu's switch to another ``;`` alternate, TLS selects the
    SSL-managed connection, and the sentinels get only ``sentinel_kwargs``."""
    conn = Connection(f'sentinels-streams://u1:pw1@{HOST}:26379/2;'
                      f'sentinels-streams://{HOST}:26380/2',
                      ssl={'ssl_cert_reqs': 'none'})
    conn.maybe_switch_next()
    assert conn.port == 26380 and conn.password is None
    options = {'master_name': 'm', 'sentinel_kwargs': {'password': 'sp'},
               'max_connections': 7}
    pool = make_pool(conn, options, conn.transport_cls)
    try:
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.connection_class is SentinelManagedSSLConnection
        kw = pool.connection_kwargs
        assert (kw['username'], kw['password'], kw['db']) == ('u1', 'pw1', 2)
        assert pool.max_connections == 7
        sentinels = [s.connection_pool.connection_kwargs
                     for s in pool.sentinel_manager.sentinels]
        assert [(s['host'], s['port']) for s in sentinels] == [(HOST, 26380), (HOST, 26379)]
        assert all(s.get('password') == 'sp' for s in sentinels)
        assert pool_id(pool) == f'sentinel:m@{HOST}:26379,{HOST}:26380:2'
    finally:
        pool.disconnect()
        conn.release()


def test_sentinel_round_trip(sentinel_setup: SentinelSetup) -> None:
    with Connection(sentinel_setup.url(free_port()),
                    transport_options=sentinel_setup.options()) as conn:
        round_trip(conn, 'sentinel')
        pool = conn.transport.pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.connection_class is SentinelManagedConnection
        assert pool.get_master_address() == (HOST, sentinel_setup.primary)
        assert conn.transport.server_id.startswith(f'sentinel:{MASTER}@')
    with Connection(sentinel_setup.url(free_port()),
                    transport_options=sentinel_setup.options(master_name='nope')) as conn:
        with pytest.raises(redis.sentinel.MasterNotFoundError):
            conn.connect()


def test_cli_through_sentinel(sentinel_setup: SentinelSetup) -> None:
    """kombu-streams finds the primary through Sentinel (--master-name), and says what is
    missing without it."""
    from test_cli import cli, cli_json

    url = f'sentinel-streams://:{DATA_PASSWORD}@{HOST}:{sentinel_setup.sentinel}/0'
    with Connection(url, transport_options=sentinel_setup.options()) as conn:
        Queue('cli-q', routing_key='cli-q')(conn.default_channel).declare()
        conn.Producer().publish('x', routing_key='cli-q')
    status = cli_json(url, '--master-name', MASTER, '--sentinel-password', SENTINEL_PASSWORD,
                      'status', 'cli-q')
    assert status['queues'][0]['ready'] == 1
    missing = cli(url, 'status')
    assert missing.returncode == 2 and 'master_name' in missing.stderr, missing.stderr


class _Worker(ConsumerMixin):
    """A Kombu user's consumer: ConsumerMixin reconnects after connection errors by itself.
    Records every delivery, and every message whose ack returned."""

    def __init__(self, connection: Connection, queue: Queue) -> None:
        self.connection = connection
        self.queue = queue
        self.deliveries: list[int] = []
        self.acked: set[int] = set()
        self.after_ack: list[int] = []  # delivered again after its ack had returned
        self.connections = 0

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        return [consumer_cls([self.queue], callbacks=[self.on_message], accept=['json'])]

    def on_connection_revived(self) -> None:
        self.connections += 1

    def on_message(self, body: dict[str, int], message: Any) -> None:
        n = body['n']
        if n in self.acked:
            self.after_ack.append(n)
        self.deliveries.append(n)
        message.ack()
        self.acked.add(n)


def _coordinated_failover(setup: SentinelSetup) -> None:
    """SENTINEL FAILOVER, done as a planned switch that loses no acknowledged write.

    Replication is asynchronous and Sentinel's failover is not coordinated: the old primary
    keeps accepting writes until Sentinel demotes it (about 10 s after the switch in Redis
    7.0), and those writes vanish when it resyncs as a replica. No client can prevent that.
    So, as an operator doing a planned switch would, the test pauses writes on the old
    primary, waits until the replica has everything, runs SENTINEL FAILOVER, and once
    Sentinel has switched demotes the old primary and closes its clients itself, which is
    what Sentinel does seconds later (the pause must stay short: it also holds Sentinel's
    own hello messages, and Sentinel then sees the old primary as down). Clients still see a
    real failover: their requests to the old primary hang, then their connections break,
    and they must find the new primary through Sentinel."""
    old = setup.data(setup.primary)
    new = setup.data(setup.replica)
    sentinel = setup.sentinel_client()

    def failover() -> bool:
        try:
            return bool(sentinel.execute_command('SENTINEL', 'FAILOVER', MASTER))
        except redis.ResponseError as exc:  # INPROG: a failover is running already
            return 'INPROG' in str(exc)

    try:
        old.execute_command('CLIENT', 'PAUSE', 10000, 'WRITE')  # bound, should the test die
        try:
            target = old.info('replication')['master_repl_offset']
            wait_until(lambda: new.info('replication')['slave_repl_offset'] >= target, 3,
                       'the replica to catch up', interval=0.01)
            wait_until(failover, 3, 'sentinel to accept the failover', interval=0.1)
            wait_until(lambda: int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1])
                       == setup.replica, 8, 'sentinel to switch to the replica')
            old.replicaof(HOST, setup.replica)
            old.execute_command('CLIENT', 'KILL', 'TYPE', 'normal')
        finally:
            old.execute_command('CLIENT', 'UNPAUSE')
    finally:
        old.close()
        new.close()
        sentinel.close()


def _stream_through_failover(setup: SentinelSetup, name: str, failover: Any,
                             producer_options: dict[str, Any] | None = None,
                             timeout: float = 40, max_retries: int = 60
                             ) -> tuple[_Worker, list[int], list[tuple[int, str]]]:
    """A steady stream through a failover: a ConsumerMixin consumer and a producer (a
    publish every 20 ms with retry=True) on connections of their own; ``failover(setup)``
    runs once consumption is steady, then 100 more publishes must be confirmed and every
    confirmed message consumed. Returns the consumer, the confirmed message numbers and the
    publishes that raised (number, error)."""
    queue = Queue(name, Exchange(name, 'direct'), routing_key=name)
    consumer_conn = Connection(setup.url(free_port()), transport_options=setup.options(
        visibility_timeout=4, polling_interval=0.5))
    producer_conn = Connection(setup.url(free_port()),
                               transport_options=setup.options(**(producer_options or {})))
    worker = _Worker(consumer_conn, queue)
    confirmed: list[int] = []
    failed: list[tuple[int, str]] = []
    stop_producing = threading.Event()

    def produce() -> None:
        producer = producer_conn.Producer(serializer='json')
        n = 0
        while not stop_producing.is_set():
            try:
                producer.publish({'n': n}, exchange=queue.exchange, routing_key=name,
                                 declare=[queue], retry=True,
                                 retry_policy={'max_retries': max_retries,
                                               'interval_start': 0.1,
                                               'interval_step': 0.2, 'interval_max': 0.5})
                confirmed.append(n)
            except Exception as exc:  # not confirmed: may or may not arrive
                failed.append((n, repr(exc)))
            n += 1
            time.sleep(0.02)

    consumer_thread = threading.Thread(target=worker.run, name='ks-consumer', daemon=True)
    producer_thread = threading.Thread(target=produce, name='ks-producer', daemon=True)
    try:
        consumer_thread.start()
        producer_thread.start()
        wait_until(lambda: len(worker.deliveries) >= 20, 20, 'steady consumption')
        assert worker.connections == 1
        failover(setup)
        switched_at = len(confirmed)
        wait_until(lambda: len(confirmed) >= switched_at + 100, timeout,
                   'publishing on the new primary', diag=lambda: failed[-3:])
        stop_producing.set()
        producer_thread.join(30)
        wait_until(lambda: set(confirmed) <= worker.acked, timeout,
                   'every confirmed message consumed',
                   diag=lambda: sorted(set(confirmed) - worker.acked)[:20])
    finally:
        stop_producing.set()
        worker.should_stop = True
        producer_thread.join(30)
        consumer_thread.join(30)
        producer_conn.release()
        consumer_conn.release()
    assert not producer_thread.is_alive() and not consumer_thread.is_alive()
    return worker, confirmed, failed


def test_sentinel_failover_keeps_consuming(sentinel_setup: SentinelSetup) -> None:
    """A steady stream published on one connection and consumed on another survives
    SENTINEL FAILOVER: every publish that returned is consumed at least once, nothing that
    was acked comes back, and consumption continues on the new primary."""
    setup = sentinel_setup
    worker, _, _ = _stream_through_failover(setup, 'failover-q', _coordinated_failover)
    assert worker.after_ack == []
    assert worker.connections >= 2, 'the consumer never reconnected'
    sentinel = setup.sentinel_client()
    try:
        now = int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1])
    finally:
        sentinel.close()
    assert now == setup.replica, 'sentinel did not switch to the replica'
    new_primary = setup.data(now)
    try:
        assert new_primary.execute_command('ROLE')[0] == b'master'
        # consumed on the new primary: its streams hold no unacked message of the test
        streams = [k for k in new_primary.scan_iter(match='ks:q:{failover-q}:[0-9]')]
        assert streams and sum(new_primary.xlen(k) for k in streams) == 0
    finally:
        new_primary.close()


def _unplanned_failover(setup: SentinelSetup) -> None:
    """A plain SENTINEL FAILOVER, nothing else: the old primary takes writes until Sentinel
    demotes it, some 10 s later, and then drops them."""
    sentinel = setup.sentinel_client()
    try:
        assert sentinel.execute_command('SENTINEL', 'FAILOVER', MASTER)
        wait_until(lambda: int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1])
                   == setup.replica, 10, 'sentinel to switch to the replica')
    finally:
        sentinel.close()


def test_unplanned_failover_loses_no_confirmed_publish_with_replica_acks(
        sentinel_setup: SentinelSetup) -> None:
    """With publish_min_replicas=1 a publish returns only once the replica has it (WAIT in
    the same round trip); on the old primary the WAIT fails (its replica was promoted), the
    publish raises a connection error and Kombu's retry publishes again on the new primary.
    Every confirmed message is consumed (the helper checks it); some may come twice (acks
    made on the old primary after the switch are lost with it). Without the option the
    same run loses confirmed messages."""
    _, _, failed = _stream_through_failover(
        sentinel_setup, 'unplanned-q', _unplanned_failover,
        {'publish_min_replicas': 1, 'publish_replica_timeout': 0.5}, timeout=60)
    assert failed == [], failed[:5]  # each retried until it was confirmed


def _stopped_primary_failover(setup: SentinelSetup) -> None:
    """The primary stops answering (SIGSTOP: a hung host, not a clean shutdown); Sentinel
    promotes the replica after down-after-milliseconds. The old primary is let go on again
    once the replica took over (Sentinel then turns it into a replica)."""
    primary = next(p for p in setup.procs if str(setup.primary) in map(str, p.args))
    sentinel = setup.sentinel_client()
    primary.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1])
                   == setup.replica, 30, 'sentinel to promote the replica')
    finally:
        primary.send_signal(signal.SIGCONT)
        sentinel.close()


def test_failover_with_a_stopped_primary_fails_no_retried_publish(
        sentinel_setup: SentinelSetup) -> None:
    """publish(retry=True, max_retries=100) with publish_min_replicas through a failover
    whose primary hangs: no publish fails and no confirmed one is lost. Before, Kombu's
    ensure() gave up on the second connection error (the transport did not say which errors
    are recoverable): 1,106 of 1,500 publishes raised."""
    _, confirmed, failed = _stream_through_failover(
        sentinel_setup, 'stopped-q', _stopped_primary_failover,
        {'publish_min_replicas': 1, 'publish_replica_timeout': 0.5}, timeout=90,
        max_retries=100)
    assert failed == [], failed[:5]
    assert len(confirmed) >= 120


def test_publish_min_replicas_without_a_replica_raises(redis_url: str) -> None:
    """No replica confirms: the publish raises NotReplicated (a connection error, so
    Kombu's retry policy applies) after publish_replica_timeout; the entry itself was
    written on the primary (at-least-once: a retry may add a second copy)."""
    from kombu_streams.scripts import NotReplicated

    url = redis_url.replace('redis://', 'redis-streams://', 1)
    opts = {'publish_min_replicas': 1, 'publish_replica_timeout': 0.1}
    with Connection(url, transport_options=opts) as conn:
        q = Queue('nr-q', routing_key='nr-q')
        q(conn.default_channel).declare()
        with pytest.raises(NotReplicated, match='0 of 1 replicas'):
            conn.Producer().publish('x', routing_key='nr-q')
        assert issubclass(NotReplicated, redis.ConnectionError)  # Kombu retries those
        assert q(conn.default_channel).queue_declare(passive=True).message_count == 1
    with pytest.raises(ValueError, match='publish_min_replicas'):
        Connection(url, transport_options={'publish_min_replicas': -1}).channel()


def test_sentinel_event_loop(sentinel_setup: SentinelSetup) -> None:
    """Celery's path: on Kombu's Hub the poller waits with BZPOPMIN on raw connections it
    takes from the Sentinel-managed pool."""
    from kombu.asynchronous import Hub

    queue = Queue('hub-q', Exchange('hub-x', 'direct'), routing_key='h')
    options = sentinel_setup.options()
    got: list[Any] = []
    seen_conns: set[type] = set()  # classes of the connections the poller waited on
    hub = Hub()
    with Connection(sentinel_setup.url(free_port()), transport_options=options) as conn, \
            Connection(sentinel_setup.url(free_port()), transport_options=options) as pub:
        conn.connect()

        def on_message(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()

        with Consumer(conn.channel(), [queue], callbacks=[on_message], accept=['json']):
            conn.transport.register_with_event_loop(conn.connection, hub)
            conn.transport.cycle.on_tick()  # what the hub's first tick does: a BZPOPMIN wait
            waiting = {fd: w.conn for fd, w in conn.transport.cycle.waits.pending.items()}
            assert waiting and set(waiting) <= set(hub.readers)
            seen_conns.update(type(c) for c in waiting.values())
            with pub.Producer(serializer='json') as producer:
                for n in range(5):
                    producer.publish({'n': n}, exchange=queue.exchange, routing_key='h',
                                     declare=[queue])
            deadline = time.monotonic() + 10
            while len(got) < 5 and time.monotonic() < deadline:
                hub.run_once()
        hub.close()
    assert got == [{'n': n} for n in range(5)]
    assert seen_conns and all(issubclass(c, SentinelManagedConnection) for c in seen_conns)
