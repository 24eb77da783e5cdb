"""Unique until done: which key a message holds, and what a publisher learns of a refusal.

A message with the header ``x-unique-key`` (Celery: ``apply_async(headers={'x-unique-key':
...})``, which Celery merges into the task message's headers) is stored only while no other
message with that key is ready, delayed or in flight in its queue (``lua/lib/unique.lua``;
docs/design.rst, "Unique keys"). A publish refused so answers ``duplicate``, as a deduplicated
one does, and is counted in the queue's key store. The queue's arguments say how:
``x-unique-mode`` (``keep-first``, the default, or ``replace``: the new message replaces one
still waiting) and ``x-unique-ttl`` (ms the key stays taken after the ack: throttle).

The key is released by the script call that deletes its message. The channel remembers which
messages it holds have a key (:class:`kombu_streams.state.InFlight`) and sends each key with
its ack, in the read the ack rides in or in an ack call (big messages' acks, and acks sent
when no read runs, go in ack calls, as for messages without a key), so an ack of a message
without one costs nothing more, and one with a key no call more than it would without.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .dedup import short

logger = logging.getLogger('kombu_streams.unique')

#: The header that names the key a message holds while it lives.
HEADER = 'x-unique-key'
#: Queue arguments: how a second message with a taken key is treated, and how long the key
#: stays taken after the ack (ms).
MODE, TTL = 'x-unique-mode', 'x-unique-ttl'
MODES = ('keep-first', 'replace')
#: The field of the key store (ks:q:{q}:unique) that counts the publishes refused.
COUNT_FIELD = 'n'


def unique_key(message: Mapping[str, Any]) -> str:
    """The key ``message`` (a Kombu envelope) holds while it lives, '' for none: its
    ``x-unique-key`` header as a string (a long one by its SHA-256, as a deduplication id)."""
    headers = message.get('headers')
    if not isinstance(headers, dict):
        return ''
    given = headers.get(HEADER)
    if given is None or given == '':
        return ''
    return short(str(given))


def note(queue: str, key: str) -> None:
    """Tell the publisher (at debug) that a message holding ``key`` was not stored."""
    logger.debug('kombu-streams: message with x-unique-key %s not stored in queue %s: a '
                 'message with that key is still in the queue', key, queue)


__all__ = ('HEADER', 'MODE', 'TTL', 'MODES', 'COUNT_FIELD', 'unique_key', 'note')
