"""Global rate limit and global concurrency with a real Celery prefork worker: the queue
arguments come from the ``queue_arguments`` transport option (as for Celery's default queue,
which the app never declares with arguments) and are enforced in Redis, whatever the
worker's own concurrency and prefetch. What is asserted is measured by the tasks themselves
(their start and end times, one clock: every process runs on this machine), never the wall
time of the test. tests/test_celery.py's environment; docs/design.rst, "Global rate limit"
and "Global concurrency".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_celery import QUEUE, CeleryEnv, celery_env, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.slow]

TIMED = '''

@app.task(bind=True)
def stamp(self, tag):
    store.rpush('starts', repr(time.time()))
    store.rpush('done', tag)


@app.task(bind=True)
def span(self, tag, seconds):
    start = time.time()
    time.sleep(seconds)
    store.rpush('spans', f'{start!r} {time.time()!r}')
    store.rpush('done', tag)
'''


@pytest.fixture()
def env(tmp_path: Path, redis_url: str) -> Any:
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as environment:
        yield environment


def most_in_a_window(times: list[float], window: float) -> int:
    """The most of ``times`` that fall in any closed interval of length ``window``."""
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] > window:
            first += 1
        most = max(most, last - first + 1)
    return most


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of ``spans`` (start, end) running at one instant; one that ends when another
    starts does not overlap it (a slot frees at the ack, after the task's end)."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    most = running = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_a_rate_limited_queue_starts_no_more_than_the_rate_in_any_second(
        env: CeleryEnv) -> None:
    """x-rate-limit 20/s with burst 1, 30 no-op tasks queued before a worker of 4 processes
    starts: the limiter lets at most 1 + 20 deliveries through in any second (GCRA: burst
    + t / interval). A task starts some time after its delivery, and on a loaded machine
    that lag varies: a start delayed 100 ms more than the next one's can put two more starts
    in a second than deliveries were, so the bound allows 2 more: 23 (without the limit all
    30 start within a fraction of a second; a fixed window doubling at its edge gives 30)."""
    module = env.load({'queue_arguments': {
        QUEUE: {'x-rate-limit': '20/s', 'x-rate-burst': 1}}}, tasks=TIMED)
    for n in range(30):
        module.stamp.delay(n)
    assert env.queue_length() == 30
    worker = env.worker('rate@ks', concurrency=4)
    wait_for(lambda: len(env.done()) >= 30, 60, what='30 tasks', log=env.logs)
    worker.terminate()
    starts = [float(x) for x in env.store.lrange('starts', 0, -1)]
    assert sorted(env.done(), key=int) == [str(n) for n in range(30)], env.logs()
    assert most_in_a_window(starts, 1.0) <= 20 + 1 + 2, sorted(starts)


def test_a_queue_with_max_in_flight_runs_no_more_at_once_than_its_limit(
        env: CeleryEnv) -> None:
    """x-max-in-flight 2, a worker of 4 processes, 8 tasks of 0.2 s queued before it starts
    (acks_late: a task's slot is held from its delivery to its ack, which come before its
    start and after its end): at no instant do more than 2 run (without the limit, 4)."""
    module = env.load({'queue_arguments': {QUEUE: {'x-max-in-flight': 2}}}, tasks=TIMED)
    for n in range(8):
        module.span.delay(n, 0.2)
    assert env.queue_length() == 8
    worker = env.worker('cap@ks', concurrency=4)
    wait_for(lambda: len(env.done()) >= 8, 60, what='8 tasks', log=env.logs)
    worker.terminate()
    spans = [tuple(float(t) for t in x.split()) for x in env.store.lrange('spans', 0, -1)]
    assert sorted(env.done(), key=int) == [str(n) for n in range(8)], env.logs()
    assert len(spans) == 8 and most_at_once(spans) <= 2, sorted(spans)
