"""ConsumerState, the one owner of what a channel holds, under the threads that share it.

The consumer thread reads (hold + buffer) and hands out (next_buffered), pool threads ack
(defer_ack / release) and requeue, the lease keeper renews (holding), finds leases lost
(lose) and sends deferred acks (take_acks, put_back_acks on failure). The model: every
message read is settled exactly once (acked or requeued) or dropped for a lost lease, never
both, never neither; no ack is lost, even when sending fails and the acks are put back.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import warnings

from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import Connection, Queue

from kombu_streams.state import ConsumerState, InFlight


def _msg(n: int) -> InFlight:
    return InFlight('q', 'ks:q:{q}:0', f'{n}-0'.encode(), 1, None)


def _item(n: int) -> tuple[dict, str]:
    return {'properties': {'delivery_tag': f't{n}'}}, 'q'


def test_threads_lose_no_ack_and_settle_each_message_once() -> None:
    """A reader, four acking pool threads and a lease keeper that renews, loses leases and
    sends acks (failing one send in three: the acks are put back) run together; at the end
    every message was settled exactly once, or dropped once for its lost lease."""
    state = ConsumerState()
    total = 4000
    handed: list[str] = []  # tags handed to the application, in order
    handed_lock = threading.Condition()
    sent: list[bytes] = []  # entry ids whose ack reached "Redis"
    requeued: list[bytes] = []
    lost_dropped: list[bytes] = []
    lost_handed: list[bytes] = []
    done = threading.Event()  # the reader handed out everything
    pools_done = threading.Event()  # and the pool threads settled it

    def reader() -> None:
        for start in range(0, total, 50):
            batch = range(start, start + 50)
            for n in batch:
                state.hold(f't{n}', _msg(n))
            state.buffer(_item(n) for n in batch)
            while state.buffered() > 100:
                item = state.next_buffered()
                if item is not None:
                    with handed_lock:
                        handed.append(item[0]['properties']['delivery_tag'])
                        handed_lock.notify_all()
        while (item := state.next_buffered()) is not None:
            with handed_lock:
                handed.append(item[0]['properties']['delivery_tag'])
                handed_lock.notify_all()
        done.set()

    def pool(k: int) -> None:
        rng = random.Random(k)
        taken = 0
        while True:
            with handed_lock:
                while taken >= len(handed) and not done.is_set():
                    handed_lock.wait(0.01)
                if taken >= len(handed):
                    return
                tag = handed[taken]
                taken += 1
            if int(tag[1:]) % 4 != k:
                continue
            if rng.random() < 0.9:
                state.defer_ack(tag)
            else:
                for _, msg in state.release([tag]):
                    requeued.append(msg.entry_id)

    def keeper() -> None:
        rng = random.Random(99)
        while not pools_done.is_set() or state.has_acks():
            acks = state.take_acks()
            if acks and rng.random() < 1 / 3:
                state.put_back_acks(acks)  # the send failed
            else:
                sent.extend(m.entry_id for m in acks)
            for tag, msg in state.holding()[:5]:
                if rng.random() < 0.01:
                    outcome = state.lose(tag, msg)
                    if outcome is True:
                        lost_dropped.append(msg.entry_id)
                    elif outcome is False:
                        lost_handed.append(msg.entry_id)

    workers = [threading.Thread(target=reader)]
    workers += [threading.Thread(target=pool, args=(k,)) for k in range(4)]
    lease_keeper = threading.Thread(target=keeper)
    for t in [*workers, lease_keeper]:
        t.start()
    for t in workers:
        t.join(60)
    pools_done.set()
    lease_keeper.join(60)
    assert not any(t.is_alive() for t in [*workers, lease_keeper])
    assert state.held_count() == 0  # every message handed out was acked or requeued
    assert not state.has_acks()
    settled = sent + requeued
    assert len(settled) == len(set(settled)), 'a message was settled twice'
    assert not set(settled) & set(lost_dropped), 'a dropped message was settled'
    everything = set(settled) | set(lost_dropped)
    assert everything == {f'{n}-0'.encode() for n in range(total)}
    assert len(handed) == len(set(handed)) == total - len(lost_dropped)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(['hold', 'buffer', 'next', 'ack', 'release',
                                           'take', 'putback', 'lose', 'take_buffered']),
                          st.integers(0, 7)), max_size=60))
def test_state_matches_a_model(ops) -> None:
    """Any sequence of operations keeps the invariants: a tag is buffered only while in
    flight, a deferred ack is no longer in flight, a lost message is never handed out."""
    state = ConsumerState()
    in_flight: dict[str, InFlight] = {}
    buffered: list[str] = []
    acks: list[InFlight] = []
    lost: set[str] = set()
    taken_acks: list[InFlight] = []
    for op, n in ops:
        tag = f't{n}'
        if op == 'hold' and tag not in in_flight and not any(m.entry_id == _msg(n).entry_id
                                                                 for m in acks + taken_acks):
            msg = _msg(n)
            state.hold(tag, msg)
            in_flight[tag] = msg
            lost.discard(tag)  # a new message under the tag (tags are unique in practice)
        elif op == 'buffer' and tag in in_flight and tag not in buffered:
            state.buffer([_item(n)])
            buffered.append(tag)
        elif op == 'next':
            item = state.next_buffered()
            while buffered and buffered[0] in lost | (set(buffered) - set(in_flight)):
                gone = buffered.pop(0)
                in_flight.pop(gone, None)
            expected = buffered.pop(0) if buffered else None
            got = item[0]['properties']['delivery_tag'] if item else None
            assert got == expected
        elif op == 'ack':
            ok = state.defer_ack(tag)
            assert ok == (tag in in_flight)
            if ok:
                acks.append(in_flight.pop(tag))
                if tag in buffered:
                    buffered.remove(tag)
        elif op == 'release':
            out = state.release([tag])
            assert [t for t, _ in out] == ([tag] if tag in in_flight else [])
            in_flight.pop(tag, None)
            if tag in buffered:
                buffered.remove(tag)
        elif op == 'take':
            got_acks = state.take_acks()
            assert got_acks == acks
            taken_acks = got_acks
            acks = []
        elif op == 'putback':
            state.put_back_acks(taken_acks)
            acks = taken_acks + acks
            taken_acks = []
        elif op == 'lose' and tag in in_flight:
            outcome = state.lose(tag, in_flight[tag])
            lost.add(tag)
            if tag in buffered:
                assert outcome is True
                buffered.remove(tag)
                del in_flight[tag]
            else:
                assert outcome is False
        elif op == 'take_buffered':
            assert state.take_buffered() == buffered
            buffered = []
        assert state.buffered() == len(buffered)
        assert state.held_count() == len(in_flight)
        assert {t for t, _ in state.holding()} == set(in_flight) - lost


def test_a_forked_child_forgets_what_the_parent_holds(redis_url: str) -> None:
    """After a fork (Celery's prefork pool, multiprocessing) the child's copy of a channel
    holds nothing and has no waits: it cannot renew, ack or requeue the parent's messages.
    The parent's message stays in flight, with the parent."""
    url = redis_url.replace('redis://', 'redis-streams://', 1)
    queue = Queue('forked', routing_key='forked')
    with Connection(url) as conn:
        conn.Producer().publish('x', routing_key='forked', declare=[queue])
        channel = conn.channel()
        message = queue(channel).get()
        assert message is not None and channel.consumer_state.held_count() == 1
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:  # the child: report and leave without running any cleanup
            try:
                report = (f'{channel.consumer_state.held_count()} '
                          f'{len(conn.transport.cycle.waits.pending)} '
                          f'{conn.transport.leases._thread is None}')
            except BaseException as exc:  # pragma: no cover
                report = repr(exc)
            os.write(write_end, report.encode())
            os._exit(0)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        report = os.read(read_end, 1000).decode()
        os.close(read_end)
        assert status == 0 and report == '0 0 True', report
        assert channel.consumer_state.held_count() == 1  # the parent still has it
        message.ack()
        assert queue(channel).get() is None


def test_a_fork_while_another_thread_holds_the_lock_does_not_hang_the_child(
        redis_url: str) -> None:
    """The parent's lease keeper may hold the state's lock at the very moment of a fork.
    The child has no such thread: its after-fork reset must not wait for that lock."""
    url = redis_url.replace('redis://', 'redis-streams://', 1)
    with Connection(url) as conn:
        state = conn.channel().consumer_state
        holding, release = threading.Event(), threading.Event()

        def keeper() -> None:  # stands in for the lease keeper, mid-round
            with state._lock:
                holding.set()
                release.wait(30)

        thread = threading.Thread(target=keeper, daemon=True)
        thread.start()
        assert holding.wait(10)
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:  # the child: the at-fork hook ran; the state must be usable
            try:
                report = str(state.held_count())
            except BaseException as exc:  # pragma: no cover
                report = repr(exc)
            os.write(write_end, report.encode())
            os._exit(0)
        os.close(write_end)
        # the child hangs (in the at-fork hook) if it waits for the parent's lock: give it
        # 20 s while the parent's thread still holds its copy, then kill it
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        release.set()
        thread.join(10)
        report = os.read(read_end, 1000).decode() if done else 'hung'
        os.close(read_end)
        assert status == 0 and report == '0', (status, report)


def test_a_read_interrupted_half_way_keeps_what_it_decoded_in_flight(
        redis_url: str, monkeypatch) -> None:
    """A read's decoded messages are put in flight together (hold_many). When decoding
    stops half-way (here a KeyboardInterrupt at the third message), the two decoded before
    it are in flight and in the read-ahead buffer, handed out next: nothing read is
    stranded until its lease runs out. The third and later stay unacked in Redis."""
    url = redis_url.replace('redis://', 'redis-streams://', 1)
    queue = Queue('halfway', routing_key='halfway')
    with Connection(url) as conn:
        producer = conn.Producer()
        for n in range(5):
            producer.publish(f'm{n}', routing_key='halfway', declare=[queue])
        channel = conn.channel()
        queue(channel).declare()
        real = type(channel)._decode
        seen: list[int] = []

        def decode(self, delivery):
            seen.append(1)
            if len(seen) == 3:
                raise KeyboardInterrupt
            return real(self, delivery)

        monkeypatch.setattr(type(channel), '_decode', decode)
        try:
            channel._read(['halfway'], 5, planned=False)
        except KeyboardInterrupt:
            pass
        else:  # pragma: no cover
            raise AssertionError('the read was not interrupted')
        monkeypatch.setattr(type(channel), '_decode', real)
        state = channel.consumer_state
        assert state.held_count() == 2 and state.buffered() == 2
        handed = [state.next_buffered(), state.next_buffered()]
        assert [channel.Message(item[0], channel=channel).decode() for item in handed] == [
            'm0', 'm1']
        assert state.next_buffered() is None
