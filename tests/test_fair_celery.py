"""Fair share's per-group cap through a real Celery prefork worker (issue #22): with
``x-group-max-in-flight: 1`` on the worker's queue, a tenant's tasks run one at a time over
every pool process, while another tenant's run beside them; acks_late, so a task holds its
tenant's slot until it is done (tests/test_celery.py's environment; docs/design.rst, "Fair
share").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_celery import QUEUE, CeleryEnv, celery_env, wait_for

pytestmark = [pytest.mark.celery, pytest.mark.slow]

SPANS = '''

@app.task(bind=True)
def work(self, tenant, n):
    start = time.time()
    time.sleep(0.4)
    store.rpush('spans', f'{tenant} {n} {start:.3f} {time.time():.3f}')
'''


@pytest.fixture()
def env(tmp_path: Path, redis_url: str) -> Any:
    with celery_env(tmp_path, redis_url.rsplit('/', 1)[0]) as environment:
        yield environment


def test_a_tenant_runs_one_task_at_a_time_beside_the_others(env: CeleryEnv) -> None:
    """Four tasks of tenant a, two of b, on a worker with three pool processes: a's never
    overlap (its cap), b's run while a's do, and every task runs once."""
    arguments = {QUEUE: {'x-fairness': 'round-robin', 'x-group-max-in-flight': 1}}
    module = env.load({'queue_arguments': arguments}, tasks=SPANS)
    for n in range(4):
        module.work.apply_async(args=['a', n], headers={'x-group': 'a'})
    for n in range(2):
        module.work.apply_async(args=['b', n], headers={'x-group': 'b'})
    worker = env.worker('fair@ks', concurrency=3)
    wait_for(lambda: env.store.llen('spans') == 6, 60, what='six tasks done', log=env.logs)
    worker.terminate()
    spans = [x.decode().split() for x in env.store.lrange('spans', 0, -1)]
    runs = {(t, int(n)): (float(s), float(e)) for t, n, s, e in spans}
    assert sorted(runs) == [('a', n) for n in range(4)] + [('b', 0), ('b', 1)], env.logs()

    def overlap(x: tuple[float, float], y: tuple[float, float]) -> bool:
        return x[0] < y[1] and y[0] < x[1]

    for tenant in ('a', 'b'):
        mine = [span for (t, _), span in runs.items() if t == tenant]
        assert not any(overlap(x, y) for i, x in enumerate(mine) for y in mine[i + 1:]), (
            tenant, spans, env.logs())
    a_runs = [span for (t, _), span in runs.items() if t == 'a']
    assert any(overlap(runs[('b', 0)], x) for x in a_runs), spans  # side by side
