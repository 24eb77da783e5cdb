"""Idempotent publish (x-deduplication-window): scripts on fakeredis, Redis 6.2 and 7.0
(``script_client``); the Kombu API on real Redis 7.0 and 6.2; a hypothesis model of publishes
with a clock. docs/design.rst, "Duplicates"; lua/lib/dedup.lua.

The clock is driven by the stored expiry of an id (ZADD of a past time), never by sleeping.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

import pytest
import redis
from conftest import requires_batch_publish
from helpers import assert_same, message_count, read_messages, snapshot
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from kombu import Connection, Producer, Queue

from kombu_streams.broker import Broker, Delay
from kombu_streams.dedup import dedup_id
from kombu_streams.keys import Keys
from kombu_streams.limits import stored_pairs
from tests.test_scripts import PROPERTY

K = Keys()
LEVELS = [0, 3, 6, 9]
HOUR = 3_600_000
DUPLICATE = b'duplicate'


def windowed(c: Any, queue: str = 'q', window: int = HOUR, **more: Any) -> Broker:
    b = Broker(c, K, LEVELS)
    b.declare(queue, stored_pairs(queue, {'x-deduplication-window': window, **more}))
    return b


def body(n: Any) -> str:
    return json.dumps({'body': f'm{n}'})


def stored(c: Any, queue: str = 'q') -> list[str]:
    """Every message the queue holds in its streams, level by level."""
    return [json.loads(f[b'm'])['body'] for lv in LEVELS
            for _, f in c.xrange(K.stream(queue, lv)) if b'm' in f]


def forget(c: Any, ident: str, queue: str = 'q') -> None:
    """Make the window of ``ident`` run out: its stored expiry in the past."""
    assert c.zscore(K.dedup(queue), ident) is not None
    c.zadd(K.dedup(queue), {ident: 1}, xx=True)


def test_a_second_publish_within_the_window_is_not_stored(script_client):
    c = script_client
    b = windowed(c)
    assert b.publish('q', 0, body(1), dedup_id='a') not in (None, DUPLICATE)
    before = c.xlen(K.stream('q', 0))
    assert b.publish('q', 0, body(2), dedup_id='a') == DUPLICATE
    assert b.publish('q', 9, body(3), dedup_id='a') == DUPLICATE  # another level too
    assert c.xlen(K.stream('q', 0)) == before == 1
    assert stored(c) == ['m1'] and b.size('q') == 1
    assert b.duplicates('q') == 2
    assert b.publish('q', 0, body(4), dedup_id='b') not in (None, DUPLICATE)  # another id
    assert b.publish('q', 0, body(5)) not in (None, DUPLICATE)  # no id: never a duplicate
    assert stored(c) == ['m1', 'm4', 'm5']


def test_after_the_window_the_id_is_stored_again(script_client):
    c = script_client
    b = windowed(c)
    b.publish('q', 0, body(1), dedup_id='a')
    forget(c, 'a')
    assert b.publish('q', 0, body(2), dedup_id='a') not in (None, DUPLICATE)
    assert stored(c) == ['m1', 'm2']
    assert b.publish('q', 0, body(3), dedup_id='a') == DUPLICATE  # remembered again
    assert c.zscore(K.dedup('q'), 'a') > 1


def test_the_store_expires_with_its_last_id(script_client):
    """No queue TTL here: the store goes once the newest id it remembers would be forgotten,
    so a queue that stopped publishing keeps no ids (nor memory) past its window."""
    c = script_client
    b = windowed(c, window=60_000)
    b.publish('q', 0, body(1), dedup_id='a')
    assert 50_000 < c.pttl(K.dedup('q')) <= 60_000


def test_the_store_takes_the_queue_expiry_when_longer(script_client):
    c = script_client
    b = windowed(c, window=1000)
    b.touch('q', HOUR)
    b.publish('q', 0, body(1), dedup_id='a')
    assert c.pttl(K.dedup('q')) > HOUR - 60_000


def test_a_queue_without_the_window_never_deduplicates_nor_keeps_ids(script_client):
    c = script_client
    b = Broker(c, K, LEVELS)
    b.declare('q', stored_pairs('q', {'x-max-length': 100}))
    for n in range(3):
        assert b.publish('q', 0, body(n), dedup_id='a') != DUPLICATE
    assert b.size('q') == 3
    assert not c.exists(K.dedup('q'))


def test_a_delayed_duplicate_leaves_nothing(script_client):
    c = script_client
    b = windowed(c)
    delay = Delay('+600000', 1000, 'lbl')
    assert b.publish('q', 0, body(1), delay=delay, dedup_id='a').startswith(b'delayed:')
    before = snapshot(c)
    assert b.publish('q', 0, body(2), delay=delay, dedup_id='a') == DUPLICATE
    assert b.publish('q', 0, body(3), delay=Delay(), dedup_id='a') == DUPLICATE  # due now
    after = snapshot(c)
    count = after.pop(K.dedup('q').encode())
    before.pop(K.dedup('q').encode())
    assert_same(before, after)  # only the counter moved
    assert (b'', -2.0) in count[1]
    assert c.zcard(K.delayed('q')) == 1 and c.hlen(K.delayed_messages('q')) == 1


def test_a_delayed_publish_is_remembered(script_client):
    c = script_client
    b = windowed(c)
    b.publish('q', 0, body(1), delay=Delay('+600000', 1000, 'lbl'), dedup_id='a')
    assert b.publish('q', 0, body(2), dedup_id='a') == DUPLICATE
    assert stored(c) == []


def test_a_big_duplicate_leaves_no_body(script_client):
    c = script_client
    b = windowed(c)
    assert b.publish_big('q', 0, body(1), dedup_id='a') != DUPLICATE
    assert c.hlen(K.big('q')) == 1
    before = snapshot(c)
    assert b.publish_big('q', 0, body(2), dedup_id='a') == DUPLICATE
    assert b.publish_big('q', 0, body(3), delay=Delay('+600000', 1000, 'l'),
                         dedup_id='a') == DUPLICATE
    after = snapshot(c)
    for snap in (before, after):
        snap.pop(K.dedup('q').encode())
    assert_same(before, after)  # no body of the duplicates left in the big hash
    assert c.hlen(K.big('q')) == 1


def test_a_duplicate_on_a_full_queue_is_a_duplicate_and_drops_nothing(script_client):
    c = script_client
    b = windowed(c, **{'x-max-length': 1, 'x-overflow': 'drop-head'})
    b.publish('q', 0, body(1), dedup_id='a')
    assert b.publish('q', 0, body(2), dedup_id='a') == DUPLICATE
    assert b.dead_letters('q') == [] and stored(c) == ['m1']


def test_a_refused_publish_is_not_remembered(script_client):
    """Only a stored message's id is remembered: a routed publish to a deleted queue and a
    full queue's refusal leave the id free for the next try."""
    c = script_client
    b = windowed(c, **{'x-max-length': 1, 'x-overflow': 'reject-publish'})
    b.publish('q', 0, body(1), dedup_id='a')
    with pytest.raises(redis.ResponseError, match='QUEUEFULL|is full'):
        b.publish('q', 0, body(2), dedup_id='b')
    assert c.zscore(K.dedup('q'), 'b') is None
    ack = read_messages(b, ['q'], 'c1', 1)[0]
    b.ack('q', [(ack.stream, ack.entry_id)])
    assert b.publish('q', 0, body(2), dedup_id='b') != DUPLICATE
    assert stored(c) == ['m2']


def test_the_ids_remembered_are_capped(script_client):
    c = script_client
    cap = 20
    b = windowed(c, **{'x-deduplication-max-ids': cap})
    for n in range(cap + 15):
        b.publish('q', 0, body(n), dedup_id=f'id{n}')
    b.publish('q', 0, body('again'), dedup_id='id0')  # forgotten: the oldest went
    b.publish('q', 0, body('dup'), dedup_id=f'id{cap + 14}')  # the newest: remembered
    ids = [m for m in c.zrange(K.dedup('q'), 0, -1) if m != b'']
    assert len(ids) <= cap
    assert b'id0' in ids and f'id{cap + 14}'.encode() in ids
    assert stored(c)[-1] == 'magain' and b.duplicates('q') == 1
    c.hset(K.args('q'), 'x-deduplication-max-ids', 5)  # lowered at run time: a few per call
    for n in range(3):
        b.publish('q', 0, body(n), dedup_id=f'late{n}')
    assert len([m for m in c.zrange(K.dedup('q'), 0, -1) if m != b'']) == 5


def test_expired_ids_are_forgotten_a_few_per_publish(script_client):
    c = script_client
    b = windowed(c)
    for n in range(30):
        b.publish('q', 0, body(n), dedup_id=f'id{n}')
    c.zadd(K.dedup('q'), {f'id{n}': 1 for n in range(30)}, xx=True)  # all run out
    b.publish('q', 0, body('x'), dedup_id='x')
    assert c.zcard(K.dedup('q')) == 30 - 10 + 1  # DEDUP_STEP: bounded work per call
    for n in range(2):
        b.publish('q', 0, body(n), dedup_id=f'y{n}')
    assert c.zcard(K.dedup('q')) == 3


def test_delete_removes_the_store_and_arguments_are_validated(script_client):
    c = script_client
    b = windowed(c)
    b.publish('q', 0, body(1), dedup_id='a')
    assert c.exists(K.dedup('q'))
    b.delete('q')
    assert not c.exists(K.dedup('q'))


@pytest.mark.parametrize('arguments, says', [
    ({'x-deduplication-window': 0}, 'an integer >= 1'),
    ({'x-deduplication-window': 'soon'}, 'an integer >= 1'),
    ({'x-deduplication-window': True}, 'an integer >= 1'),
    ({'x-deduplication-window': 10, 'x-deduplication-max-ids': 0}, 'an integer >= 1'),
    ({'x-deduplication-max-ids': 10}, 'it needs x-deduplication-window'),
])
def test_invalid_dedup_arguments_are_named(arguments, says):
    with pytest.raises(ValueError, match=says) as info:
        stored_pairs('q', arguments)
    assert "queue 'q'" in str(info.value)


def test_dedup_arguments_as_stored():
    assert stored_pairs('q', {'x-deduplication-window': '120000'}) == [
        'x-deduplication-window', '120000']
    assert stored_pairs('q', {'x-max-length': 5, 'x-deduplication-window': 9,
                              'x-deduplication-max-ids': 7}) == [
        'x-max-length', '5', 'x-overflow', 'drop-head', 'x-deduplication-window', '9',
        'x-deduplication-max-ids', '7']


# --- which id a message is known by -------------------------------------------------------

def _celery_v1(task_id: str) -> dict[str, Any]:
    raw = json.dumps({'task': 't.add', 'id': task_id, 'args': [1], 'kwargs': {}})
    return {'body': base64.b64encode(raw.encode()).decode(), 'content-type': 'application/json',
            'headers': {}, 'properties': {'correlation_id': task_id, 'body_encoding': 'base64'}}


def test_the_id_of_a_message():
    assert dedup_id({'headers': {'x-deduplication-id': 'k1', 'task': 't', 'id': 'tid'}}) == 'k1'
    assert dedup_id({'headers': {'task': 't.add', 'id': 'tid'}}) == 'tid'  # Celery protocol 2
    assert dedup_id({'headers': {'task': 't.add', 'id': 'tid', 'retries': 0}}) == 'tid'
    assert dedup_id({'headers': {'task': 't.add', 'id': 'tid', 'retries': 2}}) == 'tid:2'
    assert dedup_id(_celery_v1('v1id')) == 'v1id'  # protocol 1: the body's id
    assert dedup_id({'headers': {'id': 'not-a-task'}, 'body': '{}'}) == ''
    assert dedup_id({'headers': {}, 'body': 'plain', 'properties': {}}) == ''
    assert dedup_id({'headers': {'x-deduplication-id': 42}}) == '42'
    long = dedup_id({'headers': {'x-deduplication-id': 'x' * 1000}})
    assert long.startswith('sha256:') and len(long) < 80


# --- the Kombu API on real servers ----------------------------------------------------------



def test_kombu_publish_with_an_id_header_is_stored_once(any_url, caplog):
    q = Queue('dq', queue_arguments={'x-deduplication-window': HOUR})
    with Connection(any_url) as conn:
        q(conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='dq')
        with caplog.at_level(logging.DEBUG, logger='kombu_streams.dedup'):
            for _ in range(3):
                producer.publish({'n': 1}, headers={'x-deduplication-id': 'order-17'})
        producer.publish({'n': 2}, headers={'x-deduplication-id': 'order-18'})
        assert message_count(conn, 'dq') == 2
        assert sum('order-17' in r.getMessage() and 'duplicate' in r.getMessage()
                   for r in caplog.records) == 2


def test_a_celery_task_id_is_the_default_id(any_url):
    """A task message (protocol 2) published twice, as apply_async with the same task_id."""
    with Connection(any_url) as conn:
        Queue('tasks', queue_arguments={'x-deduplication-window': HOUR})(
            conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='tasks', serializer='json')
        task_id = str(uuid.uuid4())
        for _ in range(2):
            producer.publish([[1], {}, {}], headers={'task': 't.add', 'id': task_id,
                                                     'lang': 'py'})
        other = str(uuid.uuid4())
        producer.publish([[1], {}, {}], headers={'task': 't.add', 'id': other})
        assert message_count(conn, 'tasks') == 2


def test_a_retried_publish_after_a_dropped_connection_is_stored_once(any_url):
    """The first publish runs on the server, then its connection is killed (CLIENT KILL)
    before the client reads the reply: Kombu's publish retry sends it again, and the queue
    stores it once."""
    url = any_url
    admin = redis.Redis.from_url('redis://' + any_url[len('redis-streams://'):])
    killed: list[int] = []
    kombu: list[BaseException] = []  # errors Kombu's publish retry saw
    with Connection(url) as conn:
        Queue('rq', queue_arguments={'x-deduplication-window': HOUR})(
            conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='rq')
        client = conn.default_channel.client
        original = client.connection_pool.connection_class.read_response

        def read_response(self, *args, **kwargs):
            reply = original(self, *args, **kwargs)
            if not killed and isinstance(reply, bytes) and b'-' in reply:  # an entry id
                host, port = self._sock.getsockname()[:2]
                killed.append(admin.client_kill_filter(addr=f'{host}:{port}'))
                raise redis.ConnectionError('reply lost: connection killed')
            return reply

        cls = client.connection_pool.connection_class
        cls.read_response = read_response
        try:
            producer.publish({'n': 1}, headers={'x-deduplication-id': 'once'}, retry=True,
                             retry_policy={'max_retries': 3, 'interval_start': 0,
                                           'interval_step': 0,
                                           'errback': lambda exc, interval: kombu.append(exc)})
        finally:
            cls.read_response = original
        assert killed == [1]  # the first reply was lost for real
        assert len(kombu) == 1  # and Kombu's publish retry sent it again
        assert message_count(conn, 'rq') == 1
    b = Broker(admin, K, LEVELS)
    assert b.duplicates('rq') == 1


@requires_batch_publish
def test_a_batch_reports_its_duplicates(url):
    from kombu_streams.batch import BatchRefused
    with Connection(url, transport_options={'big_message_bytes': 2000}) as conn:
        Queue('bq', queue_arguments={'x-deduplication-window': HOUR, 'x-max-length': 4,
                                     'x-overflow': 'reject-publish'})(
            conn.default_channel).declare()
        producer = Producer(conn.default_channel, routing_key='bq', serializer='json')
        ids = ['a', 'b', 'a', 'c', 'c', 'd', 'e']  # 2 and 4 duplicates (4 big), 6 full
        with pytest.raises(BatchRefused) as info:
            with producer.batch(max_size=3):
                for n, ident in enumerate(ids):
                    producer.publish('x' * (3000 if n in (3, 4) else 1),
                                     headers={'x-deduplication-id': ident})
        assert sorted(info.value.refused) == [6]
        assert {n: d.ident for n, d in info.value.duplicates.items()} == {2: 'a', 4: 'c'}
        assert all(d.queue == 'bq' for d in info.value.duplicates.values())
        assert message_count(conn, 'bq') == 4
        raw = conn.default_channel.client
        assert raw.hlen(K.big('bq')) == 1  # the big duplicate left no body
        with producer.batch() as batch:  # no refusal: nothing raised, the batch tells
            producer.publish('y', headers={'x-deduplication-id': 'a'})
            producer.publish('y', routing_key='other', headers={'x-deduplication-id': 'z'})
        assert batch.state.session.duplicates == {0: ('bq', 'a')}


def test_cli_limits_and_status_show_the_window_and_duplicates(redis_url):
    from tests.test_cli import cli, cli_json
    c = redis.Redis.from_url(redis_url)
    b = Broker(c, K, LEVELS)
    b.declare('cq')
    out = cli_json(redis_url, 'limits', 'cq', '--set', 'x-deduplication-window=60000')
    assert out['arguments'] == {'x-deduplication-window': 60000} and out['duplicates'] == 0
    b.publish('cq', 0, body(1), dedup_id='a')
    b.publish('cq', 0, body(2), dedup_id='a')
    assert cli_json(redis_url, 'limits', 'cq')['duplicates'] == 1
    assert 'duplicates not stored: 1' in cli(redis_url, 'limits', 'cq').stdout
    status = cli_json(redis_url, 'status', 'cq')['queues'][0]
    assert status['duplicates'] == 1
    assert 'dedup 60000ms: 1 dup' in cli(redis_url, 'status', 'cq').stdout
    bad = cli(redis_url, 'limits', 'cq', '--set', 'x-deduplication-window=0')
    assert bad.returncode == 2 and 'x-deduplication-window' in bad.stderr


# --- a model: publishes with a clock ----------------------------------------------------------

class Publishes(RuleBasedStateMachine):
    """Publishes of a few ids while a clock (the ids' stored expiries, moved back) runs: a
    message is refused exactly when its id was stored within the window, so no duplicate is
    stored within it and nothing else is refused; reads and acks in between change nothing
    of that (SQS FIFO's rule: an id is remembered even after its message was consumed)."""

    #: The model's clock runs in whole minutes; the window ends half a minute off any of them,
    #: so the real time a run takes (seconds) never decides a publish the model does not.
    MINUTE = 60_000
    WINDOW = 60 * MINUTE + MINUTE // 2

    def __init__(self) -> None:
        super().__init__()
        import fakeredis
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.b = windowed(self.c, window=self.WINDOW)
        self.n = 0
        self.age: dict[str, int] = {}  # id -> ms since it was stored (model clock)
        self.expected: list[str] = []  # messages stored, in order
        self.consumed: list[str] = []

    @rule(ident=st.sampled_from(['a', 'b', 'c', 'd']), big=st.booleans(),
          delayed=st.booleans())
    def publish(self, ident: str, big: bool, delayed: bool) -> None:
        self.n += 1
        delay = Delay('+600000', 1000, 'l') if delayed else None
        if big:
            reply = self.b.publish_big('q', 0, body(self.n), delay=delay, dedup_id=ident)
        else:
            reply = self.b.publish('q', 0, body(self.n), delay=delay, dedup_id=ident)
        within = ident in self.age and self.age[ident] < self.WINDOW
        assert (reply == DUPLICATE) == within, (ident, self.age)
        if not within:
            self.age[ident] = 0
            if not delayed:
                self.expected.append(f'm{self.n}')

    @rule(minutes=st.integers(1, 90))
    def wait(self, minutes: int) -> None:
        """The clock runs: every remembered id's expiry moves that much closer."""
        ms = minutes * self.MINUTE
        for ident in self.age:
            self.age[ident] += ms
        for member, score in self.c.zrange(K.dedup('q'), 0, -1, withscores=True):
            if member != b'':
                self.c.zadd(K.dedup('q'), {member: max(score - ms, 1)}, xx=True)

    @rule()
    def consume(self) -> None:
        for d in read_messages(self.b, ['q'], 'c1', 2):
            payload = d.payload if not d.token else self.b.bodies('q', [d.token])[0]
            self.consumed.append(json.loads(payload)['body'])
            self.b.ack('q', [(d.stream, d.entry_id)], big=bool(d.token))

    @invariant()
    def stored_exactly_the_first_of_each_window(self) -> None:
        waiting = [json.loads(f[b'm'])['body'] if b'm' in f
                   else json.loads(self.c.hget(K.big('q'), f[b'r']))['body']
                   for _, f in self.c.xrange(K.stream('q', 0))]
        assert self.consumed + waiting == self.expected
        tokens = {f[b'r'] for _, f in self.c.xrange(K.stream('q', 0)) if b'r' in f}
        delayed = {v[2:] for v in self.c.hvals(K.delayed_messages('q')) if v[:2] == b'r:'}
        assert set(self.c.hkeys(K.big('q'))) == tokens | delayed  # no body left behind


TestPublishes = Publishes.TestCase
TestPublishes.settings = PROPERTY
