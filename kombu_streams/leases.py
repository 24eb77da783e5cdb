"""Leases: keep held messages from being reclaimed, and reclaim the messages of dead consumers.

A delivered message's lease is its idle time in the PEL: once it reaches
``visibility_timeout`` any consumer of the queue may reclaim it (``reclaim.lua``). While a
process lives, this keeper renews the leases of every message its channels hold (running
tasks, ETA tasks waiting in a Celery worker, prefetched messages) every third of the
timeout, so a task may run far longer than ``visibility_timeout`` and still run once. A
process that dies stops renewing, and its messages come back after the timeout. The same
rounds keep the x-expires queues it consumes (and their bindings) alive.

It is a daemon thread rather than a timer on the consumer's loop, because the loop may be
blocked for a long time by the application (a Kombu callback doing slow work); the thread
needs only the connection pool, which is thread-safe. It starts when a channel first holds
a message or consumes a queue, and stops with the connection.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

#: Longest pause between two rounds, whatever the visibility timeout.
MAX_INTERVAL = 30.0


class LeaseKeeper:
    """Renews leases and reclaims stalled messages for all channels of one transport."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: closed channels whose last acks could not be sent: retried every round
        self._orphans: list[Any] = []

    def adopt(self, channel: Any) -> None:
        """Keep sending a closed channel's deferred acks (its close could not): an ack the
        application made is only ever delayed, while this connection lives."""
        with self._lock:
            if channel not in self._orphans:
                self._orphans.append(channel)
        self.start()

    def interval(self) -> float:
        periods = [ch.keeper_interval() for ch in self._channels()] or [MAX_INTERVAL]
        return max(min(min(periods), MAX_INTERVAL), 0.05)

    def _channels(self) -> list[Any]:
        return [ch for ch in list(self.transport.channels) if not ch.closed]

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name='kombu-streams-leases', daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def run_once(self) -> None:
        """One round: renew every held lease, reclaim for every consumed queue, and keep
        consumed expiring queues (x-expires) alive."""
        for channel in list(self._orphans):
            try:
                channel.flush_acks()
            except Exception as exc:
                logger.warning('kombu-streams: acks of a closed channel not sent yet: %r', exc)
            else:
                with self._lock:
                    self._orphans.remove(channel)
        for channel in self._channels():
            try:
                channel.flush_acks()
                channel.renew_leases()
                channel.reclaim()
                channel.keep_expiring_queues()
            except Exception as exc:  # connection trouble: the next round tries again
                logger.warning('kombu-streams: lease round failed: %r', exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval()):
            self.run_once()
