"""kombu-streams on a real Redis Cluster: three masters started on free 127.0.0.1 ports.

Queues and exchanges are picked so their keys land in different slots on different nodes:
a consumer of several queues reads them without CROSSSLOT errors, fanout crosses slots,
a slot moved to another node mid-stream (MOVED) is followed, and a real Celery worker runs
tasks and answers a broadcast ping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import HOST, missing, redis7_binary, requires_batch_publish, stop_redis, wait_until
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from redis.cluster import RedisCluster
from redis.crc import key_slot

import kombu_streams  # noqa: F401  (registers the URL schemes)
from kombu_streams.keys import Keys

pytestmark = [pytest.mark.redis, pytest.mark.cluster]

K = Keys(cluster=True)


def _port_pair_free(port: int) -> bool:
    """The port and its cluster bus port (+10000) are both free on 127.0.0.1."""
    for p in (port, port + 10000):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, p))
            except OSError:
                return False
    return True


def _free_cluster_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port < 55000 and _port_pair_free(port):
            return port


class Cluster:
    """Three redis-server masters in cluster mode, slots spread by redis-cli."""

    def __init__(self, tmpdir: Path) -> None:
        binary = redis7_binary()
        if shutil.which('redis-cli') is None:
            missing('redis-cli not installed')
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        for i in range(3):
            port = _free_cluster_port()
            log = open(tmpdir / f'node-{i}.log', 'wb')
            self.procs.append(subprocess.Popen(
                [binary, '--port', str(port), '--bind', HOST, '--cluster-enabled', 'yes',
                 '--cluster-config-file', str(tmpdir / f'nodes-{i}.conf'),
                 '--cluster-node-timeout', '5000', '--save', '', '--appendonly', 'no',
                 '--dir', str(tmpdir), '--protected-mode', 'yes'],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
            self.ports.append(port)
        try:
            for port in self.ports:
                wait_until(lambda p=port: self._ping(p), 10, f'node {port} to answer')
            out = subprocess.run(
                ['redis-cli', '--cluster', 'create', *[f'{HOST}:{p}' for p in self.ports],
                 '--cluster-replicas', '0', '--cluster-yes'],
                capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
            wait_until(self._ok, 30, 'cluster_state:ok on every node')
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _ping(port: int) -> bool:
        try:
            return redis.Redis(host=HOST, port=port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def _ok(self) -> bool:
        return all(self.node(p).cluster('info')['cluster_state'] == 'ok' for p in self.ports)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port)

    @property
    def url(self) -> str:
        return f'redis-streams-cluster://{HOST}:{self.ports[0]}'

    def owner(self, key: str) -> int:
        """Port of the master serving ``key``'s slot."""
        slot = key_slot(key.encode())
        for lo, hi, master, *_ in self.node(self.ports[0]).execute_command('CLUSTER SLOTS'):
            if lo <= slot <= hi:
                return int(master[1])
        raise AssertionError(f'slot {slot} not covered')

    def move_slot(self, slot: int, to_port: int) -> None:
        """Move one slot, with its keys, to another master (what resharding does)."""
        src_port = next(p for p in self.ports if self._serves(p, slot))
        if src_port == to_port:
            return
        src, dst = self.node(src_port), self.node(to_port)
        src_id, dst_id = src.cluster('myid'), dst.cluster('myid')
        src_id = src_id.decode() if isinstance(src_id, bytes) else src_id
        dst_id = dst_id.decode() if isinstance(dst_id, bytes) else dst_id
        dst.execute_command('CLUSTER SETSLOT', slot, 'IMPORTING', src_id)
        src.execute_command('CLUSTER SETSLOT', slot, 'MIGRATING', dst_id)
        while True:
            keys = src.execute_command('CLUSTER GETKEYSINSLOT', slot, 100)
            if not keys:
                break
            src.execute_command('MIGRATE', HOST, to_port, '', 0, 5000, 'KEYS', *keys)
        for port in self.ports:
            self.node(port).execute_command('CLUSTER SETSLOT', slot, 'NODE', dst_id)

    def _serves(self, port: int, slot: int) -> bool:
        for lo, hi, master, *_ in self.node(port).execute_command('CLUSTER SLOTS'):
            if lo <= slot <= hi:
                return int(master[1]) == port
        return False

    def flush(self) -> None:
        for port in self.ports:
            self.node(port).flushall()

    def stop(self) -> None:
        for proc in self.procs:
            stop_redis(proc)


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp('cluster'))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def url(cluster: Cluster) -> str:
    cluster.flush()
    return cluster.url


def spread(cluster: Cluster, count: int, prefix: str = 'q') -> list[str]:
    """``count`` queue names whose keys sit on ``count`` different slots, covering every
    master when count >= 3."""
    names, owners = [], set()
    i = 0
    while len(names) < count:
        name = f'{prefix}{i}'
        i += 1
        owner = cluster.owner(K.stream(name, 0))
        if len(owners) < 3 and owner in owners:
            continue
        owners.add(owner)
        names.append(name)
    return names


def drain(conn: Connection, queues: list[Queue], expect: int, timeout: float = 15,
          ack: bool = True, **consumer: Any) -> list[Any]:
    got: list[Any] = []

    def on(body: Any, message: Any) -> None:
        got.append((body, message))
        if ack:
            message.ack()

    with Consumer(conn, queues, callbacks=[on], **consumer):
        deadline = time.monotonic() + timeout
        while len(got) < expect and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except socket.timeout:
                pass
    return got


def test_queues_in_different_slots_publish_consume_ack(cluster: Cluster, url: str) -> None:
    names = spread(cluster, 4)
    assert len({cluster.owner(K.stream(n, 0)) for n in names}) == 3
    queues = [Queue(n, Exchange(n, 'direct'), n, max_priority=9) for n in names]
    with Connection(url) as conn:
        producer = Producer(conn)
        for q in queues:
            q(conn.default_channel).declare()
        for i in range(40):
            name = names[i % 4]
            producer.publish({'n': i, 'q': name}, exchange=name, routing_key=name,
                             priority=(i * 7) % 10)
        got = drain(conn, queues, 40, prefetch_count=10)
        assert sorted(b['n'] for b, _ in got) == list(range(40))
        # level by level within each queue (0 first, as on Kombu's Redis transport)
        for name in names:
            prios = [m.properties.get('priority', 0) for b, m in got if b['q'] == name]
            levels = [p // 3 * 3 if p < 9 else 9 for p in prios]
            assert levels == sorted(levels), (name, prios)
        for q in queues:
            assert q(conn.default_channel).queue_declare(passive=True).message_count == 0
    client = RedisCluster(host=HOST, port=cluster.ports[0])
    try:
        for name in names:  # acked means deleted: nothing pending, nothing left
            for level in (0, 3, 6, 9):
                key = K.stream(name, level)
                if client.exists(key):
                    assert client.xlen(key) == 0
    finally:
        client.close()


def test_delayed_messages_across_slots(cluster: Cluster, url: str) -> None:
    """Delayed messages of queues on every master: each queue's delayed keys share its
    slot, so publish and read move them in one script call per slot."""
    names = spread(cluster, 3, prefix='dq')
    queues = [Queue(n, Exchange(n, 'direct'), n) for n in names]
    with Connection(url) as conn:
        producer = Producer(conn)
        for q in queues:
            q(conn.default_channel).declare()
        sent = time.time()
        for i in range(30):
            name = names[i % 3]
            producer.publish({'n': i}, exchange=name, routing_key=name,
                             headers={'x-delay': 1500}, priority=(i * 7) % 10)
        client = RedisCluster(host=HOST, port=cluster.ports[0])
        try:
            assert sum(client.zcard(K.delayed(n)) for n in names) == 30
        finally:
            client.close()
        got = drain(conn, queues, 30, timeout=20)
        assert sorted(b['n'] for b, _ in got) == list(range(30))
        assert time.time() - sent >= 1.5
    client = RedisCluster(host=HOST, port=cluster.ports[0])
    try:
        for name in names:
            assert client.exists(K.delayed(name)) == 0
    finally:
        client.close()


def test_requeue_reject_and_basic_get_across_slots(cluster: Cluster, url: str) -> None:
    a, b = spread(cluster, 2)
    with Connection(url) as conn:
        ch = conn.default_channel
        for name in (a, b):
            Queue(name, routing_key=name)(ch).declare()
            Producer(ch).publish({'q': name, 'n': 1}, routing_key=name)
            Producer(ch).publish({'q': name, 'n': 2}, routing_key=name)
        first = ch.basic_get(a)
        assert first.payload == {'q': a, 'n': 1}
        first.requeue()
        again = ch.basic_get(a)
        assert again.payload == {'q': a, 'n': 1} and again.delivery_info['redelivered']
        again.ack()
        got = drain(conn, [Queue(a, routing_key=a), Queue(b, routing_key=b)], 3)
        assert sorted((x['q'], x['n']) for x, _ in got) == [(a, 2), (b, 1), (b, 2)]
        assert ch.queue_purge(a) == 0
        Producer(ch).publish({'x': 1}, routing_key=b)
        assert ch.queue_purge(b) == 1
        ch.queue_delete(a)
        assert not ch._has_queue(a)


def test_fanout_across_slots_and_dead_letters_in_exchange_slot(cluster: Cluster,
                                                              url: str) -> None:
    a, b = spread(cluster, 2, 'bq')
    exchange = Exchange('bcast', 'fanout')
    assert key_slot(K.fanout('bcast').encode()) not in {
        key_slot(K.stream(a, 0).encode()), key_slot(K.stream(b, 0).encode())}
    opts = {'dead_letter_rejected': True}
    with Connection(url, transport_options=opts) as ca, \
            Connection(url, transport_options=opts) as cb:
        qa, qb = Queue(a, exchange), Queue(b, exchange)
        qa(ca.default_channel).declare()
        qb(cb.default_channel).declare()
        with Connection(url) as pub:
            for n in range(5):
                Producer(pub, exchange).publish({'n': n})  # declares it: fanout
        got_a = drain(ca, [qa], 5)
        got_b = drain(cb, [qb], 5, ack=False)
        assert [x['n'] for x, _ in got_a] == list(range(5))
        assert [x['n'] for x, _ in got_b] == list(range(5))
        for _, message in got_b:
            message.reject()  # dead-lettered (dead_letter_rejected)
    client = RedisCluster(host=HOST, port=cluster.ports[0])
    try:
        dlq = K.fanout_dlq('bcast', b)
        assert key_slot(dlq.encode()) == key_slot(K.fanout('bcast').encode())
        assert client.xlen(dlq) == 5
        # both groups are done: trimmed up to the last entry read (MINID keeps that one)
        assert client.xlen(K.fanout('bcast')) <= 1
    finally:
        client.close()


@requires_batch_publish
def test_batch_publish_spans_nodes(cluster: Cluster, url: str) -> None:
    names = spread(cluster, 3)
    with Connection(url) as conn:
        ch = conn.default_channel
        for name in names:
            Queue(name, routing_key=name)(ch).declare()
        producer = Producer(ch)
        with producer.batch(50):  # one pipeline per node per flush
            for i in range(120):
                producer.publish({'i': i}, routing_key=names[i % 3])
        assert sorted(Queue(n, routing_key=n)(ch).queue_declare(passive=True).message_count
                      for n in names) == [40, 40, 40]
        got = drain(conn, [Queue(n, routing_key=n) for n in names], 120, prefetch_count=50)
        assert sorted(x['i'] for x, _ in got) == list(range(120))


def test_big_messages_in_each_slot_and_after_a_slot_moved(cluster: Cluster, url: str,
                                                           monkeypatch: Any) -> None:
    """A big message's body and entry go in one MULTI/EXEC to the node of their slot; once
    the slot has moved, the node refuses the transaction (MOVED: nothing ran) and the two go
    through the cluster client instead. Every message arrives whole, every body is freed."""
    names = spread(cluster, 3, 'big')
    queues = [Queue(n, routing_key=n) for n in names]
    pad = 'x' * 5000
    through_cluster: list[Any] = []  # HSETs sent by the cluster client: the fallback's
    send = RedisCluster.execute_command

    def spy(self: RedisCluster, *args: Any, **kwargs: Any) -> Any:
        if args and args[0] == 'HSET':
            through_cluster.append(args[1])
        return send(self, *args, **kwargs)

    monkeypatch.setattr(RedisCluster, 'execute_command', spy)
    client = RedisCluster(host=HOST, port=cluster.ports[0])
    try:
        with Connection(url, transport_options={'big_message_bytes': 1000}) as conn:
            producer = Producer(conn)
            for q in queues:
                q(conn.default_channel).declare()
            for i in range(6):
                producer.publish({'i': i, 'pad': pad}, routing_key=names[i % 3])
            assert [client.hlen(K.big(n)) for n in names] == [2, 2, 2]
            assert through_cluster == []  # each a transaction on its node
            slot = key_slot(K.stream(names[0], 0).encode())
            before = cluster.owner(K.stream(names[0], 0))
            cluster.move_slot(slot, next(p for p in cluster.ports if p != before))
            producer.publish({'i': 6, 'pad': pad}, routing_key=names[0])
            assert client.hlen(K.big(names[0])) == 3
            assert through_cluster == [K.big(names[0])]
            got = drain(conn, queues, 7)
        assert sorted(b['i'] for b, _ in got) == list(range(7))
        assert all(b['pad'] == pad for b, _ in got)
        assert not any(client.exists(K.big(n)) for n in names)
    finally:
        client.close()


def test_stalled_messages_are_reclaimed_in_each_slot(cluster: Cluster, url: str) -> None:
    """A dead consumer held one message of each of two queues on different nodes: the lease
    keeper of a live consumer reclaims both after visibility_timeout."""
    a, b = spread(cluster, 2, 'vt')
    client = RedisCluster(host=HOST, port=cluster.ports[0])
    try:
        with Connection(url, transport_options={'visibility_timeout': 0.5}) as conn:
            queues = [Queue(n, routing_key=n) for n in (a, b)]
            for q in queues:
                q(conn.default_channel).declare()
                Producer(conn).publish({'q': q.name}, routing_key=q.name)
                taken = client.xreadgroup(q.name, 'dead-worker', {K.stream(q.name, 0): '>'})
                assert len(taken[0][1]) == 1  # read into the PEL, never acked or renewed
            time.sleep(0.6)
            got = drain(conn, queues, 2)
        assert sorted(body['q'] for body, _ in got) == sorted([a, b])
        assert all(m.delivery_info['redelivered'] for _, m in got)
        for name in (a, b):
            assert client.xpending(K.stream(name, 0), name)['pending'] == 0
    finally:
        client.close()


def test_event_loop_waits_per_slot_and_rearms_each(cluster: Cluster, url: str) -> None:
    """On an event loop (Celery's hub) a channel waits on two slots at once; after a wake-up
    on one, its wait there is sent again at once, not when the other slot's wait times out.
    polling_interval is 30 s, so only wake-ups can deliver within the test's deadline."""
    from kombu.asynchronous import Hub

    a, b = spread(cluster, 2, 'ev')
    got: list[str] = []
    hub = Hub()
    with Connection(url, transport_options={'polling_interval': 30}) as conn, \
            Connection(url) as pub:
        queues = [Queue(n, routing_key=n) for n in (a, b)]
        for q in queues:
            q(conn.default_channel).declare()
        conn.transport.register_with_event_loop(conn.connection, hub)

        def on(body: Any, message: Any) -> None:
            got.append(body['n'])
            message.ack()

        loop = hub.create_loop()

        def run_until(count: int) -> None:
            deadline = time.monotonic() + 10
            while len(got) < count and time.monotonic() < deadline:
                next(loop)
            assert len(got) >= count, f'only {got} after 10 s'

        with Consumer(conn, queues, callbacks=[on]):
            for _ in range(3):
                next(loop)  # the waits are sent
            for n in range(4):  # one at a time, twice in each slot: a wake-up each
                Producer(pub).publish({'n': n}, routing_key=(a, a, b, b)[n])
                run_until(n + 1)
        assert got == [0, 1, 2, 3]
    hub.close()


def test_script_flush_on_every_node_is_survived(cluster: Cluster, url: str) -> None:
    (name,) = spread(cluster, 1)
    with Connection(url) as conn:
        ch = conn.default_channel
        Queue(name, routing_key=name)(ch).declare()
        Producer(ch).publish({'n': 1}, routing_key=name)
        for port in cluster.ports:
            cluster.node(port).script_flush()
        Producer(ch).publish({'n': 2}, routing_key=name)
        got = drain(conn, [Queue(name, routing_key=name)], 2)
        assert [x['n'] for x, _ in got] == [1, 2]


def test_slot_moved_mid_stream_is_followed(cluster: Cluster, url: str) -> None:
    """Resharding: the queue's slot moves to another master while a consumer waits and a
    producer publishes; the consumer follows (MOVED) and gets every message once."""
    (name,) = spread(cluster, 1, 'mv')
    slot = key_slot(K.stream(name, 0).encode())
    total = 200
    got: list[int] = []
    stop = threading.Event()
    with Connection(url) as conn:
        queue = Queue(name, routing_key=name)
        queue(conn.default_channel).declare()

        def consume() -> None:
            with Connection(url) as cc:
                def on(body: Any, message: Any) -> None:
                    got.append(body['n'])
                    message.ack()
                with Consumer(cc, [queue], callbacks=[on], prefetch_count=10):
                    while not stop.is_set() and len(got) < total:
                        try:
                            cc.drain_events(timeout=0.5)
                        except socket.timeout:
                            pass

        worker = threading.Thread(target=consume, daemon=True)
        worker.start()
        producer = Producer(conn)
        for n in range(total // 2):
            producer.publish({'n': n}, routing_key=name)
        # the consumer drains the first half and then waits on the old node when the slot moves
        wait_until(lambda: len(got) >= total // 2, 30, 'the first half')
        time.sleep(0.3)
        before = cluster.owner(K.stream(name, 0))
        target = next(p for p in cluster.ports if p != before)
        cluster.move_slot(slot, target)
        assert cluster.owner(K.stream(name, 0)) == target
        for n in range(total // 2, total):
            producer.publish({'n': n}, routing_key=name)
        try:
            wait_until(lambda: len(got) >= total, 30, f'{total} messages after the move')
        finally:
            stop.set()
            worker.join(10)
    assert sorted(got) == list(range(total)), 'lost or duplicated'


def test_cluster_connection_errors(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match='only database 0'):
        Connection(f'redis-streams-cluster://{HOST}:{cluster.ports[0]}/2').channel()
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        dead = sock.getsockname()[1]
    conn = Connection(f'redis-streams-cluster://{HOST}:{dead}',
                      transport_options={'socket_connect_timeout': 1})
    with pytest.raises(OperationalError, match='no Redis Cluster node answered'):
        conn.ensure_connection(max_retries=1)
    # ';'-separated startup nodes: a dead first one does not matter
    with Connection(f'redis-streams-cluster://{HOST}:{dead};'
                    f'redis-streams-cluster://{HOST}:{cluster.ports[2]}') as c:
        ch = c.default_channel
        Queue('alt', routing_key='alt')(ch).declare()
        Producer(ch).publish({'ok': 1}, routing_key='alt')
        assert ch.basic_get('alt', no_ack=True).payload == {'ok': 1}
    # the cluster option with a plain scheme means the same
    with Connection(f'redis-streams://{HOST}:{cluster.ports[1]}',
                    transport_options={'cluster': True}) as c:
        assert c.transport.cluster
        assert c.default_channel.keys.cluster


def test_cli_on_cluster(cluster: Cluster, url: str) -> None:
    """kombu-streams status / peek / dlq on queues spread over the nodes; migrate refuses."""
    from test_cli import cli, cli_json

    names = spread(cluster, 3, 'cli')
    with Connection(url) as conn:
        ch = conn.default_channel
        for i, name in enumerate(names):
            Queue(name, routing_key=name)(ch).declare()
            for n in range(i + 1):
                Producer(ch).publish({'n': n}, routing_key=name)
    status = cli_json(url, 'status')
    assert {q['queue']: q['ready'] for q in status['queues']} == {
        name: i + 1 for i, name in enumerate(names)}
    peeked = cli_json(url, 'peek', names[2], '-n', '2')
    assert [m['body'] for m in peeked] == ['{"n": 0}', '{"n": 1}']
    assert cli(url, 'status', 'nosuchqueue').returncode == 3
    refused = cli(url, 'migrate', '--dry-run')
    assert refused.returncode == 2 and 'one Redis server' in refused.stderr


APP = '''
import kombu_streams
import redis
from celery import Celery

app = Celery('clusterapp', broker={broker!r})
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                task_acks_late=True)
store = redis.Redis(host={host!r}, port={port!r})

@app.task
def record(n):
    store.rpush('done', n)
    return n
'''


@pytest.mark.celery
def test_celery_worker_on_cluster(cluster: Cluster, url: str, tmp_path: Path) -> None:
    """Tasks on the 'celery' queue and a broadcast ping (pidbox fanout exchange, another
    slot) through a real prefork worker on the cluster."""
    store_proc_port = cluster.ports[0]
    # the result list lives in the cluster too: pick a name in the first node's slots
    (tmp_path / 'clusterapp.py').write_text(textwrap.dedent(APP.format(
        broker=url, host=HOST, port=store_proc_port)))
    store_key = next(k for k in (f'done{{{i}}}' for i in range(1000))
                     if cluster.owner(k) == store_proc_port)
    (tmp_path / 'clusterapp.py').write_text(
        (tmp_path / 'clusterapp.py').read_text().replace("'done'", repr(store_key)))
    from test_celery_smoke import _stop_worker as stop_worker

    sys.path.insert(0, str(tmp_path))
    try:
        import clusterapp

        for n in range(50):
            clusterapp.record.delay(n)
        env = dict(os.environ, PYTHONPATH=str(tmp_path))
        worker = subprocess.Popen(
            [sys.executable, '-m', 'celery', '-A', 'clusterapp', 'worker', '-P', 'prefork',
             '-c', '2', '--without-gossip', '--loglevel=WARNING', '-n', 'cl@%h'],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        store = cluster.node(store_proc_port)
        try:
            deadline = time.monotonic() + 60
            while store.llen(store_key) < 50 and time.monotonic() < deadline:
                time.sleep(0.2)
            replies = clusterapp.app.control.inspect(timeout=3).ping() or {}
        finally:
            output = stop_worker(worker)
        done = sorted(int(x) for x in store.lrange(store_key, 0, -1))
        assert done == list(range(50)), output[-3000:]
        assert any(r == {'ok': 'pong'} for r in replies.values()), (replies, output[-3000:])
        assert 'Traceback' not in output, output[-3000:]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop('clusterapp', None)


def test_a_name_that_would_make_an_empty_hash_tag_is_refused() -> None:
    """'}x' would give the tag '{}' (empty), and Redis would hash each whole key: the keys
    of one queue would spread over slots. A clear error instead of CROSSSLOT later."""
    with pytest.raises(ValueError, match="cannot start with '}'"):
        K.stream('}x', 0)
    with pytest.raises(ValueError, match='exchange name'):
        K.fanout('}x')
    assert key_slot(K.stream('{app}.high', 0).encode()) == key_slot(
        K.stream('{app}.low', 9).encode())  # the documented way to co-locate queues
    assert Keys().stream('}x', 0) == 'ks:q:{}x}:0'  # one Redis: any name


def _queues_over_slots(cluster: Cluster, count: int, prefix: str) -> list[str]:
    """``count`` queue names in ``count`` different hash slots (over all three masters)."""
    names, slots, i = [], set(), 0
    while len(names) < count:
        name = f'{prefix}{i}'
        i += 1
        slot = key_slot(K.stream(name, 0).encode())
        if slot not in slots:
            slots.add(slot)
            names.append(name)
    return names


@pytest.mark.parametrize('count', [60, 1000])
def test_a_consumer_of_many_queues_drains_them_all(cluster: Cluster, url: str,
                                                   count: int) -> None:
    """One consumer of 60 (and 1,000) queues, each in a slot of its own: it waits with
    BZPOPMIN on at most half of each node's pool (10 connections) and looks at the other
    queues' markers once per polling interval. Before: MaxConnectionsError ("Too many
    connections") as soon as 10 slots of one node had a wait."""
    names = _queues_over_slots(cluster, count, f'many{count}-')
    queues = [Queue(n, routing_key=n) for n in names]
    with Connection(url, transport_options={'polling_interval': 0.5}) as conn, \
            Connection(url) as pub:
        channel = conn.channel()
        for q in queues:
            q(channel).declare()
        got: list[str] = []
        with Consumer(channel, queues, callbacks=[lambda body, m: (got.append(body),
                                                                  m.ack())]):
            with pytest.raises(socket.timeout):
                conn.drain_events(timeout=3.0)  # idle: the waits are sent, nothing to get
            waits_per_node: dict[int, int] = {}
            for wait in conn.transport.cycle.waits.pending.values():
                waits_per_node[id(wait.pool)] = waits_per_node.get(id(wait.pool), 0) + 1
            assert waits_per_node and max(waits_per_node.values()) <= 5
            producer = Producer(pub)
            for n in names:  # published while the consumer is idle
                producer.publish(n, routing_key=n)
            deadline = time.monotonic() + 60
            while len(got) < count and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except socket.timeout:
                    pass
        assert sorted(got) == sorted(names)


def test_event_loop_consumer_of_60_queues_drains_them_all(cluster: Cluster,
                                                          url: str) -> None:
    """Celery's path on Cluster: a channel on Kombu's hub consuming 60 queues in 60 slots
    keeps its waits within each node's budget and still gets every message."""
    from kombu.asynchronous import Hub

    names = _queues_over_slots(cluster, 60, 'hub60-')
    queues = [Queue(n, routing_key=n) for n in names]
    got: list[str] = []
    hub = Hub()
    with Connection(url, transport_options={'polling_interval': 0.5}) as conn, \
            Connection(url) as pub:
        channel = conn.channel()
        for q in queues:
            q(channel).declare()
        conn.transport.register_with_event_loop(conn.connection, hub)
        loop = hub.create_loop()
        with Consumer(channel, queues, callbacks=[lambda body, m: (got.append(body),
                                                                  m.ack())]):
            for _ in range(3):
                next(loop)
            producer = Producer(pub)
            for n in names:
                producer.publish(n, routing_key=n)
            deadline = time.monotonic() + 30
            while len(got) < 60 and time.monotonic() < deadline:
                next(loop)
            waits = len(conn.transport.cycle.waits.pending)
        assert sorted(got) == sorted(names)
        assert waits <= 15  # three nodes, five each at most
    hub.close()
