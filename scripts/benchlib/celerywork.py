"""The Celery rows: ``apply_async`` of a backlog of no-op tasks, then a real ``celery worker``
subprocess (prefork -c2 or threads -c8) draining it, on any broker (``subject.url``).

``apply``: tasks / seconds of the ``apply_async`` loop (one call per task, as an app makes
them). ``*_all``: tasks / (last task ran - worker spawned); the other row leaves the
worker's start-up out: (tasks - 1) / (last task ran - first task ran). Both stamps are
written by the tasks themselves (into the store), so the queue's length is never looked at
while the worker runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import redis

from . import celeryapp
from .common import unique

CELERY_STALL = 30.0     # seconds without a finished task before we call it a stall
POOLS = {'prefork': 2, 'threads': 8}
SCRIPTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_MODULE = 'from benchlib.celeryapp import app_from_env\n\napp = app_from_env()\n'


def w_celery(subject, opts, admin, pool: str):
    n, key, queue = opts.celery_tasks, unique('bench:celery'), unique('bench.celery')
    store = redis.Redis.from_url(subject.store_url)
    args = (subject.url, subject.store_url, key, n, queue, subject.queue_type,
            subject.transport_options)
    app = celeryapp.make_app(*args)
    tick = app.tasks['bench.tick']
    try:
        with app.connection_for_write() as conn:  # declared before the clock starts
            app.amqp.queues[queue](conn.default_channel).declare()
        start = time.perf_counter()
        for _ in range(n):
            tick.apply_async()
        applied = n / (time.perf_counter() - start)
        wait_for_backlog(app, queue, n)
        with tempfile.TemporaryDirectory(prefix='kombu-streams-bench-celery-') as tmp:
            with open(os.path.join(tmp, 'bench_celery_app.py'), 'w') as f:
                f.write(WORKER_MODULE)
            path = os.pathsep.join(filter(None, [tmp, SCRIPTS_DIR, os.environ.get('PYTHONPATH')]))
            env = dict(os.environ, PYTHONPATH=path, **celeryapp.environment(*args))
            argv = [sys.executable, '-m', 'celery', '-A', 'bench_celery_app', 'worker',
                    '-P', pool, '-c', str(POOLS[pool]), '-Q', queue,
                    '-n', f'{unique("bench")}@%h', '--without-mingle', '--without-gossip',
                    '--without-heartbeat', '--loglevel=WARNING']
            log_path = os.path.join(tmp, 'worker.log')
            with open(log_path, 'wb') as log:
                spawned = time.time()
                proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # its own process group
            try:
                wait_for_tasks(store, key, n, proc, log_path)
            finally:
                stop_worker(proc)
        executed = int(store.get(key) or 0)
        first, last = (float(store.hget(f'{key}:t', i)) for i in (1, n))
    finally:
        store.delete(key, f'{key}:t')
        store.close()
        if subject.kind == 'amqp':  # Redis is flushed between workloads; RabbitMQ is not
            delete_queue(app, queue)
        app.close()
    if executed != n:  # counted after the worker stopped: catches duplicate deliveries
        raise RuntimeError(f'{executed} tasks ran for {n} published')
    return {'apply': applied, f'{pool}_all': n / (last - spawned), pool: (n - 1) / (last - first)}


def wait_for_backlog(app, queue: str, n: int, timeout: float = 30.0) -> None:
    """Until the queue holds all ``n`` tasks (an unconfirmed AMQP publish may still be on
    its way when apply_async returns)."""
    deadline = time.monotonic() + timeout
    with app.connection_for_write() as conn:
        while True:
            queued = app.amqp.queues[queue](conn.default_channel).queue_declare(
                passive=True).message_count
            if queued == n:
                return
            if queued > n or time.monotonic() > deadline:
                raise RuntimeError(f'celery queue holds {queued} tasks, expected {n}')
            time.sleep(0.05)


def delete_queue(app, queue: str) -> None:
    try:
        with app.connection_for_write() as conn:
            app.amqp.queues[queue](conn.default_channel).delete()
    except Exception as exc:  # a leftover queue on a private node: worth a word, no more
        print(f'  bench: could not delete queue {queue}: {exc}', file=sys.stderr)


def w_celery_prefork(subject, opts, admin):
    return w_celery(subject, opts, admin, 'prefork')


def w_celery_threads(subject, opts, admin):
    return w_celery(subject, opts, admin, 'threads')


def wait_for_tasks(store, key, n, proc, log_path) -> None:
    """Until task ``n`` has stamped its time; fail on a stall or when the worker exits."""
    seen, since = -1, time.monotonic()
    while True:
        done, last = store.pipeline().get(key).hget(f'{key}:t', n).execute()
        done = int(done or 0)
        if last is not None:
            return
        if done != seen:
            seen, since = done, time.monotonic()
        elif time.monotonic() - since > CELERY_STALL:
            raise RuntimeError(f'celery worker stalled: {done}/{n} tasks ran, none in the '
                               f'last {CELERY_STALL:.0f}s{log_tail(log_path)}')
        if proc.poll() is not None:
            raise RuntimeError(f'celery worker exited ({proc.returncode}) after {done}/{n} '
                               f'tasks{log_tail(log_path)}')
        time.sleep(0.01)


def log_tail(path: str, size: int = 1500) -> str:
    with open(path, 'rb') as f:
        text = f.read().decode(errors='replace')[-size:].strip()
    return f'; worker log tail:\n{text}' if text else '; worker log empty'


def stop_worker(proc) -> None:
    """Warm shutdown (SIGTERM); after 15 s, SIGKILL for the worker's whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group it leads: pool children left over
    except ProcessLookupError:
        pass
    proc.wait()
