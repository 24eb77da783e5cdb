"""Broker operations on one Redis database: the one executor of the script calls.

:class:`Broker` runs the calls :class:`~kombu_streams.calls.Calls` lays out (EVALSHA,
loading a script Redis lost; EVALSHA_RO for the read-only ones; one round trip per server
for many), and names each operation after what it does. The channel, the lease keeper, the
poller and operator tools reach Redis through it for every broker operation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from uuid import uuid4

from redis.exceptions import ResponseError

from .admin import Admin
from .calls import (
    ANY_OWNER,
    CHUNK,
    GATED,
    HOLDER,
    LOOKUP_CHUNK,
    MARKED_MAX,
    PAGE,
    PEEK_MAX,
    POPPED,
    READ,
    RENEW_CHUNK,
    ROUTE_PAGE,
    SCHEDULED_MAX,
    WAKE_MAX,
    WALK,
    Delay,
    PeekCursor,
)
from .keys import LAYOUT, Keys
from .limits import as_dict, counters_of
from .replies import Delivery, ReadResult, Ready, Reclaimed
from .scripts import SCRIPTS, Call, NeedsAllStreams, run_after, run_calls
from .state import Source
from .text import text
from .unique import COUNT_FIELD as UNIQUE_COUNT

logger = logging.getLogger(__name__)


class LayoutMismatch(RuntimeError):
    """The keys under this prefix were written with another key layout than this release's:
    not a connection error (retrying cannot help)."""


def warn_unsettled(queue: str, count: int, what: str) -> None:
    """Log entries a consumer's settle (``what``: ack, requeue, dead-letter) left alone because
    it no longer owns them: its lease ran out (the process was stopped or cut off) and another
    consumer took them, so this one may have processed a message that runs again there.
    Called once per settle call and queue, never per message."""
    logger.warning('kombu-streams: %d message%s of queue %r not settled (%s): its lease was lost, '
                   'another consumer holds it now', count, '' if count == 1 else 's', queue,
                   what)


class Broker(Admin):
    """Runs script calls for queues laid out by ``keys`` with priority ``levels``: the
    operations of consumers and publishers here, the operator's in
    ``Admin`` (kombu_streams/admin.py)."""

    def __init__(self, client: Any, keys: Keys, levels: Sequence[int]) -> None:
        super().__init__(keys, levels)
        self.client = client

    def run(self, call: Call) -> Any:
        """Run one call: EVALSHA, or for a read-only script (flag ``no-writes``) EVALSHA_RO
        where the server has it (:meth:`Script.call_ro`); loads the script if Redis lost it."""
        script, keys, args = call
        if 'no-writes' in script.flags.split(','):
            return script.call_ro(self.client, keys, args)
        return script(self.client, keys, args)

    def run_all(self, calls: Sequence[Call]) -> list[Any]:
        """Run calls in one round trip per server (:func:`~kombu_streams.scripts.run_calls`);
        their replies in order."""
        return run_calls(self.client, calls) if calls else []

    @staticmethod
    def settled(calls: Sequence[Call], replies: Sequence[Any], what: str) -> int:
        """How many entries the settle ``calls`` (ack, fanout_ack, requeue, deadletter: each
        replies {done, not owned}) settled; replies that are errors count none. Entries
        left alone because the calls' consumer no longer owns them are logged, once per
        queue (:func:`warn_unsettled`)."""
        done = 0
        unsettled: dict[str, int] = {}
        for (_, _, args), reply in zip(calls, replies):
            if isinstance(reply, Exception):
                continue
            done += int(reply[0])
            if int(reply[1]):
                queue = text(args[0])  # ARGV[1] of each: the group, named after the queue
                unsettled[queue] = unsettled.get(queue, 0) + int(reply[1])
        for queue, count in unsettled.items():
            warn_unsettled(queue, count, what)
        return done

    def load_scripts(self) -> None:
        """SCRIPT LOAD every script, and the Redis 7 flagged text of the read-only ones (Redis
        6.2 cannot compile it: skipped there)."""
        for name in sorted(SCRIPTS):
            self.client.script_load(SCRIPTS[name].source)
            if SCRIPTS[name].flags:
                try:
                    self.client.script_load(SCRIPTS[name].flagged.source)
                except ResponseError:
                    pass

    def layout_vanished(self) -> bool:
        """Whether the layout record of the prefix, which a channel of this process wrote or
        found, is gone (it is written again now): Redis lost data under the prefix since."""
        return self.run(self.layout_call(watch=True)) == 0

    def check_layout(self) -> None:
        """Record the key layout of this release under the prefix, or refuse to go on where
        the keys were written with another one (see :data:`kombu_streams.keys.LAYOUT`)."""
        key = self.keys.layout()
        try:
            found = text(self.run(self.layout_call()))
        except ResponseError as exc:
            if 'WRONGTYPE' not in str(exc):
                # Refused (an ACL without GET/SET, a read-only replica, maxmemory): the check
                # guards, it does not carry anything; go on without it.
                logger.warning('kombu-streams: could not check the key layout at %s (%s); '
                               'going on without the check', key, exc)
                return
            raise LayoutMismatch(
                f'kombu-streams: {key!r} holds another type of value than a key layout '
                f'version: another program uses this name; rename its key, or give '
                f'kombu-streams a global_keyprefix of its own') from None
        if found != str(LAYOUT):
            raise LayoutMismatch(
                f'kombu-streams: the keys under prefix {self.keys.prefix!r} were written with '
                f'key layout {found!r} ({key}); this release reads and writes layout '
                f'{LAYOUT}. Run the kombu-streams release that wrote them, or migrate them '
                f'as its changelog says.')

    def publish(self, queue: str, level: int, payload: str | bytes, routed: bool = False,
                delay: Delay | None = None, expiration: int | None = None,
                dedup_id: str = '', unique_key: str = '', group: str | None = None
                ) -> bytes | None:
        call = self.publish_call(queue, level, payload, routed, delay, expiration=expiration,
                                 dedup_id=dedup_id, unique_key=unique_key, group=group)
        try:
            return self.run(call)
        except NeedsAllStreams as exc:  # a length limit, x-fairness: nothing written (widen)
            return self.run(self.widen(call, exc.fair))

    def publish_big(self, queue: str, level: int, payload: str | bytes, routed: bool = False,
                    delay: Delay | None = None, wait: tuple[int, int] | None = None,
                    expiration: int | None = None, dedup_id: str = '',
                    unique_key: str = '', group: str | None = None) -> Any:
        """Publish a big message (``big_message_bytes``): its body in the queue's big hash
        under a new token (HSET) and its entry, holding the token, by publish.lua, in one
        MULTI/EXEC (:func:`~kombu_streams.scripts.run_after`), so no script copies the body.
        ``wait``: (replicas, ms) to WAIT for after it. The reply is publish.lua's. A queue
        with x-fairness refuses one without a group (NEEDKEYS, body deleted): sent again
        with the default group, once."""
        for _ in range(2):
            token = uuid4().hex
            call = self.publish_call(queue, level, payload, routed, delay, token, expiration,
                                     dedup_id, unique_key, group)
            try:
                return run_after(self.client, self.store_big(queue, token, payload), call,
                                 wait)
            except NeedsAllStreams as exc:
                self.widen(call, exc.fair)  # learns the queue's fairness: a group from now on
        raise NeedsAllStreams(f'publish to {queue}: refused twice for want of keys')

    def bodies(self, queue: str, tokens: Sequence[Any]) -> list[bytes | None]:
        """The bodies of big messages of ``queue`` by token (None: gone), one HGET each and
        one after the other: a pipeline would have Redis copy them back to back, blocking
        it for the sum; one at a time, other clients get in between."""
        key = self.keys.big(queue)
        return [self.client.hget(key, token) for token in tokens]

    def declare(self, queue: str, arguments: Sequence[str] = ()) -> int:
        """Create the queue if needed; record ``arguments`` (as
        :func:`~kombu_streams.limits.stored_pairs` gives them) or check them against those
        recorded (:class:`~kombu_streams.limits.QueueArgumentsDiffer`)."""
        return self.run(self.declare_call(queue, arguments))

    def limits(self, queue: str, arguments: Sequence[str] | None = None) -> dict[str, Any]:
        """The queue's recorded arguments; with ``arguments``, after replacing them by those
        ([]: none)."""
        return self.limits_and_counters(queue, arguments)[0]

    def limits_and_counters(self, queue: str, arguments: Sequence[str] | None = None
                            ) -> tuple[dict[str, Any], dict[str, int]]:
        """:meth:`limits`, and the queue's counters (``expired``: messages set aside past
        their TTL; ``refused``: publishes a full queue refused; ``overflowed``: messages
        drop-head set aside), from the same call."""
        recorded, counters = self.run(self.limits_call(queue, arguments))
        return as_dict(recorded), counters_of(counters)

    def duplicates(self, queue: str) -> int:
        """How many publishes ``queue`` did not store as duplicates (x-deduplication-window)
        since its id store was made: the store goes, and the count with it, once the queue
        was a whole window without a publish that stored an id (lua/lib/dedup.lua)."""
        count = self.client.zscore(self.keys.dedup(queue), '')
        return int(-count) if count else 0

    def unique_refused(self, queue: str) -> int:
        """How many publishes ``queue`` did not store because a live message of it held
        their x-unique-key (lua/lib/unique.lua; the count goes with the queue)."""
        count = self.client.hget(self.keys.unique(queue), UNIQUE_COUNT)
        return int(count) if count else 0

    def leave(self, sources: Sequence[Source], consumer: str) -> int:
        """``consumer`` leaves the groups of ``sources`` where it owns nothing (leave.lua,
        one call per source, one round trip per server); in how many streams' groups it is
        not any more."""
        calls = [self.leave_call(queue, consumer, exchange) for queue, exchange in sources]
        return sum(int(r) for r in self.run_all(calls))

    def key_types(self, keys: Sequence[str]) -> list[str]:
        """The Redis type of each key ('none' when absent), in one round trip per server:
        which of a channel's wake markers another program holds, after a wait was answered
        WRONGTYPE."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        return [text(kind) for kind in pipe.execute()]

    def exists(self, queue: str) -> bool:
        return bool(self.client.exists(*self.streams(queue)))

    def size(self, queue: str) -> int:
        return int(self.run(self.size_call(queue)))

    def purge(self, queue: str, batch: int = 1000) -> int:
        """Delete all ready and delayed messages, in calls of at most ``batch`` entries per
        stream (and of the delayed set)."""
        total, more = 0, 1
        while more:
            purged, more = self.run(self.purge_call(queue, batch))
            total += int(purged)
        return total

    def delete(self, queue: str) -> int:
        return self.run(self.delete_call(queue))

    def touch(self, queue: str, ttl_ms: int) -> int:
        """Keep an expiring queue's keys alive for another ``ttl_ms``."""
        return self.run(self.touch_call(queue, ttl_ms))

    def bind(self, exchange: str, member: str, ttl_ms: int = 0,
             fanout_group: str | None = None) -> int:
        """Add or refresh a binding; ``ttl_ms`` > 0 for an expiring queue, -1 removes it.
        On a fanout exchange, ``fanout_group`` (the queue) gets or loses its group."""
        return self.run(self.bind_call(exchange, member, ttl_ms, fanout_group))

    def route(self, exchange: str, sweep: int = 100, fanout_sep: str | None = None,
              page: int = ROUTE_PAGE) -> list[bytes]:
        """The routing table's members, after dropping up to ``sweep`` expired bindings (and,
        on a fanout exchange, given its member separator, their groups): one call per page
        of about ``page`` members (a smaller table comes whole in one), so no call reads a
        table of unknown size at once."""
        members: dict[bytes, None] = {}
        cursor: Any = '0'
        while True:
            cursor, *found = self.run(self.route_call(exchange, sweep, fanout_sep, cursor, page))
            members.update(dict.fromkeys(found))  # SSCAN may return a member twice
            if text(cursor) == '0':
                return list(members)

    def marked(self, markers: Sequence[str]) -> set[str]:
        """Which of ``markers`` are set (marked.lua, read-only), in one round trip per
        server."""
        calls = self.marked_calls(markers)
        found: set[str] = set()
        for (_, keys, _), reply in zip(calls, run_calls(self.client, calls)):
            found.update(keys[int(i) - 1] for i in reply)
        return found

    def give_back(self, sources: Sequence[Source],
                  members: Mapping[Source, str] | None = None) -> list[Source]:
        """Set the wake markers of ``sources`` again where the source still exists (see
        :meth:`give_back_call`), in one round trip per server; returns the sources found
        gone, whose markers were left absent."""
        chunks = self._wake_chunks(sources)
        replies = self.run_all([self.give_back_call(chunk, members) for chunk in chunks])
        return [src for chunk, reply in zip(chunks, replies)
                for src, flag in zip(chunk, text(reply)) if flag != '1']

    # -- waits: the commands of a BZPOPMIN wait, on a pooled connection it holds alone --------
    # A wait is split in two (sent now, its answer read when its socket is readable), which no
    # client call does, so these take the connection; kombu_streams/waits.py decides which
    # waits there are and when (see docs/design.rst, "Wake-ups").

    @staticmethod
    def send_wait(conn: Any, keys: Sequence[str], block: float,
                  then: Call | None = None) -> None:
        """Send BZPOPMIN on wake markers ``keys`` for at most ``block`` seconds, without
        reading the answer (:meth:`wait_answer`, once the socket is readable). ``then``: a
        read call sent behind it in the same write: Redis runs it on this connection as soon
        as the wait is answered (a marker popped, a timeout or CLIENT UNBLOCK), so its reply
        comes with the wait's (docs/design.rst, "A wait carries its read")."""
        if then is None:
            conn.send_command('BZPOPMIN', *keys, block)
            return
        script, call_keys, args = then
        conn.send_packed_command(conn.pack_commands([
            ('BZPOPMIN', *keys, block),
            ('EVALSHA', script.sha, len(call_keys), *call_keys, *args)]))

    @staticmethod
    def wait_answer(conn: Any, carried: bool = False) -> tuple[Any, Any]:
        """The answers to a wait sent on ``conn``, errors returned, not raised: ([marker,
        member, score] it popped, or None when it timed out or was ended by :meth:`unblock`;
        the reply of the read it carried, None without one). Both are read whatever the
        first says: the read runs after a wait answered with an error too, and the
        connection must stay in step. A connection error is raised."""
        replies = []
        for _ in range(2 if carried else 1):
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies[0], replies[1] if carried else None

    @staticmethod
    def client_id(conn: Any) -> int:
        """CLIENT ID of ``conn``: what :meth:`unblock` names to end a wait on it early."""
        conn.send_command('CLIENT', 'ID')
        return int(conn.read_response())

    @staticmethod
    def unblock(conn: Any, client_id: int) -> None:
        """End the wait of client ``client_id`` now (Redis answers it as a timeout), sent on
        ``conn``, another connection than the waiting one."""
        conn.send_command('CLIENT', 'UNBLOCK', client_id)
        conn.read_response()

    def ack(self, queue: str, entries: Iterable[tuple[str, Any]],
            exchange: str | None = None, consumer: str = ANY_OWNER,
            big: bool | None = None, unique: Sequence[str] | None = None) -> int:
        """Acknowledge entries, given as (stream key, id): deleted from the queue's streams;
        on a fanout exchange's stream (``exchange``), trimmed once every group is done.
        ``consumer``: only those it still owns (the others are logged); ANY_OWNER: all.
        ``big``: look each entry up and free the bodies of big messages among them; by
        default for ANY_OWNER (an operator does not know which are big), in calls of at
        most LOOKUP_CHUNK entries. ``unique``: the x-unique-key of each entry ('' none),
        released with it (kombu_streams/unique.py)."""
        if big is None:
            big = consumer == ANY_OWNER
        calls = self.ack_calls(queue, entries, exchange, consumer, big, unique)
        return self.settled(calls, self.run_all(calls), 'ack')

    def requeue(self, queue: str, entries: Iterable[tuple[Any, ...]],
                exchange: str | None = None, consumer: str = ANY_OWNER) -> int:
        """Give delivered entries back; they are served first in their level.

        Entries are (stream key, id) or (stream key, id, delivery count to keep).
        ``consumer``: only those it still owns (the others are logged); ANY_OWNER: all.
        """
        calls = self.requeue_calls(queue, entries, exchange, consumer)
        return self.settled(calls, self.run_all(calls), 'requeue')

    def owned(self, sources: Sequence[Source], consumer: str, count: int
              ) -> list[tuple[Source, str, Any, int]]:
        """What ``consumer`` owns in the streams of ``sources``, at most ``count`` entries
        per stream (one XPENDING of its own each, in one round trip): (source, stream, id,
        delivery count). A stream or group that is not there owns nothing."""
        pipe = self.client.pipeline(transaction=False)
        where: list[tuple[Source, str]] = []
        for queue, exchange in sources:
            streams = [self.keys.fanout(exchange)] if exchange else self.streams(queue)
            for stream in streams:
                pipe.xpending_range(stream, queue, '-', '+', count, consumername=consumer)
                where.append(((queue, exchange), stream))
        out: list[tuple[Source, str, Any, int]] = []
        for (source, stream), rows in zip(where, pipe.execute(raise_on_error=False)):
            if not isinstance(rows, Exception):
                out += [(source, stream, r['message_id'], int(r['times_delivered']))
                        for r in rows]
        return out

    def renew(self, queue: str, consumer: str, entries: Iterable[tuple[str, Any]]
              ) -> list[tuple[str, bytes]]:
        """Extend leases this consumer still holds; returns the (stream, id) it lost."""
        calls = self.renew_calls(queue, consumer, entries)
        replies = self.run_all([call for call, _ in calls])
        return [(stream, entry_id) for (_, stream), lost in zip(calls, replies)
                for entry_id in lost]

    def reclaim(self, queue: str, lease_ms: int, budget: int,
                cursors: Sequence[str] | None = None, consumer_expiry_ms: int = 0,
                exchange: str | None = None) -> Reclaimed:
        """Move messages whose lease ran out back to the queue (or to its group on a fanout
        ``exchange``): those of consumers that stopped, then what the sweep finds."""
        call, parse = self.reclaim_call(queue, lease_ms, budget, cursors, consumer_expiry_ms,
                                        exchange)
        return parse(self.run(call))

    def dead_letter(self, queue: str, stream: str, entry_id: Any, reason: str,
                    deliveries: int, exchange: str | None = None,
                    consumer: str = ANY_OWNER, unique_key: str = '') -> int:
        """Set one delivered entry aside; ``exchange``: it sits in that fanout stream;
        ``consumer``: only while it owns it (else logged); ANY_OWNER: whoever does;
        ``unique_key``: the key it holds, released with it. 1 if it was moved, else 0."""
        call = self.dead_letter_call(queue, stream, entry_id, reason, deliveries, exchange,
                                     consumer, unique_key)
        return self.settled([call], [self.run(call)], 'dead-letter')

__all__ = ('Broker', 'LayoutMismatch', 'warn_unsettled', 'ANY_OWNER', 'CHUNK', 'GATED',
           'LOOKUP_CHUNK',
           'HOLDER', 'MARKED_MAX', 'PAGE', 'PEEK_MAX', 'POPPED', 'READ', 'RENEW_CHUNK',
           'ROUTE_PAGE', 'SCHEDULED_MAX', 'WAKE_MAX', 'WALK', 'Delay', 'PeekCursor',
           'Delivery', 'ReadResult', 'Reclaimed', 'Ready', 'Source')
