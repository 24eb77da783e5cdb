"""Broker operations for operator tools: what queues exist, what a queue holds, its delayed
messages and dead letters, and the moves of a migration from Kombu's Redis transport.

They are the other half of :class:`~kombu_streams.broker.Broker` (a base class of it), kept
apart from the operations a consumer and a publisher run all day, so each file has one job;
they run through the Broker's one executor (``run``) like the others. The few plain
read-only commands here read keys that are not ours or need no script: Kombu's own lists,
sets and hashes for a migration's plan, dead letters by XRANGE pages, SCAN for discovery,
and INFO / CONFIG GET of a server at connect (:func:`server_info`, :func:`config_value`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from redis.exceptions import ResponseError

from .calls import PAGE, PeekCursor
from .envelope import decoder as envelope_decoder
from .fair import group as group_of
from .introspect import Introspection
from .replies import Ready
from .scripts import Call, explain
from .text import text
from .unique import unique_key


def server_info(client: Any) -> dict[str, Any]:
    """INFO server of the server ``client`` reaches (version, run_id)."""
    return dict(client.info('server'))


def config_value(client: Any, name: str) -> str | None:
    """CONFIG GET ``name``; None where the server does not tell (CONFIG denied by an ACL
    (NOPERM) or renamed)."""
    try:
        value = client.config_get(name).get(name)
    except ResponseError:
        return None
    return None if value is None else text(value)


class Redriven(NamedTuple):
    """What a redrive did: letters moved back, letters left because they hold no message or
    came from another queue, and letters left because a live message holds their
    x-unique-key."""

    moved: int
    skipped: int
    held: int

    def add(self, other: Redriven) -> Redriven:
        return Redriven(self.moved + other.moved, self.skipped + other.skipped,
                        self.held + other.held)


class Admin(Introspection):
    """The operator's operations; :class:`~kombu_streams.broker.Broker` gives the client and
    the executor."""

    client: Any
    run: Callable[[Call], Any]
    bodies: Callable[[str, Sequence[Any]], list[bytes | None]]
    key_types: Callable[[Sequence[str]], list[str]]

    # -- reading Kombu's stock keys, for a migration's plan (read-only) -----------------------

    def kombu_bindings(self, head: str, match: str) -> Iterator[tuple[str, list[Any]]]:
        """Each binding set whose name matches ``match`` (a SCAN pattern; ``head`` is
        the name's prefix) as (exchange, members), by SCAN COUNT 1000 and one SMEMBERS per
        set (Kombu keeps one small set per exchange)."""
        for key in self.client.scan_iter(match=match, count=1000):
            name = text(key)
            yield name[len(head):], list(self.client.smembers(key))

    def kombu_unacked(self, unacked: str, index: str
                      ) -> tuple[dict[Any, float], Iterator[tuple[Any, Any]]]:
        """Kombu's unacked messages: delivery time per tag (ZSCAN of ``index``) and the
        (tag, raw) entries of the hash ``unacked`` (HSCAN), 1,000 per call."""
        scores = dict(self.client.zscan_iter(index, count=1000))
        return scores, self.client.hscan_iter(unacked, count=1000)

    def list_lengths(self, keys: Sequence[str]) -> list[tuple[str, int]]:
        """(type, length) of each key (length 0 unless it is a list), in two round trips."""
        kinds = self.key_types(keys)
        return [(kind, int(self.client.llen(key)) if kind == 'list' else 0)
                for key, kind in zip(keys, kinds)]

    def list_range(self, key: str, start: int, stop: int) -> list[Any]:
        """LRANGE: entries ``start`` to ``stop`` (inclusive) of a list."""
        return list(self.client.lrange(key, start, stop))

    def clients_in(self, command: str) -> int | None:
        """How many clients are blocked in ``command`` (CLIENT LIST); None when the server
        does not let us look (an ACL)."""
        try:
            return sum(1 for c in self.client.client_list() if c.get('cmd') == command)
        except ResponseError:
            return None

    def scheduled(self, queue: str, count: int = 10, bodies: bool = False) -> dict[str, Any]:
        """The ``count`` (at most SCHEDULED_MAX) earliest delayed messages of a queue
        (scheduled.lua, read-only):
        each with its member, level, label (Celery's task id), ms until due and, with
        ``bodies``, the message as stored."""
        call, parse = self.scheduled_call(queue, count, bodies)
        found = parse(self.run(call))
        if bodies:  # a big message's value is its reference: show its body
            for entry in found['messages']:
                if entry['message'].startswith('r:'):
                    body = self.bodies(queue, [entry['message'][2:]])[0]
                    entry['message'] = '' if body is None else text(body)
        return found

    def cancel(self, queue: str, labels: Sequence[str], step: int = 1000) -> list[str]:
        """Remove the delayed messages labelled ``labels`` (Celery task ids) from a queue
        before they are due: a scan of its delayed set in calls of about ``step`` members
        each. Returns the members removed."""
        cursor, gone = '0', []
        while True:
            reply = self.run(self.cancel_call(queue, labels, cursor, step))
            cursor = text(reply[0])
            gone += [text(m) for m in reply[1:]]
            if cursor == '0':
                return sorted(set(gone))

    def redrive(self, queue: str, count: int, ids: Sequence[Any] = ()) -> Redriven:
        """Move back the ``count`` oldest dead letters, or up to ``count`` of ``ids``. A letter
        whose message holds an x-unique-key takes it back, or stays while a live message of
        the queue holds it (docs/design.rst, "Unique keys"): the keys are read from the
        letters here, a page of at most PAGE at a time (a big message's body fetched), and
        redrive.lua decides for each page in one call."""
        total = Redriven(0, 0, 0)
        if ids:
            dlq, ids = self.keys.dlq(queue), list(dict.fromkeys(ids))
            for first in range(0, len(ids), PAGE):
                if total.moved >= count:
                    break
                page = ids[first:first + PAGE]
                with self._reading_letters(queue):
                    pipe = self.client.pipeline(transaction=False)
                    for entry_id in page:
                        pipe.xrange(dlq, entry_id, entry_id)
                    found = pipe.execute()
                letters = [(entry_id, got[0][1] if got else {})
                           for entry_id, got in zip(page, found)]
                total = total.add(self._redrive(queue, count - total.moved, letters))
            return total
        start, left = '-', count  # the oldest ``count`` letters, those that stay included
        while left > 0:
            with self._reading_letters(queue):
                letters = self.dead_letters(queue, min(left, PAGE), start)
            if not letters:
                break
            total = total.add(self._redrive(queue, len(letters), letters))
            start, left = f'({text(letters[-1][0])}', left - len(letters)
        return total

    @contextmanager
    def _reading_letters(self, queue: str) -> Iterator[None]:
        """A dead-letter stream of another type met while reading letters: said as the
        redrive script would say it."""
        try:
            yield
        except ResponseError as exc:
            raise explain("script 'redrive'", exc, [self.keys.dlq(queue)]) from None

    def _redrive(self, queue: str, count: int, letters: Sequence[tuple[Any, dict[Any, Any]]]
                 ) -> Redriven:
        """One redrive.lua call for ``letters`` (id, fields), each with its key and group."""
        keyed = [(entry_id, *self._letter_meta(queue, fields)) for entry_id, fields in letters]
        moved, skipped, held = self.run(self.redrive_call(queue, count, keyed=keyed))
        return Redriven(int(moved), int(skipped), int(held))

    def _letter_meta(self, queue: str, fields: dict[Any, Any]) -> tuple[str, str]:
        """The x-unique-key and x-group of a dead letter's message, '' for none (or not a
        message), decoded as a consumer decodes it (Kombu's types: a UUID key is its
        string)."""
        payload = fields.get(b'f:m', fields.get('f:m'))
        token = fields.get(b'f:r', fields.get('f:r'))
        if payload is None and token is not None:
            payload = self.bodies(queue, [token])[0]
        if payload is None:
            return '', ''
        try:
            message = envelope_decoder()(text(payload))
        except ValueError:
            return '', ''
        if not isinstance(message, dict):
            return '', ''
        return unique_key(message), group_of(message) or ''

    def redrive_all(self, queue: str) -> Redriven:
        """Move every dead letter filed so far back (one filed meanwhile stays), a page of
        at most PAGE per call, so that letters which cannot move (no message, from another
        queue, or a key held) are counted once."""
        newest = self.newest_dead_letter(queue)
        total, start = Redriven(0, 0, 0), '-'
        while newest:
            letters = self.dead_letters(queue, PAGE, start, newest)
            if not letters:
                break
            total = total.add(self._redrive(queue, len(letters), letters))
            start = f'({text(letters[-1][0])}'
        return total

    def dead_letters(self, queue: str, count: int = 100, start: str = '-', end: str = '+'
                     ) -> list[tuple[Any, dict[Any, Any]]]:
        """Up to ``count`` dead letters of a queue as (id, fields), oldest first, from
        ``start`` to ``end`` (stream ids, inclusive; '(' before one: exclusive), read in
        XRANGE pages of at most PAGE."""
        dlq = self.keys.dlq(queue)
        out: list[tuple[Any, dict[Any, Any]]] = []
        while len(out) < count:
            want = min(count - len(out), PAGE)
            page = self.client.xrange(dlq, start, end, count=want)
            out += page
            if len(page) < want:
                break
            start = f'({text(page[-1][0])}'
        return out

    def newest_dead_letter(self, queue: str) -> str | None:
        """The id of a queue's newest dead letter, None when it has none."""
        newest = self.client.xrevrange(self.keys.dlq(queue), '+', '-', count=1)
        return text(newest[0][0]) if newest else None

    def purge_dead_letters(self, queue: str, through: str, batch: int = PAGE) -> int:
        """Delete a queue's dead letters up to id ``through`` (inclusive; letters filed later
        stay), with the bodies of big messages they refer to, in dlq_purge.lua calls of at
        most ``batch`` letters. Returns how many were deleted."""
        ms, _, seq = text(through).partition('-')
        through = f'{ms}-{seq or 0}'
        total, more = 0, 1
        while more:
            deleted, more = self.run(self.dlq_purge_call(queue, through, batch))
            total += int(deleted)
        return total

    def migrate_list(self, source: str, queue: str, list_level: int, count: int,
                     todo: int = -1) -> tuple[int, int, int, int, list[bytes]]:
        """Look at up to ``count`` of the oldest entries of Kombu's list ``source`` (full key
        name) that this run has not looked at (``todo`` of them are left, from the previous
        reply; -1: a new run) and move the messages into ``queue``, each to its priority's
        level (``list_level`` when it has none). Returns (moved, kept, list length left,
        ``todo`` of the next call, the malformed entries met), see migrate.lua."""
        call, parse = self.migrate_list_call(source, queue, list_level, count, todo)
        return parse(self.run(call))

    def migrate_unacked(self, unacked: str, unacked_index: str, tag: Any, raw: Any,
                        payload: str | bytes, targets: Sequence[tuple[str, int]]) -> bool:
        """Restore Kombu's unacked message ``tag`` (hash value ``raw`` as read) as
        ``payload`` into each (queue, level) of ``targets``; False when it changed or left
        the hash in the meantime (nothing written)."""
        return bool(self.run(self.migrate_unacked_call(unacked, unacked_index, tag, raw,
                                                       payload, targets)))

    def same_database(self, client: Any) -> bool:
        """Whether ``client`` (redis-py, one server) reaches this broker's server (INFO
        run_id) and database."""
        def where(c: Any) -> tuple[str, int]:
            return (text(c.info('server')['run_id']),
                    int(c.connection_pool.connection_kwargs.get('db') or 0))
        return where(client) == where(self.client)

    def discover(self, kind: str, limit: int = 1000, calls: int = 10000
                 ) -> tuple[list[str], bool]:
        """Names of the queues (kind 'q') or fanout exchanges (kind 'x') under the prefix, by
        SCAN (COUNT 1000 per call; every primary in turn on Cluster), sorted; and whether
        the search was complete (it stops after ``limit`` names or ``calls`` SCAN calls)."""
        match = self.keys.kind_pattern(kind)[0]
        names: set[str] = set()

        def take(keys: Iterable[Any]) -> bool:  # False once the limit is reached
            for key in map(text, keys):
                name = self.keys.kind_name(kind, key)
                if name is not None:
                    names.add(name)
                    if len(names) >= limit:
                        return False
            return True

        if self.keys.cluster:
            complete = take(self.client.scan_iter(match=match, count=1000))
            return sorted(names), complete
        cursor, n = 0, 0
        while True:
            cursor, found = self.client.scan(cursor, match=match, count=1000)
            n += 1
            if not take(found):
                return sorted(names), False
            if not cursor:
                return sorted(names), True
            if n >= calls:
                return sorted(names), False

    def inspect(self, queue: str) -> dict[str, Any]:
        """A read-only snapshot of a queue (inspect.lua): per level its ready, held (requeued
        or reclaimed, part of ready), pending (delivered, unacked) messages, consumers and
        the age of the oldest ready message in ms (None when none is ready); the totals; the
        dead-letter stream's length; the delayed messages and ms until the next is due
        (``next_due_ms``, None when none); ``exists`` (any of its streams exists);
        ``arguments``, the queue's recorded arguments (x-max-length, ...); ``counters`` (expired);
        ``unique_refused``, the publishes refused because their x-unique-key was taken."""
        call, parse = self.inspect_call(queue)
        return parse(self.run(call))

    def inspect_fanout(self, exchange: str, cap: int = 1000) -> dict[str, Any]:
        """A read-only snapshot of a fanout exchange's stream (inspect_fanout.lua): per bound
        queue's group its lag (entries not read yet, counted up to ``cap``; ``lag_capped``
        when there were more and the server could not tell how many), pending (delivered,
        unacked), consumers and the age of its oldest unread entry in ms. One call per
        page of groups (as many as FANOUT_BUDGET entries read allow)."""
        call, parse = self.inspect_fanout_call(exchange, cap)
        info, start = parse(self.run(call))
        while start is not None:
            call, parse = self.inspect_fanout_call(exchange, cap, start)
            page, start = parse(self.run(call))
            info['groups'] = sorted(info['groups'] + page['groups'], key=lambda g: g['group'])
        return info

    def peek(self, queue: str, count: int = 10) -> list[Ready]:
        """The next ``count`` ready messages of a queue, in the order a read would serve them
        (peek.lua: per level in priority order, requeued ones first), without changing
        anything; in calls of at most PEEK_MAX."""
        out: list[Ready] = []
        cursor: PeekCursor | None = (1, 'h', '')
        while cursor is not None and len(out) < count:
            call, parse = self.peek_call(queue, count - len(out), cursor)
            page, cursor = parse(self.run(call))
            out += [r._replace(payload=self.bodies(queue, [r.token])[0] or b'')
                    if r.token is not None else r for r in page]
        return out

