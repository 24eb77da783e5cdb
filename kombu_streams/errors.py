"""Errors the transport raises of its own, each in the class Kombu and Celery recover from."""

from __future__ import annotations

import redis


class ChannelClosed(redis.exceptions.ConnectionError):
    """An operation on a channel that was closed (Kombu sets ``channel.connection`` to None
    at close, e.g. after a connection error). A connection error, so Kombu's ``ensure()``
    reconnects and revives the producer or consumer, and Celery's worker logs it and goes
    on instead of exiting."""


__all__ = ('ChannelClosed',)
