"""Errors the transport raises of its own, each in the class Kombu and Celery recover from."""

from __future__ import annotations

import redis


class ChannelClosed(redis.exceptions.ConnectionError):
    """An operation on a channel that was closed (Kombu sets ``channel.connection`` to None
    at close, e.g. after a connection error). A connection error, so Kombu's ``ensure()``
    reconnects and revives the producer or consumer, and Celery's worker logs it and goes
    on instead of exiting."""


class DeadConnection(redis.exceptions.ConnectionError):
    """A blocking wait got no answer by its deadline (its timeout plus the socket timeout):
    the connection is presumed dead, e.g. half-open after a silent network drop. A
    connection error, so Kombu and Celery reconnect; without it an idle consumer would wait
    for ever on a socket nothing will ever arrive on."""


__all__ = ('ChannelClosed', 'DeadConnection')
