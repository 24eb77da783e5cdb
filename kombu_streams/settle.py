"""Settling what a channel delivered: acks (deferred on an event loop, riding with reads),
rejects, requeues and dead letters, each a script call naming the channel's consumer, so
only messages it still owns are settled (docs/design.rst, Leases); and Kombu's QoS, which
counts the read-ahead buffer against the prefetch limit."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from time import monotonic
from typing import Any

from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str

from .broker import (
    CHUNK,
)
from .scripts import Call, run_calls
from .state import InFlight, by_source

logger = logging.getLogger('kombu_streams.channel')

#: An ack that rides inside the next read call: (queue, stream, entry id, trusted,
#: x-unique-key or '').
Merged = tuple[str, str, bytes, bool, str]


#: How _settle disposes of messages.
ACK, REQUEUE, DEAD_LETTER = 'ack', 'requeue', 'dead-letter'


class QoS(virtual.QoS):
    """Prefetch accounting plus ack / reject / restore, each a script call.

    Messages read from Redis but not yet handed to the application (the channel's buffer)
    count against the prefetch limit, so a channel never holds more than it was allowed.
    """

    def _in_use(self) -> int:
        return len(self._delivered) - len(self._dirty) + self.channel.consumer_state.buffered()

    def can_consume(self) -> bool:
        pcount = self.prefetch_count
        return not pcount or self._in_use() < pcount

    def can_consume_max_estimate(self) -> int | None:
        pcount = self.prefetch_count
        if pcount:
            return max(pcount - self._in_use(), 0)
        return None

    def ack(self, delivery_tag: str) -> None:
        self.channel._ack(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel._requeue_delivered([delivery_tag])
        else:
            mode = DEAD_LETTER if self.channel.dead_letter_rejected else ACK
            self.channel._settle([delivery_tag], mode)
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Requeue every delivered, unacked message in one script call per queue."""
        self._flush()
        tags = list(self._delivered)
        errors: list[tuple[BaseException, Any]] = []
        try:
            self.channel._settle(tags, REQUEUE)
        except Exception as exc:  # the messages stay in the PEL: reclaim will bring them back
            errors = [(exc, self._delivered[tag]) for tag in tags]
        self._delivered.clear()
        return errors


class Settling(virtual.Channel):
    """The settling part of :class:`kombu_streams.channel.Channel`."""

    def _send_acks(self, acks: list[InFlight], calls: list[Call]) -> None:
        try:
            replies = run_calls(self.client, calls)
        except Exception:
            self._put_back(acks)
            raise
        self.broker.settled(calls, replies, ACK)  # logs acks left alone: lease lost

    def _put_back(self, acks: list[InFlight]) -> None:
        """Deferred acks whose sending failed: delayed again, never dropped."""
        self.consumer_state.put_back_acks(acks)

    def _ack(self, tag: str) -> None:
        """Ack now; or, on an event loop or from a drain_events callback, with the next read
        or before the next wait (Poller.on_tick, Poller.drain): one round trip then carries
        many acks. They are also sent when a consumer is cancelled, when the channel closes
        and by each lease keeper round. At-least-once holds either way: an ack not yet sent
        only means the message may be delivered again."""
        transport = self.connection
        if transport is None:  # closed: what it held was given back (or is reclaimed later)
            if self.consumer_state.get(tag) is None:
                logger.warning('kombu-streams: ack of message %s after its channel closed: '
                               'the channel gave it back at close, so it will be delivered '
                               'again', tag)
            self._settle([tag], ACK)  # else it is still ours: try to ack it
            return
        if not transport.cycle.batches_acks:
            self._settle([tag], ACK)
            return
        if self.consumer_state.defer_ack(tag):
            transport.leases.acks_waiting()  # sent within ACK_DELAY at the latest

    def _ack_calls(self, mergeable: set[str] | frozenset[str] = frozenset()
                   ) -> tuple[list[InFlight], list[Call], list[Merged]]:
        """Take the deferred acks: (the acks, script calls: one per source and CHUNK acks,
        and the (queue, stream, id, trusted, x-unique-key) of those on ``mergeable``
        streams, at most CHUNK, which ride inside the next read call instead: a key rides
        too, released by the read as an ack call would). A caller whose calls fail puts
        the acks back."""
        taken = self.consumer_state.take_acks()
        merged: list[Merged] = []
        alone: list[InFlight] = []
        lease, now = self.visibility_timeout, monotonic()
        for msg in taken:
            if (msg.stream in mergeable and msg.exchange is None and not msg.big
                    and len(merged) < CHUNK):
                merged.append((msg.queue, msg.stream, msg.entry_id,
                               msg.surely_held(lease, now), msg.unique))
            else:
                alone.append(msg)
        calls: list[Call] = []
        for (queue, exchange), msgs in by_source(alone, lambda m: m).items():
            calls += self._acks_of(queue, exchange, msgs)
        return taken, calls, merged

    def _acks_of(self, queue: str, exchange: str | None, msgs: list[InFlight]) -> list[Call]:
        """The ack calls for ``msgs`` of one source: big messages in calls of their own,
        which free their bodies (never riding with a read), so ordinary acks cost nothing
        more."""
        me, lease, now = self.consumer_name, self.visibility_timeout, monotonic()
        plain = [(m.stream, m.entry_id, m.surely_held(lease, now)) for m in msgs
                 if not m.big and not (m.unique and exchange is None)]
        big = [(m.stream, m.entry_id, m.surely_held(lease, now)) for m in msgs
               if m.big and not (m.unique and exchange is None)]
        calls = (self.broker.ack_calls(queue, plain, exchange, me)
                 + self.broker.ack_calls(queue, big, exchange, me, big=True))
        if exchange is None:  # messages with a unique key: their acks release it
            for is_big in (False, True):
                keyed = [m for m in msgs if m.unique and m.big == is_big]
                calls += self.broker.ack_calls(
                    queue, [(m.stream, m.entry_id, m.surely_held(lease, now)) for m in keyed],
                    None, me, big=is_big, unique=[m.unique for m in keyed])
        return calls

    def _merged_calls(self, merged: list[Merged]) -> list[Call]:
        """Ack calls for acks that were to ride with a read that did not run (those with a
        key in calls that release it)."""
        by_queue: dict[tuple[str, bool], list[tuple[str, bytes, bool]]] = {}
        keys: dict[str, list[str]] = {}
        for queue, stream, entry_id, trusted, key in merged:
            by_queue.setdefault((queue, bool(key)), []).append((stream, entry_id, trusted))
            if key:
                keys.setdefault(queue, []).append(key)
        return [c for (q, keyed), entries in by_queue.items()
                for c in self.broker.ack_calls(q, entries, None, self.consumer_name,
                                               unique=keys[q] if keyed else None)]

    def flush_acks(self) -> None:
        """Send deferred acks now."""
        acks, calls, _ = self._ack_calls()
        if calls:
            self._send_acks(acks, calls)

    def _settle(self, tags: Iterable[str], mode: str, read_ahead: Iterable[str] = (),
                reason: str = 'rejected') -> int:
        """Ack (delete), requeue or dead-letter messages: one script call per queue (per
        message to dead-letter), all in one round trip.

        ``read_ahead`` are tags of messages read but never handed to the application; they
        can only be requeued, and go back with their delivery count lowered by one.

        Each call names this channel's consumer, so only messages it still owns are settled:
        one whose lease ran out while this process was stopped or cut off belongs to another
        consumer now and is left to it (a requeue here would hand it to a third one while
        the second runs it). Those are logged once per queue.
        """
        handed = list(tags)
        unhanded = set(read_ahead)
        # with the delivery count to keep
        msgs = [(msg, msg.deliveries - 1 if tag in unhanded else msg.deliveries)
                for tag, msg in self.consumer_state.release([*handed, *unhanded])]
        me = self.consumer_name
        calls: list[Call] = []
        for (queue, exchange), group in by_source(msgs, lambda m: m[0]).items():
            entries = [(m.stream, m.entry_id, n) for m, n in group]
            if mode == REQUEUE:
                calls += self.broker.requeue_calls(queue, entries, exchange, me)
            elif mode == ACK:
                calls += self._acks_of(queue, exchange, [m for m, _ in group])
            else:
                calls += [self.broker.dead_letter_call(queue, m.stream, m.entry_id, reason,
                                                       deliveries, exchange, me, m.unique)
                          for m, deliveries in group]
        return self.broker.settled(calls, self.broker.run_all(calls), mode)

    def _set_aside(self, queue: str, stream: str, entry_id: bytes, deliveries: int,
                   exchange: str | None, reason: str, unique: str = '') -> None:
        """Move an entry this channel read to its queue's dead-letter stream, logging why."""
        logger.error('kombu-streams: moving entry %s of %s to the dead-letter stream of %r: %s',
                     bytes_to_str(entry_id), stream, queue, reason)
        try:
            self.broker.dead_letter(queue, stream, entry_id, reason[:1000], deliveries,
                                    exchange, self.consumer_name, unique)
        except Exception as exc:  # e.g. OOM: it stays pending and is reclaimed later
            logger.error('kombu-streams: could not dead-letter entry %s of %s: %r',
                         bytes_to_str(entry_id), stream, exc)

    def handler_failed(self, message: dict[str, Any], exc: BaseException) -> None:
        """The application's callback raised ``exc`` for ``message`` (Celery's strategy
        cannot take it, say): if the message is still unsettled it goes to the dead-letter
        stream now, instead of being redelivered into the same error (a crash loop)."""
        tag = message['properties']['delivery_tag']
        released = self.consumer_state.release([tag])
        if not released:
            logger.error('kombu-streams: the consumer callback raised %r for a message it had '
                         'already settled', exc, exc_info=exc)
            return
        msg = released[0][1]
        if tag in self.qos._delivered:
            self.qos._quick_ack(tag)  # gone from the prefetch count
        logger.error('kombu-streams: the consumer callback raised %r', exc, exc_info=exc)
        self._set_aside(msg.queue, msg.stream, msg.entry_id, msg.deliveries,
                        msg.exchange, f'consumer callback raised {exc!r}', msg.unique)

    def _requeue_delivered(self, tags: list[str]) -> int:
        """Requeue delivered messages together with the read-ahead of their queues, so the
        queue's order is as if nothing had been read ahead (Kombu's Redis transport order:
        a requeued message comes back before the ones behind it)."""
        queues = self.consumer_state.queues_of(tags)
        return self._settle(tags, REQUEUE, self.consumer_state.take_buffered(queues))

    def _return_buffered(self, queue: str | None = None) -> None:
        """Requeue messages read for ``queue`` (or all) but never handed to the application."""
        queues = None if queue is None else {queue}
        self._settle((), REQUEUE, self.consumer_state.take_buffered(queues))

    def _restore(self, message: Any) -> None:
        """Kombu's virtual channel would publish the message again (a copy, the original
        left in the PEL); our QoS never calls this, but whatever does gets a requeue."""
        self._requeue_delivered([message.delivery_tag])


__all__ = ('Settling', 'QoS', 'ACK', 'REQUEUE', 'DEAD_LETTER')
