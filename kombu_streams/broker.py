"""Broker operations on one Redis database: one method per Lua script.

This is the only place that lays out each script's KEYS and ARGV, so the channel, the
tests and operator tools call the scripts the same way. Every method that takes entries
of a queue makes one script call per queue, so each call touches one hash slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .keys import Keys
from .scripts import SCRIPTS, Script

#: The consumer that holds requeued and reclaimed messages in a stream's PEL until they are
#: read again (so they keep their id, priority and delivery count).
HOLDER = '~requeued'


class Delivery(NamedTuple):
    """One message handed out by read.lua."""

    queue: str
    level: int
    stream: str
    entry_id: bytes
    deliveries: int
    payload: bytes


class Broker:
    """Script calls for queues laid out by ``keys`` with priority ``levels``."""

    def __init__(self, client: Any, keys: Keys, levels: Sequence[int]) -> None:
        self.client = client
        self.keys = keys
        self.levels = list(levels)

    def streams(self, queue: str) -> list[str]:
        return self.keys.streams(queue, self.levels)

    def _entry_args(self, queue: str, entries: Iterable[tuple[str, Any]]
                    ) -> tuple[list[str], list[Any]]:
        """(streams, [k, id, k, id, ...]) for entries given as (stream key, id)."""
        streams: list[str] = []
        pairs: list[Any] = []
        for stream, entry_id in entries:
            if stream not in streams:
                streams.append(stream)
            pairs += [streams.index(stream) + 1, entry_id]
        return streams, pairs

    # -- publishing ----------------------------------------------------------------------

    def publish_call(self, queue: str, level: int, payload: str | bytes, routed: bool = False
                     ) -> tuple[Script, list[str], list[Any]]:
        """The publish call as (script, KEYS, ARGV), for pipelines. ``routed``: only if the
        queue exists (a copy routed by an exchange must not recreate a deleted queue)."""
        keys = [self.keys.stream(queue, level), self.keys.wake(queue),
                self.keys.stream(queue, self.levels[0])]
        return SCRIPTS['publish'], keys, [payload, '1' if routed else '0']

    def publish(self, queue: str, level: int, payload: str | bytes, routed: bool = False
                ) -> bytes | None:
        script, keys, args = self.publish_call(queue, level, payload, routed)
        return script(self.client, keys, args)

    # -- queues ----------------------------------------------------------------------------

    def declare(self, queue: str) -> int:
        return SCRIPTS['declare'](self.client, self.streams(queue), [queue])

    def exists(self, queue: str) -> bool:
        return bool(self.client.exists(*self.streams(queue)))

    def size(self, queue: str) -> int:
        return int(SCRIPTS['size'](self.client, self.streams(queue), [queue, HOLDER]))

    def purge(self, queue: str, batch: int = 1000) -> int:
        """Delete all ready messages, in calls of at most ``batch`` entries per stream."""
        total, more = 0, 1
        while more:
            purged, more = SCRIPTS['purge'](self.client, self.streams(queue),
                                            [queue, HOLDER, batch])
            total += int(purged)
        return total

    def delete(self, queue: str) -> int:
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.dlq(queue)]
        return SCRIPTS['delete'](self.client, keys)

    def touch(self, queue: str, ttl_ms: int) -> int:
        """Keep an expiring queue's keys alive for another ``ttl_ms``."""
        return SCRIPTS['touch'](self.client, self.streams(queue) + [self.keys.wake(queue)],
                                [int(ttl_ms)])

    # -- routing tables --------------------------------------------------------------------

    def bind(self, exchange: str, member: str, ttl_ms: int = 0) -> int:
        """Add or refresh a binding; ``ttl_ms`` > 0 for an expiring queue, -1 removes it."""
        keys = [self.keys.bindings(exchange), self.keys.deadlines(exchange)]
        return SCRIPTS['bind'](self.client, keys, [member, int(ttl_ms)])

    def route(self, exchange: str, sweep: int = 100) -> list[bytes]:
        """The routing table's members, after dropping up to ``sweep`` expired bindings."""
        keys = [self.keys.bindings(exchange), self.keys.deadlines(exchange)]
        return SCRIPTS['route'](self.client, keys, [sweep])

    # -- consuming -------------------------------------------------------------------------

    def read(self, queues: Sequence[str], consumer: str, count: int,
             max_deliveries: int = 0) -> list[Delivery]:
        """Deliver up to ``count`` messages across ``queues``, highest priority first."""
        nq, levels = len(queues), self.levels
        streams = [self.keys.stream(q, level) for level in levels for q in queues]
        args: list[Any] = [consumer, count, len(streams), HOLDER, max_deliveries]
        for i in range(len(streams)):
            args += [queues[i % nq], i % nq + 1]
        keys = streams + [k for q in queues for k in (self.keys.wake(q), self.keys.dlq(q))]
        reply = SCRIPTS['read'](self.client, keys, args)
        out = []
        for j in range(0, len(reply), 4):
            index, entry_id, deliveries, payload = reply[j:j + 4]
            i = int(index) - 1
            out.append(Delivery(queues[i % nq], levels[i // nq], streams[i], entry_id,
                                int(deliveries), payload))
        return out

    def ack(self, queue: str, entries: Iterable[tuple[str, Any]]) -> int:
        """Acknowledge and delete entries, given as (stream key, id)."""
        streams, pairs = self._entry_args(queue, entries)
        if not pairs:
            return 0
        return SCRIPTS['ack'](self.client, streams, [queue, *pairs])

    def requeue(self, queue: str, entries: Iterable[tuple[Any, ...]]) -> int:
        """Give delivered entries back; they are served first in their level.

        Entries are (stream key, id) or (stream key, id, delivery count to keep).
        """
        streams: list[str] = []
        args: list[Any] = []
        for stream, entry_id, *count in entries:
            if stream not in streams:
                streams.append(stream)
            args += [streams.index(stream) + 1, entry_id, count[0] if count else -1]
        if not args:
            return 0
        return SCRIPTS['requeue'](self.client, streams + [self.keys.wake(queue)],
                                  [queue, HOLDER, *args])

    def renew(self, queue: str, consumer: str, entries: Iterable[tuple[str, Any]]
              ) -> list[tuple[str, bytes]]:
        """Extend leases this consumer still holds; returns the (stream, id) it lost."""
        streams, pairs = self._entry_args(queue, entries)
        if not pairs:
            return []
        lost = SCRIPTS['renew'](self.client, streams, [queue, consumer, *pairs])
        return [(streams[int(lost[j]) - 1], lost[j + 1]) for j in range(0, len(lost), 2)]

    def reclaim(self, queue: str, min_idle_ms: int, batch: int,
                cursors: Sequence[str] | None = None, consumer_expiry_ms: int = 0
                ) -> tuple[int, list[str]]:
        """Move messages whose lease ran out back to the queue; returns (count, cursors)."""
        streams = self.streams(queue)
        cursors = list(cursors) if cursors else ['-'] * len(streams)
        reply = SCRIPTS['reclaim'](
            self.client, streams + [self.keys.wake(queue)],
            [queue, HOLDER, int(min_idle_ms), batch, *cursors, int(consumer_expiry_ms)])
        return int(reply[0]), [c.decode() if isinstance(c, bytes) else c for c in reply[1:]]

    # -- dead letters ------------------------------------------------------------------------

    def dead_letter(self, queue: str, stream: str, entry_id: Any, reason: str,
                    deliveries: int) -> int:
        return SCRIPTS['deadletter'](self.client, [stream, self.keys.dlq(queue)],
                                     [queue, entry_id, reason, deliveries])

    def redrive(self, queue: str, count: int, ids: Sequence[Any] = ()) -> tuple[int, int]:
        """Move up to ``count`` dead letters (or just ``ids``) back; returns (moved, skipped)."""
        keys = [self.keys.dlq(queue), *self.streams(queue), self.keys.wake(queue)]
        moved, skipped = SCRIPTS['redrive'](self.client, keys, [count, *ids])
        return int(moved), int(skipped)
