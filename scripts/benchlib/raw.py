"""The raw redis-py ceilings: the least this client and server can do per message.

No Kombu, no script: what any transport built on redis-py and Redis Streams pays at the
least. Each message is one stream entry whose field ``m`` holds the bytes a Kombu virtual
transport stores for a BODY_SIZE body (the envelope: body, headers, properties), made once,
so neither JSON encoding nor decoding is counted here: that is Kombu's part (``memory://``).

* publish: one XADD per message, one round trip each.
* consume+ack prefetch k (k = 1, 100): one round trip per k messages, a pipeline of
  [XACK, XDEL] of the entries read before (none the first time) and XREADGROUP COUNT k:
  the acks ride with the next read, as kombu-streams' read script does.
* latency: a consumer process blocked in that same pipeline (XREADGROUP BLOCK); the
  producer XADDs one stamped entry at a time, as the Kombu latency workload does.

The script floor (subject ``floor``): the same client and commands, each message's work in
one EVALSHA of the least script a design with a Lua script per broker operation can run, as
kombu-streams' design has (README: one script call per publish, per read with its acks): a
publish sets the queue's wake-up marker (ZADD) and appends (XADD); a consume+ack round trip
acks and deletes the entries read before (XACK, XDEL) and reads (XREADGROUP COUNT k), in
one script. No Kombu, no priorities, no leases: what remains above it in kombu-streams is
its scripts' own logic and its Python.
"""

from __future__ import annotations

import multiprocessing
import time
from functools import lru_cache

import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.utils.json import dumps

from .common import ignore_sigint, make_body, measure_latency, unique

GROUP = 'bench'
CONSUMER = 'c'
FILL_CHUNK = 500     # XADDs per pipeline when filling a stream before a consume run


@lru_cache(maxsize=1)
def envelope() -> bytes:
    """The bytes Kombu's virtual transports (Kombu's redis://, kombu-streams) store for one
    message with a BODY_SIZE JSON body: the message as ``memory://`` holds it, as JSON."""
    name = unique('envelope')
    with Connection('memory://') as conn:
        channel = conn.channel()
        queue = Queue(name, Exchange('bench', 'direct'), routing_key=name)
        queue(channel).declare()
        Producer(channel, queue.exchange, serializer='json').publish(
            make_body(0), routing_key=name, retry=False)
        message = channel._get(name)
        queue(channel).delete()
    return dumps(message).encode()


def client_for(subject) -> redis.Redis:
    return redis.Redis.from_url(subject.url)


def fill(client: redis.Redis, key: str, n: int) -> None:
    """A stream of ``n`` entries with the group at its start (not timed)."""
    client.xgroup_create(key, GROUP, id='0', mkstream=True)
    payload = envelope()
    for start in range(0, n, FILL_CHUNK):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(FILL_CHUNK, n - start)):
            pipe.xadd(key, {'m': payload})
        pipe.execute()


def entry_ids(reply) -> list:
    """The ids of an XREADGROUP reply (RESP2 list or RESP3 dict; None when it timed out)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (s[1] for s in reply)
    return [entry[0] for entries in streams for entry in entries]


def read_round(pipe, key: str, acked: list, count: int, block: int | None = None):
    """One round trip: ack and delete ``acked``, read up to ``count`` new entries."""
    if acked:
        pipe.xack(key, GROUP, *acked)
        pipe.xdel(key, *acked)
    pipe.xreadgroup(GROUP, CONSUMER, {key: '>'}, count=count, block=block)
    return pipe.execute()[-1]


def timed_publish(subject, opts, prefix: str, sender) -> dict:
    """Publish ``opts.messages`` envelopes one round trip each with ``sender(client, key)``'s
    function (given the payload), timed; the stream must then hold them all."""
    n, key, payload = opts.messages, unique(prefix), envelope()
    client = client_for(subject)
    try:
        send = sender(client, key)
        start = time.perf_counter()
        for _ in range(n):
            send(payload)
        elapsed = time.perf_counter() - start
        if client.xlen(key) != n:
            raise RuntimeError(f'stream holds {client.xlen(key)} entries, expected {n}')
    finally:
        client.delete(key, key + ':wake')
        client.close()
    return {'publish': n / elapsed}


def timed_consume(subject, opts, prefix: str, count: int, rounds) -> dict:
    """Drain a filled stream ``count`` at a time, timed: ``rounds(client, key)`` gives the
    function of one round trip, which acks and deletes the ids it is given and reads up to
    ``count`` more (count 0: only acks); nothing may be left or pending after."""
    n, key = opts.messages, unique(prefix)
    client = client_for(subject)
    try:
        fill(client, key, n)
        round_trip = rounds(client, key)
        got, ids = 0, []
        start = time.perf_counter()
        while got < n:
            ids = round_trip(ids, count)
            if not ids:
                raise RuntimeError(f'{prefix} consumer found nothing after {got}/{n} entries')
            got += len(ids)
        round_trip(ids, 0)
        elapsed = time.perf_counter() - start
        left, pending = client.xlen(key), client.xpending(key, GROUP)['pending']
        if got != n or left or pending:
            raise RuntimeError(f'{prefix} consume: {got} read, {left} left, {pending} '
                               f'pending of {n}')
    finally:
        client.delete(key)
        client.close()
    return {f'consume{count}': n / elapsed}


def r_publish(subject, opts, admin):
    return timed_publish(subject, opts, 'bench:raw',
                         lambda client, key: lambda payload: client.xadd(key, {'m': payload}))


def raw_rounds(client: redis.Redis, key: str):
    """One round trip of raw commands: [XACK, XDEL] of the ids before, XREADGROUP."""
    pipe = client.pipeline(transaction=False)

    def round_trip(ids: list, count: int) -> list:
        if not count:
            pipe.xack(key, GROUP, *ids)
            pipe.xdel(key, *ids)
            pipe.execute()
            return []
        return entry_ids(read_round(pipe, key, ids, count))

    return round_trip


def r_consume(subject, opts, admin, count: int):
    return timed_consume(subject, opts, 'bench:raw', count, raw_rounds)


def r_consume1(subject, opts, admin):
    return r_consume(subject, opts, admin, 1)


def r_consume100(subject, opts, admin):
    return r_consume(subject, opts, admin, 100)


def raw_latency_consumer(url: str, key: str, pipe) -> None:
    """Child process: blocked in [XACK, XDEL, XREADGROUP BLOCK] until an entry comes; sends
    time.monotonic_ns() - its stamp. Stops when the parent sends anything."""
    ignore_sigint()
    client = redis.Redis.from_url(url)
    rpipe = client.pipeline(transaction=False)
    ids: list = []
    pipe.send('ready')
    while not pipe.poll():
        reply = read_round(rpipe, key, ids, 1, block=200)
        now = time.monotonic_ns()
        ids = []
        streams = reply.values() if isinstance(reply, dict) else [s[1] for s in reply or ()]
        for entries in streams:
            for entry_id, fields in entries:
                ids.append(entry_id)
                pipe.send(now - int(fields[b't']))
    client.close()


def r_latency(subject, opts, admin):
    key, payload = unique('bench:raw'), envelope()
    client = client_for(subject)
    try:
        client.xgroup_create(key, GROUP, id='$', mkstream=True)

        def publish(i):
            client.xadd(key, {'m': payload, 't': str(time.monotonic_ns())})

        return measure_latency(opts, multiprocessing.get_context('spawn'),
                               raw_latency_consumer, (subject.url, key), publish)
    finally:
        client.delete(key)
        client.close()


#: The script floor's scripts (see the top): KEYS[1] the stream; a publish's KEYS[2] the
#: marker; a read's ARGV: group, consumer, COUNT (0: only the acks), the ids to ack.
FLOOR_PUBLISH = ("redis.call('ZADD', KEYS[2], 0, 'w') "
                 "return redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])")
FLOOR_READ = ("if #ARGV > 3 then "
              "redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 4)) "
              "redis.call('XDEL', KEYS[1], unpack(ARGV, 4)) end "
              "if ARGV[3] == '0' then return false end "
              "return redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], "
              "'STREAMS', KEYS[1], '>')")


def floor_sender(client: redis.Redis, key: str):
    sha, mark, evalsha = client.script_load(FLOOR_PUBLISH), key + ':wake', client.evalsha
    return lambda payload: evalsha(sha, 2, key, mark, payload)


def f_publish(subject, opts, admin):
    return timed_publish(subject, opts, 'bench:floor', floor_sender)


def floor_rounds(client: redis.Redis, key: str):
    """One round trip: the same three commands in one EVALSHA."""
    sha, evalsha = client.script_load(FLOOR_READ), client.evalsha
    return lambda ids, count: entry_ids(evalsha(sha, 1, key, GROUP, CONSUMER, count, *ids))


def f_consume1(subject, opts, admin):
    return timed_consume(subject, opts, 'bench:floor', 1, floor_rounds)


def f_consume100(subject, opts, admin):
    return timed_consume(subject, opts, 'bench:floor', 100, floor_rounds)


#: Workload name (as in --only) -> the raw function measuring the same rows.
RAW_WORKLOADS = {'publish': r_publish, 'consume1': r_consume1, 'consume100': r_consume100,
                 'latency': r_latency}
#: The script floor's (no latency: a script cannot block).
FLOOR_WORKLOADS = {'publish': f_publish, 'consume1': f_consume1, 'consume100': f_consume100}
