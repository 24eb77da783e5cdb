"""The poller on an event loop (Celery's hub): each channel that may read gets its own
pending BZPOPMIN on its own connection, registered as a reader with the loop, so a channel
whose prefetch credit comes back (after acks) starts waiting on the next loop turn, whatever
the other channels are doing. A read happens on a wake-up, on the loop turn after a read that
took all it was allowed (more is probably ready), and at a delayed message's due time. The
waits themselves and why no wake-up is lost: :mod:`kombu_streams.poller`.
"""

from __future__ import annotations

import threading
from time import monotonic
from typing import TYPE_CHECKING, Any

from .pollbase import PollerBase

if TYPE_CHECKING:
    from .channel import Channel

#: Most messages handed to the application per wake-up on the event loop, so one busy
#: connection cannot starve the loop's other work.
ASYNC_BATCH = 100

#: Longest a refill read waits for more credit (see EventLoopSide._hold_refill).
REFILL_HOLD = 0.002


class EventLoopSide(PollerBase):
    """The part of :class:`kombu_streams.poller.Poller` that runs on an event loop."""

    def __init__(self, transport: Any) -> None:
        super().__init__(transport)
        self._look_timer = False
        #: monotonic time of the hub timer armed for the earliest due time (None: none)
        self._due_timer: float | None = None
        #: channel -> monotonic time its refill read was first held back (0.0: the hold's
        #: hub timer fired, read on the next turn), see _hold_refill
        self._refill_held: dict[Channel, float] = {}

    def discard(self, channel: Channel) -> None:
        super().discard(channel)
        self._refill_held.pop(channel, None)

    def after_fork(self) -> None:
        """In a child process: forget the parent's waits and event loop."""
        super().after_fork()
        self._due_timer = None
        self._refill_held.clear()

    def close(self) -> None:
        self.channels = []
        mine = self._draining in (None, threading.get_ident())
        for fd, wait in list(self.waits.pending.items()):
            if mine or wait.owner is not None:  # not the wait another thread drains on
                self.waits.end(fd)
        if self.waits.hub is not None:
            self.waits.hub.on_tick.discard(self.on_tick)
            self.waits.hub = None
        self._due_timer = None
        self._refill_held.clear()

    def register(self, hub: Any) -> None:
        if self.waits.hub is not None:
            self.waits.hub.on_tick.discard(self.on_tick)
        self.waits.hub = hub
        self._due_timer = None
        hub.on_tick.add(self.on_tick)

    def on_tick(self) -> None:
        """Each loop turn: a read for every channel whose last read took all it was allowed
        (the acks made since ride inside it) or that knows a delayed message is due, the
        acks of the others sent, then a wait for every channel that may read (per slot
        group on Cluster) where none is pending."""
        waiting = {(w.owner, w.keys) for w in self.waits.pending.values()}
        used, pool_of = self._budget() if self.transport.cluster else ({}, None)
        for channel in list(self.channels):
            wakes = channel.wake_keys()
            if wakes and channel.more_ready:
                # More is probably waiting: read again now (one round trip) instead of
                # waiting for the marker. A read that finds less ends this: no spinning.
                # Unless the credit is short and the application still busy: then the
                # read (with the acks riding in it) waits a little for more credit.
                if not self._hold_refill(channel):
                    self._deliver_channel(channel)
                continue
            if wakes and self._due_now(channel):
                # due (e.g. credit came back after the due timer fired): the read moves it
                self._read_due(channel)
                wakes = channel.wake_keys()
            channel.flush_acks()
            if not wakes:
                self._set_unwatched(channel, [])
                continue
            # One wait per slot group (one group on a single Redis); a group whose wait was
            # answered waits again now, whatever the channel's other groups are doing. On
            # Cluster the groups beyond a node's wait budget are looked at instead (_look).
            # A wait ends by polling_interval or the channel's due time, whichever is first;
            # Redis may answer that up to 1/hz s late, so the due time itself is the due
            # timer's (_arm_due).
            unwatched: list[str] = []
            for keys in self._groups(list(wakes)):
                if (channel, keys) in waiting:
                    continue
                if pool_of is not None and not self._cap(pool_of, used, keys):
                    unwatched.extend(keys)
                    continue
                block = self._block(None, channel)
                fd = self.waits.send(keys, channel, block,
                                     sources=tuple((channel, wakes[k]) for k in keys),
                                     carried=channel.carried_read([wakes[k] for k in keys],
                                                                  block)
                                     if self.waits.may_carry(keys) else None)
                self.waits.hub.add_reader(fd, self.transport.on_readable, fd)
                wait = self.waits.pending[fd]
                self.waits.hub.call_later(wait.deadline - monotonic(),
                                          self.waits.expire_if_waiting, fd, wait)
            self._set_unwatched(channel, unwatched)
        for owner in self._look():
            if owner is not None:
                self._deliver_channel(owner)
        if self._unwatched and not self._look_timer:  # the loop must turn to look again
            self._look_timer = True
            self.waits.hub.call_later(max(self._next_look - monotonic(), 0.0), self._looked)
        self._arm_due()

    def _hold_refill(self, channel: Channel) -> bool:
        """Whether ``channel``'s refill read waits for a later loop turn. Celery's worker
        gives prefetch credit back one message at a time (an ack as each task starts, or
        ends with acks_late), so refilling at once costs a read, a round trip and a script
        call, per task. A read is held back while the credit is under half the prefetch
        limit (Channel.refill_low: the application then still holds the other half, so,
        with early acks, every pool process is busy) and no delayed message is due, for
        REFILL_HOLD at most (a hub timer turns the loop then): with acks_late and as many
        pool processes as the prefetch limit, a process may idle that long. The acks made
        meanwhile ride in the read, later by as much (an unsent ack only means a message
        may come again). An idle consumer is never held: it waits on its marker."""
        if not channel.refill_low() or self._due_now(channel):
            self._refill_held.pop(channel, None)
            return False
        now = monotonic()
        since = self._refill_held.get(channel)
        if since is None:
            self._refill_held[channel] = now
            self.waits.hub.call_later(REFILL_HOLD, self._end_hold, channel, now)
            return True
        if now - since < REFILL_HOLD:
            return True
        del self._refill_held[channel]
        return False

    def _end_hold(self, channel: Channel, since: float) -> None:
        """A hub timer REFILL_HOLD after a refill read was held: the next loop turn reads
        (even if this timer came a little early by the loop's clock)."""
        if self._refill_held.get(channel) == since:
            self._refill_held[channel] = 0.0

    def _due_now(self, channel: Channel) -> bool:
        """Whether a delayed message ``channel`` reads is due by now, as its reads told."""
        due = channel.due_in()
        return due is not None and due <= 0

    def _arm_due(self) -> None:
        """On the event loop: a hub timer at the earliest due time a channel knows (still to
        come), unless one at or before it is armed. Called after every read on the loop, so
        the timer is in the hub before the hub works out how long to sleep: Kombu's hub does
        that (fire_timers) before on_tick, so a timer first added in on_tick, as the CLIENT
        UNBLOCK of a due-bounded wait was, counted only from the next turn: an idle loop
        slept through it, and the wait ended at Redis's next tick, up to 1/hz s late
        (scripts/eta: Celery countdown tasks on a prefork worker, p99 78 to 107 ms). Due
        times already past arm nothing: on_tick reads those channels once they may read."""
        hub = self.waits.hub
        if hub is None:
            return
        ahead = [t for ch in self.channels if (t := ch.due_in()) is not None and t > 0]
        if not ahead:
            return
        # No slack: read.lua counts the time left from the server's clock rounded down to
        # the ms, so this is at or after the due time; a read that comes early anyway (the
        # clocks drifted) is told the time left again, and the timer set again.
        at = monotonic() + min(ahead)
        if self._due_timer is not None and self._due_timer <= at + 0.0005:
            return
        self._due_timer = at
        hub.call_later(at - monotonic(), self._on_due, at)

    def _on_due(self, at: float) -> None:
        """A hub timer at a due time: read the channels whose delayed message is due and
        that may read (read.lua moves it and delivers it in the same call), then arm the
        timer for the next due time those reads told."""
        if self._due_timer == at:
            self._due_timer = None
        for channel in list(self.channels):
            if self._due_now(channel) and channel.wake_keys():
                self._read_due(channel)
        self._arm_due()

    def _read_due(self, channel: Channel) -> None:
        """Read ``channel`` now, a delayed message of it being due. A wait of it that
        carries a read is ended with CLIENT UNBLOCK instead: its read, which holds the
        channel's credit, then runs at once and moves the due message (its answer comes to
        on_readable); a read of the channel's own would have no credit left."""
        carrying = self.waits.carrying(channel)
        if not carrying:
            self._deliver_channel(channel)
        for _, wait in carrying:
            self.waits.unblock(wait)

    def _looked(self) -> None:
        """A hub timer: nothing to do but wake the loop, whose next turn looks."""
        self._look_timer = False

    def _deliver_channel(self, channel: Channel) -> None:
        self._refill_held.pop(channel, None)
        for _ in range(ASYNC_BATCH):
            item = channel.next_delivery()
            if item is None:
                return
            self._hand(channel, item[0], item[1], self.transport._deliver)

    def on_readable(self, fd: int) -> None:
        """A wait answered: deliver what is ready; the next loop turn waits again."""
        if fd not in self.waits.pending:
            return
        popped, taken = self.waits.answer(fd)
        try:
            # a read the wait carried was taken: hand out what it read, no read after it
            # (the next loop turn reads again if it took all it was allowed)
            self._after_wake(popped, self.transport._deliver, ASYNC_BATCH, read=not taken)
        finally:
            self._arm_due()  # before the hub's next turn works out how long to sleep


__all__ = ('EventLoopSide', 'ASYNC_BATCH')
