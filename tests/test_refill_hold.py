"""On an event loop, a refill read waits for credit to come back in more than one piece.

Celery's worker gives prefetch credit back one message at a time (an ack as each task
starts), so reading as soon as any credit is back costs one read.lua call, and one round
trip, per task. While the credit is under half the prefetch limit (the application still
holds the rest) and nothing is due, the read waits for more credit, at most REFILL_HOLD (a
hub timer turns the loop then); the acks made meanwhile ride in that read.

No timing is asserted: the tests drive the loop's turns (on_tick) and the hold's timer
themselves.
"""

from __future__ import annotations

from time import monotonic
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import count_reads
from kombu import Connection, Consumer, Producer, Queue

from kombu_streams.channel import Channel
from kombu_streams.hubloop import REFILL_HOLD
from kombu_streams.poller import Poller


def _url(redis_url: str) -> str:
    return redis_url.replace('redis://', 'redis-streams://', 1)


@pytest.mark.redis
def test_a_refill_read_waits_for_half_the_prefetch_and_carries_the_acks(redis_url,
                                                                        monkeypatch):
    from kombu.asynchronous import Hub

    hub = Hub()
    queue = Queue('refill-hold', routing_key='refill-hold')
    got: list = []
    # polling_interval 30: no wait times out by itself while the test runs
    with Connection(_url(redis_url), transport_options={'polling_interval': 30}) as conn:
        producer = Producer(conn, serializer='json')
        for n in range(30):
            producer.publish({'n': n}, routing_key='refill-hold', declare=[queue])
        channel = conn.channel()
        cycle = conn.transport.cycle
        with Consumer(channel, [queue], callbacks=[lambda body, m: got.append(m)],
                      accept=['json'], prefetch_count=8):
            conn.transport.register_with_event_loop(conn.connection, hub)
            deadline = monotonic() + 30
            while len(got) < 8 and monotonic() < deadline:
                hub.run_once()  # a wait, woken by the publishes' marker; a read of 8
            assert len(got) == 8 and channel.more_ready
            reads = count_reads(monkeypatch, channel)

            got[0].ack()  # credit 1 of 8: the read waits, and so does the ack
            cycle.on_tick()
            assert reads == [] and len(got) == 8
            assert channel.consumer_state.has_acks()
            held = [t for t in hub.timer.queue if t.entry.fun == cycle._end_hold]
            assert len(held) == 1  # the loop turns again by REFILL_HOLD at the latest
            cycle.on_tick()  # another turn, no more credit: still held, no second timer
            assert reads == []
            assert len([t for t in hub.timer.queue if t.entry.fun == cycle._end_hold]) == 1

            for message in got[1:4]:
                message.ack()
            cycle.on_tick()  # credit 4 of 8: one read takes 4, with the 4 acks inside
            assert reads == [4] and len(got) == 12
            assert not channel.consumer_state.has_acks()
            assert channel not in cycle._refill_held

            got[4].ack()  # held again; the hold's timer ends it: the next turn reads 1
            cycle.on_tick()
            assert reads == [4]
            since = cycle._refill_held[channel]
            held = [t for t in hub.timer.queue
                    if t.entry.fun == cycle._end_hold and t.entry.args[1] == since]
            assert len(held) == 1 and held[0].eta >= since + REFILL_HOLD  # armed after the stamp
            cycle._end_hold(channel, since)
            cycle.on_tick()
            assert reads == [4, 1] and len(got) == 13
            assert not channel.consumer_state.has_acks()
            for message in got[5:]:
                message.ack()
            cycle.on_tick()
            channel.flush_acks()
    hub.close()


def _qos(prefetch: int, in_use: int, **overrides: Any) -> Any:
    qos = SimpleNamespace(prefetch_count=prefetch,
                          can_consume_max_estimate=lambda: max(prefetch - in_use, 0),
                          **overrides)
    return qos


@pytest.mark.parametrize('prefetch, in_use, low', [
    (8, 7, True),    # credit 1 of 8
    (8, 5, True),    # 3 of 8
    (8, 4, False),   # half back: read
    (8, 8, False),   # no credit: nothing to read (and no wait)
    (2, 1, False),   # 1 of 2 is half
    (0, 5, False),   # no limit
])
def test_refill_low(prefetch, in_use, low):
    channel = SimpleNamespace(qos=_qos(prefetch, in_use), max_read_batch=100)
    assert Channel.refill_low(channel) is low  # type: ignore[arg-type]


def test_refill_low_never_when_can_consume_was_replaced():
    """Celery's worker_disable_prefetch replaces can_consume to take a message only when a
    process is free: each refill is read at once."""
    channel = SimpleNamespace(qos=_qos(8, 7, can_consume=lambda: True), max_read_batch=100)
    assert Channel.refill_low(channel) is False  # type: ignore[arg-type]


def test_refill_low_counts_max_read_batch():
    """A read never takes more than max_read_batch: waiting for more credit than that
    gains nothing."""
    channel = SimpleNamespace(qos=_qos(100, 97), max_read_batch=3)
    assert Channel.refill_low(channel) is False  # type: ignore[arg-type]
    channel = SimpleNamespace(qos=_qos(100, 98), max_read_batch=3)
    assert Channel.refill_low(channel) is True  # type: ignore[arg-type]


class _Stub:
    """A channel whose credit is short, with a delayed message due in ``due`` s."""

    def __init__(self, due: float) -> None:
        self.due = due

    def refill_low(self) -> bool:
        return True

    def due_in(self) -> float:
        return self.due


def test_a_due_message_is_never_held():
    """A delayed message that is due is read at once, whatever the credit (ETA precision)."""
    poller = Poller(SimpleNamespace(wait_interval=1.0, cluster=False))
    poller.waits.hub = SimpleNamespace(call_later=lambda *a: None)
    due, later = _Stub(0.0), _Stub(5.0)
    assert poller._hold_refill(due) is False  # type: ignore[arg-type]
    assert poller._hold_refill(later) is True  # type: ignore[arg-type]
