"""Moving messages from Kombu's stock Redis transport into kombu-streams queues.

Kombu's Redis transport keeps a queue as one list per priority step (``name``, then
``name + sep + step`` for steps above 0), LPUSHes new messages and pops the oldest from the
right; a message delivered but not acked sits in the hash ``unacked`` (delivery tag -> JSON
[envelope, exchange, routing key]) with its delivery time in the zset ``unacked_index``;
bindings are sets ``_kombu.binding.<exchange>`` of ``routing_key<sep>pattern<sep>queue``.
``global_keyprefix`` prefixes every one of these names.

A migration is planned first (what is where, read-only: that is also the dry run), then run
in batches: each batch is one script call (migrate.lua, migrate_unacked.lua) that moves
messages and removes them from Kombu's keys atomically. So a run that is interrupted, or
stopped by a limit, loses and duplicates nothing, and running it again continues where it
stopped. Both scripts touch Kombu's keys and ours in one call, so the Kombu broker must be
the same Redis server and database as the kombu-streams one.

Unacked messages are restored before a queue's lists and so are served first in their
level, as Kombu's own restore pushes them to the end it pops next; they are marked
redelivered, as Kombu marks them. Workers on the old transport must be stopped first: one
could still pop from a list (and hold that message in its own unacked entry), and a message
restored while the worker that holds it still runs may be delivered twice.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kombu.utils.json import dumps

from .broker import Broker
from .keys import glob_escape
from .options import SEP, level_for
from .text import preview, text

#: Kombu's priorities are 0..9, and a list exists per step in use: looking for all ten
#: names finds them whatever ``priority_steps`` the Kombu app had.
KOMBU_STEPS = range(10)


def kombu_priority(msg: dict[str, Any]) -> int | None:
    """The priority Kombu reads from an envelope (``int(properties.priority)`` clamped to
    0..9), or None where Kombu would fall back to its default. migrate.lua reads it the same
    way; the dry run uses this to say which level each message goes to."""
    props = msg.get('properties')
    if not isinstance(props, dict):
        return None
    p = props.get('priority')
    if isinstance(p, bool):
        p = int(p)
    elif isinstance(p, str):
        m = re.fullmatch(r'\s*([-+]?[0-9]+)\s*', p)
        p = int(m.group(1)) if m else None
    elif isinstance(p, float):
        p = int(p) if math.isfinite(p) else None
    elif not isinstance(p, int):
        p = None
    return None if p is None else max(0, min(9, p))


def list_target(raw: Any, levels: Sequence[int], list_level: int) -> int | None:
    """The level migrate.lua moves a list entry to, or None when it leaves it (not a JSON
    object with a body and a properties object: not a Kombu message)."""
    try:
        msg = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(msg, dict) or 'body' not in msg or not isinstance(
            msg.get('properties'), dict):
        return None
    p = kombu_priority(msg)
    return list_level if p is None else level_for(levels, p)


@dataclass(frozen=True)
class KombuKeys:
    """Key names of Kombu's Redis transport for one ``global_keyprefix`` and ``sep``."""

    prefix: str = ''
    sep: str = SEP
    unacked_key: str = 'unacked'
    unacked_index_key: str = 'unacked_index'

    def list(self, queue: str, step: int) -> str:
        return f'{self.prefix}{queue}' if step == 0 else f'{self.prefix}{queue}{self.sep}{step}'

    @property
    def unacked(self) -> str:
        return f'{self.prefix}{self.unacked_key}'

    @property
    def unacked_index(self) -> str:
        return f'{self.prefix}{self.unacked_index_key}'

    @property
    def binding_head(self) -> str:
        return f'{self.prefix}_kombu.binding.'


@dataclass
class SourceList:
    """One of Kombu's lists of a queue: its priority step, our level for it, its length;
    after a dry run, how many messages go to each level and how many are malformed."""

    queue: str
    step: int
    key: str
    level: int
    length: int
    levels: dict[int, int] | None = None
    malformed: int = 0


@dataclass
class Unacked:
    """One entry of Kombu's unacked hash, decoded: where it goes, or why it stays."""

    tag: bytes
    raw: bytes
    score: float
    payload: str | None = None
    level: int | None = None
    queues: list[str] = field(default_factory=list)
    problem: str | None = None


@dataclass
class QueuePlan:
    queue: str
    lists: list[SourceList]
    unacked: list[Unacked]
    #: the queue already has streams here (e.g. a run before this one moved it)
    exists: bool

    @property
    def total(self) -> int:
        return sum(s.length for s in self.lists) + len(self.unacked)


@dataclass
class Left:
    """Something migrate leaves where it is, and why."""

    where: str
    reason: str
    preview: str = ''

    def as_dict(self) -> dict[str, str]:
        return {'where': self.where, 'reason': self.reason, 'preview': self.preview}


@dataclass
class Plan:
    queues: list[QueuePlan]
    #: unacked entries to restore, oldest delivery first (each once, with all its queues)
    unacked: list[Unacked]
    left: list[Left]
    missing: list[str]

    @property
    def total(self) -> int:
        return sum(s.length for q in self.queues for s in q.lists) + len(self.unacked)


@dataclass
class Progress:
    """Handed to the progress callback after every batch."""

    queue: str
    moved: int
    total: int


@dataclass
class Result:
    #: messages taken from Kombu's keys (one routed to two queues counts once here)
    total: int = 0
    #: per queue: messages appended to it (unacked ones included)
    moved: dict[str, int] = field(default_factory=dict)
    unacked: dict[str, int] = field(default_factory=dict)
    #: per queue and Kombu step: messages moved from that list
    lists: dict[tuple[str, int], int] = field(default_factory=dict)
    left: list[Left] = field(default_factory=list)
    #: unacked entries acked or restored by someone else while we ran
    vanished: int = 0
    #: stopped by the limit before everything was moved
    limited: bool = False


class Migration:
    """Plan and run a migration from Kombu's keys into ``broker``'s queues, in the same
    server and database (each batch is one script that touches both); Kombu's keys are read
    through the broker too (``Admin`` in kombu_streams/admin.py), like every command."""

    def __init__(self, broker: Broker, kombu: KombuKeys, include_unacked: bool = True) -> None:
        self.broker = broker
        self.kombu = kombu
        self.include_unacked = include_unacked
        self._bindings: dict[str, list[tuple[str, str, str]]] | None = None

    # -- reading Kombu's keys -------------------------------------------------------------------

    def bindings(self) -> dict[str, list[tuple[str, str, str]]]:
        """exchange -> [(routing key, pattern, queue)], from every ``_kombu.binding.*`` set."""
        if self._bindings is None:
            head = self.kombu.binding_head
            match = glob_escape(head) + '*'
            out: dict[str, list[tuple[str, str, str]]] = {}
            for exchange, found in self.broker.kombu_bindings(head, match):
                members = []
                for m in found:
                    parts = text(m).split(self.kombu.sep)
                    if len(parts) == 3:
                        members.append((parts[0], parts[1], parts[2]))
                out[exchange] = sorted(members)
            self._bindings = out
        return self._bindings

    def discover(self) -> list[str]:
        """The queues bound to any exchange (Kombu declares queues by binding them)."""
        return sorted({q for table in self.bindings().values() for _, _, q in table if q})

    def route(self, exchange: str, routing_key: str) -> list[str]:
        """The queues Kombu's restore would push a message to. The exchange type is not kept
        in Redis, but the bindings show it: a topic binding stores its regex pattern, direct
        and fanout bindings none; the latter are matched by routing key, as direct."""
        if not exchange:
            return [routing_key] if routing_key else []
        found = set()
        for rk, pattern, queue in self.bindings().get(exchange, []):
            if pattern:
                try:
                    hit = re.match(pattern, routing_key) is not None
                except re.error:
                    hit = False
            else:
                hit = rk == routing_key
            if hit and queue:
                found.add(queue)
        return sorted(found)

    def read_unacked(self) -> list[Unacked]:
        """Every entry of the unacked hash, decoded and routed, oldest delivery first (the
        order Kombu's restore would serve them in)."""
        scores, entries = self.broker.kombu_unacked(self.kombu.unacked,
                                                    self.kombu.unacked_index)
        out = []
        for tag, raw in entries:
            entry = Unacked(tag, raw, scores.get(tag, math.inf))
            try:
                envelope, exchange, routing_key = json.loads(raw)
                if not isinstance(envelope, dict) or 'body' not in envelope or not isinstance(
                        envelope.get('properties'), dict):
                    raise ValueError('not a Kombu message')
                exchange, routing_key = str(exchange or ''), str(routing_key or '')
            except (ValueError, TypeError):
                entry.problem = 'malformed unacked entry (not [message, exchange, routing key])'
                out.append(entry)
                continue
            # Kombu's restore marks the message as a redelivery, and so does migrate
            for part in (envelope.get('headers'),
                         (envelope.get('properties') or {}).get('delivery_info')):
                if isinstance(part, dict):
                    part['redelivered'] = True
            entry.payload = dumps(envelope)
            entry.level = level_for(self.broker.levels, kombu_priority(envelope) or 0)
            entry.queues = self.route(exchange, routing_key)
            if not entry.queues:
                entry.problem = (f'no queue bound for exchange {exchange!r} routing key '
                                 f'{routing_key!r}')
            out.append(entry)
        out.sort(key=lambda e: (e.score, e.tag))
        return out

    def source_lists(self, queue: str) -> tuple[list[SourceList], list[Left]]:
        """The queue's Kombu lists that hold messages, highest priority first."""
        keys = [self.kombu.list(queue, step) for step in KOMBU_STEPS]
        lists, left = [], []
        for step, key, (kind, length) in zip(KOMBU_STEPS, keys, self.broker.list_lengths(keys)):
            if kind == 'list':
                lists.append(SourceList(queue, step, key,
                                        level_for(self.broker.levels, step), length))
            elif kind != 'none':
                left.append(Left(key, f'not a list but a {kind}: not a Kombu queue'))
        return lists, left

    def count_levels(self, source: SourceList, chunk: int = 1000) -> None:
        """For the dry run: which level each message of the list would go to."""
        counts: dict[int, int] = {}
        for start in range(0, source.length, chunk):
            for raw in self.broker.list_range(source.key, start, start + chunk - 1):
                target = list_target(raw, self.broker.levels, source.level)
                if target is None:
                    source.malformed += 1
                else:
                    counts[target] = counts.get(target, 0) + 1
        source.levels = dict(sorted(counts.items()))

    # -- planning -------------------------------------------------------------------------------

    def plan(self, queues: Sequence[str] | None = None, count: bool = False) -> Plan:
        """What there is to move for ``queues`` (default: every bound queue). Read-only.
        ``count``: also read every list to count messages per target level (the dry run)."""
        everything = not queues
        names = list(dict.fromkeys(queues or self.discover()))
        wanted = set(names)
        left: list[Left] = []
        restore: list[Unacked] = []
        per_queue: dict[str, list[Unacked]] = {q: [] for q in names}
        if self.include_unacked:
            for entry in self.read_unacked():
                where = f'{self.kombu.unacked} {text(entry.tag)}'
                if entry.problem:
                    if everything:  # otherwise nobody can tell whether it is one of ours
                        left.append(Left(where, entry.problem, preview(entry.raw)))
                    continue
                ours = [q for q in entry.queues if q in wanted]
                if not ours:
                    continue
                if len(ours) < len(entry.queues):
                    others = ', '.join(q for q in entry.queues if q not in wanted)
                    left.append(Left(where, f'also routed to queues not migrated: {others}',
                                     preview(entry.raw)))
                    continue
                restore.append(entry)
                for q in ours:
                    per_queue[q].append(entry)
        bound = {q for table in self.bindings().values() for _, _, q in table}
        plans, missing = [], []
        for name in names:
            lists, bad = self.source_lists(name)
            left += bad
            if count:
                for source in lists:
                    self.count_levels(source)
            exists = self.broker.exists(name)
            if not (lists or per_queue[name] or bad or exists or name in bound):
                missing.append(name)
                continue
            plans.append(QueuePlan(name, lists, per_queue[name], exists))
        return Plan(plans, restore, left, missing)

    # -- running --------------------------------------------------------------------------------

    def run(self, plan: Plan, batch: int = 1000, limit: int | None = None,
            progress: Callable[[Progress], None] | None = None) -> Result:
        """Move what ``plan`` found, ``batch`` entries looked at per script call, at most
        ``limit`` messages in all; ``progress`` is called after every batch. Each list is
        taken as it is when the run reaches it: messages that arrived since the plan was
        made are moved too (the plan's totals are a guide), those pushed while the run moves
        that list are left for the next run, beyond the malformed entries it met (which it
        keeps at the list's newest end, in their order: see migrate.lua)."""
        result = Result(moved={q.queue: 0 for q in plan.queues},
                        unacked={q.queue: 0 for q in plan.queues})
        declared: set[str] = set()
        budget = math.inf if limit is None else limit
        moved_all, total_all = 0, plan.total

        def declare(queue: str) -> None:
            # the group exists before the first entry arrives, so nothing is read past
            if queue not in declared:
                self.broker.declare(queue)
                declared.add(queue)

        def report(queue: str) -> None:
            if progress:
                progress(Progress(queue, moved_all, max(total_all, moved_all)))

        # Unacked messages first: Kombu's restore puts them where its consumers pop next.
        for entry in plan.unacked:
            if budget <= 0:
                result.limited = True
                return result
            for q in entry.queues:
                declare(q)
            assert entry.payload is not None and entry.level is not None
            if self.broker.migrate_unacked(self.kombu.unacked, self.kombu.unacked_index,
                                           entry.tag, entry.raw, entry.payload,
                                           [(q, entry.level) for q in entry.queues]):
                for q in entry.queues:
                    result.moved[q] = result.moved.get(q, 0) + 1
                    result.unacked[q] = result.unacked.get(q, 0) + 1
                moved_all += 1
                result.total += 1
                budget -= 1
            else:
                result.vanished += 1
            report(entry.queues[0])

        for qp in plan.queues:
            for source in qp.lists:
                declare(qp.queue)
                todo = -1  # the whole list, as it is when its first call runs
                while True:
                    if budget <= 0:
                        result.limited = True
                        return result
                    moved, kept, _, todo, malformed = self.broker.migrate_list(
                        source.key, qp.queue, source.level, int(min(batch, budget)), todo)
                    for raw in malformed:
                        result.left.append(Left(source.key, 'not a Kombu message',
                                                preview(raw)))
                    budget -= moved
                    moved_all += moved
                    result.total += moved
                    result.moved[qp.queue] += moved
                    result.lists[(qp.queue, source.step)] = (
                        result.lists.get((qp.queue, source.step), 0) + moved)
                    report(qp.queue)
                    if todo <= 0 or moved + kept == 0:
                        break
        return result

    def old_consumers(self) -> int:
        """Clients blocked in BRPOP: most likely workers still on Kombu's Redis transport
        (ours wait with BZPOPMIN). 0 when the server does not let us look."""
        return self.broker.clients_in('brpop') or 0
