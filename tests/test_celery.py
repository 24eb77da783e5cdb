"""End-to-end Celery behaviour on kombu-streams, with real worker subprocesses.

Every test writes a small Celery app module into its tmp dir, starts ``celery worker``
subprocesses (each in its own process group, so teardown can kill the pool children too)
on the session's redis-server, and checks what the tasks recorded in a Redis list (no
result backend). Broker: DB 3, task records: DB 4 of the same server.

Covered: priority order of a backlog, remote control (ping, active_queues, revoke), events,
purge, crash recovery of acks_late tasks, ETA tasks outliving the visibility timeout,
broadcasts sent while a worker is disconnected, warm shutdown returning prefetched
messages, and worker_disable_prefetch.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from celery.app import defaults as celery_defaults
from conftest import redis7_binary, start_redis, stop_redis, wait_until

from kombu_streams.broker import Broker
from kombu_streams.keys import Keys

pytestmark = [pytest.mark.celery, pytest.mark.slow]

MODULE = 'ks_e2e_app'
QUEUE = 'celery'

# The app module; the test process imports it too (to publish and to send control commands).
APP_HEADER = '''
import os
import time

import kombu_streams  # registers redis-streams://
import redis
from celery import Celery
from celery.signals import worker_ready

BROKER = os.environ.get('KS_E2E_BROKER') or {broker!r}
STORE = {store!r}
CONF = {conf!r}
'''

APP_BODY = '''
app = Celery('ks_e2e_app', broker=BROKER)
app.conf.update(CONF)
store = redis.Redis.from_url(STORE)


@worker_ready.connect
def _announce_ready(sender=None, **kwargs):
    store.rpush('ready', sender.hostname)


@app.task(bind=True)
def record(self, tag):
    store.rpush('done', tag)
    store.rpush('where', f'{tag} {self.request.hostname} {time.time():.3f}')
    return tag


@app.task(bind=True)
def flaky(self, tag, countdown):
    store.rpush('runs', f'{tag} {self.request.retries} {time.time():.3f}')
    if self.request.retries == 0:
        raise self.retry(countdown=countdown)
    store.rpush('done', tag)


@app.task(bind=True)
def weigh(self, tag, blob):
    store.rpush('done', f'{tag} {len(blob)}')


@app.task(bind=True)
def sleeper(self, seconds):
    store.rpush('started', self.request.id)
    time.sleep(seconds)
    store.rpush('done', self.request.id)
    return seconds
'''

BASE_CONF: dict[str, Any] = {
    'broker_connection_retry_on_startup': True,
    'task_acks_late': True,
    'worker_redirect_stdouts': False,
}


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             what: str = 'condition', log: Callable[[], str] | None = None) -> Any:
    """conftest.wait_until, with the worker logs as the diagnosis."""
    diag = (lambda: f'--- worker logs ---\n{log()}') if log else None
    return wait_until(predicate, timeout, what, interval, diag)


class Worker:
    """One ``celery worker`` subprocess, leader of its own process group."""

    def __init__(self, env: CeleryEnv, node: str, pool: str = 'prefork', concurrency: int = 2,
                 args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> None:
        self.env = env
        self.node = node
        self.log_path = env.cwd / f'worker-{node.split("@")[0]}-{len(env.workers)}.log'
        argv = [sys.executable, '-m', 'celery', '-A', MODULE, 'worker', '-P', pool,
                '-c', str(concurrency), '-n', node, '--without-gossip', '--without-mingle',
                '--loglevel=INFO', *args]
        # the app's dir first, then what the tests run with (a checkout before the install)
        path = os.pathsep.join(filter(None, [str(env.cwd), os.environ.get('PYTHONPATH')]))
        environ = dict(os.environ, PYTHONPATH=path, **(extra_env or {}))
        with open(self.log_path, 'wb') as log:
            self.proc = subprocess.Popen(
                argv, cwd=env.cwd, env=environ,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        env.workers.append(self)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')
        except OSError:
            return '<no log>'

    def wait_ready(self, timeout: float = 40) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f'worker {self.node} exited with {self.proc.returncode}:\n'
                            f'{self.log()[-4000:]}')
            return self.node.encode() in self.env.store.lrange('ready', 0, -1)

        wait_for(ready, timeout, interval=0.1, what=f'worker {self.node} to be ready',
                 log=lambda: self.log()[-4000:])

    def terminate(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM to the main process); SIGKILL the group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self.kill_group()  # pool children left behind, if any
        return self.proc.returncode

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class CeleryEnv:
    def __init__(self, cwd: Path, broker: str, store: redis.Redis, raw_broker: redis.Redis):
        self.cwd = cwd
        self.broker = broker
        self.store = store
        self.raw_broker = raw_broker
        self.workers: list[Worker] = []
        self.module: Any = None

    @property
    def app(self) -> Any:
        return self.module.app

    def load(self, transport_options: dict[str, Any] | None = None, tasks: str = '',
             **conf: Any) -> Any:
        """Write the app module (APP_HEADER and APP_BODY, then ``tasks``: more task
        definitions a test needs) with these settings, and import it afresh."""
        settings = dict(BASE_CONF, **conf)
        if transport_options:
            settings['broker_transport_options'] = transport_options
        store_url = self.store.connection_pool.connection_kwargs
        store = f"redis://{store_url['host']}:{store_url['port']}/{store_url['db']}"
        source = APP_HEADER.format(broker=self.broker, store=store, conf=settings) + APP_BODY
        (self.cwd / f'{MODULE}.py').write_text(source + tasks)
        if self.module is not None:  # the app loaded before: its connections closed
            close_app(self.module.app)
        sys.modules.pop(MODULE, None)
        self.module = importlib.import_module(MODULE)
        return self.module

    def worker(self, node: str, **kwargs: Any) -> Worker:
        return Worker(self, node, **kwargs)

    def logs(self) -> str:
        return '\n'.join(f'--- {w.node} ({w.log_path.name}) ---\n{w.log()[-3000:]}'
                         for w in self.workers)

    def only_the_next_task_runs(self, worker: Worker, settle: float) -> None:
        """Send task 'after', wait for it and ``settle`` seconds more, stop the worker:
        'after' must be the only task that ran (what came before was purged or revoked)."""
        self.module.record.delay('after')
        wait_for(lambda: 'after' in self.done(), 20, what="the task 'after'", log=self.logs)
        time.sleep(settle)
        worker.terminate()
        assert self.done() == ['after'], self.logs()

    def done(self) -> list[str]:
        return [x.decode() for x in self.store.lrange('done', 0, -1)]

    def started(self) -> list[str]:
        return [x.decode() for x in self.store.lrange('started', 0, -1)]

    def queue_length(self, queue: str = QUEUE) -> int:
        with self.app.connection_for_write() as conn:
            return conn.default_channel.queue_declare(queue, passive=True).message_count


def close_app(app: Any) -> None:
    """Close an app of the tests: the connections of its pool too (Celery's app.close()
    only forgets the pool; each open connection's transport keeps a lease keeper thread
    at work on this test's server during the tests after)."""
    try:
        if app._pool is not None:
            app._pool.force_close_all()
        app.close()
    except Exception:
        pass


@contextmanager
def celery_env(tmp_path: Path, base: str) -> Iterator[CeleryEnv]:
    """A CeleryEnv on the server at ``base`` (redis://host:port): broker DB 3, records DB 4;
    its workers killed and its app closed at the end."""
    broker = base.replace('redis://', 'redis-streams://', 1) + '/3'
    store = redis.Redis.from_url(base + '/4')
    raw_broker = redis.Redis.from_url(base + '/3')
    sys.path.insert(0, str(tmp_path))
    environment = CeleryEnv(tmp_path, broker, store, raw_broker)
    try:
        yield environment
    finally:
        for worker in environment.workers:
            worker.kill_group()
        if environment.module is not None:
            close_app(environment.module.app)
        sys.path.remove(str(tmp_path))
        sys.modules.pop(MODULE, None)
        store.close()
        raw_broker.close()


@pytest.fixture()
def env(tmp_path: Path, redis_url: str):
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as environment:
        yield environment


def level_of(priority: int, steps: tuple[int, ...] = (0, 3, 6, 9)) -> int:
    return max(s for s in steps if s <= priority)


# ---------------------------------------------------------------------------
# 1. priorities
# ---------------------------------------------------------------------------


def test_priorities_order_a_backlog(env: CeleryEnv) -> None:
    module = env.load(worker_prefetch_multiplier=1)
    published = []
    for i in range(30):
        priority = (i * 7) % 10  # every priority 0..9, three times, in a mixed order
        module.record.apply_async(args=[f'{i}:{priority}'], priority=priority)
        published.append((i, priority))
    assert env.queue_length() == 30
    worker = env.worker('prio@ks', concurrency=1)
    wait_for(lambda: len(env.done()) >= 30, 60, what='30 tasks', log=env.logs)
    worker.terminate()
    expected = [f'{i}:{p}' for i, p in sorted(published, key=lambda ip: (level_of(ip[1]), ip[0]))]
    assert env.done() == expected, env.logs()


# ---------------------------------------------------------------------------
# 2. remote control
# ---------------------------------------------------------------------------


def test_inspect_ping_and_active_queues(env: CeleryEnv) -> None:
    """Back-to-back remote control calls, as ``celery inspect`` and monitors make them:
    every call has its own reply queue, bound just before the worker replies."""
    module = env.load()
    node = 'ctl@ks'
    worker = env.worker(node)
    worker.wait_ready()
    inspect = module.app.control.inspect(destination=[node], timeout=5)
    assert inspect.ping() == {node: {'ok': 'pong'}}, env.logs()
    queues = inspect.active_queues()
    assert queues is not None, f'no reply to active_queues\n{env.logs()}'
    assert list(queues) == [node], (queues, env.logs())
    assert [q['name'] for q in queues[node]] == [QUEUE]
    assert inspect.ping() == {node: {'ok': 'pong'}}, env.logs()
    worker.terminate()


def test_revoke_queued_task(env: CeleryEnv) -> None:
    module = env.load()
    node = 'rev@ks'
    worker = env.worker(node)
    worker.wait_ready()
    revoked = module.record.apply_async(args=['revoked'], countdown=3)
    module.record.apply_async(args=['kept'], countdown=3)
    module.app.control.revoke(revoked.id)
    wait_for(lambda: 'kept' in env.done(), 30, what='the task that was not revoked',
             log=env.logs)
    time.sleep(1.0)  # the revoked one had the same ETA: give it every chance to run
    assert env.done() == ['kept'], env.logs()
    listed = module.app.control.inspect(destination=[node], timeout=5).revoked()
    assert listed == {node: [revoked.id]}, (listed, env.logs())
    worker.terminate()
    assert f'Discarding revoked task: {module.record.name}[{revoked.id}]' in worker.log(), \
        worker.log()[-3000:]


# ---------------------------------------------------------------------------
# 3. events
# ---------------------------------------------------------------------------


def test_events_reach_a_receiver(env: CeleryEnv) -> None:
    module = env.load()
    app = module.app
    node = 'ev@ks'
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_event(event: dict[str, Any]) -> None:
        with lock:
            events.append(event)

    def seen(kind: str, **match: Any) -> list[dict[str, Any]]:
        with lock:
            return [e for e in events if e.get('type') == kind
                    and all(e.get(k) == v for k, v in match.items())]

    conn = app.connection_for_read()
    receiver = app.events.Receiver(conn, handlers={'*': on_event})
    bound = threading.Event()
    receiver.on_consume_ready = lambda *args, **kwargs: bound.set()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # surfaced by the assertions below
            if not receiver.should_stop:
                errors.append(exc)

    thread = threading.Thread(target=run, name='event-receiver', daemon=True)
    thread.start()
    try:
        # The receiver's queue must be bound before the worker comes online.
        assert bound.wait(10), f'the event receiver did not start consuming: {errors}'
        worker = env.worker(node, args=('-E',))
        worker.wait_ready()
        wait_for(lambda: seen('worker-online', hostname=node), 15, what='worker-online',
                 log=env.logs)
        wait_for(lambda: seen('worker-heartbeat', hostname=node), 15,
                 what='worker-heartbeat', log=env.logs)
        result = module.record.delay('evented')
        succeeded = wait_for(lambda: seen('task-succeeded', uuid=result.id), 20,
                             what='task-succeeded', log=env.logs)
        assert succeeded[0]['hostname'] == node
        assert succeeded[0]['result'] == repr('evented')
        for kind in ('task-received', 'task-started'):
            assert len(seen(kind, uuid=result.id)) == 1, (kind, events)
        assert len(succeeded) == 1
        assert not errors, errors
        worker.terminate()
        wait_for(lambda: seen('worker-offline', hostname=node), 10, what='worker-offline',
                 log=env.logs)
    finally:
        receiver.should_stop = True
        thread.join(timeout=10)
        conn.release()
    assert env.done() == ['evented']


def test_event_queues_expire_after_their_receiver_left(env: CeleryEnv) -> None:
    """A receiver's celeryev.<id> queue has Celery's event_queue_expires as its x-expires:
    once the receiver is gone it expires with all its keys (so status stops listing it),
    and the worker's later events, routed to it no more, do not bring it back."""
    module = env.load(event_queue_expires=2.0)
    app = module.app
    worker = env.worker('evx@ks', args=('-E',))
    worker.wait_ready()
    broker = Broker(env.raw_broker, Keys(), [0, 3, 6, 9])

    def event_queues() -> list[str]:
        return [q for q in broker.discover('q')[0] if q.startswith('celeryev.')]

    with app.connection_for_read() as conn:
        got: list[dict[str, Any]] = []

        def on_event(event: dict[str, Any]) -> None:
            got.append(event)
            receiver.should_stop = True

        receiver = app.events.Receiver(conn, handlers={'*': on_event})
        receiver.capture(limit=None, timeout=20, wakeup=False)  # heartbeats every 2 s
        assert got, 'no event received'
        assert len(event_queues()) == 1
    wait_for(lambda: not event_queues(), 20, what='the event queue to expire', log=env.logs)
    time.sleep(4.5)  # two more heartbeats published to the celeryev exchange
    assert event_queues() == []
    assert not [k for k in env.raw_broker.scan_iter(match='ks:q:{celeryev.*')]
    worker.terminate()


# ---------------------------------------------------------------------------
# 4. purge
# ---------------------------------------------------------------------------


def test_purge_empties_the_backlog(env: CeleryEnv) -> None:
    module = env.load()
    for n in range(25):
        module.record.apply_async(args=[f'purged-{n}'], priority=n % 10)
    assert env.queue_length() == 25
    assert module.app.control.purge() == 25
    assert env.queue_length() == 0

    for n in range(7):
        module.record.delay(f'cli-purged-{n}')
    out = subprocess.run(
        [sys.executable, '-m', 'celery', '-A', MODULE, 'purge', '-f'], cwd=env.cwd,
        env=dict(os.environ, PYTHONPATH=str(env.cwd)), capture_output=True, text=True,
        timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'Purged 7 messages' in out.stdout, out.stdout + out.stderr
    assert env.queue_length() == 0

    worker = env.worker('purge@ks')
    worker.wait_ready()
    env.only_the_next_task_runs(worker, settle=1.0)


def test_a_task_with_a_2_mb_argument_runs(env: CeleryEnv) -> None:
    """Its message is over big_message_bytes (512 KiB): the body waits in the queue's big
    hash, the worker runs the task with the whole argument, and the ack frees the body."""
    module = env.load()
    blob = 'b' * (2 << 20)
    module.weigh.delay('big', blob)
    big = Keys().big(QUEUE)
    assert env.raw_broker.hlen(big) == 1  # stored apart, the entry holds its token
    worker = env.worker('big@ks')
    worker.wait_ready()
    wait_for(lambda: env.done() == [f'big {len(blob)}'], 30, what='the task', log=env.logs)
    wait_for(lambda: not env.raw_broker.exists(big), 10, what='its body freed by the ack',
             log=env.logs)
    worker.terminate()
    assert 'Traceback' not in worker.log(), worker.log()[-3000:]


# ---------------------------------------------------------------------------
# 5. a worker killed mid-task: acks_late tasks are run by another worker
# ---------------------------------------------------------------------------


def test_killed_worker_tasks_run_elsewhere(env: CeleryEnv) -> None:
    module = env.load({'visibility_timeout': 2}, task_reject_on_worker_lost=True)
    worker_a = env.worker('a@ks')
    worker_a.wait_ready()
    ids = [module.sleeper.delay(4).id for _ in range(4)]
    wait_for(lambda: len(env.started()) >= 2, 20, what='two tasks running on worker A',
             log=env.logs)
    time.sleep(0.5)
    worker_a.kill_group()  # SIGKILL the main process and its pool children
    assert env.done() == [], 'the tasks were meant to be still running when A was killed'
    running_on_a = env.started()
    assert len(running_on_a) == 2, running_on_a

    worker_b = env.worker('b@ks')
    worker_b.wait_ready()
    wait_for(lambda: set(env.done()) >= set(ids), 40, what='all tasks done by worker B',
             log=env.logs)
    time.sleep(1.0)
    worker_b.terminate()
    done = Counter(env.done())
    assert set(done) == set(ids), (done, ids, env.logs())
    assert all(n == 1 for n in done.values()), (done, env.logs())  # B held them once each
    assert set(running_on_a) <= set(done)


# ---------------------------------------------------------------------------
# 6. ETA tasks wait longer than the visibility timeout with two workers about
# ---------------------------------------------------------------------------


def test_eta_task_outlives_visibility_timeout_once(env: CeleryEnv) -> None:
    vt = 1.0
    module = env.load({'visibility_timeout': vt})
    workers = [env.worker('eta1@ks'), env.worker('eta2@ks')]
    for worker in workers:
        worker.wait_ready()
    countdown = 3.5 * vt
    sent_at = time.time()
    tags = [f'eta-{n}' for n in range(4)]
    for tag in tags:
        module.record.apply_async(args=[tag], countdown=countdown)
    wait_for(lambda: set(env.done()) >= set(tags), 30, what='the ETA tasks', log=env.logs)
    time.sleep(2 * vt + 1.0)  # time for a wrongly reclaimed copy to run too
    for worker in workers:
        worker.terminate()
    assert Counter(env.done()) == Counter(tags), env.logs()
    for entry in env.store.lrange('where', 0, -1):
        tag, host, ran_at = entry.decode().split()
        assert float(ran_at) >= sent_at + countdown - 0.2, (entry, sent_at)
    for worker in workers:
        assert 'lost the lease' not in worker.log(), worker.log()[-3000:]
        assert 'reclaimed' not in worker.log(), worker.log()[-3000:]


# ---------------------------------------------------------------------------
# 7. broadcasts sent while the worker is disconnected still arrive
# ---------------------------------------------------------------------------


def test_broadcast_during_disconnection_is_received(env: CeleryEnv) -> None:
    """A revoke and a ping broadcast sent while the worker is disconnected reach it once it
    is back. With broadcasts over PUB/SUB (Kombu's Redis transport) both are lost.

    The worker logs in as its own ACL user. ``CLIENT KILL TYPE normal`` alone is not enough:
    Celery reconnects within milliseconds, before this process has reconnected to publish.
    So the user is switched off first, which holds the worker off (its reconnection attempts
    fail) until the broadcasts are sent; then it is switched on again."""
    module = env.load()
    app = module.app
    node = 'bc@ks'
    user, password = 'ks-e2e-worker', uuid.uuid4().hex
    raw = env.raw_broker
    raw.execute_command('ACL', 'SETUSER', user, 'reset', 'on', f'>{password}', '~*', '&*',
                        '+@all')
    try:
        host, port = env.broker.split('://', 1)[1].split('/', 1)[0].split(':')
        worker_url = f'redis-streams://{user}:{password}@{host}:{port}/3'
        worker = env.worker(node, extra_env={'KS_E2E_BROKER': worker_url})
        worker.wait_ready()
        revoked_id = 'revoked-while-disconnected'
        raw.execute_command('ACL', 'LOG', 'RESET')

        raw.execute_command('ACL', 'SETUSER', user, 'off')
        killed = raw.execute_command('CLIENT', 'KILL', 'TYPE', 'normal')
        app.control.revoke(revoked_id)  # no reply expected
        back_on = threading.Timer(
            1.5, raw.execute_command, args=('ACL', 'SETUSER', user, 'on'))
        back_on.start()
        try:
            # Published now, while the worker cannot log in; the reply comes once it is back.
            replies = app.control.ping(destination=[node], timeout=15)
        finally:
            back_on.join()
        assert killed >= 1
        refused = [e for e in raw.acl_log() if e.get('username') in (user, user.encode())]
        assert refused, 'the worker did not try to reconnect while it was locked out'
        assert replies == [{node: {'ok': 'pong'}}], (replies, env.logs())

        # The revoke was honoured: a task with that id is discarded, the next one runs.
        module.record.apply_async(args=['revoked'], task_id=revoked_id)
        env.only_the_next_task_runs(worker, settle=0.5)
        assert f'Discarding revoked task: {module.record.name}[{revoked_id}]' in worker.log(), \
            worker.log()[-3000:]
    finally:
        for worker in env.workers:
            worker.kill_group()
        raw.execute_command('ACL', 'DELUSER', user)


# ---------------------------------------------------------------------------
# 8. warm shutdown returns prefetched messages at once
# ---------------------------------------------------------------------------


def test_warm_shutdown_requeues_prefetched(env: CeleryEnv) -> None:
    module = env.load({'visibility_timeout': 3600}, worker_prefetch_multiplier=4)
    ids = [module.sleeper.delay(1).id for _ in range(8)]
    worker = env.worker('warm@ks', concurrency=1)
    wait_for(lambda: env.started(), 40, what='the first task to start', log=env.logs)
    wait_for(lambda: worker.node.encode() in env.store.lrange('ready', 0, -1), 10,
             what='worker ready', log=env.logs)
    worker.proc.send_signal(signal.SIGTERM)
    try:
        worker.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f'worker did not stop on SIGTERM:\n{worker.log()[-3000:]}')
    left = env.queue_length()
    worker.kill_group()
    executed = env.done()
    assert env.started() == executed, env.logs()  # warm: the running task was finished
    assert 1 <= len(executed) < 4, (executed, env.logs())
    assert left == len(ids) - len(executed), (left, executed, env.logs())

    second = env.worker('warm2@ks', concurrency=2)
    wait_for(lambda: len(env.done()) >= len(ids), 40, what='the rest of the tasks',
             log=env.logs)
    time.sleep(0.5)
    second.terminate()
    assert Counter(env.done()) == Counter(ids), env.logs()
    assert env.queue_length() == 0


# ---------------------------------------------------------------------------
# 9. worker_disable_prefetch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('disable, left', [(True, 4), (False, 0)])
def test_worker_disable_prefetch_takes_only_what_the_pool_can_run(
        env: CeleryEnv, disable: bool, left: int) -> None:
    """With worker_disable_prefetch (Celery patches the channel's can_consume for drivers
    of type 'redis') a 2-process worker holds 2 of 6 long tasks and leaves 4 in the queue
    for other workers; with prefetch (multiplier 4: 8 allowed) it takes all 6."""
    if disable and 'worker_disable_prefetch' not in celery_defaults.DEFAULTS:
        pytest.skip('this Celery has no worker_disable_prefetch setting (new in Celery 5.6)')
    module = env.load(worker_prefetch_multiplier=4, worker_disable_prefetch=disable)
    ids = [module.sleeper.delay(3).id for _ in range(6)]
    worker = env.worker('noprefetch@ks', concurrency=2)
    wait_for(lambda: len(env.started()) >= 2, 40, what='two tasks to start', log=env.logs)
    time.sleep(0.5)  # time to read more, if it were going to
    assert env.queue_length() == left, env.logs()
    assert len(env.started()) == 2
    worker.terminate()
    second = env.worker('rest@ks', concurrency=4)
    wait_for(lambda: len(env.done()) >= len(ids), 60, what='every task', log=env.logs)
    second.terminate()
    assert Counter(env.done()) == Counter(ids), env.logs()


# ---------------------------------------------------------------------------
# 10. envelopes the worker cannot take
# ---------------------------------------------------------------------------


def _b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def _task(headers: Any, body: Any) -> dict[str, Any]:
    props = {'body_encoding': 'base64', 'delivery_mode': 2, 'priority': 0,
             'delivery_info': {'exchange': '', 'routing_key': QUEUE}}
    return {'body': body, 'properties': props, 'headers': headers,
            'content-type': 'application/json', 'content-encoding': 'utf-8'}


#: Each of these made a Celery 5.7 worker exit with "Unrecoverable error" at its first
#: delivery, and again at every redelivery (issue #11): kombu.Message cannot be made of the
#: first two; Celery's strategy raises on the others (bad-timelimit after taking a pool
#: slot it never gives back, so it must be caught before Celery sees it).
CELERY_POISON = {
    'headers-a-list': {'properties': {}, 'headers': [1]},
    'bad-base64': _task({}, '!!!x'),
    'no-id': _task({'task': f'{MODULE}.record'}, _b64([['a'], {}, {}])),
    'body-not-a-tuple': _task({'task': f'{MODULE}.record', 'id': 'p1'}, _b64('no tuple')),
    'bad-timelimit': _task({'task': f'{MODULE}.record', 'id': 'p2', 'timelimit': 'x'},
                           _b64([['a'], {}, {}])),
    'id-a-list': _task({'task': f'{MODULE}.record', 'id': ['x']}, _b64([['a'], {}, {}])),
}


def test_poison_envelopes_are_dead_lettered_and_the_worker_lives(env: CeleryEnv) -> None:
    """Entries a worker cannot take go to the dead-letter stream at their first delivery,
    with the error as the reason; the worker keeps running and runs the good tasks behind
    them (prefork, the pool Celery users run)."""
    module = env.load(worker_prefetch_multiplier=1)
    keys = Keys()
    stream = keys.stream(QUEUE, 0)
    with module.app.connection_for_write() as conn:
        conn.default_channel.queue_declare(QUEUE)
    module.record.delay('first')
    for envelope in CELERY_POISON.values():
        env.raw_broker.xadd(stream, {'m': json.dumps(envelope)})
    module.record.delay('last')
    worker = env.worker('poison@ks', concurrency=1)
    wait_for(lambda: 'last' in env.done(), 40, what="the task behind the poison",
             log=env.logs)
    assert worker.proc.poll() is None, env.logs()
    assert env.done() == ['first', 'last'], env.logs()
    letters = [f for _, f in env.raw_broker.xrange(keys.dlq(QUEUE))]
    assert len(letters) == len(CELERY_POISON), env.logs()
    reasons = [f[b'reason'].decode() for f in letters]
    assert all(r.startswith('not a message a consumer can take') for r in reasons), reasons
    worker.terminate()
    assert 'Unrecoverable error' not in worker.log(), worker.log()[-3000:]


# ---------------------------------------------------------------------------
# 10. delayed delivery: ETA / countdown tasks wait in Redis, not in the worker
# ---------------------------------------------------------------------------


def _delayed(env: CeleryEnv, queue: str = QUEUE) -> int:
    return env.raw_broker.zcard(Keys().delayed(queue))


def _ran_at(env: CeleryEnv) -> dict[str, float]:
    out = {}
    for entry in env.store.lrange('where', 0, -1):
        tag, _, ran_at = entry.decode().split()
        out[tag] = float(ran_at)
    return out


def test_countdown_and_eta_tasks_wait_in_redis(env: CeleryEnv) -> None:
    """countdown, an aware eta in another timezone and a naive (UTC) eta: kept in the
    queue's delayed set, not reserved by the worker (inspect scheduled is empty), each run
    once, none before its time. The app runs with enable_utc off in Europe/Berlin."""
    from datetime import datetime, timedelta, timezone
    module = env.load(enable_utc=False, timezone='Europe/Berlin')
    node = 'delay@ks'
    worker = env.worker(node)
    worker.wait_ready()
    now = datetime.now(timezone.utc)
    due = {
        'countdown': time.time() + 3,
        'aware': (now + timedelta(seconds=3.5)).timestamp(),
        'naive': (now + timedelta(seconds=4)).timestamp(),
    }
    module.record.apply_async(args=['countdown'], countdown=3)
    module.record.apply_async(
        args=['aware'], eta=(now + timedelta(seconds=3.5)).astimezone(
            timezone(timedelta(hours=-5))))
    module.record.apply_async(
        args=['naive'], eta=(now + timedelta(seconds=4)).replace(tzinfo=None))
    module.record.delay('now')
    wait_for(lambda: 'now' in env.done(), 20, what="the task sent without eta", log=env.logs)
    assert _delayed(env) == 3, env.logs()
    inspect = module.app.control.inspect(destination=[node], timeout=5)
    assert inspect.scheduled() == {node: []}, env.logs()
    assert inspect.reserved() == {node: []}, env.logs()
    wait_for(lambda: len(env.done()) == 4, 30, what='the delayed tasks', log=env.logs)
    time.sleep(0.5)
    worker.terminate()
    assert Counter(env.done()) == Counter(['now', *due]), env.logs()
    ran = _ran_at(env)
    for tag, at in due.items():
        assert ran[tag] >= at - 0.05, (tag, ran[tag], at)  # 50 ms: clocks read apart
    assert _delayed(env) == 0


def test_retry_with_countdown_waits_in_redis(env: CeleryEnv) -> None:
    module = env.load()
    worker = env.worker('retry@ks')
    worker.wait_ready()
    module.flaky.delay('f', 3)
    wait_for(lambda: env.store.llen('runs') == 1, 20, what='the first run', log=env.logs)
    wait_for(lambda: _delayed(env) == 1, 10, what='the retry in the delayed set',
             log=env.logs)
    wait_for(lambda: env.done() == ['f'], 30, what='the retried run', log=env.logs)
    worker.terminate()
    runs = [r.decode().split() for r in env.store.lrange('runs', 0, -1)]
    assert [r[1] for r in runs] == ['0', '1'], runs
    assert float(runs[1][2]) - float(runs[0][2]) >= 3 - 0.05, runs


def _send_delayed(env: CeleryEnv, prefix: str, countdown: float) -> tuple[list[str], float]:
    """Five record tasks with ``countdown``, checked to wait in the delayed set: (their tags,
    when they were sent)."""
    tags = [f'{prefix}{n}' for n in range(5)]
    sent = time.time()
    for tag in tags:
        env.module.record.apply_async(args=[tag], countdown=countdown)
    assert _delayed(env) == 5
    return tags, sent


def test_delayed_tasks_survive_a_killed_worker(env: CeleryEnv) -> None:
    """The worker is SIGKILLed while tasks wait: they are in Redis, not in its memory, so
    the next worker runs each once at its time (no visibility timeout to wait for)."""
    env.load({'visibility_timeout': 3600})
    worker = env.worker('k1@ks')
    worker.wait_ready()
    tags, sent = _send_delayed(env, 'k', 4)
    worker.kill_group()
    second = env.worker('k2@ks')
    second.wait_ready()
    wait_for(lambda: len(env.done()) == 5, 30, what='the delayed tasks on the new worker',
             log=env.logs)
    time.sleep(0.5)
    second.terminate()
    assert Counter(env.done()) == Counter(tags), env.logs()
    assert min(_ran_at(env).values()) >= sent + 4 - 0.05


def test_delayed_tasks_survive_a_redis_restart_with_aof(tmp_path: Path) -> None:
    """Tasks waiting for their countdown are in Redis: SIGKILL the server (AOF, fsync always)
    and start it again; the worker reconnects and runs each once, not before its time."""
    proc, port = start_redis(redis7_binary(), tmp_path / 'aof',
                             ('--appendonly', 'yes', '--appendfsync', 'always'))
    try:
        with celery_env(tmp_path, f'redis://127.0.0.1:{port}') as env:
            env.load()
            worker = env.worker('aof@ks')
            worker.wait_ready()
            tags, sent = _send_delayed(env, 'a', 5)
            proc.kill()
            proc.wait(10)
            restarted_log = tmp_path / 'aof' / 'restarted.log'
            with open(restarted_log, 'wb') as out:
                proc = subprocess.Popen(proc.args, cwd=tmp_path / 'aof', stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

            def all_done() -> bool:
                try:
                    return len(env.done()) >= 5
                except redis.ConnectionError:  # the server is still starting
                    return False

            def diagnosis() -> str:  # the server too: did it start, on our port, load?
                return (f'--- restarted redis-server (exit code {proc.poll()}) ---\n'
                        f'{restarted_log.read_text(errors="replace")[-3000:]}\n'
                        f'--- worker logs ---\n{env.logs()}')

            wait_until(all_done, 40, 'the delayed tasks after the restart', diag=diagnosis)
            time.sleep(0.5)
            worker.terminate()
            assert Counter(env.done()) == Counter(tags), env.logs()
            assert min(_ran_at(env).values()) >= sent + 5 - 0.05
    finally:
        stop_redis(proc)


# ---------------------------------------------------------------------------
# 12. queue length limits (x-max-length) on Celery's default queue
# ---------------------------------------------------------------------------


def test_reject_publish_refuses_apply_async_at_once_and_a_worker_frees_room(
        env: CeleryEnv) -> None:
    """x-max-length 3, x-overflow reject-publish on Celery's ``celery`` queue, given by the
    transport option (Celery never declares it with arguments): the 4th apply_async raises
    QueueFull, naming queue and limit, after one script call (a channel error: Celery's
    publish retry, on by default, does not retry it), and stores nothing; a worker drains
    the 3; then a publish is taken again."""
    from kombu_streams import QueueFull

    module = env.load({'queue_arguments': {QUEUE: {'x-max-length': 3,
                                                   'x-overflow': 'reject-publish'}}})
    for i in range(3):
        module.record.delay(f't{i}')
    def scripts_run() -> int:
        stats = env.raw_broker.info('commandstats')
        return sum(stats.get(f'cmdstat_{c}', {}).get('calls', 0) for c in ('evalsha', 'eval'))

    before = scripts_run()
    with pytest.raises(QueueFull, match="'?celery'? is full: x-max-length 3"):
        module.record.delay('t3')
    assert scripts_run() - before == 1  # refused once, not retried by Celery's publish retry
    assert env.queue_length() == 3
    worker = env.worker('limits@ks', concurrency=1)
    wait_for(lambda: len(env.done()) == 3, 40, what='the 3 queued tasks', log=env.logs)
    module.record.delay('t4')
    wait_for(lambda: 't4' in env.done(), 20, what="the task 't4'", log=env.logs)
    worker.terminate()
    assert sorted(env.done()) == ['t0', 't1', 't2', 't4'], env.logs()


def test_drop_head_dead_letters_the_oldest_celery_tasks(env: CeleryEnv) -> None:
    """x-max-length 2 (drop-head, the default): 5 apply_async; the 3 oldest go to the
    dead-letter stream with reason max-length, the worker runs the 2 newest."""
    module = env.load({'queue_arguments': {QUEUE: {'x-max-length': 2}}})
    for i in range(5):
        module.record.delay(f't{i}')
    assert env.queue_length() == 2
    worker = env.worker('drophead@ks', concurrency=1)
    wait_for(lambda: len(env.done()) == 2, 40, what='the 2 newest tasks', log=env.logs)
    time.sleep(0.5)
    worker.terminate()
    assert sorted(env.done()) == ['t3', 't4'], env.logs()
    letters = [f for _, f in env.raw_broker.xrange(Keys().dlq(QUEUE))]
    assert [f[b'reason'] for f in letters] == [b'max-length'] * 3
    tags = [json.loads(f[b'f:m'])['headers']['argsrepr'] for f in letters]
    assert tags == ["('t0',)", "('t1',)", "('t2',)"]
