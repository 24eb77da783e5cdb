"""Message TTL: the queue argument x-message-ttl and Kombu's per-message ``expiration`` (the
lower applies), enforced where a read hands messages out: an expired message goes to the
dead-letter stream with reason ``expired`` and is never delivered. Scripts on fakeredis,
Redis 6.2 and 7.0 (``script_client``); what needs the clock to move runs on fakeredis with
its clock driven (``FakeClock``), never on sleeps. docs/design.rst, "Message TTL"."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from helpers import STALE, FakeClock, install_clock, read_messages, server_ms
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kombu_streams.broker import Broker, Delay
from kombu_streams.keys import Keys
from kombu_streams.limits import expiration_ms, stored_pairs
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]
FAR = 10 ** 9  # ms: a deadline no test reaches


def broker(c: Any) -> Broker:
    return Broker(c, K, LEVELS)


def with_ttl(c: Any, queue: str, ttl: int | None) -> Broker:
    b = broker(c)
    b.declare(queue, stored_pairs(queue, {} if ttl is None else {'x-message-ttl': ttl}))
    return b


def body(n: int) -> str:
    return json.dumps({'body': f'm{n}'})


def bodies(deliveries: Any) -> list[str]:
    return [json.loads(d.payload)['body'] for d in deliveries]


def letters(b: Broker, queue: str) -> list[tuple[str, str]]:
    return [(f[b'reason'].decode(), json.loads(f[b'f:m'])['body'])
            for _, f in b.dead_letters(queue, 100_000)]


def deadlines(c: Any, queue: str) -> dict[str, int]:
    """Body -> the deadline stamped on its stream entry (field e), of entries that have one."""
    out = {}
    for lv in LEVELS:
        for _, f in c.xrange(K.stream(queue, lv)):
            if b'e' in f:
                out[json.loads(f[b'm'])['body']] = int(f[b'e'])
    return out


def pass_deadlines(c: Any, queue: str) -> None:
    """Wait until the server's clock is at or past every near deadline of the queue's
    entries (TTL 0: at most a ms away; FAR ones are left alone). A wait only in the
    direction a slow machine cannot break: it ends once the time has come."""
    now = server_ms(c)
    last = max(d for d in deadlines(c, queue).values() if d < now + 60_000)
    while server_ms(c) < last:
        pass


def expired_count(c: Any, queue: str) -> int:
    return int(c.hget(K.counters(queue), 'expired') or 0)


@pytest.mark.parametrize('queue_ttl, expiration, lives', [
    (None, None, True),
    (FAR, None, True),
    (None, FAR, True),
    (FAR, FAR, True),
    (0, None, False),
    (None, 0, False),
    (FAR, 0, False),   # the lower one applies: the message's own
    (0, FAR, False),   # the lower one applies: the queue's
])
def test_the_lower_ttl_applies_and_an_expired_one_is_never_delivered(
        script_client, queue_ttl, expiration, lives):
    c = script_client
    b = with_ttl(c, 'q', queue_ttl)
    b.publish('q', 0, body(1), expiration=expiration)
    if not lives:
        assert deadlines(c, 'q')['m1'] <= server_ms(c) + 1  # TTL 0: due within a ms
        pass_deadlines(c, 'q')
    got = read_messages(b, ['q'], 'c1', 10)
    if lives:
        assert bodies(got) == ['m1'] and letters(b, 'q') == []
        assert expired_count(c, 'q') == 0
    else:
        assert got == []
        assert letters(b, 'q') == [('expired', 'm1')]
        assert expired_count(c, 'q') == 1
        assert b.size('q') == 0


def test_a_message_without_ttl_carries_no_deadline(script_client):
    """No TTL anywhere: the entry has its message field only, nothing to check at the read."""
    c = script_client
    b = with_ttl(c, 'q', None)
    b.publish('q', 0, body(1))
    [(_, fields)] = c.xrange(K.stream('q', 0))
    assert list(fields) == [b'm']


def test_the_deadline_is_the_server_clock_at_publish_plus_the_ttl(script_client):
    c = script_client
    b = with_ttl(c, 'q', 600_000)
    before = server_ms(c)
    b.publish('q', 0, body(1), expiration=900_000)  # the queue's is lower
    b.publish('q', 0, body(2), expiration=300_000)  # the message's is lower
    after = server_ms(c)
    stamped = deadlines(c, 'q')
    assert before + 600_000 <= stamped['m1'] <= after + 600_001
    assert before + 300_000 <= stamped['m2'] <= after + 300_001


def test_the_letter_keeps_the_original_message_and_deadline(script_client):
    c = script_client
    b = with_ttl(c, 'q', None)
    payload = body(7)
    b.publish('q', 3, payload, expiration=0)
    stamped = deadlines(c, 'q')['m7']
    pass_deadlines(c, 'q')
    assert read_messages(b, ['q'], 'c1', 1) == []
    [(_, letter)] = b.dead_letters('q')
    assert letter[b'reason'] == b'expired'
    assert letter[b'f:m'] == payload.encode()
    assert int(letter[b'f:e']) == stamped
    assert letter[b'stream'] == K.stream('q', 3).encode()
    assert letter[b'deliveries'] == b'0'  # never handed out


def test_live_ones_are_delivered_in_order_around_expired_ones(script_client):
    """Priorities and requeued-first keep their order; the expired ones between them go."""
    c = script_client
    b = with_ttl(c, 'q', None)
    b.publish('q', 0, body(1))
    first = read_messages(b, ['q'], 'c1', 1)
    b.publish('q', 9, body(2), expiration=0)
    b.publish('q', 9, body(3))
    b.publish('q', 0, body(4), expiration=0)
    b.publish('q', 0, body(5), expiration=FAR)
    b.publish('q', 3, body(6), expiration=0)
    b.publish('q', 3, body(7))
    # m1 goes back as read ahead and never handed out (count 0): parked, served first, and
    # not a suspect (a suspect would be served alone: docs/design.rst)
    b.requeue('q', [(first[0].stream, first[0].entry_id, 0)])
    pass_deadlines(c, 'q')
    assert bodies(read_messages(b, ['q'], 'c1', 10)) == ['m1', 'm5', 'm7', 'm3']
    assert sorted(letters(b, 'q')) == [('expired', 'm2'), ('expired', 'm4'), ('expired', 'm6')]
    assert expired_count(c, 'q') == 3


def test_a_requeued_or_reclaimed_message_keeps_its_deadline(script_client):
    c = script_client
    b = with_ttl(c, 'q', 600_000)
    b.publish('q', 0, body(1))
    stamped = deadlines(c, 'q')
    [d] = read_messages(b, ['q'], 'c1', 1)
    b.requeue('q', [(d.stream, d.entry_id)])
    assert deadlines(c, 'q') == stamped
    [d] = read_messages(b, ['q'], 'c2', 1)  # served again (parked first): the same entry
    assert d.deliveries == 2
    c.xclaim(d.stream, 'q', 'c2', 0, [d.entry_id], idle=STALE, justid=True)  # lease out
    assert b.reclaim('q', 60_000, 100)
    assert deadlines(c, 'q') == stamped
    [d] = read_messages(b, ['q'], 'c3', 1)
    assert d.deliveries == 3 and deadlines(c, 'q') == stamped


def test_bounded_work_with_many_expired_and_the_live_ones_behind_them(script_client):
    """A read sets aside at most COUNT + 100 expired entries; the rest wait for the next
    reads, none is delivered, and the live message behind them comes out in the end. Fewer
    expired ones than that: the live one behind them comes in the same call."""
    c = script_client
    b = with_ttl(c, 'q', None)
    for n in range(450):
        b.publish('q', 0, body(n), expiration=0)
    b.publish('q', 0, body(999))
    pass_deadlines(c, 'q')
    calls, got = 0, []
    while not got:
        before = len(b.dead_letters('q', 100_000))
        got = read_messages(b, ['q'], 'c1', 1)
        set_aside = len(b.dead_letters('q', 100_000)) - before
        assert set_aside <= 1 + 100
        calls += 1
    assert bodies(got) == ['m999']
    assert calls == 5  # 101 per call: 4 calls set aside 404, the 5th the last 46 and m999
    assert expired_count(c, 'q') == 450
    assert b.size('q') == 0


def test_a_delayed_message_keeps_its_deadline_and_expires_while_delayed(script_client):
    c = script_client
    b = with_ttl(c, 'q', None)
    b.publish('q', 0, body(1), delay=Delay('+600000', 1000, 't1'), expiration=0)
    b.publish('q', 0, body(2), delay=Delay('+600000', 1000, 't2'), expiration=FAR)
    b.publish('q', 0, body(3), delay=Delay('+600000', 1000, 't3'))
    listing = b.scheduled('q', bodies=True)['messages']
    assert [json.loads(m['message'])['body'] for m in listing] == ['m1', 'm2', 'm3']
    stamped = [int(v.split(b':')[1]) for v in c.hvals(K.delayed_messages('q'))
                if v.startswith(b'e:')]
    assert len(stamped) == 2
    while server_ms(c) < min(stamped):  # m1's, TTL 0: at most a ms away
        pass
    c.zadd(K.delayed('q'), {m: 1 for m in c.zrange(K.delayed('q'), 0, -1)})  # due now
    got = read_messages(b, ['q'], 'c1', 10)
    assert bodies(got) == ['m2', 'm3']
    assert letters(b, 'q') == [('expired', 'm1')]


def test_cancel_and_purge_of_delayed_big_messages_with_a_deadline_free_their_bodies(
        script_client):
    c = script_client
    b = with_ttl(c, 'q', 600_000)
    b.publish_big('q', 0, body(1), delay=Delay('+600000', 1000, 'a'))
    b.publish_big('q', 0, body(2), delay=Delay('+600000', 1000, 'b'), expiration=FAR)
    assert c.hlen(K.big('q')) == 2
    assert b.cancel('q', ['a'])
    assert c.hlen(K.big('q')) == 1
    b.purge('q')
    assert c.hlen(K.big('q')) == 0


def test_a_big_message_expires_as_an_inline_one(script_client):
    c = script_client
    b = with_ttl(c, 'q', None)
    b.publish_big('q', 0, body(1), expiration=0)
    b.publish_big('q', 0, body(2), expiration=FAR)
    [(_, first), _] = c.xrange(K.stream('q', 0))
    while server_ms(c) < int(first[b'e']):  # TTL 0: at most a ms away
        pass
    got = read_messages(b, ['q'], 'c1', 10)
    assert [d.token is not None for d in got] == [True]
    [(_, letter)] = b.dead_letters('q')
    assert letter[b'reason'] == b'expired' and b'f:r' in letter


def test_redrive_gives_an_expired_message_back_without_its_deadline(script_client):
    """An operator's redrive is a decision to run it: it goes back as a new entry."""
    c = script_client
    b = with_ttl(c, 'q', None)
    b.publish('q', 0, body(1), expiration=0)
    pass_deadlines(c, 'q')
    assert read_messages(b, ['q'], 'c1', 1) == []
    assert b.redrive('q', 10) == (1, 0, 0)
    assert bodies(read_messages(b, ['q'], 'c1', 1)) == ['m1']


def test_the_counter_gets_the_queue_expiry(script_client):
    c = script_client
    b = with_ttl(c, 'q', 0)
    b.touch('q', 60_000)
    b.publish('q', 0, body(1))
    pass_deadlines(c, 'q')
    assert read_messages(b, ['q'], 'c1', 1, ttls={'q': 60_000}) == []
    assert 0 < c.pttl(K.counters('q')) <= 60_000


def test_an_expiring_queue_drops_its_expired_messages_instead_of_filing_them(script_client):
    """A queue with x-expires (Celery's event, reply and pidbox queues, which also set a
    message TTL): its expired messages are dropped and counted, bodies of big ones too, and
    nothing goes to a dead-letter stream that would outlive the queue and grow with every
    event a slow receiver let expire. The live one behind them is delivered."""
    c = script_client
    b = with_ttl(c, 'q', None)
    b.touch('q', 60_000)
    b.publish('q', 0, body(1), expiration=0)
    b.publish_big('q', 0, body(2), expiration=0)
    b.publish('q', 0, body(3), expiration=FAR)
    soon = server_ms(c) + 60_000
    last = max(int(f[b'e']) for _, f in c.xrange(K.stream('q', 0)) if int(f[b'e']) < soon)
    while server_ms(c) < last:  # TTL 0: at most a ms away
        pass
    got = read_messages(b, ['q'], 'c1', 10, ttls={'q': 60_000})
    assert bodies(got) == ['m3']
    assert letters(b, 'q') == [] and not c.exists(K.dlq('q'))
    assert expired_count(c, 'q') == 2
    assert c.hlen(K.big('q')) == 0  # the big one's body went with it
    assert c.xlen(K.stream('q', 0)) == 1  # only m3's entry, in flight
    # the same queue read without its expiry (a consumer that does not know it) files them
    b.publish('q', 0, body(4), expiration=0)
    pass_deadlines(c, 'q')
    assert read_messages(b, ['q'], 'c2', 10) == []
    assert letters(b, 'q') == [('expired', 'm4')]


def test_a_counters_key_of_another_type_is_reported_and_the_letter_kept(script_client):
    c = script_client
    b = with_ttl(c, 'q', None)
    c.set(K.counters('q'), 'not ours')
    b.publish('q', 0, body(1), expiration=0)
    pass_deadlines(c, 'q')
    sources = b.sources(['q'])
    call, parse = b.read_call(sources, 'c1', 1)
    result = parse(b.run(call))
    assert result.deliveries == []
    assert any('WRONGTYPE' in err and 'counters' in err for _, err in result.problems)
    assert letters(b, 'q') == [('expired', 'm1')]
    assert c.get(K.counters('q')) == b'not ours'


@pytest.mark.parametrize('arguments, says', [
    ({'x-message-ttl': -1}, 'an integer >= 0'),
    ({'x-message-ttl': 1.5}, 'an integer >= 0'),
    ({'x-message-ttl': 'soon'}, 'an integer >= 0'),
])
def test_an_invalid_queue_ttl_is_named(arguments, says):
    with pytest.raises(ValueError, match=says) as info:
        stored_pairs('q', arguments)
    assert "queue 'q'" in str(info.value) and 'x-message-ttl' in str(info.value)


def test_queue_ttl_is_stored_alone_or_with_a_length():
    assert stored_pairs('q', {'x-message-ttl': 5000}) == ['x-message-ttl', '5000']
    assert stored_pairs('q', {'x-message-ttl': '0', 'x-max-length': 3}) == [
        'x-max-length', '3', 'x-overflow', 'drop-head', 'x-message-ttl', '0']


@pytest.mark.parametrize('expiration, ms', [
    (None, None), ('', None), ('5000', 5000), ('0', 0), ('-1000', 0), (250, 250),
    ('1.9', 1),
])
def test_expiration_property(expiration, ms):
    props = {} if expiration is None else {'expiration': expiration}
    assert expiration_ms({'properties': props}) == ms


@pytest.mark.parametrize('expiration', ['soon', 'nan', 'inf'])
def test_an_expiration_that_is_no_number_is_refused(expiration):
    with pytest.raises(ValueError, match='expiration'):
        expiration_ms({'properties': {'expiration': expiration}})


def test_requeue_keeps_the_deadline_and_it_then_expires(fake_clock):
    c, clock = fake_clock
    b = with_ttl(c, 'q', 1000)
    b.publish('q', 0, body(1))
    b.publish('q', 0, body(2))
    got = read_messages(b, ['q'], 'c1', 10)
    assert bodies(got) == ['m1', 'm2']
    clock.ms += 999
    b.requeue('q', [(got[0].stream, got[0].entry_id)])
    clock.ms += 1  # now at m1's deadline
    assert read_messages(b, ['q'], 'c1', 10) == []
    [(_, letter)] = b.dead_letters('q')
    assert letter[b'reason'] == b'expired' and letter[b'deliveries'] == b'1'
    b.ack('q', [(got[1].stream, got[1].entry_id)])  # delivered before: not expired by us
    assert b.size('q') == 0


def test_a_delayed_message_past_its_deadline_when_due_is_never_delivered(fake_clock):
    c, clock = fake_clock
    b = with_ttl(c, 'q', 5000)
    b.publish('q', 0, body(1), delay=Delay('+6000', 1000, 'late'))   # expires at 5 s
    b.publish('q', 0, body(2), delay=Delay('+4000', 1000, 'early'))  # due before it
    clock.ms += 4000
    assert bodies(read_messages(b, ['q'], 'c1', 10)) == ['m2']
    clock.ms += 2000
    assert read_messages(b, ['q'], 'c1', 10) == []
    assert letters(b, 'q') == [('expired', 'm1')]


def test_rounded_up_never_early(fake_clock):
    c, clock = fake_clock
    clock.ms += 0.4  # publish inside a ms: the deadline is the next ms + ttl
    b = with_ttl(c, 'q', 1)
    b.publish('q', 0, body(1))
    clock.ms += 1  # 1 ms after the publish, not yet 1 ms after the next ms
    assert bodies(read_messages(b, ['q'], 'c1', 10)) == ['m1']


class TtlQueue(RuleBasedStateMachine):
    """Publish with and without TTL (the queue's, changed at run time, and the message's
    own), delayed or not, read, ack and requeue while the clock moves (fakeredis's, driven):
    nothing is delivered at or past its deadline, and every message published is ready,
    delayed, in flight, acked, or in the dead-letter stream with reason expired and a
    deadline that has passed: none lost."""

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.clock = FakeClock(server_ms(self.c))
        self.restore_clock = install_clock(self.clock)
        self.b = with_ttl(self.c, 'q', None)
        self.queue_ttl: int | None = None
        self.n = 0
        self.deadline: dict[str, int | None] = {}
        self.in_flight: dict[str, Any] = {}
        self.acked: set[str] = set()

    def teardown(self) -> None:
        self.restore_clock()

    @rule(ttl=st.one_of(st.none(), st.integers(0, 200)))
    def set_queue_ttl(self, ttl: int | None) -> None:
        self.b.limits('q', stored_pairs('q', {} if ttl is None else {'x-message-ttl': ttl}))
        self.queue_ttl = ttl

    @rule(level=st.sampled_from(LEVELS), expiration=st.one_of(st.none(), st.integers(0, 200)),
          delay=st.one_of(st.none(), st.integers(1, 300)))
    def publish(self, level: int, expiration: int | None, delay: int | None) -> None:
        self.n += 1
        name = f'm{self.n}'
        ttls = [t for t in (self.queue_ttl, expiration) if t is not None]
        self.deadline[name] = math.ceil(self.clock.ms) + min(ttls) if ttls else None
        due = Delay() if delay is None else Delay(f'+{delay}', 0, name)
        self.b.publish('q', level, json.dumps({'body': name}), delay=due,
                       expiration=expiration)

    @rule(ms=st.sampled_from([0.5, 1, 7, 50, 150]))
    def advance(self, ms: float) -> None:
        self.clock.ms += ms

    @rule(count=st.integers(1, 3))
    def read(self, count: int) -> None:
        now = math.floor(self.clock.ms)
        for d in read_messages(self.b, ['q'], 'c1', count):
            name = json.loads(d.payload)['body']
            deadline = self.deadline[name]
            assert deadline is None or deadline > now, f'{name} delivered past its deadline'
            self.in_flight[name] = d

    @precondition(lambda self: self.in_flight)
    @rule(how=st.sampled_from(['ack', 'requeue']), data=st.data())
    def settle(self, how: str, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        d = self.in_flight.pop(name)
        if how == 'requeue':
            self.b.requeue('q', [(d.stream, d.entry_id)])
        else:
            self.b.ack('q', [(d.stream, d.entry_id)])
            self.acked.add(name)

    @invariant()
    def none_lost_and_only_the_expired_set_aside(self) -> None:
        stored = {json.loads(f[b'm'])['body'] for lv in LEVELS
                  for _, f in self.c.xrange(K.stream('q', lv))}
        delayed = {json.loads(v[v.index(b'{'):])['body']  # after a deadline's prefix
                   for v in self.c.hvals(K.delayed_messages('q'))}
        dropped = letters(self.b, 'q')
        now = math.floor(self.clock.ms)
        for reason, name in dropped:
            assert reason == 'expired'
            deadline = self.deadline[name]
            assert deadline is not None and deadline <= now
        names = [name for _, name in dropped]
        assert len(names) == len(set(names)) == expired_count(self.c, 'q')
        assert not (set(names) & (stored | delayed | self.acked))
        everything = stored | delayed | self.acked | set(names)
        assert everything == {f'm{i}' for i in range(1, self.n + 1)}
        assert set(self.in_flight) <= stored


TestTtlQueue = TtlQueue.TestCase
TestTtlQueue.settings = PROPERTY


def test_kombu_queue_message_ttl_and_producer_expiration(url, redis_url):
    """Queue(message_ttl=seconds) is stored as x-message-ttl; Producer.publish(expiration=
    seconds) is the message's own; a consumer gets only what has not expired."""
    import redis
    from kombu import Connection, Producer, Queue
    c = redis.Redis.from_url(redis_url)
    with Connection(url) as conn:
        q = Queue('tq', message_ttl=600)
        q(conn.default_channel).declare()
        assert broker(c).limits('tq') == {'x-message-ttl': 600_000}
        producer = Producer(conn.default_channel, routing_key='tq')
        producer.publish({'n': 1}, expiration=0)
        producer.publish({'n': 2})
        producer.publish({'n': 3}, expiration=3600)
        stamped = [int(f[b'e']) for _, f in c.xrange(K.stream('tq', 0))]
        assert stamped[1] - stamped[0] >= 600_000 - 1000 and stamped[2] == max(stamped)
        while server_ms(c) < stamped[0]:
            pass
        got = []
        with conn.Consumer(q, callbacks=[lambda body, m: (got.append(body), m.ack())]):
            while len(got) < 2:
                conn.drain_events(timeout=5)
        assert got == [{'n': 2}, {'n': 3}]
        [(_, letter)] = c.xrange(K.dlq('tq'))
        assert letter[b'reason'] == b'expired'
        assert json.loads(letter[b'f:m'])['properties']['expiration'] == '0'


def test_cli_limits_and_status_show_the_ttl_and_the_expired(redis_url):
    import redis

    from tests.test_cli import cli, cli_json
    c = redis.Redis.from_url(redis_url)
    b = with_ttl(c, 'tq', None)
    out = cli_json(redis_url, 'limits', 'tq', '--set', 'x-message-ttl=0')
    assert out == {'queue': 'tq', 'arguments': {'x-message-ttl': 0}, 'counters': {}}
    b.publish('tq', 0, body(1))
    b.publish('tq', 0, body(2))
    pass_deadlines(c, 'tq')
    assert read_messages(b, ['tq'], 'c1', 10) == []
    assert cli(redis_url, 'limits', 'tq').stdout.strip() == 'tq: x-message-ttl=0 (2 expired)'
    assert cli_json(redis_url, 'status', 'tq')['queues'][0]['counters'] == {'expired': 2}
    assert 'ttl 0ms, 2 expired' in cli(redis_url, 'status', 'tq').stdout
    bad = cli(redis_url, 'limits', 'tq', '--set', 'x-message-ttl=soon')
    assert bad.returncode == 2 and 'x-message-ttl' in bad.stderr


def test_peek_leaves_out_what_a_read_would_set_aside_as_expired(script_client, monkeypatch):
    """peek.lua shows what reads would deliver, in their order: a message past its deadline,
    fresh or requeued, is set aside by the next read, so peek does not show it; a page whose
    entries all expired still says where the next one starts."""
    c = script_client
    b = with_ttl(c, 'q', None)
    b.publish('q', 0, body(1), expiration=300)  # read in time, requeued, then expired
    (d,) = read_messages(b, ['q'], 'c1', 1)
    assert bodies([d]) == ['m1']
    b.requeue('q', [(d.stream, d.entry_id)])
    b.publish('q', 0, body(0), expiration=0)  # expired at once
    b.publish('q', 0, body(2))
    b.publish('q', 3, body(3), expiration=FAR)
    pass_deadlines(c, 'q')
    peeked = [json.loads(m.payload)['body'] for m in b.peek('q', 10)]
    assert peeked == ['m2', 'm3']
    monkeypatch.setattr('kombu_streams.broker.PEEK_MAX', 1)  # a call per entry looked at
    assert [json.loads(m.payload)['body'] for m in b.peek('q', 10)] == peeked
    assert bodies(read_messages(b, ['q'], 'c2', 10)) == peeked
