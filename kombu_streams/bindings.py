"""Exchanges and bindings of a channel: routing tables shared in Redis (bind.lua, route.lua,
cached per process, see :mod:`kombu_streams.routing`), and what a channel reads, worked out
when its consumers or the bindings change."""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import virtual

from .routing import TABLES, binding_member, parse_members
from .state import Reading

logger = logging.getLogger('kombu_streams.channel')


class Bindings(virtual.Channel):
    """The binding part of :class:`kombu_streams.channel.Channel`."""

    def _route_key(self, exchange: str) -> tuple[str, str]:
        return (self.transport.server_id, self.keys.bindings(exchange))

    def get_table(self, exchange: str) -> list[tuple[str, ...]]:
        return TABLES.get(self._route_key(exchange), self.routing_cache_ttl,
                          lambda: self._read_table(exchange))

    def _read_table(self, exchange: str) -> list[tuple[str, ...]]:
        """The routing table of ``exchange`` as Redis has it now."""
        members = self.broker.route(
            exchange, fanout_sep=self.sep if self._is_fanout(exchange) else None)
        return parse_members(self.sep, members)

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        """Route with the cached table; when it finds no queue, read the table again first:
        the binding may be newer than the cache (Celery binds a fresh reply queue for each
        remote-control call, and the worker answers it at once)."""
        if exchange:
            cache_key = self._route_key(exchange)
            if TABLES.cached(cache_key):
                try:
                    found = self.typeof(exchange).lookup(
                        TABLES.get(cache_key, self.routing_cache_ttl,
                                   lambda: self._read_table(exchange)),
                        exchange, routing_key, None)
                except KeyError:
                    found = []
                if found:  # what Kombu's lookup answers for it, without routing it again
                    return found
                TABLES.forget(cache_key)
        return super()._lookup(exchange, routing_key, default)

    def _is_fanout(self, exchange: str) -> bool:
        return self.typeof(exchange).type == 'fanout'

    def bindings_changed(self) -> None:
        """Work out again what this channel reads: its consumed queues, and their groups on
        the fanout exchanges they were bound to through this connection (as Kombu's Redis
        transport subscribes only to what it bound itself). Run when consumers or bindings
        change (on any channel of the connection: Kombu's binding state is the
        transport's), not on every read or loop turn; the lease keeper reads the result."""
        queues = self.active_queues
        bindings = {q: tuple(tuple(b) for b in self.state.queue_bindings(q)) for q in queues}
        fanout = {q: self._fanout_of(q) for q in queues}
        sources = tuple(self.broker.sources(queues, fanout))
        self.consumer_state.set_reading(Reading(sources, fanout, bindings))
        self.consumer_state.join(sources)

    def _bindings_changed_everywhere(self) -> None:
        for channel in list(self.transport.channels):
            if not channel.closed:
                channel.bindings_changed()

    def _binding_member(self, routing_key: str, pattern: str, queue: str) -> str:
        return binding_member(self.sep, routing_key, pattern, queue)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        member = self._binding_member(routing_key, pattern, queue)
        fanout = self._is_fanout(exchange)
        self.broker.bind(exchange, member, self._expires.get(queue, 0),
                         fanout_group=queue if fanout else None)
        TABLES.forget(self._route_key(exchange))
        self._bindings_changed_everywhere()

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = '',
                     arguments: Any = None, **kwargs: Any) -> None:
        exchange = exchange or 'amq.direct'
        self.state.binding_delete(queue, exchange, routing_key)
        _, pattern, _ = self.typeof(exchange).prepare_bind(
            queue, exchange, routing_key, arguments)
        self._unbind(exchange, routing_key, pattern, queue)

    def _unbind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        fanout = self._is_fanout(exchange)
        self.broker.bind(exchange, self._binding_member(routing_key, pattern, queue), -1,
                         fanout_group=queue if fanout else None)
        TABLES.forget(self._route_key(exchange))
        self._bindings_changed_everywhere()

    def keep_expiring_queues(self) -> None:
        """Refresh the expiry of the expiring queues this channel consumes, and of their
        bindings (run by the lease keeper, at a third of the shortest x-expires)."""
        for queue, bound in self.consumer_state.reading.bindings.items():
            ttl = self._expires.get(queue)
            if not ttl:
                continue
            self.broker.touch(queue, ttl)
            for exchange, routing_key, args in bound:
                _, pattern, _ = self.typeof(exchange).prepare_bind(
                    queue, exchange, routing_key, args)
                self.broker.bind(exchange, self._binding_member(routing_key, pattern, queue),
                                 ttl, fanout_group=queue if self._is_fanout(exchange) else None)

    def _fanout_of(self, queue: str) -> tuple[str, ...]:
        return tuple(sorted({ex for ex, _, _ in self.state.queue_bindings(queue)
                             if self._is_fanout(ex)}))


__all__ = ('Bindings',)
