"""What one channel holds between reading a message and settling it: the one owner of it.

Three threads touch it: the consuming thread (reads, hands out, acks on an event loop), the
application's threads (a Celery threads-pool task acks or requeues; a Kombu callback in
another thread) and the lease keeper (renews, drops messages whose lease was lost, sends
deferred acks). So it lives here, behind one lock, and the others use it only through
these methods, each of which leaves it consistent: a message is in flight (``_held``) from
its read until it is settled, and at most one of "waiting in the read-ahead buffer" or
"its ack deferred" besides. Methods return snapshots (lists, tuples), never the live
containers, so nobody iterates one while another thread changes it. Nothing here does I/O:
the lock is held for microseconds, never across a Redis call.

The sources a channel reads (its queues, and their groups on the fanout exchanges they are
bound to) are kept here too, worked out when consumers or bindings change
(:meth:`ConsumerState.set_sources`) instead of on every event-loop turn, and replaced whole,
so the lease keeper reads a consistent tuple while the consumer binds.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, NamedTuple, Optional, TypeVar

#: A source of messages for a read: (queue, None) for the queue's own streams, (queue,
#: exchange) for its group on a fanout exchange's stream.
Source = tuple[str, Optional[str]]

#: A message read for the application: (Kombu's message dict, queue name).
Item = tuple[dict[str, Any], str]


@dataclass(eq=False)
class InFlight:
    """A message a channel read and has not settled yet: delivered to the application, or
    waiting in its read-ahead buffer. (Not "held": that word is for messages parked with the
    holder consumer, see lua/lib/serve.lua.)"""

    queue: str
    stream: str
    entry_id: bytes
    deliveries: int
    exchange: str | None  # the fanout exchange whose stream holds it, if any
    #: monotonic time of its read or last renewal: its lease holds until at least then + vt
    leased_at: float = field(default_factory=monotonic)
    #: a renewal found its lease lost: never to be handed out, never renewed again
    lost: bool = False

    def surely_held(self, lease: float, now: float) -> bool:
        """Whether this consumer surely still owns the message at ``now`` (monotonic): read
        or renewed less than half a ``lease`` (seconds) ago by its own clock. No reclaim
        takes an entry before it was idle a whole lease, so nobody can have taken it; the
        half leaves room for clocks and a stalled thread. Settling such a message needs no
        ownership lookup in Redis (ack.lua's trusted acks)."""
        return not self.lost and now - self.leased_at < lease / 2
    #: a big message (its body in the queue's big hash): its ack frees the body, in an ack
    #: call of its own (ordinary acks cost no command more for it)
    big: bool = False
    #: its x-unique-key ('' none): its ack (riding in a read, or in an ack call) or dead
    #: letter releases it (kombu_streams/unique.py)
    unique: str = ''


T = TypeVar('T')


def by_source(items: Iterable[T], msg: Callable[[T], InFlight]) -> dict[Source, list[T]]:
    """``items`` grouped by the source of their message, (queue, fanout exchange or None):
    one script call per source settles or renews them."""
    groups: dict[Source, list[T]] = {}
    for item in items:
        m = msg(item)
        groups.setdefault((m.queue, m.exchange), []).append(item)
    return groups


class Reading(NamedTuple):
    """What a channel reads, worked out when its consumers or the bindings change."""

    #: every source, in serving order
    sources: tuple[Source, ...] = ()
    #: consumed queue -> the fanout exchanges it is bound to (their streams are read
    #: through its group)
    fanout: dict[str, tuple[str, ...]] = {}
    #: consumed queue -> its bindings (exchange, routing key, arguments), for the lease
    #: keeper's refresh of expiring queues
    bindings: dict[str, tuple[tuple[str, str, Any], ...]] = {}


def _tag(item: Item) -> str:
    return item[0]['properties']['delivery_tag']


class ConsumerState:
    """In-flight messages, the read-ahead buffer, deferred acks and the sources of one
    channel, behind one lock."""

    def __init__(self) -> None:
        #: not re-entrant: no method calls another that takes it (and a plain lock is cheaper
        #: on the per-message path)
        self._lock = threading.Lock()
        #: delivery tag -> the message, from its read until it is settled
        self._held: dict[str, InFlight] = {}
        #: read, not yet handed to the application (their tags are in _held)
        self._buffer: deque[Item] = deque()
        self._buffered_tags: set[str] = set()
        #: acked by the application, to be sent with the next read or before a wait
        self._acks: deque[InFlight] = deque()
        self._acks_since = 0.0
        self._reading = Reading()
        #: every source this channel read (its consumer joined their groups): left at close
        self._joined: set[Source] = set()

    # -- in flight ---------------------------------------------------------------------------

    def hold(self, tag: str, msg: InFlight) -> None:
        """A message was read: it is in flight under ``tag`` until settled."""
        with self._lock:
            self._held[tag] = msg

    def hold_many(self, held: Iterable[tuple[str, InFlight]]) -> None:
        """Messages were read: each in flight under its tag until settled (one lock for a
        read's worth)."""
        with self._lock:
            self._held.update(held)

    def get(self, tag: str) -> InFlight | None:
        with self._lock:
            return self._held.get(tag)

    def release(self, tags: Iterable[str]) -> list[tuple[str, InFlight]]:
        """Take ``tags`` out of flight (to settle them); those no longer there are left out:
        settled already, or given back."""
        with self._lock:
            out = []
            for tag in tags:
                msg = self._held.pop(tag, None)
                if msg is not None:
                    out.append((tag, msg))
            self._unbuffer({tag for tag, _ in out})
            return out

    def holding(self) -> list[tuple[str, InFlight]]:
        """Every message in flight whose lease is not known lost, for renewal."""
        with self._lock:
            return [(tag, m) for tag, m in self._held.items() if not m.lost]

    def known(self) -> set[tuple[str, Any]]:
        """(stream, entry id) of every message this channel knows it owns: in flight, or
        acked and the ack not sent yet."""
        with self._lock:
            return ({(m.stream, m.entry_id) for m in self._held.values()}
                    | {(m.stream, m.entry_id) for m in self._acks})

    def held_count(self) -> int:
        with self._lock:
            return len(self._held)

    def queues_of(self, tags: Iterable[str]) -> set[str]:
        with self._lock:
            return {self._held[t].queue for t in tags if t in self._held}

    def forget(self) -> None:
        """Drop everything (a test's crashed consumer); nothing is sent to Redis: leases
        bring the messages back."""
        with self._lock:
            self._clear()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's messages (the child must not settle
        them) under a new lock. The parent's lock may have been held by another of its
        threads (the lease keeper) at the fork; that thread does not exist in the child, so
        taking the old lock could wait forever."""
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._held.clear()
        self._buffer.clear()
        self._buffered_tags.clear()
        self._acks.clear()

    # -- the read-ahead buffer ---------------------------------------------------------------

    def buffer(self, items: Iterable[Item]) -> None:
        """Messages read ahead (already in flight), to be handed out in this order."""
        items = list(items)
        tags = [_tag(item) for item in items]
        with self._lock:
            self._buffer.extend(items)
            self._buffered_tags.update(tags)

    def buffered(self) -> int:
        with self._lock:
            return len(self._buffer)

    def next_buffered(self) -> Item | None:
        """The next read-ahead message to hand out, or None; one whose lease was lost is
        dropped from flight and skipped."""
        with self._lock:
            while self._buffer:
                item = self._buffer.popleft()
                tag = _tag(item)
                self._buffered_tags.discard(tag)
                msg = self._held.get(tag)
                if msg is not None and not msg.lost:
                    return item
                self._held.pop(tag, None)
            return None

    def unread(self, item: Item) -> None:
        """Put a message taken with :meth:`next_buffered` back first (it could not be
        handed out), unless it was settled or lost meanwhile."""
        with self._lock:
            msg = self._held.get(_tag(item))
            if msg is not None and not msg.lost:
                self._buffer.appendleft(item)
                self._buffered_tags.add(_tag(item))

    def take_buffered(self, queues: set[str] | None = None) -> list[str]:
        """Remove the read-ahead messages of ``queues`` (or all) from the buffer; their tags
        (still in flight, for the caller to requeue)."""
        with self._lock:
            keep: deque[Item] = deque()
            tags = []
            for item in self._buffer:
                if queues is None or item[1] in queues:
                    tags.append(_tag(item))
                else:
                    keep.append(item)
            self._buffer = keep
            self._buffered_tags.difference_update(tags)
            return tags

    def lose(self, tag: str, msg: InFlight) -> bool | None:
        """A renewal found ``msg``'s lease lost. None: it was settled meanwhile (nothing
        lost). True: it was still in the buffer, now dropped for good. False: handed out
        already, it stays in flight marked lost (it may be processed twice)."""
        with self._lock:
            if self._held.get(tag) is not msg:
                return None
            msg.lost = True
            if tag in self._buffered_tags:
                self._unbuffer({tag})
                del self._held[tag]
                return True
            return False

    def _unbuffer(self, tags: set[str]) -> None:
        """Drop ``tags`` from the buffer (settled or lost before being handed out): a scan
        only when one of them is there, which the usual ack of a handed-out message is not."""
        if tags & self._buffered_tags:
            self._buffer = deque(i for i in self._buffer if _tag(i) not in tags)
            self._buffered_tags -= tags

    # -- deferred acks -----------------------------------------------------------------------

    def defer_ack(self, tag: str) -> bool:
        """Move ``tag`` from flight to the deferred acks; False if it was not in flight."""
        with self._lock:
            msg = self._held.pop(tag, None)
            if msg is None:
                return False
            if tag in self._buffered_tags:  # not the usual ack: no set made per ack
                self._unbuffer({tag})
            if not self._acks:
                self._acks_since = monotonic()
            self._acks.append(msg)
            return True

    def acks_due(self, batch: int, delay: float) -> bool:
        """Whether deferred acks should go now: ``batch`` wait, or the oldest is ``delay``
        seconds old."""
        with self._lock:
            return bool(self._acks) and (len(self._acks) >= batch
                                         or monotonic() - self._acks_since >= delay)

    def has_acks(self) -> bool:
        with self._lock:
            return bool(self._acks)

    def take_acks(self) -> list[InFlight]:
        """Every deferred ack, in order, for the caller to send (or :meth:`put_back_acks`)."""
        with self._lock:
            acks = list(self._acks)
            self._acks.clear()
            return acks

    def put_back_acks(self, acks: list[InFlight]) -> None:
        """Acks whose sending failed: first again, never dropped (sending twice is
        harmless)."""
        if not acks:
            return
        with self._lock:
            if not self._acks:
                self._acks_since = monotonic()
            self._acks.extendleft(reversed(acks))

    # -- sources -----------------------------------------------------------------------------

    def set_reading(self, reading: Reading) -> None:
        """What the channel reads now (consumers or bindings changed)."""
        self._reading = reading  # replaced whole: readers see the old or the new one

    @property
    def reading(self) -> Reading:
        return self._reading

    def join(self, sources: Iterable[Source]) -> None:
        """The channel reads (or read once) ``sources``: its consumer is in their groups."""
        with self._lock:
            self._joined.update(sources)

    def joined(self) -> list[Source]:
        with self._lock:
            return sorted(self._joined, key=lambda s: (s[0], s[1] or ''))


__all__ = ('ConsumerState', 'InFlight', 'Reading', 'Source', 'by_source')
