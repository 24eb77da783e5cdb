"""Idempotent publish: which id a message is known by, and what a publisher learns of a
duplicate. A queue with the argument ``x-deduplication-window`` (ms) stores a message whose id
it stored within the window only once (``lua/lib/dedup.lua``; docs/design.rst, "Duplicates").

The id is the ``x-deduplication-id`` header, else, for a Celery task message, its task id, so
that ``apply_async`` retried after a connection error or a failover (the first attempt stored,
its reply lost) stores the task once. A task's own retry (``self.retry()``) publishes it again
with the same task id and its ``retries`` count raised: that count is part of the id
(``<task id>:<retries>`` once it is above 0), so a retry is a new message, and a retry's
publish retried is still one. Every publish sends its id, whether or not the queue has a
window: only Redis knows the queue's arguments, and a message without one costs nothing more.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from typing import Any

logger = logging.getLogger('kombu_streams.dedup')

#: The header that names a message for deduplication (NATS calls its own Nats-Msg-Id).
HEADER = 'x-deduplication-id'
#: publish.lua's reply for a message not stored because the queue had stored its id.
DUPLICATE = b'duplicate'
#: An id longer than this is remembered by its SHA-256: a header is the sender's to fill, and
#: each id remembered costs the queue its length in memory.
LONGEST = 200
#: A Celery protocol 1 body is looked into only when at most this long (it is decoded for it).
V1_BODY_MAX = 64 * 1024


def _short(value: str) -> str:
    if len(value) <= LONGEST:
        return value
    return 'sha256:' + hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()


def _task_key(task_id: Any, retries: Any) -> str:
    """A task message's id: its task id, with the retry count once it is above 0."""
    if not isinstance(task_id, str) or not task_id:
        return ''
    if isinstance(retries, int) and not isinstance(retries, bool) and retries > 0:
        return f'{task_id}:{retries}'
    return task_id


def _v1_task_id(message: dict[str, Any]) -> str:
    """The task id in a Celery protocol 1 message's body ({"task": ..., "id": ...}): such a
    message has no ``task`` header, its ``correlation_id`` property is the task id, and its
    JSON body says so. Only looked at when the property is there, so other messages are not
    decoded."""
    props = message.get('properties')
    if not isinstance(props, dict) or not props.get('correlation_id'):
        return ''
    body = message.get('body')
    if message.get('content-type') != 'application/json' or not isinstance(body, (str, bytes)) \
            or len(body) > V1_BODY_MAX:
        return ''
    try:
        if props.get('body_encoding') == 'base64':
            body = base64.b64decode(body)
        decoded = json.loads(body)
    except (ValueError, binascii.Error, TypeError):
        return ''
    if isinstance(decoded, dict) and 'task' in decoded:
        return _task_key(decoded.get('id'), decoded.get('retries'))
    return ''


#: Public for kombu_streams/unique.py, whose keys are shortened the same way.
short = _short


def dedup_id(message: dict[str, Any]) -> str:
    """The id publish.lua deduplicates ``message`` (a Kombu envelope) by, '' for none: its
    ``x-deduplication-id`` header, else a Celery task's id (protocol 2: the ``id`` header of a
    message with a ``task`` header; protocol 1: the body's ``id``), with its retry count
    when it is a retry."""
    headers = message.get('headers')
    if isinstance(headers, dict):
        given = headers.get(HEADER)
        if given is not None and given != '':
            return _short(str(given))
        if 'task' in headers:
            return _short(_task_key(headers.get('id'), headers.get('retries')))
    return _short(_v1_task_id(message))


def is_duplicate(reply: Any) -> bool:
    """True when publish.lua's reply says the message was a duplicate (not stored)."""
    return reply == DUPLICATE or reply == 'duplicate'


def note(queue: str, ident: str) -> None:
    """Tell the publisher (at debug) that the message with id ``ident`` was not stored."""
    logger.debug('kombu-streams: message %s not stored in queue %s: a duplicate within its '
                 'x-deduplication-window', ident, queue)


__all__ = ('HEADER', 'DUPLICATE', 'dedup_id', 'is_duplicate', 'note')
