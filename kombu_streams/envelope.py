"""What a consumer can take: checks of an entry's envelope before it is handed out.

An entry read from Redis may hold anything: another program's data, a message of a broken
producer, a hand-made test. Kombu's ``Message`` raises on some envelopes (``headers`` that is
not an object, a body that is not valid base64), and Celery's worker dies of some task
messages (no ``id``, ``timelimit`` not a pair, a body that is not ``(args, kwargs, embed)``):
in the worker's event loop such an error is "Unrecoverable", and the same entry, never acked,
comes back after the lease to kill the next worker. So the channel checks each envelope when
it reads it, and sets aside (dead-letters, with the reason) what would fail, at its first
delivery. The checks follow the published formats (Kombu's virtual transport envelope and
Celery's task message protocol 2), not Celery's code; what slips through them is caught by
the poller when the callback raises (:meth:`kombu_streams.poller.Poller._hand`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from kombu.utils.json import object_hook


def decoder() -> Callable[[str], Any]:
    """A decoder of envelopes, as Kombu's ``loads`` decodes them (its ``object_hook``
    restores the types Kombu's ``dumps`` wrote), with the ``JSONDecoder`` made once:
    ``json.loads`` with an ``object_hook`` makes a new one per call, some 6% of a consumer's
    time at prefetch 100. One per channel, for its consuming thread.

    An envelope as Kombu writes it (no white space around it) is decoded with
    ``raw_decode``: ``decode`` would also match white space before and after it, a
    regular expression twice per message. Whatever that does not take whole (white
    space, extra data, an error) goes through ``decode``, which answers or raises as it
    always did."""
    full = json.JSONDecoder(object_hook=object_hook)
    raw_decode, decode = full.raw_decode, full.decode

    def scan_whole(text: str) -> Any:
        try:
            value, end = raw_decode(text)
        except Exception:  # not a JSON value at its start: decode raises as it did
            return decode(text)
        return value if end == len(text) else decode(text)

    return scan_whole


class Unfit(ValueError):
    """An envelope a consumer cannot take; the message says why."""


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise Unfit(why)


def check(message: Any, decode_body: Callable[[Any, Any], Any]) -> None:
    """Raise :class:`Unfit` unless ``message`` (a decoded envelope) can be made into a
    ``kombu.Message`` by ``decode_body`` (the channel's) and, if it is a Celery task message
    (protocol 2: a ``task`` header), taken by Celery's worker. Written out flat: it runs for
    every message read."""
    if not isinstance(message, dict):
        raise Unfit('not a JSON object')
    props = message.get('properties')
    if not isinstance(props, dict):
        raise Unfit('properties is not an object')
    headers = message.get('headers')
    if headers is not None and not isinstance(headers, dict):
        raise Unfit('headers is not an object')
    info = props.get('delivery_info')
    if info is not None and not isinstance(info, dict):
        raise Unfit('properties.delivery_info is not an object')
    for name in ('content-type', 'content-encoding'):
        value = message.get(name)
        if value is not None and not isinstance(value, str):
            raise Unfit(f'{name} is not a string')
    body, encoding = message.get('body'), props.get('body_encoding')
    if encoding is not None and not isinstance(encoding, str):
        raise Unfit('properties.body_encoding is not a string')
    if body:
        if not isinstance(body, (str, bytes)):
            raise Unfit('body is not a string')
        try:  # as kombu.Message will, with this Kombu's own codecs
            body = decode_body(body, encoding)
        except Exception as exc:
            raise Unfit(f'body does not decode as {encoding!r}: {exc!r}') from None
    if headers and 'task' in headers:
        _check_task(headers, body, message.get('content-type'))


def _check_task(headers: dict[str, Any], body: Any, content_type: Any) -> None:
    """Celery's task message protocol 2: the headers and (for JSON) the body's shape."""
    _check(isinstance(headers['task'], str), 'task header is not a string')
    _check(isinstance(headers.get('id'), str), 'task message without a string id header')
    for name in ('root_id', 'parent_id', 'group', 'eta', 'expires'):
        _check(headers.get(name) is None or isinstance(headers[name], str),
               f'task header {name} is not a string')
    limits = headers.get('timelimit')
    _check(limits is None or (isinstance(limits, (list, tuple)) and len(limits) == 2 and all(
        v is None or isinstance(v, (int, float)) for v in limits)),
        'task header timelimit is not a pair of numbers')
    # a compressed body (task_compression) is checked by Kombu when it decompresses it
    if content_type == 'application/json' and body and not headers.get('compression'):
        try:
            decoded = json.loads(body)
        except ValueError as exc:
            raise Unfit(f'task body is not JSON: {exc}') from None
        _check(isinstance(decoded, list) and len(decoded) == 3
               and isinstance(decoded[0], list) and isinstance(decoded[1], dict)
               and (decoded[2] is None or isinstance(decoded[2], dict)),
               'task body is not [args, kwargs, embed]')
