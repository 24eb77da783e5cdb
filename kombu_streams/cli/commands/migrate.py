"""``migrate``: move messages from Kombu's Redis transport (a list per queue and priority,
and the unacked hash) into streams of the same queue names (kombu_streams.migrate)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import redis
from kombu.utils.url import maybe_sanitize_url

from ...broker import Broker
from ...migrate import KombuKeys, Migration, Plan, Progress, Result
from ..connect import SCHEMES
from ..errors import ERROR, NOT_FOUND, OK, USAGE, Failure
from ..render import emit, table


def check_source(args: argparse.Namespace, broker: Broker) -> None:
    """Refuse a ``--from-url`` (where the Kombu app's keys are) that does not reach the
    broker's server and database: each batch is one script touching both, so Kombu's keys
    are read and moved through the broker's own connection."""
    if not args.from_url:
        return
    scheme, sep, rest = args.from_url.partition('://')
    base = scheme.partition('+')[0]
    if not sep or base not in SCHEMES or '+' in scheme:
        raise Failure(f'unsupported --from-url {maybe_sanitize_url(args.from_url)!r}: use '
                      f'redis:// or rediss://', USAGE)
    plain = 'rediss' if SCHEMES[base].startswith('rediss') else 'redis'
    source = redis.Redis.from_url(f'{plain}://{rest}', socket_connect_timeout=5,
                                  socket_timeout=30)

    try:
        if not broker.same_database(source):
            raise Failure('--from-url must name the same Redis server and database as --url: '
                          'each batch is moved by one script inside Redis', USAGE)
    finally:
        source.close()


def migrate_rows(plan: Plan) -> list[list[Any]]:
    """Dry-run table: per queue and Kombu priority list, what moves to which level."""
    rows: list[list[Any]] = []
    for qp in plan.queues:
        by_level: dict[int, int] = {}
        for e in qp.unacked:
            assert e.level is not None
            by_level[e.level] = by_level.get(e.level, 0) + 1
        if by_level:
            rows.append([qp.queue, 'unacked', sum(by_level.values()),
                         ', '.join(f'{n} -> {lv}' for lv, n in sorted(by_level.items())), '-'])
        for s in qp.lists:
            levels = s.levels or {}
            rows.append([qp.queue, f'priority {s.step}', s.length - s.malformed,
                         ', '.join(f'{n} -> {lv}' for lv, n in levels.items()) or '-',
                         s.malformed])
        if not qp.lists and not qp.unacked:
            rows.append([qp.queue, '-', 0, '-', '-'])
    return rows


def migrate_data(plan: Plan, result: Result | None) -> dict[str, Any]:
    queues = []
    for qp in plan.queues:
        item: dict[str, Any] = {'queue': qp.queue, 'existed': qp.exists}
        if result is None:
            item['unacked'] = len(qp.unacked)
            item['lists'] = [{'key': s.key, 'priority': s.step, 'level': s.level,
                              'length': s.length, 'levels': s.levels,
                              'malformed': s.malformed} for s in qp.lists]
        else:
            item['moved'] = result.moved.get(qp.queue, 0)
            item['unacked'] = result.unacked.get(qp.queue, 0)
            item['lists'] = [{'key': s.key, 'priority': s.step, 'level': s.level,
                              'moved': result.lists.get((qp.queue, s.step), 0)}
                             for s in qp.lists]
        queues.append(item)
    left = plan.left + (result.left if result else [])
    data: dict[str, Any] = {'dry_run': result is None, 'queues': queues,
                            'left': [x.as_dict() for x in left], 'missing': plan.missing}
    if result is None:
        data['would_move'] = sum(s.length - s.malformed for q in plan.queues for s in q.lists
                                 ) + len(plan.unacked)
    else:
        data.update(moved=result.total, unacked_vanished=result.vanished,
                    limited=result.limited)
    return data


def cmd_migrate(args: argparse.Namespace, broker: Broker) -> int:
    if broker.keys.cluster:
        raise Failure("migrate works on one Redis server (Kombu's Redis transport cannot run "
                      'on a cluster, so its queues are not on one): migrate first, then move '
                      'the data to the cluster', USAGE)
    check_source(args, broker)
    kombu = KombuKeys(args.prefix if args.kombu_prefix is None else args.kombu_prefix)
    migration = Migration(broker, kombu, include_unacked=args.unacked)
    plan = migration.plan(args.queues, count=args.dry_run)
    for name in plan.missing:
        print(f'kombu-streams: queue {name!r} not found (no Kombu list, binding, unacked '
              f'message or stream; prefix {kombu.prefix!r})', file=sys.stderr)
    if args.queues and not plan.queues:
        return NOT_FOUND
    if args.dry_run:
        data = migrate_data(plan, None)
        human = table(['QUEUE', 'FROM', 'MESSAGES', 'TO LEVEL', 'MALFORMED'],
                      migrate_rows(plan)) if plan.queues else 'no Kombu queues found'
        human += f"\n\nwould move {data['would_move']} message(s); nothing was changed"
        human += ''.join(f'\nwould leave {x.where}: {x.reason}' for x in plan.left)
        emit(args, data, human)
        return NOT_FOUND if plan.missing else OK
    busy = migration.old_consumers()
    print('kombu-streams: stop every worker on Kombu\'s Redis transport before migrating: '
          'an old worker may still pop messages from the lists, and a restored unacked '
          'message whose worker still runs is delivered twice'
          + (f' ({busy} client(s) are blocked in BRPOP now)' if busy else ''),
          file=sys.stderr)
    show = sys.stderr.isatty() and not args.json

    def progress(p: Progress) -> None:
        if show:
            print(f'\rmigrating {p.queue}: {p.moved}/{p.total}', end='', file=sys.stderr,
                  flush=True)

    try:
        result = migration.run(plan, batch=args.batch, limit=args.limit, progress=progress)
    finally:
        if show:
            print(file=sys.stderr)
    data = migrate_data(plan, result)
    lines = [f"moved {q['moved']} message(s) to {q['queue']}"
             + (f" ({q['unacked']} unacked restored)" if q['unacked'] else '')
             for q in data['queues']]
    lines.append(f'moved {result.total} message(s) in all'
                 + (f' (stopped at --limit {args.limit}; run again to continue)'
                    if result.limited else ''))
    if result.vanished:
        lines.append(f'{result.vanished} unacked message(s) were acked or restored by '
                     f'someone else meanwhile')
    emit(args, data, '\n'.join(lines))
    left = plan.left + result.left
    for x in left:
        print(f'kombu-streams: left {x.where}: {x.reason}'
              + (f': {x.preview}' if x.preview else ''), file=sys.stderr)
    if left:
        return ERROR
    return NOT_FOUND if plan.missing else OK


__all__ = ('cmd_migrate',)
