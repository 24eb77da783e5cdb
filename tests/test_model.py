"""Model-based test: the transport, driven through Kombu's API, against a tiny Python model.

A hypothesis ``RuleBasedStateMachine`` publishes, gets (holding messages unacked), acks,
rejects, requeues, purges and closes/reopens the channel on a real Redis server, and checks
after every step that the transport agrees with the model below.

The model (Kombu's Redis priority semantics, as read.lua implements them):

* level = the largest of the priority steps [0, 3, 6, 9] that is <= the message's priority;
  level 0 is served first;
* within a level, requeued messages (reject with requeue, ``Message.requeue()``, or restored
  when the channel closes) come before never-delivered ones, in stream id (= publish) order
  among themselves; then the fresh messages, in publish order;
* ready count = requeued + fresh; messages held by the application are not ready;
* ack and reject(requeue=False) delete the message; purge deletes the ready ones only;
* a channel that crashes (forgets what it held) loses nothing: reclaim makes its messages
  ready again exactly as if they had been requeued;
* delivery limit (transport option ``max_deliveries``, 0 = none): a requeued message that has
  been delivered ``max_deliveries`` times already is not delivered again: the read that
  reaches it (in the order above) moves it to the queue's dead-letter stream and serves the
  next message in that order instead.
"""

from __future__ import annotations

import base64
import json
from collections import deque

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from kombu import Connection, Producer, Queue

import kombu_streams  # noqa: F401  (registers redis-streams://)

QUEUES = ('model.a', 'model.b')
LEVELS = (0, 3, 6, 9)
QUEUE = st.sampled_from(QUEUES)
PRIORITY = st.integers(min_value=0, max_value=9)

# the servers are fetched with getfixturevalue, so conftest cannot see them: mark by hand
pytestmark = pytest.mark.redis


def level_of(priority: int) -> int:
    return max(step for step in LEVELS if step <= priority)


def streams_url(url: str) -> str:
    assert url.startswith('redis://'), url
    return 'redis-streams://' + url[len('redis://'):]


class QueueModel:
    """The ready messages of one queue, per priority level."""

    def __init__(self) -> None:
        self.requeued: dict[int, set[int]] = {lv: set() for lv in LEVELS}
        self.fresh: dict[int, deque[int]] = {lv: deque() for lv in LEVELS}

    def ready_count(self) -> int:
        return sum(len(self.requeued[lv]) + len(self.fresh[lv]) for lv in LEVELS)

    def ready_ids(self) -> set[int]:
        out: set[int] = set()
        for lv in LEVELS:
            out |= self.requeued[lv]
            out.update(self.fresh[lv])
        return out

    def peek(self) -> int | None:
        for lv in LEVELS:
            if self.requeued[lv]:
                return min(self.requeued[lv])
            if self.fresh[lv]:
                return self.fresh[lv][0]
        return None

    def take(self, mid: int, level: int) -> None:
        if mid in self.requeued[level]:
            self.requeued[level].remove(mid)
        else:
            assert self.fresh[level][0] == mid
            self.fresh[level].popleft()

    def clear(self) -> None:
        for lv in LEVELS:
            self.requeued[lv].clear()
            self.fresh[lv].clear()


class StreamsMachine(RuleBasedStateMachine):
    """Set ``url`` (a ``redis://`` URL of a real server) before running."""

    url: str = ''
    #: the transport option of the same name (0: no limit)
    max_deliveries: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.raw = redis.Redis.from_url(self.url)
        self.raw.flushdb()
        self.conn = Connection(streams_url(self.url),
                               transport_options={'max_deliveries': self.max_deliveries})
        self.channel = self.conn.channel()
        for name in QUEUES:
            self.channel.queue_declare(name)
        self.next_id = 0
        self.queues = {name: QueueModel() for name in QUEUES}
        #: id -> (queue, priority, level) of every message not yet acked/rejected/purged
        self.live: dict[int, tuple[str, int, int]] = {}
        #: id -> how many times it was delivered so far
        self.deliveries: dict[int, int] = {}
        #: held (delivered, unacked) messages, in delivery order: (id, kombu Message)
        self.held: list[tuple[int, object]] = []
        #: id -> queue of the messages moved to the dead-letter stream (delivery limit)
        self.dead: dict[int, str] = {}

    def teardown(self) -> None:
        try:
            self.conn.close()
        finally:
            self.raw.close()

    # -- helpers -----------------------------------------------------------------------

    def _pop_held(self, i: int) -> tuple[int, object]:
        return self.held.pop(i % len(self.held))

    def _requeue_in_model(self, mid: int) -> None:
        queue, _, level = self.live[mid]
        self.queues[queue].requeued[level].add(mid)

    def _publish(self, queue: str, priority: int) -> None:
        mid = self.next_id
        self.next_id += 1
        Producer(self.channel).publish(
            {'id': mid}, routing_key=queue, priority=priority, serializer='json')
        level = level_of(priority)
        self.live[mid] = (queue, priority, level)
        self.deliveries[mid] = 0
        self.queues[queue].fresh[level].append(mid)

    # -- rules ---------------------------------------------------------------------------

    @initialize(batch=st.lists(st.tuples(QUEUE, PRIORITY), max_size=8))
    def prefill(self, batch: list[tuple[str, int]]) -> None:
        """Start with some messages, so short runs reach interesting states."""
        for queue, priority in batch:
            self._publish(queue, priority)

    @rule(queue=QUEUE, priority=PRIORITY)
    def publish(self, queue: str, priority: int) -> None:
        self._publish(queue, priority)

    def _nonempty(self) -> list[str]:
        return [name for name in QUEUES if self.queues[name].ready_count()]

    @precondition(lambda self: self._nonempty())
    @rule(i=st.integers(min_value=0, max_value=7), n=st.integers(min_value=1, max_value=3))
    def get(self, i: int, n: int) -> None:
        """Up to ``n`` basic_gets in a row from a queue the model says is not empty (the
        ``i % len``-th of them); each message is held (not acked). Stops at the first None."""
        nonempty = self._nonempty()
        queue = nonempty[i % len(nonempty)]
        for _ in range(n):
            if not self._get_one(queue):
                break

    def _at_limit(self, mid: int) -> bool:
        return bool(self.max_deliveries) and self.deliveries[mid] >= self.max_deliveries

    def _get_one(self, queue: str) -> bool:
        model = self.queues[queue]
        expected = model.peek()
        while expected is not None and self._at_limit(expected):
            # the read reaches a message that may not be delivered again: dead-lettered
            model.take(expected, self.live[expected][2])
            del self.live[expected]
            self.dead[expected] = queue
            expected = model.peek()
        message = Queue(queue).bind(self.channel).get(no_ack=False)
        if expected is None:
            assert message is None, f'{queue} should be empty, got {message.payload!r}'
            return False
        assert message is not None, f'{queue} should deliver id {expected}, got nothing'
        got = message.payload['id']
        assert got not in {mid for mid, _ in self.held}, f'id {got} delivered while held'
        assert got == expected, (
            f'{queue}: expected id {expected} (priority {self.live[expected][1]}, '
            f'{self.deliveries[expected]} deliveries so far), got id {got} (priority '
            f'{self.live[got][1] if got in self.live else "?"}, '
            f'{self.deliveries.get(got, "?")} deliveries so far)')
        _, priority, level = self.live[got]
        before = self.deliveries[got]
        info = message.delivery_info
        assert info['redelivered'] is (before > 0), (
            f'id {got}: delivered {before} times before, redelivered={info["redelivered"]}')
        assert info['delivery_count'] == before + 1, (got, before, info)
        assert info['routing_key'] == queue
        assert message.properties['priority'] == priority
        self.deliveries[got] = before + 1
        self.queues[queue].take(got, level)
        self.held.append((got, message))
        return True

    @precondition(lambda self: self.held)
    @rule(i=st.integers(min_value=0, max_value=63))
    def ack(self, i: int) -> None:
        mid, message = self._pop_held(i)
        message.ack()
        del self.live[mid]

    @precondition(lambda self: self.held)
    @rule(i=st.integers(min_value=0, max_value=63))
    def reject(self, i: int) -> None:
        mid, message = self._pop_held(i)
        message.reject(requeue=False)
        del self.live[mid]

    @precondition(lambda self: self.held)
    @rule(i=st.integers(min_value=0, max_value=63))
    def requeue(self, i: int) -> None:
        mid, message = self._pop_held(i)
        message.requeue()
        self._requeue_in_model(mid)

    @rule(queue=QUEUE)
    def purge(self, queue: str) -> None:
        model = self.queues[queue]
        expected = model.ready_count()
        purged = Queue(queue).bind(self.channel).purge()
        assert purged == expected, f'purge({queue}) returned {purged}, model has {expected}'
        for mid in model.ready_ids():
            del self.live[mid]
        model.clear()
        # nothing is ready now, though held messages of this queue may still be in flight
        assert not self._get_one(queue)

    @rule()
    def reopen_channel(self) -> None:
        """Closing the channel restores every held message; a new channel carries on."""
        self.channel.close()
        for mid, _ in self.held:
            self._requeue_in_model(mid)
        self.held.clear()
        self.channel = self.conn.channel()

    @precondition(lambda self: self.held)
    @rule()
    def crash_and_reclaim(self) -> None:
        """The channel dies holding messages (nothing restored, as after SIGKILL); once their
        lease ran out, reclaim (the lease keeper's job; here with idle 0) makes them ready
        again, before fresh ones in their level, each keeping its delivery count."""
        dead = self.channel
        dead.consumer_state.forget()  # the crash: this process forgets what it held
        dead.qos._delivered.clear()
        dead.close()
        self.channel = self.conn.channel()
        for mid, _ in self.held:
            self._requeue_in_model(mid)
        self.held.clear()
        for name in QUEUES:
            cursors = None
            while True:
                done = self.channel.broker.reclaim(name, 0, 100, cursors)
                cursors = done.cursors
                if not done.more and all(c == '-' for c in cursors):
                    break

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def model_is_consistent(self) -> None:
        held = [mid for mid, _ in self.held]
        assert len(held) == len(set(held))
        ready: list[int] = []
        for model in self.queues.values():
            ready.extend(model.ready_ids())
        assert len(ready) == len(set(ready))
        # nothing lost, nothing twice: every live id is exactly one of ready / held
        assert set(ready).isdisjoint(held)
        assert set(ready) | set(held) == set(self.live)
        assert len(ready) + len(held) == len(self.live)

    @invariant()
    def ready_counts_match(self) -> None:
        for name, model in self.queues.items():
            count = self.channel.queue_declare(name, passive=True).message_count
            assert count == model.ready_count(), (
                f'{name}: transport reports {count} ready, model has {model.ready_count()}')

    @invariant()
    def streams_hold_exactly_the_live_messages(self) -> None:
        """Nothing lost, nothing left behind: each level's stream holds exactly the queue's
        live (ready or held) messages of that level, each once."""
        for name in QUEUES:
            for level, key in zip(LEVELS, self.channel.keys.streams(name, list(LEVELS))):
                stored = []
                for _, fields in self.raw.xrange(key):
                    envelope = json.loads(fields[b'm'])
                    body = base64.b64decode(envelope['body'])
                    stored.append(json.loads(body)['id'])
                want = sorted(mid for mid, (q, _, lv) in self.live.items()
                              if q == name and lv == level)
                assert stored == want, f'{key} holds {stored}, model expects {want}'

    @invariant()
    def dead_letters_match(self) -> None:
        """Messages over the delivery limit are set aside in the dead-letter stream, once."""
        for name in QUEUES:
            key = self.channel.keys.dlq(name)
            stored = []
            for _, fields in self.raw.xrange(key):
                assert fields[b'reason'] == b'delivery limit', fields
                envelope = json.loads(fields[b'f:m'])
                stored.append(json.loads(base64.b64decode(envelope['body']))['id'])
            want = sorted(mid for mid, q in self.dead.items() if q == name)
            assert sorted(stored) == want, f'{key} holds {stored}, model expects {want}'
            assert len(stored) == len(set(stored)), f'{key} holds duplicates: {stored}'


# Redis 7 gets the full run, without and with a (small, so it is reached) delivery limit;
# 6.2 (other XPENDING/XCLAIM/XINFO details) shorter ones. 50 steps rather than 30: measured
# against deliberately wrong models (fresh before requeued, requeued LIFO, ...) that finds
# ordering mistakes in nearly every run.
@pytest.mark.parametrize(
    ('server_fixture', 'max_examples', 'max_deliveries'),
    [
        ('redis_server', 60, 0),
        ('redis_server', 40, 3),
        ('redis62_server', 15, 0),
        ('redis62_server', 10, 3),
    ],
    ids=['redis7', 'redis7-limit3', 'redis62', 'redis62-limit3'],
)
def test_transport_matches_model(request, server_fixture, max_examples, max_deliveries):
    server = request.getfixturevalue(server_fixture)
    machine = type(f'StreamsMachine_{server_fixture}', (StreamsMachine,),
                   {'url': server.url, 'max_deliveries': max_deliveries})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=max_examples,
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    ))


# Minimal failing examples found by the machine above, replayed step by step (with every
# invariant checked after each step), so they fail the same way on every run.
def _replay(url: str, max_deliveries: int, steps: list[tuple[str, dict]]) -> None:
    machine = type('Replay', (StreamsMachine,),
                   {'url': url, 'max_deliveries': max_deliveries})()
    try:
        for name, kwargs in steps:
            getattr(machine, name)(**kwargs)
            for check in ('model_is_consistent', 'ready_counts_match',
                          'streams_hold_exactly_the_live_messages', 'dead_letters_match'):
                getattr(machine, check)()
    finally:
        machine.teardown()


# Message 0 reaches the delivery limit while message 1, requeued in the same level, waits
# behind it (and, in the first case, fresh message 2 after them).
_LIMIT_STEPS = [
    ('get', {'i': 0, 'n': 2}),
    ('reopen_channel', {}),
    ('get', {'i': 0, 'n': 1}),
    ('reopen_channel', {}),
    ('get', {'i': 0, 'n': 1}),
    ('reopen_channel', {}),
    ('get', {'i': 0, 'n': 1}),
]


@pytest.mark.parametrize('server_fixture', ['redis_server', 'redis62_server'],
                         ids=['redis7', 'redis62'])
@pytest.mark.parametrize('published', [3, 2], ids=['fresh-behind', 'nothing-behind'])
def test_delivery_limit_examples(request, server_fixture, published):
    server = request.getfixturevalue(server_fixture)
    prefill = [('prefill', {'batch': [('model.a', 0)] * published})]
    _replay(server.url, 3, prefill + _LIMIT_STEPS)
