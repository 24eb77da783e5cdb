"""Reads sent behind waits: an idle channel's wait (a BZPOPMIN on its wake markers, see
:mod:`kombu_streams.waits`) carries the channel's read.lua call on the same connection, so
Redis runs the read as soon as the wait is answered and a wake-up delivers in one round
trip, not two. Why no wake-up is lost, and what else must hold: docs/design.rst, "A wait
carries its read".
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import Any, Callable, NamedTuple

from .broker import ReadResult, Source
from .consume import Consuming
from .plan import READ_ALL
from .scripts import Call

logger = logging.getLogger('kombu_streams.channel')


class CarriedRead(NamedTuple):
    """A read sent behind a wait on its channel's wake markers (Broker.send_wait), so that
    a wake-up delivers in one round trip. Every source of the wait is read in mode POPPED
    (or WALK when the plan sweeps it): the wait may pop any one of their markers, and which
    is not known when the read is sent. read.lua then sets each marker again where it did
    not see the source dry, as after a pop, so the popped one needs nothing more; a marker
    set again that nobody popped costs one read that finds nothing (docs/design.rst, "A
    wait carries its read"). Its credit is the channel's, reserved until the reply is taken
    (or the wait ends without one), so reads meanwhile take only the rest."""

    channel: Any
    call: Call
    parse: Callable[[list[Any]], ReadResult]
    modes: dict[Source, str]
    credit: int
    #: before the wait was sent: the read runs later, so its leases are taken to start then
    #: (sooner than they do: never renewed late)
    sent_at: float

    def drop(self) -> None:
        """The wait ended without sending it, or without a reply: its credit is free."""
        self.channel.drop_carried(self)

    def take(self, reply: Any) -> bool:
        """Its reply, to the channel (see Carrying.take_carried)."""
        return bool(self.channel.take_carried(self, reply))

    def recover(self) -> None:
        """Its reply is lost (see Carrying.recover_carried)."""
        self.channel.recover_carried(self)


class Carrying(Consuming):
    """The part of :class:`kombu_streams.channel.Channel` that makes and takes carried
    reads; it owns the credit they reserve."""

    #: credit reserved by reads sent behind waits and not answered yet
    _reserved = 0

    def _credit(self) -> int:
        """How many messages the next read may take: what carried reads left."""
        return super()._credit() - self._reserved

    def carried_read(self, sources: list[Source], block: float) -> CarriedRead | None:
        """A read of ``sources`` (all this channel's, those of one wait on their markers,
        for at most ``block`` seconds) for the wait to carry, its credit reserved. None when
        it should not carry one: no credit; more sources than READ_ALL (each read in full
        after every wake-up and timeout would cost more than the round trip it saves);
        Redis Cluster (a wait per slot, reads through the cluster client); a consumer that
        takes one message at a time as its application allows (see Consuming._credit)."""
        if (self.closed or len(sources) > READ_ALL or self.transport.cluster
                or not self._consumers or 'can_consume' in vars(self.qos)):
            return None
        credit = self._credit()
        if credit <= 0:
            return None
        modes = self.plan.carried_modes(sources, block)
        call, parse = self.broker.read_call(
            sources, self.consumer_name, credit, self.max_deliveries, self._expires, modes,
            max_bytes=int(self.max_read_bytes), hints=self.plan.sizes)
        self._reserved += credit
        return CarriedRead(self, call, parse, modes, credit, monotonic())

    def drop_carried(self, carried: CarriedRead) -> None:
        """The wait that carried ``carried`` ended without its reply: its credit is free."""
        self._reserved -= carried.credit

    def recover_carried(self, carried: CarriedRead) -> None:
        """A wait whose read may have run ended without its reply (its connection died or
        went silent): what the read took is owned by this channel's consumer in the PEL,
        and known nowhere. Every entry of the wait's sources that the consumer owns and the
        channel does not know (in flight, or an ack not sent) is given back now, its count
        lowered by the delivery nobody saw, instead of when its lease runs out (an hour by
        default). Owned and unknown can only be what such a read took: the consumer's name
        is this channel's own. On another connection than the wait's: the pool's, which the
        caller renewed. Fails with the connection error when Redis cannot be reached."""
        self._reserved -= carried.credit
        self._give_back_unknown(carried)

    def hand_out_later(self) -> None:
        """A wait of this channel was ended early and its read's messages buffered: on an
        event loop nothing else hands them out before the next wake-up, so the next loop
        turn does (as after a read that took all it was allowed)."""
        if self.consumer_state.buffered():
            self.more_ready = True

    def _give_back_unknown(self, carried: CarriedRead) -> None:
        """Give back what this channel's consumer owns in ``carried``'s sources and the
        channel does not know (see recover_carried)."""
        sources = list(carried.modes)
        known = self.consumer_state.known()
        owned = self.broker.owned(sources, self.consumer_name, carried.credit + len(known))
        orphans: dict[Source, list[tuple[str, Any, int]]] = {}
        for source, stream, entry_id, count in owned:
            if (stream, entry_id) not in known:
                orphans.setdefault(source, []).append((stream, entry_id, max(count - 1, 0)))
        for (queue, exchange), entries in orphans.items():
            self.broker.requeue(queue, entries, exchange, consumer=self.consumer_name)
        if orphans:
            logger.info('kombu-streams: a wait\'s connection died after its read ran: gave '
                        'back %d message(s) it took', sum(map(len, orphans.values())))

    def take_carried(self, carried: CarriedRead, reply: Any) -> bool:
        """The reply of a read a wait carried: its messages go to the read-ahead buffer,
        in flight (a closed channel, or a cancelled queue's, returns them to their queue at
        once). False when Redis answered it with an error (NOSCRIPT after a restart or
        SCRIPT FLUSH, or anything else): then it read nothing, and the caller follows the
        wake-up with a read of its own, which loads the script or raises the error."""
        self._reserved -= carried.credit
        if isinstance(reply, BaseException) or reply is None:
            logger.debug('kombu-streams: the read a wait carried failed: %r', reply)
            return False
        out: list[tuple[dict[str, Any], str]] = []
        try:
            taken, _, _ = self._take_read(carried.modes, carried.parse(reply), carried.sent_at,
                                          out, int(self.max_read_bytes), 0)
            self.more_ready = taken >= carried.credit or self._bytes_cut
        except BaseException:
            # taken in part (a reply that does not parse, a big body not fetched): what is
            # not in flight here would wait in the PEL for its lease
            try:
                self._give_back_unknown(carried)
            except Exception as exc:
                logger.warning('kombu-streams: messages a wait\'s read took could not be '
                               'given back (%r): they come back when their lease runs out',
                               exc)
            raise
        finally:
            self.consumer_state.buffer(out)
            if out and self.connection is not None:
                self.connection.leases.start()
            for queue in {q for _, q in out}:
                if self.closed or queue not in self._active_queues:
                    self._return_buffered(queue)
        return True


__all__ = ('Carrying', 'CarriedRead')
