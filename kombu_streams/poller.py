"""Waiting for messages without polling, and without losing a wake-up.

Lua scripts cannot block inside Redis, so waiting happens outside them, on a wake marker:
each queue has a zset ``ks:q:{queue}:wake`` with at most one member.

* ``publish.lua`` adds the entry and sets the marker in one script.
* ``read.lua`` delivers what the caller may take and then, in the same script, sets the
  marker of every queue that may still hold ready messages and removes it from every queue
  it saw run dry.
* An idle consumer blocks in ``BZPOPMIN`` on the markers of the queues it consumes. When
  the pop returns (or times out) it runs ``read.lua`` on every channel before waiting again.

Why no wake-up is lost. Invariant: at the end of every script, a queue with ready messages
has its marker set. publish sets it; read sets it unless it saw the queue empty; requeue
sets it. The only moment the invariant is broken is between a consumer's BZPOPMIN taking
the marker and its next read, and that read restores it (sets the marker again if anything
is left over for others). So a consumer that goes to sleep after an empty read cannot miss
a message: a publish that landed after the read left the marker behind, and BZPOPMIN
returns at once. Redis runs each script and each BZPOPMIN atomically, so there is no
interleaving finer than these steps.

What if the consumer that took the marker dies before its read? Then other consumers would
not be woken by that marker. To stay safe even then, and after anything that removes keys
behind our back (FLUSHDB, a failover that lost the last write), every blocked wait is
bounded by ``polling_interval`` seconds (1 s by default) and each timeout is followed by
one read. That is one cheap script call per second per idle connection: no busy polling,
an idle consumer costs ~0 CPU.

Redis Cluster: BZPOPMIN may only wait on keys of one hash slot, so the markers are grouped
by slot and each group gets its own pending BZPOPMIN on a connection to the node that
serves the slot; the waiting thread selects on all of their sockets. The argument above is
per marker and holds unchanged. A wait answered MOVED or ASK (the slot is moving) counts as
a wake-up: the next read goes through the cluster client, which follows the slot, and the
slot map is refreshed before the next wait.

``read.lua`` tells "may still hold ready messages" from the queue's ready index (a set of
the streams that may hold ready work, see ``lua/lib/common.lua``), which names more, never
less: every script that adds ready work adds to it in the same call. An index that names
less than it should (lost, or written around by hand or by an older version) is repaired by
a read that walks every stream: the next read when the index is incomplete, and one read per
channel every ``channel.WALK_INTERVAL`` (1 s), as bounded as the waits above.

Latency: a publish wakes the blocked consumer directly, which then runs one read: two round
trips from publish to callback, the same as Kombu's Redis transport (BRPOP, then its
pipeline that records the unacked message).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, TryAgainError

from .compat import pool_connection

if TYPE_CHECKING:
    from .channel import Channel

#: BZPOPMIN rounds tiny timeouts to 0, which means "forever": never block for less.
MIN_BLOCK = 0.01

#: While every channel is at its prefetch limit, how often to look for returned credit.
CREDIT_CHECK = 0.05

#: Most messages handed to the application per wake-up on the event loop, so one busy
#: connection cannot starve the loop's other work.
ASYNC_BATCH = 100


#: Replies to a wait that mean the slot is moving or the cluster is reconfiguring.
_SLOT_MOVING = (AskError, TryAgainError, ClusterDownError)


class Wait(NamedTuple):
    """A BZPOPMIN sent and not yet answered."""

    owner: Channel | None  # the channel it waits for on an event loop; None: drain()
    keys: tuple[str, ...]
    conn: Any
    pool: Any


class Poller:
    """The transport's ``cycle``: serves ``drain_events`` for all channels of a connection,
    or, registered with an event loop (Celery's hub), waits on a socket of its own."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.channels: list[Channel] = []
        self._read_queues: set[str] = set()  # queues read since the last wake-up
        self._hub: Any = None
        self._waits: dict[int, Wait] = {}  # fd of a pending BZPOPMIN -> the wait
        self._draining: int | None = None  # thread inside drain(), whose acks wait

    def add(self, channel: Channel) -> None:
        if channel not in self.channels:
            self.channels.append(channel)

    def discard(self, channel: Channel) -> None:
        if channel in self.channels:
            self.channels.remove(channel)
        for fd, wait in list(self._waits.items()):
            if wait.owner is channel:
                self._drop_wait(fd, disconnect=True)

    def close(self) -> None:
        self.channels = []
        for fd in list(self._waits):
            self._drop_wait(fd, disconnect=True)
        if self._hub is not None:
            self._hub.on_tick.discard(self.on_tick)
            self._hub = None

    def note_read(self, queues: list[str]) -> None:
        """Channels report each read, so a popped marker is never dropped unread."""
        self._read_queues.update(queues)

    def deliver_one(self, deliver: Callable[[Any, str], Any]) -> bool:
        """Hand one message of any channel to ``deliver``; False when none is ready."""
        for _ in range(len(self.channels)):
            channel = self.channels[0]
            self.channels.append(self.channels.pop(0))  # fair turn between channels
            item = channel.next_delivery()
            if item is not None:
                deliver(item[0], item[1])
                return True
        return False

    def _wake_keys(self) -> dict[str, str]:
        """wake key -> queue, for the queues some channel may read now."""
        return {key: q for ch in self.channels for key, q in ch.wake_keys().items()}

    def _groups(self, wakes: list[str]) -> list[tuple[str, ...]]:
        """Markers one BZPOPMIN may wait on together: all, or those of one slot on Cluster."""
        if not self.transport.cluster:
            return [tuple(wakes)]
        groups: dict[int, list[str]] = {}
        for key in wakes:
            groups.setdefault(key_slot(key.encode()), []).append(key)
        return [tuple(keys) for keys in groups.values()]

    def _block(self, remaining: float | None) -> float:
        block = self.transport.wait_interval
        if remaining is not None:
            block = min(block, remaining)
        return max(block, MIN_BLOCK)

    def _after_wake(self, popped: Any, deliver: Callable[[Any, str], Any],
                    limit: int | None) -> int:
        """Deliver what is ready after a wake-up (or a timeout); put back a marker that no
        read covered (its queue's channels ran out of credit meanwhile)."""
        self._read_queues.clear()
        delivered = 0
        while (limit is None or delivered < limit) and self.deliver_one(deliver):
            delivered += 1
            if limit is None:
                break
        if popped:
            key = popped[0].decode() if isinstance(popped[0], bytes) else popped[0]
            queue = self._wake_keys().get(key)
            if queue is None or queue not in self._read_queues:
                self.transport.blocking_client().zadd(key, {'w': 0})
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
            wakes = list(self._wake_keys())
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
            popped = self.transport.blocking_client().bzpopmin(
                wakes, timeout=self._block(remaining))
            if self._after_wake(popped, deliver, None):
                return

    def _wait_groups(self, wakes: list[str], remaining: float | None,
                     deliver: Callable[[Any, str], Any]) -> bool:
        """drain() on Redis Cluster: one pending BZPOPMIN per slot group, kept across calls,
        and a select() on their sockets. True when a message was delivered."""
        groups = set(self._groups(wakes))
        for fd, wait in list(self._waits.items()):
            if wait.owner is None and wait.keys not in groups:
                self._drop_wait(fd, disconnect=True)  # the channels' queues changed
        pending = {w.keys for w in self._waits.values() if w.owner is None}
        for keys in groups - pending:
            self._send_wait(keys, None)
        fds = [fd for fd, w in self._waits.items() if w.owner is None]
        # each BZPOPMIN times out by itself within wait_interval; the margin covers the trip
        timeout = self.transport.wait_interval + 1.0
        if remaining is not None:
            timeout = min(timeout, remaining)
        ready, _, _ = select.select(fds, [], [], max(timeout, 0))
        delivered = 0
        for fd in ready:
            popped = self._answer(fd)
            # the first wake-up delivers one message; later ones only keep their markers
            delivered += self._after_wake(popped, deliver, 0 if delivered else None)
        return delivered > 0

    def _send_wait(self, keys: tuple[str, ...], owner: Channel | None) -> int:
        """Send BZPOPMIN on ``keys`` on a connection of its own; returns its fd."""
        pool = self.transport.wait_pool(keys[0])
        conn = pool_connection(pool, 'BZPOPMIN')
        try:
            conn.send_command('BZPOPMIN', *keys, self._block(None))
        except Exception:
            pool.release(conn)
            raise
        fd = conn._sock.fileno()
        self._waits[fd] = Wait(owner, keys, conn, pool)
        return fd

    def _answer(self, fd: int) -> Any:
        """Read a wait's answer and end the wait: the popped marker, or None."""
        wait = self._waits[fd]
        try:
            popped = wait.conn.read_response()
        except _SLOT_MOVING:
            self._drop_wait(fd)
            self.transport.refresh_slots()
            return None
        except Exception:
            self._drop_wait(fd, disconnect=True)
            raise
        self._drop_wait(fd)
        return popped

    # -- asynchronous: Celery's hub ------------------------------------------------------------
    # Each channel that may read gets its own pending BZPOPMIN on its own connection, so a
    # channel whose prefetch credit comes back (after acks) starts waiting on the next loop
    # turn, whatever the other channels are doing.

    @property
    def batches_acks(self) -> bool:
        """On an event loop, acks wait for the next read or loop turn (see on_tick); in
        drain_events, acks of its callbacks wait for the next read or wait (see drain)."""
        return self._hub is not None or self._draining == threading.get_ident()

    def register(self, hub: Any) -> None:
        if self._hub is not None:
            self._hub.on_tick.discard(self.on_tick)
        self._hub = hub
        hub.on_tick.add(self.on_tick)

    def on_tick(self) -> None:
        """Each loop turn: send the acks made since the last one, then a wait for every
        channel that may read (per slot group on Cluster) where none is pending."""
        for channel in list(self.channels):
            channel.flush_acks()
        waiting = {(w.owner, w.keys) for w in self._waits.values()}
        for channel in list(self.channels):
            wakes = channel.wake_keys()
            if not wakes:
                continue
            if channel.more_ready:
                # Its last read took all it was allowed, so more is probably waiting: read
                # again now (one round trip, acks riding along) instead of waiting for the
                # marker. A read that finds less ends this, so it cannot spin.
                self._deliver_channel(channel)
                continue
            # One wait per slot group (one group on a single Redis); a group whose wait was
            # answered waits again now, whatever the channel's other groups are doing.
            for keys in self._groups(list(wakes)):
                if (channel, keys) in waiting:
                    continue
                fd = self._send_wait(keys, channel)
                self._hub.add_reader(fd, self.transport.on_readable, fd)

    def _deliver_channel(self, channel: Channel) -> None:
        for _ in range(ASYNC_BATCH):
            item = channel.next_delivery()
            if item is None:
                return
            self.transport._deliver(item[0], item[1])

    def on_readable(self, fd: int) -> None:
        """A wait answered: deliver what is ready; the next loop turn waits again."""
        if fd not in self._waits:
            return
        popped = self._answer(fd)
        self._after_wake(popped, self.transport._deliver, ASYNC_BATCH)

    def _drop_wait(self, fd: int, disconnect: bool = False) -> None:
        wait = self._waits.pop(fd, None)
        if wait is None:
            return
        if self._hub is not None and wait.owner is not None:
            self._hub.remove_reader(fd)
        if disconnect:
            wait.conn.disconnect()
        wait.pool.release(wait.conn)
