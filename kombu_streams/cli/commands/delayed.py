"""``delayed``: messages waiting in Redis for their due time (eta / countdown), listed or
cancelled by task id before they run."""

from __future__ import annotations

import argparse

from ...broker import Broker
from ..connect import existing_queue
from ..errors import NOT_FOUND, OK
from ..render import age, emit, table


def cmd_delayed_list(args: argparse.Namespace, broker: Broker) -> int:
    existing_queue(broker, args.queue)
    data = broker.scheduled(args.queue, args.n, bodies=args.full)
    rows = [[f"retry of {m['retry_of']}" if m['retry_of'] else m['label'] or '-', m['level'],
             age(m['due_in_ms'])] for m in data['messages']]
    shown = table(['LABEL', 'LEVEL', 'DUE IN'], rows) if rows else 'no delayed messages'
    more = data['delayed'] - len(rows)
    emit(args, data, shown + (f'\n({more} more)' if more > 0 else ''))
    return OK


def cmd_delayed_cancel(args: argparse.Namespace, broker: Broker) -> int:
    existing_queue(broker, args.queue)
    gone = broker.cancel(args.queue, args.ids)
    emit(args, {'queue': args.queue, 'cancelled': gone},
         f'cancelled {len(gone)} delayed message(s) of {args.queue}')
    return OK if gone else NOT_FOUND


__all__ = ('cmd_delayed_list', 'cmd_delayed_cancel')
