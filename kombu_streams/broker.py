"""Broker operations on one Redis database: one method per Lua script.

This is the only place that lays out each script's KEYS and ARGV, so the channel, the
tests and operator tools call the scripts the same way. Every method that takes entries
of a queue makes one script call per queue, so each call touches one hash slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from redis.crc import key_slot

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
    #: the fanout exchange it came through, or None for the queue's own streams
    exchange: str | None = None


class Broker:
    """Script calls for queues laid out by ``keys`` with priority ``levels``."""

    def __init__(self, client: Any, keys: Keys, levels: Sequence[int]) -> None:
        self.client = client
        self.keys = keys
        self.levels = list(levels)

    def streams(self, queue: str) -> list[str]:
        return self.keys.streams(queue, self.levels)

    def wake(self, queue: str, exchange: str | None = None) -> str:
        """The wake marker of a queue, or of its group on a fanout exchange."""
        return self.keys.fanout_wake(exchange, queue) if exchange else self.keys.wake(queue)

    @staticmethod
    def _entry_args(entries: Iterable[tuple[Any, ...]]) -> tuple[list[str], list[Any]]:
        """(streams, [k, id, *extra, k, id, *extra, ...]) for entries given as
        (stream key, id, *extra): the KEYS and ARGV layout the entry scripts share."""
        streams: list[str] = []
        flat: list[Any] = []
        for stream, entry_id, *extra in entries:
            if stream not in streams:
                streams.append(stream)
            flat += [streams.index(stream) + 1, entry_id, *extra]
        return streams, flat

    # -- publishing ----------------------------------------------------------------------

    def publish_call(self, queue: str, level: int, payload: str | bytes, routed: bool = False
                     ) -> tuple[Script, list[str], list[Any]]:
        """The publish call as (script, KEYS, ARGV), for pipelines. ``routed``: only if the
        queue exists (a copy routed by an exchange must not recreate a deleted queue)."""
        keys = [self.keys.stream(queue, level), self.keys.wake(queue),
                self.keys.stream(queue, self.levels[0]), self.keys.ready(queue)]
        return SCRIPTS['publish'], keys, [payload, '1' if routed else '0']

    def publish(self, queue: str, level: int, payload: str | bytes, routed: bool = False
                ) -> bytes | None:
        script, keys, args = self.publish_call(queue, level, payload, routed)
        return script(self.client, keys, args)

    def fanout_publish_call(self, exchange: str, payload: str | bytes,
                            bindings: Sequence[tuple[str, str]]
                            ) -> tuple[Script, list[str], list[Any]]:
        """Publish once to a fanout exchange; ``bindings`` are (queue, binding member)."""
        keys = [self.keys.fanout(exchange), self.keys.deadlines(exchange)]
        keys += [self.keys.fanout_wake(exchange, q) for q, _ in bindings]
        return SCRIPTS['fanout_publish'], keys, [payload, *(m for _, m in bindings)]

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
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.ready(queue),
                                      self.keys.dlq(queue)]
        return SCRIPTS['delete'](self.client, keys)

    def touch(self, queue: str, ttl_ms: int) -> int:
        """Keep an expiring queue's keys alive for another ``ttl_ms``."""
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.ready(queue)]
        return SCRIPTS['touch'](self.client, keys, [int(ttl_ms)])

    # -- routing tables --------------------------------------------------------------------

    def bind(self, exchange: str, member: str, ttl_ms: int = 0,
             fanout_group: str | None = None) -> int:
        """Add or refresh a binding; ``ttl_ms`` > 0 for an expiring queue, -1 removes it.
        On a fanout exchange, ``fanout_group`` (the queue) gets or loses its group."""
        keys = [self.keys.bindings(exchange), self.keys.deadlines(exchange)]
        args: list[Any] = [member, int(ttl_ms)]
        if fanout_group is not None:
            keys.append(self.keys.fanout(exchange))
            args.append(fanout_group)
        return SCRIPTS['bind'](self.client, keys, args)

    def route(self, exchange: str, sweep: int = 100, fanout_sep: str | None = None
              ) -> list[bytes]:
        """The routing table's members, after dropping up to ``sweep`` expired bindings (and,
        on a fanout exchange, given its member separator, their groups)."""
        keys = [self.keys.bindings(exchange), self.keys.deadlines(exchange)]
        args: list[Any] = [sweep]
        if fanout_sep is not None:
            keys.append(self.keys.fanout(exchange))
            args.append(fanout_sep)
        return SCRIPTS['route'](self.client, keys, args)

    # -- consuming -------------------------------------------------------------------------

    def read(self, queues: Sequence[str], consumer: str, count: int,
             max_deliveries: int = 0, fanout: dict[str, Iterable[str]] | None = None,
             ttls: dict[str, int] | None = None, walk: bool = False) -> list[Delivery]:
        """Deliver up to ``count`` messages across ``queues``, highest priority first.

        ``fanout`` maps a queue to the fanout exchanges it is bound to: their streams are
        read (through the queue's group) before the queue's own. ``ttls`` gives the x-expires
        of expiring queues, for their markers. ``walk``: look at every stream, not only those
        the queues' ready indexes name, and rebuild the indexes (a repair, now and then).
        """
        call, parse = self.read_call(queues, consumer, count, max_deliveries, fanout, ttls,
                                     walk)
        script, keys, args = call
        return parse(script(self.client, keys, args))

    def read_call(self, queues: Sequence[str], consumer: str, count: int,
                  max_deliveries: int = 0, fanout: dict[str, Iterable[str]] | None = None,
                  ttls: dict[str, int] | None = None, walk: bool = False
                  ) -> tuple[tuple[Script, list[str], list[Any]],
                             Callable[[list[Any]], list[Delivery]]]:
        """The read call as (script, KEYS, ARGV), and the function that decodes its reply."""
        return self.sources_call(self.sources(queues, fanout), consumer, count,
                                 max_deliveries, ttls, walk)

    @staticmethod
    def sources(queues: Sequence[str], fanout: Mapping[str, Iterable[str]] | None = None
                ) -> list[tuple[str, str | None]]:
        """(queue, fanout exchange or None) for what a read of ``queues`` covers, in serving
        order: the queues' groups on fanout exchanges, then the queues' own streams."""
        fanout = fanout or {}
        out: list[tuple[str, str | None]] = [
            (q, ex) for q in queues for ex in sorted(fanout.get(q, ()))]
        return out + [(q, None) for q in queues]

    def slot_groups(self, sources: Sequence[tuple[str, str | None]]
                    ) -> list[list[tuple[str, str | None]]]:
        """Split sources into groups one read script may cover: all of them on one Redis; on
        Redis Cluster, those whose keys share a hash slot (queue names with a common
        ``{tag}`` share one), in serving order of each group's first source."""
        if not self.keys.cluster:
            return [list(sources)]
        groups: dict[int, list[tuple[str, str | None]]] = {}
        for queue, exchange in sources:
            key = self.keys.fanout(exchange) if exchange else self.keys.stream(queue, 0)
            groups.setdefault(key_slot(key.encode()), []).append((queue, exchange))
        return list(groups.values())

    def sources_call(self, sources: Sequence[tuple[str, str | None]], consumer: str,
                     count: int, max_deliveries: int = 0, ttls: dict[str, int] | None = None,
                     walk: bool = False) -> tuple[tuple[Script, list[str], list[Any]],
                                Callable[[list[Any]], list[Delivery]]]:
        """The read call for explicit ``sources`` (see :meth:`sources`), and its decoder."""
        ttls = ttls or {}
        index = {src: i + 1 for i, src in enumerate(sources)}
        # (stream key, group, source index, shared, level), in the order to serve them
        streams = [(self.keys.fanout(ex), q, index[(q, ex)], '1', self.levels[0])
                   for q, ex in sources if ex]
        own = [q for q, ex in sources if not ex]
        streams += [(self.keys.stream(q, level), q, index[(q, None)], '0', level)
                    for level in self.levels for q in own]
        keys = [s[0] for s in streams]
        for q, ex in sources:
            if ex:  # no ready index for a group on a fanout stream: any key of its slot
                keys += [self.wake(q, ex), self.keys.fanout_dlq(ex, q), self.wake(q, ex)]
            else:
                keys += [self.keys.wake(q), self.keys.dlq(q), self.keys.ready(q)]
        args: list[Any] = [consumer, count, len(streams), HOLDER, max_deliveries, len(sources)]
        args += [ttls.get(q, 0) for q, _ in sources]
        for _, group, src, shared, _ in streams:
            args += [group, src, shared]
        args.append('1' if walk else '0')

        def parse(reply: list[Any]) -> list[Delivery]:
            out = []
            for j in range(0, len(reply), 4):
                i, entry_id, deliveries, payload = reply[j:j + 4]
                key, queue, src, _, level = streams[int(i) - 1]
                out.append(Delivery(queue, level, key, entry_id, int(deliveries), payload,
                                    sources[src - 1][1]))
            return out

        return (SCRIPTS['read'], keys, args), parse

    def ack(self, queue: str, entries: Iterable[tuple[str, Any]],
            exchange: str | None = None) -> int:
        """Acknowledge entries, given as (stream key, id): deleted from the queue's streams;
        on a fanout exchange's stream (``exchange``), trimmed once every group is done."""
        call = self.ack_call(queue, entries, exchange)
        if call is None:
            return 0
        script, keys, args = call
        return script(self.client, keys, args)

    def ack_call(self, queue: str, entries: Iterable[tuple[str, Any]],
                 exchange: str | None = None) -> tuple[Script, list[str], list[Any]] | None:
        """The ack call as (script, KEYS, ARGV), or None when there is nothing to ack."""
        if exchange:
            ids = [entry_id for _, entry_id in entries]
            if not ids:
                return None
            return SCRIPTS['fanout_ack'], [self.keys.fanout(exchange)], [queue, *ids]
        streams, pairs = self._entry_args(entries)
        if not pairs:
            return None
        return SCRIPTS['ack'], streams, [queue, *pairs]

    def requeue(self, queue: str, entries: Iterable[tuple[Any, ...]],
                exchange: str | None = None) -> int:
        """Give delivered entries back; they are served first in their level.

        Entries are (stream key, id) or (stream key, id, delivery count to keep).
        """
        streams, args = self._entry_args(
            (stream, entry_id, count[0] if count else -1) for stream, entry_id, *count in entries)
        if not args:
            return 0
        keys = streams + [self.wake(queue, exchange)]
        if not exchange:
            keys.append(self.keys.ready(queue))
        return SCRIPTS['requeue'](self.client, keys, [queue, HOLDER, *args])

    def renew(self, queue: str, consumer: str, entries: Iterable[tuple[str, Any]]
              ) -> list[tuple[str, bytes]]:
        """Extend leases this consumer still holds; returns the (stream, id) it lost."""
        streams, pairs = self._entry_args(entries)
        if not pairs:
            return []
        lost = SCRIPTS['renew'](self.client, streams, [queue, consumer, *pairs])
        return [(streams[int(lost[j]) - 1], lost[j + 1]) for j in range(0, len(lost), 2)]

    def reclaim(self, queue: str, min_idle_ms: int, batch: int,
                cursors: Sequence[str] | None = None, consumer_expiry_ms: int = 0,
                exchange: str | None = None) -> tuple[int, list[str]]:
        """Move messages whose lease ran out back to the queue (or to its group on a fanout
        ``exchange``); returns (count, cursors)."""
        streams = [self.keys.fanout(exchange)] if exchange else self.streams(queue)
        cursors = list(cursors) if cursors else ['-'] * len(streams)
        keys = streams + [self.wake(queue, exchange)]
        if not exchange:
            keys.append(self.keys.ready(queue))
        reply = SCRIPTS['reclaim'](
            self.client, keys,
            [queue, HOLDER, int(min_idle_ms), batch, *cursors, int(consumer_expiry_ms)])
        return int(reply[0]), [c.decode() if isinstance(c, bytes) else c for c in reply[1:]]

    # -- dead letters ------------------------------------------------------------------------

    def dead_letter(self, queue: str, stream: str, entry_id: Any, reason: str,
                    deliveries: int, exchange: str | None = None) -> int:
        """Set one delivered entry aside; ``exchange``: it sits in that fanout stream."""
        dlq = self.keys.fanout_dlq(exchange, queue) if exchange else self.keys.dlq(queue)
        return SCRIPTS['deadletter'](self.client, [stream, dlq],
                                     [queue, entry_id, reason, deliveries,
                                      '1' if exchange else '0'])

    def redrive(self, queue: str, count: int, ids: Sequence[Any] = ()) -> tuple[int, int]:
        """Move up to ``count`` dead letters (or just ``ids``) back; returns (moved, skipped)."""
        keys = [self.keys.dlq(queue), *self.streams(queue), self.keys.wake(queue),
                self.keys.ready(queue)]
        moved, skipped = SCRIPTS['redrive'](self.client, keys, [count, *ids])
        return int(moved), int(skipped)

    # -- migration from Kombu's Redis transport ---------------------------------------------

    def migrate_list(self, source: str, queue: str, list_level: int, count: int,
                     skip: int = 0) -> tuple[int, int, int, list[bytes]]:
        """Move up to ``count`` of the oldest messages of Kombu's list ``source`` (full key
        name) into ``queue``, each to its priority's level (``list_level`` when it has none),
        passing over ``skip`` malformed entries at the list's oldest end. Returns (moved,
        kept, list length left, the malformed entries met), see migrate.lua."""
        keys = [*self.streams(queue), self.keys.wake(queue), self.keys.ready(queue)]
        args = [int(count), int(skip), self.levels.index(list_level) + 1, *self.levels]
        moved, kept, left, *malformed = SCRIPTS['migrate'](self.client, [source, *keys], args)
        return int(moved), int(kept), int(left), malformed

    def migrate_unacked(self, unacked: str, unacked_index: str, tag: Any, raw: Any,
                        payload: str | bytes, targets: Sequence[tuple[str, int]]) -> bool:
        """Restore Kombu's unacked message ``tag`` (hash value ``raw`` as read) as
        ``payload`` into each (queue, level) of ``targets``; False when it changed or left
        the hash in the meantime (nothing written)."""
        keys = [unacked, unacked_index]
        for queue, level in targets:
            keys += [self.keys.stream(queue, level), self.keys.wake(queue),
                     self.keys.ready(queue)]
        return bool(SCRIPTS['migrate_unacked'](self.client, keys, [tag, raw, payload]))

    # -- introspection (read-only, for operator tools) -------------------------------------

    @staticmethod
    def _text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def inspect(self, queue: str) -> dict[str, Any]:
        """A read-only snapshot of a queue (inspect.lua): per level its ready, held (requeued
        or reclaimed, part of ready), pending (delivered, unacked) messages, consumers and
        the age of the oldest ready message in ms (None when none is ready); the totals; the
        dead-letter stream's length; ``exists`` (any of its streams exists)."""
        keys = [*self.streams(queue), self.keys.dlq(queue)]
        records, dlq, now = SCRIPTS['inspect'].call_ro(self.client, keys,
                                                       [queue, HOLDER, *self.levels])
        levels: list[dict[str, Any]] = []
        consumers: dict[str, dict[str, Any]] = {}
        for key, rec in zip(keys, records):
            level, exists, length, ready, held, pending, oldest, flat, last = rec
            level_consumers = []
            for j in range(0, len(flat), 3):
                name, owns, idle = self._text(flat[j]), int(flat[j + 1]), int(flat[j + 2])
                level_consumers.append({'name': name, 'pending': owns, 'idle_ms': idle})
                seen = consumers.setdefault(name, {'name': name, 'pending': 0, 'idle_ms': idle})
                seen['pending'] += owns
                seen['idle_ms'] = min(seen['idle_ms'], idle)
            levels.append({
                'level': int(level), 'stream': key, 'exists': bool(exists),
                'length': int(length), 'ready': int(ready), 'held': int(held),
                'pending': int(pending), 'oldest_ready_ms': None if oldest < 0 else int(oldest),
                'last_delivered_id': self._text(last) or None, 'consumers': level_consumers,
            })
        ages = [lv['oldest_ready_ms'] for lv in levels if lv['oldest_ready_ms'] is not None]
        return {
            'queue': queue,
            'exists': any(lv['exists'] for lv in levels),
            'ready': sum(lv['ready'] for lv in levels),
            'held': sum(lv['held'] for lv in levels),
            'pending': sum(lv['pending'] for lv in levels),
            'oldest_ready_ms': max(ages) if ages else None,
            'consumers': sorted(consumers.values(), key=lambda c: c['name']),
            'dlq': int(dlq),
            'levels': levels,
            'time_ms': int(now),
        }

    def inspect_fanout(self, exchange: str, cap: int = 1000) -> dict[str, Any]:
        """A read-only snapshot of a fanout exchange's stream (inspect_fanout.lua): per bound
        queue's group its lag (entries not read yet, counted up to ``cap``; ``lag_capped``
        when there were more and the server could not tell how many), pending (delivered,
        unacked), consumers and the age of its oldest unread entry in ms."""
        exists, length, now, records = SCRIPTS['inspect_fanout'].call_ro(
            self.client, [self.keys.fanout(exchange)], [int(cap)])
        groups = []
        for name, consumers, pending, lag, capped, oldest, last in records:
            groups.append({
                'group': self._text(name), 'consumers': int(consumers),
                'pending': int(pending), 'lag': int(lag), 'lag_capped': bool(capped),
                'oldest_unread_ms': None if oldest < 0 else int(oldest),
                'last_delivered_id': self._text(last),
            })
        return {'exchange': exchange, 'stream': self.keys.fanout(exchange),
                'exists': bool(exists), 'length': int(length),
                'groups': sorted(groups, key=lambda g: g['group']), 'time_ms': int(now)}
