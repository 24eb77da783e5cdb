"""Message TTL with Celery: ``apply_async(expires=...)`` is enforced in Redis. Celery 5.3 to
5.7 pass the seconds left (0 when already past) as Kombu's ``expiration`` property, which
publish.lua stamps as the message's deadline; a worker started after it passed never
receives the task (no prefetch slot, no round trip): it is in the dead-letter stream with
reason expired. A real prefork worker (tests/test_celery.py's fixtures)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from test_celery import QUEUE, CeleryEnv, celery_env, wait_for

from kombu_streams.keys import Keys

pytestmark = [pytest.mark.celery, pytest.mark.slow]

K = Keys()


@pytest.fixture()
def env(tmp_path: Path, redis_url: str) -> Any:
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as environment:
        yield environment


def _server_ms(env: CeleryEnv) -> int:
    sec, usec = env.raw_broker.time()
    return int(sec) * 1000 + int(usec) // 1000


def test_an_expired_task_never_runs_and_is_dead_lettered(env: CeleryEnv) -> None:
    module = env.load()
    past = module.record.apply_async(
        args=['past'], expires=datetime.now(timezone.utc) - timedelta(minutes=1))
    short = module.record.apply_async(args=['short'], expires=0.05)  # 50 ms
    kept = module.record.apply_async(args=['kept'], expires=3600)
    entries = env.raw_broker.xrange(K.stream(QUEUE, 0))
    assert [json.loads(f[b'm'])['headers']['id'] for _, f in entries] == [
        past.id, short.id, kept.id]
    deadlines = [int(f[b'e']) for _, f in entries]  # every one has one: it has expires
    while _server_ms(env) < max(deadlines[:2]):  # the short one's, 50 ms away at most
        time.sleep(0.01)
    worker = env.worker('ttl@ks')
    worker.wait_ready()
    wait_for(lambda: 'kept' in env.done(), 30, what='the task that did not expire',
             log=env.logs)
    assert env.done() == ['kept'], env.logs()
    letters = env.raw_broker.xrange(K.dlq(QUEUE))
    assert [(f[b'reason'], json.loads(f[b'f:m'])['headers']['id']) for _, f in letters] == [
        (b'expired', past.id), (b'expired', short.id)]
    assert env.raw_broker.hget(K.counters(QUEUE), 'expired') == b'2'
    worker.terminate()
    log = worker.log()  # INFO: a task received is logged with its id; these never were
    assert kept.id in log and past.id not in log and short.id not in log, log[-3000:]
