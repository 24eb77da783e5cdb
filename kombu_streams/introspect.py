"""Read-only calls for operator tools: what a queue holds (inspect), what a fanout
exchange's groups lag (inspect_fanout), the next ready messages (peek) and the delayed ones
(scheduled), each a builder with its reply's decoder. Bounded like every call; read-only
(EVALSHA_RO on Redis 7.0+, so they run on replicas and under maxmemory)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .calls import HOLDER, PEEK_MAX, SCHEDULED_MAX, Calls, PeekCursor
from .limits import as_dict, counters_of
from .replies import Ready
from .scripts import SCRIPTS, Call
from .text import text

#: The most stream entries one inspect_fanout call reads (a group costs up to its cap + 1, so
#: at the default cap of 1,000 about five groups per call): a few ms of Redis per call.
FANOUT_BUDGET = 5000
#: Groups of a queue with x-fairness that inspect reports, those with the most waiting first
#: (of at most 1,000 per level walked: inspect.lua's GROUPS_MAX).
GROUPS_TOP = 10
#: A retry's pointer in the delayed set, after "<stamp>:<level>:" (lua/lib/delay.lua,
#: park_pointer): "b:<entry id>:<holder>:<group>", with no value in the delayed messages.
RETRY_POINTER = re.compile(r'b:(\d+-\d+):[^:]*:.*')


class Introspection(Calls):
    """The read-only operator calls, on top of :class:`~kombu_streams.calls.Calls`."""

    def scheduled_call(self, queue: str, count: int = 10, bodies: bool = False
                       ) -> tuple[Call, Callable[[Any], dict[str, Any]]]:
        """The scheduled call (read-only) for the ``count`` (at most SCHEDULED_MAX) earliest
        delayed messages of a queue, and the function that decodes its reply (see
        :meth:`scheduled`)."""
        count = max(1, min(int(count), SCHEDULED_MAX))  # bounded: one call, a few ms at most
        keys = [self.keys.delayed(queue), self.keys.delayed_messages(queue)]

        def parse(reply: Any) -> dict[str, Any]:
            now, total, flat = int(reply[0]), int(reply[1]), reply[2:]
            out = []
            for j in range(0, len(flat), 3):
                member = text(flat[j])
                _, level, label = (member.split(':', 2) + ['', ''])[:3]
                retry = RETRY_POINTER.match(label)  # x-requeue-delay: no value, no label
                entry: dict[str, Any] = {'member': member, 'level': int(level or 0),
                                         'label': '' if retry else label,
                                         'retry_of': retry.group(1) if retry else '',
                                         # float(): a score stored in exponent form
                                         'due_in_ms': max(int(float(flat[j + 1])) - now, 0)}
                if bodies:  # a TTL deadline is kept as a prefix: e:<unix ms>:<message>
                    message = text(flat[j + 2])
                    if message.startswith('e:') and message.count(':') >= 2:
                        _, deadline, message = message.split(':', 2)
                        entry['expires_at_ms'] = int(deadline)
                    entry['message'] = message
                out.append(entry)
            return {'queue': queue, 'delayed': total, 'messages': out, 'time_ms': now}

        return (SCRIPTS['scheduled'], keys, [count, '1' if bodies else '0']), parse

    def inspect_call(self, queue: str) -> tuple[Call, Callable[[Any], dict[str, Any]]]:
        """The inspect call (read-only) for a queue, and the function that decodes its reply
        (see :meth:`inspect`)."""
        keys = [*self.streams(queue), self.keys.dlq(queue), self.keys.delayed(queue),
                self.keys.args(queue), self.keys.counters(queue), self.keys.unique(queue),
                self.keys.rate(queue), self.keys.fair(queue)]

        def parse(reply: Any) -> dict[str, Any]:
            (records, dlq, now, delayed, next_due, arguments, counters, refused, in_flight,
             cap, tokens, next_slot, staged, groups) = reply
            stored = as_dict(arguments)
            waiting: dict[str, int] = {}
            complete = True
            for flat in groups:  # per level: complete, then group, waiting, ...
                complete = complete and bool(int(flat[0]))
                for j in range(1, len(flat), 2):
                    name = text(flat[j])
                    waiting[name] = waiting.get(name, 0) + int(flat[j + 1])
            levels: list[dict[str, Any]] = []
            consumers: dict[str, dict[str, Any]] = {}
            for key, rec in zip(keys, records):
                level, exists, length, ready, held, pending, oldest, flat, last = rec
                level_consumers = []
                for j in range(0, len(flat), 3):
                    name, owns, idle = text(flat[j]), int(flat[j + 1]), int(flat[j + 2])
                    level_consumers.append({'name': name, 'pending': owns, 'idle_ms': idle})
                    seen = consumers.setdefault(name, {'name': name, 'pending': 0,
                                                       'idle_ms': idle})
                    seen['pending'] += owns
                    seen['idle_ms'] = min(seen['idle_ms'], idle)
                levels.append({
                    'level': int(level), 'stream': key, 'exists': bool(exists),
                    'length': int(length), 'ready': int(ready), 'held': int(held),
                    'pending': int(pending),
                    'oldest_ready_ms': None if oldest < 0 else int(oldest),
                    'last_delivered_id': text(last) or None,
                    'consumers': level_consumers,
                })
            ages = [lv['oldest_ready_ms'] for lv in levels if lv['oldest_ready_ms'] is not None]
            return {
                'queue': queue,
                'exists': any(lv['exists'] for lv in levels),
                'ready': sum(lv['ready'] for lv in levels) + int(staged),
                'staged': int(staged),
                'groups': {'active': len(waiting), 'complete': complete,
                           'top': sorted(waiting.items(), key=lambda kv: (-kv[1], kv[0]))[
                               :GROUPS_TOP]},
                'held': sum(lv['held'] for lv in levels),
                'pending': sum(lv['pending'] for lv in levels),
                'oldest_ready_ms': max(ages) if ages else None,
                'consumers': sorted(consumers.values(), key=lambda c: c['name']),
                'dlq': int(dlq),
                'delayed': int(delayed),
                'next_due_ms': None if next_due < 0 else int(next_due),
                'levels': levels,
                'time_ms': int(now),
                'arguments': stored,
                'counters': counters_of(counters),
                'unique_refused': int(refused),
                # x-max-in-flight: what the reads count against it now (None: no limit)
                'in_flight': None if in_flight < 0 else int(in_flight),
                'in_flight_limit': None if in_flight < 0 else int(cap),
                # x-rate-limit: deliveries the limiter lets through now, and the ms until it
                # lets the next one through (0: now); None: no limit
                'rate_tokens': None if tokens < 0 else int(tokens),
                'rate_next_ms': None if next_slot < 0 else int(next_slot),
            }

        return (SCRIPTS['inspect'], keys, [queue, HOLDER, *self.levels]), parse

    def inspect_fanout_call(self, exchange: str, cap: int = 1000, start: int = 0,
                            budget: int | None = None
                            ) -> tuple[Call, Callable[[Any], tuple[dict[str, Any], int | None]]]:
        """The inspect_fanout call (read-only) for the groups from number ``start`` on (as
        many as ``budget`` entries read allow, default FANOUT_BUDGET; at least one), and the
        function that decodes its reply: the page (see :meth:`inspect_fanout`) and the
        ``start`` of the next one (None: this was the last)."""
        stream = self.keys.fanout(exchange)

        def parse(reply: Any) -> tuple[dict[str, Any], int | None]:
            exists, length, now, records, after = reply
            groups: list[dict[str, Any]] = []
            for name, consumers, pending, lag, capped, oldest, last in records:
                groups.append({
                    'group': text(name), 'consumers': int(consumers),
                    'pending': int(pending), 'lag': int(lag), 'lag_capped': bool(capped),
                    'oldest_unread_ms': None if oldest < 0 else int(oldest),
                    'last_delivered_id': text(last),
                })
            page = {'exchange': exchange, 'stream': stream,
                    'exists': bool(exists), 'length': int(length),
                    'groups': sorted(groups, key=lambda g: g['group']), 'time_ms': int(now)}
            return page, int(after) or None

        budget = FANOUT_BUDGET if budget is None else budget
        return (SCRIPTS['inspect_fanout'], [stream], [int(cap), int(start), int(budget)]), parse

    def peek_call(self, queue: str, count: int = 10, cursor: PeekCursor = (1, 'h', '')
                  ) -> tuple[Call, Callable[[Any], tuple[list[Ready], PeekCursor | None]]]:
        """The peek call (read-only) for the next ``count`` (at most PEEK_MAX) ready messages
        of a queue from ``cursor``, and the function that decodes its reply: the messages and
        where the next page starts (None: there are no more). A queue with x-fairness shows
        its staged messages after each level's stream entries (peek.lua)."""
        streams = self.streams(queue)
        count = max(1, min(int(count), PEEK_MAX))
        index, part, after = cursor

        def parse(reply: Any) -> tuple[list[Ready], PeekCursor | None]:
            out = []
            for j in range(3, len(reply), 4):
                i, entry_id, held, payload = reply[j:j + 4]
                token = None
                if isinstance(payload, list):  # a big message: {token}, its body apart
                    token, payload = payload[0], b''
                out.append(Ready(self.levels[int(i) - 1], streams[int(i) - 1],
                                 text(entry_id), int(held) == 1, payload, token,
                                 int(held) == 2))
            at = int(reply[0])
            return out, (at, text(reply[1]), text(reply[2])) if at else None

        return (SCRIPTS['peek'], [*streams, self.keys.fair(queue)],
                [queue, HOLDER, count, index, part, after]), parse


__all__ = ('Introspection', 'FANOUT_BUDGET')
