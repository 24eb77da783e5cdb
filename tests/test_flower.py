"""Flower 2.x on kombu-streams: a real Flower process (loading kombu_streams.flower from its
config file) and a real headless Chromium on its Broker page."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, missing, wait_until
from kombu import Connection, Exchange, Queue

pytest.importorskip('flower')

pytestmark = [pytest.mark.celery, pytest.mark.slow]

APP = '''
import kombu_streams  # noqa: F401
from celery import Celery
app = Celery('ks_flower_app', broker={broker!r})
app.conf.update({conf!r})
'''


def chromium() -> str:
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        path = shutil.which(name)
        if path:
            return path
    missing('chromium is not installed (apt-get install chromium)')
    raise AssertionError('unreachable')


def run_flower(tmp_path: Path, broker: str, conf: dict, n_messages: int):
    """Publish ``n_messages`` to 'celery' (declared with a length limit of 100), start
    Flower on a free port; yields its base URL."""
    module = f'ks_flower_app_{free_port()}'
    (tmp_path / f'{module}.py').write_text(APP.format(broker=broker, conf=conf))
    (tmp_path / 'flowerconfig.py').write_text('import kombu_streams.flower  # noqa: F401\n')
    with Connection(broker if broker.startswith('redis-streams') else
                    'redis-streams' + broker[len('redis'):]) as conn:
        queue = Queue('celery', Exchange('celery'), 'celery',
                      queue_arguments={'x-max-length': 100})
        queue(conn.default_channel).declare()
        producer = conn.Producer()
        for n in range(n_messages):
            producer.publish({'n': n}, exchange='celery', routing_key='celery')
    port = free_port()
    # the app's dir first, then what the tests run with (a checkout before the install)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, PYTHONPATH=path, FLOWER_UNAUTHENTICATED_API='true')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'celery', '-A', module, 'flower', f'--port={port}',
         '--address=127.0.0.1', '--conf=flowerconfig.py'],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    return proc, f'http://127.0.0.1:{port}'


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def stop(proc: subprocess.Popen) -> str:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=10)
    return err.decode(errors='replace')[-3000:]


@pytest.mark.parametrize('form', ['scheme', 'broker_transport'])
def test_flower_api_and_broker_page_show_queue_lengths(tmp_path, redis_url, form):
    base = redis_url.rsplit('/', 1)[0]
    if form == 'scheme':
        broker, conf = base.replace('redis://', 'redis-streams://', 1) + '/5', {}
    else:
        broker, conf = base + '/5', {'broker_transport': 'kombu_streams.transport:Transport'}
    proc, url = run_flower(tmp_path, broker, conf, 7)
    log = ''
    try:
        answer = wait_until(lambda: get(f'{url}/api/queues/length'), 30, 'Flower to answer',
                            diag=lambda: stop(proc))
        assert json.loads(answer) == {'active_queues': [
            {'name': 'celery', 'messages': 7, 'messages_ready': 7,
             'messages_unacknowledged': 0, 'consumers': 0, 'delayed': 0,
             'arguments': {'x-max-length': 100, 'x-overflow': 'drop-head'},
             'in_flight': None, 'in_flight_limit': None, 'rate_tokens': None,
             'rate_next_ms': None, 'waiting_bytes': None}]}
        # the Broker page, rendered by a real browser
        dom = subprocess.run(
            [chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--dump-dom',
             f'{url}/broker'], capture_output=True, text=True, timeout=60).stdout
        row = re.search(r'<tr[^>]*>\s*<td[^>]*>\s*(?:<a[^>]*>)?\s*celery.*?</tr>', dom, re.S)
        assert row, dom[-3000:]
        cells = re.findall(r'<td[^>]*>(.*?)</td>', row.group(0), re.S)
        assert '7' in [re.sub(r'<[^>]+>|\s', '', c) for c in cells], cells
        shot = os.environ.get('KOMBU_STREAMS_FLOWER_SCREENSHOT')
        if shot and form == 'scheme':
            subprocess.run([chromium(), '--headless', '--no-sandbox', '--disable-gpu',
                            '--hide-scrollbars', f'--screenshot={shot}',
                            '--window-size=1100,420', f'{url}/broker'],
                           capture_output=True, timeout=60, check=True)
    finally:
        log = stop(proc)
    assert 'Unable to get queues' not in log, log


def test_queue_view_shows_in_flight_against_the_limit_and_the_next_rate_slot(redis_url):
    """What Flower's /api/queues/length gets for limited queues (StreamsBroker.queues, as
    Flower calls it, without a Flower process): the messages x-max-in-flight counts and its
    value, the deliveries x-rate-limit allows now and the ms until the next one, the bytes
    waiting as x-max-length-bytes counts them."""
    import asyncio

    import redis
    from helpers import read_messages

    from kombu_streams.broker import Broker
    from kombu_streams.flower import StreamsBroker
    from kombu_streams.keys import Keys
    from kombu_streams.limits import stored_pairs
    b = Broker(redis.Redis.from_url(redis_url), Keys(), [0, 3, 6, 9])
    b.declare('cap', stored_pairs('cap', {'x-max-in-flight': 2}))
    b.declare('slow', stored_pairs('slow', {'x-rate-limit': '1/h',
                                            'x-max-length-bytes': 1000}))
    for queue in ('cap', 'cap', 'cap', 'slow', 'slow'):
        b.publish(queue, 0, '{}')
    assert len(read_messages(b, ['cap'], 'c1', 5)) == 2
    assert len(read_messages(b, ['slow'], 'c1', 5)) == 1
    url = redis_url.replace('redis://', 'redis-streams://', 1)
    cap, slow = asyncio.run(StreamsBroker(url).queues(['cap', 'slow']))
    assert (cap['messages'], cap['messages_unacknowledged']) == (1, 2)
    assert (cap['in_flight'], cap['in_flight_limit']) == (2, 2)
    assert (cap['rate_tokens'], cap['rate_next_ms']) == (None, None)
    assert (slow['in_flight'], slow['in_flight_limit'], slow['rate_tokens']) == (None, None, 0)
    assert 3_500_000 < slow['rate_next_ms'] <= 3_600_000
    assert (cap['waiting_bytes'], slow['waiting_bytes']) == (None, 2)  # one '{}' waits
    json.dumps([cap, slow])  # what Flower sends: JSON as it is
