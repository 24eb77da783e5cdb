"""Big messages stored apart (``big_message_bytes``; docs/design.rst, "Big messages").

A message of at least ``big_message_bytes`` keeps its body in the queue's hash
``ks:q:{q}:big`` under a token, and its stream entry (or delayed value) holds the token: no
script copies the body. These tests follow a body through every way a message goes (ack,
stale ack, requeue, reclaim, dead letter and redrive, purges, delete, delayed delivery and
cancel, x-expires) and check that nothing is left behind and nothing lost. Script-level
tests run on fakeredis, Redis 6.2 and 7.0 (``script_client``); the Kombu ones on Redis 7.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis
from conftest import requires_batch_publish, wait_until
from helpers import read_messages
from kombu import Connection, Consumer, Producer, Queue

import kombu_streams  # noqa: F401  (registers the redis-streams:// scheme)
from kombu_streams.broker import Broker, Delay
from kombu_streams.channel import Channel
from kombu_streams.keys import LAYOUT, Keys
from kombu_streams.options import check
from kombu_streams.scripts import SCRIPTS

K = Keys()
LEVELS = [0, 3, 6, 9]
Q = 'q'


def broker(c) -> Broker:
    return Broker(c, K, LEVELS)


def envelope(i: int, size: int = 3000) -> bytes:
    """A Kombu-like envelope (it starts with '{') of about ``size`` bytes naming ``i``."""
    return json.dumps({'i': i, 'body': 'x' * size}).encode()


def tails(c, queue: str) -> set[str]:
    """What follows the hash tag of each key of ``queue`` (SCAN): the kinds of key it has."""
    head = K.queue_base(queue)
    return {k.decode()[len(head):] for k in c.scan_iter(match=f'{head}*', count=1000)}


def bodies_left(c, queue: str = Q) -> dict[bytes, bytes]:
    return c.hgetall(K.big(queue))


def read_one(c, consumer: str = 'c1', queue: str = Q):
    [d] = read_messages(broker(c), [queue], consumer, 1)
    return d


# -- script level ------------------------------------------------------------------------------

def test_publish_read_ack_leaves_what_an_empty_queue_keeps(script_client):
    """A big message from publish to ack: the entry holds the token, the read hands it out
    as such, the body comes by HGET, the ack (the channel's big ack) frees it; the queue's
    keys are then those of a queue whose inline message went the same way."""
    c = script_client
    b = broker(c)
    for q in (Q, 'inline'):
        b.declare(q)
    b.publish_big(Q, 0, envelope(1))
    b.publish('inline', 0, envelope(1))
    [(_, fields)] = c.xrange(K.stream(Q, 0))
    assert set(fields) == {b'r'} and bodies_left(c) == {fields[b'r']: envelope(1)}
    d = read_one(c)
    assert d.token == fields[b'r'] and d.payload == b''
    assert b.bodies(Q, [d.token]) == [envelope(1)]
    inline = read_one(c, queue='inline')
    assert b.ack(Q, [(d.stream, d.entry_id)], consumer='c1', big=True) == 1
    assert b.ack('inline', [(inline.stream, inline.entry_id)], consumer='c1', big=False) == 1
    assert not c.exists(K.big(Q))
    assert tails(c, Q) == tails(c, 'inline')
    assert 'big' not in ''.join(tails(c, Q))


def test_ordinary_acks_send_nothing_for_big_messages():
    """The hot path: an ack call of ordinary messages names no big key (only the in-flight
    flag and marker every ack of a queue takes, mode 'c'); only a big message's ack names
    the big hash."""
    b = broker(None)
    plain = b.ack_call(Q, [(K.stream(Q, 0), '1-1')], None, 'c1')
    big = b.ack_call(Q, [(K.stream(Q, 0), '1-1')], None, 'c1', big=True)
    flag = [K.capped(Q), K.wake(Q)]
    assert plain == (SCRIPTS['ack'], [K.stream(Q, 0), *flag], [Q, 'c1', 'c', 1, '1-1'])
    assert big == (SCRIPTS['ack'], [K.stream(Q, 0), K.big(Q), *flag],
                   [Q, 'c1', 'bc', 1, '1-1'])


def test_a_stale_ack_frees_nothing(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.publish_big(Q, 0, envelope(1))
    d = read_one(c)
    # its lease ran out and consumer c2 took it (as reclaim and a read of c2 would)
    c.xclaim(d.stream, Q, 'c2', 0, [d.entry_id], justid=True)
    assert b.ack(Q, [(d.stream, d.entry_id)], consumer='c1', big=True) == 0
    assert bodies_left(c) == {d.token: envelope(1)}
    assert b.ack(Q, [(d.stream, d.entry_id)], consumer='c2', big=True) == 1
    assert bodies_left(c) == {}


def test_an_operators_ack_looks_entries_up(script_client):
    """An ack with no consumer (ANY_OWNER) does not know which entries are big: it looks
    each up, frees the bodies of the big ones, and acks inline ones as ever."""
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.publish_big(Q, 0, envelope(1))
    b.publish(Q, 0, envelope(2))
    got = read_messages(b, [Q], 'c1', 2)
    assert [bool(d.token) for d in got] == [True, False]
    assert b.ack(Q, [(d.stream, d.entry_id) for d in got]) == 2
    assert bodies_left(c) == {} and c.xlen(K.stream(Q, 0)) == 0


def test_an_ack_of_an_undelivered_entry_keeps_its_body(script_client):
    """A stray ack (an operator's, of an entry no consumer got yet) deletes nothing, so it
    frees nothing: the message is still to be delivered, whole."""
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.publish_big(Q, 0, envelope(1))
    b.publish_big(Q, 0, envelope(2))
    first = read_one(c)
    [(second, _)] = c.xrange(K.stream(Q, 0), '(' + first.entry_id.decode(), '+')
    assert b.ack(Q, [(first.stream, first.entry_id), (first.stream, second)]) == 1
    [d] = read_messages(b, [Q], 'c1', 5)
    assert d.entry_id == second and b.bodies(Q, [d.token]) == [envelope(2)]


@pytest.mark.parametrize('budget, delivered', [(5000, 1), (7000, 2), (100_000, 3)])
def test_bodies_count_against_the_read_budget(script_client, budget, delivered):
    """A big message's entry is a token, but its body is what the consumer fetches next:
    read.lua counts it (HSTRLEN) against max_read_bytes, as it would an inline one."""
    c = script_client
    b = broker(c)
    b.declare(Q)
    for i in range(3):
        b.publish_big(Q, 0, envelope(i, 3000))
    call, parse = b.read_call(b.sources([Q]), 'c1', 10, max_bytes=budget)
    assert len(parse(b.run(call)).deliveries) == delivered


def test_requeue_and_reclaim_keep_the_body_and_redeliver_it(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.publish_big(Q, 0, envelope(1))
    d = read_one(c)
    assert b.requeue(Q, [(d.stream, d.entry_id)], consumer='c1') == 1
    assert bodies_left(c) == {d.token: envelope(1)}
    again = read_one(c, 'c2')
    assert (again.entry_id, again.token, again.deliveries) == (d.entry_id, d.token, 2)
    # c2 stops: its lease runs out (aged by hand), reclaim parks it, c3 gets it
    c.xclaim(d.stream, Q, 'c2', 0, [d.entry_id], idle=600_000, justid=True)
    assert b.reclaim(Q, 60_000, 100).moved == 1
    assert bodies_left(c) == {d.token: envelope(1)}
    third = read_one(c, 'c3')
    assert (third.token, third.deliveries) == (d.token, 3)
    assert b.bodies(Q, [third.token]) == [envelope(1)]
    assert b.ack(Q, [(d.stream, d.entry_id)], consumer='c3', big=True) == 1
    assert bodies_left(c) == {}


def test_dead_letter_redrive_consume_ack(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.publish_big(Q, 3, envelope(1))
    d = read_one(c)
    assert b.dead_letter(Q, d.stream, d.entry_id, 'why', 1, consumer='c1') == 1
    [(_, letter)] = c.xrange(K.dlq(Q))
    assert letter[b'f:r'] == d.token and b'f:m' not in letter
    assert bodies_left(c) == {d.token: envelope(1)}  # kept with its letter
    assert b.redrive_all(Q) == (1, 0, 0)
    back = read_one(c)
    assert back.token == d.token and back.stream == K.stream(Q, 3) and back.deliveries == 1
    assert b.ack(Q, [(back.stream, back.entry_id)], consumer='c1', big=True) == 1
    assert bodies_left(c) == {} and c.xlen(K.dlq(Q)) == 0


def test_purging_dead_letters_frees_their_bodies(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    for i in range(3):
        b.publish_big(Q, 0, envelope(i))
    b.publish(Q, 0, envelope(9))
    letters = []
    for d in read_messages(b, [Q], 'c1', 4):
        b.dead_letter(Q, d.stream, d.entry_id, 'why', 1, consumer='c1')
        letters.append(d)
    ids = [i for i, _ in c.xrange(K.dlq(Q))]
    # up to the first letter only: its body goes, the others' stay
    assert b.purge_dead_letters(Q, ids[0].decode()) == 1
    assert set(bodies_left(c)) == {letters[1].token, letters[2].token}
    # the rest, in steps of one letter
    assert b.purge_dead_letters(Q, ids[-1].decode(), batch=1) == 3
    assert c.xlen(K.dlq(Q)) == 0 and bodies_left(c) == {}


def test_purging_dead_letters_without_big_ones_trims(script_client):
    """No big hash: nothing to free, so whole stream nodes are trimmed unread; a letter
    filed after the given id stays."""
    c = script_client
    b = broker(c)
    for i in range(250):
        c.xadd(K.dlq(Q), {'reason': 'x', 'f:m': b'%d' % i})
    last = c.xrange(K.dlq(Q))[199][0].decode()
    assert b.purge_dead_letters(Q, last, batch=50) == 200
    assert [f[b'f:m'] for _, f in c.xrange(K.dlq(Q))] == [b'%d' % i for i in range(200, 250)]


def test_purge_frees_the_bodies_it_deletes_and_keeps_those_in_flight(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    for i in range(4):
        b.publish_big(Q, 0, envelope(i))
    b.publish(Q, 0, envelope(7))
    b.publish_big(Q, 3, envelope(8), delay=Delay('+600000', 1000, 'later'))
    flight, parked = read_messages(b, [Q], 'c1', 2)
    b.requeue(Q, [(parked.stream, parked.entry_id)], consumer='c1')
    assert b.purge(Q, batch=2) == 5  # parked, 2 + 1 fresh, 1 delayed; in steps of 2
    assert bodies_left(c) == {flight.token: envelope(0)}
    assert b.ack(Q, [(flight.stream, flight.entry_id)], consumer='c1', big=True) == 1
    assert bodies_left(c) == {}


def test_purge_of_a_queue_nobody_reads_frees_bodies(script_client):
    c = script_client
    b = broker(c)
    for i in range(5):
        b.publish_big(Q, 6, envelope(i))
    assert b.purge(Q, batch=2) == 5
    assert c.xlen(K.stream(Q, 6)) == 0 and bodies_left(c) == {}


@pytest.mark.parametrize('letters', [False, True])
def test_delete_frees_bodies_unless_dead_letters_stay(script_client, letters):
    c = script_client
    b = broker(c)
    b.declare(Q)
    for i in range(2):
        b.publish_big(Q, 0, envelope(i))
    if letters:
        d = read_one(c)
        b.dead_letter(Q, d.stream, d.entry_id, 'why', 1)
    b.delete(Q)
    if letters:  # the letter refers to a body in the hash: both stay
        assert sorted(tails(c, Q)) == [':big', ':dlq']
        assert d.token in bodies_left(c)
    else:
        assert tails(c, Q) == set()


def test_delayed_big_message_is_promoted_without_its_body_and_cancel_frees(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.publish_big(Q, 3, envelope(1), delay=Delay('+600000', 1000, 'soon'))
    b.publish_big(Q, 3, envelope(2), delay=Delay('+900000', 1000, 'never'))
    [soon, never] = c.zrange(K.delayed(Q), 0, -1)
    ref = c.hget(K.delayed_messages(Q), soon)
    assert ref.startswith(b'r:') and len(ref) == 34  # the reference, not the message
    shown = b.scheduled(Q, bodies=True)['messages']
    assert [json.loads(m['message'])['i'] for m in shown] == [1, 2]
    assert b.cancel(Q, ['never']) == [never.decode()]
    assert len(bodies_left(c)) == 1
    c.zadd(K.delayed(Q), {soon: 1}, xx=True)  # due now (no clock to move on a real server)
    d = read_one(c)
    assert d.token == ref[2:] and d.stream == K.stream(Q, 3)
    assert b.bodies(Q, [d.token]) == [envelope(1)]
    assert b.ack(Q, [(d.stream, d.entry_id)], consumer='c1', big=True) == 1
    assert bodies_left(c) == {} and c.zcard(K.delayed(Q)) == 0


def test_peek_shows_big_messages(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.publish_big(Q, 0, envelope(1))
    b.publish(Q, 0, envelope(2))
    first, second = b.peek(Q, 5)
    assert first.payload == envelope(1) and first.token is not None
    assert second.payload == envelope(2) and second.token is None


def test_the_big_hash_expires_with_its_queue(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.touch(Q, 60_000)
    b.publish_big(Q, 0, envelope(1))
    assert 0 < c.pttl(K.big(Q)) <= 60_000  # the queue's expiry, from the publish
    b.touch(Q, 600_000)
    assert c.pttl(K.big(Q)) > 60_000  # touch refreshes it like the queue's other keys


@pytest.mark.redis
def test_an_expiring_queue_leaves_no_big_key(redis_client):
    c = redis_client
    b = broker(c)
    b.declare(Q)
    b.touch(Q, 300)
    b.publish_big(Q, 0, envelope(1))
    wait_until(lambda: not tails(c, Q), 30, 'the queue to expire')


def test_a_body_found_missing_is_set_aside_by_the_read(script_client):
    c = script_client
    b = broker(c)
    b.declare(Q)
    b.publish_big(Q, 0, envelope(1))
    b.publish(Q, 0, envelope(2))
    c.delete(K.big(Q))  # behind our back
    sources = b.sources([Q])
    call, parse = b.read_call(sources, 'c1', 10)
    result = parse(b.run(call))
    assert [d.payload for d in result.deliveries] == [envelope(2)]
    [(_, stream, _, reason)] = result.aside
    assert reason.startswith('big message body missing') and stream == K.stream(Q, 0)
    [(_, letter)] = c.xrange(K.dlq(Q))
    assert letter[b'reason'].startswith(b'big message body missing') and b'f:r' in letter


def test_publish_without_its_body_is_refused(script_client):
    """publish.lua takes a big message only with its body there (the same MULTI/EXEC
    stored it); anything else is an error that writes nothing."""
    c = script_client
    b = broker(c)
    b.declare(Q)
    script, keys, args = b.publish_call(Q, 0, envelope(1), token='t0')
    with pytest.raises(redis.ResponseError, match='publish: no body'):
        script(c, keys, args)
    assert c.xlen(K.stream(Q, 0)) == 0 and not c.exists(K.wake(Q))


def test_a_routed_big_message_to_a_deleted_queue_leaves_no_body(script_client):
    c = script_client
    assert broker(c).publish_big('gone', 0, envelope(1), routed=True) is None
    assert tails(c, 'gone') == set()


@pytest.mark.parametrize('older', [b'1', b'2'])
def test_a_prefix_of_an_older_layout_is_recorded_as_this_one(script_client, older):
    """Layouts 2 (big messages) and 3 (queue arguments) only add keys and a field: a prefix
    recorded as 1 or 2 is read as it is, and recorded as 3 by the first channel (an older
    client then refuses to start)."""
    c = script_client
    assert LAYOUT == 3
    c.set(K.layout(), older)
    broker(c).check_layout()
    assert c.get(K.layout()) == b'3'


@pytest.mark.parametrize('value', [-1, True, '10', 1.5, None])
def test_big_message_bytes_is_checked(value):
    with pytest.raises(ValueError, match='big_message_bytes'):
        check({'big_message_bytes': value})
    check({'big_message_bytes': 0})
    assert Channel.big_message_bytes == 512 * 1024


# -- through Kombu -----------------------------------------------------------------------------

def _url(redis_server) -> str:
    return 'redis-streams://' + redis_server.url[len('redis://'):]


def _consume(conn: Connection, queue: Queue, n: int, ack: bool = True) -> list[dict]:
    got: list[dict] = []

    def on_message(payload, message):
        got.append(payload)
        if ack:
            message.ack()

    with Consumer(conn, [queue], callbacks=[on_message], accept=['json']):
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
    return got


@pytest.mark.redis
@pytest.mark.parametrize('threshold', [1000, 0])
def test_kombu_big_messages_round_trip(redis_server, redis_client, threshold):
    """Above ``big_message_bytes`` a message goes apart (0: never), is consumed whole and
    acked, and leaves nothing behind: the keys then are those an inline one leaves."""
    url = _url(redis_server)
    queue = Queue('kb', routing_key='kb')
    with Connection(url, transport_options={'big_message_bytes': threshold}) as conn:
        producer = Producer(conn.channel())
        producer.publish({'i': 0, 'pad': 'x' * 5000}, routing_key='kb', declare=[queue])
        producer.publish({'i': 1}, routing_key='kb')
        fields = [set(f) for _, f in redis_client.xrange(K.stream('kb', 0))]
        assert fields == ([{b'r'}, {b'm'}] if threshold else [{b'm'}, {b'm'}])
        got = _consume(conn, queue, 2)
    assert [m['i'] for m in got] == [0, 1] and got[0].get('pad') == 'x' * 5000
    assert not redis_client.exists(K.big('kb'))
    assert redis_client.xlen(K.stream('kb', 0)) == 0


@pytest.mark.redis
def test_kombu_reject_with_requeue_redelivers_a_big_message(redis_server, redis_client):
    url = _url(redis_server)
    queue = Queue('kr', routing_key='kr')
    seen = []
    with Connection(url, transport_options={'big_message_bytes': 1000}) as conn:
        Producer(conn.channel()).publish({'pad': 'y' * 4000}, routing_key='kr',
                                         declare=[queue])

        def on_message(payload, message):
            seen.append(message.delivery_info.get('redelivered'))
            if len(seen) == 1:
                message.requeue()
            else:
                message.ack()

        with Consumer(conn, [queue], callbacks=[on_message], accept=['json']):
            deadline = time.monotonic() + 30
            while len(seen) < 2 and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
    assert seen == [False, True]
    assert not redis_client.exists(K.big('kr'))


@pytest.mark.redis
def test_kombu_missing_body_is_dead_lettered_once(redis_server, redis_client, caplog):
    """A body deleted behind our back: the entry goes to the dead-letter stream at its first
    read, logged once; the consumer goes on with the next message."""
    url = _url(redis_server)
    queue = Queue('km', routing_key='km')
    with Connection(url, transport_options={'big_message_bytes': 1000}) as conn:
        producer = Producer(conn.channel())
        producer.publish({'i': 0, 'pad': 'x' * 5000}, routing_key='km', declare=[queue])
        producer.publish({'i': 1}, routing_key='km')
        redis_client.delete(K.big('km'))
        with caplog.at_level(logging.WARNING, logger='kombu_streams'):
            got = _consume(conn, queue, 1)
    assert [m['i'] for m in got] == [1]
    [(_, letter)] = redis_client.xrange(K.dlq('km'))
    assert letter[b'reason'].startswith(b'big message body missing')
    assert len([r for r in caplog.records if 'big message body missing' in r.getMessage()]) == 1


@pytest.mark.redis
def test_kombu_body_gone_between_read_and_fetch(redis_server, redis_client, monkeypatch):
    """The read saw the body; it went before the consumer fetched it (the queue was deleted
    and made again, say): the channel sets the entry aside itself and goes on."""
    url = _url(redis_server)
    queue = Queue('kg', routing_key='kg')
    fetch = Broker.bodies

    def racing(self, q, tokens):
        self.client.delete(self.keys.big(q))
        return fetch(self, q, tokens)

    monkeypatch.setattr(Broker, 'bodies', racing)
    with Connection(url, transport_options={'big_message_bytes': 1000}) as conn:
        producer = Producer(conn.channel())
        producer.publish({'i': 0, 'pad': 'x' * 5000}, routing_key='kg', declare=[queue])
        producer.publish({'i': 1}, routing_key='kg')
        got = _consume(conn, queue, 1)
    assert [m['i'] for m in got] == [1]
    [(_, letter)] = redis_client.xrange(K.dlq('kg'))
    assert letter[b'reason'].startswith(b'big message body missing') and b'f:r' in letter
    assert redis_client.xlen(K.stream('kg', 0)) == 0


@pytest.mark.redis
def test_kombu_big_message_after_script_flush(redis_server, redis_client):
    """NOSCRIPT inside the publish's MULTI/EXEC: the script is loaded and the transaction
    sent again with the same token; one message, one body."""
    url = _url(redis_server)
    queue = Queue('kn', routing_key='kn')
    with Connection(url, transport_options={'big_message_bytes': 1000}) as conn:
        producer = Producer(conn.channel())
        producer.publish({'i': 0}, routing_key='kn', declare=[queue])  # scripts loaded
        redis_client.script_flush()
        producer.publish({'i': 1, 'pad': 'x' * 5000}, routing_key='kn')
        assert redis_client.xlen(K.stream('kn', 0)) == 2
        assert redis_client.hlen(K.big('kn')) == 1
        got = _consume(conn, queue, 2)
    assert [m['i'] for m in got] == [0, 1]
    assert not redis_client.exists(K.big('kn'))


@pytest.mark.redis
@requires_batch_publish
def test_kombu_batch_sends_big_messages_alone_in_order(redis_server, redis_client):
    url = _url(redis_server)
    queue = Queue('kp', routing_key='kp')
    with Connection(url, transport_options={'big_message_bytes': 1000}) as conn:
        queue(conn.default_channel).declare()
        producer = Producer(conn.default_channel, serializer='json')
        with producer.batch(max_size=10):
            for i in range(6):
                body = {'i': i, 'pad': 'x' * 3000} if i % 3 == 1 else {'i': i}
                producer.publish(body, routing_key='kp')
        assert redis_client.hlen(K.big('kp')) == 2
        got = _consume(conn, queue, 6)
    assert [m['i'] for m in got] == list(range(6))
    assert not redis_client.exists(K.big('kp'))
