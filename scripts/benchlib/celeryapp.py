"""The one Celery app every broker runs: a no-op task that counts itself (``bench.tick``).

The bench process builds it to publish (``apply_async``) and the worker subprocess builds
the same from its environment (``BENCH_*``, set by ``celerywork``), so both sides agree on
the broker, its transport options, the queue and the queue's type. The task's INCR goes to
a Redis "store" (not the broker under test): the count catches lost or doubled tasks, and
the first and the last task stamp their time.
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery
from kombu import Queue

import kombu_streams  # noqa: F401  (registers redis-streams://)


def make_app(broker: str, store: str, key: str, total: int, queue: str,
             queue_type: str | None = None, transport_options: dict | None = None) -> Celery:
    app = Celery('bench_celery_app', broker=broker, set_as_current=False)
    arguments = {'x-queue-type': queue_type} if queue_type else None
    app.conf.update(broker_connection_retry_on_startup=True, task_ignore_result=True,
                    broker_transport_options=transport_options or {},
                    task_default_queue=queue,
                    task_queues=[Queue(queue, routing_key=queue, queue_arguments=arguments)])
    client = None

    @app.task(name='bench.tick', ignore_result=True, shared=False)  # this app's only
    def tick():
        nonlocal client
        if client is None:
            client = redis.Redis.from_url(store)
        done = client.incr(key)
        if done == 1 or done == total:
            client.hset(key + ':t', done, repr(time.time()))

    return app


def environment(broker: str, store: str, key: str, total: int, queue: str,
                queue_type: str | None, transport_options: dict) -> dict[str, str]:
    """What ``app_from_env`` needs, for the worker's environment."""
    return {'BENCH_BROKER': broker, 'BENCH_STORE': store, 'BENCH_KEY': key,
            'BENCH_TOTAL': str(total), 'BENCH_QUEUE': queue,
            'BENCH_QUEUE_TYPE': queue_type or '',
            'BENCH_TRANSPORT_OPTIONS': json.dumps(transport_options)}


def app_from_env() -> Celery:
    env = os.environ
    return make_app(env['BENCH_BROKER'], env['BENCH_STORE'], env['BENCH_KEY'],
                    int(env['BENCH_TOTAL']), env['BENCH_QUEUE'],
                    env['BENCH_QUEUE_TYPE'] or None, json.loads(env['BENCH_TRANSPORT_OPTIONS']))
