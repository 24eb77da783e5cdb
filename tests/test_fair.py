"""Fair share between tenants: a queue with x-fairness 'round-robin' stages each message in
its group's FIFO (header x-group; none: the default group) and a read moves staged messages
into the level's stream in rotation order just before reading them (lua/lib/fair.lua), so
within each priority level deliveries rotate between the groups with messages waiting.

Scripts run on fakeredis, Redis 6.2 and 7.0 (``script_client``); the model on fakeredis.
docs/design.rst, "Fair share".
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

import pytest
from conftest import requires_batch_publish
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kombu import Connection, Consumer, Producer, Queue

from kombu_streams.broker import GATED, READ, WALK, Broker, Delivery, ReadResult
from kombu_streams.keys import Keys
from kombu_streams.limits import stored_pairs
from tests.test_scripts import PROPERTY
from tests.test_unique import keys_of

K = Keys()
LEVELS = [0, 3, 6, 9]
FAIR = {'x-fairness': 'round-robin'}


def fair_broker(c: Any, queue: str = 'q', args: dict[str, Any] | None = None) -> Broker:
    b = Broker(c, K, LEVELS)
    b.declare(queue, stored_pairs(queue, FAIR if args is None else args))
    return b


def body(group: str | None, n: Any) -> str:
    return json.dumps({'body': f'{group}:{n}'})


def publish(b: Broker, group: str | None, n: Any, level: int = 0, queue: str = 'q') -> Any:
    return b.publish(queue, level, body(group, n), group=group)


def read(b: Broker, consumer: str, count: int, mode: str = READ,
         queues: Sequence[str] = ('q',)) -> ReadResult:
    sources = b.sources(list(queues))
    call, parse = b.read_call(sources, consumer, count, 0, None, {s: mode for s in sources})
    return parse(b.run(call))


def names(result: ReadResult) -> list[str]:
    return [json.loads(d.payload)['body'] for d in result.deliveries]


def ack(b: Broker, *ds: Delivery) -> int:
    return b.ack('q', [(d.stream, d.entry_id) for d in ds])


def test_groups_take_turns(script_client):
    b = fair_broker(script_client)
    for n in range(3):
        assert publish(b, 'a', n) == b'staged'
    publish(b, 'b', 0)
    publish(b, 'c', 0)
    publish(b, 'b', 1)
    got = []
    for _ in range(6):
        r = read(b, 'c1', 1)
        got += names(r)
        ack(b, *r.deliveries)
    # the rotation: a was first, b and c joined behind it; each group's order is kept
    assert got == ['a:0', 'b:0', 'c:0', 'a:1', 'b:1', 'a:2']
    assert names(read(b, 'c1', 5)) == []
    assert script_client.exists(K.fair('q')) == 0  # everything moved: the hash is gone


def test_peek_shows_staged_messages_in_the_order_reads_deliver_them(script_client,
                                                                    monkeypatch):
    """peek.lua shows a level's staged messages after its stream entries, in the order the
    rotation will move them, with no entry id; page by page too (a call per message);
    changing nothing. A read then delivers exactly that order."""
    c = script_client
    b = fair_broker(c)
    for n in range(3):
        publish(b, 'a', n)
    publish(b, 'b', 0)
    publish(b, 'c', 0, level=3)
    publish(b, 'b', 1)
    got = read(b, 'c1', 1)  # a:0 moved to the stream and delivered: not ready any more
    assert names(got) == ['a:0']
    publish(b, 'c', 1, level=3)
    before = sorted(c.hgetall(K.fair('q')).items())
    peeked = b.peek('q', 100)
    assert sorted(c.hgetall(K.fair('q')).items()) == before
    assert [(m.level, json.loads(m.payload)['body'], m.staged, m.entry_id)
            for m in peeked] == [(0, 'b:0', True, ''), (0, 'a:1', True, ''),
                                 (0, 'b:1', True, ''), (0, 'a:2', True, ''),
                                 (3, 'c:0', True, ''), (3, 'c:1', True, '')]
    assert all(not m.requeued for m in peeked)
    monkeypatch.setattr('kombu_streams.broker.PEEK_MAX', 1)  # a call per message
    assert b.peek('q', 100) == peeked
    assert b.peek('q', 3) == peeked[:3]
    served = []
    while True:
        r = read(b, 'c2', 1)
        if not r.deliveries:
            break
        served += names(r)
    assert served == [json.loads(m.payload)['body'] for m in peeked]
    assert b.peek('q', 10) == []


@pytest.mark.parametrize('keys', [False, True])
def test_quiet_group_not_stuck_behind_noisy_one(script_client, keys):
    """Also when the noisy group's messages each hold an x-unique-key (they are staged
    like any other, so the key buys no place ahead of the rotation)."""
    b = fair_broker(script_client)
    for n in range(1000):
        if keys:
            b.publish('q', 0, body('noisy', n), group='noisy', unique_key=f'k{n}')
        else:
            publish(b, 'noisy', n)
    for n in range(10):
        publish(b, 'quiet', n)
    got: list[str] = []
    while len([g for g in got if g.startswith('quiet')]) < 10:
        r = read(b, 'c1', 1)
        assert r.deliveries
        got += names(r)
        ack(b, *r.deliveries)
    # every other delivery is the quiet group's: one per active group per turn
    assert [i for i, g in enumerate(got) if g.startswith('quiet')] == list(range(1, 20, 2))
    noisy = [int(g.split(':')[1]) for g in got if g.startswith('noisy')]
    assert noisy == sorted(noisy)


def test_a_batch_read_rotates_too(script_client):
    b = fair_broker(script_client)
    for n in range(5):
        publish(b, 'a', n)
    for n in range(2):
        publish(b, 'b', n)
    assert names(read(b, 'c1', 4)) == ['a:0', 'b:0', 'a:1', 'b:1']
    assert names(read(b, 'c1', 10)) == ['a:2', 'a:3', 'a:4']


def test_priorities_across_levels_kept(script_client):
    b = fair_broker(script_client)
    publish(b, 'a', 'low', level=9)
    publish(b, 'b', 'low', level=9)
    publish(b, 'a', 'high', level=0)
    publish(b, 'c', 'mid', level=3)
    assert names(read(b, 'c1', 10)) == ['a:high', 'c:mid', 'a:low', 'b:low']


def test_requeued_first_then_rotation(script_client):
    b = fair_broker(script_client)
    for n in range(2):
        publish(b, 'a', n)
        publish(b, 'b', n)
    first = read(b, 'c1', 1).deliveries
    assert [json.loads(d.payload)['body'] for d in first] == ['a:0']
    b.requeue('q', [(d.stream, d.entry_id) for d in first])
    r = read(b, 'c1', 1)
    assert names(r) == ['a:0'] and r.deliveries[0].deliveries == 2
    assert names(read(b, 'c1', 10)) == ['b:0', 'a:1', 'b:1']


def test_no_group_is_the_default_group(script_client):
    b = fair_broker(script_client)
    publish(b, 'a', 0)
    publish(b, 'a', 1)
    # a publisher that does not know the queue is fair: NEEDKEYS, then the default group
    fresh = Broker(script_client, K, LEVELS)
    assert fresh.publish('q', 0, body(None, 0)) == b'staged'
    assert names(read(b, 'c1', 10)) == ['a:0', 'None:0', 'a:1']


def test_group_on_a_queue_without_fairness_is_ignored(script_client):
    b = fair_broker(script_client, args={})
    reply = publish(b, 'a', 0)
    assert reply != b'staged'
    assert script_client.xlen(K.stream('q', 0)) == 1
    assert script_client.exists(K.fair('q')) == 0
    assert names(read(b, 'c1', 10)) == ['a:0']


def test_declare_validates_the_argument():
    with pytest.raises(ValueError, match='round-robin'):
        stored_pairs('q', {'x-fairness': 'weighted'})
    with pytest.raises(ValueError, match='x-max-length only with x-overflow reject-publish'):
        stored_pairs('q', {'x-fairness': 'round-robin', 'x-max-length': 10})
    assert stored_pairs('q', {**FAIR, 'x-max-length': 10, 'x-overflow': 'reject-publish'})
    assert stored_pairs('q', FAIR) == ['x-fairness', 'round-robin']
    with pytest.raises(ValueError, match='not valid with x-priority-aging'):
        stored_pairs('q', {**FAIR, 'x-priority-aging': 1000})


def test_ttl_travels_with_a_staged_message(script_client):
    b = fair_broker(script_client, args={**FAIR, 'x-message-ttl': 1})
    publish(b, 'a', 0)
    fields = script_client.hgetall(K.fair('q'))
    staged = [v for f, v in fields.items() if f.startswith(b'm:')]
    assert len(staged) == 1 and staged[0].startswith(b'e:')
    # moved as an entry with field e: read after its deadline, it is set aside
    script_client.hset(K.fair('q'), next(f for f in fields if f.startswith(b'm:')),
                       b'e:1:' + body('a', 0).encode())
    r = read(b, 'c1', 10)
    assert names(r) == [] and [a[3] for a in r.aside] == ['expired']


def test_walk_finds_staged_messages_without_an_index(script_client):
    b = fair_broker(script_client)
    publish(b, 'a', 0)
    publish(b, 'b', 0)
    script_client.delete(K.ready('q'))  # lost index (FLUSH of a replica, by hand)
    assert names(read(b, 'c1', 10, WALK)) == ['a:0', 'b:0']


def test_marker_stays_while_staged_messages_wait(script_client):
    b = fair_broker(script_client)
    for n in range(3):
        publish(b, 'a', n)
    assert script_client.exists(K.wake('q'))
    read(b, 'c1', 1)
    assert script_client.exists(K.wake('q'))  # 2 staged left: the marker stays
    read(b, 'c1', 5)
    read(b, 'c1', 5)
    assert not script_client.exists(K.wake('q'))  # seen dry: removed


def test_many_groups_read_is_bounded(script_client):
    b = fair_broker(script_client)
    for g in range(300):
        publish(b, f'g{g}', 0)
    r = read(b, 'c1', 2)
    assert names(r) == ['g0:0', 'g1:0']
    assert script_client.xlen(K.stream('q', 0)) == 2  # only what the read delivered moved


def test_purge_removes_staged_messages_and_their_bodies(script_client):
    b = fair_broker(script_client)
    for n in range(5):
        publish(b, 'a', n)
        publish(b, 'b', n, level=3)
    b.publish_big('q', 0, body('big', 0), group='c')
    assert b.size('q') == 11
    got = read(b, 'c1', 1).deliveries  # in flight: purge leaves it
    assert b.purge('q', batch=2) == 10
    assert script_client.exists(K.fair('q')) == 0
    assert script_client.hlen(K.big('q')) == 0  # the big one's body went with it
    assert b.size('q') == 0
    assert names(read(b, 'c1', 10)) == []
    assert ack(b, *got) == 1
    publish(b, 'a', 'after')  # the rotation starts afresh
    assert names(read(b, 'c1', 10)) == ['a:after']


def test_delete_removes_the_staging_hash(script_client):
    b = fair_broker(script_client)
    publish(b, 'a', 0)
    assert script_client.exists(K.fair('q')) == 1
    b.delete('q')
    assert script_client.exists(K.fair('q')) == 0
    assert b.publish('q', 0, body('a', 1), routed=True, group='a') is None  # stays deleted


def test_big_message_staged_and_delivered(script_client):
    b = fair_broker(script_client)
    publish(b, 'a', 0)
    b.publish_big('q', 0, body('a', 'big'), group='a')
    got = read(b, 'c1', 10).deliveries
    assert [d.token is not None for d in got] == [False, True]
    assert b.bodies('q', [got[1].token]) == [body('a', 'big').encode()]


def test_a_delayed_message_joins_its_group_when_due(script_client):
    from kombu_streams.broker import Delay
    b = fair_broker(script_client)
    publish(b, 'a', 0)
    reply = b.publish('q', 0, body('a', 'later'), delay=Delay('+600000', 0), group='a')
    assert reply.startswith(b'delayed:')
    member = reply[len(b'delayed:'):]
    assert script_client.hget(K.fair('q'), b'd:' + member) == b'a'
    publish(b, 'b', 0)
    publish(b, 'b', 1)
    script_client.zadd(K.delayed('q'), {member: 0})  # due now, without waiting
    # staged behind a:0 in a's FIFO when the read moved it, then served in rotation
    assert names(read(b, 'c1', 10)) == ['a:0', 'b:0', 'a:later', 'b:1']
    assert script_client.exists(K.fair('q')) == 0  # nothing left behind


def test_cancel_and_purge_remove_a_delayed_messages_group(script_client):
    from kombu_streams.broker import Delay
    b = fair_broker(script_client)
    b.publish('q', 0, body('a', 0), delay=Delay('+600000', 0, 'task-1'), group='a')
    b.publish('q', 0, body('a', 1), delay=Delay('+600000', 0, 'task-2'), group='a')
    assert len(b.cancel('q', ['task-1'])) == 1
    assert [f for f in script_client.hkeys(K.fair('q'))] == [
        b'd:' + m for m in script_client.zrange(K.delayed('q'), 0, -1)]
    assert b.purge('q') == 1
    assert script_client.exists(K.fair('q')) == 0


def keyed(b: Broker, group: str, n: Any, key: str, **kw: Any) -> Any:
    """Publish message ``group:n`` holding unique key ``key``."""
    return b.publish('q', kw.pop('level', 0), body(group, n), group=group, unique_key=key, **kw)


def ref(c: Any, key: str) -> bytes:
    """Where the key store says the message holding ``key`` is (b'' when free)."""
    return c.hget(K.unique('q'), f'k:{key}') or b''


def test_a_keyed_message_is_staged_and_keeps_its_key(script_client):
    """Keyed or not, a fair queue's message waits in its group's FIFO: the key store names
    the staged message, then its entry once a read moved it, until its ack."""
    c = script_client
    b = fair_broker(c)
    assert keyed(b, 'a', 0, 'k') == b'staged'
    assert ref(c, 'k') == b'g:0:m:0:a:1'
    assert c.hget(K.unique('q'), 'g:m:0:a:1') == b'k'  # the reverse field
    assert keyed(b, 'a', 1, 'k') == b'duplicate'
    (d,) = read(b, 'c1', 10).deliveries
    assert ref(c, 'k').startswith(b's:0:0:') and not c.hexists(K.unique('q'), 'g:m:0:a:1')
    assert keyed(b, 'b', 0, 'k') == b'duplicate'  # in flight: still held
    b.ack('q', [(d.stream, d.entry_id)], consumer='c1', unique=['k'])
    assert ref(c, 'k') == b'' and keyed(b, 'b', 1, 'k') == b'staged'


def test_keyed_messages_take_turns_with_the_other_groups(script_client):
    b = fair_broker(script_client)
    for n in range(3):
        keyed(b, 'a', n, f'k{n}')
    publish(b, 'b', 0)
    assert names(read(b, 'c1', 10)) == ['a:0', 'b:0', 'a:1', 'a:2']


def test_replace_replaces_a_staged_message(script_client):
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-unique-mode': 'replace'})
    keyed(b, 'a', 0, 'k')
    publish(b, 'b', 0)
    assert keyed(b, 'a', 1, 'k') == b'staged'  # a:0 goes, a:1 waits behind b:0
    assert c.hget(K.fair('q'), 'n') == b'2'
    assert [json.loads(m.payload)['body'] for m in b.peek('q', 10)] == ['b:0', 'a:1']
    assert names(read(b, 'c1', 10)) == ['b:0', 'a:1']
    assert c.exists(K.fair('q')) == 0 and ref(c, 'k').startswith(b's:')


def test_a_read_passes_over_many_gaps_a_bounded_number_per_call(script_client):
    """Every replaced staged message leaves a gap in its group: a read passes over at most
    its set-aside budget of them (COUNT + 100) and leaves its marker set for the rest."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-unique-mode': 'replace'})
    for n in range(150):
        keyed(b, 'a', n, 'k')  # each replaces the one before: 149 gaps, then a:149
    c.delete(K.wake('q'))  # popped by the wait the read follows
    got = read(b, 'c1', 1, mode='p')
    assert names(got) == [] and got.status[('q', None)] == '1'
    assert c.zcard(K.wake('q')) == 1  # set again: the next read goes on
    assert names(read(b, 'c1', 1)) == ['a:149']


def test_purge_releases_the_keys_of_staged_messages(script_client):
    c = script_client
    b = fair_broker(c)
    keyed(b, 'a', 0, 'k')
    keyed(b, 'b', 0, 'other')
    assert b.purge('q') == 2
    assert keys_of(c) == {}
    assert keyed(b, 'a', 1, 'k') == b'staged'


def test_a_staged_holder_gone_behind_our_back_frees_its_key(script_client):
    c = script_client
    b = fair_broker(c)
    keyed(b, 'a', 0, 'k')
    c.hdel(K.fair('q'), 'm:0:a:1')  # not by our scripts: the look finds it gone
    assert keyed(b, 'a', 1, 'k') == b'staged'
    assert ref(c, 'k') == b'g:0:m:0:a:2' and not c.hexists(K.unique('q'), 'g:m:0:a:1')


@pytest.mark.parametrize('mode', ['keep-first', 'replace'])
def test_a_field_name_used_again_is_not_the_old_keys_message(script_client, mode):
    """A staged holder deleted behind our back; its group runs dry and its field's name
    comes back with another message: the old key is free, and that message is neither
    refused for it, replaced by it, nor taken as its holder when a read moves it."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-unique-mode': mode})
    keyed(b, 'a', 0, 'k')
    c.hdel(K.fair('q'), 'm:0:a:1')
    c.hincrby(K.fair('q'), 'n', -1)
    assert names(read(b, 'c1', 10)) == []  # passes the gap: a runs dry
    assert publish(b, 'a', 'x') == b'staged'  # at m:0:a:1 again
    assert keyed(b, 'z', 0, 'k') == b'staged'  # free: stored, and a:x is not replaced
    assert sorted(names(read(b, 'c1', 10))) == ['a:x', 'z:0']
    assert ref(c, 'k').startswith(b's:0:0:')
    assert keyed(b, 'y', 0, 'k') == b'duplicate'  # z:0 holds it, in flight


def test_a_keyed_delayed_message_is_staged_when_due_and_keeps_its_key(script_client):
    from kombu_streams.broker import Delay
    c = script_client
    b = fair_broker(c)
    member = keyed(b, 'a', 0, 'k', delay=Delay('+600000', 0, 'later'))[len(b'delayed:'):]
    assert ref(c, 'k') == b'd:0:' + member
    assert c.hget(K.fair('q'), b'd:' + member) == b'a'  # its group, staged when due
    publish(b, 'b', 0)
    publish(b, 'b', 1)
    c.zadd(K.delayed('q'), {member: 0})  # due now
    assert names(read(b, 'c1', 1)) == ['b:0']  # the read stages it behind b's turn
    assert ref(c, 'k').startswith(b'g:0:m:0:a:')
    assert keyed(b, 'c', 0, 'k') == b'duplicate'
    assert names(read(b, 'c1', 10)) == ['a:0', 'b:1']
    assert ref(c, 'k').startswith(b's:0:0:')


def grouped_body(group: str, n: Any, key: str = '') -> str:
    """A message as Kombu stores it, its x-group (and x-unique-key) in its headers: a dead
    letter's are read from there when it is redriven."""
    headers = {'x-group': group, **({'x-unique-key': key} if key else {})}
    return json.dumps({'body': f'{group}:{n}', 'headers': headers})


def test_a_redriven_letter_takes_its_groups_turn(script_client):
    """A dead letter of group b goes back staged in b, not to the front of its stream: it
    takes b's turn among a's waiting messages."""
    c = script_client
    b = fair_broker(c)
    for n in range(3):
        b.publish('q', 0, grouped_body('a', n), group='a')
    b.publish('q', 0, grouped_body('b', 0), group='b')
    got = read(b, 'c1', 2).deliveries
    assert names(ReadResult(got, {}, [], [], {}, {})) == ['a:0', 'b:0']
    ack(b, got[0])
    b.dead_letter('q', got[1].stream, got[1].entry_id, 'rejected', 1, None, 'c1')
    assert b.redrive('q', 10) == (1, 0, 0)
    assert c.xlen(K.stream('q', 0)) == 0 and c.hget(K.fair('q'), 'n') == b'3'
    assert names(read(b, 'c1', 10)) == ['a:1', 'b:0', 'a:2']


def test_a_redriven_keyed_letter_of_a_fair_queue_holds_its_key_staged(script_client):
    c = script_client
    b = fair_broker(c)
    b.publish('q', 3, grouped_body('a', 0, 'k'), group='a', unique_key='k')
    (d,) = read(b, 'c1', 1).deliveries
    b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, 'c1', 'k')
    assert b.redrive('q', 10) == (1, 0, 0)
    assert ref(c, 'k').startswith(b'g:0:m:3:a:')
    assert keyed(b, 'b', 0, 'k') == b'duplicate'
    assert names(read(b, 'c1', 10)) == ['a:0'] and ref(c, 'k').startswith(b's:0:3:')


def test_a_letter_whose_key_a_staged_message_holds_stays(script_client):
    c = script_client
    b = fair_broker(c)
    b.publish('q', 0, json.dumps({'body': 'a:0', 'headers': {'x-unique-key': 'k'}}),
              group='a', unique_key='k')
    (d,) = read(b, 'c1', 1).deliveries
    b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, 'c1', 'k')
    assert keyed(b, 'a', 1, 'k') == b'staged'
    assert b.redrive('q', 10) == (0, 0, 1)
    names(read(b, 'c1', 10))
    assert b.redrive('q', 10) == (0, 0, 1)  # delivered, not acked: still held


class FairQueue(RuleBasedStateMachine):
    """Publish with groups at two levels, read (1 to 3 at a time), ack, reject with requeue
    and purge, on a queue with x-fairness: every message is staged, in a stream, acked or
    purged, never two of those; first deliveries of each level follow an exact model of the
    rotation (so a waiting group is served within one turn of every active group, and each
    group's order is kept); a read delivers what it may (COUNT, or everything ready); ready
    work always has its marker."""

    GROUPS = ('a', 'b', 'c', '')
    MODEL_LEVELS = (0, 3)

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.b = fair_broker(self.c)
        self.n = 0
        # per level: the rotation (next group first) and each group's FIFO of names
        self.rot: dict[int, list[str]] = {lv: [] for lv in self.MODEL_LEVELS}
        self.fifo: dict[int, dict[str, list[str]]] = {lv: {} for lv in self.MODEL_LEVELS}
        self.requeued: list[tuple[int, str]] = []  # parked: (level, name)
        self.in_flight: dict[str, Delivery] = {}
        self.gone: set[str] = set()  # acked or purged

    def staged(self) -> int:
        return sum(len(q) for lv in self.fifo.values() for q in lv.values())

    def ready(self) -> int:
        return self.staged() + len(self.requeued)

    @rule(group=st.sampled_from(GROUPS), level=st.sampled_from(MODEL_LEVELS))
    def publish(self, group: str, level: int) -> None:
        self.n += 1
        name = f'm{self.n}'
        self.b.publish('q', level, json.dumps({'body': name}), group=group)
        fifo = self.fifo[level].setdefault(group, [])
        if not fifo:
            self.rot[level].append(group)
        fifo.append(name)

    def _next_fresh(self, level: int) -> str:
        group = self.rot[level].pop(0)
        name = self.fifo[level][group].pop(0)
        if self.fifo[level][group]:
            self.rot[level].append(group)
        return name

    @rule(count=st.integers(1, 3), mode=st.sampled_from([READ, WALK, GATED]),
          lose_index=st.booleans())
    def read(self, count: int, mode: str, lose_index: bool) -> None:
        if lose_index and mode == WALK:  # a walk rebuilds it, staged levels included
            self.c.delete(K.ready('q'))
        got = read(self.b, 'c1', count, mode).deliveries
        if not self.requeued:
            assert len(got) == min(count, self.ready())
        else:
            assert 1 <= len(got) <= min(count, self.ready())
        for d in got:
            name = json.loads(d.payload)['body']
            if d.deliveries == 1:  # fresh: the rotation's next at its level
                assert name == self._next_fresh(d.level), name
            else:
                assert (d.level, name) in self.requeued
                self.requeued.remove((d.level, name))
            self.in_flight[name] = d

    @precondition(lambda self: self.in_flight)
    @rule(requeue=st.booleans(), data=st.data())
    def settle(self, requeue: bool, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.in_flight)))
        d = self.in_flight.pop(name)
        if requeue:
            assert self.b.requeue('q', [(d.stream, d.entry_id)]) == 1
            self.requeued.append((d.level, name))
        else:
            assert ack(self.b, d) == 1
            self.gone.add(name)

    @rule()
    def purge(self) -> None:
        assert self.b.purge('q', batch=2) == self.ready()
        for lv in self.MODEL_LEVELS:
            for q in self.fifo[lv].values():
                self.gone.update(q)
            self.fifo[lv], self.rot[lv] = {}, []
        self.gone.update(name for _, name in self.requeued)
        self.requeued = []

    @invariant()
    def none_lost(self) -> None:
        stored = {json.loads(f[b'm'])['body'] for lv in LEVELS
                  for _, f in self.c.xrange(K.stream('q', lv))}
        staged = {json.loads(v)['body'] for f, v in self.c.hgetall(K.fair('q')).items()
                  if f.startswith(b'm:')}
        assert not stored & staged and not (stored | staged) & self.gone
        assert stored | staged | self.gone == {f'm{i}' for i in range(1, self.n + 1)}
        assert len(staged) == self.staged() == int(self.c.hget(K.fair('q'), 'n') or 0)
        assert self.b.size('q') == self.ready()

    @invariant()
    def no_wake_up_lost(self) -> None:
        if self.ready():
            assert self.c.exists(K.wake('q'))


TestFairQueue = FairQueue.TestCase
TestFairQueue.settings = settings(PROPERTY, stateful_step_count=40)


# -- x-group-max-in-flight -------------------------------------------------------------------


CAPPED = {**FAIR, 'x-group-max-in-flight': 2}


def held_by_group(c: Any) -> dict[str, int]:
    """Per group, its messages in the queue's streams: delivered and not settled, parked, or
    moved and not read (on a fair queue every entry comes from the rotation)."""
    out: dict[str, int] = {}
    for lv in LEVELS:
        for _, f in c.xrange(K.stream('q', lv)):
            g = json.loads(f[b'm'])['body'].split(':')[0]
            out[g] = out.get(g, 0) + 1
    return out


def test_a_group_at_its_cap_lets_its_turn_pass(script_client):
    c = script_client
    b = fair_broker(c, args=CAPPED)
    for n in range(5):
        publish(b, 'a', n)
    publish(b, 'b', 0)
    got = read(b, 'c1', 10)
    assert names(got) == ['a:0', 'b:0', 'a:1']  # then a is at 2: its turn passes
    assert held_by_group(c) == {'a': 2, 'b': 1}
    # nothing else ready: no marker (it would wake consumers to be refused), the flag up
    assert got.status[('q', None)] == '0' and c.zcard(K.wake('q')) == 0 and c.get(K.capped('q'))
    assert names(read(b, 'c1', 10)) == []


def test_a_settle_frees_a_slot_and_wakes_a_consumer(script_client):
    c = script_client
    b = fair_broker(c, args=CAPPED)
    for n in range(4):
        publish(b, 'a', n)
    first = read(b, 'c1', 10).deliveries
    assert [json.loads(d.payload)['body'] for d in first] == ['a:0', 'a:1']
    b.ack('q', [(first[0].stream, first[0].entry_id)], consumer='c1')
    assert c.zcard(K.wake('q')) == 1 and not c.exists(K.capped('q'))  # the ack set it
    assert names(read(b, 'c1', 10)) == ['a:2']
    b.dead_letter('q', first[1].stream, first[1].entry_id, 'rejected', 1, None, 'c1')
    assert names(read(b, 'c1', 10)) == ['a:3']  # a dead letter frees one too


def test_a_requeued_message_keeps_its_groups_slot(script_client):
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 1})
    publish(b, 'a', 0)
    publish(b, 'a', 1)
    (d,) = read(b, 'c1', 10).deliveries
    assert b.requeue('q', [(d.stream, d.entry_id)]) == 1  # parked: still a's
    again = read(b, 'c1', 10)
    assert names(again) == ['a:0'] and again.deliveries[0].deliveries == 2
    b.reclaim('q', 0, 100)  # a lease ran out: parked again, still a's
    assert names(read(b, 'c2', 10)) == ['a:0']
    assert held_by_group(c) == {'a': 1}


def test_a_group_that_ran_dry_is_still_capped_when_it_comes_back(script_client):
    """A group that gave its last staged message leaves the rotation, but its list of moves
    stays (and it waits in the FIFO of such groups): publishing again, it is still capped
    until what it gave is settled."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 1})
    publish(b, 'a', 0)
    (d,) = read(b, 'c1', 10).deliveries
    assert not c.hexists(K.fair('q'), 'x:0:a') and c.hget(K.fair('q'), 'f:a')
    assert c.hget(K.fair('q'), 'z:1') == b'a'
    publish(b, 'a', 1)
    assert names(read(b, 'c1', 10)) == []
    ack(b, d)
    assert names(read(b, 'c1', 10)) == ['a:1']


def test_lists_of_groups_gone_dry_stay_bounded(script_client):
    """Rounds of 100 new groups each (one message, read and acked): the lists of those that
    ran dry are looked at as others run dry, and go once settled: they do not pile up."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 3})
    sizes = []
    for r in range(4):
        for g in range(100):
            publish(b, f'r{r}g{g}', 0)
        for _ in range(10):
            got = read(b, 'c1', 10).deliveries
            if got:
                ack(b, *got)
        sizes.append(sum(1 for f in c.hkeys(K.fair('q')) if f.startswith(b'f:')))
    assert sizes[-1] <= 100 + 64 + 11, sizes  # this round's, the FIFO's floor, a call's


def test_a_read_passes_a_bounded_number_of_capped_groups(script_client):
    """40 groups at their cap before one with room: a read passes at most 32 turns (then
    stops, the flag up, as when every group is at its cap); the next one gets there."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 1})
    for g in range(40):
        publish(b, f'g{g:02}', 0)
    assert len(read(b, 'c1', 100).deliveries) == 40
    for g in range(40):
        publish(b, f'g{g:02}', 1)
    publish(b, 'z', 0)
    first = read(b, 'c1', 100)
    assert names(first) == [] and c.get(K.capped('q'))
    assert names(read(b, 'c1', 100)) == ['z:0']


def test_a_groups_list_stays_near_what_it_has_in_flight(script_client):
    """Under a high cap, settled moves leave the group's list as new ones come (its front
    looked at after each move), so the list holds about what is in flight, not the cap."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 1000})
    for n in range(30):
        publish(b, 'a', n)
        (d,) = read(b, 'c1', 1).deliveries
        ack(b, d)
    assert len(c.hget(K.fair('q'), 'f:a').split()) <= 2


def test_a_long_task_at_the_front_does_not_slow_its_group(script_client):
    """One message of a runs long while its others are acked as they come: the settled moves
    behind it leave a's list (looked-at charged ones go to its end), so every read delivers
    what the cap leaves room for, not one message a read."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 50})
    publish(b, 'a', 'long')
    read(b, 'c1', 1)  # runs all along
    for n in range(300):
        publish(b, 'a', n)
    sizes = []
    for _ in range(6):
        got = read(b, 'c1', 49).deliveries
        sizes.append(len(got))
        ack(b, *got)
    assert sizes == [49] * 6


def test_a_group_waits_once_in_the_fifo_of_dry_groups(script_client):
    """A worker with one message running and one read ahead: its group runs dry at every
    read, but waits in the FIFO once, and its list holds what is out."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 5})
    before = None
    for n in range(200):
        publish(b, 'a', n)
        (d,) = read(b, 'c1', 1).deliveries
        if before:
            ack(b, before)
        before = d
    fields = c.hkeys(K.fair('q'))
    assert sum(1 for f in fields if f.startswith(b'z:')) <= 1
    assert int(c.hget(K.fair('q'), 'f:a').split()[0].rstrip(b'*')) <= 3


def test_capped_groups_of_one_level_do_not_stop_another(script_client):
    """More groups at their cap at the first level than a level's passes: the next level's
    group with room is still served in the same read."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 1})
    for g in range(40):
        publish(b, f'g{g:02}', 0)
    publish(b, 'y', 0, level=9)
    assert len(read(b, 'c1', 100).deliveries) == 41  # every group has one out now
    for g in range(40):
        publish(b, f'g{g:02}', 1)
    publish(b, 'y', 1, level=9)  # at its cap too, before z in level 9's turns
    publish(b, 'z', 0, level=9)
    assert names(read(b, 'c1', 100)) == ['z:0']


def test_a_slot_freed_in_the_read_itself_keeps_the_marker(script_client):
    """a's only slot is held by a requeued message the read then sets aside (its delivery
    limit): the read found a at its cap first, but a has room after it, so the marker is
    set again (no flag): a waiting consumer reads a:1 at once."""
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 1})
    publish(b, 'a', 0, level=9)
    (d,) = read(b, 'c1', 10).deliveries
    b.requeue('q', [(d.stream, d.entry_id)])
    publish(b, 'a', 1)  # level 0: served before level 9, where a:0 waits
    c.delete(K.wake('q'))  # popped by the wait this read follows
    sources = b.sources(['q'])
    call, parse = b.read_call(sources, 'c1', 10, 1, None, {s: 'p' for s in sources})
    assert parse(b.run(call)).deliveries == []  # a:0 past its delivery limit: set aside
    assert c.zcard(K.wake('q')) == 1 and not c.exists(K.capped('q'))
    assert names(read(b, 'c1', 10)) == ['a:1']


def test_the_staging_hash_keeps_the_queues_expiry(script_client):
    c = script_client
    b = fair_broker(c, args={**FAIR, 'x-group-max-in-flight': 2})
    publish(b, 'a', 0)
    b.touch('q', 60_000)
    read(b, 'c1', 5)  # empties the hash, then writes a's list into it again
    assert 0 < c.pttl(K.fair('q')) <= 60_000


@pytest.mark.parametrize('args, says', [
    ({'x-group-max-in-flight': 2}, "it needs x-fairness 'round-robin'"),
    ({**FAIR, 'x-group-max-in-flight': 0}, 'an integer from 1 to 10,000'),
    ({**FAIR, 'x-group-max-in-flight': 'two'}, 'an integer from 1 to 10,000'),
    ({**FAIR, 'x-group-max-in-flight': 10_001}, 'an integer from 1 to 10,000'),
])
def test_an_invalid_group_cap_is_named(args, says):
    with pytest.raises(ValueError, match=says):
        stored_pairs('q', args)


class FairCap(RuleBasedStateMachine):
    """x-group-max-in-flight 2 on a fair queue: publishes in three groups at two levels,
    reads by two consumers, ack, dead letter, requeue, a reclaim of every lease and purge, in
    any order. After each step: no group has more than 2 messages handed out and not settled
    (its entries in the streams), nothing is lost, and no wake-up is lost (staged work that a
    group may take now has its marker; staged work the caps hold back has the marker or the
    flag). And a drain (everything settled, reads until none delivers) delivers every
    message: no group is ever stuck."""

    CAP = 2
    GROUPS = ('a', 'b', '')

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.b = fair_broker(self.c, args={**FAIR, 'x-group-max-in-flight': self.CAP})
        self.n = 0
        self.flight: dict[str, list[Delivery]] = {'c1': [], 'c2': []}
        self.done: set[str] = set()  # acked, dead-lettered or purged

    @rule(group=st.sampled_from(GROUPS), level=st.sampled_from([0, 3]))
    def publish(self, group: str, level: int) -> None:
        self.n += 1
        publish(self.b, group, self.n, level=level)

    @rule(consumer=st.sampled_from(['c1', 'c2']), count=st.integers(1, 4))
    def read(self, consumer: str, count: int) -> None:
        self.flight[consumer] += read(self.b, consumer, count).deliveries

    @precondition(lambda self: self.flight['c1'] or self.flight['c2'])
    @rule(consumer=st.sampled_from(['c1', 'c2']),
          how=st.sampled_from(['ack', 'reject', 'requeue']))
    def settle(self, consumer: str, how: str) -> None:
        if not self.flight[consumer]:
            return
        d = self.flight[consumer].pop(0)
        name = json.loads(d.payload)['body']
        if how == 'ack':
            done = self.b.ack('q', [(d.stream, d.entry_id)], consumer=consumer)
        elif how == 'reject':
            done = self.b.dead_letter('q', d.stream, d.entry_id, 'rejected', 1, None, consumer)
        else:
            self.b.requeue('q', [(d.stream, d.entry_id)], consumer=consumer)
            done = 0
        if done:
            self.done.add(name)

    @rule()
    def reclaim(self) -> None:
        """Every lease runs out: parked again, their late settles go nowhere."""
        self.b.reclaim('q', 0, 100)

    @rule()
    def purge(self) -> None:
        stored, staged, _ = self._where()
        self.b.purge('q')
        after, staged_after, _ = self._where()
        self.done |= (stored | staged) - (after | staged_after)

    def _where(self) -> tuple[set[str], set[str], set[str]]:
        stored = {json.loads(f[b'm'])['body'] for lv in LEVELS
                  for _, f in self.c.xrange(K.stream('q', lv))}
        staged = {json.loads(v)['body'] for f, v in self.c.hgetall(K.fair('q')).items()
                  if f.startswith(b'm:')}
        letters = {json.loads(f[b'f:m'])['body'] for _, f in self.c.xrange(K.dlq('q'))}
        return stored, staged, letters

    @invariant()
    def capped(self) -> None:
        assert all(n <= self.CAP for n in held_by_group(self.c).values()), held_by_group(self.c)

    @invariant()
    def none_lost(self) -> None:
        stored, staged, letters = self._where()
        assert not stored & staged
        assert len(stored | staged | letters | self.done) == self.n

    @invariant()
    def no_wake_up_lost(self) -> None:
        _, staged, _ = self._where()
        if not staged:
            return
        held = held_by_group(self.c)
        waiting = {name.split(':')[0] for name in staged}
        if any(held.get(g, 0) < self.CAP for g in waiting):
            assert self.c.exists(K.wake('q'))
        else:
            assert self.c.exists(K.wake('q')) or self.c.exists(K.capped('q'))

    def teardown(self) -> None:
        """The drain: whatever is in flight settled, then reads (each delivery acked) until
        one delivers nothing; every message is then acked, dead-lettered or purged."""
        for consumer in ('c1', 'c2'):
            for d in self.flight[consumer]:
                self.b.ack('q', [(d.stream, d.entry_id)], consumer='')
        for _ in range(self.n + 2):
            got = read(self.b, 'c1', 4).deliveries
            if not got:
                break
            self.b.ack('q', [(d.stream, d.entry_id) for d in got], consumer='c1')
        stored, staged, _ = self._where()
        assert not stored and not staged, (stored, staged)


TestFairCap = FairCap.TestCase
TestFairCap.settings = settings(PROPERTY, stateful_step_count=40)


def test_inspect_and_exporter_count_staged_messages(script_client):
    b = fair_broker(script_client)
    for n in range(3):
        publish(b, 'a', n)
    publish(b, 'b', 0, level=3)
    read(b, 'c1', 1)
    info = b.inspect('q')
    assert info['staged'] == 3 and info['ready'] == 3 and info['pending'] == 1
    from kombu_streams.exporter import _add_queue, _families
    families = _families()
    _add_queue(families, info)
    samples = {s.labels['queue']: s.value for s in families['queue_staged_messages'].samples}
    assert samples == {'q': 3}


def test_an_expiring_queue_keeps_its_staged_messages_alive(script_client):
    b = fair_broker(script_client)
    b.touch('q', 60_000)
    publish(b, 'a', 0)
    assert 0 < script_client.pttl(K.fair('q')) <= 60_000  # the queue's expiry, at creation
    b.touch('q', 600_000)
    assert script_client.pttl(K.fair('q')) > 60_000  # and every touch's


# -- Kombu -----------------------------------------------------------------------------------


def test_kombu_consumer_sees_groups_take_turns(url):
    """Through the channel: the declare records x-fairness, publishes with and without
    x-group are staged (one without a group, by a producer that did not declare the queue,
    after its NEEDKEYS), a consumer with prefetch 3 gets them in rotation, big ones too."""
    got: list[Any] = []
    with Connection(url, transport_options={'big_message_bytes': 2000}) as conn:
        queue = Queue('fq', queue_arguments=FAIR)
        producer = Producer(conn.default_channel, serializer='json')
        for n in range(3):
            producer.publish({'g': 'a', 'n': n}, routing_key='fq', declare=[queue],
                             headers={'x-group': 'a'})
        producer.publish({'g': 'b', 'n': 0, 'pad': 'x' * 3000}, routing_key='fq',
                         headers={'x-group': 'b'})
        with Connection(url) as other:  # knows nothing of the queue's fairness
            Producer(other.default_channel, serializer='json').publish(
                {'g': '', 'n': 0}, routing_key='fq')
        assert queue(conn.default_channel).queue_declare(passive=True).message_count == 5
        raw = conn.default_channel.client
        assert int(raw.hget(K.fair('fq'), 'n')) == 5 and raw.xlen(K.stream('fq', 0)) == 0

        def on_message(body: Any, message: Any) -> None:
            got.append((body['g'], body['n']))
            message.ack()

        with Consumer(conn.channel(), [queue], callbacks=[on_message], accept=['json'],
                      prefetch_count=3):
            while len(got) < 5:
                conn.drain_events(timeout=5)
    assert got == [('a', 0), ('b', 0), ('', 0), ('a', 1), ('a', 2)]


@requires_batch_publish
def test_a_batch_publishes_to_a_fair_queue(url):
    with Connection(url) as conn:
        queue = Queue('bfq', queue_arguments=FAIR)
        queue(conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='bfq', serializer='json')
        with producer.batch(max_size=10):  # the first without a group learns NEEDKEYS
            for n in range(3):
                producer.publish({'n': n})
            producer.publish({'n': 'b'}, headers={'x-group': 'b'})
        raw = conn.default_channel.client
        assert int(raw.hget(K.fair('bfq'), 'n')) == 4
        b = Broker(raw, K, LEVELS)
        got = read(b, 'c1', 10, queues=['bfq']).deliveries
        # the three without a group went again, widened, after the first pipeline, where b
        # was staged first: b's group joined the rotation first; each group's order is kept
        assert [kombu_body(d)['n'] for d in got] == ['b', 0, 1, 2]


def kombu_body(d: Delivery) -> Any:
    """The decoded body of a Kombu envelope (base64 as Kombu's virtual transport encodes)."""
    import base64
    envelope = json.loads(d.payload)
    body = envelope['body']
    if envelope['properties'].get('body_encoding') == 'base64':
        body = base64.b64decode(body)
    return json.loads(body)


def test_a_move_that_cannot_append_leaves_everything_staged(script_client):
    """The stream gone behind our back (NOMKSTREAM: never recreated) or of another type: the
    read moves nothing and reports the type; the staging is as it was, and once the queue is
    declared again the messages are delivered in rotation."""
    b = fair_broker(script_client)
    publish(b, 'a', 0)
    publish(b, 'b', 0)
    before = script_client.hgetall(K.fair('q'))
    script_client.delete(K.stream('q', 0))
    assert names(read(b, 'c1', 10)) == []
    assert script_client.hgetall(K.fair('q')) == before
    script_client.set(K.stream('q', 0), 'someone else')
    r = read(b, 'c1', 10)
    assert names(r) == [] and 'WRONGTYPE' in r.problems[0][1]
    assert script_client.hgetall(K.fair('q')) == before
    script_client.delete(K.stream('q', 0))
    b.declare('q')
    assert names(read(b, 'c1', 10)) == ['a:0', 'b:0']


# -- Redis Cluster ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def cluster(tmp_path_factory: Any) -> Any:
    """A three-master Redis Cluster (tests/test_cluster.py's)."""
    from tests.test_cluster import Cluster
    c = Cluster(tmp_path_factory.mktemp('cluster'))
    try:
        yield c
    finally:
        c.stop()


def test_fair_queues_on_every_master_of_a_cluster(cluster: Any) -> None:
    """The staging hash shares its queue's hash tag: fair queues on three masters, each
    served in rotation by one consumer of all of them (one read call per slot)."""
    from tests.test_cluster import drain, spread
    cluster.flush()
    cluster_url = cluster.url
    names = spread(cluster, 3, prefix='fair')
    queues = [Queue(n, routing_key=n, queue_arguments=FAIR) for n in names]
    with Connection(cluster_url) as conn:
        producer = Producer(conn)
        for q in queues:
            q(conn.default_channel).declare()
        for name in names:
            for n in range(4):
                producer.publish({'q': name, 'g': 'a', 'n': n}, routing_key=name,
                                 headers={'x-group': 'a'})
            producer.publish({'q': name, 'g': 'b', 'n': 0}, routing_key=name,
                             headers={'x-group': 'b'})
        got = drain(conn, queues, 15, prefetch_count=1)
    assert len(got) == 15
    for name in names:
        order = [(b['g'], b['n']) for b, _ in got if b['q'] == name]
        assert order == [('a', 0), ('b', 0), ('a', 1), ('a', 2), ('a', 3)], (name, order)


def test_status_and_exporter_show_the_groups_with_the_most_staged(script_client):
    b = fair_broker(script_client)
    for g, n in (('a', 3), ('b', 5), ('', 1)):
        for i in range(n):
            publish(b, g, i)
    publish(b, 'a', 'low', level=9)  # a group's staged messages of every level add up
    groups = b.inspect('q')['groups']
    assert groups == {'active': 3, 'complete': True, 'top': [('b', 5), ('a', 4), ('', 1)]}
    from kombu_streams.cli.commands.status import status_text
    text = status_text([b.inspect('q')], [])
    assert 'GROUP' in text and '(default)' in text
    from kombu_streams.exporter import _add_queue, _families
    families = _families()
    _add_queue(families, b.inspect('q'))
    samples = {s.labels['group']: s.value
               for s in families['queue_group_staged_messages'].samples}
    assert samples == {'b': 5, 'a': 4, '': 1}


def test_inspect_walks_at_most_a_thousand_groups_a_level(script_client):
    b = fair_broker(script_client)
    for g in range(1001):
        publish(b, f'g{g}', 0)
    publish(b, 'g0', 1)
    groups = b.inspect('q')['groups']
    assert groups['active'] == 1000 and not groups['complete']
    assert groups['top'][0] == ('g0', 2)  # the next in turn are walked: g0 first


def test_a_length_limit_counts_staged_messages(script_client):
    from kombu_streams.limits import QueueFull
    b = fair_broker(script_client, args={**FAIR, 'x-max-length': 3,
                                          'x-overflow': 'reject-publish'})
    fresh = Broker(script_client, K, LEVELS)  # learns both the limit and the fairness
    for n in range(3):
        assert fresh.publish('q', 0, body('a', n), group='a') == b'staged'
    with pytest.raises(QueueFull):
        fresh.publish('q', 0, body('b', 0), group='b')
    got = read(b, 'c1', 1).deliveries  # moved and in flight: still held
    with pytest.raises(QueueFull):
        publish(b, 'b', 0)
    assert ack(b, *got) == 1
    assert publish(b, 'b', 0) == b'staged'
    assert names(read(b, 'c1', 10)) == ['a:1', 'b:0', 'a:2']


def test_kombu_consumer_waits_for_a_groups_slot_and_is_woken_by_the_ack(url):
    """x-group-max-in-flight 1 through the channel: a consumer with room for ten gets one
    message of each group, then waits (no message of a capped group, no busy reads); the
    ack of a's message frees a's slot and wakes the waiting consumer, which gets a's next."""
    got: list[Any] = []
    queue = Queue('cq', queue_arguments={**FAIR, 'x-group-max-in-flight': 1})
    with Connection(url) as conn:
        producer = Producer(conn.default_channel, serializer='json')
        for g in ('a', 'b'):
            for n in range(3):
                producer.publish({'g': g, 'n': n}, routing_key='cq', declare=[queue],
                                 headers={'x-group': g})

        def on_message(body: Any, message: Any) -> None:
            got.append((body['g'], body['n'], message))

        channel = conn.channel()
        with Consumer(channel, [queue], callbacks=[on_message], accept=['json'],
                      prefetch_count=10):
            while len(got) < 2:
                conn.drain_events(timeout=5)
            assert [(g, n) for g, n, _ in got] == [('a', 0), ('b', 0)]
            raw = conn.default_channel.client
            reads = raw.info('commandstats').get('cmdstat_evalsha', {}).get('calls', 0)
            with pytest.raises(socket.timeout):
                conn.drain_events(timeout=0.5)
            assert len(got) == 2  # both groups at their cap: nothing more, and no busy reads
            assert raw.info('commandstats')['cmdstat_evalsha']['calls'] - reads < 10
            got[0][2].ack()
            while len(got) < 3:
                conn.drain_events(timeout=5)
            assert (got[2][0], got[2][1]) == ('a', 1)
            for _, _, message in got[1:]:
                message.ack()
            while len(got) < 6:
                conn.drain_events(timeout=5)
                for _, _, message in got:
                    if not message.acknowledged:
                        message.ack()
    assert sorted((g, n) for g, n, _ in got) == [(g, n) for g in 'ab' for n in range(3)]
