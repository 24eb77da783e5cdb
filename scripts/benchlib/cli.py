"""Benchmark kombu-streams against Kombu's stock Redis transport, side by side, with the
ceiling of this client and server, and optionally RabbitMQ under the same Celery app.

    scripts/bench [--url redis://127.0.0.1:6379/0] [--rounds 3] [--messages 5000]
                  [--latency-messages 500] [--scale-messages 2000] [--celery-tasks 5000]
                  [--redis-server PATH] [--json FILE] [--png FILE] [--quick] [--rtt MS]
                  [--only NAME,...] [--peers] [--no-hiredis]

Both transports talk to the same Redis server and database (``redis://`` for Kombu,
``redis-streams://`` for kombu-streams). Every workload runs once per subject per round,
alternating (Kombu, streams, raw, floor, alone, [RabbitMQ ...], Kombu, ...), on a fresh
queue after FLUSHDB. The table shows the median of the rounds and the ratio kombu-streams /
Kombu, and the end of the output says which of the issues' targets are met.

The ceiling, in the same run and table: "raw redis-py" is redis-py alone on the same server
(publish: XADD; consume+ack prefetch 1 and 100: one round trip of [XACK, XDEL, XREADGROUP
COUNT k] per k messages; latency: a consumer blocked in that pipeline), "Kombu alone" the
same Kombu workloads on ``memory://`` in this process (no broker: Kombu's own cost). The
ceiling of a rate is 1 / (1/alone + 1/raw), of latency the raw floor; each transport's
"fraction of ceiling" is printed beside it (latency: floor / latency). "script floor" is
redis-py alone again with each message's work in one EVALSHA of the least script (publish:
ZADD + XADD; consume+ack: XACK, XDEL, XREADGROUP in one call): a second table gives the
ceiling of a design with a Lua script per operation, 1 / (1/alone + 1/floor), and
kombu-streams' fraction of it.

Scale rows: one channel publishes to and consumes from 10 or 100 queues, each with 10
priority levels (``priority_steps=list(range(10))`` for both transports). Celery rows: the
same app on every broker: ``apply_async`` of ``--celery-tasks`` no-op tasks (ignore_result),
timed, then a real ``celery worker`` subprocess (prefork -c2, threads -c8) drains them; each
task INCRs a counter in the next Redis database number (DB+1), which also records when the
first and the last task ran.

``--peers``: the Celery rows also run on RabbitMQ (Debian's ``rabbitmq-server``; install it
with ``apt-get install -y rabbitmq-server``): a private node started by the bench on
127.0.0.1 with its own node name, ports and data directory, and stopped by its pid at the
end; a classic queue without and with publisher confirms (``broker_transport_options=
{'confirm_publish': True}``) and a quorum queue (with confirms). Without rabbitmq-server
the RabbitMQ rows are skipped with a message. A table of the Celery figures per broker
follows the main one.

hiredis: the header says whether redis-py parses replies with it; ``--no-hiredis`` keeps it
out of the bench and every process it starts (workers, consumers) where it is installed.

``--rtt MS``: Redis is never on loopback in production. Both transports then talk to Redis
through a TCP proxy on 127.0.0.1 (a process of its own) that holds each chunk for half the
round trip in each direction; the header gives the PING round trip measured through it
(asyncio's timers add up to a millisecond to what was asked). FLUSHDB and the counts go
to the server directly. raw redis-py goes through the proxy too; ``--peers`` needs --rtt 0.

Without ``--url`` a private redis-server is started on a free 127.0.0.1 port (no RDB, no AOF)
and stopped at the end. With ``--url`` the given database is FLUSHDB'ed between workloads:
never point it at data you care about. The machine's load moves every figure: compare
ratios and fractions of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import celery
import kombu
import redis

import kombu_streams

from . import charts, nohiredis, rabbit, report, servers, subjects, workloads
from .common import BODY_SIZE, SendCounter


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='scripts/bench', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--url', help='redis://HOST:PORT/DB to use (FLUSHDB is run on it!)')
    p.add_argument('--redis-server', help='redis-server binary when no --url (default: PATH)')
    p.add_argument('--rounds', type=int, help='rounds per subject (default 3)')
    p.add_argument('--messages', type=int, help='messages per workload (default 5000)')
    p.add_argument('--latency-messages', type=int, help='latency samples (default 500)')
    p.add_argument('--scale-messages', type=int,
                   help='messages per 10/100-queue workload (default 2000)')
    p.add_argument('--celery-tasks', type=int, help='tasks per Celery drain (default 5000)')
    p.add_argument('--json', help='also write the results to this file')
    p.add_argument('--png', help='also draw the ratios as a bar chart (needs matplotlib)')
    p.add_argument('--quick', action='store_true', help='fast smoke run')
    p.add_argument('--skip-celery', action='store_true', help='leave out the Celery workloads')
    p.add_argument('--only', metavar='NAME[,NAME]',
                   help='run only these workloads: ' + ', '.join(subjects.WORKLOADS))
    p.add_argument('--peers', action='store_true',
                   help='also run the Celery workloads on a private RabbitMQ node (classic '
                        'queue without and with publisher confirms, quorum queue)')
    p.add_argument('--no-hiredis', action='store_true',
                   help='keep hiredis out of this run (redis-py parses replies in Python) '
                        'where it is installed')
    p.add_argument('--commandstats', action='store_true',
                   help='print the Redis commands per message of the commands workload, '
                        'by command')
    p.add_argument('--rtt', type=rtt_list, default=[0.0], metavar='MS[,MS...]',
                   help='run both transports through a local TCP proxy that adds this round '
                        'trip (ms) between clients and Redis, once per value (0: direct); '
                        'the table gives the PING round trip measured (asyncio timers add '
                        'to the one asked), and with several values a table of the ratios '
                        'by round trip (and --png draws that)')
    p.add_argument('-v', '--verbose', action='store_true', help='print every run')
    opts = p.parse_args(argv)
    quick = opts.quick
    opts.rounds = opts.rounds or (1 if quick else 3)
    opts.messages = opts.messages or (300 if quick else 5000)
    opts.latency_messages = opts.latency_messages or (50 if quick else 500)
    opts.scale_messages = opts.scale_messages or (300 if quick else 2000)
    opts.celery_tasks = opts.celery_tasks or (300 if quick else 5000)
    names = subjects.WORKLOADS
    chosen = opts.only.split(',') if opts.only else list(names)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    opts.workloads = [n for n in chosen if not (opts.skip_celery and n in subjects.CELERY)]
    if opts.peers and any(opts.rtt):
        p.error('--peers runs RabbitMQ without the delay proxy: use it with --rtt 0 only')
    if opts.no_hiredis and not nohiredis.blocked():
        p.error('--no-hiredis must be seen before redis-py is imported: run scripts/bench')
    return opts


def rtt_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a list of ms: {text!r}') from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError('round trips must be >= 0 ms')
    return values


def run_all(every: list[subjects.Subject], opts, admin) -> tuple[dict, list[str]]:
    """Run every workload for every subject that has it, alternating, ``opts.rounds`` times."""
    samples: dict[str, dict[str, list]] = {
        key: {s.key: [] for s in every} for key, _, _ in report.ROWS}
    errors = []
    for rnd in range(1, opts.rounds + 1):
        for name in opts.workloads:
            for subject in every:
                workload = subject.runs.get(name)
                if workload is None:
                    continue
                admin.flushdb()
                started = time.perf_counter()
                try:
                    result = workload(subject, opts, admin)
                except Exception as exc:
                    errors.append(f'round {rnd} {name} {subject.label}: '
                                  f'{type(exc).__name__}: {exc}')
                    print(f'  ! {errors[-1]}', file=sys.stderr)
                    continue
                for row, value in result.items():
                    samples[row][subject.key].append(value)
                if opts.verbose:
                    print(f'  round {rnd} {name:<14} {subject.label:<26} '
                          f'{time.perf_counter() - started:6.2f}s {result}', file=sys.stderr)
    admin.flushdb()
    return samples, errors


def warm_up(every: list[subjects.Subject], opts, admin) -> None:
    """Load scripts and import lazy code paths before anything is timed."""
    small = SimpleNamespace(**{**vars(opts), 'messages': 50})
    for subject in every:
        admin.flushdb()
        if subject.kind in ('redis', 'memory') and 'consume1' in subject.runs:
            if subject.key in ('raw', 'floor'):
                subject.runs['consume1'](subject, small, admin)
            else:
                workloads.w_consume(subject, small, admin, 10)


def header(admin) -> dict:
    return {
        'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'machine': platform.machine(),
        'cpus': os.cpu_count(),
        'redis': admin.info('server')['redis_version'],
        'python': platform.python_version(),
        'kombu': kombu.__version__,
        'celery': celery.__version__,
        'redis-py': redis.__version__,
        'hiredis': redis.utils.HIREDIS_AVAILABLE,
        'hiredis_installed': nohiredis.installed_version(),
        'hiredis_blocked': nohiredis.blocked(),
        'kombu-streams': kombu_streams.__version__,
    }


def run_at(where: str, rtt: float, opts, admin, node) -> tuple[dict, dict, list[str], list]:
    """One full run, through a delay proxy of ``rtt`` ms if > 0:
    (header, samples, errors, subjects)."""
    head = header(admin)
    proxy = None
    try:
        if rtt:
            proxy, where = servers.start_proxy(where, rtt)
            head['rtt_ms_asked'] = rtt
        head['ping_rtt_ms'] = round(servers.ping_rtt_ms(where), 3)
        every = subjects.redis_subjects(where)
        if node is not None:
            every += subjects.rabbit_subjects(node.url, where)
            head['rabbitmq'] = node.version
        warm_up(every, opts, admin)
        samples, errors = run_all(every, opts, admin)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
    return head, samples, errors, every


def print_run(run: dict, opts) -> None:
    head = run['header']
    print(report.header_line(head))
    print(report.hiredis_line(head['hiredis_installed'], head['hiredis'],
                              head['hiredis_blocked']))
    print(f"messages={opts.messages}  latency messages={opts.latency_messages}  "
          f"scale messages={opts.scale_messages}  celery tasks={opts.celery_tasks}  "
          f"rounds={opts.rounds}  body={BODY_SIZE} B  (medians)")
    labels = run['labels']
    print(*report.main_table(run['rows'], labels), sep='\n')
    if any(r['ceiling'] for r in run['rows']):
        print(*report.ceiling_note(), sep='\n')
    floor = report.floor_table(run['rows'], labels) if 'floor' in labels else []
    if floor:
        print('\nthe script floor: each message in one EVALSHA of the least script '
              '(design ceiling = 1 / (1/floor + 1/alone)):')
        print(*floor, sep='\n')
    if run['errors']:
        print(f"\n{len(run['errors'])} run(s) failed:", *run['errors'], sep='\n  ')
    if any(k.startswith('rabbit') for k in labels):
        lines = report.celery_table(run['rows'], list(labels.items()))
        if lines:
            print(f"\nCelery {head['celery']}, the same app on each broker "
                  f"({opts.celery_tasks} no-op tasks, ignore_result; medians):")
            print(*lines, sep='\n')
    print()
    print(*report.target_lines('issue #5 targets (ratio kombu-streams / Kombu):',
                               run['targets']), sep='\n')
    print(*report.target_lines('issue #20 targets (kombu-streams: fraction of ceiling, '
                               'x raw floor, / RabbitMQ):', run['issue20_targets']), sep='\n')
    print()


def print_network(runs: list[dict]) -> None:
    """The ratios of every run side by side, one column per round trip."""
    print('\nratio kombu-streams / Kombu by PING round trip (through the delay proxy):')
    width = max(len(r['title']) for r in runs[0]['rows'])
    cols = [f"{run['header']['ping_rtt_ms']:.2f} ms" for run in runs]
    print(f"{'workload':<{width}} | " + ' | '.join(f'{c:>9}' for c in cols))
    for i, row in enumerate(runs[0]['rows']):
        cells = []
        for run in runs:
            r = run['rows'][i]
            cells.append('n/a' if r['ratio'] is None else f"{r['ratio']:.2f}")
        if any(c != 'n/a' for c in cells):
            print(f"{row['title']:<{width}} | " + ' | '.join(f'{c:>9}' for c in cells))


def start_peers(opts):
    """The private RabbitMQ node for --peers, or None (with the reason printed)."""
    if not opts.peers:
        return None
    if not any(name in subjects.CELERY for name in opts.workloads):
        print('bench: --peers runs the Celery workloads only, and none is chosen',
              file=sys.stderr)
        return None
    exe = rabbit.find_server()
    if exe is None:
        print('bench: --peers: rabbitmq-server not found (Debian: apt-get install -y '
              'rabbitmq-server); the RabbitMQ rows are skipped', file=sys.stderr)
        return None
    try:
        return rabbit.start(exe)
    except RuntimeError as exc:
        print(f'bench: --peers: {exc}\nthe RabbitMQ rows are skipped', file=sys.stderr)
        return None


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.png:
        charts.load_pyplot()  # fail now, not after the run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = node = None
    if opts.url:
        parts = urlsplit(opts.url)
        if parts.scheme != 'redis':
            sys.exit('bench: --url must be redis://HOST:PORT/DB')
        where = f"{parts.netloc}/{parts.path.strip('/') or '0'}"
    else:
        proc, where, workdir = server = servers.start_server(opts.redis_server)
    SendCounter.install()
    admin = redis.Redis.from_url(f'redis://{where}')  # direct: FLUSHDB, INFO, counts
    runs: list[dict] = []
    try:
        node = start_peers(opts)
        for rtt in opts.rtt:
            head, samples, errors, every = run_at(where, rtt, opts, admin, node)
            rows = report.summarize(samples)
            runs.append({'header': head, 'rows': rows, 'errors': errors,
                         'labels': {s.key: s.label for s in every},
                         'targets': report.check_targets(rows, 5),
                         'issue20_targets': report.check_targets(rows, 20)})
    except KeyboardInterrupt:
        print('bench: interrupted', file=sys.stderr)
        return 130
    finally:
        admin.close()
        if node is not None:
            rabbit.stop(node)
        if server:
            servers.stop_server(proc, workdir)
    for run in runs:
        print_run(run, opts)
    if len(runs) > 1:
        print_network(runs)
    if opts.json:
        options = {k: v for k, v in vars(opts).items() if k != 'workloads'}
        doc = [{'header': run['header'], 'options': options, 'errors': run['errors'],
                'subjects': run['labels'],
                'rows': [{k: v for k, v in r.items() if k != 'format'} for r in run['rows']],
                'targets': run['targets'], 'issue20_targets': run['issue20_targets']}
               for run in runs]
        with open(opts.json, 'w') as f:
            json.dump(doc[0] if len(doc) == 1 else doc, f, indent=2)
    if opts.png:
        if len(runs) == 1:
            charts.write_png(opts.png, runs[0]['header'], runs[0]['rows'], runs[0]['targets'])
        else:
            charts.write_network_png(opts.png, runs)
    return 1 if any(run['errors'] for run in runs) else 0
