"""The hot path's script calls: read (with the acks that ride in it), ack and renew.

Split from :mod:`kombu_streams.calls` (which re-exports everything here): these run for
every message a channel consumes, so what of a read call's KEYS and ARGV does not change
between calls of the same sources (the streams, the per-source keys, which source each
stream belongs to) is laid out once per set of sources and kept (:class:`ReadLayout`); a
call only fills in what changes (COUNT, the byte budget, each source's mode, ttl and size
hint, the riding acks). Nothing here talks to Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from .keys import Keys
from .options import READ_BYTES
from .replies import Delivery, ReadResult, _id_order
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
#: Most read layouts a Calls keeps (one per set of sources read together; a channel has a
#: handful), and most publish layouts (one per queue and level). Past it they are all
#: dropped and laid out again as needed.
LAYOUTS_KEPT = 64


class ReadLayout(NamedTuple):
    """What read.lua's KEYS and ARGV hold for one tuple of sources, whatever the call."""

    #: KEYS: the streams in serving order, then twelve keys per source
    keys: tuple[str, ...]
    #: (stream key, source, level) per stream, in serving order (KEYS[1..S])
    streams: tuple[tuple[str, Source, int], ...]
    #: (source, queue, 'q' or 'f') per source, for its ARGV group
    sources: tuple[tuple[Source, str, str], ...]
    #: stream key -> its index in KEYS, for the streams whose acks may ride in the call
    position: dict[str, int]
    #: the same streams, as :meth:`ReadCalls.ack_merges` answers
    mergeable: frozenset[str]


class CallsBase:
    """The script calls for queues laid out by ``keys`` with priority ``levels``: the part
    every builder needs."""

    def __init__(self, keys: Keys, levels: Sequence[int]) -> None:
        self.keys = keys
        self.levels = list(levels)
        self._read_layouts: dict[tuple[Source, ...], ReadLayout] = {}
        #: (queue, level, full) -> a publish's KEYS but the big hash (Calls.publish_call)
        self._publish_keys: dict[tuple[str, int, bool], tuple[str, ...]] = {}
        #: queues whose publishes send all their streams (a length limit; Calls.widen)
        self._limited: set[str] = set()
        #: queues with x-fairness: every publish sends a group (Calls.widen)
        self._fair: set[str] = set()

    def streams(self, queue: str) -> list[str]:
        return self.keys.streams(queue, self.levels)

    def wake(self, queue: str, exchange: str | None = None) -> str:
        """The wake marker of a queue, or of its group on a fanout exchange."""
        return self.keys.fanout_wake(exchange, queue) if exchange else self.keys.wake(queue)


class ReadCalls(CallsBase):
    """The read, ack and renew calls."""

    @staticmethod
    def _ack_args(entries: Iterable[tuple[Any, ...]]) -> tuple[list[str], list[Any]]:
        """(streams, [k, id, k, id, ...]) for acks given as (stream key, id[, trusted]): k
        is the stream's index, negative for an ack the consumer knows it may make without
        the ownership lookup (see ack.lua and InFlight.surely_held)."""
        streams: list[str] = []
        index: dict[str, int] = {}  # stream -> its k
        flat: list[Any] = []
        for entry in entries:  # indexed: no list made per entry
            stream = entry[0]
            k = index.get(stream)
            if k is None:
                streams.append(stream)
                k = index[stream] = len(streams)
            flat += (-k if len(entry) > 2 and entry[2] else k, entry[1])
        return streams, flat

    def read_layout(self, sources: Sequence[Source]) -> ReadLayout:
        """The read layout of ``sources`` (laid out on first use, then kept)."""
        key = tuple(sources)
        layout = self._read_layouts.get(key)
        if layout is None:
            if len(self._read_layouts) >= LAYOUTS_KEPT:
                self._read_layouts.clear()
            layout = self._read_layouts[key] = self._lay_out_read(key)
        return layout

    def _lay_out_read(self, sources: tuple[Source, ...]) -> ReadLayout:
        # (stream key, source, level), in the order to serve them
        streams: list[tuple[str, Source, int]] = [
            (self.keys.fanout(ex), (q, ex), self.levels[0]) for q, ex in sources if ex]
        own = [q for q, ex in sources if not ex]
        streams += [(self.keys.stream(q, level), (q, None), level)
                    for level in self.levels for q in own]
        keys = [s[0] for s in streams]
        for q, ex in sources:
            if ex:  # no ready index, delayed set or big messages for a group on a fanout stream
                wake = self.wake(q, ex)
                keys += [wake, self.keys.fanout_dlq(ex, q), *[wake] * 10]
            else:  # the key store: a delayed message moved keeps its x-unique-key; the
                # in-flight flag (x-max-in-flight, lua/lib/inflight.lua); the staging
                # hash last (x-fairness, lua/lib/fair.lua)
                keys += [self.keys.wake(q), self.keys.dlq(q), self.keys.ready(q),
                         self.keys.delayed(q), self.keys.delayed_messages(q),
                         self.keys.big(q), self.keys.counters(q), self.keys.args(q),
                         self.keys.rate(q), self.keys.unique(q), self.keys.capped(q),
                         self.keys.fair(q)]
        position = {key: i + 1 for i, (key, (_, ex), _) in enumerate(streams) if not ex}
        return ReadLayout(tuple(keys), tuple(streams),
                          tuple((src, src[0], 'f' if src[1] else 'q') for src in sources),
                          position,
                          frozenset(position))

    def read_call(self, sources: Sequence[Source], consumer: str, count: int,
                  max_deliveries: int = 0, ttls: dict[str, int] | None = None,
                  modes: dict[Source, str] | None = None,
                  acks: Sequence[tuple[Any, ...]] = (), max_bytes: int = READ_BYTES,
                  hints: Mapping[Source, int] | None = None
                  ) -> tuple[Call, Callable[[list[Any]], ReadResult]]:
        """The read call for ``sources`` (see :meth:`sources`), each read as ``modes`` says
        (READ, POPPED, GATED or WALK; READ by default), and the function that decodes its
        reply. ``acks``: (stream key, entry id[, trusted[, x-unique-key]]) of messages
        ``consumer`` acks in the same call (only those it still owns are acked, as
        :meth:`ack_call` says; a key, '' for none, is released with its entry); each
        stream must be one of a queue source's own (see :meth:`ack_merges`). ``max_bytes``:
        the call's byte budget (one message bigger than it is still delivered, alone);
        ``hints``: per source, the bytes expected of its largest entry (unknown: the first
        batch is one entry), which sizes the call's first batch of it (see read.lua)."""
        ttls, modes, hints = ttls or {}, modes or {}, hints or {}
        layout = self.read_layout(sources)
        streams = layout.streams
        args: list[Any] = [consumer, count, HOLDER, max_deliveries, len(streams), len(sources),
                           max(int(max_bytes), 1)]
        for src, q, kind in layout.sources:
            args += (q, kind, modes.get(src, READ), ttls.get(q, 0), int(hints.get(src, 0)))
        args.append(len(acks))
        position = layout.position
        keyed: list[Any] = []
        for j, ack in enumerate(acks, 1):  # (stream, id[, trusted[, key]]): no list per ack
            k = position[ack[0]]
            args += (-k if len(ack) > 2 and ack[2] else k, ack[1])
            if len(ack) > 3 and ack[3]:
                keyed += (j, ack[3])
        if keyed:  # ARGV[9+5Q+2A]: U, then (ack number, x-unique-key) pairs
            args.append(len(keyed) // 2)
            args += keyed

        def parse(reply: list[Any]) -> ReadResult:
            status, problems, aside, dues = text(reply[0]), reply[1], reply[2], reply[3]
            unsettled = reply[4]
            out: list[Delivery] = []
            append = out.append
            if (len(reply) - 5) % 4:
                raise ValueError(f'read: a reply of {len(reply)} items, not 5 + 4 per entry')
            entries = iter(reply)
            for _ in range(5):  # the five fields before the entries
                next(entries)
            # four items an entry: zip over one iterator takes them without a slice each
            for i, entry_id, deliveries, payload in zip(entries, entries, entries, entries):
                key, (queue, exchange), level = streams[int(i) - 1]
                token = None
                if isinstance(payload, list):  # a big message: {token}, body not fetched yet
                    token, payload = payload[0], b''
                append(Delivery(queue, level, key, entry_id, int(deliveries), payload,
                                exchange, token))
            # problems, aside and unsettled are empty in almost every reply: no loop then
            return ReadResult(
                out, dict(zip(sources, status)),
                [(sources[int(problems[j]) - 1], text(problems[j + 1]))
                 for j in range(0, len(problems), 2)] if problems else [],
                [(sources[int(aside[j]) - 1], streams[int(aside[j + 1]) - 1][0], aside[j + 2],
                  text(aside[j + 3])) for j in range(0, len(aside), 4)] if aside else [],
                {sources[int(dues[j]) - 1]: int(dues[j + 1]) for j in range(0, len(dues), 2)},
                {sources[int(unsettled[j]) - 1]: int(unsettled[j + 1])
                 for j in range(0, len(unsettled), 2)} if unsettled else {})

        return (SCRIPTS['read'], list(layout.keys), args), parse

    def ack_merges(self, sources: Sequence[Source]) -> frozenset[str]:
        """The streams whose acks may ride inside a read call of ``sources``."""
        return self.read_layout(sources).mergeable

    def ack_call(self, queue: str, entries: Iterable[tuple[str, Any]],
                 exchange: str | None = None, consumer: str = ANY_OWNER,
                 big: bool = False, unique: Sequence[str] | None = None) -> Call | None:
        """The ack call, or None when there is nothing to ack. ``consumer``: only entries it
        still owns are acked (a channel's own name; an entry given as (stream, id, True) is one
        it surely still owns, acked without looking); ANY_OWNER: whoever owns them. ``big``:
        the entries may be big messages', whose bodies go with them (each entry is looked
        up: a channel sends only its big messages' acks so, see ack.lua). ``unique``: the
        x-unique-key of each entry, in order ('' for none), released with it: a channel sends
        only the acks of messages with a key so (kombu_streams/unique.py). Every ack of a
        queue's own streams takes the queue's in-flight flag and marker last (mode letter
        'c'): one that frees a slot of a queue its x-max-in-flight stopped wakes a consumer
        (lua/lib/inflight.lua)."""
        if exchange:  # fanout messages are never stored apart
            ids = [entry_id for _, entry_id, *_ in entries]
            if not ids:
                return None
            return SCRIPTS['fanout_ack'], [self.keys.fanout(exchange)], [queue, consumer, *ids]
        streams, pairs = self._ack_args(entries)
        if not pairs:
            return None
        k = self.keys
        keys = [*streams, k.big(queue)] if big else streams
        flag = [k.capped(queue), k.wake(queue)]
        if unique:
            return (SCRIPTS['ack'], [*keys, k.unique(queue), *flag],
                    [queue, consumer, 'buc' if big else 'uc', len(unique), *unique, *pairs])
        return SCRIPTS['ack'], [*keys, *flag], [queue, consumer, 'bc' if big else 'c', *pairs]

    def ack_calls(self, queue: str, entries: Iterable[tuple[str, Any]],
                  exchange: str | None = None, consumer: str = ANY_OWNER,
                  big: bool = False, unique: Sequence[str] | None = None) -> list[Call]:
        """The ack calls, one per CHUNK entries (each call's work stays bounded); with
        ``big`` one per LOOKUP_CHUNK (each entry is looked up, see :meth:`ack_call`)."""
        entries = list(entries)
        chunk = LOOKUP_CHUNK if big else CHUNK
        calls = [self.ack_call(queue, entries[j:j + chunk], exchange, consumer, big,
                               None if unique is None else unique[j:j + chunk])
                 for j in range(0, len(entries), chunk)]
        return [call for call in calls if call is not None]

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
