"""The Kombu workloads: each takes (subject, opts, admin) and returns {row key: value}.

The same functions run on every Kombu transport measured: the two Redis ones and, for
publish and consume+ack, ``memory://`` (Kombu's own cost alone). ``admin`` is a direct
redis-py client of the bench's Redis server (INFO, MEMORY USAGE)."""

from __future__ import annotations

import multiprocessing
import socket
import sys
import time

from kombu import Connection, Consumer, Exchange, Queue

import kombu_streams  # noqa: F401  (registers redis-streams://, also in spawned consumers)

from .common import (
    SendCounter,
    batch_supported,
    check_size,
    command_calls,
    drain,
    ignore_sigint,
    make_body,
    measure_latency,
    publish_all,
    session,
)

SCALE_LEVELS = 10                 # priority levels per queue in the scale rows


def w_publish(subject, opts, admin, batch=False):
    key = 'batch' if batch else 'publish'
    bodies = [make_body(i) for i in range(opts.messages)]
    with session(subject.url) as s:
        if batch and not batch_supported(s):
            return {key: None}
        start = time.perf_counter()
        publish_all(s, bodies, batch)
        elapsed = time.perf_counter() - start
        check_size(s, opts.messages)
    return {key: opts.messages / elapsed}


def w_batch(subject, opts, admin):
    return w_publish(subject, opts, admin, batch=True)


def w_consume(subject, opts, admin, prefetch):
    with session(subject.url) as s:
        publish_all(s, [make_body(i) for i in range(opts.messages)], batch_supported(s))
        elapsed = drain(s, opts.messages, prefetch)
        check_size(s, 0)
    return {f'consume{prefetch}': opts.messages / elapsed}


def w_consume1(subject, opts, admin):
    return w_consume(subject, opts, admin, 1)


def w_consume100(subject, opts, admin):
    return w_consume(subject, opts, admin, 100)


def w_scale(subject, opts, admin, nqueues):
    """Publish, then consume+ack (prefetch 100), spread over ``nqueues`` queues x 10 levels."""
    n = opts.scale_messages
    options = {'priority_steps': list(range(SCALE_LEVELS))}
    with session(subject.url, nqueues, options) as s:
        work = [(make_body(i), s.names[i % nqueues], (i // nqueues) % SCALE_LEVELS)
                for i in range(n)]
        publish = s.producer.publish
        start = time.perf_counter()
        for body, key, priority in work:
            publish(body, routing_key=key, priority=priority, retry=False)
        published = time.perf_counter() - start
        check_size(s, n)
        consumed = drain(s, n, 100)
        check_size(s, 0)
    return {f'pub{nqueues}q': n / published, f'con{nqueues}q': n / consumed}


def w_scale10(subject, opts, admin):
    return w_scale(subject, opts, admin, 10)


def w_scale100(subject, opts, admin):
    return w_scale(subject, opts, admin, 100)


def latency_consumer(url, name, pipe):
    """Child process: report time.monotonic_ns() - body['t'] for each message received.

    Stops when the parent sends anything, or goes away (then poll() sees EOF)."""
    ignore_sigint()
    with Connection(url) as conn:
        queue = Queue(name, Exchange('bench', 'direct'), routing_key=name)

        def on_message(body, message):
            delta = time.monotonic_ns() - int(body['t'])
            message.ack()
            pipe.send(delta)

        with Consumer(conn.channel(), [queue], callbacks=[on_message], accept=['json'],
                      prefetch_count=1):
            pipe.send('ready')
            while not pipe.poll():
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    pass


def w_latency(subject, opts, admin):
    with session(subject.url) as s:
        def publish(i):
            body = make_body(i)
            body['t'] = f'{time.monotonic_ns():020d}'  # last: the body's making not counted
            s.producer.publish(body, routing_key=s.name, retry=False)

        return measure_latency(opts, multiprocessing.get_context('spawn'), latency_consumer,
                               (subject.url, s.name), publish)


def counted(admin, opts, what: str, n: int, work) -> tuple[dict[str, int], int]:
    """Run ``work()``; return the Redis commands it caused (by name) and the client's sends.
    With --commandstats, print them per message."""
    before, sends = command_calls(admin), SendCounter.count
    work()
    sends = SendCounter.count - sends
    after = command_calls(admin)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if k != 'info'}
    if opts.commandstats:
        print(f'  commands/msg {what}: ' + ', '.join(
            f'{k} {v / n:.2f}' for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v),
            file=sys.stderr)
    return delta, sends


def w_commands(subject, opts, admin):
    n = opts.messages
    bodies = [make_body(i) for i in range(n)]
    scheme = subject.url.split(':', 1)[0]
    with session(subject.url) as s:
        delta, sends = counted(admin, opts, scheme, n,
                               lambda: (publish_all(s, bodies), drain(s, n, 100)))
        publish_all(s, bodies)
        delta1, sends1 = counted(admin, opts, f'{scheme}, consume+ack p1', n,
                                 lambda: drain(s, n, 1))
    scripts = sum(delta.get(k, 0) for k in ('eval', 'evalsha', 'eval_ro', 'evalsha_ro'))
    return {'cmds': sum(delta.values()) / n, 'scripts': scripts / n, 'trips': sends / n,
            'cmds1': sum(delta1.values()) / n, 'trips1': sends1 / n}


def w_memory(subject, opts, admin):
    n = opts.messages
    bodies = [make_body(i) for i in range(n)]
    with session(subject.url) as s:
        keys_before = sum(admin.memory_usage(k, samples=0) or 0 for k in admin.scan_iter())
        before = admin.info('memory')['used_memory']
        publish_all(s, bodies)
        after = admin.info('memory')['used_memory']
        keys_after = sum(admin.memory_usage(k, samples=0) or 0 for k in admin.scan_iter())
        check_size(s, n)
    return {'mem': (after - before) / n, 'keymem': (keys_after - keys_before) / n}
