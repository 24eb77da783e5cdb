"""What the workloads share: message bodies, a fresh Kombu session, draining, latency runs."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import time
from contextlib import contextmanager
from itertools import count
from types import SimpleNamespace
from typing import Callable

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.utils.json import dumps

BODY_SIZE = 200          # bytes of the JSON body
DRAIN_TIMEOUT = 10.0     # seconds one drain_events may wait before we call it a stall
LATENCY_GAP = 0.002      # seconds between latency messages: the consumer is blocked again
LATENCY_WARMUP = 20      # latency messages sent first and not counted

_seq = count()


def unique(prefix: str = 'bench') -> str:
    """A name no other workload of this run (nor another bench on the server) uses."""
    return f'{prefix}.{os.getpid()}.{next(_seq)}'


class SendCounter:
    """Counts packets redis-py sends (one per command, one per pipeline): round trips."""

    count = 0

    @classmethod
    def install(cls) -> None:
        original = redis.connection.AbstractConnection.send_packed_command

        def send_packed_command(self, command, check_health=True):
            cls.count += 1
            return original(self, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = send_packed_command


def make_body(seq: int, stamp: int = 0) -> dict:
    """A JSON body of BODY_SIZE bytes; ``t`` is a fixed-width monotonic_ns stamp."""
    body = {'seq': seq, 't': f'{stamp:020d}', 'pad': ''}
    body['pad'] = 'x' * max(0, BODY_SIZE - len(dumps(body)))
    return body


@contextmanager
def session(url: str, nqueues: int = 1, transport_options: dict | None = None,
            queue_arguments: dict | None = None):
    """A connection with fresh queues declared on a direct exchange (with
    ``queue_arguments``, if given), and a producer.

    ``queue`` and ``name`` are the first of ``queues`` and ``names``."""
    base = unique()
    names = [base] if nqueues == 1 else [f'{base}.{i}' for i in range(nqueues)]
    exchange = Exchange('bench', 'direct')
    with Connection(url, transport_options=transport_options or {}) as conn:
        channel = conn.channel()
        queues = [Queue(name, exchange, routing_key=name, queue_arguments=queue_arguments)
                  for name in names]
        for queue in queues:
            queue(channel).declare()
        producer = Producer(channel, exchange, serializer='json')
        yield SimpleNamespace(conn=conn, channel=channel, queues=queues, queue=queues[0],
                              names=names, name=names[0], producer=producer)


def batch_supported(s) -> bool:
    return bool(s.producer.supports_batch_publish
                and hasattr(s.channel, 'create_publish_batch')
                and getattr(s.channel, 'supports_batch_publish', True))


def publish_all(s, bodies, batch: bool = False) -> None:
    publish, key = s.producer.publish, s.name
    if batch:
        with s.producer.batch():
            for body in bodies:
                publish(body, routing_key=key, retry=False)
    else:
        for body in bodies:
            publish(body, routing_key=key, retry=False)


def check_size(s, expected: int) -> None:
    # re-declare: idempotent
    found = sum(queue(s.channel).queue_declare().message_count for queue in s.queues)
    if found != expected:
        raise RuntimeError(f'queue holds {found} messages, expected {expected}')


class Draining:
    """A consumer of ``s``'s queues that acks and counts what it gets, drained ``n`` more at
    a time (``take``): one kept open while other work runs between its takes."""

    def __init__(self, s, prefetch: int) -> None:
        self.s, self.got, self.started = s, 0, False

        def on_message(body, message) -> None:
            message.ack()
            self.got += 1

        self.consumer = Consumer(s.channel, s.queues, callbacks=[on_message],
                                 accept=['json'], prefetch_count=prefetch)

    def take(self, n: int) -> float:
        """Consume and ack ``n`` more messages (the first take starts consuming); seconds
        taken."""
        target = self.got + n
        start = time.perf_counter()
        if not self.started:
            self.consumer.consume()
            self.started = True
        while self.got < target:
            try:
                self.s.conn.drain_events(timeout=DRAIN_TIMEOUT)
            except socket.timeout:
                raise RuntimeError(f'consumer stalled: {self.got}/{target} messages after a '
                                   f'{DRAIN_TIMEOUT:.0f}s drain_events timeout') from None
        return time.perf_counter() - start

    def cancel(self) -> None:
        self.consumer.cancel()


def drain(s, n: int, prefetch: int) -> float:
    """Consume and ack ``n`` messages; return the seconds it took."""
    draining = Draining(s, prefetch)
    elapsed = draining.take(n)
    draining.cancel()
    return elapsed


def command_calls(admin) -> dict[str, int]:
    stats = admin.info('commandstats')
    return {k[len('cmdstat_'):]: v['calls'] for k, v in stats.items()}


def measure_latency(opts, ctx, target, args: tuple, publish: Callable[[int], None]) -> dict:
    """Latency rows from a consumer child process ``target(*args, pipe)``.

    The child sends 'ready', then for each message ``time.monotonic_ns()`` at receipt minus
    the ``time.monotonic_ns()`` stamp ``publish(i)`` put in message ``i``, and stops when the
    parent sends anything. One message at a time, LATENCY_GAP apart, so the consumer is
    blocked again each time."""
    here, there = ctx.Pipe()
    samples = []
    proc = ctx.Process(target=target, args=(*args, there), daemon=True)
    proc.start()
    try:
        if not here.poll(30) or here.recv() != 'ready':
            raise RuntimeError('latency consumer process did not start')
        for i in range(LATENCY_WARMUP + opts.latency_messages):
            time.sleep(LATENCY_GAP)
            publish(i)
            if not here.poll(DRAIN_TIMEOUT):
                raise RuntimeError(f'latency message {i} not received in {DRAIN_TIMEOUT}s')
            delta = here.recv()
            if i >= LATENCY_WARMUP:
                samples.append(delta / 1000)
    finally:
        stop_child(proc, here)
    cuts = statistics.quantiles(samples, n=100, method='inclusive')
    return {'lat50': cuts[49], 'lat99': cuts[98]}


def stop_child(proc, pipe) -> None:
    try:
        pipe.send('stop')
    except OSError:
        pass
    proc.join(5)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


def ignore_sigint() -> None:
    """In a child: Ctrl-C goes to the whole foreground group; the parent stops us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
