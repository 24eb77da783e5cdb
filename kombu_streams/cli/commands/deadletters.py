"""``dlq``: a queue's dead letters, listed, shown, moved back (redrive) or deleted (purge)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ...broker import Broker
from ...keys import Keys
from ...text import text
from ..connect import existing_queue
from ..errors import ERROR, NOT_FOUND, OK, USAGE, Failure
from ..messages import body_text, describe, summarize
from ..render import age, emit, entry_age, table


def letter(entry_id: Any, fields: dict[Any, Any], now_ms: int,
           broker: Broker | None = None, queue: str = '') -> dict[str, Any]:
    """One dead letter: where it came from and why, and its message summarized. A big
    message's letter holds its token (field r): with ``broker``, its body is fetched from
    ``queue``'s big hash (field m then shows it); without, no message is shown."""
    f = {text(k): v for k, v in fields.items()}
    stream = text(f.get('stream', ''))
    shown = {k[2:]: text(v) for k, v in f.items() if k.startswith('f:')}
    out: dict[str, Any] = {
        'id': text(entry_id), 'age_ms': entry_age(text(entry_id), now_ms),
        'reason': text(f.get('reason', '')), 'stream': stream,
        'level': Keys.stream_level(stream),
        'origin_id': text(f.get('id', '')), 'deliveries': int(f.get('deliveries', 0)),
        'fields': shown}
    if 'f:m' not in f and 'f:r' in f and broker is not None:
        body = broker.bodies(queue, [f['f:r']])[0]
        if body is not None:
            f['f:m'] = body
            shown['m'] = text(body)
    out['message'] = summarize(f['f:m']) if 'f:m' in f else None
    return out


def cmd_dlq_list(args: argparse.Namespace, broker: Broker) -> int:
    info = existing_queue(broker, args.queue)
    letters = [letter(i, f, info['time_ms']) for i, f in broker.dead_letters(args.queue,
                                                                             args.n)]
    rows = [[d['id'], age(d['age_ms']), '-' if d['level'] is None else d['level'],
             d['deliveries'], d['reason'], (d['message'] or {}).get('task') or '-']
            for d in letters]
    more = f"\n({info['dlq'] - len(letters)} more)" if info['dlq'] > len(letters) else ''
    human = table(['ID', 'AGE', 'LEVEL', 'DELIVERIES', 'REASON', 'TASK'], rows) + more
    emit(args, {'queue': args.queue, 'total': info['dlq'], 'letters': letters},
         human if letters else f'no dead letters in {args.queue}')
    return OK


def cmd_dlq_show(args: argparse.Namespace, broker: Broker) -> int:
    info = existing_queue(broker, args.queue)
    found = broker.dead_letters(args.queue, 1, args.id, args.id)
    if not found:
        raise Failure(f'no dead letter {args.id} in queue {args.queue!r}', NOT_FOUND)
    entry_id, fields = found[0]
    d = letter(entry_id, fields, info['time_ms'], broker, args.queue)
    if d['message'] is not None:  # show the whole body here, not a preview
        d['message']['body'] = body_text(d['fields']['m'])
    lines = [f"{k}: {d[k]}" for k in ('id', 'reason', 'stream', 'origin_id', 'deliveries')]
    lines.append(f"age: {age(d['age_ms'])}")
    lines += [f'field {k}: {v}' for k, v in d['fields'].items() if k != 'm']
    if d['message']:
        lines.append(f"message: {describe(d['message'])}")
        lines.append(f"headers: {json.dumps(d['message'].get('headers'), sort_keys=True)}")
        lines.append(f"body: {d['message']['body']}")
    emit(args, d, '\n'.join(lines))
    return OK


def cmd_dlq_redrive(args: argparse.Namespace, broker: Broker) -> int:
    existing_queue(broker, args.queue)
    if args.id:
        done = broker.redrive(args.queue, len(args.id), args.id)
    elif args.count is not None:
        done = broker.redrive(args.queue, args.count)
    else:  # all there are now
        done = broker.redrive_all(args.queue)
    left = []
    if done.skipped:
        left.append(f'{done.skipped} skipped (no message, or from another queue)')
    if done.held:
        left.append(f'{done.held} held (their x-unique-key is taken: a live message holds '
                    f'it, or x-unique-ttl keeps it)')
    emit(args, {'queue': args.queue, **done._asdict()},
         f'moved {done.moved} dead letter(s) back to {args.queue}'
         + ''.join(f'; {part}' for part in left))
    return OK


def cmd_dlq_purge(args: argparse.Namespace, broker: Broker) -> int:
    info = existing_queue(broker, args.queue)
    newest = broker.newest_dead_letter(args.queue)
    if newest is None:
        emit(args, {'queue': args.queue, 'purged': 0}, f'no dead letters in {args.queue}')
        return OK
    if not args.yes:
        if not sys.stdin.isatty():
            raise Failure('dlq purge deletes dead letters: confirm with --yes', USAGE)
        answer = input(f"Delete {info['dlq']} dead letter(s) of {args.queue}? [y/N] ")
        if answer.strip().lower() not in ('y', 'yes'):
            raise Failure('aborted, nothing deleted', ERROR)
    # Only what was counted above: a letter filed since then has a higher id and stays.
    purged = broker.purge_dead_letters(args.queue, newest)
    emit(args, {'queue': args.queue, 'purged': purged},
         f'purged {purged} dead letter(s) of {args.queue}')
    return OK


__all__ = ('cmd_dlq_list', 'cmd_dlq_show', 'cmd_dlq_redrive', 'cmd_dlq_purge')
