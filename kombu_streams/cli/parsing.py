"""The command line of ``kombu-streams``: its commands, their options, and the global options
every command takes before or after its name.

Global options are defined twice with argparse's own means: on the top-level parser with
their defaults, and on every command's parser (through a parent parser) with
``default=SUPPRESS``. argparse copies what a command's parser parsed over what the top
level parsed; SUPPRESS keeps an option not given after the command out of that copy, so a
value given before the command (or the default) stays, and a value given after it wins,
also when the option is given at both places."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from ..options import DEFAULTS, priority_steps_error
from .commands.deadletters import cmd_dlq_list, cmd_dlq_purge, cmd_dlq_redrive, cmd_dlq_show
from .commands.delayed import cmd_delayed_cancel, cmd_delayed_list
from .commands.exporter import cmd_exporter
from .commands.limits import cmd_limits
from .commands.migrate import cmd_migrate
from .commands.scripts import cmd_scripts
from .commands.status import cmd_peek, cmd_status
from .connect import DEFAULT_URL

EPILOG = 'Exit codes: 0 ok, 1 error, 2 usage, 3 queue or dead letter not found.'


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


def add_global_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The options of every command: with their defaults (``defaults``, the top-level
    parser), else with SUPPRESS (each command's parser; see the module's docstring)."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    g = p.add_argument_group('global options' if defaults else
                             'global options (also accepted before the command)')
    g.add_argument('--url', default=default(os.environ.get('KOMBU_STREAMS_URL') or DEFAULT_URL),
                   help=f'broker URL (default: $KOMBU_STREAMS_URL or {DEFAULT_URL})')
    g.add_argument('--master-name', default=default(os.environ.get('KOMBU_STREAMS_MASTER_NAME')),
                   help="Sentinel URLs: the service's master_name")
    g.add_argument('--sentinel-password',
                   default=default(os.environ.get('KOMBU_STREAMS_SENTINEL_PASSWORD')),
                   help="Sentinel URLs: the sentinels' own password, if any")
    g.add_argument('--prefix', default=default(DEFAULTS['global_keyprefix'] or ''),
                   help="the app's global_keyprefix")
    steps = list(DEFAULTS['priority_steps'])
    g.add_argument('--priority-steps', type=priority_steps, default=default(steps),
                   metavar='0,3,6,9', help="the app's priority_steps")
    g.add_argument('--json', action='store_true', default=default(False),
                   help='print JSON for machines')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='kombu-streams', description='Inspect and repair a kombu-streams broker.',
        epilog=EPILOG)
    add_global_options(p, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, defaults=False)
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(parent: Any, name: str, about: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=about, parents=[common], epilog=EPILOG)

    s = command(sub, 'status', 'queues: ready, pending, consumers, age, dead letters')
    s.add_argument('queues', nargs='*', metavar='QUEUE',
                   help='queues to show (default: all queues and fanout exchanges)')
    s.add_argument('-x', '--exchange', action='append', default=[],
                   help='also show this fanout exchange (repeatable)')
    s.add_argument('--watch', type=positive(float), metavar='N',
                   help='refresh every N seconds')
    s.add_argument('--count', type=positive(int), metavar='M',
                   help='with --watch: stop after M refreshes')
    s.set_defaults(run=cmd_status)

    s = command(sub, 'peek', 'the next ready messages, not consumed')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('-n', type=positive(int), default=10, help='how many (default 10)')
    s.set_defaults(run=cmd_peek)

    dlq = command(sub, 'dlq', 'dead letters').add_subparsers(
        dest='action', required=True, metavar='ACTION')
    s = command(dlq, 'list', 'dead letters, oldest first')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('-n', type=positive(int), default=100, help='how many (default 100)')
    s.set_defaults(run=cmd_dlq_list)
    s = command(dlq, 'show', 'one dead letter')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('id', type=stream_id, metavar='ID')
    s.set_defaults(run=cmd_dlq_show)
    s = command(dlq, 'redrive', 'move dead letters back to their queue')
    s.add_argument('queue', metavar='QUEUE')
    which = s.add_mutually_exclusive_group()
    which.add_argument('--count', type=positive(int), help='the N oldest (default: all)')
    which.add_argument('--id', type=stream_id, nargs='+', help='these dead letters')
    s.set_defaults(run=cmd_dlq_redrive)
    s = command(dlq, 'purge', 'delete all dead letters of a queue')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('--yes', action='store_true', help='do not ask')
    s.set_defaults(run=cmd_dlq_purge)

    s = command(sub, 'limits', "a queue's arguments (length limit, message TTL, rate and "
                "in-flight limits, retry backoff, duplicates; and its counters): show, or "
                "change at run time")
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('--set', nargs='+', metavar='NAME=VALUE',
                   help='set arguments, e.g. x-max-length=10000 x-overflow=reject-publish '
                        'x-message-ttl=60000')
    s.add_argument('--clear', action='store_true',
                   help='remove all limits (with --set: replace them by those)')
    s.set_defaults(run=cmd_limits)

    delayed = command(sub, 'delayed', 'messages waiting for their due time').add_subparsers(
        dest='action', required=True, metavar='ACTION')
    s = command(delayed, 'list', 'the next delayed messages, earliest first')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('-n', type=positive(int), default=20, help='how many (default 20)')
    s.add_argument('--full', action='store_true', help='with the messages (JSON output)')
    s.set_defaults(run=cmd_delayed_list)
    s = command(delayed, 'cancel', 'remove delayed messages by task id (label)')
    s.add_argument('queue', metavar='QUEUE')
    s.add_argument('ids', nargs='+', metavar='TASK_ID')
    s.set_defaults(run=cmd_delayed_cancel)

    s = command(sub, 'exporter', 'serve Prometheus metrics of the queues over HTTP')
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

    s = command(sub, 'migrate', "move messages from Kombu's Redis transport here")
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

    s = command(sub, 'scripts', 'Lua scripts: SHA, KEYS/ARGV, EVALSHA template')
    s.add_argument('--load', action='store_true', help='SCRIPT LOAD them on the server')
    s.add_argument('--call', nargs=2, metavar=('NAME', 'QUEUE'),
                   help="script NAME's call for QUEUE, as the transport makes it: redis-cli "
                        '--eval and EVALSHA lines (placeholders <...> where a queue does not '
                        'tell)')
    s.add_argument('--expires', type=positive(int), metavar='MS',
                   help="with --call touch or read: the queue's x-expires in ms (touch is "
                        'sent only for queues declared with one)')
    s.add_argument('--lua-dir', metavar='DIR',
                   help='with --call: write the flat script here (default: a new temporary '
                        'directory)')
    s.set_defaults(run=cmd_scripts, offline=True)  # no server needed unless --load
    return p


__all__ = ('parser', 'priority_steps', 'positive', 'stream_id')
