"""How each Lua script is called: one builder per script call, and its reply's decoder.

This is the only place that lays out each script's KEYS and ARGV, so the channel, the
lease keeper, the tests and operator tools call the scripts the same way. A builder
(``*_call``, ``*_calls``) returns the call as a :data:`~kombu_streams.scripts.Call` (with,
where the reply needs decoding, the function that decodes it); nothing here talks to Redis:
:class:`kombu_streams.broker.Broker` runs the calls. Every builder that takes entries of a
queue makes one call per queue, so each call touches one hash slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from redis.crc import key_slot

from .keys import LAYOUT, READS_LAYOUTS, Keys
from .options import READ_BYTES
from .replies import Delivery, ReadResult, Reclaimed, _id_order
from .scripts import SCRIPTS, Call
from .state import Source
from .text import text

#: The consumer that holds requeued and reclaimed messages in a stream's PEL until they are
#: read again (so they keep their id, priority and delivery count).
HOLDER = '~requeued'

#: The consumer name a settle call (ack, requeue, dead-letter) gives to settle entries
#: whoever owns them: for operators. A channel gives its own name, so that once its lease
#: ran out and another consumer took a message it cannot take it back (docs/design.rst,
#: "Leases").
ANY_OWNER = ''



#: How read.lua reads a source (see its header): read it; read it, its marker was popped by
#: this consumer; read it only if its marker is set; walk every stream of it.
READ, POPPED, GATED, WALK = 'r', 'p', 'm', 'w'

#: Most ids per renew call (a few ms of Redis time; the calls of a round are pipelined).
RENEW_CHUNK = 500
#: Most entries per ack or requeue call, for the same reason.
CHUNK = 1000
#: Most entries per ack call that looks each entry up (XRANGE) to free big messages' bodies:
#: a big message's entry is a token, but an operator's ack may meet messages stored inline,
#: each copied by its look-up (under ``big_message_bytes``, 512 KiB by default, each).
LOOKUP_CHUNK = 20
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


class Calls:
    """The script calls for queues laid out by ``keys`` with priority ``levels``."""

    def __init__(self, keys: Keys, levels: Sequence[int]) -> None:
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

    @staticmethod
    def _ack_args(entries: Iterable[tuple[Any, ...]]) -> tuple[list[str], list[Any]]:
        """(streams, [k, id, k, id, ...]) for acks given as (stream key, id[, trusted]): k
        is the stream's index, negative for an ack the consumer knows it may make without
        the ownership lookup (see ack.lua and InFlight.surely_held)."""
        streams: list[str] = []
        flat: list[Any] = []
        for stream, entry_id, *trusted in entries:
            if stream not in streams:
                streams.append(stream)
            k = streams.index(stream) + 1
            flat += [-k if trusted and trusted[0] else k, entry_id]
        return streams, flat

    def layout_call(self, watch: bool = False) -> Call:
        """The layout call: the check at a channel's start (an older layout this release
        reads, READS_LAYOUTS, is recorded as LAYOUT), or the lease keeper's ``watch``."""
        if watch:
            return SCRIPTS['layout'], [self.keys.layout()], [LAYOUT, '1']
        return SCRIPTS['layout'], [self.keys.layout()], [LAYOUT, '0', *READS_LAYOUTS]

    def publish_call(self, queue: str, level: int, payload: str | bytes, routed: bool = False,
                     delay: Delay | None = None, token: str | None = None,
                     dedup_id: str = '') -> Call:
        """The publish call. ``routed``: only if the queue exists (a copy routed by an
        exchange must not recreate a deleted queue). ``delay``: delayed delivery is on
        (messages already due are moved first, so this one never overtakes them), and when
        the message is due (see :class:`Delay`). ``token``: a big message, whose body
        (``payload``, not sent with this call) the same transaction stores in the queue's
        big hash under ``token`` (:meth:`store_big`). ``dedup_id``: the message's
        deduplication id (kombu_streams/dedup.py), '' for none."""
        k = self.keys
        keys = [k.stream(queue, level), k.wake(queue), k.ready(queue), k.args(queue),
                k.dlq(queue), k.delayed(queue), k.delayed_messages(queue),
                *self.streams(queue), k.dedup(queue)]
        args: list[Any] = [payload if token is None else f'r:{token}', '1' if routed else '0',
                           len(self.levels), queue, HOLDER, '0' if delay is None else '1']
        if delay is not None and delay.due:  # due now: no more arguments (the common case)
            args += [delay.due, delay.threshold_ms, delay.label]
        if dedup_id:  # ARGV[10]; ARGV[7..9] '' where there is no due time
            args += [''] * (9 - len(args)) + [dedup_id]
        if token is not None:
            keys.append(k.big(queue))
        return SCRIPTS['publish'], keys, args

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
        keys = [self.keys.args(queue), self.keys.stream(queue, self.levels[0])]
        return SCRIPTS['limits'], keys, args

    def size_call(self, queue: str) -> Call:
        return SCRIPTS['size'], self.streams(queue), [queue, HOLDER]

    def purge_call(self, queue: str, batch: int = 1000) -> Call:
        """One purge step: at most ``batch`` entries per stream (and of the delayed set);
        its reply is (purged, more)."""
        keys = self.streams(queue) + [self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue), self.keys.big(queue)]
        return SCRIPTS['purge'], keys, [queue, HOLDER, batch]

    def delete_call(self, queue: str) -> Call:
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.ready(queue),
                                      self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue), self.keys.args(queue),
                                      self.keys.dedup(queue), self.keys.big(queue),
                                      self.keys.dlq(queue)]
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
                self.keys.big(queue)]
        return SCRIPTS['cancel'], keys, [cursor, step, *labels]

    def touch_call(self, queue: str, ttl_ms: int) -> Call:
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.ready(queue),
                                      self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue), self.keys.big(queue),
                                      self.keys.args(queue)]
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

    def read_call(self, sources: Sequence[Source], consumer: str, count: int,
                  max_deliveries: int = 0, ttls: dict[str, int] | None = None,
                  modes: dict[Source, str] | None = None,
                  acks: Sequence[tuple[Any, ...]] = (), max_bytes: int = READ_BYTES,
                  hints: Mapping[Source, int] | None = None
                  ) -> tuple[Call, Callable[[list[Any]], ReadResult]]:
        """The read call for ``sources`` (see :meth:`sources`), each read as ``modes`` says
        (READ, POPPED, GATED or WALK; READ by default), and the function that decodes its
        reply. ``acks``: (stream key, entry id[, trusted]) of messages ``consumer`` acks in the same
        call (only those it still owns are acked, as :meth:`ack_call` says); each stream
        must be one of a queue source's own (see :meth:`ack_merges`). ``max_bytes``: the
        call's byte budget (one message bigger than it is still delivered, alone); ``hints``:
        per source, the bytes expected of its largest entry (unknown: the first batch is one
        entry), which sizes the call's first batch of it (see read.lua)."""
        ttls, modes, hints = ttls or {}, modes or {}, hints or {}
        index = {src: i + 1 for i, src in enumerate(sources)}
        # (stream key, source, level), in the order to serve them
        streams: list[tuple[str, Source, int]] = [
            (self.keys.fanout(ex), (q, ex), self.levels[0]) for q, ex in sources if ex]
        own = [q for q, ex in sources if not ex]
        streams += [(self.keys.stream(q, level), (q, None), level)
                    for level in self.levels for q in own]
        keys = [s[0] for s in streams]
        args: list[Any] = [consumer, count, HOLDER, max_deliveries, len(streams), len(sources),
                           max(int(max_bytes), 1)]
        for src in sources:
            q, ex = src
            if ex:  # no ready index, delayed set or big messages for a group on a fanout stream
                wake = self.wake(q, ex)
                keys += [wake, self.keys.fanout_dlq(ex, q), wake, wake, wake, wake]
            else:
                keys += [self.keys.wake(q), self.keys.dlq(q), self.keys.ready(q),
                         self.keys.delayed(q), self.keys.delayed_messages(q),
                         self.keys.big(q)]
            args += [q, 'f' if ex else 'q', modes.get(src, READ), ttls.get(q, 0),
                     int(hints.get(src, 0))]
        args += [index[src] for _, src, _ in streams]
        position = {key: i + 1 for i, (key, (_, ex), _) in enumerate(streams) if not ex}
        args.append(len(acks))
        for stream, entry_id, *trusted in acks:
            k = position[stream]
            args += [-k if trusted and trusted[0] else k, entry_id]

        def parse(reply: list[Any]) -> ReadResult:
            status, problems, aside, dues = text(reply[0]), reply[1], reply[2], reply[3]
            unsettled = reply[4]
            out = []
            for j in range(5, len(reply), 4):
                i, entry_id, deliveries, payload = reply[j:j + 4]
                key, (queue, exchange), level = streams[int(i) - 1]
                token = None
                if isinstance(payload, list):  # a big message: {token}, body not fetched yet
                    token, payload = payload[0], b''
                out.append(Delivery(queue, level, key, entry_id, int(deliveries), payload,
                                    exchange, token))
            return ReadResult(
                out, dict(zip(sources, status)),
                [(sources[int(problems[j]) - 1], text(problems[j + 1]))
                 for j in range(0, len(problems), 2)],
                [(sources[int(aside[j]) - 1], streams[int(aside[j + 1]) - 1][0], aside[j + 2],
                  text(aside[j + 3])) for j in range(0, len(aside), 4)],
                {sources[int(dues[j]) - 1]: int(dues[j + 1]) for j in range(0, len(dues), 2)},
                {sources[int(unsettled[j]) - 1]: int(unsettled[j + 1])
                 for j in range(0, len(unsettled), 2)})

        return (SCRIPTS['read'], keys, args), parse

    def ack_merges(self, sources: Sequence[Source]) -> set[str]:
        """The streams whose acks may ride inside a read call of ``sources``."""
        return {key for q, ex in sources if not ex for key in self.streams(q)}

    def ack_call(self, queue: str, entries: Iterable[tuple[str, Any]],
                 exchange: str | None = None, consumer: str = ANY_OWNER,
                 big: bool = False) -> Call | None:
        """The ack call, or None when there is nothing to ack. ``consumer``: only entries it
        still owns are acked (a channel's own name; an entry given as (stream, id, True) is one
        it surely still owns, acked without looking); ANY_OWNER: whoever owns them. ``big``:
        the entries may be big messages', whose bodies go with them (each entry is looked
        up: a channel sends only its big messages' acks so, see ack.lua)."""
        if exchange:  # fanout messages are never stored apart
            ids = [entry_id for _, entry_id, *_ in entries]
            if not ids:
                return None
            return SCRIPTS['fanout_ack'], [self.keys.fanout(exchange)], [queue, consumer, *ids]
        streams, pairs = self._ack_args(entries)
        if not pairs:
            return None
        if big:
            return SCRIPTS['ack'], [*streams, self.keys.big(queue)], [queue, consumer, 'b',
                                                                      *pairs]
        return SCRIPTS['ack'], streams, [queue, consumer, *pairs]

    def ack_calls(self, queue: str, entries: Iterable[tuple[str, Any]],
                  exchange: str | None = None, consumer: str = ANY_OWNER,
                  big: bool = False) -> list[Call]:
        """The ack calls, one per CHUNK entries (each call's work stays bounded); with
        ``big`` one per LOOKUP_CHUNK (each entry is looked up, see :meth:`ack_call`)."""
        entries = list(entries)
        chunk = LOOKUP_CHUNK if big else CHUNK
        calls = [self.ack_call(queue, entries[j:j + chunk], exchange, consumer, big)
                 for j in range(0, len(entries), chunk)]
        return [call for call in calls if call is not None]

    def requeue_call(self, queue: str, entries: Iterable[tuple[Any, ...]],
                     exchange: str | None = None, consumer: str = ANY_OWNER) -> Call:
        """The requeue call for entries given as (stream key, id, delivery count to keep,
        -1 for as it is). ``consumer``: only entries it still owns are requeued (a channel's
        own name); ANY_OWNER: whoever owns them."""
        streams, args = self._entry_args(entries)
        keys = streams + [self.wake(queue, exchange)]
        if not exchange:
            keys.append(self.keys.ready(queue))
        return SCRIPTS['requeue'], keys, [queue, consumer, HOLDER, *args]

    def requeue_calls(self, queue: str, entries: Iterable[tuple[Any, ...]],
                      exchange: str | None = None, consumer: str = ANY_OWNER) -> list[Call]:
        """The requeue calls, one per CHUNK entries; entries as for :meth:`requeue`."""
        entries = [(stream, entry_id, count[0] if count else -1)
                   for stream, entry_id, *count in entries]
        return [self.requeue_call(queue, entries[j:j + CHUNK], exchange, consumer)
                for j in range(0, len(entries), CHUNK)]

    def renew_call(self, queue: str, consumer: str, stream: str, ids: Sequence[Any]) -> Call:
        """The renew call for ``ids`` of one stream, in increasing order (renew.lua needs
        them so)."""
        return SCRIPTS['renew'], [stream], [queue, consumer, *ids]

    def renew_calls(self, queue: str, consumer: str, entries: Iterable[tuple[str, Any]]
                    ) -> list[tuple[Call, str]]:
        """The renew calls for entries given as (stream key, id): one per stream and chunk of
        at most RENEW_CHUNK ids, each as (call, stream key). Ids go in increasing order, as
        renew.lua needs them."""
        by_stream: dict[str, list[Any]] = {}
        for stream, entry_id in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        calls: list[tuple[Call, str]] = []
        for stream, ids in by_stream.items():
            ids.sort(key=_id_order)
            for j in range(0, len(ids), RENEW_CHUNK):
                calls.append((self.renew_call(queue, consumer, stream,
                                              ids[j:j + RENEW_CHUNK]), stream))
        return calls

    def reclaim_call(self, queue: str, lease_ms: int, budget: int,
                     cursors: Sequence[str] | None = None, consumer_expiry_ms: int = 0,
                     exchange: str | None = None) -> tuple[Call, Callable[[Any], Reclaimed]]:
        """The reclaim call for a queue's streams (or its group on a fanout ``exchange``),
        and the function that decodes its reply (see reclaim.lua)."""
        streams = [self.keys.fanout(exchange)] if exchange else self.streams(queue)
        cursors = list(cursors) if cursors else ['-'] * len(streams)
        keys = streams + [self.wake(queue, exchange)]
        if not exchange:
            keys.append(self.keys.ready(queue))
        args = [queue, HOLDER, int(lease_ms), int(budget), int(consumer_expiry_ms), *cursors]

        def parse(reply: Any) -> Reclaimed:
            moved, more, next_ms, *cursors = reply
            return Reclaimed(int(moved), bool(int(more)), int(next_ms),
                             [text(c) for c in cursors])

        return (SCRIPTS['reclaim'], keys, args), parse

    def dead_letter_call(self, queue: str, stream: str, entry_id: Any, reason: str,
                         deliveries: int, exchange: str | None = None,
                         consumer: str = ANY_OWNER) -> Call:
        """The deadletter call; ``consumer``: only while it owns the entry (a channel's own
        name); ANY_OWNER: whoever owns it."""
        dlq = self.keys.fanout_dlq(exchange, queue) if exchange else self.keys.dlq(queue)
        return SCRIPTS['deadletter'], [stream, dlq], [queue, consumer, entry_id, reason,
                                                      deliveries, '1' if exchange else '0']

    def dlq_purge_call(self, queue: str, through: str, batch: int = PAGE) -> Call:
        """One step of deleting a queue's dead letters up to id ``through`` (inclusive), at
        most ``batch``, with the big bodies they refer to; its reply is (deleted, more)."""
        return SCRIPTS['dlq_purge'], [self.keys.dlq(queue), self.keys.big(queue)], [through,
                                                                                   batch]

    def redrive_call(self, queue: str, count: int, ids: Sequence[Any] = ()) -> Call:
        keys = [self.keys.dlq(queue), *self.streams(queue), self.keys.wake(queue),
                self.keys.ready(queue)]
        return SCRIPTS['redrive'], keys, [count, *ids]

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
