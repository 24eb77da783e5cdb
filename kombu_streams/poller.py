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

Latency: a wait carries the channel's read (sent behind the BZPOPMIN on the same
connection, see :class:`kombu_streams.carried.CarriedRead`), so a publish wakes the
blocked consumer and Redis runs its read at once: one round trip from publish to callback. Kombu's
Redis transport takes two (BRPOP, then its pipeline that records the unacked message).
"""

from __future__ import annotations

import socket
import threading
import time
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

from redis.exceptions import ResponseError

from .hubloop import ASYNC_BATCH, EventLoopSide
from .pollbase import MIN_BLOCK, WAIT_SHARE
from .state import Source
from .waits import UNBLOCK_AFTER, Popped, readable

if TYPE_CHECKING:
    from .channel import Channel

#: While every channel is at its prefetch limit, how often to look for returned credit.
CREDIT_CHECK = 0.05


class Poller(EventLoopSide):
    """The transport's ``cycle``: serves ``drain_events`` for all channels of a connection
    (here), or, registered with an event loop (Celery's hub), waits on sockets of its own
    (:class:`kombu_streams.hubloop.EventLoopSide`); what both share is in
    :class:`kombu_streams.pollbase.PollerBase`."""

    #: the last wait of drain() carried a read that took less than it was allowed
    _dry = False

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
        # Right after a carried read that took less than it was allowed, a read now would
        # find what the next wait finds at once (read.lua left the marker of every source
        # not seen dry set): wait instead, one round trip for what comes next instead of
        # two. Not for a drain too short to wait (timeout 0: look only).
        skip = self._dry and (timeout is None or timeout >= MIN_BLOCK)
        self._dry = False
        if self.deliver_one(deliver, read=not skip):
            self._dry = skip  # handed from that read's buffer: still nothing more to read
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
                popped, taken = self._wait_one(wakes, remaining)
            except ResponseError as exc:
                if not self._on_wrongtype(exc):
                    raise
                continue
            self._dry = taken and not any(ch.more_ready for ch in self.channels)
            if self._after_wake(popped, deliver, None, read=not taken):
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
                  ) -> tuple[Popped, bool]:
        """drain() on one Redis: BZPOPMIN on ``keys`` for as long as :meth:`_block` says,
        carrying the read of the channel whose markers they are, when they are all one
        channel's (see CarriedRead). When a due time ends it and Redis has not answered
        UNBLOCK_AFTER past it, the wait is ended with CLIENT UNBLOCK (then read: a marker it
        popped meanwhile is not lost). An answer that does not come by the wait's deadline
        means a dead connection (DeadConnection). Returns what Waits.answer does."""
        due = self._due_bounds(remaining)
        block = self._block(remaining)
        owners = {channel for channel, _ in wakes.values()}
        carried = (next(iter(owners)).carried_read([src for _, src in wakes.values()], block)
                   if len(owners) == 1 and self.waits.may_carry(tuple(wakes)) else None)
        fd = self.waits.send(tuple(wakes), None, block, need_id=due,
                             sources=tuple(wakes.values()), carried=carried)
        wait = self.waits.pending[fd]
        try:
            if due and not readable([fd], min((self._due_in() or 0.0) + UNBLOCK_AFTER,
                                              wait.deadline - monotonic())):
                self.waits.unblock(wait)
            if not readable([fd], wait.deadline - monotonic()):
                self.waits.dead(fd)
            return self.waits.answer(fd)
        finally:
            if fd in self.waits.pending:  # interrupted before the answer: see Waits.end
                self.waits.end(fd)

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
        answers = [self.waits.answer(fd)[0] for fd in ready]  # no carried reads on Cluster
        delivered = 0
        for popped in answers:
            # the first wake-up delivers one message; later ones only keep their markers
            delivered += self._after_wake(popped, deliver, 0 if delivered else None)
        if looked and not delivered:
            delivered += self._after_wake(None, deliver, None)
        return delivered > 0


__all__ = ('Poller', 'ASYNC_BATCH', 'CREDIT_CHECK', 'MIN_BLOCK', 'WAIT_SHARE')
