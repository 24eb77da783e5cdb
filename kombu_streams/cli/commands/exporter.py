"""``exporter``: Prometheus metrics of the queues over HTTP (kombu_streams.exporter)."""

from __future__ import annotations

import argparse
import sys

from ...broker import Broker
from ..errors import OK, USAGE, Failure


def cmd_exporter(args: argparse.Namespace, broker: Broker) -> int:
    try:
        from ...exporter import serve
    except ImportError as exc:  # prometheus_client is an extra, not a dependency
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


__all__ = ('cmd_exporter',)
