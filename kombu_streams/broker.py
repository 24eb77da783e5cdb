"""Broker operations on one Redis database: one builder per Lua script call.

This is the only place that lays out each script's KEYS and ARGV, so the channel, the
tests and operator tools call the scripts the same way. A builder (``*_call``, ``*_calls``)
returns the call as a :data:`~kombu_streams.scripts.Call` (with, where the reply needs
decoding, the function that decodes it), for pipelines and ``kombu-streams scripts --call``;
the methods named after the operations run a builder's call through :meth:`Broker.run` (or
:meth:`Broker.run_all`, one round trip for many). Every method that takes entries of a queue
makes one script call per queue, so each call touches one hash slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from redis.crc import key_slot
from redis.exceptions import ResponseError

from .keys import LAYOUT, Keys
from .options import READ_BYTES
from .scripts import SCRIPTS, Call, run_calls
from .state import Source
from .text import text

logger = logging.getLogger(__name__)


class LayoutMismatch(RuntimeError):
    """The keys under this prefix were written with another key layout than this release's:
    not a connection error (retrying cannot help)."""


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


def warn_unsettled(queue: str, count: int, what: str) -> None:
    """Log entries a consumer's settle (``what``: ack, requeue, dead-letter) left alone because
    it no longer owns them: its lease ran out (the process was stopped or cut off) and another
    consumer took them, so this one may have processed a message that runs again there.
    Called once per settle call and queue, never per message."""
    logger.warning('kombu-streams: %d message%s of queue %r not settled (%s): its lease was lost, '
                   'another consumer holds it now', count, '' if count == 1 else 's', queue,
                   what)


def _id_order(entry_id: Any) -> tuple[int, int]:
    """A stream id ("ms-seq", str or bytes) as numbers, for sorting."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition('-')
    return int(ms), int(seq or 0)


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


class ReadResult(NamedTuple):
    """What one read.lua call did."""

    deliveries: list[Delivery]
    #: per source: '1' may hold more ready messages, '0' nothing ready, '-' not reached
    #: (the count ran out first), 'e' met a problem
    status: dict[Source, str]
    #: (source, error) for errors on a source's keys (another program's key at our names)
    problems: list[tuple[Source, str]]
    #: (source, stream key, entry id, reason) of entries moved to the dead-letter stream
    aside: list[tuple[Source, str, bytes, str]]
    #: per queue source the read opened: ms until its next delayed message is due (0: due
    #: now), -1: none delayed
    dues: dict[Source, int] = {}
    #: per source: acks that rode along and were left alone, as the consumer no longer owns
    #: those entries (its lease ran out and another consumer took them)
    unsettled: dict[Source, int] = {}


class Reclaimed(NamedTuple):
    """What one reclaim.lua call did."""

    moved: int
    #: the budget ran out before every stopped consumer's messages were moved: call again
    more: bool
    #: ms until some live consumer's lease could run out at the earliest (-1: none owned)
    next_ms: int
    #: where the sweep goes on, per stream ('-': it reached the end)
    cursors: list[str]


class Ready(NamedTuple):
    """One ready message as peek.lua sees it, not delivered."""

    level: int
    stream: str
    entry_id: str
    #: parked with the holder (requeued or reclaimed): served before fresh ones of its level
    requeued: bool
    #: the entry's ``m`` field; b'' when it has none (a read sets such entries aside)
    payload: bytes


class Delay(NamedTuple):
    """When a published message is due, as publish.lua takes it."""

    #: '' now, '@<unix ms>' at a time, '+<ms>' after a delay (on the server's clock)
    due: str = ''
    #: a message due sooner than this is published at once
    threshold_ms: int = 1000
    #: a name for operators (Celery's task id)
    label: str = ''


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

    # -- running calls ---------------------------------------------------------------------

    def run(self, call: Call) -> Any:
        """Run one call: EVALSHA, or for a read-only script (flag ``no-writes``) EVALSHA_RO
        where the server has it (:meth:`Script.call_ro`); loads the script if Redis lost it."""
        script, keys, args = call
        if 'no-writes' in script.flags.split(','):
            return script.call_ro(self.client, keys, args)
        return script(self.client, keys, args)

    def run_all(self, calls: Sequence[Call]) -> list[Any]:
        """Run calls in one round trip per server (:func:`~kombu_streams.scripts.run_calls`);
        their replies in order."""
        return run_calls(self.client, calls) if calls else []

    @staticmethod
    def settled(calls: Sequence[Call], replies: Sequence[Any], what: str) -> int:
        """How many entries the settle ``calls`` (ack, fanout_ack, requeue, deadletter: each
        replies {done, not owned}) settled; replies that are errors count none. Entries
        left alone because the calls' consumer no longer owns them are logged, once per
        queue (:func:`warn_unsettled`)."""
        done = 0
        unsettled: dict[str, int] = {}
        for (_, _, args), reply in zip(calls, replies):
            if isinstance(reply, Exception):
                continue
            done += int(reply[0])
            if int(reply[1]):
                queue = text(args[0])  # ARGV[1] of each: the group, named after the queue
                unsettled[queue] = unsettled.get(queue, 0) + int(reply[1])
        for queue, count in unsettled.items():
            warn_unsettled(queue, count, what)
        return done

    def load_scripts(self) -> None:
        """SCRIPT LOAD every script, and the Redis 7 flagged text of the read-only ones (Redis
        6.2 cannot compile it: skipped there)."""
        for name in sorted(SCRIPTS):
            self.client.script_load(SCRIPTS[name].source)
            if SCRIPTS[name].flags:
                try:
                    self.client.script_load(SCRIPTS[name].flagged.source)
                except ResponseError:
                    pass

    # -- the key layout --------------------------------------------------------------------

    def layout_call(self, watch: bool = False) -> Call:
        return SCRIPTS['layout'], [self.keys.layout()], [LAYOUT, *(['1'] if watch else [])]

    def layout_vanished(self) -> bool:
        """Whether the layout record of the prefix, which a channel of this process wrote or
        found, is gone (it is written again now): Redis lost data under the prefix since."""
        return self.run(self.layout_call(watch=True)) == 0

    def check_layout(self) -> None:
        """Record the key layout of this release under the prefix, or refuse to go on where
        the keys were written with another one (see :data:`kombu_streams.keys.LAYOUT`)."""
        key = self.keys.layout()
        try:
            found = text(self.run(self.layout_call()))
        except ResponseError as exc:
            if 'WRONGTYPE' not in str(exc):
                # Refused (an ACL without GET/SET, a read-only replica, maxmemory): the check
                # guards, it does not carry anything; go on without it.
                logger.warning('kombu-streams: could not check the key layout at %s (%s); '
                               'going on without the check', key, exc)
                return
            raise LayoutMismatch(
                f'kombu-streams: {key!r} holds another type of value than a key layout '
                f'version: another program uses this name; rename its key, or give '
                f'kombu-streams a global_keyprefix of its own') from None
        if found != str(LAYOUT):
            raise LayoutMismatch(
                f'kombu-streams: the keys under prefix {self.keys.prefix!r} were written with '
                f'key layout {found!r} ({key}); this release reads and writes layout '
                f'{LAYOUT}. Run the kombu-streams release that wrote them, or migrate them '
                f'as its changelog says.')

    # -- publishing ----------------------------------------------------------------------

    def publish_call(self, queue: str, level: int, payload: str | bytes, routed: bool = False,
                     delay: Delay | None = None) -> Call:
        """The publish call. ``routed``: only if the queue exists (a copy routed by an
        exchange must not recreate a deleted queue). ``delay``: delayed delivery is on
        (messages already due are moved first, so this one never overtakes them), and when
        the message is due (see :class:`Delay`)."""
        keys = [self.keys.stream(queue, level), self.keys.wake(queue),
                self.keys.stream(queue, self.levels[0]), self.keys.ready(queue)]
        args: list[Any] = [payload, '1' if routed else '0']
        if delay is not None:
            keys += [self.keys.delayed(queue), self.keys.delayed_messages(queue)]
            if delay.due:  # due now: no more arguments (the common case stays small)
                args += [delay.due, delay.threshold_ms, delay.label]
        return SCRIPTS['publish'], keys, args

    def publish(self, queue: str, level: int, payload: str | bytes, routed: bool = False,
                delay: Delay | None = None) -> bytes | None:
        return self.run(self.publish_call(queue, level, payload, routed, delay))

    def fanout_publish_call(self, exchange: str, payload: str | bytes,
                            bindings: Sequence[tuple[str, str]]) -> Call:
        """Publish once to a fanout exchange; ``bindings`` are (queue, binding member)."""
        keys = [self.keys.fanout(exchange), self.keys.deadlines(exchange)]
        keys += [self.keys.fanout_wake(exchange, q) for q, _ in bindings]
        return SCRIPTS['fanout_publish'], keys, [payload, *(m for _, m in bindings)]

    # -- queues ----------------------------------------------------------------------------

    def declare_call(self, queue: str) -> Call:
        return SCRIPTS['declare'], self.streams(queue), [queue]

    def declare(self, queue: str) -> int:
        return self.run(self.declare_call(queue))

    def exists(self, queue: str) -> bool:
        return bool(self.client.exists(*self.streams(queue)))

    def size_call(self, queue: str) -> Call:
        return SCRIPTS['size'], self.streams(queue), [queue, HOLDER]

    def size(self, queue: str) -> int:
        return int(self.run(self.size_call(queue)))

    def purge_call(self, queue: str, batch: int = 1000) -> Call:
        """One purge step: at most ``batch`` entries per stream (and of the delayed set);
        its reply is (purged, more)."""
        keys = self.streams(queue) + [self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue)]
        return SCRIPTS['purge'], keys, [queue, HOLDER, batch]

    def purge(self, queue: str, batch: int = 1000) -> int:
        """Delete all ready and delayed messages, in calls of at most ``batch`` entries per
        stream (and of the delayed set)."""
        total, more = 0, 1
        while more:
            purged, more = self.run(self.purge_call(queue, batch))
            total += int(purged)
        return total

    def delete_call(self, queue: str) -> Call:
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.ready(queue),
                                      self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue), self.keys.dlq(queue)]
        return SCRIPTS['delete'], keys, []

    def delete(self, queue: str) -> int:
        return self.run(self.delete_call(queue))

    def scheduled_call(self, queue: str, count: int = 10, bodies: bool = False
                       ) -> tuple[Call, Callable[[Any], dict[str, Any]]]:
        """The scheduled call (read-only) for the ``count`` (at most SCHEDULED_MAX) earliest
        delayed messages of a queue, and the function that decodes its reply (see
        :meth:`scheduled`)."""
        count = max(1, min(int(count), SCHEDULED_MAX))  # bounded: one call, a few ms at most
        keys = [self.keys.delayed(queue), self.keys.delayed_messages(queue)]

        def parse(reply: Any) -> dict[str, Any]:
            now, total, flat = int(reply[0]), int(reply[1]), reply[2:]
            out = []
            for j in range(0, len(flat), 3):
                member = text(flat[j])
                _, level, label = (member.split(':', 2) + ['', ''])[:3]
                entry: dict[str, Any] = {'member': member, 'level': int(level or 0),
                                         'label': label,
                                         # float(): a score stored in exponent form
                                         'due_in_ms': max(int(float(flat[j + 1])) - now, 0)}
                if bodies:
                    entry['message'] = text(flat[j + 2])
                out.append(entry)
            return {'queue': queue, 'delayed': total, 'messages': out, 'time_ms': now}

        return (SCRIPTS['scheduled'], keys, [count, '1' if bodies else '0']), parse

    def scheduled(self, queue: str, count: int = 10, bodies: bool = False) -> dict[str, Any]:
        """The ``count`` (at most SCHEDULED_MAX) earliest delayed messages of a queue
        (scheduled.lua, read-only):
        each with its member, level, label (Celery's task id), ms until due and, with
        ``bodies``, the message as stored."""
        call, parse = self.scheduled_call(queue, count, bodies)
        return parse(self.run(call))

    def cancel_call(self, queue: str, labels: Sequence[str], cursor: str = '0',
                    step: int = 1000) -> Call:
        """One step of the scan of a queue's delayed set for ``labels``, from ``cursor``;
        its reply is (next cursor, member removed, ...)."""
        keys = [self.keys.delayed(queue), self.keys.delayed_messages(queue)]
        return SCRIPTS['cancel'], keys, [cursor, step, *labels]

    def cancel(self, queue: str, labels: Sequence[str], step: int = 1000) -> list[str]:
        """Remove the delayed messages labelled ``labels`` (Celery task ids) from a queue
        before they are due: a scan of its delayed set in calls of about ``step`` members
        each. Returns the members removed."""
        cursor, gone = '0', []
        while True:
            reply = self.run(self.cancel_call(queue, labels, cursor, step))
            cursor = text(reply[0])
            gone += [text(m) for m in reply[1:]]
            if cursor == '0':
                return sorted(set(gone))

    def touch_call(self, queue: str, ttl_ms: int) -> Call:
        keys = self.streams(queue) + [self.keys.wake(queue), self.keys.ready(queue),
                                      self.keys.delayed(queue),
                                      self.keys.delayed_messages(queue)]
        return SCRIPTS['touch'], keys, [int(ttl_ms)]

    def touch(self, queue: str, ttl_ms: int) -> int:
        """Keep an expiring queue's keys alive for another ``ttl_ms``."""
        return self.run(self.touch_call(queue, ttl_ms))

    # -- routing tables --------------------------------------------------------------------

    def bind_call(self, exchange: str, member: str, ttl_ms: int = 0,
                  fanout_group: str | None = None) -> Call:
        keys = [self.keys.bindings(exchange), self.keys.deadlines(exchange)]
        args: list[Any] = [member, int(ttl_ms)]
        if fanout_group is not None:
            keys.append(self.keys.fanout(exchange))
            args.append(fanout_group)
        return SCRIPTS['bind'], keys, args

    def bind(self, exchange: str, member: str, ttl_ms: int = 0,
             fanout_group: str | None = None) -> int:
        """Add or refresh a binding; ``ttl_ms`` > 0 for an expiring queue, -1 removes it.
        On a fanout exchange, ``fanout_group`` (the queue) gets or loses its group."""
        return self.run(self.bind_call(exchange, member, ttl_ms, fanout_group))

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

    def route(self, exchange: str, sweep: int = 100, fanout_sep: str | None = None,
              page: int = ROUTE_PAGE) -> list[bytes]:
        """The routing table's members, after dropping up to ``sweep`` expired bindings (and,
        on a fanout exchange, given its member separator, their groups): one call per page
        of about ``page`` members (a smaller table comes whole in one), so no call reads a
        table of unknown size at once."""
        members: dict[bytes, None] = {}
        cursor: Any = '0'
        while True:
            cursor, *found = self.run(self.route_call(exchange, sweep, fanout_sep, cursor, page))
            members.update(dict.fromkeys(found))  # SSCAN may return a member twice
            if text(cursor) == '0':
                return list(members)

    # -- consuming -------------------------------------------------------------------------

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

    def marked(self, markers: Sequence[str]) -> set[str]:
        """Which of ``markers`` are set (marked.lua, read-only), in one round trip per
        server."""
        calls = self.marked_calls(markers)
        found: set[str] = set()
        for (_, keys, _), reply in zip(calls, run_calls(self.client, calls)):
            found.update(keys[int(i) - 1] for i in reply)
        return found

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

    def give_back(self, sources: Sequence[Source],
                  members: Mapping[Source, str] | None = None) -> list[Source]:
        """Set the wake markers of ``sources`` again where the source still exists (see
        :meth:`give_back_call`), in one round trip per server; returns the sources found
        gone, whose markers were left absent."""
        chunks = self._wake_chunks(sources)
        replies = self.run_all([self.give_back_call(chunk, members) for chunk in chunks])
        return [src for chunk, reply in zip(chunks, replies)
                for src, flag in zip(chunk, text(reply)) if flag != '1']

    def read_call(self, sources: Sequence[Source], consumer: str, count: int,
                  max_deliveries: int = 0, ttls: dict[str, int] | None = None,
                  modes: dict[Source, str] | None = None,
                  acks: Sequence[tuple[str, Any]] = (), max_bytes: int = READ_BYTES,
                  hints: Mapping[Source, int] | None = None
                  ) -> tuple[Call, Callable[[list[Any]], ReadResult]]:
        """The read call for ``sources`` (see :meth:`sources`), each read as ``modes`` says
        (READ, POPPED, GATED or WALK; READ by default), and the function that decodes its
        reply. ``acks``: (stream key, entry id) of messages ``consumer`` acks in the same
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
            if ex:  # no ready index, no delayed set for a group on a fanout stream
                wake = self.wake(q, ex)
                keys += [wake, self.keys.fanout_dlq(ex, q), wake, wake, wake]
            else:
                keys += [self.keys.wake(q), self.keys.dlq(q), self.keys.ready(q),
                         self.keys.delayed(q), self.keys.delayed_messages(q)]
            args += [q, 'f' if ex else 'q', modes.get(src, READ), ttls.get(q, 0),
                     int(hints.get(src, 0))]
        args += [index[src] for _, src, _ in streams]
        position = {key: i + 1 for i, (key, (_, ex), _) in enumerate(streams) if not ex}
        args.append(len(acks))
        for stream, entry_id in acks:
            args += [position[stream], entry_id]

        def parse(reply: list[Any]) -> ReadResult:
            status, problems, aside, dues = text(reply[0]), reply[1], reply[2], reply[3]
            unsettled = reply[4]
            out = []
            for j in range(5, len(reply), 4):
                i, entry_id, deliveries, payload = reply[j:j + 4]
                key, (queue, exchange), level = streams[int(i) - 1]
                out.append(Delivery(queue, level, key, entry_id, int(deliveries), payload,
                                    exchange))
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
                 exchange: str | None = None, consumer: str = ANY_OWNER) -> Call | None:
        """The ack call, or None when there is nothing to ack. ``consumer``: only entries it
        still owns are acked (a channel's own name); ANY_OWNER: whoever owns them."""
        if exchange:
            ids = [entry_id for _, entry_id in entries]
            if not ids:
                return None
            return SCRIPTS['fanout_ack'], [self.keys.fanout(exchange)], [queue, consumer, *ids]
        streams, pairs = self._entry_args(entries)
        if not pairs:
            return None
        return SCRIPTS['ack'], streams, [queue, consumer, *pairs]

    def ack_calls(self, queue: str, entries: Iterable[tuple[str, Any]],
                  exchange: str | None = None, consumer: str = ANY_OWNER) -> list[Call]:
        """The ack calls, one per CHUNK entries (each call's work stays bounded)."""
        entries = list(entries)
        calls = [self.ack_call(queue, entries[j:j + CHUNK], exchange, consumer)
                 for j in range(0, len(entries), CHUNK)]
        return [call for call in calls if call is not None]

    def ack(self, queue: str, entries: Iterable[tuple[str, Any]],
            exchange: str | None = None, consumer: str = ANY_OWNER) -> int:
        """Acknowledge entries, given as (stream key, id): deleted from the queue's streams;
        on a fanout exchange's stream (``exchange``), trimmed once every group is done.
        ``consumer``: only those it still owns (the others are logged); ANY_OWNER: all."""
        calls = self.ack_calls(queue, entries, exchange, consumer)
        return self.settled(calls, self.run_all(calls), 'ack')

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

    def requeue(self, queue: str, entries: Iterable[tuple[Any, ...]],
                exchange: str | None = None, consumer: str = ANY_OWNER) -> int:
        """Give delivered entries back; they are served first in their level.

        Entries are (stream key, id) or (stream key, id, delivery count to keep).
        ``consumer``: only those it still owns (the others are logged); ANY_OWNER: all.
        """
        calls = self.requeue_calls(queue, entries, exchange, consumer)
        return self.settled(calls, self.run_all(calls), 'requeue')

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

    def renew(self, queue: str, consumer: str, entries: Iterable[tuple[str, Any]]
              ) -> list[tuple[str, bytes]]:
        """Extend leases this consumer still holds; returns the (stream, id) it lost."""
        calls = self.renew_calls(queue, consumer, entries)
        replies = self.run_all([call for call, _ in calls])
        return [(stream, entry_id) for (_, stream), lost in zip(calls, replies)
                for entry_id in lost]

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

    def reclaim(self, queue: str, lease_ms: int, budget: int,
                cursors: Sequence[str] | None = None, consumer_expiry_ms: int = 0,
                exchange: str | None = None) -> Reclaimed:
        """Move messages whose lease ran out back to the queue (or to its group on a fanout
        ``exchange``): those of consumers that stopped, then what the sweep finds."""
        call, parse = self.reclaim_call(queue, lease_ms, budget, cursors, consumer_expiry_ms,
                                        exchange)
        return parse(self.run(call))

    # -- dead letters ------------------------------------------------------------------------

    def dead_letter_call(self, queue: str, stream: str, entry_id: Any, reason: str,
                         deliveries: int, exchange: str | None = None,
                         consumer: str = ANY_OWNER) -> Call:
        """The deadletter call; ``consumer``: only while it owns the entry (a channel's own
        name); ANY_OWNER: whoever owns it."""
        dlq = self.keys.fanout_dlq(exchange, queue) if exchange else self.keys.dlq(queue)
        return SCRIPTS['deadletter'], [stream, dlq], [queue, consumer, entry_id, reason,
                                                      deliveries, '1' if exchange else '0']

    def dead_letter(self, queue: str, stream: str, entry_id: Any, reason: str,
                    deliveries: int, exchange: str | None = None,
                    consumer: str = ANY_OWNER) -> int:
        """Set one delivered entry aside; ``exchange``: it sits in that fanout stream;
        ``consumer``: only while it owns it (else logged); ANY_OWNER: whoever does.
        1 if it was moved, else 0."""
        call = self.dead_letter_call(queue, stream, entry_id, reason, deliveries, exchange,
                                     consumer)
        return self.settled([call], [self.run(call)], 'dead-letter')

    def redrive_call(self, queue: str, count: int, ids: Sequence[Any] = ()) -> Call:
        keys = [self.keys.dlq(queue), *self.streams(queue), self.keys.wake(queue),
                self.keys.ready(queue)]
        return SCRIPTS['redrive'], keys, [count, *ids]

    def redrive(self, queue: str, count: int, ids: Sequence[Any] = ()) -> tuple[int, int]:
        """Move up to ``count`` dead letters (or just ``ids``) back; returns (moved, skipped)."""
        moved, skipped = self.run(self.redrive_call(queue, count, ids))
        return int(moved), int(skipped)

    def redrive_all(self, queue: str) -> tuple[int, int]:
        """Move every dead letter filed so far back (one filed meanwhile stays), by id in
        redrive calls of at most PAGE, so that letters which cannot move (no message, or
        from another queue) are counted once; returns (moved, skipped)."""
        newest = self.newest_dead_letter(queue)
        moved, skipped, start = 0, 0, '-'
        while newest:
            ids = [entry_id for entry_id, _ in self.dead_letters(queue, PAGE, start, newest)]
            if not ids:
                break
            m, s = self.redrive(queue, len(ids), ids)
            moved, skipped, start = moved + m, skipped + s, f'({text(ids[-1])}'
        return moved, skipped

    def dead_letters(self, queue: str, count: int = 100, start: str = '-', end: str = '+'
                     ) -> list[tuple[Any, dict[Any, Any]]]:
        """Up to ``count`` dead letters of a queue as (id, fields), oldest first, from
        ``start`` to ``end`` (stream ids, inclusive; '(' before one: exclusive), read in
        XRANGE pages of at most PAGE."""
        dlq = self.keys.dlq(queue)
        out: list[tuple[Any, dict[Any, Any]]] = []
        while len(out) < count:
            want = min(count - len(out), PAGE)
            page = self.client.xrange(dlq, start, end, count=want)
            out += page
            if len(page) < want:
                break
            start = f'({text(page[-1][0])}'
        return out

    def newest_dead_letter(self, queue: str) -> str | None:
        """The id of a queue's newest dead letter, None when it has none."""
        newest = self.client.xrevrange(self.keys.dlq(queue), '+', '-', count=1)
        return text(newest[0][0]) if newest else None

    def purge_dead_letters(self, queue: str, through: str) -> int:
        """Delete a queue's dead letters up to id ``through`` (inclusive; letters filed later
        stay), whole stream nodes at a time in steps of at most PAGE entries (XTRIM MINID ~
        LIMIT), then what is left of the last node. Returns how many were deleted."""
        dlq, total = self.keys.dlq(queue), 0
        ms, _, seq = through.partition('-')
        minid = f'{ms}-{int(seq or 0) + 1}'
        while True:
            trimmed = int(self.client.xtrim(dlq, minid=minid, approximate=True, limit=PAGE))
            total += trimmed
            if not trimmed:
                break
        return total + int(self.client.xtrim(dlq, minid=minid, approximate=False))

    # -- migration from Kombu's Redis transport ---------------------------------------------

    def migrate_list_call(self, source: str, queue: str, list_level: int, count: int,
                          skip: int = 0
                          ) -> tuple[Call, Callable[[Any], tuple[int, int, int, list[bytes]]]]:
        """The migrate call for Kombu's list ``source`` (see :meth:`migrate_list`), and the
        function that decodes its reply."""
        keys = [source, *self.streams(queue), self.keys.wake(queue), self.keys.ready(queue)]
        args = [int(count), int(skip), self.levels.index(list_level) + 1, *self.levels]

        def parse(reply: Any) -> tuple[int, int, int, list[bytes]]:
            moved, kept, left, *malformed = reply
            return int(moved), int(kept), int(left), malformed

        return (SCRIPTS['migrate'], keys, args), parse

    def migrate_list(self, source: str, queue: str, list_level: int, count: int,
                     skip: int = 0) -> tuple[int, int, int, list[bytes]]:
        """Move up to ``count`` of the oldest messages of Kombu's list ``source`` (full key
        name) into ``queue``, each to its priority's level (``list_level`` when it has none),
        passing over ``skip`` malformed entries at the list's oldest end. Returns (moved,
        kept, list length left, the malformed entries met), see migrate.lua."""
        call, parse = self.migrate_list_call(source, queue, list_level, count, skip)
        return parse(self.run(call))

    def migrate_unacked_call(self, unacked: str, unacked_index: str, tag: Any, raw: Any,
                             payload: str | bytes, targets: Sequence[tuple[str, int]]
                             ) -> Call:
        keys = [unacked, unacked_index]
        for queue, level in targets:
            keys += [self.keys.stream(queue, level), self.keys.wake(queue),
                     self.keys.ready(queue)]
        return SCRIPTS['migrate_unacked'], keys, [tag, raw, payload]

    def migrate_unacked(self, unacked: str, unacked_index: str, tag: Any, raw: Any,
                        payload: str | bytes, targets: Sequence[tuple[str, int]]) -> bool:
        """Restore Kombu's unacked message ``tag`` (hash value ``raw`` as read) as
        ``payload`` into each (queue, level) of ``targets``; False when it changed or left
        the hash in the meantime (nothing written)."""
        return bool(self.run(self.migrate_unacked_call(unacked, unacked_index, tag, raw,
                                                       payload, targets)))

    # -- introspection (read-only, for operator tools) -------------------------------------

    def same_database(self, client: Any) -> bool:
        """Whether ``client`` (redis-py, one server) reaches this broker's server (INFO
        run_id) and database."""
        def where(c: Any) -> tuple[str, int]:
            return (text(c.info('server')['run_id']),
                    int(c.connection_pool.connection_kwargs.get('db') or 0))
        return where(client) == where(self.client)

    def discover(self, kind: str, limit: int = 1000, calls: int = 10000
                 ) -> tuple[list[str], bool]:
        """Names of the queues (kind 'q') or fanout exchanges (kind 'x') under the prefix, by
        SCAN (COUNT 1000 per call; every primary in turn on Cluster), sorted; and whether
        the search was complete (it stops after ``limit`` names or ``calls`` SCAN calls)."""
        match = self.keys.kind_pattern(kind)[0]
        names: set[str] = set()

        def take(keys: Iterable[Any]) -> bool:  # False once the limit is reached
            for key in map(text, keys):
                name = self.keys.kind_name(kind, key)
                if name is not None:
                    names.add(name)
                    if len(names) >= limit:
                        return False
            return True

        if self.keys.cluster:
            complete = take(self.client.scan_iter(match=match, count=1000))
            return sorted(names), complete
        cursor, n = 0, 0
        while True:
            cursor, found = self.client.scan(cursor, match=match, count=1000)
            n += 1
            if not take(found):
                return sorted(names), False
            if not cursor:
                return sorted(names), True
            if n >= calls:
                return sorted(names), False

    def inspect_call(self, queue: str) -> tuple[Call, Callable[[Any], dict[str, Any]]]:
        """The inspect call (read-only) for a queue, and the function that decodes its reply
        (see :meth:`inspect`)."""
        keys = [*self.streams(queue), self.keys.dlq(queue), self.keys.delayed(queue)]

        def parse(reply: Any) -> dict[str, Any]:
            records, dlq, now, delayed, next_due = reply
            levels: list[dict[str, Any]] = []
            consumers: dict[str, dict[str, Any]] = {}
            for key, rec in zip(keys, records):
                level, exists, length, ready, held, pending, oldest, flat, last = rec
                level_consumers = []
                for j in range(0, len(flat), 3):
                    name, owns, idle = text(flat[j]), int(flat[j + 1]), int(flat[j + 2])
                    level_consumers.append({'name': name, 'pending': owns, 'idle_ms': idle})
                    seen = consumers.setdefault(name, {'name': name, 'pending': 0,
                                                       'idle_ms': idle})
                    seen['pending'] += owns
                    seen['idle_ms'] = min(seen['idle_ms'], idle)
                levels.append({
                    'level': int(level), 'stream': key, 'exists': bool(exists),
                    'length': int(length), 'ready': int(ready), 'held': int(held),
                    'pending': int(pending),
                    'oldest_ready_ms': None if oldest < 0 else int(oldest),
                    'last_delivered_id': text(last) or None,
                    'consumers': level_consumers,
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
                'delayed': int(delayed),
                'next_due_ms': None if next_due < 0 else int(next_due),
                'levels': levels,
                'time_ms': int(now),
            }

        return (SCRIPTS['inspect'], keys, [queue, HOLDER, *self.levels]), parse

    def inspect(self, queue: str) -> dict[str, Any]:
        """A read-only snapshot of a queue (inspect.lua): per level its ready, held (requeued
        or reclaimed, part of ready), pending (delivered, unacked) messages, consumers and
        the age of the oldest ready message in ms (None when none is ready); the totals; the
        dead-letter stream's length; the delayed messages and ms until the next is due
        (``next_due_ms``, None when none); ``exists`` (any of its streams exists)."""
        call, parse = self.inspect_call(queue)
        return parse(self.run(call))

    def inspect_fanout_call(self, exchange: str, cap: int = 1000
                            ) -> tuple[Call, Callable[[Any], dict[str, Any]]]:
        """The inspect_fanout call (read-only), and the function that decodes its reply (see
        :meth:`inspect_fanout`)."""
        stream = self.keys.fanout(exchange)

        def parse(reply: Any) -> dict[str, Any]:
            exists, length, now, records = reply
            groups = []
            for name, consumers, pending, lag, capped, oldest, last in records:
                groups.append({
                    'group': text(name), 'consumers': int(consumers),
                    'pending': int(pending), 'lag': int(lag), 'lag_capped': bool(capped),
                    'oldest_unread_ms': None if oldest < 0 else int(oldest),
                    'last_delivered_id': text(last),
                })
            return {'exchange': exchange, 'stream': stream,
                    'exists': bool(exists), 'length': int(length),
                    'groups': sorted(groups, key=lambda g: g['group']), 'time_ms': int(now)}

        return (SCRIPTS['inspect_fanout'], [stream], [int(cap)]), parse

    def inspect_fanout(self, exchange: str, cap: int = 1000) -> dict[str, Any]:
        """A read-only snapshot of a fanout exchange's stream (inspect_fanout.lua): per bound
        queue's group its lag (entries not read yet, counted up to ``cap``; ``lag_capped``
        when there were more and the server could not tell how many), pending (delivered,
        unacked), consumers and the age of its oldest unread entry in ms."""
        call, parse = self.inspect_fanout_call(exchange, cap)
        return parse(self.run(call))

    def peek_call(self, queue: str, count: int = 10, cursor: PeekCursor = (1, 'h', '')
                  ) -> tuple[Call, Callable[[Any], tuple[list[Ready], PeekCursor | None]]]:
        """The peek call (read-only) for the next ``count`` (at most PEEK_MAX) ready messages
        of a queue from ``cursor``, and the function that decodes its reply: the messages and
        where the next page starts (None: there are no more)."""
        streams = self.streams(queue)
        count = max(1, min(int(count), PEEK_MAX))
        index, part, after = cursor

        def parse(reply: Any) -> tuple[list[Ready], PeekCursor | None]:
            out = []
            for j in range(3, len(reply), 4):
                i, entry_id, held, payload = reply[j:j + 4]
                out.append(Ready(self.levels[int(i) - 1], streams[int(i) - 1],
                                 text(entry_id), bool(int(held)), payload))
            at = int(reply[0])
            return out, (at, text(reply[1]), text(reply[2])) if at else None

        return (SCRIPTS['peek'], streams, [queue, HOLDER, count, index, part, after]), parse

    def peek(self, queue: str, count: int = 10) -> list[Ready]:
        """The next ``count`` ready messages of a queue, in the order a read would serve them
        (peek.lua: per level in priority order, requeued ones first), without changing
        anything; in calls of at most PEEK_MAX."""
        out: list[Ready] = []
        cursor: PeekCursor | None = (1, 'h', '')
        while cursor is not None and len(out) < count:
            call, parse = self.peek_call(queue, count - len(out), cursor)
            page, cursor = parse(self.run(call))
            out += page
        return out
