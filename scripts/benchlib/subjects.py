"""Who is measured: one Subject per column of the tables, each with the workloads it runs.

* ``kombu``, ``streams``: Kombu's stock Redis transport and kombu-streams, every workload.
* ``raw``: redis-py alone on the same server (``raw.py``): the client and server's ceiling
  for publish, consume+ack prefetch 1 and 100, and the latency floor.
* ``floor``: redis-py alone again, each message's commands in one EVALSHA of the least
  script (``raw.py``, the script floor): what a design with one Lua script per operation
  pays at the least, for publish and consume+ack prefetch 1 and 100.
* ``alone``: the same Kombu workloads on ``memory://`` in this process: what Kombu itself
  costs per message, with no broker (publish, consume+ack prefetch 1 and 100).
* ``rabbit``, ``rabbit_confirm``, ``rabbit_quorum`` (``--peers``): the Celery workloads on a
  private RabbitMQ node: a classic queue without and with publisher confirms, a quorum queue
  (with confirms: a quorum queue is chosen for safety, and ours are confirmed by Redis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import celerywork, raw, workloads

Workload = Callable  # (subject, opts, admin) -> {row key: value or None}

#: Every workload by the name --only takes, in the order they run.
WORKLOADS: dict[str, Workload] = {
    'publish': workloads.w_publish,
    'batch': workloads.w_batch,
    'consume1': workloads.w_consume1,
    'consume100': workloads.w_consume100,
    'scale10': workloads.w_scale10,
    'scale100': workloads.w_scale100,
    'latency': workloads.w_latency,
    'commands': workloads.w_commands,
    'memory': workloads.w_memory,
    'celery_prefork': celerywork.w_celery_prefork,
    'celery_threads': celerywork.w_celery_threads,
}
CELERY = ('celery_prefork', 'celery_threads')
ALONE = ('publish', 'consume1', 'consume100')


@dataclass
class Subject:
    key: str                      # the samples' key (bench.json: rows[].median[key])
    label: str                    # column or row title
    kind: str                     # 'redis', 'memory' or 'amqp'
    url: str
    runs: dict[str, Workload]     # workload name -> function
    store_url: str = ''           # Redis for the Celery task's counter
    transport_options: dict = field(default_factory=dict)
    queue_type: str | None = None


def store_for(where: str) -> str:
    """The Celery store: the next database (DB+1) of the Redis at ``where`` (HOST:PORT/DB)."""
    hostport, _, db = where.partition('/')
    return f'redis://{hostport}/{(int(db or 0) + 1) % 16}'


def redis_subjects(where: str) -> list[Subject]:
    """Kombu's Redis transport, kombu-streams, raw redis-py (through the proxy if any) and
    Kombu on memory://, in the order each round runs them."""
    store = store_for(where)
    return [
        Subject('kombu', 'kombu redis', 'redis', f'redis://{where}', dict(WORKLOADS), store),
        Subject('streams', 'kombu-streams', 'redis', f'redis-streams://{where}',
                dict(WORKLOADS), store),
        Subject('raw', 'raw redis-py', 'redis', f'redis://{where}', dict(raw.RAW_WORKLOADS)),
        Subject('floor', 'script floor', 'redis', f'redis://{where}',
                dict(raw.FLOOR_WORKLOADS)),
        Subject('alone', 'Kombu alone', 'memory', 'memory://',
                {name: WORKLOADS[name] for name in ALONE}),
    ]


def rabbit_subjects(url: str, store_where: str) -> list[Subject]:
    store = store_for(store_where)
    celery = {name: WORKLOADS[name] for name in CELERY}
    return [
        Subject('rabbit', 'RabbitMQ classic', 'amqp', url, celery, store),
        Subject('rabbit_confirm', 'RabbitMQ classic+confirms', 'amqp', url, celery, store,
                {'confirm_publish': True}),
        Subject('rabbit_quorum', 'RabbitMQ quorum+confirms', 'amqp', url, celery, store,
                {'confirm_publish': True}, 'quorum'),
    ]
