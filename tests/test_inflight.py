"""Global concurrency: the queue argument x-max-in-flight = N, at most N messages of the queue
delivered and not yet settled over every consumer, enforced inside read.lua by counting the
queue's pending entries (less those parked by the holder, ~backoff and ~unfiled) wherever
the upper bound it keeps of that count (in-flight-bound) does not leave room for the whole
read; the rest stays ready in Redis. A read the limit stops removes the marker and raises
the queue's flag; the settle that frees a slot (ack, an ack riding in a read, dead letter,
requeue, reclaim) lowers it and sets the marker, so a waiting consumer wakes without
polling.

Scripts run on fakeredis, Redis 6.2 and 7.0 (``script_client``); the models on fakeredis.
docs/design.rst, "Global concurrency"."""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from helpers import STALE
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kombu import Connection, Consumer, Producer, Queue

from kombu_streams import plan
from kombu_streams.broker import GATED, POPPED, READ, Broker, Delivery, ReadResult
from kombu_streams.keys import Keys
from kombu_streams.limits import stored_pairs
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]
HOUR = 3_600_000
Q = ('q', None)


def broker(c: Any) -> Broker:
    return Broker(c, K, LEVELS)


def limited(c: Any, queue: str, n: Any) -> Broker:
    b = broker(c)
    b.declare(queue, stored_pairs(queue, {'x-max-in-flight': n}))
    return b


def body(n: Any) -> str:
    return json.dumps({'body': f'm{n}'})


def name_of(d: Delivery) -> str:
    return json.loads(d.payload)['body']


def bodies(result: ReadResult) -> list[str]:
    return [name_of(d) for d in result.deliveries]


def read(b: Broker, queues: Sequence[str], consumer: str, count: int, mode: str = READ,
         acks: Sequence[tuple[Any, ...]] = ()) -> ReadResult:
    """One read.lua call over ``queues`` as a channel lays it out, with riding ``acks``."""
    sources = b.sources(list(queues))
    call, parse = b.read_call(sources, consumer, count, 0, None, {s: mode for s in sources},
                              acks)
    return parse(b.run(call))


def ack(b: Broker, consumer: str, *ds: Delivery) -> int:
    return b.ack('q', [(d.stream, d.entry_id) for d in ds], None, consumer)


def in_flight(c: Any, queue: str = 'q') -> int:
    """What read.lua counts: pending entries less those parked by '~' consumers."""
    n = 0
    for level in LEVELS:
        key = K.stream(queue, level)
        if not c.exists(key):
            continue
        for p in c.xpending_range(key, queue, '-', '+', 10_000):
            name = p['consumer'].decode() if isinstance(p['consumer'], bytes) else p['consumer']
            n += not name.startswith('~')
    return n


# -- arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize('given, stored', [(1, '1'), (25, '25'), ('7', '7')])
def test_the_limit_is_stored_as_an_integer(given, stored):
    assert stored_pairs('q', {'x-max-in-flight': given}) == ['x-max-in-flight', stored]


@pytest.mark.parametrize('given', [0, -1, 2.5, '0', 'many', True, '1.5'])
def test_an_invalid_limit_is_named_at_declare(given):
    with pytest.raises(ValueError, match="queue 'q': argument x-max-in-flight=.* is not "
                                         'valid: an integer >= 1'):
        stored_pairs('q', {'x-max-in-flight': given})


# -- the limit in read.lua -----------------------------------------------------------------

def test_reads_stop_at_the_limit_and_an_ack_wakes_a_consumer(script_client):
    """N=2, 5 ready: a read of 10 gets 2, another consumer's gets 0; neither leaves the
    marker set (it would wake idle consumers only to be refused). The ack that frees one
    slot lowers the flag and sets the marker; the next read gets 1."""
    c = script_client
    b = limited(c, 'q', 2)
    for n in range(5):
        b.publish('q', 0, body(n))
    first = read(b, ['q'], 'c1', 10)
    assert bodies(first) == ['m0', 'm1'] and first.status[Q] == '0'
    assert c.exists(K.wake('q')) == 0 and c.exists(K.capped('q')) == 1
    assert 0 < c.pttl(K.capped('q')) <= HOUR
    second = read(b, ['q'], 'c2', 10)
    assert bodies(second) == [] and second.status[Q] == '0'
    assert c.exists(K.wake('q')) == 0
    assert read(b, ['q'], 'c2', 10, GATED).deliveries == []  # an idle one skips the queue
    assert ack(b, 'c1', first.deliveries[0]) == 1
    assert c.exists(K.wake('q')) == 1 and c.exists(K.capped('q')) == 0
    third = read(b, ['q'], 'c2', 10, GATED)
    assert bodies(third) == ['m2'] and c.exists(K.wake('q')) == 0
    assert in_flight(c) == 2 and b.size('q') == 2  # none lost: 2 ready, 2 in flight


def test_a_queue_without_the_argument_writes_no_flag(script_client):
    c = script_client
    b = broker(c)
    b.declare('q', stored_pairs('q', {'x-max-length': 100}))
    for n in range(3):
        b.publish('q', 0, body(n))
    r = read(b, ['q'], 'c1', 2)
    assert len(r.deliveries) == 2
    assert ack(b, 'c1', *r.deliveries) == 2
    assert c.exists(K.capped('q')) == 0 and c.exists(K.wake('q')) == 1


def test_acks_riding_in_a_read_free_slots_for_that_read(script_client):
    """N=1: the consumer's next read carries the ack of its message, and gets the next one
    in the same call; the queue is at its limit again, so no marker is left set."""
    c = script_client
    b = limited(c, 'q', 1)
    for n in range(3):
        b.publish('q', 0, body(n))
    [d] = read(b, ['q'], 'c1', 10).deliveries
    assert c.exists(K.capped('q')) == 1
    r = read(b, ['q'], 'c1', 10, POPPED, acks=[(d.stream, d.entry_id)])
    assert bodies(r) == ['m1'] and r.unsettled == {}
    assert c.exists(K.wake('q')) == 0 and c.exists(K.capped('q')) == 1
    assert in_flight(c) == 1 and c.xlen(K.stream('q', 0)) == 2


def test_an_ack_riding_in_another_queues_read_wakes_the_capped_one(script_client):
    """The ack of q's message (N=1) rides in a read that delivers nothing (COUNT 0): the slot
    it frees wakes a consumer waiting on q's marker."""
    c = script_client
    b = limited(c, 'q', 1)
    b.declare('r')
    for n in range(2):
        b.publish('q', 0, body(n))
    [d] = read(b, ['q'], 'c1', 10).deliveries
    assert c.exists(K.wake('q')) == 0
    r = read(b, ['r', 'q'], 'c1', 0, acks=[(d.stream, d.entry_id)])  # COUNT 0: acks only
    assert r.deliveries == []
    assert c.exists(K.wake('q')) == 1 and c.exists(K.capped('q')) == 0
    assert bodies(read(b, ['q'], 'c2', 10, GATED)) == ['m1']


@pytest.mark.parametrize('how', ['dead-letter', 'requeue', 'reclaim'])
def test_every_settle_that_frees_a_slot_wakes_a_consumer(script_client, how):
    """N=1 with work left: a reject to the dead-letter stream, a requeue, and the reclaim of
    a dead consumer's message each free the slot and set the marker."""
    c = script_client
    b = limited(c, 'q', 1)
    for n in range(3):
        b.publish('q', 0, body(n))
    [d] = read(b, ['q'], 'c1', 10).deliveries
    assert c.exists(K.wake('q')) == 0 and c.exists(K.capped('q')) == 1
    if how == 'dead-letter':
        assert b.dead_letter('q', d.stream, d.entry_id, 'why', 1, None, 'c1') == 1
        expected = 'm1'
    elif how == 'requeue':
        assert b.requeue('q', [(d.stream, d.entry_id)], None, 'c1') == 1
        expected = 'm0'  # requeued first
    else:  # c1 died: its entry idles past the lease, and the sweep gives it back
        c.xclaim(d.stream, 'q', 'c1', 0, [d.entry_id], idle=STALE, justid=True)
        assert b.reclaim('q', STALE // 2, 100).moved == 1
        expected = 'm0'
    assert c.exists(K.wake('q')) == 1 and c.exists(K.capped('q')) == 0
    assert in_flight(c) == 0
    assert bodies(read(b, ['q'], 'c2', 10, GATED)) == [expected]
    assert in_flight(c) == 1


def test_a_dead_consumers_reclaimed_messages_free_their_slots(script_client):
    c = script_client
    b = limited(c, 'q', 2)
    for n in range(4):
        b.publish('q', 0, body(n))
    got = read(b, ['q'], 'dead', 10).deliveries
    assert len(got) == 2 and read(b, ['q'], 'c2', 10).deliveries == []
    c.xclaim(K.stream('q', 0), 'q', 'dead', 0, [d.entry_id for d in got], idle=STALE,
             justid=True)
    assert b.reclaim('q', STALE // 2, 100).moved == 2
    again = read(b, ['q'], 'c2', 10, GATED)
    assert bodies(again) == ['m0']  # given back after a delivery: a suspect goes alone
    assert bodies(read(b, ['q'], 'c2', 10)) == ['m1']
    assert read(b, ['q'], 'c3', 10).deliveries == []  # 2 in flight again: c2's


def test_priorities_and_requeued_first_hold_under_the_limit(script_client):
    c = script_client
    b = limited(c, 'q', 1)
    b.publish('q', 9, body(1))
    b.publish('q', 0, body(2))
    b.publish('q', 3, body(3))
    order = []
    for _ in range(3):
        r = read(b, ['q'], 'c1', 10)
        order += bodies(r)
        assert read(b, ['q'], 'c2', 10).deliveries == []  # at the limit
        ack(b, 'c1', *r.deliveries)
    assert order == ['m2', 'm3', 'm1']
    b.publish('q', 3, body(4))
    b.publish('q', 3, body(5))
    [d] = read(b, ['q'], 'c1', 10).deliveries
    assert name_of(d) == 'm4'
    b.requeue('q', [(d.stream, d.entry_id)], None, 'c1')
    [again] = read(b, ['q'], 'c2', 10).deliveries
    assert again.entry_id == d.entry_id and again.deliveries == 2
    ack(b, 'c2', again)
    assert bodies(read(b, ['q'], 'c1', 10)) == ['m5']


def test_parked_messages_are_not_in_flight(script_client):
    """Requeued messages wait with the holder (delivered, not in flight): a queue of N=2
    with two of them still serves them, two at once but for suspects alone."""
    c = script_client
    b = limited(c, 'q', 2)
    for n in range(2):
        b.publish('q', 0, body(n))
    got = read(b, ['q'], 'c1', 10).deliveries
    b.requeue('q', [(d.stream, d.entry_id) for d in got], None, 'c1')
    assert in_flight(c) == 0
    first = read(b, ['q'], 'c2', 10).deliveries
    assert [name_of(d) for d in first] == ['m0']  # a suspect goes alone
    assert bodies(read(b, ['q'], 'c2', 10)) == ['m1']


BOUND = 'in-flight-bound'


def pending(c: Any, queue: str = 'q') -> int:
    """The group's pending entries over the queue's streams, parked ones too: what the kept
    bound must never be below."""
    return sum(c.xpending(K.stream(queue, lv), queue)['pending'] for lv in LEVELS
               if c.exists(K.stream(queue, lv)))


def bound(c: Any) -> int | None:
    """The upper bound of what is in flight read.lua keeps in the counters hash."""
    v = c.hget(K.counters('q'), BOUND)
    return None if v is None else int(v)


def test_far_below_the_limit_a_read_trusts_the_kept_bound(script_client):
    """N=100: the first read counts (no bound kept) and keeps what it leaves in flight; the
    next ones add what they deliver and take off what their riding acks free, without
    counting. A bound that is high (2 more than in flight: acks outside reads) stays high
    while it leaves room for the whole read."""
    c = script_client
    b = limited(c, 'q', 100)
    for n in range(10):
        b.publish('q', 0, body(n))
    first = read(b, ['q'], 'c1', 3).deliveries
    assert bound(c) == 3
    r = read(b, ['q'], 'c1', 2, acks=[(d.stream, d.entry_id) for d in first[:2]])
    assert len(r.deliveries) == 2 and bound(c) == 3 == in_flight(c)
    ack(b, 'c1', first[2])  # an ack of its own leaves the bound as it was
    c.hincrby(K.counters('q'), BOUND, 1)
    assert len(read(b, ['q'], 'c2', 4).deliveries) == 4
    assert bound(c) == 8 and in_flight(c) == 6


def test_near_the_limit_a_read_counts_and_keeps_the_count(script_client):
    """N=3 and a bound far too high (a crash between two scripts cannot leave one, a hand
    edit can): the read that would be stopped by it counts instead, delivers up to the
    limit and keeps the exact count; a bound below what the riding acks free counts too."""
    c = script_client
    b = limited(c, 'q', 3)
    for n in range(6):
        b.publish('q', 0, body(n))
    c.hset(K.counters('q'), BOUND, 50)
    got = read(b, ['q'], 'c1', 2).deliveries
    assert len(got) == 2 and bound(c) == 2
    c.hset(K.counters('q'), BOUND, 0)  # below the 2 its acks free
    r = read(b, ['q'], 'c1', 1, acks=[(d.stream, d.entry_id) for d in got])
    assert len(r.deliveries) == 1 and bound(c) == 1 == in_flight(c)


def test_acks_riding_in_a_read_take_off_only_the_slots_they_free(script_client):
    """N=6, c1 holds 2 and c2 holds 1 (bound 3); one of c1's is acked outside a read (the
    bound stays 3). c1's read of 3 carries the acks of both of its messages: only the one
    still pending frees a slot, so the bound it trusts is 2, and it keeps 5 (one more than
    the 4 in flight: the outside ack's)."""
    c = script_client
    b = limited(c, 'q', 6)
    for n in range(8):
        b.publish('q', 0, body(n))
    mine = read(b, ['q'], 'c1', 2).deliveries
    read(b, ['q'], 'c2', 1)
    assert bound(c) == 3
    ack(b, 'c1', mine[1])
    r = read(b, ['q'], 'c1', 3, acks=[(d.stream, d.entry_id) for d in mine])
    assert len(r.deliveries) == 3 and in_flight(c) == 4 and bound(c) == 5


@pytest.mark.parametrize('backoff', [False, True])
def test_a_trusted_ack_of_a_parked_message_leaves_the_bound_above_what_is_in_flight(
        script_client, backoff):
    """N=2. c1 holds X; an operator requeues X (whoever holds it), so X waits parked (with
    the holder, or with ~backoff under x-requeue-delay) while c1 still trusts it holds X.
    c2's read counts, takes A and B, and keeps the pending entries, X included, as the bound
    (3). c1's read then carries a trusted ack of X: XACK frees X, but the bound less it still
    covers the 2 in flight, so the read counts and delivers nothing."""
    c = script_client
    b = broker(c)
    args = {'x-max-in-flight': 2, **({'x-requeue-delay': '60000,60000'} if backoff else {})}
    b.declare('q', stored_pairs('q', args))
    b.publish('q', 9, body('X'))
    [x] = read(b, ['q'], 'c1', 1).deliveries
    assert b.requeue('q', [(x.stream, x.entry_id)]) == 1  # ANY_OWNER: an operator
    for n in 'ABC':
        b.publish('q', 0, body(n))
    assert bodies(read(b, ['q'], 'c2', 2)) == ['mA', 'mB'] and bound(c) == 3
    r = read(b, ['q'], 'c1', 1, acks=[(x.stream, x.entry_id, True)])
    assert r.deliveries == [] and in_flight(c) == 2 and bound(c) == 2


@pytest.mark.parametrize('why', ['no dead-letter stream', 'no big hash'])
def test_an_entry_parked_unfiled_by_a_read_is_in_the_bound(script_client, why):
    """An entry the read can neither deliver nor file (a malformed one while the
    dead-letter stream's name holds a string; a big message's while the big hash's does) is
    parked with ~unfiled: pending, never delivered. The bound the read keeps counts it with
    the 2 delivered, so it stays above what is pending."""
    c = script_client
    b = limited(c, 'q', 10)
    b.publish('q', 0, body('A'))
    if why == 'no dead-letter stream':
        c.xadd(K.stream('q', 0), {'x': '1'})  # no m field: to be set aside
        c.set(K.dlq('q'), 'not a stream')
    else:
        c.xadd(K.stream('q', 0), {'r': 'token'})
        c.set(K.big('q'), 'not a hash')
    b.publish('q', 0, body('B'))
    r = read(b, ['q'], 'c1', 3)
    assert bodies(r) == ['mA', 'mB'] and r.problems
    assert in_flight(c) == 2 and pending(c) == 3 and bound(c) == 3


def test_limits_drops_the_kept_bound(script_client):
    """While a queue has no x-max-in-flight its reads keep no bound: any change of its
    arguments drops the one kept, and the next read with a limit counts."""
    c = script_client
    b = limited(c, 'q', 5)
    for n in range(4):
        b.publish('q', 0, body(n))
    read(b, ['q'], 'c1', 1)
    assert bound(c) == 1
    b.run(b.limits_call('q', []))
    read(b, ['q'], 'c1', 2)
    assert bound(c) is None
    b.run(b.limits_call('q', stored_pairs('q', {'x-max-in-flight': 4})))
    assert bound(c) is None
    assert len(read(b, ['q'], 'c1', 5).deliveries) == 1 and bound(c) == 4


def test_a_limit_changed_at_run_time_is_read_by_the_next_read(script_client):
    c = script_client
    b = limited(c, 'q', 1)
    for n in range(4):
        b.publish('q', 0, body(n))
    assert len(read(b, ['q'], 'c1', 10).deliveries) == 1
    b.run(b.limits_call('q', stored_pairs('q', {'x-max-in-flight': 3})))
    assert len(read(b, ['q'], 'c1', 10).deliveries) == 2
    b.run(b.limits_call('q', []))
    assert len(read(b, ['q'], 'c1', 10).deliveries) == 1


def test_a_wrong_type_at_the_flag_or_a_bad_stored_limit_stops_that_queue_only(script_client):
    c = script_client
    b = limited(c, 'q', 1)
    b.declare('r')
    for n in range(2):
        b.publish('q', 0, body(n))
    b.publish('r', 0, body('r'))
    c.rpush(K.capped('q'), 'not ours')
    r = read(b, ['q', 'r'], 'c1', 10)
    assert bodies(r) == ['m0', 'mr']  # served, but the flag could not be raised:
    [(source, error)] = r.problems     # the marker stays (a wake-up is never lost)
    assert source == Q and K.capped('q') in error and r.status[Q] == 'e'
    assert c.lrange(K.capped('q'), 0, -1) == [b'not ours'] and c.exists(K.wake('q')) == 1
    c.delete(K.capped('q'))
    c.hset(K.args('q'), 'x-max-in-flight', 'lots')  # another program wrote it
    r = read(b, ['q'], 'c2', 10)
    assert r.deliveries == [] and 'invalid x-max-in-flight lots' in r.problems[0][1]
    assert c.xlen(K.stream('q', 0)) == 2


# -- the model -----------------------------------------------------------------------------

class LimitedQueue(RuleBasedStateMachine):
    """Publish, read (by two consumers, in each mode a channel uses: read, popped marker,
    gated on the marker; acks riding along), ack, reject to the dead-letter stream, requeue
    and reclaim a consumer as dead, on a queue with x-max-in-flight = 2: never more than 2
    delivered and unsettled, each read delivers exactly what is ready and fits (but for a
    requeued message going alone), ready work with a free slot always has its marker set
    (no wake-up lost), and every message is ready, in flight, acked or a dead letter."""

    N = 2

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.b = limited(self.c, 'q', self.N)
        self.n = 0
        self.in_flight: dict[str, tuple[str, Delivery]] = {}  # name -> (consumer, delivery)
        self.done: set[str] = set()  # acked
        self.dead: set[str] = set()  # dead letters
        self.requeued: set[str] = set()  # parked with the holder, delivered before
        # requeued by an operator while the consumer still trusts it holds them
        self.believed: dict[str, tuple[str, Delivery]] = {}

    def ready(self) -> int:
        return self.n - len(self.in_flight) - len(self.done) - len(self.dead)

    @rule(level=st.sampled_from(LEVELS))
    def publish(self, level: int) -> None:
        self.n += 1
        self.b.publish('q', level, body(self.n))

    @rule(consumer=st.sampled_from(['c1', 'c2']), count=st.integers(1, 3),
          mode=st.sampled_from([READ, POPPED, GATED]), ride=st.booleans())
    def read(self, consumer: str, count: int, mode: str, ride: bool) -> None:
        if mode == POPPED and not self.c.zpopmin(K.wake('q')):
            return  # its wait would go on: nothing to read
        flagged = self.c.exists(K.capped('q'))
        riding: list[tuple[Any, ...]] = []
        if ride:  # the channel's acks of this consumer's messages go with its read, trusted
            for name, (who, d) in list(self.in_flight.items()):
                if who == consumer:
                    riding.append((d.stream, d.entry_id, True))
                    self.done.add(name)
                    del self.in_flight[name]
            for name, (who, d) in list(self.believed.items()):  # parked since: acked too
                if who == consumer:
                    riding.append((d.stream, d.entry_id, True))
                    self.done.add(name)
                    self.requeued.discard(name)
                    del self.believed[name]
        # acks that free a slot of a flagged queue set its marker before the gate is looked at
        marked = mode != GATED or self.c.exists(K.wake('q')) or (riding and flagged)
        expected = min(count, self.ready(), self.N - len(self.in_flight)) if marked else 0
        got = read(self.b, ['q'], consumer, count, mode, riding).deliveries
        if self.requeued and expected:  # one delivered before goes alone: maybe fewer
            assert 1 <= len(got) <= expected
        else:
            assert len(got) == expected, (len(got), expected)
        for d in got:
            self.in_flight[name_of(d)] = (consumer, d)
            self.requeued.discard(name_of(d))
            self.believed.pop(name_of(d), None)  # delivered again: that belief is over

    @precondition(lambda self: self.in_flight)
    @rule(how=st.sampled_from(['ack', 'reject', 'requeue']), data=st.data())
    def settle(self, how: str, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        consumer, d = self.in_flight.pop(name)
        if how == 'ack':
            assert ack(self.b, consumer, d) == 1
            self.done.add(name)
        elif how == 'reject':
            assert self.b.dead_letter('q', d.stream, d.entry_id, 'why', d.deliveries, None,
                                      consumer) == 1
            self.dead.add(name)
        else:
            assert self.b.requeue('q', [(d.stream, d.entry_id)], None, consumer) == 1
            self.requeued.add(name)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def operator_acks(self, data: Any) -> None:
        """An operator acks whoever owns it: the kept bound is left high (a read counts)."""
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        _, d = self.in_flight.pop(name)
        assert self.b.ack('q', [(d.stream, d.entry_id)]) == 1
        self.done.add(name)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def operator_requeues(self, data: Any) -> None:
        """Parked with the holder by an operator: its consumer still trusts it holds it and
        acks it, trusted, in a later read (that XACK frees a parked entry)."""
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        consumer, d = self.in_flight.pop(name)
        assert self.b.requeue('q', [(d.stream, d.entry_id)]) == 1
        self.requeued.add(name)
        self.believed[name] = (consumer, d)

    @rule(by=st.integers(0, 6))
    def bound_drifts(self, by: int) -> None:
        """The bound read.lua keeps goes high (acks outside reads, a hand edit) or, by
        0, goes (a flushed field): a read must count again, never deliver past the limit."""
        if by:
            if self.c.hexists(K.counters('q'), 'in-flight-bound'):
                self.c.hincrby(K.counters('q'), 'in-flight-bound', by)
        else:
            self.c.hdel(K.counters('q'), 'in-flight-bound')

    @precondition(lambda self: self.in_flight)
    @rule(consumer=st.sampled_from(['c1', 'c2']))
    def consumer_dies(self, consumer: str) -> None:
        """Its messages idle past the lease; reclaim's sweep gives them back."""
        mine = {n: d for n, (who, d) in self.in_flight.items() if who == consumer}
        for d in mine.values():
            self.c.xclaim(d.stream, 'q', consumer, 0, [d.entry_id], idle=STALE, justid=True)
        assert self.b.reclaim('q', STALE // 2, 100).moved == len(mine)
        for name in mine:
            del self.in_flight[name]
            self.requeued.add(name)

    @invariant()
    def never_more_than_n_in_flight(self) -> None:
        assert len(self.in_flight) <= self.N
        assert in_flight(self.c) == len(self.in_flight)

    @invariant()
    def the_kept_bound_is_never_below_what_is_pending(self) -> None:
        kept = self.c.hget(K.counters('q'), 'in-flight-bound')
        assert kept is None or int(kept) >= pending(self.c) >= len(self.in_flight)

    @invariant()
    def no_wake_up_lost(self) -> None:
        if self.ready() > 0 and len(self.in_flight) < self.N:
            assert self.c.exists(K.wake('q')), 'ready work, a free slot and no marker'

    @invariant()
    def none_lost(self) -> None:
        stored = {json.loads(f[b'm'])['body'] for lv in LEVELS
                  for _, f in self.c.xrange(K.stream('q', lv))}
        letters = {json.loads(f[b'f:m'])['body'] for _, f in self.c.xrange(K.dlq('q'))}
        assert not (stored & (self.done | self.dead)) and letters == self.dead
        assert stored | self.done | self.dead == {f'm{i}' for i in range(1, self.n + 1)}
        assert set(self.in_flight) <= stored


TestLimitedQueue = LimitedQueue.TestCase
TestLimitedQueue.settings = settings(PROPERTY, stateful_step_count=40)


class RoomyQueue(LimitedQueue):
    """The same with room for several reads (x-max-in-flight = 4, reads of 1 to 3): most
    reads trust the kept bound, the rest count."""

    N = 4


TestRoomyQueue = RoomyQueue.TestCase
TestRoomyQueue.settings = settings(PROPERTY, stateful_step_count=40)


# -- Kombu, the CLI ------------------------------------------------------------------------

def _script_calls(c: Any) -> int:
    stats = c.info('commandstats')
    return sum(int(stats.get(f'cmdstat_{name}', {}).get('calls', 0))
               for name in ('evalsha', 'eval'))


def test_a_consumer_gets_the_next_message_only_after_its_ack(url, redis_url, monkeypatch):
    """N=1 and prefetch 10: the consumer holds one message; waiting for more times out
    (the queue is at its limit: nothing is delivered, and no read spins). Once it acks,
    the ack sets the marker and the wait returns the next message at once. Without the
    wake-up only the safety nets would bring it: a wait of 30 s (polling_interval) and
    the sweep, put off here to an hour."""
    monkeypatch.setattr(plan, 'SWEEP_INTERVAL', 3600.0)
    c = redis.Redis.from_url(redis_url)
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append((body, message))

    with Connection(url, transport_options={'polling_interval': 30}) as conn:
        queue = Queue('one', queue_arguments={'x-max-in-flight': 1})
        producer = Producer(conn.default_channel, serializer='json')
        for n in range(2):
            producer.publish({'n': n}, routing_key='one', declare=[queue])
        channel = conn.channel()
        with Consumer(channel, [queue], callbacks=[on_message], accept=['json'],
                      prefetch_count=10):
            conn.drain_events(timeout=5)
            assert [b for b, _ in got] == [{'n': 0}]
            before = _script_calls(c)
            with pytest.raises(socket.timeout):  # TimeoutError from Python 3.10
                conn.drain_events(timeout=0.5)
            assert len(got) == 1
            got[0][1].ack()
            conn.drain_events(timeout=5)
            assert [b for b, _ in got] == [{'n': 0}, {'n': 1}]
            calls = _script_calls(c) - before
            assert calls <= 10, calls
            got[1][1].ack()


def test_kombu_declares_the_limit_and_the_cli_changes_it(url, redis_url):
    from tests.test_cli import cli, cli_json
    c = redis.Redis.from_url(redis_url)
    with Connection(url) as conn:
        Queue('lq', queue_arguments={'x-max-in-flight': 4})(conn.default_channel).declare()
        assert broker(c).limits('lq') == {'x-max-in-flight': 4}
        with pytest.raises(ValueError, match="'lq2': argument x-max-in-flight=0"):
            Queue('lq2', queue_arguments={'x-max-in-flight': 0})(
                conn.default_channel).declare()
    out = cli(redis_url, 'limits', 'lq', '--set', 'x-max-in-flight=2')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'lq: x-max-in-flight=2'
    b = broker(c)
    for n in range(5):
        b.publish('lq', 0, body(n))
    assert len(read(b, ['lq'], 'c1', 10).deliveries) == 2
    assert c.hget(K.counters('lq'), 'in-flight-bound') == b'2'  # the scripts' state, not
    assert cli(redis_url, 'limits', 'lq').stdout.strip() == 'lq: x-max-in-flight=2'  # shown
    c.hset(K.counters('lq'), mapping={'in-flight-bound': 'x', 'expired': 'y', 'refused': 3})
    assert cli_json(redis_url, 'limits', 'lq')['counters'] == {'refused': 3}  # nor garbage
    assert cli_json(redis_url, 'status', 'lq')['queues'][0]['counters'] == {'refused': 3}
    bad = cli(redis_url, 'limits', 'lq', '--set', 'x-max-in-flight=none')
    assert bad.returncode == 2 and 'x-max-in-flight' in bad.stderr
