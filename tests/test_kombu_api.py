"""Kombu API tests against real Redis servers (7.0 and 6.2).

Every test that talks to Redis runs once per server through the ``url`` fixture, which
flushes the server and yields a ``redis-streams://`` URL. Assertions compare exact payloads
and orders, so a transport that reorders, duplicates or drops messages fails.
"""

from __future__ import annotations

import inspect
import re
import socket
import time
import warnings

import pytest
import redis
from conftest import requires_batch_publish
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import ChannelError
from kombu.transport.virtual.exchange import TopicExchange

import kombu_streams
from kombu_streams.broker import READ, WALK, Broker
from kombu_streams.connection import UnsupportedServer, check_server
from kombu_streams.keys import Keys
from kombu_streams.plan import SWEEP_INTERVAL
from kombu_streams.scripts import KeyTypeError
from kombu_streams.transport import Transport

#: Kombu 5.7 made a topic binding's ``*`` match exactly one word; before, it matched one or
#: more (``stock.*`` took ``stock.usd.nyse``). Routing is Kombu's own, so expect its rule.
STAR_MATCHES_ONE_WORD = re.fullmatch(TopicExchange.wildcards["*"], "usd.nyse") is None

DEFAULT_LEVELS = [0, 3, 6, 9]
TIMEOUT = 2.0  # per drain_events call when a message is expected
QUIET = 0.1  # per drain_events call when nothing is expected


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param("redis_server", id="redis7", marks=pytest.mark.redis),
        pytest.param("redis62_server", id="redis62", marks=pytest.mark.redis),
    ]
)
def server(request):
    srv = request.getfixturevalue(request.param)
    client = redis.Redis.from_url(srv.url)
    try:
        client.flushall()
        client.script_flush()
    finally:
        client.close()
    return srv


@pytest.fixture
def url(server):
    """``redis-streams://`` URL of an empty server, once per server version."""
    assert server.url.startswith("redis://")
    return "redis-streams://" + server.url[len("redis://"):]


@pytest.fixture
def plain_url(server, url):
    """The same server as ``url`` but with the ``redis://`` scheme."""
    return server.url


@pytest.fixture
def raw(server, url):
    client = redis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def conn(url):
    c = Connection(url)
    try:
        yield c
    finally:
        c.release()


def direct_queue(name, exchange=None, routing_key=None):
    ex = Exchange(exchange or name, type="direct", durable=True)
    return Queue(name, ex, routing_key=routing_key or name)


def publish(conn, bodies, queue=None, exchange=None, routing_key=None, priority=None,
            declare=()):
    """Publish each body (a list, or (body, priority) pairs when priority == 'pairs')."""
    producer = Producer(conn.default_channel, serializer="json")
    if queue is not None:
        exchange = exchange or queue.exchange
        routing_key = routing_key or queue.routing_key
        declare = [queue, *declare]
    for body in bodies:
        kw = {}
        if priority == "pairs":
            body, kw["priority"] = body
        elif priority is not None:
            kw["priority"] = priority
        producer.publish(body, exchange=exchange, routing_key=routing_key,
                         declare=list(declare), **kw)


def drain(conn, queues, n, *, ack=True, no_ack=False, prefetch=None, channel=None,
          check_empty=True, timeout=TIMEOUT):
    """Consume exactly ``n`` messages from ``queues``; return the messages in order.

    With ``check_empty`` a further ``drain_events`` must time out (nothing extra arrives).
    """
    got = []
    ch = channel or conn.channel()
    if prefetch:
        ch.basic_qos(0, prefetch, False)

    def on_message(body, message):
        got.append(message)
        if ack and not no_ack:
            message.ack()

    consumer = Consumer(ch, queues, callbacks=[on_message], no_ack=no_ack, accept=["json"])
    try:
        with consumer:
            while len(got) < n:
                before = len(got)
                conn.drain_events(timeout=timeout)
                assert len(got) == before + 1, "drain_events must deliver exactly one message"
            if check_empty:
                with pytest.raises(socket.timeout):
                    conn.drain_events(timeout=QUIET)
    finally:
        if channel is None:
            ch.close()
    return got


def payloads(messages):
    return [m.payload for m in messages]


def spy_waits(conn, monkeypatch):
    """The timeout of every BZPOPMIN the connection's poller sends from now on."""
    pending = conn.transport.cycle.waits
    waits = []
    real = pending.send

    def send(keys, owner, block, *args, **kwargs):
        waits.append(block)
        return real(keys, owner, block, *args, **kwargs)

    monkeypatch.setattr(pending, "send", send)
    return waits


def spy_reads(monkeypatch):
    """(modes, messages delivered) of every read.lua call any channel makes from now on."""
    reads = []
    real = Broker.read_call
    signature = inspect.signature(real)

    def read_call(self, sources, *args, **kwargs):
        call, parse = real(self, sources, *args, **kwargs)
        modes = signature.bind(self, sources, *args, **kwargs).arguments.get("modes") or {}

        def parse_and_note(reply):
            result = parse(reply)
            reads.append(({s: modes.get(s, READ) for s in sources}, len(result.deliveries)))
            return result

        return call, parse_and_note

    monkeypatch.setattr(Broker, "read_call", read_call)
    return reads


def queue_keys(queue, prefix="", levels=DEFAULT_LEVELS):
    return Keys(prefix).streams(queue, levels)


def pending_total(raw, queue, prefix="", levels=DEFAULT_LEVELS):
    total = 0
    for key in queue_keys(queue, prefix, levels):
        if raw.exists(key):
            try:
                total += raw.xpending(key, queue)["pending"]
            except redis.ResponseError:  # no group on this stream
                pass
    return total


def stream_len_total(raw, queue, prefix="", levels=DEFAULT_LEVELS):
    return sum(raw.xlen(k) for k in queue_keys(queue, prefix, levels) if raw.exists(k))


def all_keys(raw):
    return sorted(k.decode() for k in raw.keys("*"))


# ---------------------------------------------------------------------------
# connecting
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["scheme", "transport_name", "transport_class"])
def test_connect(how, url, plain_url):
    if how == "scheme":
        c = Connection(url)
    elif how == "transport_name":
        c = Connection(plain_url, transport="kombu_streams.transport:Transport")
    else:
        c = Connection(plain_url, transport=kombu_streams.Transport)
    with c:
        assert isinstance(c.transport, Transport)
        assert c.transport.driver_type == "redis"
        assert c.transport.driver_name == "redis-streams"
        q = direct_queue("connect-q")
        publish(c, [{"how": how}], queue=q)
        assert payloads(drain(c, [q], 1)) == [{"how": how}]
        assert c.transport.server_version >= (6, 2, 0)


def test_scheme_registered():
    from kombu.transport import TRANSPORT_ALIASES, resolve_transport

    assert TRANSPORT_ALIASES["redis-streams"] == "kombu_streams.transport:Transport"
    assert TRANSPORT_ALIASES["rediss-streams"] == "kombu_streams.transport:Transport"
    assert resolve_transport("redis-streams") is Transport


# ---------------------------------------------------------------------------
# exchanges and routing
# ---------------------------------------------------------------------------


def test_direct_exchange(conn):
    ex = Exchange("direct-x", type="direct")
    qa = Queue("d-a", ex, routing_key="a")
    qb = Queue("d-b", ex, routing_key="b")
    qa2 = Queue("d-a2", ex, routing_key="a")
    for q in (qa, qb, qa2):
        q(conn.default_channel).declare()
    publish(conn, ["a1"], exchange=ex, routing_key="a")
    publish(conn, ["b1"], exchange=ex, routing_key="b")
    publish(conn, ["c1"], exchange=ex, routing_key="c")  # bound nowhere
    publish(conn, ["a2"], exchange=ex, routing_key="a")
    assert payloads(drain(conn, [qa], 2)) == ["a1", "a2"]
    assert payloads(drain(conn, [qa2], 2)) == ["a1", "a2"]
    assert payloads(drain(conn, [qb], 1)) == ["b1"]


def test_topic_exchange(conn):
    ex = Exchange("topic-x", type="topic")
    q_star = Queue("t-star", ex, routing_key="stock.*")
    q_hash = Queue("t-hash", ex, routing_key="stock.#")
    q_eur = Queue("t-eur", ex, routing_key="*.eur")
    q_exact = Queue("t-exact", ex, routing_key="stock.usd.nyse")
    for q in (q_star, q_hash, q_eur, q_exact):
        q(conn.default_channel).declare()
    for rk in ["stock.usd", "stock.usd.nyse", "bond.eur", "stock.eur", "stock", "x.y.eur"]:
        publish(conn, [rk], exchange=ex, routing_key=rk)
    if STAR_MATCHES_ONE_WORD:
        star, eur = ["stock.usd", "stock.eur"], ["bond.eur", "stock.eur"]
    else:  # Kombu < 5.7 (its own rule, which routing here follows): '*' spans words
        star, eur = ["stock.usd", "stock.usd.nyse", "stock.eur"], ["bond.eur", "stock.eur",
                                                                    "x.y.eur"]
    assert payloads(drain(conn, [q_star], len(star))) == star
    assert payloads(drain(conn, [q_hash], 3)) == ["stock.usd", "stock.usd.nyse", "stock.eur"]
    assert payloads(drain(conn, [q_eur], len(eur))) == eur
    assert payloads(drain(conn, [q_exact], 1)) == ["stock.usd.nyse"]


def test_fanout_each_queue_gets_a_copy(conn, url):
    ex = Exchange("fan-x", type="fanout")
    queues = [Queue(f"fan-{i}", ex) for i in range(3)]
    # Bindings are shared through Redis: bind from another connection than the publisher.
    with Connection(url) as other:
        for q in queues:
            q(other.default_channel).declare()
        publish(conn, ["one", "two"], exchange=ex, routing_key="ignored", declare=[ex])
        for q in queues:
            assert payloads(drain(other, [q], 2)) == ["one", "two"]


def test_a_cached_table_routes_each_publish_once(conn, raw, monkeypatch):
    """A publish routed by the cached table goes to the queues it names, routed once (not
    again by Kombu's lookup); a routing key the cached table has no queue for reads the
    table again, so a binding made elsewhere since is found at once."""
    from kombu.transport.virtual.exchange import DirectExchange

    qa, qb = direct_queue("route-a", "route-x", "k"), direct_queue("route-b", "route-x", "k")
    late = direct_queue("route-late", "route-x", "late")
    bindings = Keys().bindings("route-x")
    late(conn.default_channel).declare()
    member = next(m for m in raw.smembers(bindings) if m.endswith(b"route-late"))
    raw.srem(bindings, member)  # as if bound elsewhere, later: after the table is cached
    publish(conn, ["warm"], queue=qa, declare=[qb])  # binds both, caches the table
    raw.sadd(bindings, member)
    calls = []
    real = DirectExchange.lookup

    def lookup(self, table, exchange, routing_key, default):
        calls.append(routing_key)
        return real(self, table, exchange, routing_key, default)

    monkeypatch.setattr(DirectExchange, "lookup", lookup)
    publish(conn, ["both"], exchange=qa.exchange, routing_key="k")
    assert calls == ["k"]
    calls.clear()
    publish(conn, ["late"], exchange=qa.exchange, routing_key="late")
    assert calls == ["late", "late"]  # the cached table, then the one read again
    assert payloads(drain(conn, [qa], 2)) == ["warm", "both"]
    assert payloads(drain(conn, [qb], 2)) == ["warm", "both"]
    assert payloads(drain(conn, [late], 1)) == ["late"]


def test_consumer_on_several_queues_gets_each_message_once(conn):
    qa, qb = direct_queue("multi-a"), direct_queue("multi-b")
    publish(conn, ["a1", "a2"], queue=qa)
    publish(conn, ["b1", "b2"], queue=qb)
    got = payloads(drain(conn, [qa, qb], 4))
    assert sorted(got) == ["a1", "a2", "b1", "b2"]
    assert [x for x in got if x.startswith("a")] == ["a1", "a2"]
    assert [x for x in got if x.startswith("b")] == ["b1", "b2"]


# ---------------------------------------------------------------------------
# drain_events
# ---------------------------------------------------------------------------


def test_one_message_per_drain_events(conn):
    q = direct_queue("one-per-drain")
    publish(conn, [f"m{i}" for i in range(5)], queue=q)
    got = []
    with Consumer(conn.default_channel, [q], callbacks=[lambda b, m: (got.append(b), m.ack())],
                  accept=["json"]):
        for i in range(5):
            conn.drain_events(timeout=TIMEOUT)
            assert got == [f"m{j}" for j in range(i + 1)]
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=QUIET)
    assert got == ["m0", "m1", "m2", "m3", "m4"]


def test_drain_events_times_out(conn, monkeypatch):
    """It waits out its timeout, and no single wait asked of Redis is longer (a slow machine
    makes the drain slower, never these figures wrong)."""
    q = direct_queue("empty-q")
    with Consumer(conn.default_channel, [q], callbacks=[lambda b, m: m.ack()]):
        waits = spy_waits(conn, monkeypatch)
        start = time.monotonic()
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.5)
        elapsed = time.monotonic() - start
    assert elapsed >= 0.4, elapsed  # a lower bound: only a clock fault breaks it
    assert waits and all(0 < w <= 0.5 for w in waits), waits


def test_drain_events_wakes_on_publish_from_other_connection(conn, url):
    q = direct_queue("wake-q")
    got = []
    with Consumer(conn.default_channel, [q], callbacks=[lambda b, m: (got.append(b), m.ack())],
                  accept=["json"]):
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=QUIET)
        with Connection(url) as other:
            publish(other, ["late"], queue=q)
        conn.drain_events(timeout=TIMEOUT)
    assert got == ["late"]


# ---------------------------------------------------------------------------
# SimpleQueue and basic_get
# ---------------------------------------------------------------------------


def test_a_channel_holds_one_connection_for_its_calls_until_closed(conn, raw):
    """A channel's script calls (publish, read, acks) go over one connection it holds
    (Transport.make_client): no pool check-out per call, where redis-py locks such a
    client; once the channel is closed its connection is back in the pool and its client
    (still used by the lease keeper for acks it adopted) is the pool's."""
    channel = conn.channel()
    held = channel.client
    if 'single_connection_lock' not in inspect.getsource(redis.Redis.__init__):
        assert held.connection is None  # this redis-py does not lock it: the pool, as before
        channel.close()
        return
    pool = conn.transport.pool
    taken = []
    real = pool.get_connection
    pool.get_connection = lambda *a, **k: taken.append(1) or real(*a, **k)
    try:
        queue = direct_queue('held')
        publish(conn, ['a', 'b', 'c'], queue)  # declares on conn's default channel
        with Producer(channel, serializer='json') as producer:
            for body in ('d', 'e'):
                producer.publish(body, exchange=queue.exchange, routing_key='held')
        got = drain(conn, [queue], 5, channel=channel, prefetch=1)
        assert sorted(payloads(got)) == ['a', 'b', 'c', 'd', 'e']
        mine = held.connection
        assert mine is not None and channel.client is held
    finally:
        pool.get_connection = real
    channel.close()
    assert held.connection is None and channel.client is not held
    assert channel.client.connection is None and mine in pool._available_connections
    # a check-out per call would be 12 or more (declares, 5 publishes, 5 reads); what is
    # left is the default channel's own connection and the consumer's waits (BZPOPMIN)
    assert len(taken) < 6, len(taken)


def test_simple_queue(conn):
    sq = conn.SimpleQueue("simple-q", serializer="json")
    try:
        sq.consumer.qos(prefetch_count=1)  # so qsize is exact while consuming
        assert sq.qsize() == 0
        for i in range(3):
            sq.put({"n": i})
        assert sq.qsize() == 3
        m = sq.get(timeout=TIMEOUT)
        assert m.payload == {"n": 0}
        assert sq.qsize() == 2
        m.ack()
        assert sq.qsize() == 2
        m = sq.get(timeout=TIMEOUT)
        assert m.payload == {"n": 1}
        m.requeue()
        assert sq.qsize() == 2
        m = sq.get(timeout=TIMEOUT)
        assert m.payload == {"n": 1}
        assert m.delivery_info["redelivered"] is True
        m.ack()
        m = sq.get_nowait()
        assert m.payload == {"n": 2}
        m.ack()
        assert sq.qsize() == 0
        with pytest.raises(sq.Empty):
            sq.get_nowait()
        with pytest.raises(sq.Empty):
            sq.get(timeout=QUIET)
        sq.put("last")
        assert len(sq) == 1
        assert sq.get(timeout=TIMEOUT).payload == "last"
    finally:
        sq.close()


def test_basic_get_with_ack(conn, raw):
    q = direct_queue("get-q")
    publish(conn, ["g1", "g2"], queue=q)
    bound = q(conn.default_channel)
    m = bound.get(no_ack=False)
    assert m.payload == "g1"
    assert m.delivery_info["redelivered"] is False
    assert pending_total(raw, "get-q") == 1
    m.ack()
    assert pending_total(raw, "get-q") == 0
    assert stream_len_total(raw, "get-q") == 1
    m2 = bound.get(no_ack=False)
    assert m2.payload == "g2"
    m2.requeue()
    m3 = bound.get(no_ack=False)
    assert m3.payload == "g2"
    assert m3.delivery_info["redelivered"] is True
    m3.ack()
    assert bound.get() is None
    assert stream_len_total(raw, "get-q") == 0


def test_basic_get_no_ack(conn, raw):
    q = direct_queue("get-noack-q")
    publish(conn, ["n1", "n2"], queue=q)
    bound = q(conn.default_channel)
    m = bound.get(no_ack=True)
    assert m.payload == "n1"
    assert pending_total(raw, "get-noack-q") == 0
    assert stream_len_total(raw, "get-noack-q") == 1
    assert bound.get(no_ack=True).payload == "n2"
    assert bound.get(no_ack=True) is None
    assert pending_total(raw, "get-noack-q") == 0
    assert stream_len_total(raw, "get-noack-q") == 0


def test_no_ack_consumer_leaves_nothing_pending(conn, raw):
    q = direct_queue("noack-q")
    publish(conn, [f"x{i}" for i in range(4)], queue=q)
    assert payloads(drain(conn, [q], 4, no_ack=True)) == ["x0", "x1", "x2", "x3"]
    assert pending_total(raw, "noack-q") == 0
    assert stream_len_total(raw, "noack-q") == 0


def test_no_ack_consumer_does_not_lose_unread_messages_on_close(url):
    """Messages never handed to a no_ack consumer stay in the queue (as Kombu's Redis does)."""
    q = direct_queue("noack-close-q")
    with Connection(url) as c1:
        publish(c1, [f"y{i}" for i in range(5)], queue=q)
        assert payloads(drain(c1, [q], 1, no_ack=True, check_empty=False)) == ["y0"]
    with Connection(url) as c2:
        assert payloads(drain(c2, [q], 4)) == ["y1", "y2", "y3", "y4"]


# ---------------------------------------------------------------------------
# priorities
# ---------------------------------------------------------------------------


def test_priority_default_steps(conn, raw):
    q = direct_queue("prio-q")
    order = [5, 0, 9, 2, 3, 1, 6, 8, 7, 4]
    publish(conn, [(f"p{p}", p) for p in order], queue=q, priority="pairs")
    # stored per level as Kombu's Redis transport buckets them
    lens = {lvl: raw.xlen(Keys().stream("prio-q", lvl)) for lvl in DEFAULT_LEVELS}
    assert lens == {0: 3, 3: 3, 6: 3, 9: 1}
    got = payloads(drain(conn, [q], 10))
    assert got == ["p0", "p2", "p1", "p5", "p3", "p4", "p6", "p8", "p7", "p9"]


def test_priority_default_is_zero_and_served_first(conn):
    q = direct_queue("prio-default-q")
    publish(conn, ["low"], queue=q, priority=7)
    publish(conn, ["plain"], queue=q)  # Producer default priority 0
    assert payloads(drain(conn, [q], 2)) == ["plain", "low"]


def test_priority_clamped(conn, raw):
    q = direct_queue("prio-clamp-q")
    publish(conn, [("over", 15), ("under", -3), ("nine", 9), ("zero", 0)], queue=q,
            priority="pairs")
    assert raw.xlen(Keys().stream("prio-clamp-q", 9)) == 2
    assert raw.xlen(Keys().stream("prio-clamp-q", 0)) == 2
    assert not any("15" in k or "-3" in k for k in all_keys(raw))
    assert payloads(drain(conn, [q], 4)) == ["under", "zero", "over", "nine"]


def test_priority_custom_steps_and_sep(url, raw):
    opts = {"priority_steps": [0, 5], "sep": "|"}
    with Connection(url, transport_options=opts) as c:
        ex = Exchange("sep-x", type="topic")
        q = Queue("prio-custom-q", ex, routing_key="jobs.*")
        q(c.default_channel).declare()
        members = raw.smembers(Keys().bindings("sep-x"))
        assert len(members) == 1
        member = members.pop().decode()
        assert member.split("|")[0] == "jobs.*" and member.split("|")[-1] == "prio-custom-q"
        assert "\x06\x16" not in member
        publish(c, [(f"p{p}", p) for p in [7, 1, 5, 4, 9, 0]], exchange=ex,
                routing_key="jobs.run", priority="pairs")
        assert raw.exists(Keys().stream("prio-custom-q", 5))
        assert not raw.exists(Keys().stream("prio-custom-q", 3))
        assert raw.xlen(Keys().stream("prio-custom-q", 0)) == 3
        assert raw.xlen(Keys().stream("prio-custom-q", 5)) == 3
        assert payloads(drain(c, [q], 6)) == ["p1", "p4", "p0", "p7", "p5", "p9"]


# ---------------------------------------------------------------------------
# requeue and restore on close
# ---------------------------------------------------------------------------


def consume_requeueing_first(conn, q, prefetch, after_requeue=None):
    """Consume from ``q``: requeue the first message, ack all others; return all deliveries.

    ``after_requeue`` runs right after the first message was requeued.
    """
    ch = conn.channel()
    if prefetch:
        ch.basic_qos(0, prefetch, False)
    got = []

    def on_message(body, message):
        got.append(message)
        if len(got) == 1:
            message.requeue()
        else:
            message.ack()

    with Consumer(ch, [q], callbacks=[on_message], accept=["json"]):
        conn.drain_events(timeout=TIMEOUT)
        if after_requeue is not None:
            after_requeue()
        while True:
            try:
                conn.drain_events(timeout=QUIET)
            except socket.timeout:
                break
    return got


@pytest.mark.parametrize("prefetch", [1, None], ids=["prefetch1", "unlimited"])
def test_requeue_comes_back_before_newer_same_priority(conn, prefetch):
    q = direct_queue("requeue-q")
    publish(conn, ["r1", "r2", "r3"], queue=q)
    got = consume_requeueing_first(conn, q, prefetch)
    assert payloads(got) == ["r1", "r1", "r2", "r3"]
    assert [m.delivery_info["redelivered"] for m in got] == [False, True, False, False]


def test_requeue_served_after_higher_priority(conn):
    q = direct_queue("requeue-prio-q")
    publish(conn, ["mid"], queue=q, priority=5)

    def more():  # published after the requeue: higher priority, and newer of the same level
        publish(conn, ["high"], queue=q, priority=0)
        publish(conn, ["mid-newer"], queue=q, priority=4)

    got = consume_requeueing_first(conn, q, 1, after_requeue=more)
    assert payloads(got) == ["mid", "high", "mid", "mid-newer"]
    assert [m.delivery_info["redelivered"] for m in got] == [False, False, True, False]


def test_reject_without_requeue_drops(conn, raw):
    q = direct_queue("reject-q")
    publish(conn, ["bad", "good"], queue=q)
    bound = q(conn.default_channel)
    bound.get().reject()
    assert bound.get().payload == "good"
    assert pending_total(raw, "reject-q") == 1
    assert stream_len_total(raw, "reject-q") == 1


@pytest.mark.parametrize("close", ["channel", "connection"])
def test_close_returns_unacked_and_prefetched(url, raw, close):
    q = direct_queue("restore-q")
    bodies = [f"s{i}" for i in range(6)]
    c1 = Connection(url)
    try:
        publish(c1, bodies, queue=q)
        ch = c1.channel()
        got = []
        consumer = Consumer(ch, [q], callbacks=[lambda b, m: got.append(m)], accept=["json"])
        consumer.consume()
        c1.drain_events(timeout=TIMEOUT)
        c1.drain_events(timeout=TIMEOUT)
        assert payloads(got) == ["s0", "s1"]  # delivered, never acked
        # s0 and s1 are unacked; the channel may also hold s2.. read ahead, undelivered
        assert pending_total(raw, "restore-q") >= 2
        if close == "channel":
            ch.close()
        else:
            c1.close()
    finally:
        c1.release()
    with Connection(url) as c2:
        assert q(c2.default_channel).queue_declare(passive=True).message_count == 6
        again = drain(c2, [q], 6)
    assert payloads(again) == bodies
    # s0 and s1 reached the application before: redelivered. Messages that were only read
    # ahead (never handed over) may be flagged either way, so they are not checked.
    assert [m.delivery_info["redelivered"] for m in again[:2]] == [True, True]
    assert pending_total(raw, "restore-q") == 0
    assert stream_len_total(raw, "restore-q") == 0


def test_basic_get_unacked_restored_on_close(url):
    q = direct_queue("get-restore-q")
    with Connection(url) as c1:
        publish(c1, ["only"], queue=q)
        assert q(c1.default_channel).get().payload == "only"
    with Connection(url) as c2:
        m = q(c2.default_channel).get()
        assert m.payload == "only"
        assert m.delivery_info["redelivered"] is True
        m.ack()


def test_visibility_timeout_redelivers_messages_of_a_dead_consumer(url, raw):
    """A worker that took a message and died: it is redelivered after visibility_timeout."""
    q = direct_queue("vt-q")
    with Connection(url, transport_options={"visibility_timeout": 0.5}) as c:
        q(c.default_channel).declare()
        publish(c, ["orphan", "next"], queue=q)
        # the dead worker: read into the group's PEL, then never acked, renewed or requeued
        stream = Keys().stream("vt-q", 0)
        taken = raw.xreadgroup("vt-q", "dead-worker", {stream: ">"}, count=1)
        assert len(taken[0][1]) == 1
        time.sleep(0.6)
        got = drain(c, [q], 2, check_empty=False, timeout=1.5)
    by_body = {m.payload: m for m in got}
    assert sorted(by_body) == ["next", "orphan"]
    assert by_body["orphan"].delivery_info["redelivered"] is True
    assert by_body["next"].delivery_info["redelivered"] is False
    assert pending_total(raw, "vt-q") == 0
    assert stream_len_total(raw, "vt-q") == 0


# ---------------------------------------------------------------------------
# purge, delete, declare
# ---------------------------------------------------------------------------


def test_queue_purge_keeps_in_flight_ackable(conn, raw):
    q = direct_queue("purge-q")
    publish(conn, [f"u{i}" for i in range(6)], queue=q)
    ch = conn.channel()
    ch.basic_qos(0, 3, False)
    got = []
    with Consumer(ch, [q], callbacks=[lambda b, m: got.append(m)], accept=["json"]):
        for _ in range(3):
            conn.drain_events(timeout=TIMEOUT)
        assert payloads(got) == ["u0", "u1", "u2"]
        got[2].requeue()  # a requeued message is ready again, so purge removes it
        purged = q(conn.default_channel).purge()
        assert purged == 4  # u2 (requeued) + u3..u5
        assert q(conn.default_channel).queue_declare(passive=True).message_count == 0
        assert pending_total(raw, "purge-q") == 2
        got[0].ack()
        got[1].ack()
        assert pending_total(raw, "purge-q") == 0
        assert stream_len_total(raw, "purge-q") == 0
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=QUIET)
    publish(conn, ["after"], queue=q)
    assert payloads(drain(conn, [q], 1)) == ["after"]
    assert q(conn.default_channel).purge() == 0


def test_queue_purge_of_idle_queue_counts(conn, raw):
    q = direct_queue("purge-idle-q")
    publish(conn, ["a", "b"], queue=q, priority=0)
    publish(conn, ["c"], queue=q, priority=9)
    assert conn.default_channel.queue_purge("purge-idle-q") == 3
    assert stream_len_total(raw, "purge-idle-q") == 0


@pytest.mark.parametrize("batch", [2, 1000])
def test_queue_purge_in_batches(url, raw, batch):
    q = direct_queue("purge-batch-q")
    with Connection(url, transport_options={"purge_batch": batch}) as c:
        publish(c, [f"b{i}" for i in range(4)], queue=q, priority=0)
        publish(c, [f"c{i}" for i in range(3)], queue=q, priority=6)
        bound = q(c.default_channel)
        first = bound.get()
        assert first.payload == "b0"
        bound.get().requeue()  # b1 is ready again
        assert bound.purge() == 6
        assert stream_len_total(raw, "purge-batch-q") == 1
        first.ack()
        assert stream_len_total(raw, "purge-batch-q") == 0
        assert bound.get() is None


def test_published_before_declare_is_delivered(conn):
    producer = Producer(conn.default_channel, serializer="json")
    producer.publish("early-1", exchange="", routing_key="early-q")
    producer.publish("early-2", exchange="", routing_key="early-q")
    q = direct_queue("early-q")
    assert q(conn.default_channel).queue_declare().message_count == 2
    assert payloads(drain(conn, [q], 2)) == ["early-1", "early-2"]


def test_queue_delete_removes_keys(conn, raw, url):
    q = direct_queue("del-q")
    publish(conn, ["d1", "d2"], queue=q)
    assert q(conn.default_channel).get().payload == "d1"  # one in flight
    assert any("del-q" in k for k in all_keys(raw))
    q(conn.default_channel).delete()
    assert [k for k in all_keys(raw) if "del-q" in k] == []
    with pytest.raises(ChannelError):
        q(conn.default_channel).queue_declare(passive=True)


def test_queue_delete_from_a_fresh_connection(conn, raw, url):
    q = Queue("del2-q", Exchange("del2-x", "direct"), routing_key="del2")
    publish(conn, ["d1", "d2"], queue=q)
    assert q(conn.default_channel).get().payload == "d1"  # one in flight
    with Connection(url) as other:  # never declared or bound the queue
        other.default_channel.queue_delete("del2-q")
    assert [k for k in all_keys(raw) if k.startswith("ks:q:")] == []
    with pytest.raises(ChannelError):
        conn.default_channel.queue_declare("del2-q", passive=True)


def test_passive_declare_of_missing_queue(conn):
    with pytest.raises(ChannelError) as info:
        conn.default_channel.queue_declare("no-such-queue", passive=True)
    assert "NOT_FOUND" in str(info.value)
    with pytest.raises(ChannelError):
        Queue("no-such-queue-2", Exchange("x"), "r")(conn.default_channel).queue_declare(
            passive=True)


def test_message_count_counts_ready_only(conn):
    q = direct_queue("count-q")
    bound = q(conn.default_channel)
    assert bound.queue_declare().message_count == 0
    publish(conn, ["c1", "c2", "c3"], queue=q)
    publish(conn, ["c4"], queue=q, priority=9)
    assert bound.queue_declare().message_count == 4
    m = bound.get()
    assert bound.queue_declare(passive=True).message_count == 3
    m.requeue()
    assert bound.queue_declare(passive=True).message_count == 4
    bound.get().ack()
    assert bound.queue_declare(passive=True).message_count == 3


# ---------------------------------------------------------------------------
# global_keyprefix
# ---------------------------------------------------------------------------


def _cycle(c, prefix_tag):
    """publish / consume / ack / requeue / bind / dead-letter on every exchange type."""
    direct = Queue("kp-direct", Exchange("kp-dx", "direct"), routing_key="kp")
    topic = Queue("kp-topic", Exchange("kp-tx", "topic"), routing_key="kp.#")
    fan = Queue("kp-fan", Exchange("kp-fx", "fanout"))
    for qq in (direct, topic, fan):
        qq(c.default_channel).declare()
    publish(c, [f"{prefix_tag}-d1", f"{prefix_tag}-d2"], queue=direct, priority=5)
    publish(c, [f"{prefix_tag}-t"], exchange=topic.exchange, routing_key="kp.x")
    publish(c, [f"{prefix_tag}-f"], exchange=fan.exchange, routing_key="")
    bound = direct(c.default_channel)
    m = bound.get()
    m.requeue()
    got = payloads(drain(c, [direct], 2))
    assert got == [f"{prefix_tag}-d1", f"{prefix_tag}-d2"]
    assert payloads(drain(c, [topic], 1)) == [f"{prefix_tag}-t"]
    assert payloads(drain(c, [fan], 1)) == [f"{prefix_tag}-f"]
    c.default_channel.queue_purge("kp-direct")


def test_global_keyprefix_every_key(url, raw):
    with Connection(url, transport_options={"global_keyprefix": "app1:"}) as c:
        _cycle(c, "one")
        raw.xadd(Keys("app1:").stream("kp-direct", 0), {"junk": "1"})
        publish(c, ["tail"], queue=Queue("kp-direct", Exchange("kp-dx", "direct"), "kp"))
        assert payloads(drain(c, [Queue("kp-direct", Exchange("kp-dx", "direct"), "kp")],
                               1)) == ["tail"]
        keys = all_keys(raw)
        assert keys, "the cycle must have created keys"
        assert Keys("app1:").dlq("kp-direct") in keys
        assert {Keys("app1:").bindings(x) for x in ("kp-dx", "kp-tx", "kp-fx")} <= set(keys)
        assert [k for k in keys if not k.startswith("app1:")] == []


def test_channel_records_the_key_layout_and_refuses_another(url, raw):
    """The first channel of a process records the key layout under its prefix; a prefix
    whose keys were written with another layout stops the client with a clear error."""
    from uuid import uuid4

    from kombu_streams.broker import LayoutMismatch
    from kombu_streams.keys import LAYOUT

    prefix, other = (f"layout-{uuid4().hex[:8]}:" for _ in range(2))
    with Connection(url, transport_options={"global_keyprefix": prefix}) as c:
        c.channel().close()
    assert raw.get(Keys(prefix).layout()) == str(LAYOUT).encode()
    raw.set(Keys(other).layout(), "4")
    with Connection(url, transport_options={"global_keyprefix": other}) as c:
        with pytest.raises(LayoutMismatch, match="written with key layout '4'"):
            c.channel()
    assert raw.get(Keys(other).layout()) == b"4"


def test_global_keyprefix_isolation(url, raw):
    with Connection(url, transport_options={"global_keyprefix": "app1:"}) as c1, \
            Connection(url, transport_options={"global_keyprefix": "app2:"}) as c2:
        q = direct_queue("shared-name")
        fan = Queue("shared-fan", Exchange("shared-fx", "fanout"))
        for c in (c1, c2):
            q(c.default_channel).declare()
            fan(c.default_channel).declare()
        publish(c1, ["from-1a", "from-1b"], queue=q)
        publish(c2, ["from-2"], queue=q)
        publish(c1, ["fan-1"], exchange=fan.exchange, routing_key="")
        publish(c2, ["fan-2"], exchange=fan.exchange, routing_key="")
        assert payloads(drain(c2, [q], 1)) == ["from-2"]
        assert payloads(drain(c1, [q], 2)) == ["from-1a", "from-1b"]
        assert payloads(drain(c1, [fan], 1)) == ["fan-1"]
        assert payloads(drain(c2, [fan], 1)) == ["fan-2"]
        assert q(c1.default_channel).purge() == 0
    keys = all_keys(raw)
    assert keys and all(k.startswith(("app1:", "app2:")) for k in keys), keys


# ---------------------------------------------------------------------------
# Producer.batch()
# ---------------------------------------------------------------------------


def test_batch_publish_offered_exactly_where_kombu_has_it():
    """Kombu 5.7's Producer.batch() asks the transport (implements.batch_publish) and then
    the channel (create_publish_batch); older Kombu has neither and must not be told it."""
    kombu_has_it = hasattr(Producer, "batch")
    assert Transport.implements.get("batch_publish", False) is kombu_has_it
    assert hasattr(Transport.Channel, "create_publish_batch") is kombu_has_it


@requires_batch_publish
def test_producer_batch(conn):
    ex = Exchange("batch-x", type="direct")
    qa = Queue("batch-a", ex, routing_key="a")
    qb = Queue("batch-b", ex, routing_key="b")
    qa2 = Queue("batch-a2", ex, routing_key="a")
    fan = Queue("batch-fan", Exchange("batch-fx", "fanout"))
    fan2 = Queue("batch-fan2", Exchange("batch-fx", "fanout"))
    for q in (qa, qb, qa2, fan, fan2):
        q(conn.default_channel).declare()
    producer = Producer(conn.default_channel, exchange=ex, serializer="json")
    assert producer.supports_batch_publish
    with producer.batch(max_size=3):
        for i in range(7):
            producer.publish(f"a{i}", routing_key="a")
            producer.publish(f"b{i}", routing_key="b")
        producer.publish("f0", exchange=fan.exchange, routing_key="")
    assert payloads(drain(conn, [qa], 7)) == [f"a{i}" for i in range(7)]
    assert payloads(drain(conn, [qa2], 7)) == [f"a{i}" for i in range(7)]
    assert payloads(drain(conn, [qb], 7)) == [f"b{i}" for i in range(7)]
    assert payloads(drain(conn, [fan], 1)) == ["f0"]
    assert payloads(drain(conn, [fan2], 1)) == ["f0"]


@requires_batch_publish
def test_producer_batch_discarded_on_error(conn):
    q = direct_queue("batch-abort-q")
    q(conn.default_channel).declare()
    producer = Producer(conn.default_channel, serializer="json")
    with pytest.raises(RuntimeError, match="boom"):
        with producer.batch(max_size=100):
            producer.publish("never", exchange=q.exchange, routing_key=q.routing_key)
            raise RuntimeError("boom")
    assert q(conn.default_channel).queue_declare(passive=True).message_count == 0


@requires_batch_publish
def test_producer_batch_after_script_flush(conn, raw):
    q = direct_queue("batch-noscript-q")
    q(conn.default_channel).declare()
    publish(conn, ["warm"], queue=q)  # scripts are loaded now
    raw.script_flush()
    producer = Producer(conn.default_channel, serializer="json")
    with producer.batch(max_size=4):
        for i in range(10):
            producer.publish(f"n{i}", exchange=q.exchange, routing_key=q.routing_key)
    assert payloads(drain(conn, [q], 11)) == ["warm"] + [f"n{i}" for i in range(10)]


# ---------------------------------------------------------------------------
# prefetch
# ---------------------------------------------------------------------------


def test_acks_of_drain_callbacks_ride_with_the_next_read(conn, raw):
    """An ack made in a drain_events callback is sent with the next read (one round trip),
    before any blocking wait, and at cancel; an ack made outside drain_events at once."""
    q = direct_queue("ack-ride-q")
    publish(conn, [f"r{i}" for i in range(4)], queue=q)
    ch = conn.channel()
    ch.basic_qos(0, 1, False)
    got = []

    def on_message(body, message):
        got.append(message)
        if body != "r3":
            message.ack()

    consumer = Consumer(ch, [q], callbacks=[on_message], accept=["json"])
    consumer.consume()
    conn.drain_events(timeout=TIMEOUT)
    assert pending_total(raw, "ack-ride-q") == 1  # acked, not sent yet
    conn.drain_events(timeout=TIMEOUT)
    assert pending_total(raw, "ack-ride-q") == 1  # r0's ack went with the read of r1
    assert stream_len_total(raw, "ack-ride-q") == 3
    conn.drain_events(timeout=TIMEOUT)
    conn.drain_events(timeout=TIMEOUT)  # r3, not acked by the callback
    assert pending_total(raw, "ack-ride-q") == 1
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=QUIET)  # nothing to read: acks are sent before the wait
    assert stream_len_total(raw, "ack-ride-q") == 1
    got[3].ack()  # outside drain_events: sent at once
    assert pending_total(raw, "ack-ride-q") == 0
    assert stream_len_total(raw, "ack-ride-q") == 0
    publish(conn, ["r4"], queue=q)
    conn.drain_events(timeout=TIMEOUT)
    assert pending_total(raw, "ack-ride-q") == 1
    consumer.cancel()  # no read will follow: the ack goes now
    assert pending_total(raw, "ack-ride-q") == 0
    assert payloads(got) == [f"r{i}" for i in range(5)]
    ch.close()


@pytest.mark.parametrize("how", ["close", "lease round"])
def test_deferred_acks_are_sent_at_close_and_by_the_lease_keeper(url, raw, how):
    q = direct_queue("ack-close-q")
    with Connection(url) as c:
        publish(c, ["a", "b"], queue=q)
        ch = c.channel()
        consumer = Consumer(ch, [q], callbacks=[lambda b, m: m.ack()], accept=["json"])
        consumer.consume()
        c.drain_events(timeout=TIMEOUT)
        c.drain_events(timeout=TIMEOUT)
        assert stream_len_total(raw, "ack-close-q") >= 1
        if how == "close":
            ch.close()
        else:
            c.transport.leases.run_once()
        assert pending_total(raw, "ack-close-q") == 0
        assert stream_len_total(raw, "ack-close-q") == 0


@pytest.mark.parametrize("inside", [True, False], ids=["acks-inside-the-read", "ack-calls"])
def test_deferred_acks_survive_a_failed_read(conn, raw, monkeypatch, inside):
    """A read that fails puts the acks it carried back: they are delayed, never dropped;
    whether they rode inside the read call (acks of a queue it reads) or as ack calls in
    its pipeline."""
    from kombu_streams import consume as channel_module  # _send_read
    from kombu_streams.scripts import SCRIPTS

    q = direct_queue("ack-fail-q")
    publish(conn, ["a", "b"], queue=q)
    ch = conn.channel()
    ch.basic_qos(0, 1, False)
    if not inside:
        monkeypatch.setattr(ch.broker, "ack_merges", lambda sources: set())
    consumer = Consumer(ch, [q], callbacks=[lambda b, m: m.ack()], accept=["json"])
    consumer.consume()
    conn.drain_events(timeout=TIMEOUT)

    def broken(*args, **kwargs):
        raise redis.ConnectionError("gone")

    with monkeypatch.context() as patch:
        if inside:
            patch.setitem(SCRIPTS, "read", broken)
        else:
            patch.setattr(channel_module, "run_calls", broken)
        with pytest.raises(redis.ConnectionError):
            conn.drain_events(timeout=TIMEOUT)
    assert pending_total(raw, "ack-fail-q") == 1
    conn.drain_events(timeout=TIMEOUT)  # the read carries the ack again
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=QUIET)
    assert pending_total(raw, "ack-fail-q") == 0
    assert stream_len_total(raw, "ack-fail-q") == 0
    ch.close()

def test_a_read_whose_piggybacked_ack_fails_still_hands_out_what_it_read(conn, raw):
    """Acks that cannot ride inside the read (here: made so) go as calls in the read's
    pipeline; when the ack's call fails, the
    messages the read took are handed out next (not stranded in the PEL until
    visibility_timeout) and the ack is sent again with a later read."""
    from kombu_streams.scripts import SCRIPTS

    q = direct_queue("ack-err-q")
    publish(conn, ["a", "b", "c"], queue=q)
    ch = conn.channel()
    ch.basic_qos(0, 1, False)
    got = []

    def on(body, message):
        got.append(body)
        message.ack()

    ch.broker.ack_merges = lambda sources: set()  # acks as calls of their own
    consumer = Consumer(ch, [q], callbacks=[on], accept=["json"])
    consumer.consume()
    conn.drain_events(timeout=TIMEOUT)
    assert got == ["a"]
    real = ch.broker.ack_call
    broken_once = []

    def failing(queue, entries, exchange=None, consumer="", big=False, unique=None):
        if broken_once:
            return real(queue, entries, exchange, consumer, big, unique)
        broken_once.append(1)
        stream = list(entries)[0][0]
        return SCRIPTS["ack"], [stream], [queue, consumer, "not-a-number", "0-1"]  # an error

    ch.broker.ack_call = failing
    with pytest.raises(redis.ResponseError):
        conn.drain_events(timeout=TIMEOUT)  # the read of "b" ran; its ack call failed
    conn.drain_events(timeout=TIMEOUT)  # "b" comes from the buffer, at once
    conn.drain_events(timeout=TIMEOUT)
    assert got == ["a", "b", "c"]
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=QUIET)  # sends the last acks before waiting
    assert pending_total(raw, "ack-err-q") == 0
    assert stream_len_total(raw, "ack-err-q") == 0
    ch.close()


def test_acks_a_closing_channel_could_not_send_are_sent_by_the_lease_keeper(
        conn, raw, monkeypatch):
    """Deferred acks whose flush fails at close are kept, and the lease keeper's next round
    sends them: an ack the application made is delayed, never dropped."""
    from kombu_streams import settle as channel_module  # _send_acks

    q = direct_queue("close-ack-q")
    publish(conn, ["a", "b"], queue=q)
    ch = conn.channel()
    consumer = Consumer(ch, [q], callbacks=[lambda b, m: m.ack()], accept=["json"])
    consumer.consume()
    conn.drain_events(timeout=TIMEOUT)
    conn.drain_events(timeout=TIMEOUT)
    assert ch.consumer_state.has_acks()  # the last ack waits for the next read or wait
    real = channel_module.run_calls

    def down(client, calls, **kwargs):
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(channel_module, "run_calls", down)
    ch.close()
    monkeypatch.setattr(channel_module, "run_calls", real)
    assert pending_total(raw, "close-ack-q") >= 1
    conn.transport.leases.run_once()
    assert pending_total(raw, "close-ack-q") == 0
    assert stream_len_total(raw, "close-ack-q") == 0


def test_message_the_ready_index_misses_is_found_by_the_periodic_walk(conn, raw,
                                                                      monkeypatch):
    """A message that its queue's ready index does not name (written by an older version,
    or by hand) is still delivered: a read walks every stream once per WALK_INTERVAL."""
    q = direct_queue("walk-q")
    ch = conn.channel()
    publish(conn, ["a"], queue=q)
    assert payloads(drain(conn, [q], 1, channel=ch)) == ["a"]  # the channel's first read walks
    assert raw.smembers(Keys().ready("walk-q")) == {b""}  # complete, nothing ready
    publish(conn, ["b"], queue=q, priority=9)
    raw.srem(Keys().ready("walk-q"), Keys().stream("walk-q", 9))  # as an old publisher would
    waits = spy_waits(conn, monkeypatch)
    reads = spy_reads(monkeypatch)
    assert payloads(drain(conn, [q], 1, channel=ch, timeout=3 * TIMEOUT,
                          check_empty=False)) == ["b"]
    found = next(modes for modes, delivered in reads if delivered)
    assert found[("walk-q", None)] == WALK, (reads, waits)  # the walk found it
    # walks come every SWEEP_INTERVAL, and no wait is longer: one wait at most came first
    assert SWEEP_INTERVAL >= conn.transport.wait_interval
    assert len(waits) <= 1, waits
    ch.close()


def test_prefetch_limit(conn, raw):
    q = direct_queue("prefetch-q")
    publish(conn, [f"f{i}" for i in range(8)], queue=q)
    ch = conn.channel()
    ch.basic_qos(0, 3, False)
    got = []
    with Consumer(ch, [q], callbacks=[lambda b, m: got.append(m)], accept=["json"]):
        for _ in range(3):
            conn.drain_events(timeout=TIMEOUT)
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=QUIET)
        assert payloads(got) == ["f0", "f1", "f2"]
        assert pending_total(raw, "prefetch-q") == 3  # nothing more taken from Redis
        got[0].ack()
        conn.drain_events(timeout=TIMEOUT)
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=QUIET)
        assert payloads(got) == ["f0", "f1", "f2", "f3"]
        assert pending_total(raw, "prefetch-q") == 3
        for m in got[1:]:
            m.ack()
        while len(got) < 8:
            before = len(got)
            conn.drain_events(timeout=TIMEOUT)
            assert len(got) == before + 1
            unacked = [m for m in got if not m.acknowledged]
            assert len(unacked) <= 3
            assert pending_total(raw, "prefetch-q") <= 3
            got[-1].ack()
    assert payloads(got) == [f"f{i}" for i in range(8)]
    assert pending_total(raw, "prefetch-q") == 0


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_bad_entries_go_to_dead_letter_stream(conn, raw):
    q = direct_queue("dlq-q")
    q(conn.default_channel).declare()
    stream = Keys().stream("dlq-q", 0)
    publish(conn, ["good1"], queue=q)
    no_m = raw.xadd(stream, {"x": "no m here"})
    publish(conn, ["good2"], queue=q)
    bad_json = raw.xadd(stream, {"m": "{not json"})
    publish(conn, ["good3"], queue=q)
    not_envelope = raw.xadd(stream, {"m": "[1, 2, 3]"})
    publish(conn, ["good4"], queue=q)
    assert payloads(drain(conn, [q], 4)) == ["good1", "good2", "good3", "good4"]
    dead = raw.xrange(Keys().dlq("dlq-q"))
    assert len(dead) == 3
    by_id = {fields[b"id"]: fields for _, fields in dead}
    assert set(by_id) == {no_m, bad_json, not_envelope}
    assert by_id[no_m][b"f:x"] == b"no m here"
    assert by_id[bad_json][b"f:m"] == b"{not json"
    assert by_id[not_envelope][b"f:m"] == b"[1, 2, 3]"
    assert all(f[b"stream"] == stream.encode() for f in by_id.values())
    assert raw.xlen(stream) == 0
    assert pending_total(raw, "dlq-q") == 0
    # the dead letters survive a queue delete
    q(conn.default_channel).delete()
    assert raw.xlen(Keys().dlq("dlq-q")) == 3


@pytest.mark.parametrize("which", ["stream", "wake"])
def test_wrong_type_key_in_scripts(conn, raw, which):
    q = direct_queue("wrongtype-q")
    key = Keys().stream("wrongtype-q", 0) if which == "stream" else Keys().wake("wrongtype-q")
    raw.set(key, "not ours")
    with pytest.raises(KeyTypeError) as info:
        q(conn.default_channel).declare()
        publish(conn, ["x"], queue=q)
    assert key in str(info.value)
    assert raw.get(key) == b"not ours"


def test_wrong_type_key_on_consume_affects_only_that_queue(url, raw, caplog, monkeypatch):
    """Another program's key at one of a queue's names: that queue's reads are suspended and
    the problem logged (naming the key); the healthy queue read by the same channel goes on,
    and nothing the read took is stranded. Once the key is gone the queue flows again."""
    monkeypatch.setattr("kombu_streams.plan.SUSPEND", 0.3)
    bad, good = direct_queue("wrongtype-c"), direct_queue("wrongtype-ok")
    got = []
    with Connection(url) as c:
        publish(c, ["first"], queue=bad)  # level 0: read before the broken level 6
        key = Keys().stream("wrongtype-c", 6)
        with Consumer(c.default_channel, [bad, good],
                      callbacks=[lambda b, m: (got.append(b), m.ack())]):
            raw.delete(key)
            raw.set(key, "not ours")
            publish(c, ["ok-1", "ok-2"], queue=good)
            for _ in range(3):
                c.drain_events(timeout=TIMEOUT)
            assert sorted(got) == ["first", "ok-1", "ok-2"]
            assert any(key in r.getMessage() and "WRONGTYPE" in r.getMessage()
                       for r in caplog.records), caplog.text
            raw.delete(key)
            publish(c, ["after"], queue=bad, priority=6)
            c.drain_events(timeout=TIMEOUT)
        assert got[-1] == "after"
    assert pending_total(raw, "wrongtype-c") == 0
    assert pending_total(raw, "wrongtype-ok") == 0


def test_wrong_type_bindings_key(conn, raw):
    ex = Exchange("wrongtype-x", type="direct")
    key = Keys().bindings("wrongtype-x")
    raw.set(key, "not ours")
    with pytest.raises(KeyTypeError) as info:
        Queue("wrongtype-b", ex, routing_key="r")(conn.default_channel).declare()
    assert key in str(info.value)


# ---------------------------------------------------------------------------
# options and server check
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["ack_emulation", "unacked_key", "fanout_prefix"])
def test_removed_options_warn(url, option):
    with pytest.warns(UserWarning, match=option):
        c = Connection(url, transport_options={option: "x"})
        c.transport  # noqa: B018  (creates the transport)
    c.release()


def test_no_warning_for_supported_options(url):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Connection(url, transport_options={"visibility_timeout": 10,
                                                "priority_steps": [0, 9]}) as c:
            c.default_channel  # noqa: B018


@pytest.mark.parametrize("steps", [[3, 0], [1, 2], [0, 3, 3], [0, 10], [], "0,3"])
def test_invalid_priority_steps(url, steps):
    with Connection(url, transport_options={"priority_steps": steps}) as c:
        with pytest.raises(ValueError, match="priority_steps"):
            c.default_channel  # noqa: B018


@pytest.mark.parametrize("vt", [0, -1, "soon"])
def test_invalid_visibility_timeout(url, vt):
    with Connection(url, transport_options={"visibility_timeout": vt}) as c:
        with pytest.raises(ValueError, match="visibility_timeout"):
            c.default_channel  # noqa: B018


class _StubPool:
    connection_kwargs = {"host": "old-redis.example"}


class _StubClient:
    connection_pool = _StubPool()

    def __init__(self, version):
        self.version = version

    def info(self, *args, **kwargs):
        return {"redis_version": self.version}

    def config_get(self, *args, **kwargs):
        return {"maxmemory-policy": "noeviction"}


def test_check_server_refuses_old_version():
    with pytest.raises(UnsupportedServer) as info:
        check_server(_StubClient("6.0.16"))
    assert "6.0.16" in str(info.value)
    assert "6.2" in str(info.value)


@pytest.mark.parametrize("version,expected", [("6.2.0", (6, 2, 0)), ("7.2.4", (7, 2, 4))])
def test_check_server_accepts(version, expected):
    assert check_server(_StubClient(version)) == expected


# ---------------------------------------------------------------------------
# NOSCRIPT
# ---------------------------------------------------------------------------


def test_script_flush_between_publish_and_consume(conn, raw):
    q = direct_queue("noscript-q")
    publish(conn, ["before-1", "before-2"], queue=q)
    raw.script_flush()
    ch = conn.channel()
    got = []
    with Consumer(ch, [q], callbacks=[lambda b, m: got.append(m)], accept=["json"]):
        conn.drain_events(timeout=TIMEOUT)
        raw.script_flush()
        got[0].ack()
        raw.script_flush()
        conn.drain_events(timeout=TIMEOUT)
        raw.script_flush()
        got[1].requeue()
        raw.script_flush()
        publish(conn, ["after"], queue=q)
        conn.drain_events(timeout=TIMEOUT)
        got[2].ack()
        conn.drain_events(timeout=TIMEOUT)
        got[3].ack()
    assert payloads(got) == ["before-1", "before-2", "before-2", "after"]
    assert pending_total(raw, "noscript-q") == 0
    assert stream_len_total(raw, "noscript-q") == 0
    raw.script_flush()
    assert q(conn.default_channel).queue_declare(passive=True).message_count == 0


def test_acks_ride_inside_the_read_at_prefetch_1(conn, raw):
    """At prefetch 1 each consumed and acked message costs one script call: the ack made in
    the callback rides inside the next read (no ack call of its own)."""
    q = direct_queue("ack-inside-q")
    publish(conn, [f"m{i}" for i in range(20)], queue=q)
    raw.config_resetstat()
    got = drain(conn, [q], 20, prefetch=1)
    assert len(got) == 20
    stats = raw.info("commandstats")
    # 20 reads, plus the last flush before the QUIET wait and the first script loads;
    # with ack calls of their own it would be 40 or more
    assert stats["cmdstat_evalsha"]["calls"] < 30, stats["cmdstat_evalsha"]
    assert pending_total(raw, "ack-inside-q") == 0
    assert stream_len_total(raw, "ack-inside-q") == 0
