"""Which sources a read covers, so that a read costs what the ready work costs.

A channel may consume many queues (a source is a queue's own streams, or its group on a
fanout exchange). Reading every one of them on every read would cost Redis O(sources) per
read, busy or idle. Instead each source is in one of these states, and read.lua is told per
source how to read it (see its header):

* **woken** (mode POPPED): this consumer popped its wake marker; read it, and if the read
  runs out of credit before it, read.lua sets the marker again;
* **hot** (READ): the last read of it said it may hold more; read it;
* **cold** (GATED): read it only if its marker is set. No marker means nothing is ready (the
  invariant in :mod:`kombu_streams.poller`), so a gated source costs one EXISTS. A channel
  with at most READ_ALL sources gates all its cold ones on every read, so priority order
  across all its queues holds exactly as if every read covered every queue. A channel with
  more gates a rotating WINDOW of them, and only while it is busy with hot or woken ones:
  then its waits (a BZPOPMIN over every marker, which finds any set one) do not happen, and
  the window makes sure a queue that got work is read within (cold / WINDOW) reads. An idle
  channel reads nothing until a marker wakes it.
* **swept** (WALK): every SWEEP_INTERVAL the next SWEEP sources in turn are walked (every
  stream looked at, the ready index rebuilt): the safety net for a wake-up lost to something
  outside the invariant (a consumer that died between popping a marker and reading, keys
  removed behind our back) and for an index that names too little. With few sources, every
  source is swept every interval, as every read after a wait timeout once did; with 1,000,
  each comes round every 1,000 / SWEEP intervals.
* **due** (READ): the last read of it said its next delayed message is due by now (read.lua
  moves due ones into the streams as it opens a source). The wait of an idle channel ends
  by the earliest due time it knows (:meth:`ReadPlan.next_due`), so a delayed message is
  read when it is due, not a polling interval later.
* **suspended**: a read met another program's key at one of its names (WRONGTYPE); it is
  left out of reads and waits for SUSPEND seconds, so one broken queue never stops the
  healthy ones, and the error is logged once per LOG_PERIOD.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from time import monotonic

from .broker import GATED, POPPED, READ, WALK, ReadResult, Source

logger = logging.getLogger(__name__)

#: A channel with at most this many sources gates every cold one on every read.
READ_ALL = 16
#: Cold sources gated per read beyond READ_ALL, in turn, while the channel is busy.
WINDOW = 16
#: Sources walked per SWEEP_INTERVAL, in turn.
SWEEP = 4
SWEEP_INTERVAL = 1.0
#: Seconds a source with a broken key is left alone; seconds between two logs of the same
#: problem.
SUSPEND = 10.0
LOG_PERIOD = 300.0


class ReadPlan:
    """The read state of one channel's sources."""

    def __init__(self) -> None:
        self.hot: set[Source] = set()
        self.woken: set[Source] = set()
        self.suspended: dict[Source, float] = {}
        self._logged: dict[tuple[Source, str], float] = {}
        #: source -> monotonic time its next delayed message is due, as reads reported
        self.due: dict[Source, float] = {}
        #: source -> bytes expected of its largest entry, read.lua's size hint (it sizes the
        #: first batch of a read by it): the largest payload its last read delivered, or
        #: half the hint before when that was more (so one big message is not forgotten at
        #: once, and a stale hint fades in a few reads)
        self.sizes: dict[Source, int] = {}
        self._turn = {'window': 0, 'sweep': 0}
        self._sweep_at = 0.0

    def live(self, sources: Sequence[Source]) -> list[Source]:
        """The sources not suspended, in their order."""
        if not self.suspended:
            return list(sources)
        now = monotonic()
        for source, until in list(self.suspended.items()):
            if until <= now:
                del self.suspended[source]
        return [s for s in sources if s not in self.suspended]

    def _next(self, kind: str, items: list[Source], n: int) -> list[Source]:
        """The next ``n`` of ``items`` in turn (all of them if there are no more)."""
        if len(items) <= n:
            return items
        start = self._turn[kind] % len(items)
        self._turn[kind] = start + n
        return (items[start:] + items[:start])[:n]

    def modes(self, sources: Sequence[Source]) -> dict[Source, str]:
        """How the next read covers ``sources`` (in serving order); a source left out is not
        read. Empty: nothing to read now."""
        live = self.live(sources)
        modes: dict[Source, str] = {}
        now = monotonic()
        for s in live:
            if s in self.woken:
                modes[s] = POPPED
            elif s in self.hot or self.due.get(s, now + 1) <= now:
                modes[s] = READ
        cold = [s for s in live if s not in modes]
        if len(live) <= READ_ALL:
            modes.update((s, GATED) for s in cold)
        elif modes:
            modes.update((s, GATED) for s in self._next('window', cold, WINDOW))
        self._sweep(live, modes, now)
        return modes

    def carried_modes(self, sources: Sequence[Source], within: float) -> dict[Source, str]:
        """How a read sent behind a wait of at most ``within`` seconds on the markers of
        ``sources`` covers them (kombu_streams.carried.CarriedRead): each as if its marker
        was popped, as any one may be, and walked when its sweep falls due by the wait's end
        (a walk sets the marker again as well; a wake-up may run it a little early)."""
        live = self.live(sources)
        modes = {s: POPPED for s in live}
        self._sweep(live, modes, monotonic() + within, carried=True)
        return modes

    def _sweep(self, live: list[Source], modes: dict[Source, str], now: float,
               carried: bool = False) -> None:
        """Every SWEEP_INTERVAL, walk the next SWEEP sources (see the module's docstring).
        A source whose marker this consumer popped is read, not walked (its marker must be
        read or given back), except in a carried read, where a walk sets it again too."""
        if now >= self._sweep_at and live:
            self._sweep_at = now + SWEEP_INTERVAL
            for s in self._next('sweep', live, SWEEP):
                if carried or modes.get(s) != POPPED:
                    modes[s] = WALK

    def marked(self, sources: Sequence[Source]) -> None:
        """Their markers were seen set, not popped (marked.lua): read them next, as hot."""
        self.hot.update(sources)

    def woke(self, source: Source) -> None:
        """This consumer popped the source's marker."""
        self.woken.add(source)

    def learn(self, modes: dict[Source, str], result: ReadResult,
              largest: dict[Source, int] | None = None) -> None:
        """Take in what a read of ``modes`` said about each source. ``largest``: per source,
        the largest of its entries read (payload and field, as measured below), when the
        caller measured it already (one pass over the messages instead of two)."""
        for source, status in result.status.items():
            if status == '1':
                self.hot.add(source)
            elif status != '-':
                self.hot.discard(source)
            if modes.get(source) == POPPED:
                self.woken.discard(source)  # read, or its wake-up given back by read.lua
        if largest is None:
            largest = {}
            for d in result.deliveries:
                source = (d.queue, d.exchange)
                largest[source] = max(largest.get(source, 0), len(d.payload) + 1)
        for source, size in largest.items():
            self.sizes[source] = max(size, self.sizes.get(source, 0) // 2)
        if result.dues:
            now = monotonic()
            for source, ms in result.dues.items():
                if ms < 0:
                    self.due.pop(source, None)
                else:
                    self.due[source] = now + ms / 1000.0
        for source, error in result.problems:
            self.suspend(source, error)

    def next_due(self, sources: Sequence[Source] | None = None) -> float | None:
        """The earliest monotonic time a delayed message of ``sources`` (default: all) is
        due, as far as reads have told; None when none is known."""
        if not self.due:
            return None
        if sources is None:
            return min(self.due.values())
        times = [self.due[s] for s in sources if s in self.due]
        return min(times) if times else None

    def suspend(self, source: Source, error: str) -> None:
        """Leave a source with a broken key alone for SUSPEND seconds; log it now and then."""
        now = monotonic()
        self.suspended[source] = now + SUSPEND
        self.hot.discard(source)
        self.woken.discard(source)
        key = (source, error)
        if now - self._logged.get(key, -LOG_PERIOD) >= LOG_PERIOD:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[key] = now
            queue, exchange = source
            where = f'queue {queue!r}' + (f' (its group on fanout {exchange!r})'
                                          if exchange else '')
            logger.error('kombu-streams: %s: %s. Another program uses one of its key names: '
                         'rename or delete that key. Its reads and waits are suspended for '
                         '%d s at a time meanwhile; other queues are not affected.',
                         where, error, SUSPEND)

    def forget(self, sources: Sequence[Source]) -> set[Source]:
        """Keep only the state of ``sources`` (a consumer was cancelled); returns the woken
        sources dropped: their popped markers must be given back."""
        keep = set(sources)
        dropped = self.woken - keep
        self.hot &= keep
        self.woken &= keep
        self.due = {s: t for s, t in self.due.items() if s in keep}
        self.sizes = {s: n for s, n in self.sizes.items() if s in keep}
        return dropped


__all__ = ('ReadPlan', 'READ_ALL', 'WINDOW', 'SWEEP', 'SWEEP_INTERVAL')
