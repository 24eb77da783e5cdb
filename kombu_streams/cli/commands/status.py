"""Looking at queues without changing them: ``status`` (counts, consumers, ages, fanout lag,
limits and where each queue stands against them) and ``peek`` (the next ready messages)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ...broker import Broker
from ...limits import MAX_LENGTH_BYTES, WAITING_BYTES
from ..connect import discover, existing_queue
from ..errors import NOT_FOUND, OK
from ..messages import describe, summarize
from ..render import age, emit, entry_age, table


def status_once(args: argparse.Namespace, broker: Broker) -> int:
    queues, exchanges = list(args.queues), list(args.exchange)
    if not queues and not exchanges:
        queues, exchanges = discover(broker, 'q'), discover(broker, 'x')
    infos = [broker.inspect(q) for q in queues]
    fanouts = [broker.inspect_fanout(x) for x in exchanges]
    missing = [i['queue'] for i in infos if not i['exists'] and not i['dlq']]
    missing += [f"exchange {f['exchange']}" for f in fanouts if not f['exists']]
    infos = [i for i in infos if i['exists'] or i['dlq']]
    for i in infos:  # the names status has shown them under (JSON); inspect reads them
        i['limits'], i['counters'] = i.pop('arguments'), i.pop('counters')
        if 'x-deduplication-window' in i['limits']:
            i['duplicates'] = broker.duplicates(i['queue'])
    fanouts = [f for f in fanouts if f['exists']]
    data = {'queues': infos, 'exchanges': fanouts, 'missing': missing}
    emit(args, data, status_text(infos, fanouts) or ('' if missing else 'no queues found'))
    for name in missing:
        print(f'kombu-streams: {name} not found (prefix {args.prefix!r})', file=sys.stderr)
    return NOT_FOUND if missing else OK


def limit_text(info: dict[str, Any]) -> str:
    """A queue's limits and where it stands against them, for the status table (``info`` as
    status_once leaves it): '1000 reject-publish', '5120/65536 bytes drop-head' (the bytes
    waiting, x-max-length-bytes), 'ttl 5000ms', the count of messages that
    expired, 'dedup 60000ms: 3 dup' (the duplicates not stored), '2 unique refused'
    (publishes whose x-unique-key a live message held), 'in flight 2/4' (x-max-in-flight:
    delivered and not settled, as the reads count them, against the limit), 'rate 50/s burst
    1: 1 now' (deliveries the limiter lets through now) or 'rate 50/s burst 1: next in 15ms'
    (none now: when the next one may go), 'backoff 1000,60000ms' (x-requeue-delay), 'aging
    30000ms' (x-priority-aging), 'per group 2 in flight' (x-group-max-in-flight), or '-'."""
    arguments, counters = info.get('limits', {}), info.get('counters') or {}
    parts = []
    if 'x-max-length' in arguments:
        parts.append(f"{arguments['x-max-length']} {arguments.get('x-overflow', 'drop-head')}")
    if MAX_LENGTH_BYTES in arguments:  # what waits, against the limit (lua/lib/bytes.lua)
        parts.append(f"{counters.get(WAITING_BYTES, 0)}/{arguments[MAX_LENGTH_BYTES]} "
                     f"bytes {arguments.get('x-overflow', 'drop-head')}")
    if 'x-message-ttl' in arguments:
        parts.append(f"ttl {arguments['x-message-ttl']}ms")
    if counters.get('expired'):
        parts.append(f"{counters['expired']} expired")
    if 'x-deduplication-window' in arguments:
        parts.append(f"dedup {arguments['x-deduplication-window']}ms: "
                     f"{info.get('duplicates', 0)} dup")
    if info.get('unique_refused'):  # x-unique-key is a header: no argument says it is used
        parts.append(f"{info['unique_refused']} unique refused")
    if info.get('in_flight_limit') is not None:  # global concurrency (lua/lib/inflight.lua)
        parts.append(f"in flight {info['in_flight']}/{info['in_flight_limit']}")
    elif 'x-max-in-flight' in arguments:  # a value the reads refuse: shown as stored
        parts.append(f"in flight max {arguments['x-max-in-flight']}")
    if 'x-rate-limit' in arguments:  # global rate limit (lua/lib/rate.lua)
        rate = f"rate {arguments['x-rate-limit']} burst {arguments.get('x-rate-burst', 1)}"
        if info.get('rate_tokens'):
            rate += f": {info['rate_tokens']} now"
        elif info.get('rate_next_ms') is not None:
            rate += f": next in {age(info['rate_next_ms'])}"
        parts.append(rate)
    if 'x-requeue-delay' in arguments:  # retry backoff (lua/lib/delay.lua)
        parts.append(f"backoff {arguments['x-requeue-delay']}ms")
    if 'x-priority-aging' in arguments:  # priority aging (lua/lib/aging.lua)
        parts.append(f"aging {arguments['x-priority-aging']}ms")
    if 'x-group-max-in-flight' in arguments:  # fair share's per-group cap (lua/lib/fair.lua)
        parts.append(f"per group {arguments['x-group-max-in-flight']} in flight")
    return ', '.join(parts) or '-'


def status_text(infos: list[dict[str, Any]], fanouts: list[dict[str, Any]]) -> str:
    if not infos and not fanouts:
        return ''
    parts = []
    if infos:
        rows = []
        for i in infos:
            rows.append([i['queue'], 'all', i['ready'], i['held'], i['pending'],
                         age(i['oldest_ready_ms']), i['delayed'], age(i['next_due_ms']),
                         len(i['consumers']), i['dlq'],
                         limit_text(i)])
            busy = [lv for lv in i['levels'] if lv['ready'] or lv['pending']]
            if len(busy) > 1 or (busy and busy[0]['level'] != 0):
                rows += [['', lv['level'], lv['ready'], lv['held'], lv['pending'],
                          age(lv['oldest_ready_ms']), '', '', len(lv['consumers']), '', '']
                         for lv in busy]
        parts.append(table(['QUEUE', 'LEVEL', 'READY', 'REQUEUED', 'PENDING', 'OLDEST',
                            'DELAYED', 'DUE IN', 'CONSUMERS', 'DLQ', 'LIMIT'], rows))
        consumers = [[c['name'], i['queue'], c['pending'], age(c['idle_ms'])]
                     for i in infos for c in i['consumers']]
        if consumers:
            parts.append(table(['CONSUMER', 'QUEUE', 'PENDING', 'IDLE'], consumers))
        # x-fairness: the groups with the most staged (inspect walks at most 1,000 a level)
        groups = [[i['queue'], name or '(default)', waiting,
                   f"{i['groups']['active']}{'' if i['groups']['complete'] else '+'}"]
                  for i in infos if i.get('groups', {}).get('active')
                  for name, waiting in i['groups']['top']]
        if groups:
            parts.append(table(['QUEUE', 'GROUP', 'STAGED', 'OF GROUPS'], groups))
    if fanouts:
        rows = [[f['exchange'], g['group'], f"{g['lag']}{'+' if g['lag_capped'] else ''}",
                 g['pending'], g['consumers'], age(g['oldest_unread_ms'])]
                for f in fanouts for g in f['groups']]
        rows += [[f['exchange'], '(no group)', '-', '-', '-', '-']
                 for f in fanouts if not f['groups']]
        parts.append(table(['FANOUT', 'GROUP', 'LAG', 'PENDING', 'CONSUMERS', 'OLDEST'],
                           rows))
    return '\n\n'.join(parts)


def cmd_status(args: argparse.Namespace, broker: Broker) -> int:
    done = 0
    while True:
        if args.watch and sys.stdout.isatty() and not args.json:
            print('\033[H\033[2J', end='')
        elif args.watch and done and not args.json:
            print()
        if args.watch and not args.json:
            print(time.strftime('%Y-%m-%d %H:%M:%S'))
        code = status_once(args, broker)
        sys.stdout.flush()
        done += 1
        if not args.watch or (args.count and done >= args.count):
            return code
        time.sleep(args.watch)


def cmd_peek(args: argparse.Namespace, broker: Broker) -> int:
    info = existing_queue(broker, args.queue)
    found = [{'level': m.level, 'id': m.entry_id, 'requeued': m.requeued, 'staged': m.staged,
              'age_ms': None if m.staged else entry_age(m.entry_id, info['time_ms']),
              **summarize(m.payload)}
             for m in broker.peek(args.queue, args.n)]
    lines = []
    for m in found:
        where = ('staged (x-fairness: waits for its group\'s turn)' if m['staged']
                 else f"{m['id']}  age {age(m['age_ms'])}")
        lines.append(f"[{m['level']}] {where}"
                     f"{'  requeued' if m['requeued'] else ''}  {describe(m)}")
        lines.append(f"    body: {m['body']}")
    emit(args, found, '\n'.join(lines) or f'no ready messages in {args.queue}')
    return OK


__all__ = ('cmd_status', 'cmd_peek')
