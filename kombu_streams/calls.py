"""How each Lua script is called: one builder per script call, and its reply's decoder.

This is the only place that lays out each script's KEYS and ARGV, so the channel, the
lease keeper, the tests and operator tools call the scripts the same way. A builder
(``*_call``, ``*_calls``) returns the call as a :data:`~kombu_streams.scripts.Call` (with,
where the reply needs decoding, the function that decodes it); nothing here talks to Redis:
:class:`kombu_streams.broker.Broker` runs the calls. Every builder that takes entries of a
queue makes one call per queue, so each call touches one hash slot. The hot path's
builders (read, ack, renew) are in :mod:`kombu_streams.reads`, re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from redis.crc import key_slot

from .keys import LAYOUT, READS_LAYOUTS
from .reads import (
    ANY_OWNER,
    CHUNK,
    GATED,
    HOLDER,
    LAYOUTS_KEPT,
    LOOKUP_CHUNK,
    POPPED,
    READ,
    RENEW_CHUNK,
    WALK,
    ReadCalls,
    ReadLayout,
)
from .replies import Reclaimed
from .scripts import SCRIPTS, Call
from .state import Source
from .text import text

__all__ = ('ANY_OWNER', 'CHUNK', 'GATED', 'HOLDER', 'LOOKUP_CHUNK', 'MARKED_MAX', 'PAGE',
           'PEEK_MAX', 'POPPED', 'READ', 'RENEW_CHUNK', 'ROUTE_PAGE', 'SCHEDULED_MAX',
           'WAKE_MAX', 'WALK', 'Calls', 'Delay', 'PeekCursor', 'ReadLayout')

#: Most delayed messages one scheduled.lua call lists.
SCHEDULED_MAX = 1000
#: Most messages one peek.lua call returns (its own limit, see its header).
PEEK_MAX = 1000
#: Most markers one marked.lua call looks at (its own limit, see its header).
MARKED_MAX = 1000
#: Most dead letters per XRANGE page, redrive call or purge step of the operator methods.
PAGE = 500
#: About how many routing table members one route.lua call returns (an SSCAN COUNT).
ROUTE_PAGE = 1000
#: Most sources per wake.lua call (its own limit, see its header): a few O(1) commands each.
WAKE_MAX = 500

#: Where a peek.lua page starts: (stream index, 'h' held or 'f' fresh part, last id or '').
PeekCursor = tuple[int, str, str]


class Delay(NamedTuple):
    """When a published message is due, as publish.lua takes it."""

    #: '' now, '@<unix ms>' at a time, '+<ms>' after a delay (on the server's clock)
    due: str = ''
    #: a message due sooner than this is published at once
    threshold_ms: int = 1000
    #: a name for operators (Celery's task id)
    label: str = ''


class Calls(ReadCalls):
    """The script calls for queues laid out by ``keys`` with priority ``levels``."""

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

    def layout_call(self, watch: bool = False) -> Call:
        """The layout call: the check at a channel's start (an older layout this release
        reads, READS_LAYOUTS, is recorded as LAYOUT), or the lease keeper's ``watch``."""
        if watch:
            return SCRIPTS['layout'], [self.keys.layout()], [LAYOUT, '1']
        return SCRIPTS['layout'], [self.keys.layout()], [LAYOUT, '0', *READS_LAYOUTS]

    def publish_call(self, queue: str, level: int, payload: str | bytes, routed: bool = False,
                     delay: Delay | None = None, token: str | None = None,
                     expiration: int | None = None, dedup_id: str = '',
                     unique_key: str = '', group: str | None = None) -> Call:
        """The publish call. ``routed``: only if the queue exists (a copy routed by an
        exchange must not recreate a deleted queue). ``delay``: delayed delivery is on
        (messages already due are moved first, so this one never overtakes them), and when
        the message is due (see :class:`Delay`). ``token``: a big message, whose body
        (``payload``, not sent with this call) the same transaction stores in the queue's
        big hash under ``token`` (:meth:`store_big`). ``expiration``: the message's own TTL
        in ms (Kombu's ``expiration`` property), None for none. ``dedup_id``: the message's
        deduplication id (kombu_streams/dedup.py), '' for none. ``unique_key``: the key
        the message holds while it lives (kombu_streams/unique.py), '' for none: ARGV[12]
        after the id, and the queue's key store after its KEYS (before the big hash).
        ``group``: the message's x-group (kombu_streams/fair.py), None for none (a queue
        known to have x-fairness gets '', the default group): ARGV[13], with the key store
        and the staging hash after the KEYS."""
        k = self.keys
        if group is None and queue in self._fair:
            group = ''
        full = (bool(unique_key) or token is not None or queue in self._limited
                or group is not None)
        keys = list(self._publish_keys.get((queue, level, full))
                    or self._lay_out_publish(queue, level, full))
        args: list[Any] = [payload if token is None else f'r:{token}', '1' if routed else '0',
                           len(self.levels), queue, HOLDER, '0' if delay is None else '1',
                           '' if expiration is None else expiration]
        if delay is not None and delay.due:  # due now: no more arguments (the common case)
            args += [delay.due, delay.threshold_ms, delay.label]
        if dedup_id:  # ARGV[11]; ARGV[8..10] '' where there is no due time
            args += [''] * (10 - len(args)) + [dedup_id]
        if unique_key or group is not None:  # ARGV[12], the id '' when there is none;
            args += [''] * (11 - len(args)) + [unique_key]  # its store, KEYS[10+L]
            keys.append(k.unique(queue))
        if group is not None:  # ARGV[13]; the staging hash, KEYS[11+L]
            args.append(group)
            keys.append(k.fair(queue))
        if full:  # the big hash ends the wide layout (and is where a big message's body is)
            keys.append(k.big(queue))
        return SCRIPTS['publish'], keys, args

    def _lay_out_publish(self, queue: str, level: int, full: bool) -> tuple[str, ...]:
        """A publish's KEYS for ``queue`` and ``level`` but the unique store and the big
        hash: laid out once and kept (like a read's, see :meth:`read_layout`), as every
        publish to them sends them. ``full``: all the queue's streams and its counters,
        which only a queue with a length limit (or a message with a unique key) needs;
        else only the first stream, and publish.lua answers NEEDKEYS, having written
        nothing, when it meets a limit (:meth:`widen`)."""
        if len(self._publish_keys) >= LAYOUTS_KEPT:
            self._publish_keys.clear()
            self._limited.clear()  # learnt again: a NEEDKEYS costs one round trip
        k = self.keys
        streams = self.streams(queue) if full else [k.stream(queue, self.levels[0])]
        keys = self._publish_keys[(queue, level, full)] = (
            k.stream(queue, level), k.wake(queue), k.ready(queue), k.args(queue), k.dlq(queue),
            k.delayed(queue), k.delayed_messages(queue), *streams, k.dedup(queue),
            *([k.counters(queue)] if full else []))
        return keys

    def widen(self, call: Call, fair: bool = False) -> Call:
        """The publish ``call`` publish.lua refused with NEEDKEYS (its queue has a length
        limit, which counts every stream, or, ``fair``, x-fairness, whose staging needs a
        group and the staging hash), laid out with all the queue's streams (and with the
        default group '' and the staging hash when ``fair``); its queue's publishes are laid
        out so from now on."""
        script, keys, args = call
        queue = text(args[3])
        self._limited.add(queue)
        if fair:
            self._fair.add(queue)
        k = self.keys
        wide = [*keys[:7], *self.streams(queue), k.dedup(queue), k.counters(queue)]
        args = list(args)
        if queue in self._fair and len(args) < 13:
            args += [''] * (12 - len(args)) + ['']
        if len(args) >= 12:
            wide.append(k.unique(queue))
        if len(args) == 13:
            wide.append(k.fair(queue))
        return script, [*wide, k.big(queue)], args

    def store_big(self, queue: str, token: str, payload: str | bytes) -> tuple[Any, ...]:
        """The command that stores a big message's body, sent with its publish call in one
        MULTI/EXEC (see :meth:`publish_call`)."""
        return ('HSET', self.keys.big(queue), token, payload)

    def fanout_publish_call(self, exchange: str, payload: str | bytes,
                            bindings: Sequence[tuple[str, str]]) -> Call:
        """Publish once to a fanout exchange; ``bindings`` are (queue, binding member)."""
        keys = [self.keys.fanout(exchange), self.keys.deadlines(exchange)]
        keys += [self.keys.fanout_wake(exchange, q) for q, _ in bindings]
        return SCRIPTS['fanout_publish'], keys, [payload, *(m for _, m in bindings)]

    def declare_call(self, queue: str, arguments: Sequence[str] = ()) -> Call:
        """Declare ``queue`` with ``arguments`` as :func:`kombu_streams.limits.stored_pairs`
        gives them (none: whatever the queue has recorded)."""
        return (SCRIPTS['declare'], [*self.streams(queue), self.keys.args(queue)],
                [queue, *arguments])

    def limits_call(self, queue: str, arguments: Sequence[str] | None = None) -> Call:
        """Show the queue's arguments (``arguments`` None), or replace them ([]: clear)."""
        args = ['get'] if arguments is None else ['set', *arguments]
        keys = [self.keys.args(queue), self.keys.stream(queue, self.levels[0]),
                self.keys.counters(queue)]
        return SCRIPTS['limits'], keys, args

    def size_call(self, queue: str) -> Call:
        return SCRIPTS['size'], [*self.streams(queue), self.keys.fair(queue)], [queue, HOLDER,
                                                                                '1']

    def purge_call(self, queue: str, batch: int = 1000) -> Call:
        """One purge step: at most ``batch`` entries per stream (and of the delayed set);
        its reply is (purged, more)."""
        keys = self.streams(queue) + [self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue), self.keys.big(queue),
                                      self.keys.unique(queue), self.keys.fair(queue),
                                      self.keys.counters(queue)]
        return SCRIPTS['purge'], keys, [queue, HOLDER, batch]

    def delete_call(self, queue: str) -> Call:
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.ready(queue),
                                      self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue), self.keys.args(queue),
                                      self.keys.counters(queue), self.keys.dedup(queue),
                                      self.keys.unique(queue), self.keys.fair(queue),
                                      self.keys.big(queue), self.keys.dlq(queue)]
        return SCRIPTS['delete'], keys, []

    def leave_call(self, queue: str, consumer: str, exchange: str | None = None) -> Call:
        """The leave call: ``consumer`` leaves the queue's group (on its streams, or on the
        fanout ``exchange``'s stream) where it owns nothing."""
        keys = [self.keys.fanout(exchange)] if exchange else self.streams(queue)
        return SCRIPTS['leave'], keys, [queue, consumer]

    def cancel_call(self, queue: str, labels: Sequence[str], cursor: str = '0',
                    step: int = 1000) -> Call:
        """One step of the scan of a queue's delayed set for ``labels``, from ``cursor``;
        its reply is (next cursor, member removed, ...)."""
        keys = [self.keys.delayed(queue), self.keys.delayed_messages(queue),
                self.keys.big(queue), self.keys.fair(queue), self.keys.counters(queue)]
        return SCRIPTS['cancel'], keys, [cursor, step, *labels]

    def touch_call(self, queue: str, ttl_ms: int) -> Call:
        """The touch call: an expiring queue's keys (its key store too: it names the messages
        that hold their x-unique-key; its staging hash: x-fairness) live another ``ttl_ms``."""
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.ready(queue),
                                      self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue), self.keys.big(queue),
                                      self.keys.args(queue), self.keys.counters(queue),
                                      self.keys.unique(queue), self.keys.fair(queue)]
        return SCRIPTS['touch'], keys, [int(ttl_ms)]

    def bind_call(self, exchange: str, member: str, ttl_ms: int = 0,
                  fanout_group: str | None = None) -> Call:
        keys = [self.keys.bindings(exchange), self.keys.deadlines(exchange)]
        args: list[Any] = [member, int(ttl_ms)]
        if fanout_group is not None:
            keys.append(self.keys.fanout(exchange))
            args.append(fanout_group)
        return SCRIPTS['bind'], keys, args

    def route_call(self, exchange: str, sweep: int = 100, fanout_sep: str | None = None,
                   cursor: Any = '0', page: int = ROUTE_PAGE) -> Call:
        """One route call: the page of the routing table at SSCAN ``cursor`` (about ``page``
        members), after dropping up to ``sweep`` expired bindings when the cursor is '0';
        its reply is [next cursor, member, ...]."""
        keys = [self.keys.bindings(exchange), self.keys.deadlines(exchange)]
        args: list[Any] = [sweep, cursor, page]
        if fanout_sep is not None:
            keys.append(self.keys.fanout(exchange))
            args.append(fanout_sep)
        return SCRIPTS['route'], keys, args

    @staticmethod
    def sources(queues: Sequence[str], fanout: Mapping[str, Iterable[str]] | None = None
                ) -> list[Source]:
        """(queue, fanout exchange or None) for what a read of ``queues`` covers, in serving
        order: the queues' groups on fanout exchanges, then the queues' own streams."""
        fanout = fanout or {}
        out: list[Source] = [(q, ex) for q in queues for ex in sorted(fanout.get(q, ()))]
        return out + [(q, None) for q in queues]

    def marked_calls(self, markers: Sequence[str]) -> list[Call]:
        """marked.lua calls for wake ``markers``: one per hash slot on Cluster (and per
        MARKED_MAX), one on a single Redis."""
        groups: dict[int, list[str]] = {}
        for key in markers:
            slot = key_slot(key.encode()) if self.keys.cluster else 0
            groups.setdefault(slot, []).append(key)
        return [(SCRIPTS['marked'], keys[i:i + MARKED_MAX], [])
                for keys in groups.values() for i in range(0, len(keys), MARKED_MAX)]

    def slot_groups(self, sources: Sequence[Source]) -> list[list[Source]]:
        """Split sources into groups one read script may cover: all of them on one Redis; on
        Redis Cluster, those whose keys share a hash slot (queue names with a common
        ``{tag}`` share one), in serving order of each group's first source."""
        if not self.keys.cluster:
            return [list(sources)]
        groups: dict[int, list[Source]] = {}
        for queue, exchange in sources:
            key = self.keys.fanout(exchange) if exchange else self.keys.stream(queue, 0)
            groups.setdefault(key_slot(key.encode()), []).append((queue, exchange))
        return list(groups.values())

    def give_back_call(self, sources: Sequence[Source],
                       members: Mapping[Source, str] | None = None) -> Call:
        """The wake call that sets the markers of ``sources`` again (at most WAKE_MAX; on
        Redis Cluster all in one slot, see :meth:`give_back_calls`), each only where its
        source still exists: a popped marker no read will cover goes back without bringing
        back the key of a queue that expired meanwhile. ``members``: per fanout source its
        binding member (see :func:`kombu_streams.routing.binding_member`), so its marker
        expires at the binding's deadline as a publish's does; without it a new marker gets
        no expiry, and outlives the group if the binding expires later: pass it for
        expiring queues. Its reply: one character per source, '1' set, '0' gone."""
        if len(sources) > WAKE_MAX:
            raise ValueError(f'at most {WAKE_MAX} sources per wake call, got {len(sources)}')
        members = members or {}
        keys: list[str] = []
        args: list[Any] = []
        for queue, exchange in sources:
            wake = self.wake(queue, exchange)
            if exchange:
                keys += [wake, self.keys.fanout(exchange), self.keys.deadlines(exchange)]
                args += ['f', queue, members.get((queue, exchange), '')]
            else:
                keys += [wake, self.keys.stream(queue, self.levels[0]), wake]
                args += ['q', queue, '']
        return SCRIPTS['wake'], keys, args

    def _wake_chunks(self, sources: Sequence[Source]) -> list[list[Source]]:
        """``sources`` in groups one wake call may take: per slot group, WAKE_MAX each."""
        return [group[j:j + WAKE_MAX] for group in self.slot_groups(sources)
                for j in range(0, len(group), WAKE_MAX) if group]

    def give_back_calls(self, sources: Sequence[Source],
                        members: Mapping[Source, str] | None = None) -> list[Call]:
        """The wake calls for ``sources``: one per slot group (:meth:`slot_groups`) and
        WAKE_MAX sources."""
        return [self.give_back_call(chunk, members) for chunk in self._wake_chunks(sources)]

    def requeue_call(self, queue: str, entries: Iterable[tuple[Any, ...]],
                     exchange: str | None = None, consumer: str = ANY_OWNER) -> Call:
        """The requeue call for entries given as (stream key, id, delivery count to keep,
        -1 for as it is). ``consumer``: only entries it still owns are requeued (a channel's
        own name); ANY_OWNER: whoever owns them."""
        streams, args = self._entry_args(entries)
        keys = streams + [self.wake(queue, exchange)]
        if not exchange:
            keys += self._backoff_keys(queue)
        return SCRIPTS['requeue'], keys, [queue, consumer, HOLDER, *args]

    def _backoff_keys(self, queue: str) -> list[str]:
        """The ready index, the keys of retry backoff (x-requeue-delay: the arguments and
        the delayed set), the in-flight flag (x-max-in-flight: a message given back frees
        a slot, see lua/lib/inflight.lua), the counters and the big hash (x-max-length-bytes:
        a message given back waits again, its size counted, lua/lib/bytes.lua), which
        requeue and reclaim take after the marker: the queue's arguments decide in the
        script, whatever this client's options say."""
        k = self.keys
        return [k.ready(queue), k.args(queue), k.delayed(queue), k.capped(queue),
                k.counters(queue), k.big(queue)]

    def requeue_calls(self, queue: str, entries: Iterable[tuple[Any, ...]],
                      exchange: str | None = None, consumer: str = ANY_OWNER) -> list[Call]:
        """The requeue calls, one per CHUNK entries; entries as for :meth:`requeue`."""
        entries = [(stream, entry_id, count[0] if count else -1)
                   for stream, entry_id, *count in entries]
        return [self.requeue_call(queue, entries[j:j + CHUNK], exchange, consumer)
                for j in range(0, len(entries), CHUNK)]

    def reclaim_call(self, queue: str, lease_ms: int, budget: int,
                     cursors: Sequence[str] | None = None, consumer_expiry_ms: int = 0,
                     exchange: str | None = None) -> tuple[Call, Callable[[Any], Reclaimed]]:
        """The reclaim call for a queue's streams (or its group on a fanout ``exchange``),
        and the function that decodes its reply (see reclaim.lua)."""
        streams = [self.keys.fanout(exchange)] if exchange else self.streams(queue)
        cursors = list(cursors) if cursors else ['-'] * len(streams)
        keys = streams + [self.wake(queue, exchange)]
        if not exchange:
            keys += self._backoff_keys(queue)
        args = [queue, HOLDER, int(lease_ms), int(budget), int(consumer_expiry_ms), *cursors]

        def parse(reply: Any) -> Reclaimed:
            moved, more, next_ms, *cursors = reply
            return Reclaimed(int(moved), bool(int(more)), int(next_ms),
                             [text(c) for c in cursors])

        return (SCRIPTS['reclaim'], keys, args), parse

    def dead_letter_call(self, queue: str, stream: str, entry_id: Any, reason: str,
                         deliveries: int, exchange: str | None = None,
                         consumer: str = ANY_OWNER, unique_key: str = '') -> Call:
        """The deadletter call; ``consumer``: only while it owns the entry (a channel's own
        name); ANY_OWNER: whoever owns it. ``unique_key``: the key the message holds, released
        as it is set aside. A queue's own entry frees a slot: the call takes the queue's
        key store, in-flight flag and marker (x-max-in-flight, lua/lib/inflight.lua)."""
        dlq = self.keys.fanout_dlq(exchange, queue) if exchange else self.keys.dlq(queue)
        keys, args = [stream, dlq], [queue, consumer, entry_id, reason, deliveries,
                                     '1' if exchange else '0']
        if not exchange:
            keys += [self.keys.unique(queue), self.keys.capped(queue), self.keys.wake(queue)]
            args += [unique_key, 'c']
        return SCRIPTS['deadletter'], keys, args

    def dlq_purge_call(self, queue: str, through: str, batch: int = PAGE) -> Call:
        """One step of deleting a queue's dead letters up to id ``through`` (inclusive), at
        most ``batch``, with the big bodies they refer to; its reply is (deleted, more)."""
        return SCRIPTS['dlq_purge'], [self.keys.dlq(queue), self.keys.big(queue)], [through,
                                                                                   batch]

    def redrive_call(self, queue: str, count: int, ids: Sequence[Any] = (),
                     keyed: Sequence[tuple[Any, str, str]] | None = None) -> Call:
        """The redrive call of up to ``count`` dead letters: the oldest, or ``ids``, or
        ``keyed``: (id, the x-unique-key its message holds, its x-group; '' for none)
        triples: the letters take their keys back (or stay while a live message holds
        them), and on a fair queue join their groups' turns."""
        keys = [self.keys.dlq(queue), *self.streams(queue), self.keys.wake(queue),
                self.keys.ready(queue)]
        if keyed is None:
            return SCRIPTS['redrive'], keys, [count, *ids]
        keys += [self.keys.unique(queue), self.keys.args(queue), self.keys.delayed(queue),
                 self.keys.fair(queue), self.keys.counters(queue), self.keys.big(queue)]
        return SCRIPTS['redrive'], keys, [count, 'k', queue,
                                          *(x for triple in keyed for x in triple)]

    def migrate_list_call(self, source: str, queue: str, list_level: int, count: int,
                          todo: int = -1
                          ) -> tuple[Call, Callable[[Any], tuple[int, int, int, int,
                                                                 list[bytes]]]]:
        """The migrate call for Kombu's list ``source`` (see :meth:`migrate_list`), and the
        function that decodes its reply."""
        keys = [source, *self.streams(queue), self.keys.wake(queue), self.keys.ready(queue)]
        args = [int(count), int(todo), self.levels.index(list_level) + 1, *self.levels]

        def parse(reply: Any) -> tuple[int, int, int, int, list[bytes]]:
            moved, kept, left, todo, *malformed = reply
            return int(moved), int(kept), int(left), int(todo), malformed

        return (SCRIPTS['migrate'], keys, args), parse

    def migrate_unacked_call(self, unacked: str, unacked_index: str, tag: Any, raw: Any,
                             payload: str | bytes, targets: Sequence[tuple[str, int]]
                             ) -> Call:
        keys = [unacked, unacked_index]
        for queue, level in targets:
            keys += [self.keys.stream(queue, level), self.keys.wake(queue),
                     self.keys.ready(queue)]
        return SCRIPTS['migrate_unacked'], keys, [tag, raw, payload]
