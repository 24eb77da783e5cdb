"""Helpers the test modules share (``from helpers import ...``, as with conftest).

* ``read_messages(broker, queues, consumer, count, ...)`` -- one read.lua call, as the
  transport lays it out (``Broker.read_call``), returning its deliveries
* ``snapshot(client)`` / ``assert_same(before, after)`` -- every key of the database (type,
  value, expiry) and the check that nothing changed between two snapshots
* ``count_reads(monkeypatch, channel)`` -- the credit of every read a channel makes on its
  own from now on
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kombu_streams.broker import READ, WALK, Broker, Delivery

#: ms idle of a pending entry whose lease is about to run out (set with XCLAIM IDLE);
#: snapshots tell such entries apart, since renewing them changes nothing else
STALE = 1_000_000


def read_messages(broker: Broker, queues: Sequence[str], consumer: str, count: int,
                  max_deliveries: int = 0, fanout: dict[str, Iterable[str]] | None = None,
                  ttls: dict[str, int] | None = None, walk: bool = False,
                  hints: dict[tuple[str, str | None], int] | None = None,
                  acks: Sequence[tuple[Any, ...]] = ()) -> list[Delivery]:
    """Deliver up to ``count`` messages across ``queues``, highest priority first.

    ``fanout`` maps a queue to the fanout exchanges it is bound to: their streams are read
    (through the queue's group) before the queue's own. ``ttls`` gives the x-expires of
    expiring queues, for their markers. ``walk``: look at every stream, not only those the
    queues' ready indexes name, and rebuild the indexes (a repair). ``hints``: per source,
    the size read.lua expects of its entries, as a channel learns it (unknown: the first
    batch of a stream is one entry). ``acks``: acks that ride along, (stream, entry id[,
    trusted[, x-unique-key]]) each, as a channel's next read carries them.
    """
    sources = broker.sources(queues, fanout)
    mode = WALK if walk else READ
    call, parse = broker.read_call(sources, consumer, count, max_deliveries, ttls,
                                   {src: mode for src in sources}, acks, hints=hints)
    return parse(broker.run(call)).deliveries


def snapshot(c: Any) -> dict[bytes, tuple[str, Any, int]]:
    """Every key of the database: (type, value, ms to live). Of a stream, everything a
    script could change; of its entries' idle times only whether an entry has been idle
    for STALE (renew resets that). Three pipelined round trips, however many keys."""
    keys = sorted(c.scan_iter(count=1000))
    with c.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
            pipe.pttl(key)
        got = pipe.execute()
    kinds = {key: got[2 * i].decode() for i, key in enumerate(keys)}
    reads = {'string': lambda p, k: p.get(k), 'list': lambda p, k: p.lrange(k, 0, -1),
             'set': lambda p, k: p.smembers(k),
             'zset': lambda p, k: p.zrange(k, 0, -1, withscores=True),
             'hash': lambda p, k: p.hgetall(k),
             'stream': lambda p, k: p.xrange(k).xinfo_stream(k).xinfo_groups(k)}
    with c.pipeline(transaction=False) as pipe:
        for key in keys:
            reads[kinds[key]](pipe, key)
        values = iter(pipe.execute())
    read: dict[bytes, Any] = {}
    streams: dict[bytes, tuple[Any, Any, Any]] = {}
    for key in keys:
        kind = kinds[key]
        if kind == 'stream':
            streams[key] = (next(values), next(values), next(values))
        else:
            value = next(values)
            read[key] = (sorted(value) if kind == 'set' else
                         sorted(value.items()) if kind == 'hash' else value)
    with c.pipeline(transaction=False) as pipe:
        for key, (_, _, groups) in streams.items():
            for g in groups:
                pipe.xinfo_consumers(key, g['name'])
                pipe.xpending_range(key, g['name'], '-', '+', 10_000)
        more = iter(pipe.execute())
    for key, (entries, info, groups) in streams.items():
        described = []
        for g in groups:
            consumers = sorted((x['name'], x['pending']) for x in next(more))
            pending = [(p['message_id'], p['consumer'], p['times_delivered'],
                        p['time_since_delivered'] >= STALE // 2) for p in next(more)]
            described.append((g['name'], g['last-delivered-id'], g['pending'], consumers,
                              pending))
        read[key] = (entries, info['length'], info['last-generated-id'], sorted(described))
    return {key: (kinds[key], read[key], got[2 * i + 1]) for i, key in enumerate(keys)}


def assert_same(before: dict[bytes, Any], after: dict[bytes, Any]) -> None:
    """Nothing changed between two snapshots: the same keys, types and values, and the
    same expiry give or take the time that passed (a script would set another one)."""
    assert sorted(after) == sorted(before), 'keys created or deleted'
    for key, (kind, value, ttl) in before.items():
        assert after[key][:2] == (kind, value), f'{key!r} changed'
        later = after[key][2]
        if ttl < 0 or later < 0:
            assert later == ttl, f'expiry of {key!r} changed'
        else:  # time passes between the snapshots; a script would set another ttl
            assert 0 <= ttl - later < 30_000, f'expiry of {key!r} changed'


def message_count(conn: Any, queue: str) -> int:
    """A queue's ready count as Kombu asks for it (a passive declare)."""
    return conn.default_channel.queue_declare(queue, passive=True).message_count


def server_ms(c: Any) -> int:
    """The server's clock (TIME) in unix ms."""
    sec, usec = c.time()
    return int(sec) * 1000 + int(usec) // 1000


class FakeClock:
    """fakeredis's clock (TIME, hence every deadline and due time), driven by a test or a
    model; ms, whole. Installed by the ``fake_clock`` fixture of conftest.py, or by
    :func:`install_clock`."""

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms

    def time(self) -> float:
        return self.ms / 1000.0


def install_clock(clock: FakeClock) -> Callable[[], None]:
    """Drive fakeredis's clocks from ``clock``: TIME, and the time each command runs at,
    which key expiry (PX, PEXPIRE) is measured against. With TIME alone, a key set to
    expire after 250 ms of the test's time expired after 250 ms of real time: on a loaded
    machine, between two steps of a model (the rate limiter's state, a flake seen in CI).
    Blocking commands' timeouts follow it too, so none may be used under it. Returns what
    puts the real clocks back."""
    from fakeredis.commands_mixins import server_mixin
    try:
        from fakeredis._socket import _base as socket_base
    except ImportError:  # fakeredis before 2.30 kept it here
        from fakeredis import _basefakesocket as socket_base  # type: ignore[no-redef]
    real = server_mixin.time, socket_base.time
    server_mixin.time = clock  # type: ignore[assignment]
    socket_base.time = clock  # type: ignore[assignment]

    def restore() -> None:
        server_mixin.time, socket_base.time = real  # type: ignore[assignment]
    return restore


def count_reads(monkeypatch: Any, channel: Any) -> list[int]:
    """Patch ``channel``'s own read (not one a wait carries): each call appends the credit
    it was given."""
    credits: list[int] = []
    real = channel._read

    def read(queues: Any, credit: int, planned: bool = True) -> Any:
        credits.append(credit)
        return real(queues, credit, planned)

    monkeypatch.setattr(channel, '_read', read)
    return credits
