"""A unique key across a SIGKILLed Celery worker (issue #22): the key is tied to its message,
not to a lock, so a worker killed mid-task (main process and pool child) cannot leave it
stuck, nor free it early. A real prefork worker with acks_late (tests/test_celery.py's
environment); docs/design.rst, "Unique keys" (a killed consumer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_celery import QUEUE, CeleryEnv, celery_env, wait_for

from kombu_streams.keys import Keys
from kombu_streams.unique import COUNT_FIELD

pytestmark = [pytest.mark.celery, pytest.mark.slow]

K = Keys()
KEY = {'x-unique-key': 'k'}

HOLDING = '''

@app.task(bind=True)
def hold(self, tag):
    run = store.incr('runs')
    store.rpush('where', f'{tag} {run} {self.request.hostname}')
    if run == 1:  # the first run blocks until its worker is killed
        store.rpush('started', tag)
        time.sleep(600)
    store.rpush('done', tag)
'''


@pytest.fixture()
def env(tmp_path: Path, redis_url: str) -> Any:
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as environment:
        yield environment


def test_a_killed_workers_task_keeps_its_key_until_it_runs_again_and_is_acked(
        env: CeleryEnv) -> None:
    """Worker A runs a keyed task and is SIGKILLed (its process group: main process and
    pool child) mid-task. The message waits in Redis, pending with A's dead consumer: a
    second publish with its key is refused (not stored, counted). Worker B reclaims it after
    the lease (visibility_timeout 2 s) and runs it once; its ack frees the key, and a third
    publish with it is stored and runs."""
    module = env.load({'visibility_timeout': 2}, tasks=HOLDING)
    stream = K.stream(QUEUE, 0)
    module.hold.apply_async(args=['first'], headers=KEY)
    worker_a = env.worker('a@ks', concurrency=1)
    wait_for(lambda: env.started() == ['first'], 40, what='the task running on A',
             log=env.logs)
    worker_a.kill_group()
    [pending] = env.raw_broker.xpending_range(stream, QUEUE, '-', '+', 10)
    assert pending['consumer'] != b'~requeued'  # still A's: it waits to be reclaimed
    module.hold.apply_async(args=['second'], headers=KEY)
    assert env.raw_broker.xlen(stream) == 1  # refused: only the first is stored
    assert env.raw_broker.hget(K.unique(QUEUE), COUNT_FIELD) == b'1'

    worker_b = env.worker('b@ks', concurrency=1)
    wait_for(lambda: env.done() == ['first'], 40, what='the first task run again on B',
             log=env.logs)
    wait_for(lambda: env.raw_broker.xlen(stream) == 0, 20, what="B's ack", log=env.logs)
    module.hold.apply_async(args=['third'], headers=KEY)  # the key is free again
    wait_for(lambda: 'third' in env.done(), 30, what="the task 'third'", log=env.logs)
    worker_b.terminate()
    assert env.done() == ['first', 'third'], env.logs()
    where = [x.decode() for x in env.store.lrange('where', 0, -1)]
    assert where == ['first 1 a@ks', 'first 2 b@ks', 'third 3 b@ks'], env.logs()
    assert env.raw_broker.hget(K.unique(QUEUE), COUNT_FIELD) == b'1'
