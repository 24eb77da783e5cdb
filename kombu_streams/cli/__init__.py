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
    limits QUEUE [--set NAME=VALUE...] [--clear]
                                 the queue's length limit (x-max-length, x-overflow) and
                                 x-deduplication-window (with the duplicates not stored),
                                 x-requeue-delay (retry backoff, 'min_ms,max_ms'),
                                 x-rate-limit and x-rate-burst, x-max-in-flight,
                                 x-unique-mode and x-unique-ttl, x-priority-aging,
                                 x-fairness and x-group-max-in-flight,
                                 shown or changed at run time
    delayed list QUEUE [-n N] [--full]   delayed messages (eta / countdown), earliest first
    delayed cancel QUEUE TASK_ID...      remove delayed messages by task id before they run
    exporter [QUEUE...] [-x EXCHANGE] [--port 9808] [--addr 127.0.0.1]
                                 Prometheus metrics over HTTP (needs prometheus_client)
    scripts [--load]             each Lua script's SHA, KEYS/ARGV and an EVALSHA template
    scripts --call NAME QUEUE [--expires MS] [--lua-dir DIR]
                                 that script's call for QUEUE as the transport makes it:
                                 redis-cli --eval and EVALSHA lines, ready to run
    migrate [QUEUE...] [--dry-run] [--batch N] [--limit N] [--no-unacked]
            [--kombu-prefix P] [--from-url URL]
                                 move messages from Kombu's Redis transport (lists and the
                                 unacked hash) into streams of the same queue names

The global options (``--url``, ``--master-name``, ``--sentinel-password``, ``--prefix``,
``--priority-steps``, ``--json``) go before or after the command (``kombu-streams status
--url URL``); given at both places, the one after the command wins.

The URL takes the transport's forms (``redis-streams://``, ``rediss-streams://``,
``redis-streams-cluster://`` for Redis Cluster, ``sentinel-streams://`` with ``--master-name``
(and ``--sentinel-password``) for Sentinel, and ``redis://`` / ``rediss://`` for the same
servers); default ``$KOMBU_STREAMS_URL`` or ``redis-streams://127.0.0.1:6379/0``.
``--prefix`` and ``--priority-steps`` must match the app's ``global_keyprefix`` and
``priority_steps``. Everything but ``dlq redrive``, ``dlq purge``, ``delayed cancel``,
``limits --set`` / ``--clear`` and ``migrate`` (without ``--dry-run``) only reads.

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

import sys

import redis
from kombu.utils.url import maybe_sanitize_url

from ..connection import UnsupportedServer
from .connect import connect, disconnect
from .errors import ERROR, OK, USAGE, Failure
from .parsing import parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments); returns its exit code."""
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
            disconnect(broker)
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


__all__ = ('main',)
