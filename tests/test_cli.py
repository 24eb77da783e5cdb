"""The ``kombu-streams`` command (kombu_streams/cli/) and the scripts behind ``status``.

inspect.lua and inspect_fanout.lua are tested like every script (on fakeredis, Redis 7.0 and
Redis 6.2, through ``Broker``). The command itself runs as a subprocess, the installed
console script, against a real redis-server, with its state made by Kombu or by the broker
scripts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from helpers import read_messages, server_ms
from kombu import Connection, Exchange, Queue

import kombu_streams  # noqa: F401  (registers redis-streams://)
from kombu_streams.broker import HOLDER, PAGE, Broker, Delay
from kombu_streams.channel import Channel
from kombu_streams.cli import main, parsing
from kombu_streams.cli.commands.calls import CALLS
from kombu_streams.keys import Keys
from kombu_streams.leases import consumer_expiry_ms
from kombu_streams.limits import stored_pairs
from kombu_streams.scripts import SCRIPTS, KeyTypeError
from kombu_streams.text import text

K = Keys()
LEVELS = [0, 3, 6, 9]
CLI = Path(sys.executable).parent / 'kombu-streams'


def broker(c, levels=LEVELS, keys=K):
    return Broker(c, keys, levels)


def level(info, lv):
    return next(x for x in info['levels'] if x['level'] == lv)


def counts(info):
    """{level: (ready, held, pending)} of the levels that hold anything."""
    return {x['level']: (x['ready'], x['held'], x['pending']) for x in info['levels']
            if x['ready'] or x['pending']}


def snapshot(c):
    return {key: (c.type(key), c.dump(key)) for key in c.keys('*')}


def is_fake(c):
    return type(c).__module__.startswith('fakeredis')


def is_62(c):
    return not is_fake(c) and str(c.info('server')['redis_version']).startswith('6.')


# -- inspect.lua ----------------------------------------------------------------------------


def test_inspect_missing_queue(script_client):
    info = broker(script_client).inspect('nope')
    assert info['exists'] is False
    assert (info['ready'], info['held'], info['pending'], info['dlq']) == (0, 0, 0, 0)
    assert info['oldest_ready_ms'] is None and info['consumers'] == []
    assert [x['level'] for x in info['levels']] == LEVELS
    assert not any(x['exists'] for x in info['levels'])
    assert script_client.keys('*') == []


def filled(c):
    """A Broker on ``c`` with queue q declared: a0..a4 at level 0, b0..b2 at level 6."""
    b = broker(c)
    b.declare('q')
    for i in range(5):
        b.publish('q', 0, f'a{i}')
    for i in range(3):
        b.publish('q', 6, f'b{i}')
    return b


def test_inspect_counts_ready_held_pending_and_consumers(script_client):
    c = script_client
    b = filled(c)
    got = read_messages(b, ['q'], 'c1', 3)              # a0 a1 a2
    b.requeue('q', [(got[0].stream, got[0].entry_id)])  # a0 back, held
    b.ack('q', [(got[1].stream, got[1].entry_id)])      # a1 done
    read_messages(b, ['q'], 'c2', 1)                    # a0 again (held ones first)
    read_messages(b, ['q'], 'c3', 3)                    # a3 a4 b0
    b.requeue('q', [(K.stream('q', 0), got[2].entry_id)])  # c1's a2 back
    info = b.inspect('q')
    assert counts(info) == {0: (1, 1, 3), 6: (2, 0, 1)}
    assert (info['ready'], info['held'], info['pending']) == (3, 1, 4)
    assert info['ready'] == b.size('q')
    assert {(x['name'], x['pending']) for x in info['consumers']} == {
        ('c1', 0), ('c2', 1), ('c3', 3)}
    assert HOLDER not in {x['name'] for x in info['consumers']}
    lv0 = level(info, 0)
    assert {x['name']: x['pending'] for x in lv0['consumers']} == {'c1': 0, 'c2': 1, 'c3': 2}
    assert all(x['idle_ms'] >= 0 for x in info['consumers'])
    assert lv0['length'] == 4 and lv0['exists']
    assert level(info, 3)['oldest_ready_ms'] is None
    assert level(info, 6)['last_delivered_id'] == c.xrange(K.stream('q', 6))[0][0].decode()
    assert info['dlq'] == 0


def test_inspect_oldest_ready_age_counts_held_and_new_entries(script_client):
    c = script_client
    b = broker(c)
    key = K.stream('q', 3)
    for ms in (1000, 2000, 3000):
        c.xadd(key, {'m': f'x{ms}'}, id=f'{ms}-0')
    c.xgroup_create(key, 'q', '0')
    info = b.inspect('q')
    assert level(info, 3)['oldest_ready_ms'] == info['time_ms'] - 1000
    got = read_messages(b, ['q'], 'c1', 2)  # 1000 and 2000 are delivered: 3000 is ready
    info = b.inspect('q')
    assert level(info, 3)['oldest_ready_ms'] == info['time_ms'] - 3000
    b.requeue('q', [(key, got[1].entry_id)])  # 2000 is held: older than 3000
    info = b.inspect('q')
    assert level(info, 3)['oldest_ready_ms'] == info['time_ms'] - 2000
    assert info['oldest_ready_ms'] == info['time_ms'] - 2000
    assert (info['ready'], info['held'], info['pending']) == (2, 1, 1)


def test_inspect_before_declare_counts_every_entry_ready(script_client):
    c = script_client
    c.xadd(K.stream('q', 9), {'m': 'x'}, id='5000-0')
    c.xadd(K.stream('q', 9), {'m': 'y'}, id='6000-0')
    info = broker(c).inspect('q')
    assert info['exists'] and counts(info) == {9: (2, 0, 0)}
    assert level(info, 9)['last_delivered_id'] is None
    assert info['oldest_ready_ms'] == info['time_ms'] - 5000


def test_inspect_counts_dead_letters_and_writes_nothing(script_client):
    c = script_client
    b = broker(c)
    b.declare('q')
    b.publish('q', 0, 'x')
    c.xadd(K.stream('q', 0), {'junk': '1'})  # not a message: read sets it aside
    d = read_messages(b, ['q'], 'c1', 5)
    b.dead_letter('q', d[0].stream, d[0].entry_id, 'testing', d[0].deliveries)
    b.bind('ex', 'm', 0, fanout_group='q')
    before = snapshot(c)
    info = b.inspect('q')
    fan = b.inspect_fanout('ex')
    assert info['dlq'] == 2 and info['ready'] == 0 and info['pending'] == 0
    assert fan['exists'] and [g['group'] for g in fan['groups']] == ['q']
    assert snapshot(c) == before
    if not is_fake(c) and not is_62(c):
        # Redis 7.0+: inspect ran as EVALSHA_RO with the no-writes flag (its own SHA)
        script = SCRIPTS['inspect'].flagged
        assert script.source.startswith('#!lua flags=no-writes\n')
        keys = [*K.streams('q', LEVELS), K.dlq('q'), K.delayed('q'), K.args('q'),
                K.counters('q'), K.unique('q'), K.rate('q'), K.fair('q')]
        assert c.evalsha_ro(script.sha, len(keys), *keys, 'q', HOLDER, *LEVELS)[1] == 2


def test_inspect_with_prefix_and_other_levels(script_client):
    keys = Keys('app1:')
    b = broker(script_client, [0, 5], keys)
    b.declare('q')
    b.publish('q', 5, 'x')
    info = b.inspect('q')
    assert [x['stream'] for x in info['levels']] == ['app1:ks:q:{q}:0', 'app1:ks:q:{q}:5']
    assert counts(info) == {5: (1, 0, 0)}
    assert broker(script_client).inspect('q')['exists'] is False


@pytest.mark.parametrize('which', ['level', 'dlq', 'fanout'])
def test_inspect_wrong_type_raises_key_type_error(script_client, which):
    c = script_client
    key = {'level': K.stream('q', 3), 'dlq': K.dlq('q'), 'fanout': K.fanout('x')}[which]
    c.set(key, b'someone else')
    with pytest.raises(KeyTypeError) as info:
        if which == 'fanout':
            broker(c).inspect_fanout('x')
        else:
            broker(c).inspect('q')
    assert key in str(info.value) and 'WRONGTYPE' in str(info.value)
    assert c.get(key) == b'someone else'


def test_inspect_counts_in_flight_as_the_reads_do_against_x_max_in_flight(script_client):
    """In flight = what read.lua counts against x-max-in-flight (lua/lib/inflight.lua, the same
    helper): delivered and not settled, over every level; a requeued message (parked with the
    holder) is ready again, not in flight. None for a queue without the limit."""
    c = script_client
    b = broker(c)
    b.declare('q', stored_pairs('q', {'x-max-in-flight': 3}))
    b.declare('free')
    for n, level in enumerate((0, 0, 3, 9)):
        b.publish('q', level, json.dumps({'n': n}))
    b.publish('free', 0, 'x')
    first = read_messages(b, ['q'], 'c1', 2)  # both of level 0
    second = read_messages(b, ['q'], 'c2', 5)  # the room left: one, of level 3
    assert len(first) == 2 and len(second) == 1 and second[0].level == 3
    info = b.inspect('q')
    assert (info['in_flight'], info['in_flight_limit']) == (3, 3)
    b.requeue('q', [(first[0].stream, first[0].entry_id)])
    before = snapshot(c)
    info = b.inspect('q')
    assert (info['in_flight'], info['in_flight_limit'], info['ready']) == (2, 3, 2)
    assert (info['rate_tokens'], info['rate_next_ms']) == (None, None)
    assert snapshot(c) == before
    other = b.inspect('free')
    assert (other['in_flight'], other['in_flight_limit']) == (None, None)
    c.hset(K.args('q'), 'x-max-in-flight', 'lots')  # another program wrote it: reads refuse it
    assert b.inspect('q')['in_flight'] is None


def test_inspect_shows_the_rate_limiters_tokens_and_next_slot(script_client):
    """x-rate-limit 10/s burst 2: idle, 2 deliveries may go now; with the limiter's state
    (the next delivery's theoretical arrival time, lua/lib/rate.lua) 5 s ahead, none may,
    and the next one may in 5 s less the burst's tolerance (100 ms). Read, never written."""
    c = script_client
    b = broker(c)
    b.declare('q', stored_pairs('q', {'x-rate-limit': '10/s', 'x-rate-burst': 2}))
    info = b.inspect('q')
    assert (info['rate_tokens'], info['rate_next_ms']) == (2, 0)
    assert (info['in_flight'], info['in_flight_limit']) == (None, None)
    at = server_ms(c) + 5000
    c.set(K.rate('q'), at, px=60_000)
    before = snapshot(c)
    info = b.inspect('q')
    assert snapshot(c) == before
    assert info['rate_tokens'] == 0
    assert at - 100 - info['time_ms'] == info['rate_next_ms'] and info['rate_next_ms'] <= 4900
    c.set(K.rate('q'), info['time_ms'] - 1000)  # past: a full burst again
    assert b.inspect('q')['rate_tokens'] == 2
    c.delete(K.rate('q'))
    c.set(K.rate('q'), 'x')
    c.hset(K.args('q'), 'x-rate-limit', 'often')  # another program wrote it: reads refuse it
    assert (b.inspect('q')['rate_tokens'], b.inspect('q')['rate_next_ms']) == (None, None)


def test_inspect_with_a_wrong_type_at_the_rate_key_names_it(script_client):
    c = script_client
    b = broker(c)
    b.declare('q', stored_pairs('q', {'x-rate-limit': '10/s'}))
    c.hset(K.rate('q'), 'f', 'v')
    with pytest.raises(KeyTypeError) as info:
        b.inspect('q')
    assert 'WRONGTYPE' in str(info.value) and K.rate('q') in str(info.value)


# -- inspect_fanout.lua ---------------------------------------------------------------------


def test_inspect_fanout_lag_pending_and_cap(script_client):
    c = script_client
    b = broker(c)
    missing = b.inspect_fanout('x')
    assert (missing['exists'], missing['length'], missing['groups']) == (False, 0, [])
    for q in ('a', 'b'):
        b.bind('x', f'member-{q}', 0, fanout_group=q)
    for i in range(3):
        script, keys, args = b.fanout_publish_call('x', f'm{i}', [('a', 'member-a'),
                                                                   ('b', 'member-b')])
        script(c, keys, args)
    got = read_messages(b, ['a'], 'c1', 1, fanout={'a': ['x']})
    assert got[0].exchange == 'x'
    info = b.inspect_fanout('x')
    assert info['exists'] and info['length'] == 3
    groups = {g['group']: g for g in info['groups']}
    assert (groups['a']['lag'], groups['a']['pending'], groups['a']['consumers']) == (2, 1, 1)
    assert (groups['b']['lag'], groups['b']['pending'], groups['b']['consumers']) == (3, 0, 0)
    assert not groups['a']['lag_capped'] and not groups['b']['lag_capped']
    assert groups['b']['oldest_unread_ms'] >= groups['a']['oldest_unread_ms'] >= 0
    capped = {g['group']: g for g in b.inspect_fanout('x', cap=2)['groups']}['b']
    if is_62(c):
        assert (capped['lag'], capped['lag_capped']) == (2, True)
    else:  # 7.0+ knows the lag beyond the cap
        assert (capped['lag'], capped['lag_capped']) in {(3, False), (2, True)}
    b.ack('a', [(got[0].stream, got[0].entry_id)], exchange='x')
    read_messages(b, ['a'], 'c1', 5, fanout={'a': ['x']})
    groups = {g['group']: g for g in b.inspect_fanout('x')['groups']}
    assert (groups['a']['lag'], groups['a']['pending']) == (0, 2)
    assert groups['a']['oldest_unread_ms'] is None


def test_inspect_fanout_reads_a_bounded_page_of_groups_per_call(script_client, monkeypatch):
    """One call read up to cap + 1 entries of every group: groups x (cap + 1) in all. Now a
    call stops before a group that could pass its budget of entries (reporting one at
    least), and the Broker calls again from where it stopped."""
    c = script_client
    b = broker(c)
    names = ['a', 'b', 'c', 'd']
    for q in names:
        b.bind('x', f'member-{q}', 0, fanout_group=q)
    members = [(q, f'member-{q}') for q in names]
    for i in range(6):
        script, keys, args = b.fanout_publish_call('x', f'm{i}', members)
        script(c, keys, args)
    read_messages(b, ['b'], 'c1', 2, fanout={'b': ['x']})
    script, keys, args = b.inspect_fanout_call('x', 5, 1, 13)[0]
    exists, length, _, page, after = script(c, keys, args)
    # budget 13, cap 5: two groups of 6 entries each fit, a third could pass it
    assert (exists, length, [text(g[0]) for g in page], after) == (1, 6, ['b', 'c'], 3)
    # b read 2 of 6; c has 6 unread: beyond the cap, Redis 7 may know how many
    assert page[0][3:5] == [4, 0] and page[1][3:5] in ([5, 1], [6, 0])
    script, keys, args = b.inspect_fanout_call('x', 5, 3, 1)[0]
    assert [text(g[0]) for g in script(c, keys, args)[3]] == ['d']  # at least one group
    assert script(c, keys, args)[4] == 0  # the last page
    runs = []
    real = Broker.run
    monkeypatch.setattr(Broker, 'run', lambda self, call: runs.append(call[2]) or real(self,
                                                                                       call))
    monkeypatch.setattr('kombu_streams.introspect.FANOUT_BUDGET', 7)
    info = broker(c).inspect_fanout('x', cap=5)
    assert [g['group'] for g in info['groups']] == names
    lags = [(g['lag'], g['lag_capped']) for g in info['groups']]
    assert lags[1] == (4, False) and {lags[0], lags[2], lags[3]} <= {(5, True), (6, False)}
    assert runs == [[5, 0, 7], [5, 1, 7], [5, 2, 7], [5, 3, 7]]  # one group per call


# -- peek.lua -------------------------------------------------------------------------------


def test_peek_shows_what_reads_deliver_in_their_order_and_changes_nothing(script_client,
                                                                          monkeypatch):
    c = script_client
    b = filled(c)
    got = read_messages(b, ['q'], 'c1', 4)                   # a0 a1 a2 a3
    b.requeue('q', [(got[2].stream, got[2].entry_id), (got[0].stream, got[0].entry_id),
                    (got[3].stream, got[3].entry_id)])       # a0 a2 a3 held
    c.xdel(K.stream('q', 0), got[3].entry_id)                # deleted while parked: not served
    b.publish('q', 9, 'z')
    before = snapshot(c)
    peeked = b.peek('q', 100)
    assert snapshot(c) == before
    assert [(m.level, m.payload, m.requeued) for m in peeked] == [
        (0, b'a0', True), (0, b'a2', True), (0, b'a4', False), (6, b'b0', False),
        (6, b'b1', False), (6, b'b2', False), (9, b'z', False)]
    assert [m.stream for m in peeked][:3] == [K.stream('q', 0)] * 3
    assert b.peek('q', 2) == peeked[:2]
    monkeypatch.setattr('kombu_streams.broker.PEEK_MAX', 1)  # a call per message: each cursor
    assert b.peek('q', 100) == peeked
    served = []
    while True:
        one = read_messages(b, ['q'], 'c2', 1)
        if not one:
            break
        served += one
    assert [(d.level, d.entry_id.decode()) for d in served] == [
        (m.level, m.entry_id) for m in peeked]
    assert b.peek('q', 10) == []


def test_peek_before_declare_and_of_a_missing_queue(script_client):
    c = script_client
    c.xadd(K.stream('q', 9), {'m': 'x'}, id='5000-0')
    c.xadd(K.stream('q', 9), {'junk': 'y'}, id='6000-0')  # no m field: shown with b''
    b = broker(c)
    assert [(m.level, m.entry_id, m.payload, m.requeued) for m in b.peek('q')] == [
        (9, '5000-0', b'x', False), (9, '6000-0', b'', False)]
    assert b.peek('nope') == []
    assert sorted(c.keys('*')) == [K.stream('q', 9).encode()]


def test_peek_checks_its_arguments(script_client):
    keys = K.streams('q', LEVELS)
    for keys_, args in ((keys, ['q', HOLDER, 0, 1, 'h', '']), (keys, ['q', HOLDER, 1001, 1,
                        'h', '']), (keys, ['q', HOLDER, 10, 5, 'h', '']),
                        (keys, ['q', HOLDER, 10, 1, 'x', '']), (keys, ['q', HOLDER, 10]),
                        ([], ['q', HOLDER, 10, 1, 'h', ''])):
        with pytest.raises(redis.ResponseError, match='peek: expected'):
            SCRIPTS['peek'](script_client, keys_, args)


# -- the command ----------------------------------------------------------------------------


def cli(url, *args, stdin=''):
    if not CLI.exists():
        pytest.fail(f'{CLI} is missing: pip install -e . to get the console script')
    env = {k: v for k, v in os.environ.items() if k != 'KOMBU_STREAMS_URL'}
    argv = [str(CLI)] + (['--url', url] if url else []) + list(args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, input=stdin,
                          env=env)


def cli_json(url, *args):
    r = cli(url, '--json', *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def work(redis_url):
    """Queue 'work' made by Kombu: levels 0: 3 messages (2 delivered to one channel and not
    acked, one rejected back), 3: 2 (one a Celery task), 9: 1; and fanout exchange 'bcast'
    with queue 'bq' bound. Yields while the channel still holds its messages."""
    with Connection(redis_url, transport='kombu_streams.transport:Transport') as conn:
        q = Queue('work', Exchange('work'), 'work')
        producer = conn.Producer()
        for i, pri in enumerate([0, 0, 0, 5, 9]):
            producer.publish({'n': i}, exchange=q.exchange, routing_key='work', declare=[q],
                             priority=pri)
        producer.publish([[2, 3], {}, {}], exchange=q.exchange, routing_key='work',
                         priority=3, headers={'task': 'tasks.add', 'id': 'abc-123'})
        producer.publish({'later': 1}, exchange=q.exchange, routing_key='work',
                         headers={'x-delay': 600_000})
        bcast = Exchange('bcast', type='fanout')
        channel = conn.channel()
        Queue('bq', bcast)(channel).declare()
        conn.Producer(channel).publish({'b': 1}, exchange=bcast)
        taken = [channel.basic_get('work') for _ in range(3)]
        assert [m.payload for m in taken] == [{'n': 0}, {'n': 1}, {'n': 2}]
        taken[0].reject(requeue=True)
        yield redis_url, channel.consumer_name


def test_status_json_exact_counts(work):
    url, consumer = work
    data = cli_json(url, 'status', 'work')
    assert data['missing'] == [] and data['exchanges'] == []
    [info] = data['queues']
    assert counts(info) == {0: (1, 1, 2), 3: (2, 0, 0), 9: (1, 0, 0)}
    assert (info['ready'], info['held'], info['pending'], info['dlq']) == (4, 1, 2, 0)
    assert info['delayed'] == 1 and 590_000 < info['next_due_ms'] <= 600_000
    assert [(c['name'], c['pending']) for c in info['consumers']] == [(consumer, 2)]
    assert info['oldest_ready_ms'] >= 0


def test_status_table(work):
    url, consumer = work
    r = cli(url.replace('redis://', 'redis-streams://'), 'status', 'work')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ['QUEUE', 'LEVEL', 'READY', 'REQUEUED', 'PENDING', 'OLDEST',
                                'DELAYED', 'DUE', 'IN', 'CONSUMERS', 'DLQ', 'LIMIT']
    row = lines[1].split()
    assert row[:5] == ['work', 'all', '4', '1', '2'] and row[6] == '1'
    assert row[8:] == ['1', '0', '-']
    assert row[7].endswith('s') or row[7].endswith('m'), row
    assert [line.split()[:4] for line in lines[2:5]] == [
        ['0', '1', '1', '2'], ['3', '2', '0', '0'], ['9', '1', '0', '0']]
    assert any(line.split()[:3] == [consumer, 'work', '2'] for line in lines)


@pytest.fixture
def at_limits(redis_url):
    """Queue 'cap' (x-max-in-flight 2): 3 messages, 2 delivered to consumer c1, so at its
    limit; queue 'slow' (x-rate-limit 1/h): 2 messages, 1 delivered, the next slot an hour
    away; queue 'plain': no limits."""
    b = broker(redis.Redis.from_url(redis_url))
    b.declare('cap', stored_pairs('cap', {'x-max-in-flight': 2}))
    b.declare('slow', stored_pairs('slow', {'x-rate-limit': '1/h'}))
    b.declare('plain')
    for queue, n in (('cap', 3), ('slow', 2), ('plain', 1)):
        for i in range(n):
            b.publish(queue, 0, json.dumps({'n': i}))
    assert len(read_messages(b, ['cap'], 'c1', 5)) == 2
    assert len(read_messages(b, ['slow'], 'c1', 5)) == 1
    return redis_url


def test_status_shows_in_flight_against_the_limit_and_the_next_rate_slot(at_limits):
    data = {i['queue']: i for i in cli_json(at_limits, 'status', 'cap', 'slow', 'plain')['queues']}
    cap, slow, plain = data['cap'], data['slow'], data['plain']
    assert (cap['in_flight'], cap['in_flight_limit'], cap['ready']) == (2, 2, 1)
    assert (cap['rate_tokens'], cap['rate_next_ms']) == (None, None)
    assert (slow['in_flight'], slow['rate_tokens']) == (None, 0)
    assert 3_500_000 < slow['rate_next_ms'] <= 3_600_000
    assert (plain['in_flight'], plain['in_flight_limit'], plain['rate_tokens'],
            plain['rate_next_ms']) == (None, None, None, None)
    r = cli(at_limits, 'status', 'cap', 'slow', 'plain')
    assert r.returncode == 0, r.stderr
    limits = {line.split()[0]: line.split('  ')[-1].strip() for line in r.stdout.splitlines()
              if line.split() and line.split()[0] in data}
    assert limits['cap'] == 'in flight 2/2'
    assert re.fullmatch(r'rate 1/h burst 1: next in (59m\d\ds|1h00m)', limits['slow']), limits
    assert limits['plain'] == '-'


def test_delayed_list_and_cancel(work):
    url, _ = work
    with Connection(url, transport='kombu_streams.transport:Transport') as conn:
        producer = conn.Producer()
        for task_id in ('t-1', 't-2'):
            producer.publish({'later': task_id}, exchange='work', routing_key='work',
                             headers={'x-delay': 300_000, 'id': task_id})
    data = cli_json(url, 'delayed', 'list', 'work', '--full')
    assert data['delayed'] == 3  # with the fixture's unlabelled one
    assert {m['label'] for m in data['messages']} == {'', 't-1', 't-2'}
    assert all(m['message'].startswith('{') for m in data['messages'])
    r = cli(url, 'delayed', 'list', 'work')
    assert r.returncode == 0 and r.stdout.split()[:3] == ['LABEL', 'LEVEL', 'DUE'], r.stdout
    assert cli_json(url, 'delayed', 'cancel', 'work', 't-1')['cancelled'][0].endswith(':t-1')
    assert cli(url, 'delayed', 'cancel', 'work', 't-1').returncode == 3
    assert cli_json(url, 'delayed', 'list', 'work')['delayed'] == 2


def test_status_discovers_queues_and_fanout_exchanges(work):
    url, _ = work
    data = cli_json(url, 'status')
    assert [q['queue'] for q in data['queues']] == ['bq', 'work']
    [fan] = data['exchanges']
    assert fan['exchange'] == 'bcast'
    assert [(g['group'], g['lag'], g['pending']) for g in fan['groups']] == [('bq', 1, 0)]
    r = cli(url, 'status')
    assert r.returncode == 0
    assert 'FANOUT' in r.stdout and 'bcast' in r.stdout


def test_status_watch_is_bounded_by_count(work):
    url, _ = work
    r = cli(url, '--json', 'status', 'work', '--watch', '0.05', '--count', '3')
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(docs) == 3 and all(d['queues'][0]['ready'] == 4 for d in docs)


def test_status_with_prefix_and_priority_steps(redis_url):
    options = {'global_keyprefix': 'app1:', 'priority_steps': [0, 5]}
    with Connection(redis_url, transport='kombu_streams.transport:Transport',
                    transport_options=options) as conn:
        q = Queue('pq', Exchange('pq'), 'pq')
        conn.Producer().publish({'x': 1}, exchange=q.exchange, routing_key='pq',
                                declare=[q], priority=7)
    data = cli_json(redis_url, '--prefix', 'app1:', '--priority-steps', '0,5', 'status')
    assert [(q['queue'], counts(q)) for q in data['queues']] == [('pq', {5: (1, 0, 0)})]
    assert cli_json(redis_url, 'status')['queues'] == []
    assert cli(redis_url, 'status', 'pq').returncode == 3


def test_missing_queue_exits_3(redis_url):
    for args in (['status', 'nope'], ['peek', 'nope'], ['dlq', 'list', 'nope'],
                 ['dlq', 'redrive', 'nope'], ['dlq', 'purge', 'nope', '--yes']):
        r = cli(redis_url, *args)
        assert r.returncode == 3, (args, r.stderr)
        assert "'nope' not found" in r.stderr or 'nope not found' in r.stderr


def test_unreachable_server_exits_1(free_port):
    url = f'redis://:secret@127.0.0.1:{free_port()}/0'
    r = cli(url, 'status')
    assert r.returncode == 1
    assert 'cannot connect to Redis at' in r.stderr and '127.0.0.1' in r.stderr
    assert 'secret' not in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('args', [
    [], ['frobnicate'], ['--priority-steps', '3,0', 'status'], ['peek'],
    ['dlq', 'show', 'q', 'not-an-id'], ['dlq', 'redrive', 'q', '--count', '1', '--id', '1-1'],
    ['status', '--watch', '0'],
])
def test_usage_errors_exit_2(redis_url, args):
    r = cli(redis_url, *args)
    assert r.returncode == 2, r.stderr
    assert 'usage:' in r.stderr


def test_unsupported_url_exits_2():
    r = cli('amqp://127.0.0.1//', 'status')
    assert r.returncode == 2 and 'unsupported URL' in r.stderr


def test_peek_shows_ready_messages_in_serving_order_without_consuming(work):
    url, _ = work
    before = cli_json(url, 'status', 'work')['queues'][0]
    found = cli_json(url, 'peek', 'work')
    assert [(m['level'], m['requeued'], m['body']) for m in found] == [
        (0, True, '{"n": 0}'), (3, False, '{"n": 3}'), (3, False, '[[2, 3], {}, {}]'),
        (9, False, '{"n": 4}')]
    celery = found[2]
    assert (celery['task'], celery['task_id'], celery['content_type']) == (
        'tasks.add', 'abc-123', 'application/json')
    assert [m['id'] for m in cli_json(url, 'peek', 'work', '-n', '2')] == [
        m['id'] for m in found[:2]]
    r = cli(url, 'peek', 'work')
    assert r.returncode == 0
    assert 'task tasks.add id abc-123' in r.stdout and 'requeued' in r.stdout
    assert 'body: {"n": 4}' in r.stdout
    after = cli_json(url, 'status', 'work')['queues'][0]
    assert counts(after) == counts(before)


def test_peek_shows_staged_messages_of_a_fair_queue(redis_url):
    """x-fairness: the staged messages come after their level's stream entries, marked
    staged, with no id or age (they have no entry until a read moves them)."""
    with Connection(redis_url, transport='kombu_streams.transport:Transport') as conn:
        q = Queue('fq', Exchange('fq'), 'fq', queue_arguments={'x-fairness': 'round-robin'})
        p = conn.Producer()
        for group in ('a', 'a', 'b'):
            p.publish({'g': group}, exchange=q.exchange, routing_key='fq', declare=[q],
                      headers={'x-group': group})
    found = cli_json(redis_url, 'peek', 'fq')
    assert [(m['body'], m['staged'], m['id'], m['age_ms']) for m in found] == [
        ('{"g": "a"}', True, '', None), ('{"g": "b"}', True, '', None),
        ('{"g": "a"}', True, '', None)]
    r = cli(redis_url, 'peek', 'fq')
    assert r.returncode == 0 and r.stdout.count("staged (x-fairness") == 3


def test_peek_shortens_and_decodes_bodies(redis_url):
    with Connection(redis_url, transport='kombu_streams.transport:Transport') as conn:
        q = Queue('big', Exchange('big'), 'big')
        p = conn.Producer()
        p.publish(b'x' * 500, exchange=q.exchange, routing_key='big', declare=[q],
                  content_type='text/plain', content_encoding='utf-8')
        p.publish(b'\xff\xfe', exchange=q.exchange, routing_key='big',
                  content_type='application/data', content_encoding='binary')
    found = cli_json(redis_url, 'peek', 'big')
    assert found[0]['body'] == 'x' * 77 + '...' and found[0]['size'] > 500
    assert found[1]['body'] == repr(b'\xff\xfe')


def dead_letters(redis_url):
    """Queue 'dq' with a ready message (level 0), and two dead letters: a malformed entry
    set aside by the read script, then a message (task t1, level 3) dead-lettered by hand."""
    c = redis.Redis.from_url(redis_url)
    b = broker(c)
    b.declare('dq')
    c.xadd(K.stream('dq', 0), {'junk': 'yes'})
    with Connection(redis_url, transport='kombu_streams.transport:Transport') as conn:
        q = Queue('dq', Exchange('dq'), 'dq')
        for i in range(2):
            conn.Producer().publish({'n': i}, exchange=q.exchange, routing_key='dq',
                                    declare=[q], priority=3 * i,
                                    headers={'task': f'tasks.t{i}', 'id': f'id-{i}'})
    # reads level 0 (one entry: the junk, set aside), then level 3: delivers n=1
    got = read_messages(b, ['dq'], 'tool', 1)
    assert got[0].level == 3
    b.dead_letter('dq', got[0].stream, got[0].entry_id, 'poison', got[0].deliveries)
    return c, b


def test_dlq_list_and_show(redis_url):
    c, _ = dead_letters(redis_url)
    data = cli_json(redis_url, 'dlq', 'list', 'dq')
    assert data['total'] == 2
    junk, poison = data['letters']
    assert (junk['reason'], junk['level'], junk['message'], junk['fields']) == (
        'malformed: no m field', 0, None, {'junk': 'yes'})
    assert (poison['reason'], poison['level'], poison['deliveries']) == ('poison', 3, 1)
    assert poison['message']['task'] == 'tasks.t1'
    r = cli(redis_url, 'dlq', 'list', 'dq')
    assert r.returncode == 0
    assert 'malformed: no m field' in r.stdout and 'tasks.t1' in r.stdout
    shown = cli_json(redis_url, 'dlq', 'show', 'dq', poison['id'])
    assert shown['message']['body'] == '{"n": 1}' and shown['origin_id'] == poison['origin_id']
    r = cli(redis_url, 'dlq', 'show', 'dq', poison['id'])
    assert 'reason: poison' in r.stdout and 'body: {"n": 1}' in r.stdout
    assert cli(redis_url, 'dlq', 'show', 'dq', '1-1').returncode == 3
    assert [d['id'] for d in cli_json(redis_url, 'dlq', 'list', 'dq', '-n', '1')['letters']] == [
        junk['id']]
    assert c.xlen(K.dlq('dq')) == 2


def test_dlq_redrive_by_id_count_and_all(redis_url):
    c, b = dead_letters(redis_url)
    junk, poison = cli_json(redis_url, 'dlq', 'list', 'dq')['letters']
    assert cli_json(redis_url, 'dlq', 'redrive', 'dq', '--count', '1') == {
        'queue': 'dq', 'moved': 0, 'skipped': 1, 'held': 0}  # the oldest holds no message
    assert cli_json(redis_url, 'dlq', 'redrive', 'dq', '--id', poison['id']) == {
        'queue': 'dq', 'moved': 1, 'skipped': 0, 'held': 0}
    assert counts(b.inspect('dq')) == {0: (1, 0, 0), 3: (1, 0, 0)}
    b.dead_letter('dq', K.stream('dq', 3), c.xrange(K.stream('dq', 3))[0][0], 'again', 1)
    r = cli(redis_url, 'dlq', 'redrive', 'dq')
    assert r.returncode == 0
    assert 'moved 1 dead letter(s) back to dq; 1 skipped' in r.stdout
    info = b.inspect('dq')
    assert counts(info) == {0: (1, 0, 0), 3: (1, 0, 0)} and info['dlq'] == 1


def test_dlq_redrive_holds_a_letter_whose_key_is_taken(redis_url):
    """A Kombu message with an x-unique-key, rejected to the dead letters; another with the
    key published since: the letter stays (held), and goes once that one is acked."""
    c = redis.Redis.from_url(redis_url)
    b = broker(c)
    with Connection(redis_url, transport='kombu_streams.transport:Transport',
                    transport_options={'dead_letter_rejected': True}) as conn:
        q = conn.SimpleQueue('uq')
        q.put({'n': 1}, headers={'x-unique-key': 'k1'})
        q.get(timeout=5).reject()
        q.put({'n': 2}, headers={'x-unique-key': 'k1'})  # the key is free: stored
        assert cli_json(redis_url, 'dlq', 'redrive', 'uq') == {
            'queue': 'uq', 'moved': 0, 'skipped': 0, 'held': 1}
        r = cli(redis_url, 'dlq', 'redrive', 'uq')
        assert 'moved 0 dead letter(s) back to uq; 1 held (their x-unique-key is taken: a ' \
               'live message holds it, or x-unique-ttl keeps it)' in r.stdout
        got = q.get(timeout=5)
        assert got.payload == {'n': 2}
        got.ack()
        q.close()
    assert b.redrive_all('uq') == (1, 0, 0)
    assert c.hget(K.unique('uq'), 'k:k1').startswith(b's:')


def test_dlq_purge(redis_url):
    c, b = dead_letters(redis_url)
    r = cli(redis_url, 'dlq', 'purge', 'dq')  # stdin is no terminal: needs --yes
    assert r.returncode == 2 and '--yes' in r.stderr
    assert c.xlen(K.dlq('dq')) == 2
    assert cli_json(redis_url, 'dlq', 'purge', 'dq', '--yes') == {'queue': 'dq', 'purged': 2}
    assert c.xlen(K.dlq('dq')) == 0
    assert b.inspect('dq')['ready'] == 1  # the queue itself is untouched
    r = cli(redis_url, 'dlq', 'purge', 'dq', '--yes')
    assert r.returncode == 0 and 'no dead letters' in r.stdout


def test_scripts_lists_every_script_with_a_ready_evalsha_line(redis_url):
    r = cli(None, 'scripts')  # needs no server
    assert r.returncode == 0, r.stderr
    for name, script in SCRIPTS.items():
        assert f'{name}  {script.sha}' in r.stdout
    assert "redis-cli EVALSHA {} 2 '<KEYS[1]>' '<KEYS[2]>' '<ARGV[1]>'".format(
        SCRIPTS['deadletter'].sha) in r.stdout
    docs = {d['name']: d for d in cli_json(None, 'scripts')}
    assert set(docs) == set(SCRIPTS)
    size = docs['size']
    assert size['keys'][0].startswith('KEYS[1..n]') and len(size['argv']) == 3
    assert size['template'] == (f"redis-cli EVALSHA {SCRIPTS['size'].sha} <numkeys> "
                                f"'<KEYS[1..n]>' '<ARGV[1]>' '<ARGV[2]>' '<ARGV[3]>'")
    assert docs['inspect']['summary'].startswith('a read-only snapshot of ONE queue')
    # --load puts them on the server, so the template works as printed
    assert cli(redis_url, 'scripts', '--load').returncode == 0
    c = redis.Redis.from_url(redis_url)
    c.xadd(K.stream('q', 0), {'m': 'x'})
    keys = K.streams('q', LEVELS)
    assert c.evalsha(SCRIPTS['size'].sha, len(keys), *keys, 'q', HOLDER) == 1
    # read-only scripts also get their Redis 7 flagged text loaded, and an EVALSHA_RO line
    flagged = SCRIPTS['inspect'].flagged
    assert docs['inspect']['flagged_sha'] == flagged.sha
    assert docs['inspect']['template_ro'].startswith(f'redis-cli EVALSHA_RO {flagged.sha} ')
    assert c.script_exists(flagged.sha) == [True]


def call_words(lua_dir, *args):
    """The JSON of ``scripts --call`` (offline, its flat script written to ``lua_dir``) and
    its EVALSHA line as command words."""
    data = cli_json(None, *args, '--lua-dir', str(lua_dir))
    words = shlex.split(data['evalsha'])
    assert words[:2] == ['redis-cli', 'EVALSHA'], data['evalsha']
    return data, words[1:]


def test_scripts_call_lines_run_as_the_transport_calls(redis_url, tmp_path):
    """Each printed EVALSHA line, run as printed (placeholders filled in), does what the
    script does; the keys and arguments are the Broker's builder's."""
    c = redis.Redis.from_url(redis_url)
    b = broker(c)
    b.declare('cq')
    assert cli(redis_url, 'scripts', '--load').returncode == 0
    data, words = call_words(tmp_path, 'scripts', '--call', 'publish', 'cq')
    assert data['keys'][:4] == [K.stream('cq', 0), K.wake('cq'), K.ready('cq'),
                                K.args('cq')] and len(data['keys']) == 7 + 1 + 1
    assert data['argv'][0].startswith('<PAYLOAD')
    entry = c.execute_command(*[w if not w.startswith('<PAYLOAD') else '{"n": 1}'
                                for w in words])
    assert [i for i, _ in c.xrange(K.stream('cq', 0))] == [entry]
    _, words = call_words(tmp_path, 'scripts', '--call', 'size', 'cq')
    assert c.execute_command(*words) == 1 == b.size('cq')
    _, words = call_words(tmp_path, 'scripts', '--call', 'peek', 'cq')
    assert c.execute_command(*words) == [0, b'', b'', 1, entry, 0, b'{"n": 1}']
    data, words = call_words(tmp_path, 'scripts', '--call', 'read', 'cq')
    assert data['argv'][:4] == ['kombu-streams-cli', '1', HOLDER, '20']
    reply = c.execute_command(*words)
    assert reply[5:] == [1, entry, 1, b'{"n": 1}']
    assert [(x['name'], x['pending']) for x in b.inspect('cq')['consumers']] == [
        ('kombu-streams-cli', 1)]
    _, words = call_words(tmp_path, 'scripts', '--call', 'ack', 'cq')
    assert '<ENTRY-ID>' in words
    assert c.execute_command(*[entry if w == '<ENTRY-ID>' else w for w in words]) == [1, 0]
    assert c.xlen(K.stream('cq', 0)) == 0
    # the --eval line runs the flat text it wrote (redis-cli, when installed)
    data = cli_json(None, 'scripts', '--call', 'size', 'cq', '--lua-dir', str(tmp_path))
    assert data['lua_file'] == str(tmp_path / 'size.lua')
    assert (tmp_path / 'size.lua').read_text() == SCRIPTS['size'].source
    words = shlex.split(data['eval'])
    assert words[:3] == ['redis-cli', '--eval', str(tmp_path / 'size.lua')]
    assert words[3:] == [*K.streams('cq', LEVELS), K.fair('cq'), ',', 'cq', HOLDER, '1']
    if shutil.which('redis-cli'):
        port = str(urlsplit(redis_url).port)
        r = subprocess.run(['redis-cli', '-p', port, *words[1:]], capture_output=True,
                           text=True, timeout=30)
        assert r.stdout.strip() == '0', r
    # the app's prefix and priority steps name the keys
    data, words = call_words(tmp_path, '--prefix', 'app1:', '--priority-steps', '0,5', 'scripts',
                             '--call', 'read', 'cq')
    assert data['keys'][:2] == Keys('app1:').streams('cq', [0, 5]) and words[2] == '14'
    r = cli(None, 'scripts', '--call', 'read', 'cq', '--lua-dir', str(tmp_path))
    assert r.returncode == 0 and 'redis-cli --eval ' in r.stdout
    assert f"redis-cli EVALSHA {SCRIPTS['read'].sha} 16 'ks:q:{{cq}}:0' " in r.stdout


@pytest.mark.parametrize('name', ['bind', 'migrate', 'nope'])
def test_scripts_call_refuses_what_a_queue_does_not_determine(name):
    r = cli(None, 'scripts', '--call', name, 'q')
    assert r.returncode == 2 and 'scripts --call' in r.stderr, r.stderr


def transport_calls(b, queue, expires=None):
    """Each script ``scripts --call`` offers, with the call the transport sends for
    ``queue`` (its defaults; placeholders where a queue does not tell), laid out by the
    same builder the channel and the lease keeper use."""
    s0, me = b.keys.stream(queue, b.levels[0]), 'kombu-streams-cli'
    lease = int(Channel.visibility_timeout * 1000)
    ttls = {queue: expires} if expires else {}
    return {
        'read': b.read_call(b.sources([queue]), me, 1, Channel.max_deliveries, ttls)[0],
        'publish': b.publish_call(queue, b.levels[0], CALL_PAYLOAD, delay=Delay()),
        'ack': b.ack_call(queue, [(s0, '<ENTRY-ID>')], None, me),
        'requeue': b.requeue_call(queue, [(s0, '<ENTRY-ID>', -1)], None, me),
        'renew': b.renew_call(queue, me, s0, ['<ENTRY-ID>']),
        'deadletter': b.dead_letter_call(queue, s0, '<ENTRY-ID>', '<REASON>', 1, None, me),
        'reclaim': b.reclaim_call(queue, lease, Channel.reclaim_batch, None,
                                  consumer_expiry_ms(lease))[0],  # as the lease keeper
        'purge': b.purge_call(queue, Channel.purge_batch),
        'delete': b.delete_call(queue),
        'cancel': b.cancel_call(queue, ['<TASK-ID>']),
        'redrive': b.redrive_call(queue, 1),
        'dlq_purge': b.dlq_purge_call(queue, '<LAST-ID>', PAGE),
        'scheduled': b.scheduled_call(queue)[0],
        'peek': b.peek_call(queue)[0],
        'inspect': b.inspect_call(queue)[0],
        'size': b.size_call(queue),
        'declare': b.declare_call(queue),
        'limits': b.limits_call(queue),
        'touch': b.touch_call(queue, expires or 0),
        'wake': b.give_back_call([(queue, None)]),  # as Channel.give_back
        'leave': b.leave_call(queue, me),  # as Channel._leave
    }


CALL_PAYLOAD = '<PAYLOAD: a Kombu message envelope (JSON)>'


def printed_call(capsys, *args):
    """Run ``kombu-streams scripts --call ...`` in this process; its note and, parsed from
    the printed redis-cli lines, (sha, keys, argv) of the EVALSHA line, of the --eval line
    and of the EVALSHA_RO line (None when there is none)."""
    assert main(['scripts', '--call', *args]) == 0
    lines = capsys.readouterr().out.splitlines()

    def evalsha(prefix):
        found = [shlex.split(x) for x in lines if x.startswith(prefix)]
        if not found:
            return None
        [words] = found
        n = int(words[3])
        return words[2], words[4:4 + n], words[4 + n:]

    [evaluate] = [shlex.split(x) for x in lines if x.startswith('redis-cli --eval ')]
    path, rest = Path(evaluate[2]), evaluate[3:]
    split = rest.index(',') if ',' in rest else len(rest)
    return (lines[0], evalsha('redis-cli EVALSHA '),
            (path.stem, rest[:split], rest[split + 1:]), evalsha('redis-cli EVALSHA_RO '))


@pytest.mark.parametrize('expires', [None, 60_000])
def test_scripts_call_prints_the_builders_call_for_every_script_it_offers(
        capsys, monkeypatch, tmp_path, expires):
    """The KEYS and ARGV of each printed line are the builder's, with the values the
    transport passes: a queue's x-expires only where the transport sends it (read's ttl,
    touch), the lease keeper's consumer expiry for reclaim."""
    monkeypatch.delenv('KOMBU_STREAMS_URL', raising=False)
    expected = transport_calls(Broker(None, K, LEVELS), 'q', expires)
    assert set(expected) == set(CALLS)  # every script offered is checked
    for name, (script, keys, argv) in expected.items():
        if expires is None and name == 'touch':
            continue  # refused: see test_scripts_call_touch_needs_the_queues_x_expires
        more = ['--expires', str(expires)] if expires and name in ('read', 'touch') else []
        _, sha_call, eval_call, ro_call = printed_call(capsys, name, 'q', '--lua-dir',
                                                       str(tmp_path), *more)
        want = ([text(k) for k in keys], [text(a) for a in argv])
        assert sha_call == (script.sha, *want), name
        assert eval_call == (name, *want), name
        assert (tmp_path / f'{name}.lua').read_text() == script.source
        if script.flags:
            assert ro_call == (script.flagged.sha, *want), name
        else:
            assert ro_call is None, name


def test_scripts_call_touch_needs_the_queues_x_expires(capsys, monkeypatch, tmp_path):
    """A channel touches only queues declared with x-expires, with that ttl: without one
    there is no touch call to print (no made-up ttl that would expire a permanent queue)."""
    monkeypatch.delenv('KOMBU_STREAMS_URL', raising=False)
    assert main(['scripts', '--call', 'touch', 'q', '--lua-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'only a queue declared with x-expires' in err and '--expires' in err
    note, (_, _, argv), _, _ = printed_call(capsys, 'touch', 'q', '--expires', '90000',
                                            '--lua-dir', str(tmp_path))
    assert argv == ['90000'] and 'ttl 90000 ms' in note
    for args in (['--call', 'size', 'q', '--expires', '5'], ['--expires', '5']):
        assert main(['scripts', *args, '--lua-dir', str(tmp_path)]) == 2
        assert '--expires' in capsys.readouterr().err


def test_scripts_call_delete_says_dead_letters_stay_and_they_do(redis_url, capsys, tmp_path):
    """delete.lua keeps a dead-letter stream that holds letters: the note says so, and the
    printed line, run, does so."""
    c = redis.Redis.from_url(redis_url)
    b = broker(c)
    b.declare('dq')
    b.publish('dq', 0, 'x')
    c.xadd(K.dlq('dq'), {'reason': 'kept'})
    b.load_scripts()
    note, (sha, keys, argv), _, _ = printed_call(capsys, 'delete', 'dq', '--lua-dir',
                                                 str(tmp_path))
    assert 'dead-letter stream only when it is empty' in note and 'letters stay' in note
    assert c.evalsha(sha, len(keys), *keys, *argv) == 6  # four streams, marker, index
    assert c.keys('*') == [K.dlq('dq').encode()] and c.xlen(K.dlq('dq')) == 1


def test_python_dash_m_runs_the_command(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'kombu_streams.cli', 'scripts', '--call', 'size',
                        'q', '--lua-dir', str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"redis-cli EVALSHA {SCRIPTS['size'].sha} 5 " in r.stdout


# -- global options: before or after the command -------------------------------------------

#: Each global option, two values it takes as typed and as parsed, and its default.
GLOBALS = [
    ('--url', ['redis://h1:1/0', 'redis://h2:2/0'], ['redis://h1:1/0', 'redis://h2:2/0'],
     'redis-streams://127.0.0.1:6379/0'),
    ('--master-name', ['m1', 'm2'], ['m1', 'm2'], None),
    ('--sentinel-password', ['p1', 'p2'], ['p1', 'p2'], None),
    ('--prefix', ['a:', 'b:'], ['a:', 'b:'], ''),
    ('--priority-steps', ['0,5', '0,2,4'], [[0, 5], [0, 2, 4]], [0, 3, 6, 9]),
    ('--json', [None, None], [True, True], False),
]


@pytest.mark.parametrize('option, typed, parsed, default', GLOBALS,
                         ids=[g[0] for g in GLOBALS])
@pytest.mark.parametrize('command', [['status', 'q'], ['dlq', 'list', 'q'],
                                     ['scripts', '--call', 'size', 'q']],
                         ids=['status', 'dlq list', 'scripts'])
def test_global_option_before_or_after_the_command(monkeypatch, option, typed, parsed,
                                                   default, command):
    """Before the command, after it, or both: given twice, the value after the command
    wins (it is the one nearer the command, as for any option repeated)."""
    for name in ('URL', 'MASTER_NAME', 'SENTINEL_PASSWORD'):
        monkeypatch.delenv(f'KOMBU_STREAMS_{name}', raising=False)
    dest = option[2:].replace('-', '_')

    def given(i):
        return [option] + ([typed[i]] if typed[i] is not None else [])

    def value(argv):
        return getattr(parsing.parser().parse_args(argv), dest)

    assert value(command) == default
    assert value(given(0) + command) == parsed[0]
    assert value(command + given(0)) == parsed[0]
    assert value(given(0) + command + given(1)) == parsed[1]
    if command[0] == 'dlq':  # between the command and its action, too
        assert value(['dlq', *given(0), 'list', 'q']) == parsed[0]
        assert value(['dlq', *given(0), 'list', 'q', *given(1)]) == parsed[1]
    # the other global options keep their defaults
    others = {g[0][2:].replace('-', '_'): g[3] for g in GLOBALS if g[0] != option}
    args = parsing.parser().parse_args(command + given(0))
    assert {k: getattr(args, k) for k in others} == others


def test_global_options_after_the_command_reach_the_server(work):
    url, _ = work
    r = cli(None, 'status', 'work', '--url', url, '--json')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['queues'][0]['ready'] == 4
    # given before and after, the one after wins: the first names no server
    r = cli('redis://127.0.0.1:1/0', 'status', 'work', '--json', '--url', url)
    assert r.returncode == 0, r.stderr
    r = cli(url, 'dlq', 'list', 'work', '--url', 'redis://127.0.0.1:1/0')
    assert r.returncode == 1 and 'cannot connect' in r.stderr


# -- read-only snapshots: replicas and OOM -------------------------------------------------


def test_inspect_runs_on_a_replica_and_under_oom(redis_server, tmp_path):
    """inspect / inspect_fanout run as no-writes scripts (EVALSHA_RO) on Redis 7: on a
    read-only replica, and on a primary that is out of memory with noeviction."""
    import redis as redis_py
    from conftest import HOST, start_redis, stop_redis, wait_until

    primary = redis_py.Redis.from_url(redis_server.url)
    primary.flushall()
    b = Broker(primary, Keys(), [0, 3, 6, 9])
    b.declare('ro')
    b.publish('ro', 3, b'{"body": "x"}')
    b.bind('x', '\x06\x16\x06\x16ro', 0, fanout_group='ro')
    proc, port = start_redis(redis_server.binary, tmp_path,
                             ['--replicaof', HOST, redis_server.port])
    replica = redis_py.Redis(host=HOST, port=port)
    try:
        wait_until(lambda: replica.info('replication').get('master_link_status') == 'up'
                   and replica.exists(Keys().stream('ro', 3)), 10, 'the replica to sync')
        on_replica = Broker(replica, Keys(), [0, 3, 6, 9])
        assert on_replica.inspect('ro')['ready'] == 1
        assert on_replica.inspect_fanout('x')['exists']
        assert replica.script_exists(SCRIPTS['inspect'].flagged.sha) == [True]
        with pytest.raises(redis_py.ReadOnlyError):  # what a script that writes would meet
            replica.set('k', 'v')
    finally:
        replica.close()
        stop_redis(proc)
    before = primary.config_get('maxmemory')['maxmemory']
    primary.config_set('maxmemory', '1')
    try:
        with pytest.raises(redis_py.exceptions.OutOfMemoryError):
            primary.set('k', 'v')
        assert b.inspect('ro')['ready'] == 1
        assert b.inspect_fanout('x')['exists']
    finally:
        primary.config_set('maxmemory', before)
        primary.close()


def test_status_limit_text_names_every_argument_it_knows():
    """The status table's LIMIT column: each stored argument says itself (none left out)."""
    from kombu_streams.cli.commands.status import limit_text
    info = {'limits': {'x-max-length': 10, 'x-overflow': 'reject-publish',
                       'x-max-length-bytes': 65536,
                       'x-message-ttl': 5000, 'x-requeue-delay': '1000,60000',
                       'x-priority-aging': 30000, 'x-group-max-in-flight': 2},
            'counters': {'expired': 2, 'waiting-bytes': 5120}}
    assert limit_text(info) == ('10 reject-publish, 5120/65536 bytes reject-publish, '
                                'ttl 5000ms, 2 expired, '
                                'backoff 1000,60000ms, aging 30000ms, per group 2 in flight')
    assert limit_text({}) == '-'
