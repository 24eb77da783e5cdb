"""read.lua's call is laid out once per tuple of sources and kept (kombu_streams/reads.py):
a call built from a kept layout must be the one a fresh builder lays out, whatever changed
between calls (COUNT, bytes, modes, ttls, size hints, riding acks), and the kept layouts stay
bounded."""

from __future__ import annotations

from kombu_streams.calls import Calls
from kombu_streams.keys import Keys
from kombu_streams.reads import GATED, LAYOUTS_KEPT, POPPED, WALK

LEVELS = [0, 3, 6, 9]


def fresh(sources, *args, **kwargs):
    """The call a builder that kept nothing lays out."""
    return Calls(Keys(), LEVELS).read_call(sources, *args, **kwargs)[0]


def test_kept_layout_gives_the_fresh_call_whatever_changes():
    calls = Calls(Keys(), LEVELS)
    a, b, fan = ('a', None), ('b', None), ('b', 'ex')
    s0a, s3b = calls.keys.stream('a', 0), calls.keys.stream('b', 3)
    cases = [
        ([a, b], ('c1', 1), {}),
        ([a, b], ('c1', 7, 3, {'a': 5000}), {'modes': {b: POPPED}, 'hints': {a: 900}}),
        ([a, b], ('c2', 2), {'acks': [(s3b, b'1-1', True), (s0a, b'2-1')], 'max_bytes': 10}),
        ([fan, a, b], ('c1', 3), {'modes': {fan: GATED, a: WALK}, 'ttls': {'b': 70}}),
        ([a, b], ('c1', 1), {'acks': [(s0a, b'3-1', False)]}),
        ([b, a], ('c1', 1), {}),
        ([fan, a, b], ('c1', 3), {}),
    ]
    for sources, args, kwargs in cases:
        call, parse = calls.read_call(sources, *args, **kwargs)
        assert call == fresh(sources, *args, **kwargs)
    # what changes lands where read.lua's header says: ARGV[3+5q..7+5q], the acks last
    (_, keys, args), _ = calls.read_call([a, b], 'c1', 7, 3, {'a': 5000}, {b: POPPED},
                                         [(s3b, b'1-1', True)], hints={a: 900})
    assert args[:7] == ['c1', 7, '~requeued', 3, 8, 2, args[6]]
    assert args[7:17] == ['a', 'q', 'r', 5000, 900, 'b', 'q', 'p', 0, 0]
    assert args[17:] == [1, -4, b'1-1']
    assert keys[3] == s3b  # streams by level, then by source: a0 b0 a3 b3 ...
    # then twelve keys per source, its marker first, its in-flight flag and staging hash last
    assert keys[8] == calls.keys.wake('a') and keys[18] == calls.keys.capped('a')
    assert keys[19] == calls.keys.fair('a')
    assert keys[20] == calls.keys.wake('b') and keys[30:] == [calls.keys.capped('b'),
                                                              calls.keys.fair('b')]
    # the reply is decoded against the call's own sources and streams
    call, parse = calls.read_call([b, a], 'c1', 2)
    result = parse([b'10', [], [], [], [], 2, b'5-1', 1, b'm'])
    assert [(d.queue, d.stream) for d in result.deliveries] == [('a', s0a)]
    assert result.status == {b: '1', a: '0'}


def test_ack_merges_names_the_own_streams_only():
    calls = Calls(Keys(), LEVELS)
    merges = calls.ack_merges([('q', 'ex'), ('q', None)])
    assert merges == set(calls.streams('q'))


def test_kept_layouts_are_bounded():
    calls = Calls(Keys(), LEVELS)
    for i in range(3 * LAYOUTS_KEPT):
        calls.read_call([(f'q{i}', None)], 'c1', 1)
    assert 0 < len(calls._read_layouts) <= LAYOUTS_KEPT
