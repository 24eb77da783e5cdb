"""Routing tables of exchanges, kept in Redis and cached per process.

An exchange's bindings live in a set ``ks:x:{exchange}:bindings`` (see ``lua/bind.lua`` and
``lua/route.lua``), one member per binding: routing key, pattern and queue joined by the
channel's separator. Publishing routes through them on every message, so the table read
from Redis is reused for ``routing_cache_ttl`` seconds by every channel of the process.
Bindings made through this process drop the cached table at once; a lookup that finds no
queue reads the table again before it gives up (a binding made elsewhere may be newer).
"""

from __future__ import annotations

from collections.abc import Iterable
from time import monotonic
from typing import Callable

Table = list[tuple[str, ...]]
#: (server id, bindings key): the same exchange on two servers, or under two key prefixes,
#: has two tables.
TableKey = tuple[str, str]


def binding_member(sep: str, routing_key: str, pattern: str, queue: str) -> str:
    """The member of the bindings set for one binding."""
    return sep.join([routing_key or '', pattern or '', queue or ''])


def parse_members(sep: str, members: Iterable[bytes | str]) -> Table:
    """A bindings set's members as Kombu's routing table rows."""
    return [tuple((m.decode() if isinstance(m, bytes) else m).split(sep)) for m in members]


class RouteTables:
    """The routing tables read from Redis, with the time each was read."""

    def __init__(self) -> None:
        self._tables: dict[TableKey, tuple[float, Table]] = {}

    def get(self, key: TableKey, ttl: float, read: Callable[[], Table]) -> Table:
        """The table under ``key``: the cached one if younger than ``ttl`` seconds, else
        ``read()`` (then cached)."""
        now = monotonic()
        hit = self._tables.get(key)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        table = read()
        self._tables[key] = (now, table)
        return table

    def cached(self, key: TableKey) -> bool:
        return key in self._tables

    def forget(self, key: TableKey) -> None:
        """Drop a table: the next lookup reads it from Redis."""
        self._tables.pop(key, None)


#: One cache per process: every channel and connection shares it.
TABLES = RouteTables()

__all__ = ('RouteTables', 'TABLES', 'binding_member', 'parse_members')
