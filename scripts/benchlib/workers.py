"""Before and after for a Celery worker: the same drain with the kombu_streams of each given
checkout, and RabbitMQ classic, in turn in every round, on one Redis and one RabbitMQ node.

    cd scripts && python -m benchlib.workers --tree ../../base --tree .. [--pool prefork]
        [--rounds 5] [--tasks 5000] [--no-rabbit] [--redis-server PATH]

Only the worker differs between the trees: this process publishes (``apply_async``, with the
kombu_streams it imports) and each worker subprocess gets ``TREE`` first on its PYTHONPATH
(the rest of PYTHONPATH follows: put hiredis there if wanted). Each run is the Celery row of
``scripts/bench`` (``celerywork.w_celery``: tasks / (last task ran - first task ran)). The
machine's load moves every figure: read the ratios per round (to RabbitMQ in the same
round, and to the first tree), then their medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import types

import redis

from . import celerywork, rabbit, servers
from .subjects import Subject, store_for


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m benchlib.workers', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tree', action='append', required=True,
                        help='a checkout whose kombu_streams the worker runs (repeat)')
    parser.add_argument('--pool', choices=sorted(celerywork.POOLS), default='prefork')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--tasks', type=int, default=5000)
    parser.add_argument('--no-rabbit', action='store_true', help='leave RabbitMQ out')
    parser.add_argument('--redis-server', help='redis-server binary (default: PATH)')
    args = parser.parse_args(argv)
    trees = [os.path.abspath(t) for t in args.tree]
    inherited = os.environ.get('PYTHONPATH', '')
    exe = None if args.no_rabbit else rabbit.find_server()
    if not args.no_rabbit and exe is None:
        print('rabbitmq-server not found: RabbitMQ left out')
    proc, where, workdir = servers.start_server(args.redis_server)
    node = None
    rates: dict[str, list[float]] = {t: [] for t in trees}
    try:
        if exe is not None:
            node = rabbit.start(exe)
            rates['rabbit'] = []
        opts = types.SimpleNamespace(celery_tasks=args.tasks)
        store = store_for(where)
        for round_ in range(1, args.rounds + 1):
            for name in rates:
                redis.Redis.from_url(f'redis://{where}').flushdb()
                if name == 'rabbit' and node is not None:
                    os.environ['PYTHONPATH'] = inherited
                    subject = Subject(name, name, 'amqp', node.url, {}, store)
                else:
                    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [name, inherited]))
                    subject = Subject(name, name, 'redis', f'redis-streams://{where}', {}, store)
                rate = celerywork.w_celery(subject, opts, None, args.pool)[args.pool]
                rates[name].append(rate)
                print(f'round {round_}  {name}: {rate:,.0f} tasks/s', flush=True)
    finally:
        os.environ['PYTHONPATH'] = inherited
        if node is not None:
            rabbit.stop(node)
        servers.stop_server(proc, workdir)
    print(f'\n{args.pool} drain, tasks/s (median of {args.rounds} rounds), ratios per round:')
    for name, got in rates.items():
        line = f'{name}: {statistics.median(got):,.0f}'
        for other, label in (('rabbit', 'RabbitMQ'), (trees[0], 'first tree')):
            if other in rates and other != name:
                ratios = [a / b for a, b in zip(got, rates[other])]
                line += (f'; / {label} {", ".join(f"{r:.2f}" for r in ratios)}'
                         f' (median {statistics.median(ratios):.2f})')
        print(line)


if __name__ == '__main__':
    main()
