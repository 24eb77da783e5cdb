"""A real Celery worker on kombu-streams: an app switches by URL alone.

The worker runs as a subprocess (prefork with 2 processes, and threads) on a real
redis-server; tasks record what ran in a Redis list, and return their results through
Celery's Redis result backend, as most Celery-on-Redis apps have it. The compatibility matrix
(noxfile.py) runs this on every supported Celery.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

pytestmark = [pytest.mark.celery, pytest.mark.slow]

APP = '''
import kombu_streams  # registers redis-streams://
import redis
from celery import Celery

BROKER = {broker!r}
app = Celery('smokeapp', broker=BROKER, backend={store!r})
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                task_acks_late=True,
                # a result forgotten after the test (AsyncResult.__del__ unsubscribes) must
                # not retry for minutes once the test's server is gone
                result_backend_transport_options={{'retry_policy': {{'max_retries': 1}}}})
store = redis.Redis.from_url({store!r})

@app.task
def record(n):
    store.rpush('done', n)
    return n
'''


@pytest.fixture()
def celery_app(tmp_path: Path, redis_url: str):
    broker = redis_url.replace('redis://', 'redis-streams://', 1).rsplit('/', 1)[0] + '/3'
    store = redis_url.rsplit('/', 1)[0] + '/4'
    redis.Redis.from_url(broker.replace('redis-streams', 'redis', 1)).flushdb()
    redis.Redis.from_url(store).flushdb()
    (tmp_path / 'smokeapp.py').write_text(textwrap.dedent(APP.format(broker=broker,
                                                                      store=store)))
    sys.path.insert(0, str(tmp_path))
    try:
        import smokeapp

        yield smokeapp, tmp_path, redis.Redis.from_url(store)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop('smokeapp', None)


def _start_worker(cwd: Path, pool: str, concurrency: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.Popen(
        [sys.executable, '-m', 'celery', '-A', 'smokeapp', 'worker', '-P', pool,
         '-c', str(concurrency), '--without-gossip', '--loglevel=WARNING', '-n',
         f'smoke-{pool}@%h'],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _stop_worker(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read().decode(errors='replace') if proc.stdout else ''


@pytest.mark.parametrize('pool,concurrency', [('prefork', 2), ('threads', 4)])
def test_worker_runs_tasks_and_answers_ping(celery_app, pool: str, concurrency: int) -> None:
    module, cwd, store = celery_app
    sent = [module.record.delay(n) for n in range(100)]  # a backlog before the worker starts
    assert len(sent) == 100
    worker = _start_worker(cwd, pool, concurrency)
    try:
        deadline = time.monotonic() + 60
        while store.llen('done') < 100 and time.monotonic() < deadline:
            time.sleep(0.2)
        replies = module.app.control.inspect(timeout=3).ping() or {}
    finally:
        output = _stop_worker(worker)
    try:
        done = sorted(int(x) for x in store.lrange('done', 0, -1))
        assert done == list(range(100)), output[-3000:]
        assert [r.get(timeout=10) for r in sent[:20]] == list(range(20)), output[-3000:]
    finally:
        sent.clear()  # each AsyncResult unsubscribes as it goes: now, while Redis runs
        gc.collect()
    assert any(reply == {'ok': 'pong'} for reply in replies.values()), (replies, output[-3000:])
    assert 'Traceback' not in output, output[-3000:]
