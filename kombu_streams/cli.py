"""``kombu-streams``: look into a kombu-streams broker and repair it from a shell.

    kombu-streams [--url URL] [--prefix P] [--priority-steps 0,3,6,9] [--json] COMMAND

    status [QUEUE...] [-x EXCHANGE] [--watch N [--count M]]
                                 ready / pending messages, consumers, age of the oldest
                                 ready message, dead letters; fanout groups' lag
    peek QUEUE [-n N]            the next ready messages, without consuming them
    dlq list QUEUE [-n N]        dead letters, oldest first
    dlq show QUEUE ID            one dead letter, with its message decoded
    dlq redrive QUEUE [--count N | --id ID...]   back to their queue (all by default)
    dlq purge QUEUE [--yes]      delete the dead letters
    delayed list QUEUE [-n N] [--full]   delayed messages (eta / countdown), earliest first
    delayed cancel QUEUE TASK_ID...      remove delayed messages by task id before they run
    exporter [QUEUE...] [-x EXCHANGE] [--port 9808] [--addr 127.0.0.1]
                                 Prometheus metrics over HTTP (needs prometheus_client)
    scripts [--load]             each Lua script's SHA, KEYS/ARGV and an EVALSHA template
    scripts --call NAME QUEUE [--lua-dir DIR]
                                 that script's call for QUEUE as the transport makes it:
                                 redis-cli --eval and EVALSHA lines, ready to run
    migrate [QUEUE...] [--dry-run] [--batch N] [--limit N] [--no-unacked]
            [--kombu-prefix P] [--from-url URL]
                                 move messages from Kombu's Redis transport (lists and the
                                 unacked hash) into streams of the same queue names

The URL takes the transport's forms (``redis-streams://``, ``rediss-streams://``,
``redis-streams-cluster://`` for Redis Cluster, ``sentinel-streams://`` with ``--master-name``
(and ``--sentinel-password``) for Sentinel, and ``redis://`` / ``rediss://`` for the same
servers); default ``$KOMBU_STREAMS_URL`` or
``redis-streams://127.0.0.1:6379/0``. ``--prefix`` and ``--priority-steps`` must match the
app's ``global_keyprefix`` and ``priority_steps``. Everything but ``dlq redrive``, ``dlq
purge``, ``delayed cancel`` and ``migrate`` (without ``--dry-run``) only reads.

``migrate`` moves each batch with one script inside Redis, so Kombu's keys must be on the
same server and database as ours (``--from-url`` only for a URL written differently);
``--kombu-prefix`` is the Kombu app's ``global_keyprefix`` (default ``--prefix``). Stop the
workers on the old transport first. It exits 1 when it left something in place (an entry
that is not a Kombu message, an unacked message with no queue or routed to a queue not
being migrated), each named on stderr.

Exit codes: 0 ok, 1 error (cannot connect, Redis error), 2 usage, 3 queue or dead letter
not found.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import takewhile
from pathlib import Path
from typing import Any

import redis
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from .broker import Broker, Delay
from .connection import UnsupportedServer, close_pool
from .keys import Keys
from .migrate import KombuKeys, Migration, Plan, Progress, Result
from .options import DEFAULTS, ms, priority_steps_error
from .scripts import SCRIPTS, Call, Script
from .text import PREVIEW, preview, text

DEFAULT_URL = 'redis-streams://127.0.0.1:6379/0'
#: URL schemes of plain Redis, and the transport schemes they stand for here.
SCHEMES = {'redis': 'redis-streams', 'rediss': 'rediss-streams',
           'redis-streams': 'redis-streams', 'rediss-streams': 'rediss-streams',
           'redis-streams-cluster': 'redis-streams-cluster',
           'rediss-streams-cluster': 'rediss-streams-cluster',
           'sentinel-streams': 'sentinel-streams', 'sentinels-streams': 'sentinels-streams',
           'sentinel': 'sentinel-streams'}
#: Discovery by SCAN stops after this many names, or this many SCAN calls (of COUNT 1000).
DISCOVER_LIMIT = 1000
SCAN_CALLS = 10000
OK, ERROR, USAGE, NOT_FOUND = 0, 1, 2, 3


class Failure(Exception):
    """Ends the command with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int = ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- connection --------------------------------------------------------------------------------


def transport_url(url: str) -> str:
    """``url`` with its scheme turned into the transport's (redis:// -> redis-streams://)."""
    scheme, sep, rest = url.partition('://')
    base, plus, tail = scheme.partition('+')  # e.g. redis-streams+socket:///run/redis.sock
    if not sep or base not in SCHEMES:
        raise Failure(f'unsupported URL {maybe_sanitize_url(url)!r}: use redis-streams://, '
                      f'rediss-streams://, redis://, rediss://, redis-streams-cluster:// or '
                      f'sentinel-streams://', USAGE)
    return f'{SCHEMES[base]}{plus}{tail}://{rest}'


def connect(args: argparse.Namespace) -> Broker:
    """A Broker on the server of ``--url``, connected as the transport connects."""
    options: dict[str, Any] = {'socket_connect_timeout': 5, 'socket_timeout': 30}
    if args.master_name:
        options['master_name'] = args.master_name
    if args.sentinel_password:
        options['sentinel_kwargs'] = {'password': args.sentinel_password}
    conn = Connection(transport_url(args.url), transport_options=options)
    try:
        client = conn.transport.make_client()  # builds the pool, checks the server's version
    except ValueError as exc:  # e.g. a database that is not a number
        raise Failure(str(exc).replace('kombu-streams: ', '', 1), USAGE) from None
    return Broker(client, Keys(args.prefix, cluster=conn.transport.cluster),
                  args.priority_steps)


def discover(broker: Broker, kind: str) -> list[str]:
    """Names of the queues (kind 'q') or fanout exchanges (kind 'x') under the prefix, with a
    note on stderr when the search stopped early (see :meth:`Broker.discover`)."""
    names, complete = broker.discover(kind, DISCOVER_LIMIT, SCAN_CALLS)
    if not complete:
        print(f'kombu-streams: stopped looking after {len(names)} names; name them to see '
              f'others', file=sys.stderr)
    return names


def existing_queue(broker: Broker, queue: str) -> dict[str, Any]:
    """The queue's snapshot; Failure(3) when neither its streams nor dead letters exist."""
    info = broker.inspect(queue)
    if not info['exists'] and not info['dlq']:
        raise Failure(f'queue {queue!r} not found (prefix {broker.keys.prefix!r})', NOT_FOUND)
    return info


# -- formatting --------------------------------------------------------------------------------


def age(ms: int | None) -> str:
    if ms is None:
        return '-'
    if ms < 1000:
        return f'{ms}ms'
    if ms < 60_000:
        return f'{ms // 100 / 10:.1f}s'
    s = ms // 1000
    for unit, size, sub, subsize in (('d', 86400, 'h', 3600), ('h', 3600, 'm', 60)):
        if s >= size:
            return f'{s // size}{unit}{s % size // subsize:02d}{sub}'
    return f'{s // 60}m{s % 60:02d}s'


def table(header: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to their widest cell; numbers (and ages) right-aligned."""
    cells = [header] + [[text(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = [i > 0 and all(re.match(r'^[-\d.]+[\w+]*$', row[i] or '-') for row in cells[1:])
             for i in range(len(header))]
    lines = ['  '.join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right))
             for row in cells]
    return '\n'.join(line.rstrip() for line in lines)


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=None if getattr(args, 'watch', None) else 2))
    elif human:
        print(human)


def summarize(payload: Any) -> dict[str, Any]:
    """The parts of a Kombu envelope an operator looks at; the body decoded and shortened."""
    raw = payload if isinstance(payload, bytes) else text(payload).encode()
    out: dict[str, Any] = {'size': len(raw)}
    try:
        msg = json.loads(raw)
        headers, props = msg.get('headers') or {}, msg.get('properties') or {}
    except (ValueError, AttributeError):
        out.update(error='not a Kombu message', body=text(raw[:PREVIEW]))
        return out
    body = decode_body(msg.get('body'), props.get('body_encoding'))
    task, task_id = headers.get('task'), headers.get('id')
    if task is None and body.startswith('{'):  # Celery message protocol 1: all in the body
        try:
            legacy = json.loads(body)
            task, task_id = legacy.get('task'), legacy.get('id')
        except (ValueError, AttributeError):
            pass
    out.update(task=task, task_id=task_id, content_type=msg.get('content-type'),
               content_encoding=msg.get('content-encoding'),
               priority=props.get('priority'), headers=headers,
               body=preview(body))
    return out


def decode_body(body: Any, encoding: Any) -> str:
    """A message body as text: base64 decoded when the envelope says so (bytes that are not
    UTF-8 shown as a Python bytes literal)."""
    if not isinstance(body, str):
        return json.dumps(body)
    if encoding != 'base64':
        return body
    try:
        raw = base64.b64decode(body)
    except ValueError:
        return body
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        return repr(raw)


def describe(summary: dict[str, Any]) -> str:
    if summary.get('error'):
        return f"{summary['error']}: {summary['body']}"
    parts = [f"task {summary['task']} id {summary['task_id']}"] if summary['task'] else []
    parts.append(f"content-type {summary['content_type']}")
    if summary['priority'] is not None:
        parts.append(f"priority {summary['priority']}")
    return ', '.join(parts)


def entry_age(entry_id: str, now_ms: int) -> int:
    return max(now_ms - int(entry_id.split('-')[0]), 0)


# -- status ------------------------------------------------------------------------------------


def status_once(args: argparse.Namespace, broker: Broker) -> int:
    queues, exchanges = list(args.queues), list(args.exchange)
    if not queues and not exchanges:
        queues, exchanges = discover(broker, 'q'), discover(broker, 'x')
    infos = [broker.inspect(q) for q in queues]
    fanouts = [broker.inspect_fanout(x) for x in exchanges]
    missing = [i['queue'] for i in infos if not i['exists'] and not i['dlq']]
    missing += [f"exchange {f['exchange']}" for f in fanouts if not f['exists']]
    infos = [i for i in infos if i['exists'] or i['dlq']]
    fanouts = [f for f in fanouts if f['exists']]
    data = {'queues': infos, 'exchanges': fanouts, 'missing': missing}
    emit(args, data, status_text(infos, fanouts) or ('' if missing else 'no queues found'))
    for name in missing:
        print(f'kombu-streams: {name} not found (prefix {args.prefix!r})', file=sys.stderr)
    return NOT_FOUND if missing else OK


def status_text(infos: list[dict[str, Any]], fanouts: list[dict[str, Any]]) -> str:
    if not infos and not fanouts:
        return ''
    parts = []
    if infos:
        rows = []
        for i in infos:
            rows.append([i['queue'], 'all', i['ready'], i['held'], i['pending'],
                         age(i['oldest_ready_ms']), i['delayed'], age(i['next_due_ms']),
                         len(i['consumers']), i['dlq']])
            busy = [lv for lv in i['levels'] if lv['ready'] or lv['pending']]
            if len(busy) > 1 or (busy and busy[0]['level'] != 0):
                rows += [['', lv['level'], lv['ready'], lv['held'], lv['pending'],
                          age(lv['oldest_ready_ms']), '', '', len(lv['consumers']), '']
                         for lv in busy]
        parts.append(table(['QUEUE', 'LEVEL', 'READY', 'REQUEUED', 'PENDING', 'OLDEST',
                            'DELAYED', 'DUE IN', 'CONSUMERS', 'DLQ'], rows))
        consumers = [[c['name'], i['queue'], c['pending'], age(c['idle_ms'])]
                     for i in infos for c in i['consumers']]
        if consumers:
            parts.append(table(['CONSUMER', 'QUEUE', 'PENDING', 'IDLE'], consumers))
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


# -- peek --------------------------------------------------------------------------------------


def cmd_peek(args: argparse.Namespace, broker: Broker) -> int:
    info = existing_queue(broker, args.queue)
    found = [{'level': m.level, 'id': m.entry_id, 'requeued': m.requeued,
              'age_ms': entry_age(m.entry_id, info['time_ms']), **summarize(m.payload)}
             for m in broker.peek(args.queue, args.n)]
    lines = []
    for m in found:
        lines.append(f"[{m['level']}] {m['id']}  age {age(m['age_ms'])}"
                     f"{'  requeued' if m['requeued'] else ''}  {describe(m)}")
        lines.append(f"    body: {m['body']}")
    emit(args, found, '\n'.join(lines) or f'no ready messages in {args.queue}')
    return OK


# -- dead letters ------------------------------------------------------------------------------


def letter(entry_id: Any, fields: dict[Any, Any], now_ms: int) -> dict[str, Any]:
    """One dead letter: where it came from and why, and its message summarized."""
    f = {text(k): v for k, v in fields.items()}
    stream = text(f.get('stream', ''))
    out = {'id': text(entry_id), 'age_ms': entry_age(text(entry_id), now_ms),
           'reason': text(f.get('reason', '')), 'stream': stream,
           'level': Keys.stream_level(stream),
           'origin_id': text(f.get('id', '')), 'deliveries': int(f.get('deliveries', 0)),
           'fields': {k[2:]: text(v) for k, v in f.items() if k.startswith('f:')}}
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
    d = letter(entry_id, fields, info['time_ms'])
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


def body_text(payload: str) -> str:
    """The whole body of a Kombu envelope, base64 decoded when it says so."""
    try:
        msg = json.loads(payload)
        return decode_body(msg.get('body'), (msg.get('properties') or {}).get('body_encoding'))
    except (ValueError, AttributeError):
        return payload


def cmd_dlq_redrive(args: argparse.Namespace, broker: Broker) -> int:
    existing_queue(broker, args.queue)
    if args.id:
        moved, skipped = broker.redrive(args.queue, len(args.id), args.id)
    elif args.count is not None:
        moved, skipped = broker.redrive(args.queue, args.count)
    else:  # all there are now
        moved, skipped = broker.redrive_all(args.queue)
    emit(args, {'queue': args.queue, 'moved': moved, 'skipped': skipped},
         f'moved {moved} dead letter(s) back to {args.queue}'
         + (f'; {skipped} skipped (no message, or from another queue)' if skipped else ''))
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


# -- delayed messages ------------------------------------------------------------------------


def cmd_delayed_list(args: argparse.Namespace, broker: Broker) -> int:
    existing_queue(broker, args.queue)
    data = broker.scheduled(args.queue, args.n, bodies=args.full)
    rows = [[m['label'] or '-', m['level'], age(m['due_in_ms'])] for m in data['messages']]
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


# -- Prometheus ----------------------------------------------------------------------------


def cmd_exporter(args: argparse.Namespace, broker: Broker) -> int:
    try:
        from .exporter import serve
    except ImportError as exc:
        raise Failure(f'the exporter needs prometheus_client: pip install '
                      f'kombu-streams[prometheus] ({exc})', USAGE) from None
    print(f'kombu-streams exporter: serving http://{args.addr}:{args.port}/metrics',
          file=sys.stderr, flush=True)
    try:
        serve(broker, args.port, args.addr, queues=args.queues, exchanges=args.exchange,
              max_queues=args.max_queues)
    except KeyboardInterrupt:
        pass
    return OK


# -- scripts -----------------------------------------------------------------------------------


def script_doc(name: str) -> dict[str, Any]:
    """A script's SHA, KEYS and ARGV lines (from its header) and a redis-cli template."""
    script = SCRIPTS[name]
    lines = script.header.splitlines()
    keys: list[str] = []
    argv: list[str] = []
    current = None
    for line in lines:
        if line.startswith('KEYS'):
            current = keys
        elif line.startswith('ARGV'):
            current = argv
        elif not line.startswith(' ') or not line.strip():
            current = None
            continue
        if current is not None:
            current.append(line.rstrip())
    labels = [line.split()[0] for line in keys + argv if re.match(r'(KEYS|ARGV)\[', line)]
    key_labels = [x for x in labels if x.startswith('KEYS')]
    fixed = all(re.fullmatch(r'KEYS\[\d+\]', x) for x in key_labels)
    numkeys = str(len(key_labels)) if fixed else '<numkeys>'
    template = ' '.join(['redis-cli', 'EVALSHA', script.sha, numkeys]
                        + [f"'<{x}>'" for x in labels])
    first = ' '.join(takewhile(lambda line: line.strip() and not line.startswith('KEYS'), lines))
    doc = {'name': name, 'sha': script.sha, 'summary': first.partition(':')[2].strip(),
           'keys': keys, 'argv': argv, 'template': template}
    if script.flags:  # Redis 7.0+ runs the flagged text, which has its own SHA
        doc.update(flags=script.flags, flagged_sha=script.flagged.sha,
                   template_ro=template.replace(f'EVALSHA {script.sha}',
                                                f'EVALSHA_RO {script.flagged.sha}'))
    return doc


#: Placeholders of ``scripts --call`` lines, for what a queue alone does not determine.
ENTRY_ID = '<ENTRY-ID>'
PAYLOAD = '<PAYLOAD: a Kombu message envelope (JSON)>'
TASK_ID = '<TASK-ID>'
REASON = '<REASON>'
#: The consumer a ``scripts --call read`` line reads as, and the ack, requeue and deadletter
#: lines settle as (only what it owns, as a channel does).
CALL_CONSUMER = 'kombu-streams-cli'
#: Why ``scripts --call`` cannot lay out these scripts for a queue.
NOT_QUEUE_CALLS = dict.fromkeys(
    ('bind', 'route', 'fanout_publish', 'fanout_ack', 'inspect_fanout'),
    'its keys are an exchange\'s') | dict.fromkeys(
    ('migrate', 'migrate_unacked'), "its keys include Kombu's (kombu-streams migrate runs it)")


def queue_call(broker: Broker, name: str, queue: str) -> tuple[Call, str]:
    """Script ``name``'s call for ``queue`` as the transport makes it (the Broker's builder,
    the transport's defaults), and what was filled in; Failure(2) for a script whose call a
    queue does not determine."""
    stream, lowest = broker.keys.stream(queue, broker.levels[0]), broker.levels[0]
    # the transport's defaults, from the option table
    lease_ms = ms(DEFAULTS['visibility_timeout'])
    deliveries, budget, step = (DEFAULTS['max_deliveries'], DEFAULTS['reclaim_batch'],
                                DEFAULTS['purge_batch'])
    builders: dict[str, Callable[[], tuple[Call, str]]] = {
        'read': lambda: (broker.read_call(broker.sources([queue]), CALL_CONSUMER, 1,
                                          deliveries)[0],
                         f'consumer {CALL_CONSUMER}, COUNT 1, delivery limit '
                         f'{deliveries}: what it delivers stays pending with that '
                         f'consumer until acked (or reclaimed after a lease)'),
        'publish': lambda: (broker.publish_call(queue, lowest, PAYLOAD, delay=Delay()),
                            f'level {lowest}, due now (delayed delivery on); replace {PAYLOAD}'),
        'ack': lambda: (broker.ack_calls(queue, [(stream, ENTRY_ID)], None,
                                         CALL_CONSUMER)[0],
                        f'an entry of level {lowest} owned by {CALL_CONSUMER} (\'\' in its '
                        f'place: whoever owns it): replace {ENTRY_ID}'),
        'requeue': lambda: (broker.requeue_calls(queue, [(stream, ENTRY_ID)], None,
                                                 CALL_CONSUMER)[0],
                            f'an entry of level {lowest} owned by {CALL_CONSUMER} (\'\' in its '
                            f'place: whoever owns it), delivery count kept: replace '
                            f'{ENTRY_ID}'),
        'renew': lambda: (broker.renew_call(queue, CALL_CONSUMER, stream, [ENTRY_ID]),
                          f'an entry of level {lowest} owned by {CALL_CONSUMER}: replace '
                          f'{ENTRY_ID}'),
        'deadletter': lambda: (broker.dead_letter_call(queue, stream, ENTRY_ID, REASON, 1,
                                                       None, CALL_CONSUMER),
                               f'an entry of level {lowest} delivered once, owned by '
                               f'{CALL_CONSUMER} (\'\' in its place: whoever owns it): replace '
                               f'{ENTRY_ID} and {REASON}'),
        'reclaim': lambda: (broker.reclaim_call(queue, lease_ms, budget)[0],
                            f'lease {lease_ms} ms, budget {budget}, consumer '
                            f'expiry 0 (never), sweeps from the start'),
        'redrive': lambda: (broker.redrive_call(queue, 1), 'the oldest dead letter'),
        'purge': lambda: (broker.purge_call(queue, step),
                          f'one step of at most {step} entries per stream: '
                          f'repeat while the second value of its reply is 1'),
        'cancel': lambda: (broker.cancel_call(queue, [TASK_ID]),
                           f'one scan step from cursor 0: replace {TASK_ID}, repeat with the '
                           f'cursor it returns until it is 0'),
        'scheduled': lambda: (broker.scheduled_call(queue)[0], 'the 10 earliest, no bodies'),
        'peek': lambda: (broker.peek_call(queue)[0], 'the next 10, from the start'),
        'inspect': lambda: (broker.inspect_call(queue)[0], 'read-only'),
        'touch': lambda: (broker.touch_call(queue, 3_600_000),
                          'ttl 3600000 ms (the queue\'s x-expires)'),
        'size': lambda: (broker.size_call(queue), 'read-only'),
        'declare': lambda: (broker.declare_call(queue), ''),
        'delete': lambda: (broker.delete_call(queue), 'deletes the queue and its dead letters'),
        'wake': lambda: (broker.give_back_call([(queue, None)]),
                         'sets its wake marker again if the queue exists'),
    }
    if name in SCRIPTS and name not in builders:
        why = NOT_QUEUE_CALLS.get(name, "its keys are not a queue's")
        raise Failure(f'scripts --call: {name} is not a call of a queue ({why}); see its KEYS '
                      f'and ARGV in kombu-streams scripts', USAGE)
    if name not in builders:
        raise Failure(f'scripts --call: no script {name!r}; one of '
                      f"{', '.join(sorted(builders))}", USAGE)
    return builders[name]()


def flat_file(script: Script, directory: str | None) -> str:
    """The path of the script's flat text, written to ``directory`` (default: a new private
    temporary directory) for ``redis-cli --eval``."""
    where = Path(directory) if directory else Path(tempfile.mkdtemp(prefix='kombu-streams-'))
    where.mkdir(parents=True, exist_ok=True)
    path = where / f'{script.name}.lua'
    path.write_text(script.source)
    return str(path)


def cmd_call(args: argparse.Namespace, broker: Broker | None) -> int:
    """``scripts --call NAME QUEUE``: that call as redis-cli lines (--eval and EVALSHA)."""
    name, queue = args.call
    if broker is None:  # no server needed: the keys are named as on the server
        cluster = 'cluster' in args.url.partition('://')[0]
        broker = Broker(None, Keys(args.prefix, cluster=cluster), args.priority_steps)
    try:
        (script, keys, argv), note = queue_call(broker, name, queue)
    except ValueError as exc:  # a name the keys cannot hold (Keys._tag)
        raise Failure(str(exc).replace('kombu-streams: ', '', 1), USAGE) from None
    words = [shlex.quote(text(x)) for x in keys]
    values = [shlex.quote(text(x)) for x in argv]
    path = flat_file(script, args.lua_dir)
    evaluate = ' '.join(['redis-cli', '--eval', shlex.quote(path), *words,
                         *([',', *values] if values else [])])
    evalsha = ' '.join(['redis-cli', 'EVALSHA', script.sha, str(len(keys)), *words, *values])
    data: dict[str, Any] = {'name': name, 'queue': queue, 'levels': broker.levels,
                            'note': note, 'sha': script.sha, 'keys': [text(x) for x in keys],
                            'argv': [text(x) for x in argv], 'lua_file': path,
                            'eval': evaluate, 'evalsha': evalsha}
    lines = [f"# {name} for queue {queue!r}, levels {','.join(map(str, broker.levels))}"
             + (f': {note}' if note else ''), evaluate, evalsha]
    if script.flags:
        data['evalsha_ro'] = evalsha.replace(f'EVALSHA {script.sha}',
                                             f'EVALSHA_RO {script.flagged.sha}')
        lines += [f'# Redis 7.0+ (#!lua flags={script.flags}):', data['evalsha_ro']]
    lines.append('# (EVALSHA needs the script loaded: kombu-streams scripts --load; --eval '
                 'sends the text itself; add -h/-p/-n/-a for your server)')
    emit(args, data, '\n'.join(lines))
    return OK


def cmd_scripts(args: argparse.Namespace, broker: Broker | None) -> int:
    if broker is not None:  # --load
        broker.load_scripts()
    if args.call:
        return cmd_call(args, broker)
    docs = [script_doc(name) for name in sorted(SCRIPTS)]
    blocks = []
    for d in docs:
        blocks.append('\n'.join([f"{d['name']}  {d['sha']}", f"  {d['summary']}",
                                 *(f'  {line}' for line in d['keys'] + d['argv']),
                                 f"  {d['template']}",
                                 *([f"  Redis 7.0+ (#!lua flags={d['flags']}): "
                                    f"{d['template_ro']}"] if 'flags' in d else [])]))
    note = ('(EVALSHA needs the script loaded: kombu-streams scripts --load, or any client '
            'of the transport loads it on first use)')
    emit(args, docs, '\n\n'.join(blocks) + '\n\n' + note)
    return OK


# -- migrate -----------------------------------------------------------------------------------


def source_client(args: argparse.Namespace, broker: Broker) -> Any:
    """The client for Kombu's keys: the broker's own, or one on ``--from-url``, which must
    reach the same server and database (each batch is one script touching both)."""
    if not args.from_url:
        return broker.client
    scheme, sep, rest = args.from_url.partition('://')
    base = scheme.partition('+')[0]
    if not sep or base not in SCHEMES or '+' in scheme:
        raise Failure(f'unsupported --from-url {maybe_sanitize_url(args.from_url)!r}: use '
                      f'redis:// or rediss://', USAGE)
    plain = 'rediss' if SCHEMES[base].startswith('rediss') else 'redis'
    source = redis.Redis.from_url(f'{plain}://{rest}', socket_connect_timeout=5,
                                  socket_timeout=30)

    if not broker.same_database(source):
        source.close()
        raise Failure('--from-url must name the same Redis server and database as --url: '
                      'each batch is moved by one script inside Redis', USAGE)
    return source


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
    source = source_client(args, broker)
    kombu = KombuKeys(args.prefix if args.kombu_prefix is None else args.kombu_prefix)
    migration = Migration(source, broker, kombu, include_unacked=args.unacked)
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
        if source is not broker.client:
            source.close()
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


# -- command line ------------------------------------------------------------------------------


def priority_steps(value: str) -> list[int]:
    try:
        steps = [int(s) for s in value.split(',')]
    except ValueError:
        steps = []
    problem = priority_steps_error(steps) if steps else priority_steps_error(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return steps


def positive(kind: type) -> Any:
    def convert(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if number <= 0:
            raise argparse.ArgumentTypeError(f'must be a positive number, got {value!r}')
        return number
    return convert


def stream_id(value: str) -> str:
    if not re.fullmatch(r'\d+-\d+', value):
        raise argparse.ArgumentTypeError(f'not a stream entry id (like 1712345678901-0): '
                                         f'{value!r}')
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='kombu-streams', description='Inspect and repair a kombu-streams broker.',
        epilog='Exit codes: 0 ok, 1 error, 2 usage, 3 queue or dead letter not found.')
    p.add_argument('--url', default=os.environ.get('KOMBU_STREAMS_URL') or DEFAULT_URL,
                   help='broker URL (default: $KOMBU_STREAMS_URL or %(default)s)')
    p.add_argument('--master-name', default=os.environ.get('KOMBU_STREAMS_MASTER_NAME'),
                   help="Sentinel URLs: the service's master_name")
    p.add_argument('--sentinel-password',
                   default=os.environ.get('KOMBU_STREAMS_SENTINEL_PASSWORD'),
                   help="Sentinel URLs: the sentinels' own password, if any")
    p.add_argument('--prefix', default=DEFAULTS['global_keyprefix'],
                   help="the app's global_keyprefix")
    p.add_argument('--priority-steps', type=priority_steps,
                   default=list(DEFAULTS['priority_steps']),
                   metavar='0,3,6,9', help="the app's priority_steps")
    p.add_argument('--json', action='store_true', help='print JSON for machines')
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

    s = sub.add_parser('status', help='queues: ready, pending, consumers, age, dead letters')
    s.add_argument('queues', nargs='*', metavar='QUEUE',
                   help='queues to show (default: all queues and fanout exchanges)')
    s.add_argument('-x', '--exchange', action='append', default=[],
                   help='also show this fanout exchange (repeatable)')
    s.add_argument('--watch', type=positive(float), metavar='N',
                   help='refresh every N seconds')
    s.add_argument('--count', type=positive(int), metavar='M',
                   help='with --watch: stop after M refreshes')
    s.set_defaults(run=cmd_status)

    s = sub.add_parser('peek', help='the next ready messages, not consumed')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('-n', type=positive(int), default=10, help='how many (default 10)')
    s.set_defaults(run=cmd_peek)

    dlq = sub.add_parser('dlq', help='dead letters').add_subparsers(
        dest='action', required=True, metavar='ACTION')
    s = dlq.add_parser('list', help='dead letters, oldest first')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('-n', type=positive(int), default=100, help='how many (default 100)')
    s.set_defaults(run=cmd_dlq_list)
    s = dlq.add_parser('show', help='one dead letter')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('id', type=stream_id, metavar='ID')
    s.set_defaults(run=cmd_dlq_show)
    s = dlq.add_parser('redrive', help='move dead letters back to their queue')
    s.add_argument('queue', metavar='QUEUE')
    which = s.add_mutually_exclusive_group()
    which.add_argument('--count', type=positive(int), help='the N oldest (default: all)')
    which.add_argument('--id', type=stream_id, nargs='+', help='these dead letters')
    s.set_defaults(run=cmd_dlq_redrive)
    s = dlq.add_parser('purge', help='delete all dead letters of a queue')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('--yes', action='store_true', help='do not ask')
    s.set_defaults(run=cmd_dlq_purge)

    delayed = sub.add_parser('delayed', help='messages waiting for their due time').add_subparsers(
        dest='action', required=True, metavar='ACTION')
    s = delayed.add_parser('list', help='the next delayed messages, earliest first')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('-n', type=positive(int), default=20, help='how many (default 20)')
    s.add_argument('--full', action='store_true', help='with the messages (JSON output)')
    s.set_defaults(run=cmd_delayed_list)
    s = delayed.add_parser('cancel', help='remove delayed messages by task id (label)')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('ids', nargs='+', metavar='TASK_ID')
    s.set_defaults(run=cmd_delayed_cancel)

    s = sub.add_parser('exporter', help='serve Prometheus metrics of the queues over HTTP')
    s.add_argument('queues', nargs='*', metavar='QUEUE',
                   help='queues to export (default: all, found by SCAN at each scrape)')
    s.add_argument('-x', '--exchange', action='append', default=[],
                   help='also export this fanout exchange (repeatable)')
    s.add_argument('--port', type=positive(int), default=9808, help='default %(default)s')
    s.add_argument('--addr', default='127.0.0.1', help='address to listen on (default '
                   '%(default)s; 0.0.0.0 for all)')
    s.add_argument('--max-queues', type=positive(int), default=1000,
                   help='most queues found by SCAN per scrape (default %(default)s)')
    s.set_defaults(run=cmd_exporter)

    s = sub.add_parser('migrate', help="move messages from Kombu's Redis transport here")
    s.add_argument('queues', nargs='*', metavar='QUEUE',
                   help='queues to migrate (default: every queue bound in _kombu.binding.*)')
    s.add_argument('--from-url', metavar='URL',
                   help="Kombu's broker URL if written differently; must be the same server "
                        'and database as --url (default: --url)')
    s.add_argument('--kombu-prefix', metavar='P',
                   help="the Kombu app's global_keyprefix (default: --prefix)")
    s.add_argument('--dry-run', action='store_true',
                   help='only show what would move where; change nothing')
    s.add_argument('--batch', type=positive(int), default=1000, metavar='N',
                   help='messages per script call (default %(default)s)')
    s.add_argument('--limit', type=positive(int), metavar='N',
                   help='move at most N messages in this run (run again to continue)')
    s.add_argument('--include-unacked', dest='unacked', action='store_true', default=True,
                   help="restore Kombu's unacked messages too (default)")
    s.add_argument('--no-unacked', dest='unacked', action='store_false',
                   help='leave the unacked hash alone')
    s.set_defaults(run=cmd_migrate)

    s = sub.add_parser('scripts', help='Lua scripts: SHA, KEYS/ARGV, EVALSHA template')
    s.add_argument('--load', action='store_true', help='SCRIPT LOAD them on the server')
    s.add_argument('--call', nargs=2, metavar=('NAME', 'QUEUE'),
                   help="script NAME's call for QUEUE, as the transport makes it: redis-cli "
                        '--eval and EVALSHA lines (placeholders <...> where a queue does not '
                        'tell)')
    s.add_argument('--lua-dir', metavar='DIR',
                   help='with --call: write the flat script here (default: a new temporary '
                        'directory)')
    s.set_defaults(run=cmd_scripts, offline=True)  # no server needed unless --load
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else USAGE
    where = maybe_sanitize_url(args.url)
    try:
        if getattr(args, 'offline', False) and not args.load:
            return args.run(args, None)
        broker = connect(args)
        try:
            return args.run(args, broker)
        finally:
            if broker.keys.cluster:
                broker.client.close()
            else:
                close_pool(broker.client.connection_pool)
    except Failure as exc:
        print(f'kombu-streams: {exc}', file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # e.g. piped into head
        return OK
    except UnsupportedServer as exc:  # its message names the versions
        print(exc, file=sys.stderr)
        return ERROR
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        print(f'kombu-streams: cannot connect to Redis at {where}: {exc}', file=sys.stderr)
        return ERROR
    except redis.RedisError as exc:
        print(f'kombu-streams: Redis error at {where}: {exc}', file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        return OK if getattr(args, 'watch', None) else 130


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
