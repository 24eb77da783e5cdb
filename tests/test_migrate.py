"""``kombu-streams migrate``: from Kombu's Redis transport (lists) into our streams.

migrate.lua and migrate_unacked.lua are tested like every script, on fakeredis, Redis 7.0 and
Redis 6.2, through ``Broker``. The command runs as a subprocess (the installed console
script) on a real redis-server whose queues were filled by Kombu's own Redis transport, and
the result is consumed with kombu-streams.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_until
from helpers import read_messages
from kombu import Connection, Exchange, Queue

import kombu_streams  # noqa: F401  (registers redis-streams://)
from kombu_streams.broker import Broker
from kombu_streams.keys import Keys
from kombu_streams.migrate import SEP, kombu_priority, list_target
from kombu_streams.scripts import KeyTypeError

K = Keys()
LEVELS = [0, 3, 6, 9]
CLI = Path(sys.executable).parent / 'kombu-streams'


def envelope(n, priority=None, **extra):
    """A Kombu envelope as Kombu's Redis transport stores it, with body n. No body_encoding:
    the body is kept as it is, which every Kombu reads ('utf-8' is a name only Kombu 5.7
    knows; older Kombu fails to decode it)."""
    props = {'delivery_info': {'exchange': 'q', 'routing_key': 'q'}}
    if priority is not None:
        props['priority'] = priority
    msg = {'body': json.dumps({'n': n}), 'content-type': 'application/json',
           'content-encoding': 'utf-8', 'headers': {}, 'properties': props, **extra}
    return json.dumps(msg)


def body(raw):
    return json.loads(json.loads(raw)['body'])['n']


def stream_bodies(c, key):
    return [body(f[b'm']) for _, f in c.xrange(key)]


# -- migrate.lua ---------------------------------------------------------------------------------


def test_migrate_list_moves_oldest_first_in_batches_and_wakes(script_client):
    c = script_client
    b = Broker(c, K, LEVELS)
    b.declare('q')
    for n in range(5):
        c.lpush('q\x06\x163', envelope(n, priority=4))  # Kombu LPUSHes: oldest at the right
    assert b.migrate_list('q\x06\x163', 'q', 3, 2) == (2, 0, 3, 3, [])
    assert stream_bodies(c, K.stream('q', 3)) == [0, 1]
    assert c.zcard(K.wake('q')) == 1
    assert b.migrate_list('q\x06\x163', 'q', 3, 10, 3) == (3, 0, 0, 0, [])
    assert stream_bodies(c, K.stream('q', 3)) == [0, 1, 2, 3, 4]
    assert c.exists('q\x06\x163') == 0
    assert b.migrate_list('q\x06\x163', 'q', 3, 10) == (0, 0, 0, 0, [])
    # the envelope is stored unchanged
    assert c.xrange(K.stream('q', 3))[0][1] == {b'm': envelope(0, priority=4).encode()}
    got = [read_messages(b, ['q'], 'c1', 1)[0].payload for _ in range(5)]
    assert got[2] == envelope(2, 4).encode()


def test_migrate_list_levels_follow_each_message_priority(script_client):
    """Our levels [0, 5] differ from Kombu's steps: a list of Kombu step 3 holds priorities
    3..5, which land in levels 0 and 5; one without a readable priority goes to the list's."""
    c = script_client
    b = Broker(c, K, [0, 5])
    b.declare('q')
    for n, p in enumerate([3, 4, 5, '5', 7.9, None, 'high', -2, 42, True]):
        c.lpush('q\x06\x163', envelope(n, priority=p))
    c.lpush('q\x06\x163', json.dumps({'body': 'x', 'properties': {}}))  # none: level 0
    assert b.migrate_list('q\x06\x163', 'q', 0, 100)[:3] == (11, 0, 0)
    assert stream_bodies(c, K.stream('q', 5)) == [2, 3, 4, 8]
    level0 = [f[b'm'] for _, f in c.xrange(K.stream('q', 0))]
    assert [body(m) for m in level0[:-1]] == [0, 1, 5, 6, 7, 9]
    assert json.loads(level0[-1])['body'] == 'x'
    b = Broker(c, K, [0, 3, 6, 9])
    c.lpush('r\x06\x166', envelope(0), envelope(1, priority=None))
    b.declare('r')
    assert b.migrate_list('r\x06\x166', 'r', 6, 10)[0] == 2
    assert stream_bodies(c, K.stream('r', 6)) == [0, 1]  # LPUSH a, b: a is oldest


def test_migrate_list_leaves_malformed_entries_in_place(script_client):
    c = script_client
    b = Broker(c, K, LEVELS)
    b.declare('q')
    for item in [envelope(0), 'not json', envelope(1), '[1, 2]', '{"no": "body"}',
                 '{"body": "", "properties": "nope"}', envelope(2)]:
        c.lpush('q', item)
    moved, kept, left, todo, bad = b.migrate_list('q', 'q', 0, 2)
    assert (moved, kept, left, todo, bad) == (1, 1, 6, 5, [b'not json'])
    moved, kept, left, todo, bad = b.migrate_list('q', 'q', 0, 10, todo)
    assert (moved, kept, left, todo) == (2, 3, 4, 0)
    assert bad == [b'[1, 2]', b'{"no": "body"}', b'{"body": "", "properties": "nope"}']
    assert stream_bodies(c, K.stream('q', 0)) == [0, 1, 2]
    # the malformed ones are still there, oldest at the right end, in their order
    malformed = [b'{"body": "", "properties": "nope"}', b'{"no": "body"}', b'[1, 2]',
                 b'not json']
    assert c.lrange('q', 0, -1) == malformed
    assert b.migrate_list('q', 'q', 0, 10, 0) == (0, 0, 4, 0, [])  # the run has seen all
    c.lpush('q', envelope(3))  # a newer message behind them moves in the next run
    assert b.migrate_list('q', 'q', 0, 10) == (1, 4, 4, 0, malformed[::-1])
    assert c.lrange('q', 0, -1) == malformed
    assert stream_bodies(c, K.stream('q', 0)) == [0, 1, 2, 3]


def test_migrate_list_never_reads_an_entry_twice_in_a_run(script_client, monkeypatch):
    """Malformed entries used to stay at the list's oldest end, so every later call read
    them again (LRANGE of all S kept + count) and pushed them back: a list of 100,000 such
    entries cost 100,000 reads and writes per call. Each call now reads only the count
    oldest entries this run has not looked at."""
    c = script_client
    b = Broker(c, K, LEVELS)
    b.declare('q')
    items = [envelope(0), 'bad 1', 'bad 2', envelope(1), 'bad 3', envelope(2), 'bad 4']
    for item in items:
        c.lpush('q', item)
    seen, todo, rounds = [], -1, 0
    while todo:
        before = c.lrange('q', 0, -1)
        moved, kept, left, todo, bad = b.migrate_list('q', 'q', 0, 2, todo)
        n = moved + kept
        assert n == (2 if rounds < 3 else 1) and left == len(before) - moved
        # this call's window was the n oldest entries, none met before
        assert not set(before[-n:]) & set(seen)
        seen += before[-n:][::-1]
        rounds += 1
    assert rounds == 4 and seen == [i.encode() for i in items[:-1]] + [b'bad 4']
    assert stream_bodies(c, K.stream('q', 0)) == [0, 1, 2]
    assert c.lrange('q', 0, -1) == [b'bad 4', b'bad 3', b'bad 2', b'bad 1']


def test_migrate_list_checks_types_before_writing(script_client):
    """Redis keeps a failed script's earlier writes: a stream key of another type must be
    found before the list is touched, or the messages taken from it would be lost."""
    c = script_client
    b = Broker(c, K, LEVELS)
    c.lpush('q', envelope(0, priority=0), envelope(1, priority=9), 'junk')
    c.set(K.stream('q', 9), 'someone else')
    before = c.lrange('q', 0, -1)
    with pytest.raises(KeyTypeError):
        b.migrate_list('q', 'q', 0, 10)
    assert c.lrange('q', 0, -1) == before and not c.exists(K.stream('q', 0))


def test_migrate_list_with_prefix_keys(script_client):
    c = script_client
    keys = Keys('app:')
    b = Broker(c, keys, LEVELS)
    b.declare('q')
    c.lpush('app:q', envelope(0))
    assert b.migrate_list('app:q', 'q', 0, 5)[0] == 1
    assert stream_bodies(c, 'app:ks:q:{q}:0') == [0]
    assert c.zcard('app:ks:q:{q}:wake') == 1


# -- migrate_unacked.lua -------------------------------------------------------------------------


def test_migrate_unacked_moves_atomically_and_only_an_unchanged_entry(script_client):
    c = script_client
    b = Broker(c, K, LEVELS)
    for q in ('a', 'b'):
        b.declare(q)
    raw = json.dumps([json.loads(envelope(7, priority=6)), 'ex', 'rk'])
    c.hset('unacked', 'tag1', raw)
    c.zadd('unacked_index', {'tag1': 1.5, 'tag2': 2.5})
    c.hset('unacked', 'tag2', raw)
    assert b.migrate_unacked('unacked', 'unacked_index', 'tag1', raw + ' ', 'P',
                             [('a', 6)]) is False  # changed since read: nothing written
    assert c.xlen(K.stream('a', 6)) == 0 and c.hexists('unacked', 'tag1')
    assert b.migrate_unacked('unacked', 'unacked_index', 'tag1', raw, 'P',
                             [('a', 6), ('b', 6)]) is True
    assert [f for _, f in c.xrange(K.stream('a', 6))] == [{b'm': b'P'}]
    assert [f for _, f in c.xrange(K.stream('b', 6))] == [{b'm': b'P'}]
    assert c.zcard(K.wake('a')) == 1 and c.zcard(K.wake('b')) == 1
    assert c.hkeys('unacked') == [b'tag2'] and c.zrange('unacked_index', 0, -1) == [b'tag2']
    assert b.migrate_unacked('unacked', 'unacked_index', 'tag1', raw, 'P', [('a', 6)]) is False
    assert c.xlen(K.stream('a', 6)) == 1


def test_migrated_messages_are_in_the_ready_index(script_client):
    """Consumers already running (their reads made the ready index complete, so a read looks
    only at the streams it names): messages migrated in are found by the next plain read,
    not only by the periodic walk."""
    c = script_client
    b = Broker(c, K, LEVELS)
    b.declare('q')
    # the index is complete and names nothing
    assert read_messages(b, ['q'], 'c1', 5, walk=True) == []
    c.lpush('q\x06\x163', envelope(1, priority=4))
    raw = json.dumps([json.loads(envelope(2, priority=9)), 'ex', 'rk'])
    c.hset('unacked', 'tag', raw)
    assert b.migrate_list('q\x06\x163', 'q', 3, 10)[0] == 1
    assert b.migrate_unacked('unacked', 'unacked_index', 'tag', raw, envelope(2, 9),
                             [('q', 9)])
    got = read_messages(b, ['q'], 'c1', 5)  # not a walk
    assert sorted(body(d.payload) for d in got) == [1, 2]


def test_python_mirror_of_the_level_choice():
    """The dry run's prediction (Python) follows the same rules as migrate.lua."""
    assert [kombu_priority({'properties': {'priority': p}}) for p in
            (3, '5', 7.9, -2, 42, True, None, 'x', float('nan'))] == [
        3, 5, 7, 0, 9, 1, None, None, None]
    assert list_target(envelope(0, 4), [0, 5], 0) == 0
    assert list_target(envelope(0, 5), [0, 5], 0) == 5
    assert list_target(envelope(0), [0, 5], 5) == 5
    assert list_target('not json', LEVELS, 0) is None
    assert list_target('{"no": "body"}', LEVELS, 0) is None
    assert list_target('{"body": 1, "properties": 5}', LEVELS, 0) is None


# -- the command, on Kombu's own Redis transport -------------------------------------------------


def cli(url, *args):
    if not CLI.exists():
        pytest.fail(f'{CLI} is missing: pip install -e . to get the console script')
    env = {k: v for k, v in os.environ.items() if k != 'KOMBU_STREAMS_URL'}
    return subprocess.run([str(CLI), '--url', url, *args], capture_output=True, text=True,
                          timeout=120, env=env)


def cli_json(url, *args, code=0):
    r = cli(url, '--json', *args)
    assert r.returncode == code, r.stderr
    return json.loads(r.stdout)


def kombu_fill(url, queue='work', counts=None, options=None, exchange=None, rk=None):
    """Publish with Kombu's Redis transport: counts = {priority: how many}; bodies are
    {'p': priority, 'i': index within that priority}, published round robin."""
    counts = counts or {0: 4, 2: 3, 4: 5, 7: 3, 9: 2}
    with Connection(url, transport_options=options or {}) as conn:
        ex = exchange or Exchange(queue)
        q = Queue(queue, ex, rk or queue)
        p = conn.Producer()
        for i in range(max(counts.values())):
            for pri, n in counts.items():
                if i < n:
                    p.publish({'p': pri, 'i': i}, exchange=ex, routing_key=rk or queue,
                              declare=[q], priority=pri)
    return counts


def kombu_crash_holding(url, queue, n, options=None):
    """A Kombu worker takes n messages without acking and dies: they stay in `unacked`."""
    code = textwrap.dedent(f'''
        import json, os
        from kombu import Connection, Exchange, Queue
        with Connection({url!r}, transport_options={options or {}!r}) as conn:
            q = Queue({queue!r}, Exchange({queue!r}), {queue!r})(conn.default_channel)
            got = [q.get(no_ack=False) for _ in range({n})]
            print(json.dumps([m.payload for m in got]), flush=True)
            os._exit(0)
    ''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def streams_url(url):
    return url.replace('redis://', 'redis-streams://', 1)


def drain(url, queue, options=None):
    """Everything in our queue, consumed (and acked) one by one with kombu-streams:
    [(payload, marked redelivered)] in delivery order."""
    out = []
    with Connection(streams_url(url), transport_options=options or {}) as conn:
        q = Queue(queue, Exchange(queue), queue)(conn.default_channel)
        q.declare()
        while True:
            m = q.get(no_ack=False)
            if m is None:
                return out
            out.append((m.payload, bool(m.headers.get('redelivered'))))
            m.ack()


def check_served(got, counts, held=()):
    """Every message exactly once; highest priority (lowest level) first; within a level the
    held (restored unacked) ones first, then the rest in publish order."""
    payloads = [p for p, _ in got]
    assert sorted(map(json.dumps, payloads)) == sorted(
        json.dumps({'p': p, 'i': i}) for p, n in counts.items() for i in range(n))
    levels = [LEVELS[sum(1 for s in LEVELS if s <= p['p']) - 1] for p in payloads]
    assert levels == sorted(levels)
    for level in set(levels):
        mine = [p for p, lv in zip(payloads, levels) if lv == level]
        first = [p for p in mine if p in held]
        assert mine[:len(first)] == first
        rest = mine[len(first):]
        for pri in {p['p'] for p in rest}:
            assert [p['i'] for p in rest if p['p'] == pri] == sorted(
                p['i'] for p in rest if p['p'] == pri)


def test_migrate_everything_with_unacked_exactly_once(redis_url, redis_client):
    counts = kombu_fill(redis_url)
    held = kombu_crash_holding(redis_url, 'work', 3)  # the 3 oldest of Kombu's list 0
    assert held == [{'p': 0, 'i': 0}, {'p': 2, 'i': 0}, {'p': 0, 'i': 1}]
    assert redis_client.hlen('unacked') == 3
    r = cli(redis_url, 'migrate')
    assert r.returncode == 0, r.stderr
    assert 'moved 17 message(s) to work (3 unacked restored)' in r.stdout
    assert 'stop every worker' in r.stderr and '\r' not in r.stderr  # no progress off a TTY
    assert redis_client.hlen('unacked') == 0 and redis_client.zcard('unacked_index') == 0
    assert not [k for k in redis_client.keys('work*')]  # all of Kombu's lists are drained
    got = drain(redis_url, 'work')
    check_served(got, counts, held)
    assert [p for p, redelivered in got if redelivered] == held
    assert got[:3] == [(h, True) for h in held]  # served first, as Kombu's restore does
    again = cli_json(redis_url, 'migrate')
    assert again['moved'] == 0 and again['left'] == []


def test_dry_run_changes_nothing_and_predicts_the_run(redis_url, redis_client):
    kombu_fill(redis_url, counts={0: 2, 4: 3, 5: 1, 9: 1})
    kombu_crash_holding(redis_url, 'work', 1)
    redis_client.lpush('work\x06\x163', 'garbage')
    before = {k: redis_client.dump(k) for k in redis_client.keys('*')}
    plan = cli_json(redis_url, '--priority-steps', '0,5', 'migrate', '--dry-run')
    assert {k: redis_client.dump(k) for k in redis_client.keys('*')} == before
    (work,) = plan['queues']
    assert work['unacked'] == 1 and plan['would_move'] == 7
    assert [(x['priority'], x['length'], x['levels'], x['malformed'])
            for x in work['lists']] == [(0, 1, {'0': 1}, 0), (3, 5, {'0': 3, '5': 1}, 1),
                                        (9, 1, {'5': 1}, 0)]
    r = cli(redis_url, '--priority-steps', '0,5', 'migrate', '--dry-run')
    assert r.returncode == 0 and 'nothing was changed' in r.stdout
    assert 'priority 3' in r.stdout and '3 -> 0, 1 -> 5' in r.stdout
    done = cli_json(redis_url, '--priority-steps', '0,5', 'migrate', code=1)
    assert done['moved'] == 7
    info = Broker(redis_client, K, [0, 5]).inspect('work')
    assert {lv['level']: lv['ready'] for lv in info['levels']} == {0: 5, 5: 2}


def test_interrupted_run_continues_without_loss_or_duplicates(redis_url, redis_client):
    counts = kombu_fill(redis_url)
    held = kombu_crash_holding(redis_url, 'work', 2)
    first = cli_json(redis_url, 'migrate', '--batch', '1', '--limit', '6')
    assert first['moved'] == 6 and first['limited'] is True
    assert redis_client.hlen('unacked') == 0  # the unacked ones went first
    assert Broker(redis_client, K, LEVELS).size('work') == 6
    assert sum(redis_client.llen(k) for k in redis_client.keys('work*')) == 15 - 4
    second = cli_json(redis_url, 'migrate', '--batch', '4', '--limit', '3')
    assert second['moved'] == 3
    rest = cli_json(redis_url, 'migrate', '--batch', '2')
    assert rest['moved'] == 17 - 9 and rest['limited'] is False
    assert cli_json(redis_url, 'migrate')['moved'] == 0
    check_served(drain(redis_url, 'work'), counts, held)


def test_killed_run_continues_without_loss_or_duplicates(redis_url, redis_client):
    """SIGKILL at an arbitrary moment: every batch is one script, so a re-run still ends
    with each message exactly once."""
    counts = kombu_fill(redis_url, counts={0: 300, 6: 200})
    proc = subprocess.Popen([str(CLI), '--url', redis_url, 'migrate', '--batch', '1'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: redis_client.xlen(K.stream('work', 0)) > 0, 30, 'first batch moved')
    proc.kill()
    proc.wait(10)
    cli_json(redis_url, 'migrate')
    check_served(drain(redis_url, 'work'), counts)


def test_malformed_list_entry_is_reported_and_left_in_place(redis_url, redis_client):
    counts = kombu_fill(redis_url, counts={0: 3})
    redis_client.lpush('work', 'definitely not json')
    redis_client.rpush('work', '{"oldest": "but no body"}')
    r = cli(redis_url, 'migrate')
    assert r.returncode == 1
    assert 'moved 3 message(s) to work' in r.stdout
    assert 'left work: not a Kombu message: definitely not json' in r.stderr
    assert 'left work: not a Kombu message: {"oldest": "but no body"}' in r.stderr
    assert redis_client.lrange('work', 0, -1) == [b'definitely not json',
                                                  b'{"oldest": "but no body"}']
    check_served(drain(redis_url, 'work'), counts)
    again = cli_json(redis_url, 'migrate', code=1)  # still there, still reported, no loop
    assert again['moved'] == 0 and len(again['left']) == 2


def test_global_keyprefix_on_both_sides(redis_url, redis_client):
    opts = {'global_keyprefix': 'app:'}
    counts = kombu_fill(redis_url, counts={0: 2, 3: 2, 9: 1}, options=opts)
    held = kombu_crash_holding(redis_url, 'work', 1, options=opts)
    assert redis_client.hlen('app:unacked') == 1 and redis_client.exists('app:work\x06\x163')
    assert cli_json(redis_url, 'migrate')['queues'] == []  # no prefix: nothing of ours
    data = cli_json(redis_url, '--prefix', 'app:', 'migrate')
    assert data['moved'] == 5 and data['queues'][0]['unacked'] == 1
    assert redis_client.exists('app:ks:q:{work}:0') and not redis_client.exists('app:unacked')
    check_served(drain(redis_url, 'work', options=opts), counts, held)
    # the Kombu app's prefix may differ from ours
    kombu_fill(redis_url, counts={0: 1}, options={'global_keyprefix': 'old:'})
    data = cli_json(redis_url, '--prefix', 'app:', 'migrate', '--kombu-prefix', 'old:')
    assert data['moved'] == 1 and redis_client.xlen('app:ks:q:{work}:0') == 1


def test_named_queues_topic_routing_and_shared_unacked(redis_url, redis_client):
    """Only the named queues move; an unacked message Kombu would restore to a queue that is
    not being migrated too stays where it is, reported."""
    topic = Exchange('events', type='topic')
    kombu_fill(redis_url, 'alpha', {0: 2}, exchange=topic, rk='a.one')
    kombu_fill(redis_url, 'beta', {0: 1}, exchange=topic, rk='b.one')
    with Connection(redis_url) as conn:  # bind both to one more routing key
        for name, key in (('alpha', 'all.*'), ('beta', 'all.*')):
            Queue(name, topic, key)(conn.default_channel).declare()
        conn.Producer().publish({'p': 0, 'i': 9}, exchange=topic, routing_key='all.x')
    entries = {
        't1': [json.loads(envelope(1)), 'events', 'a.one'],    # alpha only
        't2': [json.loads(envelope(2)), 'events', 'all.x'],    # alpha and beta
        't3': [json.loads(envelope(3)), 'events', 'nowhere'],  # no binding
        't4': 'not json',
    }
    for tag, value in entries.items():
        redis_client.hset('unacked', tag, value if isinstance(value, str) else json.dumps(value))
    data = cli_json(redis_url, 'migrate', 'alpha', '--batch', '1', code=1)
    assert [q['queue'] for q in data['queues']] == ['alpha']
    assert data['moved'] == 4 and data['queues'][0]['unacked'] == 1
    assert [x['where'] for x in data['left']] == ['unacked t2']
    assert 'not migrated: beta' in data['left'][0]['reason']
    assert redis_client.llen('beta') == 2 and sorted(redis_client.hkeys('unacked')) == [
        b't2', b't3', b't4']
    everything = cli_json(redis_url, 'migrate', code=1)  # now beta too
    assert everything['moved'] == 3  # beta's 2 and t2 into both queues
    assert sorted(x['where'] for x in everything['left']) == ['unacked t3', 'unacked t4']
    alpha = [p for p, _ in drain(redis_url, 'alpha')]
    beta = [p for p, _ in drain(redis_url, 'beta')]
    assert sorted(json.dumps(p) for p in alpha) == sorted(json.dumps(p) for p in [
        {'n': 1}, {'p': 0, 'i': 0}, {'p': 0, 'i': 1}, {'p': 0, 'i': 9}, {'n': 2}])
    assert sorted(json.dumps(p) for p in beta) == sorted(json.dumps(p) for p in [
        {'p': 0, 'i': 0}, {'p': 0, 'i': 9}, {'n': 2}])


def test_no_unacked_and_exit_codes(redis_url, redis_client):
    kombu_fill(redis_url, counts={0: 2})
    kombu_crash_holding(redis_url, 'work', 1)
    data = cli_json(redis_url, 'migrate', '--no-unacked')
    assert data['moved'] == 1 and redis_client.hlen('unacked') == 1
    r = cli(redis_url, 'migrate', 'nope')
    assert r.returncode == 3 and "'nope' not found" in r.stderr
    r = cli(redis_url, 'migrate', '--from-url', redis_url.rsplit('/', 1)[0] + '/1')
    assert r.returncode == 2 and 'same Redis server and database' in r.stderr
    assert cli_json(redis_url, 'migrate', '--from-url', redis_url)['moved'] == 1
    assert cli(redis_url, 'migrate', '--batch', '0').returncode == 2
    assert SEP == '\x06\x16'


def test_progress_callback_reports_every_batch(redis_url, redis_client):
    """The Python API the command is built on: plan, then run with a progress callback."""
    from kombu_streams.migrate import KombuKeys, Migration
    kombu_fill(redis_url, counts={0: 3, 9: 2})
    kombu_crash_holding(redis_url, 'work', 1)
    migration = Migration(Broker(redis_client, K, LEVELS), KombuKeys())
    plan = migration.plan()
    assert plan.total == 5 and [q.queue for q in plan.queues] == ['work']
    seen = []
    result = migration.run(plan, batch=2, progress=lambda p: seen.append((p.queue, p.moved,
                                                                          p.total)))
    assert seen == [('work', 1, 5), ('work', 3, 5), ('work', 5, 5)]  # unacked, list 0, 9
    assert (result.total, result.unacked, result.limited) == (5, {'work': 1}, False)
