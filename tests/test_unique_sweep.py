"""The sweep of the unique key store (lua/lib/unique_sweep.lua; docs/design.rst,
"Unique keys"): a keyed publish counts itself, and one in sixteen either runs a step of the
cycle under way, which looks at a bounded number of fields (the rest of an HSCAN reply, at
most 64), resumes where it stopped and never copies an entry, or starts a cycle only when
the store holds more than 32 fields beyond two for each message of the queue. The bound on
the store's size is tested in tests/test_unique_due.py (expired and cancelled messages).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import read_messages

from tests.test_unique import K, publish, queue


def fields(c: Any) -> dict[str, str]:
    return {f.decode(): v.decode() for f, v in c.hgetall(K.unique('q')).items()}


def stale(c: Any, names: list[str]) -> None:
    """Fields naming entries of level 0 that do not exist and that the group read past (as
    an expiry at read leaves them: the read that sets an entry aside reads it first)."""
    c.hset(K.unique('q'), mapping={f'k:{n}': f's:0:0:1-{j}' for j, n in enumerate(names)})
    c.xgroup_setid(K.stream('q', 0), 'q', '1-1000')


def from_start(c: Any) -> None:
    """A cycle under way at its start, whatever the store holds: the next step (in the 16th
    keyed publish from now) looks at the store's first fields."""
    c.hdel(K.unique('q'), 't')
    c.hset(K.unique('q'), mapping={'c': '0:0', 'a': ''})


def live_then_stale(c: Any) -> tuple[Any, list[str]]:
    """A queue whose store holds 60 live fields (a00 ... a59), then 12 stale ones (b00 ...
    b11, returned), and a cycle from its start: the next step starts at a00."""
    b = queue(c)
    for j in range(60):
        publish(b, j, f'a{j:02}')
    gone = [f'b{j:02}' for j in range(12)]
    stale(c, gone)
    from_start(c)
    return b, gone


def test_a_step_every_sixteenth_keyed_publish_resumes_where_it_stopped(script_client):
    """Fifteen keyed publishes only count (field t); the sixteenth looks at 64 fields, the
    most a step looks at, and names the field it stopped before (a). Fields deleted before
    that one meanwhile (acks release theirs) do not make the next step skip the stale ones
    after it. (Names sort in the order they are added: fakeredis scans a hash in sorted
    order, Redis a listpack in the order of its fields.)"""
    c = script_client
    b, gone = live_then_stale(c)
    for j in range(15):
        publish(b, j, f'c{j:02}')
    f = fields(c)
    assert f['t'] == '15' and f['c'] == '0:0' and f['a'] == ''
    publish(b, 15, 'c15')  # a step
    f = fields(c)
    assert f['t'] == '0'
    if f['a']:  # Redis: a listpack's one reply, cut at 64 fields (a00 ... a59, b00 ... b03)
        assert f['a'] == 'k:b04' and f['c'].startswith('0:')
        assert [n for n in gone if f'k:{n}' in f] == gone[4:]
    else:  # fakeredis answers COUNT fields, as for a hashtable: a00 ... a39
        assert [n for n in gone if f'k:{n}' in f] == gone
    c.hdel(K.unique('q'), *[f'k:a{j:02}' for j in range(10)])  # as their acks do
    for j in range(32):
        publish(b, j, f'd{j:02}')  # two steps: from b04 (or a40) on
    f = fields(c)
    assert [n for n in gone if f'k:{n}' in f] == []
    assert all(f'k:a{j:02}' in f for j in range(10, 60)) and f['t'] == '0'


@pytest.mark.parametrize('key', ['short', 'x' * 70])
def test_a_cycle_scans_once_per_sixteen_keyed_publishes_to_its_end(redis_client, key):
    """While the store is a listpack an HSCAN returns all of it (COUNT is ignored), so one
    per keyed publish cost more than the publish; with a long key (a field over 64 bytes) it
    is a hashtable, scanned in steps of one reply each (about 40 fields, all looked at: none
    fetched twice). Either way a cycle under way runs one step per 16 keyed publishes until
    it has passed every field, though every key is live (a cycle, once started, ends); then
    a store of live keys is not scanned again, only weighed against the room of the queue's
    messages once per 16 (an HLEN of the store, an XLEN per level and an HLEN of the delayed
    messages, as a length limit counts them: Redis 7.0's commandstats count the commands
    scripts run)."""
    c = redis_client
    b = queue(c)
    for j in range(100):
        publish(b, j, f'{key}{j}')
    encoding = c.object('encoding', K.unique('q'))
    assert encoding == (b'listpack' if key == 'short' else b'hashtable')
    from_start(c)
    steps = 0
    while fields(c)['c']:
        c.config_resetstat()
        for j in range(16):
            publish(b, j, f'more{steps}-{j}')
        assert c.info('commandstats')['cmdstat_hscan']['calls'] == 1
        steps += 1
        assert steps <= 5  # about 40 fields a step (64 at most), 116 to 180 fields in all
    assert steps >= 2
    assert fields(c)['a'] == ''
    c.config_resetstat()
    for j in range(64):
        publish(b, j, f'last{j}')
    stats = c.info('commandstats')
    assert 'cmdstat_hscan' not in stats
    assert stats['cmdstat_hlen']['calls'] == 4 + 4 and 'cmdstat_zcard' not in stats
    assert stats['cmdstat_xlen']['calls'] == 4 * 4  # the queue's four levels
    assert len(fields(c)) == 100 + 16 * steps + 64 + 3  # every one live; c, a and t


def test_a_store_of_stale_fields_starts_a_cycle(redis_client):
    """Fields of messages gone behind the store's back (here: ready entries deleted from the
    front, as a purge leaves them) make the store hold more than 32 fields beyond the room
    of the queue's messages: the next look starts a cycle, which deletes them and runs to
    its end. A store within the room is never scanned."""
    c = redis_client
    b = queue(c)
    for j in range(30):
        publish(b, j, f'a{j:02}')
    c.config_resetstat()
    for j in range(34):  # 64 live keys: three looks (publishes 32, 48, 64), no cycle
        publish(b, j, f'b{j:02}')
    stats = c.info('commandstats')
    assert 'cmdstat_hscan' not in stats and stats['cmdstat_hlen']['calls'] == 3 * 2  # look:
    # the store's HLEN and the delayed messages' (the count a length limit makes)
    ids = [i for i, _ in c.xrange(K.stream('q', 0))]
    c.xdel(K.stream('q', 0), *ids[:60])  # a00 ... a29, b00 ... b29: their fields stay
    for j in range(16):  # the next look: 81 fields > 32 + 2 x 20, a cycle starts
        publish(b, j, f'c{j:02}')
    f = fields(c)
    live = {f'k:b{j:02}' for j in range(30, 34)} | {f'k:c{j:02}' for j in range(16)}
    assert {n for n in f if n.startswith('k:')} == live
    assert f['c'] and f['a'] == 'k:b33'  # under way: 64 fields looked at, the most a step
    for j in range(16):
        publish(b, j, f'd{j:02}')
    assert fields(c)['c'] == ''  # the rest in one step: the cycle ended
    c.config_resetstat()
    for j in range(16):
        publish(b, j, f'e{j:02}')
    assert 'cmdstat_hscan' not in c.info('commandstats')
    assert len([n for n in fields(c) if n.startswith('k:')]) == 4 + 16 * 3


def test_a_delivered_entry_is_looked_at_without_a_copy(redis_client):
    """An entry at or before its group's last-delivered id is alive exactly when it is in
    the PEL: the sweep tells held from settled (acked and deleted, its field left as stale
    as after an expiry at read) with XPENDING alone, never an XRANGE of it (one XRANGE per
    level and step finds the first ready entry, for the new messages' fields)."""
    c = redis_client
    b = queue(c)
    for j in range(40):
        publish(b, j, f'a{j:02}')
    got = read_messages(b, ['q'], 'c1', 40)
    assert len(got) == 40
    settled = [d.entry_id for j, d in enumerate(got) if j % 2 == 0]
    c.xack(K.stream('q', 0), 'q', *settled)
    c.xdel(K.stream('q', 0), *settled)  # their fields stay: stale
    from_start(c)
    c.config_resetstat()
    for j in range(16):
        publish(b, j, f'b{j:02}')  # one step: a00 ... a39, b00 ... b15
    stats = c.info('commandstats')
    assert stats['cmdstat_hscan']['calls'] == 1 and stats['cmdstat_xrange']['calls'] == 1
    assert stats['cmdstat_xpending']['calls'] == 40
    f = fields(c)
    assert [j for j in range(40) if f'k:a{j:02}' in f] == list(range(1, 40, 2))


def test_a_ready_entry_is_never_copied(redis_client):
    """An entry not delivered yet is not looked at itself (an XRANGE of it would copy it):
    one step reads one entry per level, the first ready one. Entries deleted from the front
    of the ready ones (drop-head, purge) are before it: their fields go at once. One deleted
    from the middle (an XDEL behind our back) keeps its field until the group reads past
    its id, when the PEL tells; its key was free all along (a publish looks at the entry)."""
    c = redis_client
    b = queue(c)
    for j in range(40):
        publish(b, j, f'a{j:02}')
    ids = [i for i, _ in c.xrange(K.stream('q', 0))]
    c.xdel(K.stream('q', 0), *ids[:4], *ids[10:14])  # a00 ... a03 at the front, a10 ... a13
    from_start(c)
    c.config_resetstat()
    for j in range(16):
        publish(b, j, f'b{j:02}')  # one step: a00 ... a39, b00 ... b15, all ready
    stats = c.info('commandstats')
    assert stats['cmdstat_hscan']['calls'] == 1 and stats['cmdstat_xrange']['calls'] == 1
    assert 'cmdstat_xpending' not in stats
    f = fields(c)
    assert [j for j in range(20) if f'k:a{j:02}' not in f] == [0, 1, 2, 3]
    assert publish(b, 99, 'a11') not in (None, b'duplicate')  # its key was free all along
    got = read_messages(b, ['q'], 'c1', 10)  # a04 ... a09, a14 ... a17: past a10 ... a13
    b.ack('q', [(d.stream, d.entry_id) for d in got], consumer='c1',
          unique=[json.loads(d.payload)['body'].replace('m', 'a') for d in got])
    from_start(c)
    for j in range(16):
        publish(b, j, f'c{j:02}')  # one step: the fields of a10 ... a13 (but a11's) go
    f = fields(c)
    assert [j for j in range(10, 14) if f'k:a{j:02}' in f] == [11]


def test_a_field_naming_no_entry_is_swept_without_an_error(script_client):
    """A stream entry's field whose id is not one (another program wrote it) is deleted by
    the step that meets it; the keyed publish that ran the step answers as always (a Lua
    error there would come after the message was stored), and none is kept to fail an
    XPENDING in every cycle (ids before the group's last-delivered one are looked up in
    the PEL)."""
    c = script_client
    b = queue(c)
    for j in range(40):
        publish(b, j, f'a{j:02}')
    assert len(read_messages(b, ['q'], 'c1', 40)) == 40  # junk ids are before the group's
    junk = ['not-an-id', '12x', '5-x', '123-', '1e0-1', '0x1-1']  # tonumber takes the last two
    c.hset(K.unique('q'), mapping={f'k:junk{j}': f's:0:0:{v}' for j, v in enumerate(junk)})
    from_start(c)
    for j in range(32):  # two steps (fakeredis answers 40 fields a reply, in name order)
        assert publish(b, j, f'b{j:02}') not in (None, b'duplicate')
    f = fields(c)
    assert [v for j, v in enumerate(junk) if f'k:junk{j}' in f] == []
    assert all(f'k:a{j:02}' in f for j in range(40))


def test_a_step_does_not_resume_at_a_field_added_again(redis_client):
    """A listpack keeps its fields in the order they were added: the field a step stopped
    before, deleted and added again (its message acked, the key published again), is at the
    end. The next step resumes at the offset, not there, so the fields between are looked at
    in this cycle, not passed over (cycle after cycle, if it keeps happening)."""
    c = redis_client
    b, gone = live_then_stale(c)
    for j in range(16):
        publish(b, j, f'c{j:02}')  # a step: a00 ... a59, b00 ... b03, then the cap
    f = fields(c)
    assert f['a'] == 'k:b04' and [n for n in gone if f'k:{n}' in f] == gone[4:]
    c.hdel(K.unique('q'), 'k:b04')
    c.hset(K.unique('q'), 'k:b04', f['k:b04'])  # now the listpack's last field
    for j in range(16):
        publish(b, j, f'd{j:02}')  # a step: from the offset, b05 ... b11 first, b04 last
    f = fields(c)
    assert [n for n in gone if f'k:{n}' in f] == []
