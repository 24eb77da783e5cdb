"""A message's body is decoded once: the envelope check decodes it when it is read (to set
aside what Kombu's Message would fail on, see kombu_streams/envelope.py), and Kombu's
Message takes that decoding instead of decoding the body again (Consuming.decode_body)."""

from __future__ import annotations

import socket

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport.virtual import base as virtual_base

from kombu_streams.consume import KEEP_DECODED

pytestmark = pytest.mark.redis


@pytest.fixture
def url(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return 'redis-streams://' + redis_server.url[len('redis://'):]


@pytest.fixture
def base64_decodes(monkeypatch):
    """Every base64 body Kombu's codec decodes, in order."""
    seen: list[str] = []
    real = virtual_base.Base64.decode

    def decode(self, s):
        seen.append(s)
        return real(self, s)

    monkeypatch.setattr(virtual_base.Base64, 'decode', decode)
    return seen


def consume(url: str, bodies: list[str], prefetch: int) -> list[str]:
    """Publish ``bodies`` (text/plain) to a fresh queue, consume and ack them; what arrived."""
    queue = Queue('once', Exchange('once', 'direct'), routing_key='once')
    got: list[str] = []
    with Connection(url) as conn:
        producer = Producer(conn.channel(), queue.exchange)
        queue(producer.channel).declare()
        for body in bodies:
            producer.publish(body, routing_key='once', serializer=None,
                             content_type='text/plain', content_encoding='utf-8')

        def on_message(body, message):
            got.append(body)
            message.ack()

        with Consumer(conn.channel(), [queue], callbacks=[on_message], accept=['text/plain'],
                      prefetch_count=prefetch):
            while len(got) < len(bodies):
                try:
                    conn.drain_events(timeout=2)
                except socket.timeout:
                    break
    return got


@pytest.mark.parametrize('prefetch', [1, 10])
def test_each_body_is_decoded_once(url, base64_decodes, prefetch):
    bodies = [f'body {i}' for i in range(5)]
    assert consume(url, bodies, prefetch) == bodies
    assert len(base64_decodes) == len(bodies)  # the check's decoding, none by Kombu again


def test_a_big_body_is_decoded_again_not_kept(url, base64_decodes):
    bodies = ['x' * (KEEP_DECODED + 1), 'small']
    assert consume(url, bodies, 10) == bodies
    assert len(base64_decodes) == 3  # the big one twice (not kept), the small one once


def test_only_the_same_body_object_takes_a_kept_decoding(url):
    with Connection(url) as conn:
        channel = conn.channel()
        body = 'aGVsbG8='  # base64 of b'hello'
        assert channel._check_decode(body, 'base64') == b'hello'
        other = ''.join(['aGVs', 'bG8='])  # equal text, another object
        assert other is not body
        assert channel.decode_body(other, 'base64') == b'hello'
        assert channel.decode_body(body, 'utf-8') == body  # another encoding: not the kept one
        assert channel.decode_body(body, 'base64') == b'hello'
        assert not channel._decoded  # taken once


ENVELOPES = [
    # Kombu's own text, typed values restored by its object_hook
    None,
    '{"a": 1}',
    '  {"a": 1}',  # white space before and after: decode() matches it
    '{"a": 1}\n',
    '{"a": 1} x',  # extra data
    '{"a": 1}{"b": 2}',
    '',
    '   ',
    'nope',
    '{"a": ',
    '[1, "two", null]',
    '"text"',
]


@pytest.mark.parametrize('text', ENVELOPES)
def test_the_envelope_decoder_answers_as_kombus_loads(text):
    """The channel's envelope decoder (kombu_streams/envelope.py) takes Kombu's text with
    raw_decode, everything else with decode(): either way it answers what Kombu's loads
    answers, and raises the same error for what Kombu's loads refuses."""
    import datetime
    import uuid

    from kombu.utils.json import dumps, loads

    from kombu_streams.envelope import decoder

    if text is None:
        text = dumps({'headers': {'eta': datetime.datetime(2030, 1, 2, 3, 4, 5),
                                  'id': uuid.UUID(int=7)},
                      'properties': {'delivery_info': {}}, 'body': 'eA=='})
    decode = decoder()
    try:
        expected = loads(text)
    except Exception as exc:
        with pytest.raises(type(exc)) as raised:
            decode(text)
        assert str(raised.value) == str(exc)
    else:
        assert decode(text) == expected
        assert type(decode(text)) is type(expected)
