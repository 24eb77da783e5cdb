"""The pending waits of a transport: BZPOPMINs on wake markers, each on a pooled connection
of its own, watched by a selector or an event loop.

A wait is sent, then answered (the marker it popped, or a timeout), or ended early with CLIENT
UNBLOCK (a due time came first), or dropped unread (its channel went away: its markers are
given back through wake.lua), or found dead (no answer by its deadline: a half-open
connection). What to wait on and when is the poller's (:mod:`kombu_streams.poller`); the
commands themselves (BZPOPMIN, CLIENT ID, CLIENT UNBLOCK) are the Broker's, the one place that
talks to Redis (:meth:`~kombu_streams.broker.Broker.send_wait` and the methods after it).
"""

from __future__ import annotations

import logging
import selectors
import weakref
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from redis.exceptions import AskError, ClusterDownError, ResponseError, TryAgainError

from .broker import Broker
from .compat import conn_fileno, pool_connection
from .connection import socket_timeout
from .errors import DeadConnection
from .state import Source

if TYPE_CHECKING:
    from .channel import Channel

logger = logging.getLogger('kombu_streams.poller')

#: After a due time, how long a wait it bounds may still take before the poller ends it with
#: CLIENT UNBLOCK: Redis checks blocked clients' timeouts only when its event loop wakes,
#: every 1/hz s (100 ms by default) on an otherwise quiet server.
UNBLOCK_AFTER = 0.002

#: How late past its own timeout a wait's answer may come before the connection is taken for
#: dead (a half-open TCP connection: the server or a middlebox dropped it silently), when the
#: pool sets no socket timeout; otherwise the socket timeout is the margin.
DEAD_AFTER = 10.0

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
    #: the read sent behind the BZPOPMIN (a channel's CarriedRead, kombu_streams/carried.py),
    #: or None
    carried: Any = None


#: A popped marker: (its key, the channel that reads its source, the source), or None.
Popped = Optional[tuple[str, Any, Source]]


def readable(fds: list[int], timeout: float) -> list[int]:
    """Which of ``fds`` can be read within ``timeout`` seconds. ``selectors`` (epoll or
    poll) rather than ``select.select``, which refuses descriptors above 1023."""
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        return [key.fd for key, _ in selector.select(max(timeout, 0.0))]


class Waits:
    """The pending waits of one transport, by the socket descriptor they wait on."""

    def __init__(self, transport: Any, on_wrongtype: Callable[[BaseException], bool]) -> None:
        self.transport = transport
        #: a wait answered WRONGTYPE: the poller's channels find which marker and suspend it
        self._on_wrongtype = on_wrongtype
        self.pending: dict[int, Wait] = {}
        #: the event loop whose readers the waits of channels are (None: drain_events)
        self.hub: Any = None
        self.can_unblock = True  # CLIENT ID / UNBLOCK allowed (an ACL may refuse them)
        #: connection -> its CLIENT ID, forgotten when it reconnects (a new id)
        self._client_ids: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def may_carry(self, keys: tuple[str, ...]) -> bool:
        """Whether a wait on ``keys`` may carry a read (see :meth:`send`), as far as is
        known before sending it: asked first, so that a channel plans no read (its sweep
        included) for a wait that would drop it."""
        return (self.can_unblock and not self.transport.cluster
                and socket_timeout(self.transport.wait_pool(keys[0])) is not None)

    def send(self, keys: tuple[str, ...], owner: Channel | None, block: float,
             need_id: bool = False, sources: tuple[tuple[Any, Source], ...] = (),
             carried: Any = None) -> int:
        """Send BZPOPMIN on ``keys`` on a connection of its own; returns its fd.
        ``need_id``: a due time ends it; learn the connection's id first, to unblock it.
        ``carried``: a channel's read to send behind it (see Broker.send_wait); such a wait
        is ended early with CLIENT UNBLOCK and its answers read (:meth:`end`), so its id is
        learnt too, and a lost answer is made good on another connection (:meth:`_lost`),
        which only a socket timeout bounds: without an id, UNBLOCK or a socket timeout the
        read is not carried.
        Its deadline is its timeout plus the pool's socket timeout (or DEAD_AFTER)."""
        try:
            pool = self.transport.wait_pool(keys[0])
            conn = pool_connection(pool, 'BZPOPMIN')
        except BaseException:
            if carried is not None:
                carried.drop()
            raise
        try:
            client_id = self._client_id(conn) if need_id or carried is not None else None
            if carried is not None and (client_id is None or not self.can_unblock
                                        or socket_timeout(pool) is None):
                carried.drop()
                carried = None
            fd = conn_fileno(conn)  # the pool connected it
            Broker.send_wait(conn, keys, block, carried.call if carried is not None else None)
        except Exception:
            if carried is not None:
                carried.drop()
            conn.disconnect()  # half a command, or an answer on its way: nobody else reads it
            pool.release(conn)
            raise
        deadline = monotonic() + block + (socket_timeout(pool) or DEAD_AFTER)
        self.pending[fd] = Wait(owner, keys, conn, pool, client_id, deadline, sources, carried)
        return fd

    def answer(self, fd: int) -> tuple[Popped, bool]:
        """Read a wait's answer and end the wait: (the popped marker with the channel and
        source it belongs to, or None; whether a read it carried was taken). A carried read
        is handed to its channel first; when it ran, it covered every source of the wait,
        the popped marker's too (see CarriedRead), so no marker is left to follow."""
        wait = self.pending[fd]
        carried = wait.carried
        try:
            popped, reply = Broker.wait_answer(wait.conn, carried is not None)
        except BaseException:  # an interrupt between the two replies too: out of step
            self.drop(fd, disconnect=True)
            self._lost(wait)
            raise
        self.drop(fd)
        taken = carried is not None and carried.take(reply)
        if isinstance(popped, _SLOT_MOVING):
            self.transport.refresh_slots()
            return None, taken
        if isinstance(popped, ResponseError):
            if not self._on_wrongtype(popped):
                raise popped
            return None, taken
        if not popped or taken:
            return None, taken
        key = popped[0].decode() if isinstance(popped[0], bytes) else str(popped[0])
        channel, source = dict(zip(wait.keys, wait.sources)).get(key, (None, None))
        return ((key, channel, source) if source is not None else None), False

    def drop(self, fd: int, disconnect: bool = False) -> None:
        wait = self.pending.pop(fd, None)
        if wait is None:
            return
        if self.hub is not None and wait.owner is not None:
            self.hub.remove_reader(fd)
        if disconnect:
            wait.conn.disconnect()
        wait.pool.release(wait.conn)
        if disconnect:
            self.give_back(wait.sources)

    def end(self, fd: int) -> None:
        """End a pending wait before its answer, without losing what it may have done: a
        plain wait is dropped (its markers given back); one that carries a read is ended
        with CLIENT UNBLOCK and its answers read, so that what the read took reaches its
        channel (to be handed out, or returned to the queue by a cancel or close) instead of
        waiting in the PEL for its lease to run out. If that fails, it is dropped, logged."""
        wait = self.pending.get(fd)
        if wait is None:
            return
        if wait.carried is None:
            self.drop(fd, disconnect=True)
            return
        try:
            self.unblock(wait)
            # unblocked, it is answered within a round trip; else by its own timeout
            if not readable([fd], wait.deadline - monotonic()):
                raise TimeoutError('no answer by the wait\'s deadline')
            popped, _ = self.answer(fd)
            wait.carried.channel.hand_out_later()
        except Exception as exc:
            logger.warning('kombu-streams: a wait ended early could not be read: %r', exc)
            if fd in self.pending:
                self.drop(fd, disconnect=True)
                self._lost(wait)
            return
        if popped is not None:  # the read failed (NOSCRIPT...): nobody reads that source now
            self.give_back([popped[1:]])

    def carrying(self, channel: Any) -> list[tuple[int, Wait]]:
        """The pending waits that carry a read of ``channel``, by fd."""
        return [(fd, wait) for fd, wait in self.pending.items()
                if wait.carried is not None and wait.carried.channel is channel]

    def end_carried(self, channel: Any) -> None:
        """End every pending wait that carries a read of ``channel`` (see :meth:`end`)."""
        for fd, _ in self.carrying(channel):
            self.end(fd)

    def give_back(self, sources: Any) -> None:
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

    def dead(self, fd: int) -> None:
        """A wait got no answer by its deadline: its connection is dead (half-open). It is
        dropped without giving its markers back (that would need the same network; a marker
        it may have popped is found by the sweep) and DeadConnection raised, a connection
        error: Kombu and Celery reconnect."""
        wait = self.pending.pop(fd)
        if self.hub is not None and wait.owner is not None:
            self.hub.remove_reader(fd)
        wait.conn.disconnect()
        wait.pool.release(wait.conn)
        if wait.carried is not None:  # the pool's other connections went the same way
            wait.pool.disconnect()
            self._lost(wait)
        raise DeadConnection(
            f'kombu-streams: a wait on {len(wait.keys)} wake marker(s) got no answer by its '
            f'deadline: the connection to Redis is presumed dead (half-open); reconnecting')

    def _lost(self, wait: Wait) -> None:
        """A wait that carried a read ended without its answers: the read may have run and
        taken messages for its channel's consumer, which nobody will hand out; the channel
        gives them back now (CarriedRead's recover), on another connection (bounded by the
        socket timeout, without which no read is carried)."""
        carried = wait.carried
        if carried is None:
            return
        try:
            carried.recover()
        except Exception as exc:
            logger.warning('kombu-streams: a wait\'s answer was lost, and what its read took, '
                           'if anything, could not be given back (%r): it comes back when its '
                           'lease runs out', exc)

    def expire_if_waiting(self, fd: int, wait: Wait) -> None:
        """A hub timer at a wait's deadline: if it is still the one pending on fd, its
        connection is dead."""
        if self.pending.get(fd) is wait:
            self.dead(fd)

    def unblock(self, wait: Wait) -> None:
        """End a pending wait now (Redis answers it as a timeout). Without the permission
        (an ACL without CLIENT ID / UNBLOCK) waits end by Redis's own timeout instead, up to
        1/hz s late; that is logged once."""
        if wait.client_id is None:
            return
        conn = pool_connection(wait.pool, 'CLIENT')
        try:
            Broker.unblock(conn, wait.client_id)
        except ResponseError as exc:
            self._no_unblock(exc)
        finally:
            wait.pool.release(conn)

    def _no_unblock(self, exc: BaseException) -> None:
        if self.can_unblock:
            self.can_unblock = False
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
        try:
            self._client_ids[conn] = Broker.client_id(conn)
        except ResponseError as exc:
            self._no_unblock(exc)
            return None
        return self._client_ids[conn]

    def _forget_id(self, conn: Any) -> None:
        self._client_ids.pop(conn, None)

    def after_fork(self) -> None:
        """In a child process: forget the parent's waits (their sockets are closed here, not
        shut down: the parent's waits go on) and its event loop."""
        for wait in self.pending.values():
            if wait.carried is not None:  # the child's copy of the channel: credit free
                wait.carried.drop()
            wait.conn.disconnect()
        self.pending.clear()
        self.hub = None


__all__ = ('Waits', 'Wait', 'Popped', 'readable', 'UNBLOCK_AFTER', 'DEAD_AFTER')
