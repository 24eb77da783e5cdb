"""``limits``: a queue's arguments kept in Redis (x-max-length, x-overflow, x-message-ttl,
x-deduplication-window, x-rate-limit), shown or changed at run time, as a RabbitMQ policy
would change them; every publisher sees the change at its next publish (a rate, every
consumer at its next read). Its counters (expired messages) are shown with them, and with a
window how many publishes were not stored as duplicates."""

from __future__ import annotations

import argparse
from typing import Any

from ...broker import Broker
from ...limits import DEDUP_WINDOW, stored_pairs
from ..connect import existing_queue
from ..errors import OK, USAGE, Failure
from ..render import emit


def _assignments(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE words as a dict (values as given: limits.stored_pairs checks them)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition('=')
        if not sep or not name:
            raise Failure(f'--set takes NAME=VALUE, e.g. x-max-length=10000; got {pair!r}', USAGE)
        out[name] = value
    return out


def limits_text(queue: str, arguments: dict[str, Any], counters: dict[str, int],
                duplicates: int = 0, unique_refused: int = 0) -> str:
    text = f'{queue}: no limits'
    if arguments:
        text = f'{queue}: ' + ' '.join(f'{k}={v}' for k, v in sorted(arguments.items()))
    if counters:
        text += ' (' + ', '.join(f'{v} {k}' for k, v in sorted(counters.items())) + ')'
    if DEDUP_WINDOW in arguments:
        text += f' (duplicates not stored: {duplicates})'
    if unique_refused:  # publishes whose x-unique-key was taken (lua/lib/unique.lua)
        text += f' (unique keys refused: {unique_refused})'
    return text


def cmd_limits(args: argparse.Namespace, broker: Broker) -> int:
    existing_queue(broker, args.queue)
    arguments, counters = broker.limits_and_counters(args.queue)
    if args.clear or args.set:
        wanted = {} if args.clear else dict(arguments)
        wanted.update(_assignments(args.set or []))
        try:
            pairs = stored_pairs(args.queue, wanted)
        except ValueError as exc:
            raise Failure(str(exc), USAGE) from None
        arguments, counters = broker.limits_and_counters(args.queue, pairs)
    data: dict[str, Any] = {'queue': args.queue, 'arguments': arguments, 'counters': counters}
    if DEDUP_WINDOW in arguments:  # publishes not stored as duplicates (lua/lib/dedup.lua)
        data['duplicates'] = broker.duplicates(args.queue)
    refused = broker.unique_refused(args.queue)
    if refused:
        data['unique_refused'] = refused
    emit(args, data, limits_text(args.queue, arguments, counters, data.get('duplicates', 0),
                                 refused))
    return OK


__all__ = ('cmd_limits',)
