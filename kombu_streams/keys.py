"""Names of every Redis key kombu-streams uses; the only place that builds them.

All keys of one queue share the hash tag ``{queue}`` so each script touches one Redis Cluster
slot; exchange keys use the exchange's name as their tag. ``global_keyprefix`` is put in
front of every key here, because scripts get all their keys in KEYS (Kombu's prefixing
client would only rewrite the first one).

    <prefix>ks:q:{<queue>}:<level>   stream of one priority level (0 is served first)
    <prefix>ks:q:{<queue>}:wake      wake marker (zset with one member) for blocked consumers
    <prefix>ks:q:{<queue>}:dlq       dead-letter stream
    <prefix>ks:q:{<queue>}:ready     ready index (set): which streams may hold ready messages
    <prefix>ks:q:{<queue>}:delayed   delayed messages: member -> due time (zset; the member
                                     starts with the level it goes to, lua/lib/delay.lua)
    <prefix>ks:q:{<queue>}:delayed:m delayed messages: member -> message, or "r:<token>"
                                     for a big one (hash)
    <prefix>ks:q:{<queue>}:args      queue arguments (hash: x-max-length, x-overflow):
                                     kombu_streams/limits.py
    <prefix>ks:q:{<queue>}:big       big messages: token -> message (hash); their stream
                                     entries (and delayed values) hold the token instead
    <prefix>ks:q:{<queue>}:counters  counters (hash: expired, ..., waiting-bytes with
                                     x-max-length-bytes), kombu-streams limits shows them;
                                     in-flight-bound with x-max-in-flight (an upper bound
                                     of the pending entries, lua/lib/inflight.lua)
    <prefix>ks:q:{<queue>}:rate      x-rate-limit's state: the next delivery's theoretical
                                     arrival time, unix ms (string, expires when past)
    <prefix>ks:q:{<queue>}:capped    x-max-in-flight's flag: a read left ready work
                                     unmarked at the cap, the next settle wakes a consumer
                                     (string, lua/lib/inflight.lua)
    <prefix>ks:q:{<queue>}:dedup     ids of messages stored within x-deduplication-window:
                                     id -> until when, unix ms (zset); lua/lib/dedup.lua
    <prefix>ks:q:{<queue>}:unique    x-unique-key -> where its message is (hash);
                                     lua/lib/unique.lua
    <prefix>ks:q:{<queue>}:fair      x-fairness: messages staged per group and level, and
                                     each level's rotation of groups (hash); lua/lib/fair.lua
    <prefix>ks:x:{<exchange>}:bindings   routing table (set of "rk<sep>pattern<sep>queue")
    <prefix>ks:x:{<exchange>}:deadlines  deadlines of bindings of expiring queues (zset)
    <prefix>ks:x:{<exchange>}:fanout     fanout stream, one consumer group per bound queue
    <prefix>ks:x:{<exchange>}:wake:<queue>   wake marker of a bound queue's group
    <prefix>ks:x:{<exchange>}:dlq:<queue>    on Redis Cluster only: dead letters of a bound
                                             queue's group (a script cannot reach the queue's
                                             own dead-letter stream in another slot)
    <prefix>ks:layout                    the version of this layout (LAYOUT) the keys under
                                         the prefix were written with (a string)

No two names make the same key. What follows a name's closing brace never holds a '}': the
fixed suffixes have none, and a queue name written after an exchange's tag has '%' and '}'
escaped as %25 and %7D (names without them, nearly all, are written as they are). So the last
'}' of a key ends the tagged name, and the rest tells the kind of key: exchange 'e}:wake:q'
(whose stream is ks:x:{e}:wake:q}:fanout) cannot meet the marker of queue 'q}:fanout' on
exchange 'e' (ks:x:{e}:wake:q%7D:fanout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The version of the key layout above. A release that changes the layout raises it and
#: brings a migration; a client finding another version under its prefix refuses to run
#: (lua/layout.lua, docs/design.rst "Key layout").
#: 2: big messages (a queue's ``big`` hash, stream entries with field ``r``).
#: 3: queue arguments (a queue's ``args`` hash).
LAYOUT = 3

#: Older layouts whose keys this release reads as they are (each is a subset of LAYOUT): a
#: prefix recorded with one of them is recorded as LAYOUT by the first channel.
READS_LAYOUTS = (1, 2)


def glob_escape(text: str) -> str:
    """``text`` with the glob characters of SCAN MATCH escaped: it matches only itself."""
    return re.sub(r'([*?\[\]\\])', r'\\\1', text)


@dataclass(frozen=True)
class Keys:
    """Builds key names for one ``global_keyprefix``."""

    prefix: str = ''
    #: Redis Cluster: a script may only touch keys of one slot.
    cluster: bool = False

    def _tag(self, name: str, kind: str) -> str:
        """``name`` as a hash tag. On Cluster a name starting with '}' would make an empty
        tag, and Redis would then hash each whole key: the keys would spread over slots."""
        if self.cluster and name.startswith('}'):
            raise ValueError(f'kombu-streams: on Redis Cluster a {kind} name cannot start '
                             f"with '}}': {name!r}")
        return f'{{{name}}}'

    @staticmethod
    def _part(name: str) -> str:
        """A name written after a tag: with '%' and '}' escaped, so it holds no '}'."""
        if '}' in name or '%' in name:
            return name.replace('%', '%25').replace('}', '%7D')
        return name

    def kind_pattern(self, kind: str) -> tuple[str, str, str]:
        """(SCAN MATCH pattern, head, tail) of the one key every queue (kind 'q': its first
        stream) or fanout exchange (kind 'x': its stream) has: a name is what lies between
        head and tail. The prefix is glob-escaped in the pattern."""
        prefix = glob_escape(self.prefix)
        tail = '}:0' if kind == 'q' else '}:fanout'
        return f'{prefix}ks:{kind}:{{*{tail}', f'{self.prefix}ks:{kind}:{{', tail

    def kind_name(self, kind: str, key: str) -> str | None:
        """The queue (kind 'q') or fanout exchange (kind 'x') name in a key that
        :meth:`kind_pattern` matched, or None when the key is not one of those."""
        _, head, tail = self.kind_pattern(kind)
        if key.startswith(head) and key.endswith(tail):
            return key[len(head):-len(tail)]
        return None

    @staticmethod
    def stream_level(key: str) -> int | str | None:
        """What follows a stream key's tag: the priority level of a queue's stream
        (ks:q:{q}:3 -> 3), 'fanout' for an exchange's stream; None for no key."""
        tail = key.rsplit(':', 1)[-1] if key else None
        return int(tail) if tail and tail.isdigit() else tail

    def layout(self) -> str:
        return f'{self.prefix}ks:layout'

    def queue_base(self, queue: str) -> str:
        return f'{self.prefix}ks:q:{self._tag(queue, "queue")}'

    def stream(self, queue: str, level: int) -> str:
        return f'{self.queue_base(queue)}:{level}'

    def streams(self, queue: str, levels: list[int]) -> list[str]:
        base = self.queue_base(queue)
        return [f'{base}:{level}' for level in levels]

    def wake(self, queue: str) -> str:
        return f'{self.queue_base(queue)}:wake'

    def ready(self, queue: str) -> str:
        return f'{self.queue_base(queue)}:ready'

    def delayed(self, queue: str) -> str:
        """The delayed set; lua/lib/delay.lua finds the queue's streams by cutting
        ':delayed' off its end."""
        return f'{self.queue_base(queue)}:delayed'

    def delayed_messages(self, queue: str) -> str:
        return f'{self.queue_base(queue)}:delayed:m'

    def dlq(self, queue: str) -> str:
        return f'{self.queue_base(queue)}:dlq'

    def args(self, queue: str) -> str:
        """A queue's arguments (x-max-length...), read by every publish to it."""
        return f'{self.queue_base(queue)}:args'

    def big(self, queue: str) -> str:
        """The bodies of a queue's big messages (``big_message_bytes``), by token."""
        return f'{self.queue_base(queue)}:big'

    def rate(self, queue: str) -> str:
        """A queue's rate limiter state (x-rate-limit, lua/lib/rate.lua): a string that
        expires once it no longer limits anything."""
        return f'{self.queue_base(queue)}:rate'

    def capped(self, queue: str) -> str:
        """A queue's in-flight flag (x-max-in-flight, lua/lib/inflight.lua): set by a read
        that the limit stopped with ready work left and no marker; the ack (or other settle)
        that frees a slot and finds it deletes it and sets the marker."""
        return f'{self.queue_base(queue)}:capped'

    def counters(self, queue: str) -> str:
        """A queue's counters (hash): ``expired``, messages set aside past their TTL; the
        scripts keep ``waiting-bytes`` and ``in-flight-bound`` there too (limits.py)."""
        return f'{self.queue_base(queue)}:counters'

    def dedup(self, queue: str) -> str:
        """The ids a queue with ``x-deduplication-window`` remembers (lua/lib/dedup.lua)."""
        return f'{self.queue_base(queue)}:dedup'

    def unique(self, queue: str) -> str:
        """A queue's key store (hash): the x-unique-key each live message holds
        (lua/lib/unique.lua)."""
        return f'{self.queue_base(queue)}:unique'

    def fair(self, queue: str) -> str:
        """A queue's staging hash (x-fairness, lua/lib/fair.lua): messages waiting per
        group, and the rotation of the groups per level."""
        return f'{self.queue_base(queue)}:fair'

    def bindings(self, exchange: str) -> str:
        return f'{self.prefix}ks:x:{self._tag(exchange, "exchange")}:bindings'

    def deadlines(self, exchange: str) -> str:
        return f'{self.prefix}ks:x:{self._tag(exchange, "exchange")}:deadlines'

    def fanout(self, exchange: str) -> str:
        return f'{self.prefix}ks:x:{self._tag(exchange, "exchange")}:fanout'

    def fanout_wake(self, exchange: str, queue: str) -> str:
        return f'{self.prefix}ks:x:{self._tag(exchange, "exchange")}:wake:{self._part(queue)}'

    def fanout_dlq(self, exchange: str, queue: str) -> str:
        """Where dead letters of ``queue``'s group on a fanout exchange go: the queue's own
        dead-letter stream, except on Redis Cluster, where it must share the exchange's slot."""
        if self.cluster:
            return f'{self.prefix}ks:x:{self._tag(exchange, "exchange")}:dlq:{self._part(queue)}'
        return self.dlq(queue)
