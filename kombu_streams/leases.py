"""Leases: keep in-flight messages from being reclaimed; reclaim those of dead consumers.

A delivered message's lease is its idle time in the PEL: once it reaches
``visibility_timeout`` any consumer of the queue may give it back (``reclaim.lua``). While a
process lives, its keeper thread renews the lease of every message its channels hold
(running tasks, ETA tasks waiting in a Celery worker, prefetched messages) every third of
the timeout (at most every 30 s), so a task may run far longer than ``visibility_timeout``
and still run once. A process that dies stops renewing, and its messages come back one
timeout after its last renewal. The same rounds keep the x-expires queues it consumes (and
their bindings) alive, and send acks that waited too long (``ACK_DELAY``).

Bounded work: renewal goes in calls of at most ``broker.RENEW_CHUNK`` ids, pipelined
``PIPELINE`` calls per round trip; each reclaim call moves or looks at most ``reclaim_batch``
PEL entries. A source (a queue, or its group on a fanout exchange) is looked at only when a
lease in it could have run out: reclaim.lua answers when that is at the earliest, and what is
owned by live consumers is not looked at before. So an idle consumer of 1,000 queues costs
Redis next to nothing here, and a dead consumer's 100,000 messages come back in the first
round after their lease ran out, in calls of ``reclaim_batch``.

It is a daemon thread rather than a timer on the consumer's loop, because the loop may be
blocked for a long time by the application (a Kombu callback doing slow work); the thread
needs only the connection pool, which is thread-safe. It starts when a channel first holds
a message or consumes a queue, and stops with the connection.
"""

from __future__ import annotations

import logging
import threading
from time import monotonic
from typing import TYPE_CHECKING, Any

from kombu.utils.encoding import bytes_to_str

from .losswatch import LossWatch
from .options import ms
from .scripts import Call, run_calls
from .state import InFlight, by_source

if TYPE_CHECKING:
    from .channel import Channel
    from .state import Source

logger = logging.getLogger(__name__)

#: Longest pause between two rounds, whatever the visibility timeout.
MAX_INTERVAL = 30.0

#: Longest an ack made on an event loop or in a drain_events callback waits to be sent
#: (seconds), when no read or wait comes first to carry it.
ACK_DELAY = 0.1

#: Script calls per round trip in a round.
PIPELINE = 20

#: Most reclaim calls per source and round for the sweep (work of stopped consumers is
#: always given back in full, in as many calls as it takes).
SWEEP_CALLS = 10

#: A consumer that owns nothing is removed by reclaim once idle this long (ms), never
#: sooner than two leases: :func:`consumer_expiry_ms`.
CONSUMER_EXPIRY_MIN_MS = 300_000


def consumer_expiry_ms(lease_ms: int) -> int:
    """How long a consumer that owns nothing may be idle before reclaim removes it: two
    leases, at least CONSUMER_EXPIRY_MIN_MS. One place, so that ``kombu-streams scripts
    --call reclaim`` prints the reclaim call the lease keeper sends."""
    return max(2 * lease_ms, CONSUMER_EXPIRY_MIN_MS)


class Leases:
    """The lease work of one channel: renewal of what it holds, reclaim for what it reads."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        #: source -> monotonic time its next reclaim call is due
        self._due: dict[Source, float] = {}
        #: source -> sweep cursor per stream
        self._cursors: dict[Source, list[str]] = {}

    @property
    def lease_ms(self) -> int:
        """The lease in ms for reclaim.lua: at least 1 (0 would take every lease as run
        out, and reclaim messages still being worked on)."""
        return ms(self.channel.visibility_timeout)

    def renew(self) -> int:
        """Renew the lease of every message the channel holds; drop from its read-ahead
        buffer the ones whose lease was lost, and log those already handed out."""
        ch = self.channel
        # a message whose lease was found lost is not renewed (nor reported) again
        now_held = ch.consumer_state.holding()
        calls: list[tuple[Call, str]] = []
        for (queue, _), group in by_source(now_held, lambda item: item[1]).items():
            calls += ch.broker.renew_calls(queue, ch.consumer_name,
                                           [(m.stream, m.entry_id) for _, m in group])
        started = monotonic()
        lost: set[tuple[str, bytes]] = set()
        failed: set[str] = set()
        replies = _pipelined(ch.client, [call for call, _ in calls])
        for (_, stream), reply in zip(calls, replies):
            if isinstance(reply, Exception):
                failed.add(stream)
                logger.warning('kombu-streams: could not renew leases in %s: %r',
                               stream, reply)
            else:
                lost.update((stream, entry_id) for entry_id in reply)
        renewed = 0
        for tag, msg in now_held:
            if (msg.stream, msg.entry_id) in lost:
                self.lost(tag, msg)
            elif msg.stream not in failed:
                msg.leased_at = started
                renewed += 1
        return renewed

    def confirm(self, tag: str) -> bool:
        """Before a buffered message is handed out: True if its lease still holds. One that
        was read or renewed long ago (the process was stopped, or its keeper starved) is
        renewed now, and dropped if that shows the lease was lost meanwhile."""
        ch = self.channel
        msg = ch.consumer_state.get(tag)
        if msg is None or msg.lost:
            return False  # dropped: its lease was lost
        if msg.surely_held(ch.visibility_timeout, monotonic()):
            return True
        started = monotonic()
        lost = ch.broker.renew(msg.queue, ch.consumer_name, [(msg.stream, msg.entry_id)])
        if lost:
            self.lost(tag, msg, unhanded=True)
            return False
        msg.leased_at = started
        return True

    def lost(self, tag: str, msg: InFlight, unhanded: bool = False) -> None:
        """Another consumer has this message now (its lease ran out while this process was
        stopped or cut off). Still in the read-ahead buffer (or taken from it to be handed
        out: ``unhanded``): dropped, never handed out. Handed out already: it may be
        processed twice; logged."""
        state = self.channel.consumer_state
        dropped = state.lose(tag, msg)
        if dropped is None:
            return  # settled meanwhile: not lost
        if unhanded and not dropped:
            state.release([tag])
            dropped = True
        if dropped:
            logger.warning('kombu-streams: dropped message %s of %s from the read-ahead buffer: '
                           'its lease ran out and another consumer has it now',
                           bytes_to_str(msg.entry_id), msg.stream)
        else:
            logger.warning('kombu-streams: lost the lease of message %s in %s (it was reclaimed '
                           'or settled elsewhere); it may be processed twice',
                           bytes_to_str(msg.entry_id), msg.stream)

    def reclaim(self) -> int:
        """Give back stalled messages of the sources the channel reads whose next check is
        due; returns how many."""
        ch = self.channel
        now = monotonic()
        sources = list(ch.consumer_state.reading.sources)
        todo = [s for s in sources if self._due.get(s, 0.0) <= now]
        sweeps: dict[Source, int] = {}
        total = 0
        expiry_ms = consumer_expiry_ms(self.lease_ms)
        while todo:
            calls = [ch.broker.reclaim_call(q, self.lease_ms, ch.reclaim_batch,
                                            self._cursors.get((q, ex)), expiry_ms, ex)
                     for q, ex in todo]
            again = []
            replies = _pipelined(ch.client, [call for call, _ in calls])
            for (_, parse), source, reply in zip(calls, todo, replies):
                if isinstance(reply, Exception):
                    logger.warning('kombu-streams: reclaim of %r failed: %r', source[0], reply)
                    continue  # due again next round
                done = parse(reply)
                total += done.moved
                if done.moved:
                    logger.info('kombu-streams: gave back %d messages whose lease ran out in '
                                '%r', done.moved, source[0])
                self._cursors[source] = done.cursors
                sweeping = any(c != '-' for c in done.cursors)
                sweeps[source] = sweeps.get(source, 0) + 1
                if done.more or (sweeping and sweeps[source] < SWEEP_CALLS):
                    again.append(source)
                elif sweeping:
                    self._due[source] = 0.0  # the sweep goes on next round
                elif done.next_ms >= 0:
                    self._due[source] = now + done.next_ms / 1000.0
                else:
                    self._due[source] = now + ch.visibility_timeout
            todo = again
        if len(self._due) > 4 * len(sources) + 100:  # sources come and go: forget old ones
            live = set(sources)
            self._due = {s: t for s, t in self._due.items() if s in live}
            self._cursors = {s: c for s, c in self._cursors.items() if s in live}
        return total


def _pipelined(client: Any, calls: list[Call]) -> list[Any]:
    """Run ``calls`` PIPELINE per round trip; their replies, errors in their call's place."""
    replies: list[Any] = []
    for j in range(0, len(calls), PIPELINE):
        replies += run_calls(client, calls[j:j + PIPELINE], raise_errors=False)
    return replies


class LeaseKeeper:
    """Renews leases, reclaims stalled messages and sends late acks for all channels of one
    transport."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._stop = threading.Event()
        #: set when an ack was deferred: the thread sends it after ACK_DELAY
        self._acks = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: closed channels whose last acks could not be sent: retried every round
        self._orphans: list[Any] = []
        self._loss = LossWatch()

    def adopt(self, channel: Any) -> None:
        """Keep sending a closed channel's deferred acks (its close could not): an ack the
        application made is only ever delayed, while this connection lives."""
        with self._lock:
            if channel not in self._orphans:
                self._orphans.append(channel)
        self.start()

    def acks_waiting(self) -> None:
        """A channel deferred an ack: make sure it goes out within ACK_DELAY. Called for
        every deferred ack, so it is cheap when the thread knows already: the flag is read
        without a lock. The thread clears it before it waits ACK_DELAY and flushes, so an
        ack made after the clear sets it again and the next turn sends that one."""
        if not self._acks.is_set():
            self._acks.set()
            self.start()

    def interval(self) -> float:
        periods = [ch.keeper_interval() for ch in self._channels()] or [MAX_INTERVAL]
        return max(min(min(periods), MAX_INTERVAL), 0.05)

    def _channels(self) -> list[Channel]:
        return [ch for ch in list(self.transport.channels) if not ch.closed]

    def start(self) -> None:
        """Start the thread, unless it runs (or the transport was closed: stop is final)."""
        if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
            return
        with self._lock:
            if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(
                target=self._run, name='kombu-streams-leases', daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._acks.set()  # wakes the thread
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def flush_acks(self) -> None:
        """Send the deferred acks of every channel, and of closed ones not sent yet."""
        for channel in list(self._orphans):
            try:
                channel.flush_acks()
            except Exception as exc:
                logger.warning('kombu-streams: acks of a closed channel not sent yet: %r', exc)
            else:
                with self._lock:
                    if channel in self._orphans:
                        self._orphans.remove(channel)
        for channel in self._channels():
            try:
                channel.flush_acks()
            except Exception as exc:  # kept by the channel; sent later
                logger.warning('kombu-streams: deferred acks not sent yet: %r', exc)

    def run_once(self) -> None:
        """One round: send deferred acks, renew the lease of every in-flight message, reclaim
        where due, keep consumed expiring queues (x-expires) alive, and look for data Redis
        lost (:mod:`kombu_streams.losswatch`)."""
        self.flush_acks()
        for channel in self._channels():
            try:
                channel.leases.renew()
                channel.leases.reclaim()
                channel.keep_expiring_queues()
            except Exception as exc:  # connection trouble: the next round tries again
                logger.warning('kombu-streams: lease round failed: %r', exc)
        self._loss.check(self._channels())

    def _run(self) -> None:
        """Rounds every interval(); in between, deferred acks ACK_DELAY after they were
        made. Acks never put a round off: one that is due runs after the ack flush."""
        next_round = monotonic() + self.interval()
        while not self._stop.is_set():
            if self._acks.wait(max(next_round - monotonic(), 0.0)):
                self._acks.clear()
                if self._stop.wait(ACK_DELAY):
                    break
                self.flush_acks()
            if self._stop.is_set():
                break
            if monotonic() >= next_round:
                self.run_once()
                next_round = monotonic() + self.interval()


__all__ = ('LeaseKeeper', 'Leases', 'consumer_expiry_ms', 'ACK_DELAY')
