"""What the poller's two sides share (:mod:`kombu_streams.poller` for the whole story): the
channels it serves, handing their messages out, which wake markers to wait on and how long,
the markers of Redis Cluster slots beyond a node's wait budget, and what follows a wake-up.

The sides: :mod:`kombu_streams.hubloop` (Celery's event loop) and the ``drain_events`` waits
in :class:`kombu_streams.poller.Poller`.
"""

from __future__ import annotations

import threading
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

from redis.crc import key_slot

from .state import Source
from .waits import Popped, Waits

if TYPE_CHECKING:
    from .channel import Channel


#: BZPOPMIN rounds tiny timeouts to 0, which means "forever": never block for less.
MIN_BLOCK = 0.01

#: On Redis Cluster, the share of a node's pool (max_connections) that waits may hold: each
#: holds a pooled connection, and reads, acks and the lease keeper need the rest.
WAIT_SHARE = 0.5


class PollerBase:
    """The state and helpers both sides of :class:`kombu_streams.poller.Poller` use."""

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

    def add(self, channel: Channel) -> None:
        if channel not in self.channels:
            self.channels.append(channel)

    def discard(self, channel: Channel) -> None:
        if channel in self.channels:
            self.channels.remove(channel)
        for fd, wait in list(self.waits.pending.items()):
            if wait.owner is channel:
                self.waits.end(fd)
        self.end_carried(channel)
        self._unwatched.pop(channel, None)

    def end_carried(self, channel: Channel) -> None:
        """End the waits that carry a read of ``channel`` (Waits.end: what the read took
        comes to the channel's buffer), when this thread may: not while another thread is
        inside drain(), whose wait it is. That thread then takes the answer itself, and a
        channel closed or a queue cancelled meanwhile gives the messages back then."""
        if self._draining in (None, threading.get_ident()):
            self.waits.end_carried(channel)

    def after_fork(self) -> None:
        """In a child process: forget the parent's waits."""
        self.waits.after_fork()
        self._unwatched.clear()

    @property
    def batches_acks(self) -> bool:
        """On an event loop, acks wait for the next read or loop turn (see on_tick); in
        drain_events, acks of its callbacks wait for the next read or wait (see drain)."""
        return self.waits.hub is not None or self._draining == threading.get_ident()

    def deliver_one(self, deliver: Callable[[Any, str], Any], read: bool = True) -> bool:
        """Hand one message of any channel to ``deliver``; False when none is ready.
        ``read``: read from Redis when a channel's read-ahead buffer is empty."""
        for _ in range(len(self.channels)):
            channel = self.channels[0]
            self.channels.append(self.channels.pop(0))  # fair turn between channels
            item = channel.next_delivery(read)
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
                    limit: int | None, read: bool = True) -> int:
        """Deliver what is ready after a wake-up (or a timeout). The channel whose marker was
        popped reads that source next (read.lua gives the wake-up back if the read runs out
        of credit first); a marker that no read covered (the channel ran out of credit, or
        went away meanwhile) is given back (wake.lua). ``read``: False after a wait whose
        carried read was taken: hand out what the buffers hold, read nothing."""
        owner = None
        if popped is not None:
            key, channel, _ = popped
            owner = channel if channel in self.channels and channel.woke(key) else None
        delivered = 0
        try:
            while (limit is None or delivered < limit) and self.deliver_one(deliver, read):
                delivered += 1
                if limit is None:
                    break
        finally:
            if popped is not None and (owner is None or owner.unread_wake(popped[0])):
                self.waits.give_back([popped[1:]])
        return delivered

    def _set_unwatched(self, owner: Channel | None, markers: list[str]) -> None:
        if markers:
            if owner not in self._unwatched:
                self._next_look = 0.0  # newly unwatched: look at once
            self._unwatched[owner] = markers
        else:
            self._unwatched.pop(owner, None)


__all__ = ('PollerBase', 'MIN_BLOCK', 'WAIT_SHARE')
