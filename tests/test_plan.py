"""The read plan (kombu_streams/plan.py) on its own: which sources a read covers, and how.

A hypothesis state machine drives one ReadPlan with reads (whose replies it makes up),
pops of markers, suspensions, cancels and clock jumps, and checks the rules the wake-up
argument in kombu_streams/poller.py relies on after every step.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kombu_streams import plan as plan_module
from kombu_streams.broker import GATED, POPPED, READ, WALK, ReadResult
from kombu_streams.plan import READ_ALL, WINDOW, ReadPlan

SOURCES = [(f'q{i}', None) for i in range(40)] + [('q0', 'fanout')]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PlanMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        plan_module.monotonic = self.clock  # the plan's time, moved by the rules
        self.plan = ReadPlan()
        self.sources = SOURCES[:5]
        self.popped: set = set()  # markers popped and not yet read or given back

    def teardown(self) -> None:
        import time
        plan_module.monotonic = time.monotonic

    @rule(n=st.sampled_from([1, 3, 5, 16, 17, 41]))
    def consume(self, n: int) -> None:
        """The channel's consumers change: it reads the first n sources."""
        before = set(self.sources)
        self.sources = SOURCES[:n]
        dropped = self.plan.forget(self.sources)
        assert dropped == (self.popped & before) - set(self.sources)
        self.popped -= dropped  # the channel gives those markers back

    @rule(i=st.integers(0, 40))
    def pop(self, i: int) -> None:
        source = SOURCES[i]
        if source in self.sources and source not in self.plan.suspended:
            self.plan.woke(source)
            self.popped.add(source)

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 11.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(i=st.integers(0, 40))
    def broken(self, i: int) -> None:
        source = SOURCES[i]
        self.plan.suspend(source, 'WRONGTYPE')
        self.popped.discard(source)  # a suspended source's marker goes back (read.lua)

    @rule(data=st.data())
    def read(self, data) -> None:
        modes = self.plan.modes(self.sources)
        live = self.plan.live(self.sources)
        assert all(s in live for s in modes), 'a suspended source is read'
        assert set(modes.values()) <= {READ, POPPED, GATED, WALK}
        if len(live) <= READ_ALL:
            assert set(modes) == set(live), 'few sources: every one is covered'
        else:
            assert sum(m == GATED for m in modes.values()) <= WINDOW
        # every popped marker is read or given back by this read (status '-' re-arms it)
        assert {s for s in self.popped if s not in self.plan.suspended} <= {
            s for s, m in modes.items() if m == POPPED}
        status = {s: data.draw(st.sampled_from('10-'), label=str(s)) for s in modes}
        self.plan.learn(modes, ReadResult([], status, [], []))
        self.popped -= {s for s, m in modes.items() if m == POPPED}
        for s, st_ in status.items():
            if st_ == '1':
                assert s in self.plan.hot
            elif st_ == '0':
                assert s not in self.plan.hot

    @invariant()
    def woken_are_the_popped(self) -> None:
        assert self.plan.woken == self.popped


TestPlan = PlanMachine.TestCase
TestPlan.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_busy_channel_of_many_sources_gates_every_cold_one_in_turn():
    """Beyond READ_ALL sources, a channel busy with one hot source gates a rotating window
    of the others, so each cold one is looked at within (cold / WINDOW) reads."""
    plan = ReadPlan()
    sources = [(f'q{i}', None) for i in range(100)]
    plan.hot.add(sources[0])
    seen = set()
    for _ in range((99 + WINDOW - 1) // WINDOW):
        seen |= {s for s, m in plan.modes(sources).items() if m == GATED}
    assert seen >= set(sources[1:])


def test_an_idle_channel_of_many_sources_reads_nothing_but_its_sweep():
    plan = ReadPlan()
    sources = [(f'q{i}', None) for i in range(100)]
    first = plan.modes(sources)
    assert set(first.values()) == {WALK} and len(first) == plan_module.SWEEP
    assert plan.modes(sources) == {}  # within the sweep interval: no Redis call at all
