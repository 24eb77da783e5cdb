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

Latency: a publish wakes the blocked consumer directly, which then runs one read: two round
trips from publish to callback, the same as Kombu's Redis transport (BRPOP, then its
pipeline that records the unacked message).
"""

from __future__ import annotations

import socket
import time
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .channel import Channel

#: BZPOPMIN rounds tiny timeouts to 0, which means "forever": never block for less.
MIN_BLOCK = 0.01


class Poller:
    """The transport's ``cycle``: serves ``drain_events`` for all channels of a connection."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.channels: list[Channel] = []

    def add(self, channel: Channel) -> None:
        if channel not in self.channels:
            self.channels.append(channel)

    def discard(self, channel: Channel) -> None:
        if channel in self.channels:
            self.channels.remove(channel)

    def close(self) -> None:
        self.channels = []

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

    def drain(self, deliver: Callable[[Any, str], Any], timeout: float | None = None) -> None:
        """Deliver one message, blocking up to ``timeout`` (None: forever) for one to come."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if self.deliver_one(deliver):
                return
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise socket.timeout()
            self.wait(remaining)

    def wait(self, remaining: float | None) -> None:
        """Block until a marker of a queue we may read is set, or the interval passes."""
        block = self.transport.wait_interval
        if remaining is not None:
            block = min(block, remaining)
        block = max(block, MIN_BLOCK)
        wakes = list(dict.fromkeys(k for ch in self.channels for k in ch.wake_keys()))
        if not wakes:  # every channel is at its prefetch limit: wait for acks
            time.sleep(block)
            return
        self.transport.blocking_client().bzpopmin(wakes, timeout=block)
