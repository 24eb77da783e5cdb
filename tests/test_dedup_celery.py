"""Idempotent publish with a real Celery worker: ``apply_async`` twice with the same task_id on
a queue with ``x-deduplication-window`` (given by the ``queue_arguments`` transport option, as
for Celery's default queue): the task runs once; a task that retries itself (same task id,
retries 1) still runs its retry. Uses tests/test_celery.py's environment
(worker subprocesses on the session's Redis 7.0, their PYTHONPATH the tests' own first)."""

from __future__ import annotations

import re
import uuid

import pytest
import redis
import redis.connection
from kombu import pools

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


def test_apply_async_whose_reply_was_lost_runs_once(tmp_path, redis_url):
    """Redis stores apply_async's message, then the connection drops before the reply is read
    (CLIENT KILL from inside the read): Celery's publish retry sends it again on a new
    connection. The queue has x-deduplication-window (by the transport option, as for
    Celery's ``celery`` queue): the task id is the message's id, so it is stored once and a
    prefork worker runs it once. Without the window it is stored twice (checked first)."""
    # Kombu's producer pools are global, keyed by URL and transport options: a pooled
    # connection of another test's app with the same options has declared 'celery' already
    # (on a database since flushed) and would not declare it again with its arguments.
    pools.reset()
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as env:
        admin = redis.Redis.from_url(redis_url)
        cls = redis.connection.Connection
        original = cls.read_response
        killed: list[int] = []

        def read_response(self, *args, **kwargs):
            reply = original(self, *args, **kwargs)
            if not killed and isinstance(reply, bytes) and re.fullmatch(rb'\d+-\d+', reply):
                host, port = self._sock.getsockname()[:2]  # the publish's entry id
                killed.append(admin.client_kill_filter(addr=f'{host}:{port}'))
                raise redis.ConnectionError('reply lost: connection killed')
            return reply

        def lose_one_reply(module, name):
            killed.clear()
            cls.read_response = read_response
            try:
                module.record.apply_async(args=[name], retry=True, retry_policy={
                    'max_retries': 3, 'interval_start': 0, 'interval_step': 0})
            finally:
                cls.read_response = original
            assert killed == [1]  # the first reply was lost for real

        plain = env.load()
        lose_one_reply(plain, 'twice')
        assert env.queue_length() == 2  # the retry stored it again
        plain.app.control.purge()
        module = env.load(transport_options={
            'queue_arguments': {QUEUE: {'x-deduplication-window': 600_000}}})
        lose_one_reply(module, 'once')
        assert env.queue_length() == 1
        worker = env.worker('lost@ks', concurrency=1)
        module.record.apply_async(args=['after'])
        wait_for(lambda: 'after' in env.done(), 60, what="the task 'after'", log=env.logs)
        worker.terminate()
        assert sorted(env.done()) == ['after', 'once'], env.logs()
