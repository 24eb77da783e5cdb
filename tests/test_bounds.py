"""Bounded work and hostile input, through Kombu's API on real servers (7.0 and 6.2).

Each test here failed on the code before issue #11: options that were not checked, a blocking
wait longer than redis-py's socket timeout, envelopes that crashed the consumer, a marker of
another type that stopped every queue, exchange keys that could collide, oversized messages
sent until the connection broke, buffered messages handed out after their lease was lost,
acks that waited for the buffer to empty, renewal and reclaim in one unbounded call, and
idle reads that cost O(queues). Figures (durations) are the benchmark's job
(scripts/scale); these tests check behaviour and command counts, never time.
"""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest
import redis
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kombu import Connection, Consumer, Exchange, Producer, Queue

import kombu_streams  # noqa: F401  (registers the schemes)
from kombu_streams.channel import MessageTooLarge
from kombu_streams.connection import socket_timeout
from kombu_streams.keys import Keys

TIMEOUT = 2.0


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
    finally:
        client.close()
    return srv


@pytest.fixture
def url(server):
    return "redis-streams://" + server.url[len("redis://"):]


@pytest.fixture
def raw(server):
    client = redis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        client.close()


def direct_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def publish(conn, queue: Queue, bodies, **kw) -> None:
    producer = Producer(conn.default_channel, serializer="json")
    for body in bodies:
        producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                         declare=[queue], **kw)


def pending(raw, queue: str) -> int:
    total = 0
    for key in Keys().streams(queue, [0, 3, 6, 9]):
        if raw.exists(key):
            total += raw.xpending(key, queue)["pending"]
    return total


def dead_letters(raw, queue: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in raw.xrange(Keys().dlq(queue))]


def commands(raw) -> int:
    """Commands Redis ran so far, scripts' own commands included."""
    return sum(v["calls"] for k, v in raw.info("commandstats").items())


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------

BAD_OPTIONS = [
    ("max_read_batch", 0), ("max_read_batch", -1), ("max_read_batch", "abc"),
    ("reclaim_batch", 0), ("reclaim_batch", -1), ("reclaim_batch", "x"),
    ("purge_batch", 0), ("purge_batch", "abc"), ("max_deliveries", True),
    ("max_deliveries", -1), ("routing_cache_ttl", "x"), ("routing_cache_ttl", -1),
    ("dead_letter_rejected", "no"), ("dead_letter_rejected", 0), ("polling_interval", 0),
    ("polling_interval", "1"), ("visibility_timeout", float("inf")),
    ("max_message_size", 0), ("publish_min_replicas", 1.5), ("socket_timeout", -2),
    ("sep", ""), ("body_encoding", "rot13"), ("cluster", "yes"), ("max_read_bytes", 0),
    ("max_read_bytes", 2.5), ("max_read_bytes", "1MB"), ("max_read_bytes", None),
]


@pytest.mark.parametrize("option,value", BAD_OPTIONS)
def test_invalid_options_fail_at_channel_creation_naming_them(url, option, value):
    with Connection(url, transport_options={option: value}) as c:
        with pytest.raises(ValueError) as info:
            c.default_channel  # noqa: B018
    assert option in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("option,value", [
    ("max_read_batch", 1), ("reclaim_batch", 5000), ("purge_batch", 1),
    ("max_deliveries", 0), ("routing_cache_ttl", 0), ("dead_letter_rejected", True),
    ("polling_interval", 0.25), ("visibility_timeout", 1), ("max_message_size", None),
    ("max_message_size", 1024),
    ("body_encoding", None), ("max_read_bytes", 1), ("max_read_bytes", 64 << 20),
])
def test_valid_options_are_taken(url, option, value):
    """Taken as given: the channel (the transport, for polling_interval) holds the value."""
    with Connection(url, transport_options={option: value}) as c:
        channel = c.default_channel
        if option == "polling_interval":
            assert c.transport.wait_interval == value
        else:
            assert getattr(channel, option) == value
            assert type(getattr(channel, option)) is type(value)


def test_blocking_waits_stay_below_the_socket_timeout_in_force(url):
    """redis-py 6+ gives connections a 5 s socket timeout of its own: a polling_interval
    beyond it must be capped, or an idle drain_events fails with redis' TimeoutError."""
    with Connection(url, transport_options={"polling_interval": 30}) as c:
        c.default_channel  # noqa: B018
        timeout = socket_timeout(c.transport.pool)
        if timeout:
            assert c.transport.wait_interval < timeout
        else:  # redis-py 4/5: no timeout, the interval as asked
            assert c.transport.wait_interval == 30


# ---------------------------------------------------------------------------
# envelopes a consumer cannot take
# ---------------------------------------------------------------------------

def _b64(obj) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


POISON = {
    "headers-not-an-object": {"properties": {}, "headers": [1]},
    "bad-base64": {"body": "!!!x", "properties": {"body_encoding": "base64"}, "headers": {},
                   "content-type": "application/json", "content-encoding": "utf-8"},
    "body-not-a-string": {"body": 5, "properties": {}, "headers": {}},
    "unknown-encoding": {"body": "abc", "properties": {"body_encoding": "rot13"}},
    "properties-not-an-object": {"properties": [], "body": "x"},
    "not-an-object": [1, 2],
    "not-json": "{",
}


@pytest.mark.parametrize("shape", sorted(POISON))
def test_envelope_kombu_cannot_take_is_dead_lettered_at_first_sight(url, raw, shape, caplog):
    q = direct_queue("poison-kombu")
    got = []
    with Connection(url) as c:
        publish(c, q, ["before"])
        value = POISON[shape]
        raw.xadd(Keys().stream("poison-kombu", 0),
                 {"m": value if isinstance(value, str) else json.dumps(value)})
        publish(c, q, ["after"])
        with Consumer(c.default_channel, [q], accept=["json"],
                      callbacks=[lambda body, m: (got.append(body), m.ack())]):
            c.drain_events(timeout=TIMEOUT)
            c.drain_events(timeout=TIMEOUT)
            with pytest.raises(socket.timeout):
                c.drain_events(timeout=0.2)
    assert got == ["before", "after"]
    letters = dead_letters(raw, "poison-kombu")
    assert len(letters) == 1
    assert letters[0][b"reason"].startswith(b"not a message a consumer can take")
    assert pending(raw, "poison-kombu") == 0
    assert sum("dead-letter stream" in r.getMessage() for r in caplog.records) == 1


def test_entry_without_a_message_field_is_logged_once(url, raw, caplog):
    q = direct_queue("poison-nom")
    with Connection(url) as c:
        publish(c, q, ["before"])
        raw.xadd(Keys().stream("poison-nom", 0), {"x": "y"})
        got = []
        with Consumer(c.default_channel, [q], accept=["json"],
                      callbacks=[lambda body, m: (got.append(body), m.ack())]):
            c.drain_events(timeout=TIMEOUT)
            with pytest.raises(socket.timeout):
                c.drain_events(timeout=0.2)
    assert got == ["before"]
    assert [f[b"reason"] for f in dead_letters(raw, "poison-nom")] == [b"malformed: no m field"]
    assert sum("malformed: no m field" in r.getMessage() for r in caplog.records) == 1


def test_callback_error_in_drain_events_reaches_the_caller_and_keeps_the_message(url, raw):
    """drain_events: the callback's error reaches the caller, the message stays unacked (as
    with Kombu's Redis transport: the application decides), and the next one flows."""
    q = direct_queue("poison-cb")
    with Connection(url) as c:
        publish(c, q, ["boom", "fine"])
        got = []

        def on_message(body, message):
            if body == "boom":
                raise KeyError("id")
            got.append(body)
            message.ack()

        with Consumer(c.default_channel, [q], accept=["json"], callbacks=[on_message]):
            with pytest.raises(KeyError):
                c.drain_events(timeout=TIMEOUT)
            c.drain_events(timeout=TIMEOUT)
            deadline = time.monotonic() + 5  # the ack of "fine" goes within ACK_DELAY
            while pending(raw, "poison-cb") > 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pending(raw, "poison-cb") == 1
    assert got == ["fine"]
    assert dead_letters(raw, "poison-cb") == []


@pytest.mark.parametrize("prefetch", [1, 5])
def test_callback_error_on_the_event_loop_dead_letters_and_the_loop_lives(url, raw, prefetch):
    """On Kombu's Hub (Celery's worker) an error escaping the callback would end the loop
    ("Unrecoverable error") and come back with the message: the message goes to the
    dead-letter stream with the error, and the messages behind it are consumed. The poison is
    message 120: past the first wake-up's 100 (poller.ASYNC_BATCH), so it is handed out by
    the loop's busy path (a read that filled its credit reads again on the next tick)."""
    from kombu.asynchronous import Hub

    q = direct_queue("poison-hub")
    hub = Hub()
    got = []

    def on_message(body, message):
        if body == 120:
            raise ValueError("not enough values to unpack")
        got.append(body)
        message.ack()

    with Connection(url) as c:
        publish(c, q, list(range(150)))
        c.connect()
        ch = c.channel()
        ch.basic_qos(0, prefetch, False)
        with Consumer(ch, [q], callbacks=[on_message], accept=["json"]):
            c.transport.register_with_event_loop(c.connection, hub)
            deadline = time.monotonic() + 10
            while len(got) < 149 and time.monotonic() < deadline:
                hub.run_once()
        hub.close()
    assert sorted(got) == [n for n in range(150) if n != 120]
    letters = dead_letters(raw, "poison-hub")
    assert [f[b"reason"] for f in letters] == [
        b"consumer callback raised ValueError('not enough values to unpack')"]
    assert pending(raw, "poison-hub") == 0


def test_compressed_and_bytes_bodies_are_not_taken_for_poison(url, raw):
    """Celery's task_compression keeps content-type application/json over a gzip body; a
    body of bytes is fine for Kombu too: neither is set aside."""
    q = direct_queue("not-poison")
    task = {"task": "app.t", "id": "t1", "compression": "application/x-gzip"}
    with Connection(url) as c:
        Producer(c.default_channel, serializer="json").publish(
            [[1], {}, {}], exchange=q.exchange, routing_key=q.routing_key, declare=[q],
            headers=task, compression="gzip")
        got = []
        with Consumer(c.default_channel, [q], accept=["json"],
                      callbacks=[lambda body, m: (got.append(body), m.ack())]):
            c.drain_events(timeout=TIMEOUT)
    assert got == [[[1], {}, {}]]
    assert dead_letters(raw, "not-poison") == []


def test_cancel_gives_back_a_popped_marker_it_will_not_read(url, raw):
    """A consumer cancelled between popping a queue's marker and reading it gives the
    wake-up back, so another consumer of the queue is woken."""
    q = direct_queue("cancel-wake")
    with Connection(url) as c:
        ch = c.channel()
        consumer = Consumer(ch, [q], accept=["json"])
        consumer.consume()
        publish(c, q, ["x"])
        key = Keys().wake("cancel-wake")
        assert raw.zpopmin(key)  # what the poller's BZPOPMIN does
        assert ch.woke(key)
        consumer.cancel()
        assert raw.zrange(key, 0, -1) == [b"w"]


# ---------------------------------------------------------------------------
# wrong types
# ---------------------------------------------------------------------------


def test_marker_of_another_type_stops_only_its_queue(url, raw, caplog, monkeypatch):
    """A wait on a marker that holds another type fails for every key of the BZPOPMIN: the
    channel finds the broken one and leaves its queue out, so the others keep flowing."""
    monkeypatch.setattr("kombu_streams.plan.SUSPEND", 0.5)
    bad, good = direct_queue("wt-marker"), direct_queue("wt-ok")
    got = []
    with Connection(url) as c:
        with Consumer(c.default_channel, [bad, good], accept=["json"],
                      callbacks=[lambda body, m: (got.append(body), m.ack())]):
            raw.set(Keys().wake("wt-marker"), "not ours")
            with pytest.raises(socket.timeout):
                c.drain_events(timeout=0.5)  # waits, meets the wrong type, goes on
            publish(c, good, ["ok"])
            c.drain_events(timeout=TIMEOUT)
            assert got == ["ok"]
            raw.delete(Keys().wake("wt-marker"))
            publish(c, bad, ["back"])
            c.drain_events(timeout=TIMEOUT)
    assert got == ["ok", "back"]
    assert any("wt-marker" in r.getMessage() and "WRONGTYPE" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------
# key names
# ---------------------------------------------------------------------------


def test_the_issue_s_collision_cannot_happen():
    k = Keys()
    assert k.fanout("e}:wake:q") != k.fanout_wake("e", "q}:fanout")
    assert k.fanout_wake("e", "plain.queue") == "ks:x:{e}:wake:plain.queue"  # unchanged


NAMES = st.lists(st.sampled_from(["a", "}:", "wake:", "fanout", "dlq:", "}", "%", "%7D"]),
                 min_size=1, max_size=4).map("".join)


def _every_key(k: Keys, exchange: str, queue: str) -> dict[tuple, str]:
    """What each key of (exchange, queue) is -> its name."""
    out = {("q", kind, queue): f(queue) for kind, f in
           (("wake", k.wake), ("ready", k.ready), ("dlq", k.dlq))}
    out.update({("q", f"level{lv}", queue): k.stream(queue, lv) for lv in (0, 3)})
    for kind, f in (("bindings", k.bindings), ("deadlines", k.deadlines), ("fanout", k.fanout)):
        out[("x", kind, exchange)] = f(exchange)
    out[("x", "wake", exchange, queue)] = k.fanout_wake(exchange, queue)
    if k.cluster:  # elsewhere it is the queue's own dead-letter stream, on purpose
        out[("x", "dlq", exchange, queue)] = k.fanout_dlq(exchange, queue)
    return out


@settings(max_examples=1000, deadline=None)
@given(a=st.tuples(NAMES, NAMES), b=st.tuples(NAMES, NAMES))
@example(a=("e}:wake:q", "x"), b=("e", "q}:fanout"))  # the issue's pair
@example(a=("e", "q%7D"), b=("e", "q}"))  # escaping must not make names meet
def test_no_two_names_make_the_same_key(a, b):
    """Every key of every (exchange, queue) pair is unique: the last '}' ends the tagged
    name, and what follows tells the kind of key."""
    for cluster in (False, True):
        if cluster and any(n.startswith("}") for n in (*a, *b)):
            continue  # refused on Cluster (an empty hash tag)
        seen: dict[str, tuple] = {}
        for pair in (a, b):
            for what, key in _every_key(Keys(cluster=cluster), *pair).items():
                assert seen.setdefault(key, what) == what, (key, seen[key], what)


# ---------------------------------------------------------------------------
# oversized messages
# ---------------------------------------------------------------------------


def test_message_over_max_message_size_is_refused_before_sending(url, raw):
    q = direct_queue("big")
    with Connection(url, transport_options={"max_message_size": 10_000}) as c:
        publish(c, q, ["x" * 5000])
        before = commands(raw)
        with pytest.raises(MessageTooLarge, match="max_message_size"):
            publish(c, q, ["x" * 20_000])
        assert commands(raw) - before < 5  # nothing sent but the declare
    assert raw.xlen(Keys().stream("big", 0)) == 1


def test_message_over_the_servers_bulk_limit_is_refused(url, raw):
    raw.config_set("proto-max-bulk-len", 1024 * 1024)
    try:
        q = direct_queue("big-server")
        with Connection(url) as c:
            with pytest.raises(MessageTooLarge, match="proto-max-bulk-len"):
                publish(c, q, ["x" * (2 * 1024 * 1024)])
            c.default_channel.client.ping()  # the connection is still fine
    finally:
        raw.config_set("proto-max-bulk-len", 512 * 1024 * 1024)


# ---------------------------------------------------------------------------
# leases and acks
# ---------------------------------------------------------------------------


def test_buffered_message_whose_lease_was_lost_is_not_handed_out(url, raw, caplog):
    """Consumer A read 5 ahead, then stalled past the lease (its keeper starved, as under
    SIGSTOP); B got them back. When A runs again it hands out none of them."""
    q = direct_queue("lost-lease")
    options = {"visibility_timeout": 1}
    with Connection(url, transport_options=options) as a, \
            Connection(url, transport_options=options) as b:
        publish(a, q, list(range(5)))
        got_a, got_b = [], []
        ch_a = a.channel()
        ch_a.basic_qos(0, 5, False)
        with Consumer(ch_a, [q], accept=["json"], callbacks=[lambda body, m: got_a.append(m)]):
            a.drain_events(timeout=TIMEOUT)  # 0 handed out, 1..4 in the buffer
            a.transport.leases.stop()  # A stalls: no renewal from now on
            assert ch_a.consumer_state.buffered() == 4
            time.sleep(1.2)
            ch_b = b.channel()
            with Consumer(ch_b, [q], accept=["json"],
                          callbacks=[lambda body, m: (got_b.append(body), m.ack())]):
                assert ch_b.leases.reclaim() == 5
                for _ in range(5):
                    b.drain_events(timeout=TIMEOUT)
            with pytest.raises(socket.timeout):
                a.drain_events(timeout=0.3)
        assert [m.payload for m in got_a] == [0]
        assert sorted(got_b) == [0, 1, 2, 3, 4]
    assert sum("dropped message" in r.getMessage() for r in caplog.records) == 4


def test_deferred_acks_are_sent_within_ack_delay_while_the_buffer_lasts(url, raw):
    """Acks made in drain_events callbacks wait for the next read, which a long read-ahead
    buffer puts off: they must reach Redis within ACK_DELAY anyway (the keeper sends them)."""
    q = direct_queue("late-acks")
    with Connection(url) as c:
        publish(c, q, list(range(10)))
        ch = c.channel()
        ch.basic_qos(0, 10, False)
        with Consumer(ch, [q], accept=["json"], callbacks=[lambda body, m: m.ack()]):
            c.drain_events(timeout=TIMEOUT)
            c.drain_events(timeout=TIMEOUT)  # two acked, 8 still buffered
            assert ch.consumer_state.buffered() == 8
            deadline = time.monotonic() + 5
            while pending(raw, "late-acks") > 8 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pending(raw, "late-acks") == 8
            assert ch.consumer_state.buffered() == 8  # nothing else read meanwhile


def test_lease_rounds_run_while_acks_keep_coming(url, raw):
    """Acks wake the keeper thread every ACK_DELAY; its rounds must still run: a held message
    keeps its lease (PEL idle time stays below the lease) while others are acked steadily."""
    q, busy = direct_queue("keep-held"), direct_queue("keep-busy")
    with Connection(url, transport_options={"visibility_timeout": 1.5}) as c:
        publish(c, q, ["held"])
        publish(c, busy, list(range(200)))
        held = []
        ch = c.channel()
        with Consumer(ch, [q], accept=["json"], callbacks=[lambda b, m: held.append(m)]):
            c.drain_events(timeout=TIMEOUT)
            with Consumer(ch, [busy], accept=["json"], callbacks=[lambda b, m: m.ack()]):
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    c.drain_events(timeout=TIMEOUT)
                    time.sleep(0.02)
            idle = raw.xpending_range(Keys().stream("keep-held", 0), "keep-held", "-", "+",
                                      1)[0]["time_since_delivered"]
            assert idle < 1500, idle
            held[0].ack()


def test_renewal_of_thousands_goes_in_chunks(url, raw):
    q = direct_queue("renew-many")
    n = 2500
    with Connection(url, transport_options={"visibility_timeout": 60}) as c:
        producer = Producer(c.default_channel, serializer="json")
        q(c.default_channel).declare()
        for i in range(n):
            producer.publish(i, exchange=q.exchange, routing_key=q.routing_key)
        ch = c.channel()
        got = []
        with Consumer(ch, [q], accept=["json"], callbacks=[lambda body, m: got.append(m)]):
            while len(got) < n:
                c.drain_events(timeout=TIMEOUT)
            assert ch.leases.renew() == n  # loads the script, if it was not
            raw.config_resetstat()
            assert ch.leases.renew() == n
            renew_calls = raw.info("commandstats")["cmdstat_evalsha"]["calls"]
            assert renew_calls == 5  # ids of one stream, RENEW_CHUNK (500) per call
            for m in got:
                m.ack()


def test_a_dead_consumers_messages_come_back_in_one_round(url, raw):
    """3,000 messages of a consumer that died are given back by the next reclaim round of a
    live one, in calls of reclaim_batch, not a batch per round."""
    q = direct_queue("reclaim-many")
    n = 3000
    options = {"visibility_timeout": 0.5, "reclaim_batch": 500}
    with Connection(url, transport_options=options) as c:
        producer = Producer(c.default_channel, serializer="json")
        q(c.default_channel).declare()
        for i in range(n):
            producer.publish(i, exchange=q.exchange, routing_key=q.routing_key)
        dead = c.channel()
        dead.basic_qos(0, n, False)
        held = []
        with Consumer(dead, [q], accept=["json"], callbacks=[lambda body, m: held.append(m)]):
            while len(held) < n:
                c.drain_events(timeout=TIMEOUT)
        c.transport.leases.stop()
        dead.consumer_state.forget()  # it dies: forgets what it held
        time.sleep(0.6)
        live = c.channel()
        with Consumer(live, [q], accept=["json"]):
            raw.config_resetstat()
            assert live.leases.reclaim() == n
            assert raw.info("commandstats")["cmdstat_evalsha"]["calls"] >= n // 500
            assert pending(raw, "reclaim-many") == n  # parked with the holder, ready
            assert live.queue_declare("reclaim-many", passive=True).message_count == n


def test_an_idle_consumer_of_many_queues_costs_o1_per_wait(url, raw):
    """200 idle queues: a wait costs one BZPOPMIN and the sweep of a few queues, not a read
    of every queue (before: thousands of commands per second)."""
    queues = [direct_queue(f"idle-{i}") for i in range(200)]
    with Connection(url) as c:
        ch = c.channel()
        for q in queues:
            q(ch).declare()
        with Consumer(ch, queues, accept=["json"]):
            with pytest.raises(socket.timeout):
                c.drain_events(timeout=1.5)  # first reads, lease rounds start
            before = commands(raw)
            for _ in range(3):
                with pytest.raises(socket.timeout):
                    c.drain_events(timeout=1.0)
            per_wait = (commands(raw) - before) / 3
    assert per_wait < 60, per_wait


def test_many_queues_a_published_queue_is_found_while_others_keep_a_consumer_busy(url):
    """A consumer of 100 queues kept busy by one of them (it never waits) still reads a queue
    that gets a message: the rotating window of gated queues finds its marker."""
    queues = [direct_queue(f"busy-{i}") for i in range(100)]
    with Connection(url) as c:
        ch = c.channel()
        ch.basic_qos(0, 1, False)
        for q in queues:
            q(ch).declare()
        publish(c, queues[0], list(range(300)))
        got = []
        with Consumer(ch, queues, accept=["json"],
                      callbacks=[lambda body, m: (got.append(m.delivery_info["routing_key"]),
                                                  m.ack())]):
            for _ in range(5):
                c.drain_events(timeout=TIMEOUT)
            publish(c, queues[77], ["late"])
            for _ in range(40):
                c.drain_events(timeout=TIMEOUT)
                if got[-1] == "busy-77":
                    break
        assert got[-1] == "busy-77"
        assert got.count("busy-0") < 45  # found within the window's turns, not at the end

