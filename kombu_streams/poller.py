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
channels know (:meth:`Poller._block`; a wait still blocked then is ended with CLIENT
UNBLOCK, since Redis answers a blocked command's timeout only at its next tick). With the
sweep of :mod:`kombu_streams.plan` these are the safety nets for wake-ups lost outside the
invariant (a consumer that died between popping a marker and reading; keys removed behind
our back). An idle consumer costs one BZPOPMIN per interval plus the sweep: no busy
polling, whatever the number of queues.

Redis Cluster: BZPOPMIN may only wait on keys of one hash slot, so the markers are grouped
by slot and each group gets its own pending BZPOPMIN on a connection to the node that
serves the slot; the waiting thread selects on all of their sockets. A wait answered MOVED
or ASK (the slot is moving) counts as a wake-up: the next read goes through the cluster
client, which follows the slot, and the slot map is refreshed before the next wait.

Latency: a publish wakes the blocked consumer directly, which then runs one read: two round
trips from publish to callback, the same as Kombu's Redis transport (BRPOP, then its
pipeline that records the unacked message).
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
import weakref
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, ResponseError, TryAgainError

from .compat import conn_fileno, pool_connection
from .connection import socket_timeout
from .errors import DeadConnection
from .state import Source

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


#: After a due time, how long a wait it bounds may still take before the poller ends it with
#: CLIENT UNBLOCK: Redis checks blocked clients' timeouts only when its event loop wakes,
#: every 1/hz s (100 ms by default) on an otherwise quiet server.
UNBLOCK_AFTER = 0.002

#: How late past its own timeout a wait's answer may come before the connection is taken for
#: dead (a half-open TCP connection: the server or a middlebox dropped it silently), when the
#: pool sets no socket timeout; otherwise the socket timeout is the margin.
DEAD_AFTER = 10.0

#: On Redis Cluster, the share of a node's pool (max_connections) that waits may hold: each
#: holds a pooled connection, and reads, acks and the lease keeper need the rest.
WAIT_SHARE = 0.5

#: Replies to a wait that mean the slot is moving or the cluster is reconfiguring.
_SLOT_MOVING = (AskError, TryAgainError, ClusterDownError)


class Wait(NamedTuple):
    """A BZPOPMIN sent and not yet answered."""

    owner: Channel | None  # the channel it waits for on an event loop; None: drain()
    keys: tuple[str, ...]
    conn: Any
    pool: Any
    #: the connection's CLIENT ID, when a due time bounds the wait (to end it on time)
    client_id: int | None = None
    #: monotonic time by which Redis must have answered (its timeout plus a margin), else
    #: the connection is dead
    deadline: float = float('inf')
    #: per key, the channel that reads its source and the source: to give a popped marker
    #: back (wake.lua) when no read of that channel covers it
    sources: tuple[tuple[Any, Source], ...] = ()


#: A popped marker: (its key, the channel that reads its source, the source), or None.
Popped = Optional[tuple[str, Any, Source]]


def _readable(fds: list[int], timeout: float) -> list[int]:
    """Which of ``fds`` can be read within ``timeout`` seconds. ``selectors`` (epoll or
    poll) rather than ``select.select``, which refuses descriptors above 1023."""
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        return [key.fd for key, _ in selector.select(max(timeout, 0.0))]


class Poller:
    """The transport's ``cycle``: serves ``drain_events`` for all channels of a connection,
    or, registered with an event loop (Celery's hub), waits on a socket of its own."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.channels: list[Channel] = []
        self._hub: Any = None
        self._waits: dict[int, Wait] = {}  # fd of a pending BZPOPMIN -> the wait
        self._draining: int | None = None  # thread inside drain(), whose acks wait
        self._can_unblock = True  # CLIENT ID / UNBLOCK allowed (an ACL may refuse them)
        #: Cluster: markers of the slots beyond each node's wait budget, per channel (None:
        #: drain), looked at with marked.lua once per polling interval instead
        self._unwatched: dict[Channel | None, list[str]] = {}
        self._next_look = 0.0
        self._look_timer = False
        #: connection -> its CLIENT ID, forgotten when it reconnects (a new id)
        self._client_ids: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def add(self, channel: Channel) -> None:
        if channel not in self.channels:
            self.channels.append(channel)

    def discard(self, channel: Channel) -> None:
        if channel in self.channels:
            self.channels.remove(channel)
        for fd, wait in list(self._waits.items()):
            if wait.owner is channel:
                self._drop_wait(fd, disconnect=True)
        self._unwatched.pop(channel, None)

    def after_fork(self) -> None:
        """In a child process: forget the parent's waits (their sockets are closed here, not
        shut down: the parent's waits go on) and its event loop."""
        for wait in self._waits.values():
            wait.conn.disconnect()
        self._waits.clear()
        self._unwatched.clear()
        self._hub = None

    def close(self) -> None:
        self.channels = []
        for fd in list(self._waits):
            self._drop_wait(fd, disconnect=True)
        if self._hub is not None:
            self._hub.on_tick.discard(self.on_tick)
            self._hub = None

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
        if self._hub is None:  # drain_events: the caller sees the error (Kombu's behaviour)
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
        for wait in self._waits.values():
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
                self._give_back([popped[1:]])
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
        """Whether a due time, not polling_interval or the caller's timeout, ends the next
        wait (and CLIENT UNBLOCK may be used to end it on time)."""
        due = self._due_in(owner)
        if due is None or not self._can_unblock:
            return False
        return due < self.transport.wait_interval and (remaining is None or due < remaining)

    def _wait_one(self, wakes: dict[str, tuple[Channel, Source]], remaining: float | None
                  ) -> Popped:
        """drain() on one Redis: BZPOPMIN on ``keys`` for as long as :meth:`_block` says.
        When a due time ends it and Redis has not answered UNBLOCK_AFTER past it, the wait is
        ended with CLIENT UNBLOCK (then read: a marker it popped meanwhile is not lost). An
        answer that does not come by the wait's deadline means a dead connection
        (DeadConnection). Returns the popped marker or None."""
        due = self._due_bounds(remaining)
        fd = self._send_wait(tuple(wakes), None, need_id=due, remaining=remaining,
                             sources=tuple(wakes.values()))
        wait = self._waits[fd]
        try:
            if due and not _readable([fd], (self._due_in() or 0.0) + UNBLOCK_AFTER):
                self._unblock(wait)
            if not _readable([fd], wait.deadline - monotonic()):
                self._dead(fd)
            return self._answer(fd)
        finally:
            if fd in self._waits:  # interrupted before the answer: give its markers back
                self._drop_wait(fd, disconnect=True)

    def _dead(self, fd: int) -> None:
        """A wait got no answer by its deadline: its connection is dead (half-open). It is
        dropped without giving its markers back (that would need the same network; a marker
        it may have popped is found by the sweep) and DeadConnection raised, a connection
        error: Kombu and Celery reconnect."""
        wait = self._waits.pop(fd)
        if self._hub is not None and wait.owner is not None:
            self._hub.remove_reader(fd)
        wait.conn.disconnect()
        wait.pool.release(wait.conn)
        raise DeadConnection(
            f'kombu-streams: a wait on {len(wait.keys)} wake marker(s) got no answer by its '
            f'deadline: the connection to Redis is presumed dead (half-open); reconnecting')

    def _expire_if_waiting(self, fd: int, wait: Wait) -> None:
        """A hub timer at a wait's deadline: if it is still the one pending on fd, its
        connection is dead."""
        if self._waits.get(fd) is wait:
            self._dead(fd)

    def _unblock(self, wait: Wait) -> None:
        """End a pending wait now (Redis answers it as a timeout). Without the permission
        (an ACL without CLIENT ID / UNBLOCK) waits end by Redis's own timeout instead, up to
        1/hz s late; that is logged once."""
        if wait.client_id is None:
            return
        conn = pool_connection(wait.pool, 'CLIENT')
        try:
            conn.send_command('CLIENT', 'UNBLOCK', wait.client_id)
            conn.read_response()
        except ResponseError as exc:
            self._no_unblock(exc)
        finally:
            wait.pool.release(conn)

    def _no_unblock(self, exc: BaseException) -> None:
        if self._can_unblock:
            self._can_unblock = False
            logger.warning('kombu-streams: CLIENT ID / CLIENT UNBLOCK refused (%s): waits for '
                           'delayed messages end by the server\'s own timeout, up to 1/hz s '
                           '(100 ms by default) late. Allow +client|id +client|unblock.', exc)

    def _client_id(self, conn: Any) -> int | None:
        """The connection's CLIENT ID, asked once per connection and again after it
        reconnects (a new id): redis-py calls our connect callback then."""
        known = self._client_ids.get(conn)
        if known is not None:
            return known
        if conn not in self._client_ids:
            conn.register_connect_callback(self._forget_id)
        conn.send_command('CLIENT', 'ID')
        try:
            self._client_ids[conn] = int(conn.read_response())
        except ResponseError as exc:
            self._no_unblock(exc)
            return None
        return self._client_ids[conn]

    def _forget_id(self, conn: Any) -> None:
        self._client_ids.pop(conn, None)

    def _unblock_if_waiting(self, fd: int, wait: Wait) -> None:
        """A hub timer at a due time: end the wait if it is still the one pending on fd."""
        if self._waits.get(fd) is wait:
            try:
                self._unblock(wait)
            except Exception as exc:  # the wait's own answer will report a broken connection
                logger.debug('kombu-streams: CLIENT UNBLOCK failed: %r', exc)

    def _wait_groups(self, wakes: dict[str, tuple[Channel, Source]], remaining: float | None,
                     deliver: Callable[[Any, str], Any]) -> bool:
        """drain() on Redis Cluster: one pending BZPOPMIN per slot group, kept across calls,
        and a select() on their sockets. True when a message was delivered."""
        groups = self._groups(list(wakes))
        for fd, wait in list(self._waits.items()):
            if wait.owner is None and wait.keys not in groups:
                self._drop_wait(fd, disconnect=True)  # the channels' queues changed
        pending = {w.keys for w in self._waits.values() if w.owner is None}
        used, pool_of = self._budget()
        unwatched: list[str] = []
        for keys in groups:  # serving order: the first slots of each node get the waits
            if keys not in pending:
                if self._cap(pool_of, used, keys):
                    self._send_wait(keys, None, sources=tuple(wakes[k] for k in keys))
                else:
                    unwatched.extend(keys)
        self._set_unwatched(None, unwatched)
        mine = {fd: w for fd, w in self._waits.items() if w.owner is None}
        # each BZPOPMIN times out by itself within wait_interval; its deadline adds a margin
        now = monotonic()
        timeout = min(w.deadline for w in mine.values()) - now
        due = self._due_in()
        look = self._next_look - now if unwatched else None
        for bound in (remaining, due, look):
            if bound is not None:
                timeout = min(timeout, bound)
        ready = _readable(list(mine), timeout)
        # the unwatched markers, once per interval, busy or not (their sources are read as
        # hot by the next read, whichever wake-up runs it)
        looked = bool(self._look()) if unwatched else False
        if not ready:
            for fd, wait in mine.items():
                if wait.deadline <= monotonic():
                    self._dead(fd)
        if not ready and due is not None and due <= timeout:
            # a delayed message is due: read now (the waits stay pending for the next call)
            return self._after_wake(None, deliver, None) > 0
        # every answer is read before any callback runs: a marker popped meanwhile would
        # otherwise wait in its socket, unseen by other consumers, until the next drain
        answers = [self._answer(fd) for fd in ready]
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

    def _send_wait(self, keys: tuple[str, ...], owner: Channel | None,
                   need_id: bool = False, remaining: float | None = None,
                   sources: tuple[tuple[Any, Source], ...] = ()) -> int:
        """Send BZPOPMIN on ``keys`` on a connection of its own; returns its fd.
        ``need_id``: a due time ends it; learn the connection's id first, to unblock it.
        Its deadline is its timeout plus the pool's socket timeout (or DEAD_AFTER)."""
        pool = self.transport.wait_pool(keys[0])
        conn = pool_connection(pool, 'BZPOPMIN')
        try:
            client_id = self._client_id(conn) if need_id else None
            block = self._block(remaining, owner)
            conn.send_command('BZPOPMIN', *keys, block)
            fd = conn_fileno(conn)
        except Exception:
            pool.release(conn)
            raise
        deadline = monotonic() + block + (socket_timeout(pool) or DEAD_AFTER)
        self._waits[fd] = Wait(owner, keys, conn, pool, client_id, deadline, sources)
        return fd

    def _answer(self, fd: int) -> Popped:
        """Read a wait's answer and end the wait: the popped marker with the channel and
        source it belongs to, or None."""
        wait = self._waits[fd]
        try:
            popped = wait.conn.read_response()
        except _SLOT_MOVING:
            self._drop_wait(fd)
            self.transport.refresh_slots()
            return None
        except ResponseError as exc:
            self._drop_wait(fd)
            if not self._on_wrongtype(exc):
                raise
            return None
        except Exception:
            self._drop_wait(fd, disconnect=True)
            raise
        self._drop_wait(fd)
        if not popped:
            return None
        key = popped[0].decode() if isinstance(popped[0], bytes) else str(popped[0])
        channel, source = dict(zip(wait.keys, wait.sources)).get(key, (None, None))
        return (key, channel, source) if source is not None else None

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
        """Each loop turn: a read for every channel whose last read took all it was allowed
        (the acks made since ride inside it), the acks of the others sent, then a wait for
        every channel that may read (per slot group on Cluster) where none is pending."""
        waiting = {(w.owner, w.keys) for w in self._waits.values()}
        used, pool_of = self._budget()
        for channel in list(self.channels):
            wakes = channel.wake_keys()
            if wakes and channel.more_ready:
                # More is probably waiting: read again now (one round trip) instead of
                # waiting for the marker. A read that finds less ends this: no spinning.
                self._deliver_channel(channel)
                continue
            channel.flush_acks()
            if not wakes:
                self._set_unwatched(channel, [])
                continue
            # One wait per slot group (one group on a single Redis); a group whose wait was
            # answered waits again now, whatever the channel's other groups are doing. On
            # Cluster the groups beyond a node's wait budget are looked at instead (_look).
            due = self._due_bounds(None, channel)
            unwatched: list[str] = []
            for keys in self._groups(list(wakes)):
                if (channel, keys) in waiting:
                    continue
                if self.transport.cluster and not self._cap(pool_of, used, keys):
                    unwatched.extend(keys)
                    continue
                fd = self._send_wait(keys, channel, need_id=due,
                                     sources=tuple((channel, wakes[k]) for k in keys))
                self._hub.add_reader(fd, self.transport.on_readable, fd)
                wait = self._waits[fd]
                self._hub.call_later(wait.deadline - monotonic(), self._expire_if_waiting,
                                     fd, wait)
                if due:  # end the wait on time: Redis's own timeout may come 1/hz s late
                    self._hub.call_later((self._due_in(channel) or 0.0) + UNBLOCK_AFTER,
                                         self._unblock_if_waiting, fd, self._waits[fd])
            self._set_unwatched(channel, unwatched)
        for owner in self._look():
            if owner is not None:
                self._deliver_channel(owner)
        if self._unwatched and not self._look_timer:  # the loop must turn to look again
            self._look_timer = True
            self._hub.call_later(max(self._next_look - monotonic(), 0.0), self._looked)

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
        if disconnect:
            self._give_back(wait.sources)

    def _give_back(self, sources: Any) -> None:
        """Popped markers no read will cover, given as (channel, source): a wait dropped
        unread may have popped one of its markers (the answer was on its way), so all are
        given back, one wake.lua call per channel and slot group, each only where its source
        still exists (a queue that expired meanwhile gets no marker back). A marker without
        work costs a read that finds nothing; a lost one would leave the work to the
        sweep."""
        by_channel: dict[Any, list[Source]] = {}
        for channel, source in sources:
            by_channel.setdefault(channel, []).append(source)
        for channel, mine in by_channel.items():
            try:
                channel.give_back(mine)
            except Exception as exc:  # no connection: the sweep of some consumer finds it
                logger.warning('kombu-streams: could not give back wake markers: %r', exc)
