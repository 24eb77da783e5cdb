"""Idempotent publish with a real Celery worker: ``apply_async`` twice with the same task_id on
a queue with ``x-deduplication-window`` (given by the ``queue_arguments`` transport option, as
for Celery's default queue): the task runs once; a task that retries itself (same task id,
retries 1) still runs its retry. Uses tests/test_celery.py's environment
(worker subprocesses on the session's Redis 7.0, their PYTHONPATH the tests' own first)."""

from __future__ import annotations

import uuid

import pytest

from tests.test_celery import QUEUE, celery_env, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.slow]


def test_apply_async_twice_with_one_task_id_runs_once(tmp_path, redis_url):
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as env:
        module = env.load(transport_options={
            'queue_arguments': {QUEUE: {'x-deduplication-window': 600_000}}})
        task_id = str(uuid.uuid4())
        for _ in range(2):  # as a publish retried after its reply was lost
            module.record.apply_async(args=['once'], task_id=task_id)
        module.record.apply_async(args=['other'])
        assert env.queue_length() == 2
        worker = env.worker('dedup@ks', concurrency=1)
        module.record.apply_async(args=['once-again'], task_id=task_id)  # still in the window
        # a task's own retry keeps its task id: it is a new message all the same
        module.flaky.apply_async(args=['retried', 0])
        wait_for(lambda: 'retried' in env.done(), 60, what="the retried task", log=env.logs)
        module.record.apply_async(args=['after'])
        wait_for(lambda: 'after' in env.done(), 60, what="the task 'after'", log=env.logs)
        worker.terminate()
        assert sorted(env.done()) == ['after', 'once', 'other', 'retried'], env.logs()
