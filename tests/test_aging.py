"""Priority aging: the queue argument x-priority-aging = P ms serves a ready message as if one
level higher for each P it has waited (lua/lib/aging.lua, hooked into read.lua's serve_stream),
so under a steady stream of high-priority work a low-priority message waits about (levels
between) x P at most. Without the argument priorities stay strict.

The waits are driven, not waited out: an entry that "waited" W ms is added with the id
(server time - W) (publish uses '*', whose id is the server's time), a held one is aged with
XCLAIM ... IDLE; the margins are half a period, far more than a loaded machine takes between
setting the state and the read. Scripts run on fakeredis, Redis 6.2 and 7.0
(``script_client``), the model too. docs/design.rst, "Priority aging".
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from helpers import server_ms
from hypothesis import given
from hypothesis import strategies as st
from kombu import Connection, Queue

from kombu_streams import QueueArgumentsDiffer
from kombu_streams.broker import HOLDER, READ, Broker, Delivery, ReadResult
from kombu_streams.calls import Delay
from kombu_streams.keys import Keys
from kombu_streams.limits import stored_pairs
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]  # serving order: level 0 first
MINUTE = 60_000
HOUR = 3_600_000
Q = ('q', None)


def broker(c: Any) -> Broker:
    return Broker(c, K, LEVELS)


def aging(c: Any, period: Any, queue: str = 'q') -> Broker:
    b = broker(c)
    b.declare(queue, stored_pairs(queue, {'x-priority-aging': period}) if period else [])
    return b


def body(name: str) -> str:
    return json.dumps({'body': name})


def name_of(d: Delivery) -> str:
    return json.loads(d.payload)['body']


def bodies(result: ReadResult) -> list[str]:
    return [name_of(d) for d in result.deliveries]


def read(b: Broker, count: int, consumer: str = 'c1', queues: Sequence[str] = ('q',)
         ) -> ReadResult:
    sources = b.sources(list(queues))
    call, parse = b.read_call(sources, consumer, count, 0, None, {s: READ for s in sources}, ())
    result = parse(b.run(call))
    assert not result.problems, result.problems
    return result


def waited(c: Any, level: int, ms: int, name: str, queue: str = 'q', seq: int = 0) -> None:
    """A ready message of ``level`` published ``ms`` ago: its entry id is that time, as a
    publish's '*' would have made it then (entries of one stream are added oldest first;
    SEQ tells apart those of one ms)."""
    key = K.stream(queue, level)
    c.xadd(key, {'m': body(name)}, id=f'{server_ms(c) - ms}-{seq}')
    c.sadd(K.ready(queue), key)
    c.zadd(K.wake(queue), {'w': 0})


# -- the argument -------------------------------------------------------------------------

@pytest.mark.parametrize('given_, stored', [(1, '1'), (20, '20'), ('60000', '60000'),
                                            (86_400_000, '86400000')])
def test_the_period_is_stored_as_an_integer(given_, stored):
    assert stored_pairs('q', {'x-priority-aging': given_}) == ['x-priority-aging', stored]


@pytest.mark.parametrize('given_', [0, -1, 2.5, '0', '-5', 'soon', True, '1.5',
                                    86_400_001, 10**30])
def test_an_invalid_period_is_named_at_declare(given_):
    with pytest.raises(ValueError, match="queue 'q': argument x-priority-aging=.* is not "
                                         'valid: an integer'):
        stored_pairs('q', {'x-priority-aging': given_})


def test_a_declare_with_another_period_is_refused(script_client):
    c = script_client
    b = aging(c, MINUTE)
    with pytest.raises(QueueArgumentsDiffer) as info:
        b.declare('q', stored_pairs('q', {'x-priority-aging': 2 * MINUTE}))
    assert 'x-priority-aging=60000' in str(info.value)
    assert 'x-priority-aging=120000' in str(info.value)
    b.declare('q', stored_pairs('q', {'x-priority-aging': MINUTE}))  # the same: fine
    assert b.limits('q') == {'x-priority-aging': MINUTE}


# -- serving order ------------------------------------------------------------------------

def test_without_the_argument_priorities_stay_strict(script_client):
    """A low message ten minutes old still waits for every high one."""
    c = script_client
    b = aging(c, None)
    waited(c, 9, 10 * MINUTE, 'old-low')
    for n in range(3):
        b.publish('q', 0, body(f'h{n}'))
    assert [bodies(read(b, 1)) for _ in range(4)] == [['h0'], ['h1'], ['h2'], ['old-low']]


def test_an_aged_low_message_goes_before_high_work(script_client):
    """Period 1 min, 4 levels: a level-9 message waited 10 min (past 3 periods) is served
    first, then the high work; only one per call (a second read serves high work)."""
    c = script_client
    b = aging(c, MINUTE)
    waited(c, 9, 10 * MINUTE, 'old-low')
    for n in range(3):
        b.publish('q', 0, body(f'h{n}'))
    assert bodies(read(b, 1)) == ['old-low']
    assert bodies(read(b, 1)) == ['h0']


def test_a_message_not_aged_enough_waits_its_turn(script_client):
    """Period 1 h: ten minutes of waiting lifts no level."""
    c = script_client
    b = aging(c, HOUR)
    waited(c, 9, 10 * MINUTE, 'low')
    b.publish('q', 0, body('h0'))
    b.publish('q', 3, body('m0'))
    assert bodies(read(b, 10)) == ['h0', 'm0', 'low']


def test_each_period_lifts_one_level(script_client):
    """Period 1 min. Level 6 waited 1.5 periods (counts as level 3), level 9 2.5 (counts as
    level 3 too): neither passes level 0, both go before level 3's own, the one that
    climbed more (level 9: two levels) first."""
    c = script_client
    b = aging(c, MINUTE)
    waited(c, 6, 90_000, 'six-old')
    waited(c, 9, 150_000, 'nine-old')
    for level, name in ((0, 'zero'), (3, 'three'), (6, 'six'), (9, 'nine')):
        b.publish('q', level, body(name))
    assert bodies(read(b, 10)) == ['zero', 'nine-old', 'six-old', 'three', 'six', 'nine']


def test_the_most_aged_level_goes_first(script_client):
    """Positions 1 to 4 (levels 0 to 9). Level 9 waited 4.5 periods (counts as position 0),
    level 6 waited 2.5 (position 1): both pass level 0, the one counting higher first."""
    c = script_client
    b = aging(c, MINUTE)
    waited(c, 6, 150_000, 'six-old')
    waited(c, 9, 270_000, 'nine-old')
    b.publish('q', 0, body('zero'))
    assert bodies(read(b, 10)) == ['nine-old', 'six-old', 'zero']


def test_one_aged_message_per_level_per_call(script_client):
    """Two aged level-9 messages under five high ones, reads of 3: each call serves one aged
    message first, then high work; the next call looks again and finds the second."""
    c = script_client
    b = aging(c, MINUTE)
    waited(c, 9, 20 * MINUTE, 'low-a')
    waited(c, 9, 10 * MINUTE, 'low-b')
    for n in range(5):
        b.publish('q', 0, body(f'h{n}'))
    assert bodies(read(b, 3)) == ['low-a', 'h0', 'h1']
    assert bodies(read(b, 3)) == ['low-b', 'h2', 'h3']
    assert bodies(read(b, 3)) == ['h4']


def test_a_requeued_message_waits_from_when_it_was_given_back(script_client):
    """A held (requeued) message's wait is its idle time with the holder, reset when it was
    parked: an entry published 10 min ago and given back just now is not aged; once its
    idle time says 10 min, it is."""
    c = script_client
    b = aging(c, MINUTE)
    waited(c, 9, 10 * MINUTE, 'low')
    [d] = read(b, 1).deliveries
    b.requeue('q', [(d.stream, d.entry_id)], None, 'c1')
    b.publish('q', 0, body('h0'))
    b.publish('q', 0, body('h1'))
    assert bodies(read(b, 1, 'c2')) == ['h0']
    c.xclaim(d.stream, 'q', HOLDER, 0, [d.entry_id], idle=10 * MINUTE, justid=True)
    [again] = read(b, 1, 'c2').deliveries
    assert (name_of(again), again.entry_id, again.deliveries) == ('low', d.entry_id, 2)
    assert bodies(read(b, 1, 'c2')) == ['h1']


def test_a_delayed_message_waits_from_when_it_became_due(script_client):
    """A delayed low message due long ago is moved to its stream by the read with a new
    entry id: its wait starts there, so high work goes first."""
    c = script_client
    b = aging(c, MINUTE)
    b.publish('q', 9, body('delayed'), delay=Delay('+1', 0, ''))
    [member] = c.zrange(K.delayed('q'), 0, -1)
    c.zadd(K.delayed('q'), {member: server_ms(c) - 10 * MINUTE}, xx=True)  # due 10 min ago
    b.publish('q', 0, body('h0'))
    assert bodies(read(b, 1)) == ['h0']
    assert bodies(read(b, 1)) == ['delayed']


def test_a_period_changed_at_run_time_is_read_by_the_next_read(script_client):
    c = script_client
    b = aging(c, None)
    waited(c, 9, 10 * MINUTE, 'low')
    b.publish('q', 0, body('h0'))
    b.publish('q', 0, body('h1'))
    assert bodies(read(b, 1)) == ['h0']
    b.run(b.limits_call('q', stored_pairs('q', {'x-priority-aging': MINUTE})))
    assert bodies(read(b, 1)) == ['low']


def test_a_bad_stored_period_stops_that_queue_only(script_client):
    """A value written behind our back is a problem of that queue; the other is served."""
    c = script_client
    b = aging(c, None)
    aging(c, None, 'other')
    c.hset(K.args('q'), 'x-priority-aging', 'soon')
    b.publish('q', 0, body('q0'))
    b.publish('other', 0, body('o0'))
    sources = b.sources(['q', 'other'])
    call, parse = b.read_call(sources, 'c1', 10, 0, None, {s: READ for s in sources}, ())
    result = parse(b.run(call))
    assert bodies(result) == ['o0']
    assert result.status[Q] == 'e'
    assert any('invalid x-priority-aging soon' in str(p) for p in result.problems)


# -- a model -----------------------------------------------------------------------------

def model_read(heads: list[list[int]], period: int, count: int) -> list[tuple[int, int]]:
    """What one read of COUNT serves, as (level position, index in level), by the rule of
    docs/design.rst "Priority aging": HEADS holds the waits (ms) of each level's messages
    in line. The waits are looked at once, at the first level with work, for the levels
    below it; a level whose first message waited W counts as its position less
    floor(W / period). Before each level's own messages, every looked-at level that counts
    as that level or higher goes first, one message each per call, the one counting
    highest first, a tie to the one that climbed more."""
    taken = [0] * len(heads)
    out: list[tuple[int, int]] = []
    waits: dict[int, int] | None = None
    done: set[int] = set()

    def take(p: int) -> None:
        out.append((p, taken[p]))
        taken[p] += 1

    for pos, level in enumerate(heads):
        if len(out) >= count:
            break
        if waits is None:
            if not level:
                continue
            waits = {p: heads[p][0] for p in range(pos + 1, len(heads)) if heads[p]}
        aged = sorted((p - w // period, -p) for p, w in waits.items()
                      if p >= pos and p not in done and w // period >= max(p - pos, 1))
        for _, minus_p in aged:
            if len(out) >= count:
                break
            done.add(-minus_p)
            if taken[-minus_p] < len(heads[-minus_p]):
                take(-minus_p)
        while len(out) < count and taken[pos] < len(level):
            take(pos)
    return out


_level = st.lists(st.integers(0, 4), max_size=3).map(lambda ks: sorted(ks, reverse=True))
_held = st.none() | st.integers(0, 4)


def held(c: Any, level: int, idle: int, name: str, queue: str = 'q') -> None:
    """A message of ``level`` parked with the holder (as a requeue leaves it, delivery
    count 0) that has waited ``idle`` ms there; its entry is older than any other of its
    stream, as a requeued one is."""
    key = K.stream(queue, level)
    c.xadd(key, {'m': body(name)}, id=f'{server_ms(c) - HOUR}-0')
    [[_, [(entry_id, _)]]] = c.xreadgroup(queue, 'setup', {key: '>'}, count=1)
    c.xclaim(key, queue, HOLDER, 0, [entry_id], idle=idle, retrycount=0, justid=True)
    c.sadd(K.ready(queue), f'h:{key}')


@PROPERTY
@given(levels=st.lists(st.tuples(_held, _level, st.integers(0, 2)), min_size=4, max_size=4),
       count=st.integers(1, 12))
def test_a_read_serves_in_the_models_order(script_client, levels, count):
    """Each level may hold a requeued message that waited k periods and a half with the
    holder, then messages that waited k periods and a half since published (k from 0 to 4,
    oldest first), then fresh ones; one read of COUNT serves exactly what the model says,
    and nothing is lost: what it did not serve is still there."""
    c = script_client
    c.flushall()
    b = aging(c, MINUTE)
    heads: list[list[int]] = []
    names: list[list[str]] = []
    for (parked, aged, fresh), level in zip(levels, LEVELS):
        waits, level_names = [], []
        if parked is not None:
            held(c, level, parked * MINUTE + MINUTE // 2, f'{level}-held')
            waits.append(parked * MINUTE + MINUTE // 2)
            level_names.append(f'{level}-held')
        for j, k in enumerate(aged):
            waited(c, level, k * MINUTE + MINUTE // 2, f'{level}-{j}', seq=j)
            waits.append(k * MINUTE + MINUTE // 2)
            level_names.append(f'{level}-{j}')
        for j in range(fresh):
            b.publish('q', level, body(f'{level}-{len(aged) + j}'))
            waits.append(0)
            level_names.append(f'{level}-{len(aged) + j}')
        heads.append(waits)
        names.append(level_names)
    expect = [names[p][j] for p, j in model_read(heads, MINUTE, count)]
    assert bodies(read(b, count)) == expect
    total = sum(len(h) for h in heads)
    assert b.size('q') == total - len(expect)


# -- through Kombu and the CLI -----------------------------------------------------------

def test_kombu_declares_the_period_and_the_cli_shows_and_changes_it(url, redis_url):
    from tests.test_cli import cli
    c = redis.Redis.from_url(redis_url)
    with Connection(url) as conn:
        Queue('aq', queue_arguments={'x-priority-aging': 30_000})(conn.default_channel).declare()
        assert broker(c).limits('aq') == {'x-priority-aging': 30_000}
        with pytest.raises(ValueError, match="'aq2': argument x-priority-aging=0"):
            Queue('aq2', queue_arguments={'x-priority-aging': 0})(conn.default_channel).declare()
    shown = cli(redis_url, 'limits', 'aq')
    assert shown.returncode == 0 and 'x-priority-aging=30000' in shown.stdout, shown.stderr
    out = cli(redis_url, 'limits', 'aq', '--set', 'x-priority-aging=1000')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'aq: x-priority-aging=1000'
    bad = cli(redis_url, 'limits', 'aq', '--set', 'x-priority-aging=0')
    assert bad.returncode == 2 and 'x-priority-aging' in bad.stderr


def test_a_level_published_before_its_group_exists_ages_too(script_client):
    """A publish to a queue no consumer declared makes the stream without the group (the
    read makes it at id 0): its first message is fresh and ages all the same."""
    c = script_client
    b = broker(c)
    waited(c, 9, 10 * MINUTE, 'old-low')
    b.publish('q', 0, body('h0'))
    c.hset(K.args('q'), 'x-priority-aging', MINUTE)  # as limits.lua stores it
    assert c.xinfo_groups(K.stream('q', 9)) == []
    assert bodies(read(b, 1)) == ['old-low']


def test_another_programs_key_at_a_lower_level_is_reported_at_its_turn(script_client):
    """The look ignores a key it cannot read (WRONGTYPE): the read serves the other levels
    and reports the key once, at its own turn, as without aging; nothing is lost."""
    c = script_client
    b = aging(c, MINUTE)
    waited(c, 6, 10 * MINUTE, 'old-six')
    b.publish('q', 0, body('h0'))
    bad = K.stream('q', 9)
    c.delete(bad)
    c.set(bad, 'not a stream')
    c.sadd(K.ready('q'), bad)
    sources = b.sources(['q'])
    call, parse = b.read_call(sources, 'c1', 10, 0, None, {s: READ for s in sources}, ())
    result = parse(b.run(call))
    assert bodies(result) == ['old-six', 'h0']
    assert len(result.problems) == 1 and 'WRONGTYPE' in str(result.problems)
    assert c.get(bad) == b'not a stream'


@pytest.mark.parametrize('period, first', [(None, 0), (1, 9)])
def test_through_kombu_an_aged_task_goes_first(url, period, first):
    """Kombu's SimpleQueue, priority 9 put first, then two of priority 0. Strict without the
    argument; with a period of 1 ms the priority-9 message has waited far more than three
    periods by the time it is read (a slower machine only makes it older)."""
    args = {'x-priority-aging': period} if period else {}
    with Connection(url) as conn:
        queue = conn.SimpleQueue(f'kq{period}', queue_args=args)
        queue.put({'p': 9}, priority=9)
        time.sleep(0.05)
        queue.put({'p': 0}, priority=0)
        queue.put({'p': 0}, priority=0)
        message = queue.get(timeout=5)
        message.ack()
        queue.close()
    assert message.payload == {'p': first}
