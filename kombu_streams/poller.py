"""Waiting for messages without polling, and without losing a wake-up.

Lua scripts cannot block inside Redis, so waiting happens outside them, on wake markers:
each source (a queue's streams, or its group on a fanout exchange) has a zset with at most
one member, set by every script that makes work ready and kept by ``read.lua`` as
docs/design.rst ("Wake-ups") says, with the argument for why no wake-up is lost.

This module does the waiting. An idle consumer blocks in one ``BZPOPMIN`` on the markers of
all the sources its channels read; the source whose marker it popped is read next (mode
POPPED, see :mod:`kombu_streams.plan`), and if no read comes to cover it (the channel ran
out of credit meanwhile) the poller puts the marker back. Every wait is bounded by
``polling_interval`` (1 s by default) and by the earliest due time of a delayed message its
channels know (:meth:`Poller._block`). Redis answers a blocked command's timeout only at its
next tick (every 1/hz s, 100 ms by default, on a quiet server), so the due time itself is
kept by the poller: in drain_events a wait still blocked then is ended with CLIENT UNBLOCK;
on an event loop a hub timer at the due time reads the channel (:meth:`Poller._arm_due`),
armed as soon as a read tells the time, so that the loop sleeps no longer. With the
sweep of :mod:`kombu_streams.plan` these are the safety nets for wake-ups lost outside the
invariant (a consumer that died between popping a marker and reading; keys removed behind
our back). An idle consumer costs one BZPOPMIN per interval plus the sweep: no busy
polling, whatever the number of queues.

Redis Cluster: BZPOPMIN may only wait on keys of one hash slot, so the markers are grouped
by slot and each group gets its own pending BZPOPMIN on a connection to the node that
serves the slot, within a budget of half that node's pool (WAIT_SHARE); the markers of the
slots beyond it are looked at once per polling interval (marked.lua, :meth:`Poller._look`).
The waiting thread selects on all of the waits' sockets. A wait answered MOVED
or ASK (the slot is moving) counts as a wake-up: the next read goes through the cluster
client, which follows the slot, and the slot map is refreshed before the next wait.

Latency: a publish wakes the blocked consumer directly, which then runs one read: two round
trips from publish to callback, the same as Kombu's Redis transport (BRPOP, then its
pipeline that records the unacked message).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

from redis.crc import key_slot
from redis.exceptions import ResponseError

from .state import Source
from .waits import UNBLOCK_AFTER, Popped, Waits, readable

if TYPE_CHECKING:
    from .channel import Channel

logger = logging.getLogger(__name__)

#: BZPOPMIN rounds tiny timeouts to 0, which means "forever": never block for less.
MIN_BLOCK = 0.01

#: While every channel is at its prefetch limit, how often to look for returned credit.
CREDIT_CHECK = 0.05

#: Most messages handed to the application per wake-up on the event loop, so one busy
#: connection cannot starve the loop's other work.
ASYNC_BATCH = 100


#: On Redis Cluster, the share of a node's pool (max_connections) that waits may hold: each
#: holds a pooled connection, and reads, acks and the lease keeper need the rest.
WAIT_SHARE = 0.5

class Poller:
    """The transport's ``cycle``: serves ``drain_events`` for all channels of a connection,
    or, registered with an event loop (Celery's hub), waits on a socket of its own."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.channels: list[Channel] = []
        #: the pending BZPOPMINs (see kombu_streams.waits)
        self.waits = Waits(transport, self._on_wrongtype)
        self._draining: int | None = None  # thread inside drain(), whose acks wait
        #: Cluster: markers of the slots beyond each node's wait budget, per channel (None:
        #: drain), looked at with marked.lua once per polling interval instead
        self._unwatched: dict[Channel | None, list[str]] = {}
        self._next_look = 0.0
        self._look_timer = False
        #: monotonic time of the hub timer armed for the earliest due time (None: none)
        self._due_timer: float | None = None

    def add(self, channel: Channel) -> None:
        if channel not in self.channels:
            self.channels.append(channel)

    def discard(self, channel: Channel) -> None:
        if channel in self.channels:
            self.channels.remove(channel)
        for fd, wait in list(self.waits.pending.items()):
            if wait.owner is channel:
                self.waits.drop(fd, disconnect=True)
        self._unwatched.pop(channel, None)

    def after_fork(self) -> None:
        """In a child process: forget the parent's waits and event loop."""
        self.waits.after_fork()
        self._unwatched.clear()
        self._due_timer = None

    def close(self) -> None:
        self.channels = []
        for fd in list(self.waits.pending):
            self.waits.drop(fd, disconnect=True)
        if self.waits.hub is not None:
            self.waits.hub.on_tick.discard(self.on_tick)
            self.waits.hub = None
        self._due_timer = None

    def deliver_one(self, deliver: Callable[[Any, str], Any]) -> bool:
        """Hand one message of any channel to ``deliver``; False when none is ready."""
        for _ in range(len(self.channels)):
            channel = self.channels[0]
            self.channels.append(self.channels.pop(0))  # fair turn between channels
            item = channel.next_delivery()
            if item is not None:
                self._hand(channel, item[0], item[1], deliver)
                return True
        return False

    def _hand(self, channel: Channel, message: Any, queue: str,
              deliver: Callable[[Any, str], Any]) -> None:
        """Run the consumer callback. On an event loop (Celery's hub), if it raises (other
        than a connection error), the message goes to the dead-letter stream and the error
        ends here: Celery's worker would otherwise exit ("Unrecoverable error") and die
        again at each redelivery of the same message. From drain_events the error reaches
        the caller unchanged and the message stays unacked, as with Kombu's Redis transport:
        the application decides (the envelope checks already set aside what Kombu or Celery
        cannot take)."""
        if self.waits.hub is None:  # drain_events: the caller sees the error (Kombu's behaviour)
            deliver(message, queue)
            return
        try:
            deliver(message, queue)
        except self.transport.connection_errors:
            raise
        except Exception as exc:
            channel.handler_failed(message, exc)

    def _wake_keys(self) -> dict[str, tuple[Channel, Source]]:
        """wake key -> (channel, source), for the sources some channel may read now."""
        return {key: (ch, src) for ch in self.channels for key, src in ch.wake_keys().items()}

    def _on_wrongtype(self, exc: BaseException) -> bool:
        """A wait failed because a marker's name holds another type: the channels suspend
        the source it belongs to. True when that was the error (the caller waits again)."""
        if 'WRONGTYPE' not in str(exc):
            return False
        for channel in list(self.channels):
            channel.check_wakes()
        return True

    def _groups(self, wakes: list[str]) -> list[tuple[str, ...]]:
        """Markers one BZPOPMIN may wait on together: all, or those of one slot on Cluster."""
        if not self.transport.cluster:
            return [tuple(wakes)]
        groups: dict[int, list[str]] = {}
        for key in wakes:
            groups.setdefault(key_slot(key.encode()), []).append(key)
        return [tuple(keys) for keys in groups.values()]

    def _budget(self) -> tuple[dict[int, int], Callable[[tuple[str, ...]], int]]:
        """Cluster: waits pending per node (keyed by the node's pool), and the function that
        names the node of a slot group."""
        used: dict[int, int] = {}
        for wait in self.waits.pending.values():
            used[id(wait.pool)] = used.get(id(wait.pool), 0) + 1
        return used, lambda keys: id(self.transport.wait_pool(keys[0]))

    def _cap(self, pool_of: Callable[[tuple[str, ...]], int], used: dict[int, int],
             keys: tuple[str, ...]) -> bool:
        """Whether one more wait fits in the budget of the node that serves ``keys`` (at
        least one per node, whatever the pool size); counts it if so."""
        node = pool_of(keys)
        pool = self.transport.wait_pool(keys[0])
        limit = max(int((getattr(pool, 'max_connections', None) or 10) * WAIT_SHARE), 1)
        if used.get(node, 0) >= limit:
            return False
        used[node] = used.get(node, 0) + 1
        return True

    def _look(self, force: bool = False) -> list[Channel | None]:
        """Cluster: once per polling interval, look which unwatched markers are set
        (marked.lua, one round trip per node) and mark their sources to be read; the owners
        (channels, or None for drain) that have some."""
        if not self._unwatched or (not force and monotonic() < self._next_look):
            return []
        self._next_look = monotonic() + self.transport.wait_interval
        hits: list[Channel | None] = []
        for owner, markers in list(self._unwatched.items()):
            found: set[str] = set()
            for channel in ([owner] if owner is not None else list(self.channels)):
                wakes = channel.wake_keys()
                mine = [k for k in markers if k in wakes]
                if mine:
                    got = channel.broker.marked(mine)
                    if got:
                        channel.marked(got)
                        found |= got
            if found:
                hits.append(owner)
        return hits

    def _due_in(self, owner: Channel | None = None) -> float | None:
        """Seconds until the earliest delayed message that ``owner`` (default: any channel)
        reads is due, as far as its reads have told; None when none is known."""
        times = [t for ch in ([owner] if owner else self.channels)
                 if (t := ch.due_in()) is not None]
        return min(times) if times else None

    def _block(self, remaining: float | None, owner: Channel | None = None) -> float:
        """How long one wait may block: ``polling_interval``, the time left, and the time
        until the next delayed message is due, whichever is shortest."""
        block = self.transport.wait_interval
        for bound in (remaining, self._due_in(owner)):
            if bound is not None:
                block = min(block, bound)
        return max(block, MIN_BLOCK)

    def _after_wake(self, popped: Popped, deliver: Callable[[Any, str], Any],
                    limit: int | None) -> int:
        """Deliver what is ready after a wake-up (or a timeout). The channel whose marker was
        popped reads that source next (read.lua gives the wake-up back if the read runs out
        of credit first); a marker that no read covered (the channel ran out of credit, or
        went away meanwhile) is given back (wake.lua)."""
        owner = None
        if popped is not None:
            key, channel, _ = popped
            owner = channel if channel in self.channels and channel.woke(key) else None
        delivered = 0
        try:
            while (limit is None or delivered < limit) and self.deliver_one(deliver):
                delivered += 1
                if limit is None:
                    break
        finally:
            if popped is not None and (owner is None or owner.unread_wake(popped[0])):
                self.waits.give_back([popped[1:]])
        return delivered

    # -- synchronous: Connection.drain_events ------------------------------------------------

    def drain(self, deliver: Callable[[Any, str], Any], timeout: float | None = None) -> None:
        """Deliver one message, blocking up to ``timeout`` (None: forever) for one to come.

        Acks made by the callbacks it runs (in this thread) are deferred: they ride along with
        the next read, and are flushed before any wait (and on cancel, close, lease rounds)."""
        outer, self._draining = self._draining, threading.get_ident()
        try:
            self._drain(deliver, timeout)
        finally:
            self._draining = outer

    def _flush_acks(self) -> None:
        for channel in list(self.channels):
            channel.flush_acks()

    def _drain(self, deliver: Callable[[Any, str], Any], timeout: float | None) -> None:
        deadline = None if timeout is None else monotonic() + timeout
        if self.deliver_one(deliver):
            return
        while True:
            self._flush_acks()  # nothing ready: acks must not wait for a later read
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise socket.timeout()
            wakes = self._wake_keys()
            if not wakes:  # every channel is at its prefetch limit: wait for acks, which
                # other threads may send; checking costs no Redis call until credit is back
                time.sleep(min(self._block(remaining), CREDIT_CHECK))
                if self.deliver_one(deliver):
                    return
                continue
            if self.transport.cluster:
                if self._wait_groups(wakes, remaining, deliver):
                    return
                continue
            try:
                popped = self._wait_one(wakes, remaining)
            except ResponseError as exc:
                if not self._on_wrongtype(exc):
                    raise
                continue
            if self._after_wake(popped, deliver, None):
                return

    def _due_bounds(self, remaining: float | None, owner: Channel | None = None) -> bool:
        """Whether a due time comes before the caller's timeout, so that the next wait is
        ended with CLIENT UNBLOCK at that time if Redis has not answered it by then. Also
        when polling_interval ends the wait first: Redis may answer that timeout up to 1/hz
        s late, past the due time."""
        due = self._due_in(owner)
        if due is None or not self.waits.can_unblock:
            return False
        return remaining is None or due < remaining

    def _wait_one(self, wakes: dict[str, tuple[Channel, Source]], remaining: float | None
                  ) -> Popped:
        """drain() on one Redis: BZPOPMIN on ``keys`` for as long as :meth:`_block` says.
        When a due time ends it and Redis has not answered UNBLOCK_AFTER past it, the wait is
        ended with CLIENT UNBLOCK (then read: a marker it popped meanwhile is not lost). An
        answer that does not come by the wait's deadline means a dead connection
        (DeadConnection). Returns the popped marker or None."""
        due = self._due_bounds(remaining)
        fd = self.waits.send(tuple(wakes), None, self._block(remaining), need_id=due,
                             sources=tuple(wakes.values()))
        wait = self.waits.pending[fd]
        try:
            if due and not readable([fd], min((self._due_in() or 0.0) + UNBLOCK_AFTER,
                                              wait.deadline - monotonic())):
                self.waits.unblock(wait)
            if not readable([fd], wait.deadline - monotonic()):
                self.waits.dead(fd)
            return self.waits.answer(fd)
        finally:
            if fd in self.waits.pending:  # interrupted before the answer: give its markers back
                self.waits.drop(fd, disconnect=True)

    def _wait_groups(self, wakes: dict[str, tuple[Channel, Source]], remaining: float | None,
                     deliver: Callable[[Any, str], Any]) -> bool:
        """drain() on Redis Cluster: one pending BZPOPMIN per slot group, kept across calls,
        and a select() on their sockets. True when a message was delivered."""
        groups = self._groups(list(wakes))
        for fd, wait in list(self.waits.pending.items()):
            if wait.owner is None and wait.keys not in groups:
                self.waits.drop(fd, disconnect=True)  # the channels' queues changed
        pending = {w.keys for w in self.waits.pending.values() if w.owner is None}
        used, pool_of = self._budget()
        unwatched: list[str] = []
        for keys in groups:  # serving order: the first slots of each node get the waits
            if keys not in pending:
                if self._cap(pool_of, used, keys):
                    self.waits.send(keys, None, self._block(None),
                                    sources=tuple(wakes[k] for k in keys))
                else:
                    unwatched.extend(keys)
        self._set_unwatched(None, unwatched)
        mine = {fd: w for fd, w in self.waits.pending.items() if w.owner is None}
        # each BZPOPMIN times out by itself within wait_interval; its deadline adds a margin
        now = monotonic()
        timeout = min(w.deadline for w in mine.values()) - now
        due = self._due_in()
        look = self._next_look - now if unwatched else None
        for bound in (remaining, due, look):
            if bound is not None:
                timeout = min(timeout, bound)
        ready = readable(list(mine), timeout)
        # the unwatched markers, once per interval, busy or not (their sources are read as
        # hot by the next read, whichever wake-up runs it)
        looked = bool(self._look()) if unwatched else False
        if not ready:
            for fd, wait in mine.items():
                if wait.deadline <= monotonic():
                    self.waits.dead(fd)
        if not ready and due is not None and due <= timeout:
            # a delayed message is due: read now (the waits stay pending for the next call)
            return self._after_wake(None, deliver, None) > 0
        # every answer is read before any callback runs: a marker popped meanwhile would
        # otherwise wait in its socket, unseen by other consumers, until the next drain
        answers = [self.waits.answer(fd) for fd in ready]
        delivered = 0
        for popped in answers:
            # the first wake-up delivers one message; later ones only keep their markers
            delivered += self._after_wake(popped, deliver, 0 if delivered else None)
        if looked and not delivered:
            delivered += self._after_wake(None, deliver, None)
        return delivered > 0

    def _set_unwatched(self, owner: Channel | None, markers: list[str]) -> None:
        if markers:
            if owner not in self._unwatched:
                self._next_look = 0.0  # newly unwatched: look at once
            self._unwatched[owner] = markers
        else:
            self._unwatched.pop(owner, None)

    # -- asynchronous: Celery's hub ------------------------------------------------------------
    # Each channel that may read gets its own pending BZPOPMIN on its own connection, so a
    # channel whose prefetch credit comes back (after acks) starts waiting on the next loop
    # turn, whatever the other channels are doing.

    @property
    def batches_acks(self) -> bool:
        """On an event loop, acks wait for the next read or loop turn (see on_tick); in
        drain_events, acks of its callbacks wait for the next read or wait (see drain)."""
        return self.waits.hub is not None or self._draining == threading.get_ident()

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
        used, pool_of = self._budget()
        for channel in list(self.channels):
            wakes = channel.wake_keys()
            if wakes and channel.more_ready:
                # More is probably waiting: read again now (one round trip) instead of
                # waiting for the marker. A read that finds less ends this: no spinning.
                self._deliver_channel(channel)
                continue
            if wakes and self._due_now(channel):
                # due (e.g. credit came back after the due timer fired): the read moves it
                self._deliver_channel(channel)
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
                if self.transport.cluster and not self._cap(pool_of, used, keys):
                    unwatched.extend(keys)
                    continue
                fd = self.waits.send(keys, channel, self._block(None, channel),
                                     sources=tuple((channel, wakes[k]) for k in keys))
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
                self._deliver_channel(channel)
        self._arm_due()

    def _looked(self) -> None:
        """A hub timer: nothing to do but wake the loop, whose next turn looks."""
        self._look_timer = False

    def _deliver_channel(self, channel: Channel) -> None:
        for _ in range(ASYNC_BATCH):
            item = channel.next_delivery()
            if item is None:
                return
            self._hand(channel, item[0], item[1], self.transport._deliver)

    def on_readable(self, fd: int) -> None:
        """A wait answered: deliver what is ready; the next loop turn waits again."""
        if fd not in self.waits.pending:
            return
        popped = self.waits.answer(fd)
        try:
            self._after_wake(popped, self.transport._deliver, ASYNC_BATCH)
        finally:
            self._arm_due()  # before the hub's next turn works out how long to sleep
