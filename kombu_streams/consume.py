"""Reading for a channel's consumers: read.lua over the sources its read plan picks, with the
acks that ride along; the wake markers it waits on (the poller waits, see
:mod:`kombu_streams.poller`); the read-ahead buffer handed out message by message."""

from __future__ import annotations

import logging
from time import monotonic
from typing import Any

from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str

from .broker import (
    READ,
    Delivery,
    ReadResult,
    Source,
    warn_unsettled,
)
from .envelope import Unfit
from .envelope import check as check_envelope
from .leases import ACK_DELAY
from .scripts import Call, run_calls
from .settle import ACK
from .state import InFlight
from .unique import unique_key

logger = logging.getLogger('kombu_streams.channel')


#: Messages per read when the channel has no prefetch limit.
UNLIMITED_READ = 10

#: Deferred acks are sent, at the latest, when this many wait (see Settling._ack).
ACK_BATCH = 100


#: Largest body the envelope check's decoding is kept for (see Consuming.decode_body):
#: keeping a bigger one would double its memory while it waits in the read-ahead buffer.
KEEP_DECODED = 64 * 1024
#: Most decoded bodies kept at once (a read-ahead buffer's worth).
KEEP_MAX = 1000


class Consuming(virtual.Channel):
    """The consuming part of :class:`kombu_streams.channel.Channel`."""


    #: Bodies the envelope check decoded, kept for Kombu's Message to take instead of
    #: decoding them again: id(body) -> (body, encoding, decoded). Emptied before each
    #: read into an empty buffer: what is left then was handed out or dropped.
    _decoded: dict[int, tuple[Any, Any, Any]] | None = None

    def decode_body(self, body: Any, encoding: Any = None) -> Any:
        """A body as Kombu's Message decodes it (``body_encoding``: base64 for Kombu's
        virtual transports). One the envelope check decoded when it was read is taken
        from what the check kept, once, rather than decoded a second time."""
        kept = self._decoded
        if kept:
            hit = kept.pop(id(body), None)
            if hit is not None and hit[0] is body and hit[1] == encoding:
                return hit[2]
        return super().decode_body(body, encoding)

    def _check_decode(self, body: Any, encoding: Any) -> Any:
        """Decode ``body`` for the envelope check, keeping the result for decode_body."""
        decoded = super().decode_body(body, encoding)
        if decoded is not body and len(body) <= KEEP_DECODED:
            if self._decoded is None or len(self._decoded) >= KEEP_MAX:
                self._decoded = {}  # past KEEP_MAX something kept them: decode again
            self._decoded[id(body)] = (body, encoding, decoded)
        return decoded

    def give_back(self, sources: list[Source],
                  bindings: dict[str, tuple[tuple[str, str, Any], ...]] | None = None) -> None:
        """Set the popped wake markers of ``sources`` again (wake.lua, one call per slot
        group), each only where its source still exists and with its expiry: a fanout
        group's marker expires with its binding (from ``bindings``, default the ones read
        now), as a publish sets it."""
        members: dict[Source, str] = {}
        if bindings is None:
            bindings = self.consumer_state.reading.bindings
        for queue, exchange in sources:
            for ex, routing_key, args in bindings.get(queue, ()) if exchange else ():
                if ex == exchange and self.connection is not None:
                    _, pattern, _ = self.typeof(ex).prepare_bind(queue, ex, routing_key, args)
                    members[(queue, ex)] = self._binding_member(routing_key, pattern, queue)
        self.broker.give_back(sources, members)

    def _sources(self, queues: list[str]) -> list[Source]:
        """What a read of ``queues`` covers, in serving order. A queue read without being
        consumed (basic_get) has its fanout groups looked up now."""
        fanout = self.consumer_state.reading.fanout
        if any(q not in fanout for q in queues):
            fanout = {**fanout, **{q: self._fanout_of(q) for q in queues if q not in fanout}}
        return self.broker.sources(queues, fanout)

    def wake_keys(self) -> dict[str, Source]:
        """Wake marker -> source, for what this channel would read now (nothing while it is
        at its prefetch limit): its queues, and their groups on fanout exchanges, but not
        those suspended for a broken key."""
        if not self._consumers or self.closed or not self.qos.can_consume():
            return {}
        return {self.broker.wake(q, ex): (q, ex)
                for q, ex in self.plan.live(self.consumer_state.reading.sources)}

    def due_in(self) -> float | None:
        """Seconds until a delayed message of a source this channel would read now is due,
        as its reads have told (0: due already); None when none is known."""
        if not self.plan.due or not self._consumers or self.closed:
            return None
        at = self.plan.next_due(self.plan.live(self.consumer_state.reading.sources))
        return None if at is None else max(at - monotonic(), 0.0)

    def woke(self, key: str) -> bool:
        """The poller popped wake marker ``key``: read its source next. False when it is
        not one of this channel's."""
        source = self.wake_keys().get(key)
        if source is None:
            return False
        self.plan.woke(source)
        return True

    def marked(self, keys: set[str]) -> None:
        """These wake markers of this channel were seen set (the poller's look at the
        queues it has no wait for, on Redis Cluster): read their sources next."""
        wakes = self.wake_keys()
        self.plan.marked([wakes[k] for k in keys if k in wakes])

    def unread_wake(self, key: str) -> bool:
        """Whether the marker ``key`` this channel was woken by is still unread (no read
        came to cover its source: the channel ran out of credit); it is then forgotten, and
        the caller gives the wake-up back."""
        for source in list(self.plan.woken):
            if self.broker.wake(*source) == key:
                self.plan.woken.discard(source)
                return True
        return False

    def check_wakes(self) -> None:
        """A wait failed with WRONGTYPE: find which of this channel's markers holds another
        type, and suspend its source."""
        keys = self.wake_keys()
        for (key, source), kind in zip(keys.items(), self.broker.key_types(list(keys))):
            if kind not in ('zset', 'none'):
                self.plan.suspend(source, f'WRONGTYPE {key} holds a {kind}, not a zset')

    def next_delivery(self, read: bool = True) -> tuple[dict[str, Any], str] | None:
        """The next message for the application: from the buffer, or (``read``) read from
        Redis."""
        state = self.consumer_state
        if read and not state.buffered() and self._consumers and not self.closed:
            if self._decoded:
                self._decoded.clear()
            credit = self._credit()
            queues = self._queue_cycle.consume(len(self.active_queues))
            if credit > 0 and queues:
                got = self._read(queues, credit)
                self.more_ready = len(got) >= credit or self._bytes_cut
                state.buffer(got)
        if state.acks_due(ACK_BATCH, ACK_DELAY):
            self.flush_acks()  # the buffer may last: acks do not wait for the next read
        while True:
            item = state.next_buffered()
            if item is None:
                return None
            message, queue = item
            try:
                confirmed = self.leases.confirm(message['properties']['delivery_tag'])
            except BaseException:  # e.g. no connection: it stays first in the buffer
                state.unread(item)
                raise
            if confirmed:
                break  # else its lease was lost: another consumer has it now
        self._queue_cycle.rotate(queue)
        if queue in self._no_ack_queues:  # no_ack: settled the moment it is handed over
            self._settle([message['properties']['delivery_tag']], ACK)
        return message, queue

    def _credit(self) -> int:
        """How many messages the next read may take."""
        qos = self.qos
        if not qos.can_consume():
            return 0
        if 'can_consume' in vars(qos):
            # can_consume was replaced on this instance (Celery's worker_disable_prefetch
            # does so, to take a message only when a pool process is free): honour it
            # message by message, as Kombu's Redis transport does with one BRPOP each.
            return 1
        credit = qos.can_consume_max_estimate()
        credit = min(UNLIMITED_READ if credit is None else credit, self.max_read_batch)
        return credit

    def _read(self, queues: list[str], credit: int, planned: bool = True
              ) -> list[tuple[dict[str, Any], str]]:
        """Run read.lua over ``queues`` and decode what it delivered.

        ``planned``: cover the sources the read plan picks, each in its mode (see
        :mod:`kombu_streams.plan`); else read them all. One script call covers them, on one
        Redis; on Redis Cluster one call per hash slot, in serving order, each taking what
        credit and bytes (``max_read_bytes``) the ones before it left. Deferred acks ride
        along with the first call. If anything fails after messages were read, they go to
        the buffer (handed out next, or requeued at close) before the error is raised, and
        unsent acks are put back: nothing read is stranded, no ack dropped."""
        self.transport  # noqa: B018 (raises ChannelClosed on a closed channel)
        out: list[tuple[dict[str, Any], str]] = []
        sources = self._sources(queues)
        modes = self.plan.modes(sources) if planned else {s: READ for s in sources}
        groups = self.broker.slot_groups([s for s in sources if s in modes])
        mergeable = (self.broker.ack_merges(groups[0])
                     if self.consumer_state.has_acks() and groups and credit > 0 else set())
        acks, calls, merged = self._ack_calls(mergeable)
        budget, expect = int(self.max_read_bytes), 0
        self._bytes_cut = False
        try:
            for group in groups:
                if credit <= 0 or budget <= 0:
                    break
                read, parse = self.broker.read_call(
                    group, self.consumer_name, credit, self.max_deliveries, self._expires,
                    modes, [(stream, entry_id, trusted, key)
                            for _, stream, entry_id, trusted, key in merged],
                    max_bytes=budget, hints=self.plan.sizes)
                merged = []
                sent_at = monotonic()  # the leases start when the read runs, not after
                reply, failed = self._send_read(calls + [read], acks)
                acks, calls = [], []
                taken, budget, expect = self._take_read(modes, parse(reply), sent_at, out,
                                                        budget, expect)
                credit -= taken
                if failed is not None:
                    raise failed
            if calls or merged:  # no read ran (no credit): the acks go on their own
                self._send_acks(acks, calls + self._merged_calls(merged))
        except BaseException:
            self.consumer_state.buffer(out)
            raise
        finally:
            if out and self.connection is not None:
                self.connection.leases.start()
        return out

    def _take_read(self, modes: dict[Source, str], result: ReadResult, sent_at: float,
                   out: list[tuple[dict[str, Any], str]], budget: int, expect: int
                   ) -> tuple[int, int, int]:
        """Take in a read's reply (run at ``sent_at`` or later): big bodies fetched, the
        plan's news learnt, the messages appended to ``out``, in flight. Returns the number
        read, the byte budget left and the largest entry expected, as read.lua counts them
        (field m and payload, a big message's token too), setting ``_bytes_cut`` when the
        budget left is under that (read.lua stops so, see its batch())."""
        result = self._fetch_bodies(result)
        deliveries = result.deliveries
        # one pass for the sizes: the byte budget left, and each source's largest entry for
        # the plan's size hints (its payload and field)
        sizes = self.plan.sizes
        largest: dict[Source, int] = {}
        for delivery in deliveries:
            source = (delivery.queue, delivery.exchange)
            size = len(delivery.payload) + 1
            if size > largest.get(source, 0):
                largest[source] = size
            if delivery.token is not None:
                size += len(delivery.token)
            budget -= size
            if size > expect:
                expect = size
        for source in largest:  # the hints as they were before this read
            expect = max(expect, sizes.get(source, 0))
        self._bytes_cut = budget < expect
        self._learn(modes, result, largest)
        self._take_in(deliveries, sent_at, out)
        return len(deliveries), budget, expect

    def _take_in(self, deliveries: list[Delivery], sent_at: float,
                 out: list[tuple[dict[str, Any], str]]) -> None:
        """Decode and check ``deliveries`` (read at ``sent_at``), appending to ``out`` what a
        consumer can take, each in flight from now on (set aside: the others). Those decoded
        are put in flight together, under one lock, also when something raises half-way:
        whatever is in ``out`` is in flight."""
        decode, held = self._decode, []
        try:
            for delivery in deliveries:
                message = decode(delivery)
                if message is None:
                    continue
                held.append((message['properties']['delivery_tag'],
                             InFlight(delivery.queue, delivery.stream, delivery.entry_id,
                                      delivery.deliveries, delivery.exchange, sent_at, False,
                                      delivery.token is not None, unique_key(message))))
                out.append((message, delivery.queue))
        finally:
            self.consumer_state.hold_many(held)

    def _fetch_bodies(self, result: ReadResult) -> ReadResult:
        """``result`` with the bodies of its big messages fetched (Broker.bodies: one HGET
        each, one after the other). One whose body is gone (its hash or field deleted behind
        our back) is set aside to the dead-letter stream, logged once, and left out."""
        big = [(d.queue, d.token) for d in result.deliveries if d.token is not None]
        if not big:
            return result
        bodies: dict[tuple[str, bytes], bytes | None] = {}
        for queue in dict.fromkeys(q for q, _ in big):
            tokens = [t for q, t in big if q == queue]
            bodies.update(zip(((queue, t) for t in tokens), self.broker.bodies(queue, tokens)))
        out = []
        for d in result.deliveries:
            if d.token is None:
                out.append(d)
                continue
            body = bodies[(d.queue, d.token)]
            if body is None:
                self._set_aside(d.queue, d.stream, d.entry_id, d.deliveries, d.exchange,
                                f'big message body missing: no {bytes_to_str(d.token)} in '
                                f'{self.keys.big(d.queue)}')
                continue
            out.append(d._replace(payload=body))
        return result._replace(deliveries=out)

    def _learn(self, modes: dict[Source, str], result: ReadResult,
               largest: dict[Source, int] | None = None) -> None:
        """Take in a read's news: the plan's source states (``largest``: each source's
        largest entry read, if the caller measured it already), and a log line for each
        entry read.lua set aside (it cannot log) and for acks that rode along but found
        their lease lost (one line per queue)."""
        self.plan.learn(modes, result, largest)
        if not result.aside and not result.unsettled:  # almost every read
            return
        expired: dict[str, int] = {}
        for (queue, _), stream, entry_id, reason in result.aside:
            if reason == 'expired':  # past its TTL: as asked, so one line per queue
                expired[queue] = expired.get(queue, 0) + 1
                continue
            logger.warning('kombu-streams: moved entry %s of %s to the dead-letter stream of '
                           '%r: %s', bytes_to_str(entry_id), stream, queue, reason)
        for queue, n in expired.items():
            logger.info('kombu-streams: moved %d expired messages (TTL) of %r to its '
                        'dead-letter stream', n, queue)
        for (queue, _), left_alone in result.unsettled.items():
            warn_unsettled(queue, left_alone, ACK)

    def _send_read(self, calls: list[Call], acks: list[InFlight]
                   ) -> tuple[Any, BaseException | None]:
        """Send ack calls and the read (last, with the acks that ride inside it) in one round
        trip: (the read's reply, the first ack error). Acks whose call failed, or that may not
        have been sent, are put back (sending an ack twice is harmless); an error of the read
        itself is raised. Acks left alone (lease lost) are logged."""
        if len(calls) == 1:  # the read, perhaps with acks inside it
            script, keys, args = calls[0]
            try:
                return script(self.client, keys, args), None
            except Exception:
                self._put_back(acks)
                raise
        try:
            results = run_calls(self.client, calls, raise_errors=False)
        except Exception:
            self._put_back(acks)
            raise
        self.broker.settled(calls[:-1], results[:-1], ACK)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:  # an ack call or the read (which may carry acks) failed
            self._put_back(acks)
        if isinstance(results[-1], Exception):
            raise results[-1]
        return results[-1], failed

    def _decode(self, d: Delivery) -> dict[str, Any] | None:
        payload = d.payload
        try:  # bytes as kombu's bytes_to_str decodes them, without its call per message
            message = self._decode_envelope(
                payload.decode(errors='replace') if isinstance(payload, bytes) else payload)
            check_envelope(message, self._check_decode)
            props = message['properties']
            info = props.setdefault('delivery_info', {})
            info.setdefault('exchange', '')
            info.setdefault('routing_key', d.queue)
        except Exception as exc:  # not a message a consumer can take: set aside, never drop
            what = exc if isinstance(exc, Unfit) else repr(exc)
            self._set_aside(d.queue, d.stream, d.entry_id, d.deliveries, d.exchange,
                            f'not a message a consumer can take: {what}')
            return None
        props['delivery_tag'] = f'{self.channel_id}.{next(self._tags)}{self._tag_suffix}'
        redelivered = d.deliveries > 1
        info['redelivered'] = redelivered
        info['delivery_count'] = d.deliveries
        if redelivered:
            headers = message.get('headers')
            if isinstance(headers, dict):
                headers['redelivered'] = True
        return message


__all__ = ('Consuming',)
