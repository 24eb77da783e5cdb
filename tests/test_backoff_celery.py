"""Retry backoff with Celery: a task that raises ``Reject(requeue=True)`` (acks_late) on a
queue with x-requeue-delay is not run again until its due time: it waits in the delayed set,
due min_ms after the reject by the server's clock, with its entry and delivery count kept.
A real prefork worker (tests/test_celery.py's fixtures); no timing asserts: the due time is
read from Redis and the message made due by moving its score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_celery import (
    QUEUE,
    CeleryEnv,
    celery_env,
    wait_for,
)

from kombu_streams.keys import Keys

pytestmark = [pytest.mark.celery, pytest.mark.slow]

K = Keys()
DELAY = 600_000  # ms: longer than the test, so only our move of the score makes it due

REJECTING = '''

from celery.exceptions import Reject


@app.task(bind=True, acks_late=True)
def rejecting(self, tag):
    run = store.incr('tries')
    store.rpush('runs', f'{tag} {run} {self.request.delivery_info.get("redelivered")}')
    if run == 1:
        raise Reject('not yet', requeue=True)
    store.rpush('done', tag)
'''


@pytest.fixture()
def env(tmp_path: Path, redis_url: str) -> Any:
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as environment:
        yield environment


def server_ms(env: CeleryEnv) -> int:
    sec, usec = env.raw_broker.time()
    return int(sec) * 1000 + int(usec) // 1000


def test_a_rejected_task_waits_its_backoff_then_runs_again(env: CeleryEnv) -> None:
    module = env.load({'queue_arguments': {QUEUE: {'x-requeue-delay': f'{DELAY},{DELAY}'}}},
                      tasks=REJECTING)
    module.rejecting.delay('r')
    [(entry_id, _)] = env.raw_broker.xrange(K.stream(QUEUE, 0))
    before = server_ms(env)
    worker = env.worker('backoff@ks', concurrency=1)
    worker.wait_ready()
    delayed = K.delayed(QUEUE)
    wait_for(lambda: env.raw_broker.zcard(delayed) == 1, 40, what='the rejected task to wait',
             log=env.logs)
    [(member, due)] = env.raw_broker.zrange(delayed, 0, -1, withscores=True)
    assert before + DELAY <= due <= server_ms(env) + DELAY
    assert member.split(b':', 2)[2] == b'b:' + entry_id + b':~requeued:' + QUEUE.encode()
    assert env.raw_broker.hlen(K.delayed_messages(QUEUE)) == 0  # a pointer: no copy
    # still waiting: it ran once, and its entry (count 1) is parked, not served
    pending = env.raw_broker.xpending_range(K.stream(QUEUE, 0), QUEUE, '-', '+', 10)
    assert [(p['message_id'], p['consumer'], p['times_delivered']) for p in pending] == [
        (entry_id, b'~backoff', 1)]
    assert env.store.lrange('runs', 0, -1) == [b'r 1 False'], env.logs()
    env.raw_broker.zadd(delayed, {member: 0})  # due now
    module.record.delay('kick')  # a publish wakes the worker, whose read moves it
    # both: 'r' is served first (parked before fresh), and 'kick' runs after it
    wait_for(lambda: {'r', 'kick'} <= set(env.done()), 30, what='the task run again',
             log=env.logs)
    worker.terminate()
    assert env.store.lrange('runs', 0, -1) == [b'r 1 False', b'r 2 True'], env.logs()
    assert sorted(env.done()) == ['kick', 'r']
    assert env.raw_broker.zcard(delayed) == 0
