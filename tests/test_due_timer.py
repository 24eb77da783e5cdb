"""The poller keeps the due time of delayed messages itself: Redis answers a blocked
BZPOPMIN's timeout only at its next tick (every 1/hz s, 100 ms by default, on a quiet
server), so a wait that merely times out at the due time comes up to 100 ms late.

* On an event loop (Celery's hub) a hub timer reads the channel at the due time. It must be
  armed as soon as a read tells the time: Kombu's hub works out how long to sleep before it
  calls on_tick, so the timer (a CLIENT UNBLOCK) the poller used to add in on_tick counted
  only from the next turn, and Celery ETA tasks on an idle prefork worker ran up to 100 ms
  late (scripts/eta).
* In drain_events, a wait that polling_interval ends just before a due time could be
  answered after it: it is ended with CLIENT UNBLOCK at the due time too.

No timing is asserted: the tests look at the timer and the wait the poller sets up, and
wait for real only in the direction a slow machine cannot break.
"""

from __future__ import annotations

import time
from time import monotonic
from types import SimpleNamespace

import pytest
from kombu import Connection, Consumer, Producer, Queue

from kombu_streams.poller import Poller


def _url(redis_url: str) -> str:
    return redis_url.replace('redis://', 'redis-streams://', 1)


@pytest.mark.redis
def test_a_hub_timer_at_the_due_time_reads_the_channel(redis_url):
    from kombu.asynchronous import Hub

    hub = Hub()
    queue = Queue('due-hub', routing_key='due-hub')
    got: list = []

    def on_message(body, message):
        got.append(body)
        message.ack()

    # polling_interval 30: no wait times out by itself while the test runs
    with Connection(_url(redis_url), transport_options={'polling_interval': 30}) as conn:
        Producer(conn, serializer='json').publish(
            {'n': 1}, routing_key='due-hub', declare=[queue], headers={'x-delay': 1500})
        channel = conn.channel()
        cycle = conn.transport.cycle
        with Consumer(channel, [queue], callbacks=[on_message], accept=['json']):
            conn.transport.register_with_event_loop(conn.connection, hub)
            deadline = monotonic() + 30
            while channel.plan.next_due() is None and monotonic() < deadline:
                start = monotonic()
                hub.run_once()  # a wait, woken by the publish's marker; a read tells the time
                took = monotonic() - start
            due = channel.plan.next_due()
            assert due is not None and got == []
            # before the hub's next turn, its timers hold one at the due time
            timers = [t.eta for t in hub.timer.queue if t.entry.fun == cycle._on_due]
            assert len(timers) == 1
            assert due <= timers[0] + 1e-6
            assert timers[0] - due <= took  # set from the read, not at a later tick
            while monotonic() < timers[0]:
                time.sleep(timers[0] - monotonic() + 0.01)
            hub.fire_timers()  # the timer alone, no socket event: it reads, and delivers
            assert got == [{'n': 1}]
    hub.close()


def _poller(interval: float, due_in: float | None) -> Poller:
    transport = SimpleNamespace(wait_interval=interval, cluster=False)
    poller = Poller(transport)
    poller.channels = [SimpleNamespace(due_in=lambda: due_in)]
    return poller


def test_drain_ends_a_wait_at_a_due_time_just_past_polling_interval():
    """polling_interval ends the wait (1 s) before the due time (1.05 s), but Redis may
    answer that timeout up to 100 ms late: the wait is ended with CLIENT UNBLOCK at the due
    time, so it needs the connection's id."""
    poller = _poller(1.0, 1.05)
    assert poller._block(None) == 1.0
    assert poller._due_bounds(None) is True
    assert poller._due_bounds(0.5) is False  # the caller's timeout comes first
    assert _poller(1.0, None)._due_bounds(None) is False
