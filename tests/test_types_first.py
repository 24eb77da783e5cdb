"""Types first, for every writing script and every one of its KEYS (docs/design.rst, "Every
script"): another program's key of another type at any of the names a call gets is an error
(WRONGTYPE, KeyTypeError) and the call changes nothing at all.

Each case builds a realistic state (two declared queues with messages in several levels,
pending, requeued, delayed and dead-lettered ones, a direct and a fanout exchange with
bindings, groups, deadlines and an expired binding, Kombu's lists for the migration), lays
the call out with the Broker's builder, puts a key of a wrong type (hypothesis picks which)
at one position, and compares every key of the database (type, value, expiry) before and
after. A companion test checks each call does write something on that state, so "nothing
changed" is not true merely because the call had nothing to do.

Not here: read (read.lua reports a wrong type per source and serves the others:
tests/test_scripts.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import pytest
from helpers import STALE, assert_same, read_messages, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kombu_streams.broker import Broker, Delay
from kombu_streams.keys import Keys
from kombu_streams.scripts import Call, KeyTypeError, run_after

K = Keys()
LEVELS = [0, 3, 6, 9]
SEP = '\x06\x16'  # the channel's separator in binding members
P = b'{"body": "eA==", "properties": {"priority": 0}}'  # a Kombu envelope (migrate reads it)
HOUR = 3_600_000
TYPES = ('string', 'list', 'set', 'zset', 'hash', 'stream')

PROPERTY = settings(
    max_examples=2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


#: A length limit as declare.lua and limits.lua store it.
LIMIT = ['x-max-length', '5', 'x-overflow', 'drop-head']


def _dedup(c: Any) -> None:
    """Queue q remembers ids for an hour (x-deduplication-window), 'seen' among them."""
    c.hset(K.args('q'), mapping={'x-deduplication-window': str(HOUR)})
    c.zadd(K.dedup('q'), {'seen': 9_999_999_999_999, 'old': 1, '': -2})


def _backoff(c: Any) -> None:
    """Queue q has x-requeue-delay: what requeue and reclaim give back waits."""
    c.hset(K.args('q'), 'x-requeue-delay', '1000,60000')


def _unique(c: Any, mode: str = '') -> None:
    """Queue q's key 'held' is held by its oldest entry of level 9, still ready."""
    first = c.xrange(K.stream('q', 9), count=1)[0][0].decode()
    c.hset(K.unique('q'), mapping={'k:held': f's:0:9:{first}', 'n': 1})
    if mode:
        c.hset(K.args('q'), 'x-unique-mode', mode)


def _fair(c: Any) -> None:
    """Queue q has x-fairness, and two messages of group 'a' staged at level 3."""
    c.hset(K.args('q'), 'x-fairness', 'round-robin')
    b = Broker(c, K, LEVELS)
    for _ in range(2):
        b.publish('q', 3, P, group='a')


def _fair_limited(c: Any) -> None:
    """As _fair, with a length limit far off: staged messages are counted against it."""
    _fair(c)
    c.hset(K.args('q'), mapping={'x-max-length': '500', 'x-overflow': 'reject-publish'})


def _capped(c: Any) -> None:
    """Queue q's x-max-in-flight stopped a read with work left: its flag is raised, so a
    settle that frees a slot lowers it and sets the marker (lua/lib/inflight.lua)."""
    c.hset(K.args('q'), 'x-max-in-flight', '1')
    c.set(K.capped('q'), '1')


def member(queue: str, routing_key: str = '') -> str:
    return SEP.join([routing_key, '', queue])


def realistic(c: Any, expiring: bool) -> dict[str, Any]:
    """Queues q and r, direct exchange x, fanout exchange f, Kombu's keys; returns what the
    calls need to know of it (ids, the unacked value)."""
    b = Broker(c, K, LEVELS)
    b.check_layout()
    for q in ('q', 'r'):
        b.declare(q)
    for _ in range(2):  # big messages: the first two entries of q's level 0
        b.publish_big('q', 0, P)
    b.bind('x', member('q', 'rk'), 0)
    b.bind('x', member('r', 'rk'), HOUR)
    c.sadd(K.bindings('x'), member('gone', 'rk'))  # past its deadline: route drops it
    c.zadd(K.deadlines('x'), {member('gone', 'rk'): 1})
    for q in ('q', 'r', 's'):
        b.bind('f', member(q), HOUR if q != 'q' else 0, fanout_group=q)
    c.zadd(K.deadlines('f'), {member('s'): 1})  # s's binding expired: route drops its group
    for _ in range(3):
        b.run(b.fanout_publish_call('f', P, [(q, member(q)) for q in ('q', 'r', 's')]))
    for level in (0, 3, 9):
        for q in ('q', 'r'):
            for _ in range(3):
                b.publish(q, level, P)
    for due in ('+600000', '+900000'):
        b.publish('q', 3, P, delay=Delay(due, 1000, 'lbl'))
    b.publish_big('q', 3, P, delay=Delay('+700000', 1000, 'lbl'))
    fan = read_messages(b, ['q'], 'c1', 2, fanout={'q': ['f']})
    own = read_messages(b, ['q'], 'c1', 3)
    assert own[0].token and own[1].token and not own[2].token
    b.requeue('q', [(own[0].stream, own[0].entry_id)])  # a big one parked with the holder
    b.dead_letter('q', own[1].stream, own[1].entry_id, 'why', 1)  # a big one's letter: f:r
    letter = c.xrange(K.dlq('q'))[-1][0]
    # a lease about to run out (renew's work; XCLAIM IDLE sets the idle time, count kept)
    c.xclaim(own[2].stream, 'q', 'c1', 0, [own[2].entry_id], idle=STALE, justid=True)
    c.hset(K.counters('q'), 'expired', 2)  # messages set aside past their TTL
    if expiring:
        b.touch('q', HOUR)
        b.touch('r', HOUR)
    c.rpush('kq', P, P, b'junk')  # Kombu's list of queue kq
    raw = b'[' + P + b', "x", "rk"]'
    c.hset('unacked', 't1', raw)
    c.zadd('unacked_index', {'t1': 1})
    return {'renew': (own[2].stream, [own[2].entry_id]), 'raw': raw,
            'fanout_ids': [d.entry_id for d in fan], 'letter': letter}


def _popped(c: Any) -> None:
    """As BZPOPMIN took them: the markers wake.lua gives back."""
    c.delete(K.wake('q'), K.fanout_wake('f', 'q'), K.fanout_wake('f', 's'))


def _joined_idle(c: Any) -> None:
    """Consumer c9 read queue q once and owns nothing there: leave.lua removes it."""
    for level in LEVELS:
        c.xgroup_createconsumer(K.stream('q', level), 'q', 'c9')


def _unrecorded(c: Any) -> None:
    c.delete(K.layout())


FANOUT_SOURCES = [('q', None), ('r', None), ('q', 'f'), ('s', 'f'), ('n', None)]


class After(NamedTuple):
    """A call run after a command in one MULTI/EXEC (a big message's publish: its body's
    HSET, then publish.lua), which as a whole changes nothing on a wrong type."""

    command: tuple[Any, ...]
    call: Call


Run = Union[Call, After]


def run(b: Broker, call: Run) -> Any:
    if isinstance(call, After):
        return run_after(b.client, call.command, call.call)
    return b.run(call)


def keys_of(call: Run) -> list[str]:
    """The distinct KEYS of a call, in order."""
    keys = call.call[1] if isinstance(call, After) else call[1]
    return list(dict.fromkeys(str(k) for k in keys))


def big_publish(b: Broker, delay: Delay, dedup_id: str = '') -> After:
    return After(b.store_big('q', 't0', P),
                 b.publish_call('q', 3, P, routed=True, delay=delay, token='t0',
                                dedup_id=dedup_id))


#: name -> (builder of the call from the Broker and the facts of the state, preparation)
CASES: dict[str, tuple[Callable[[Broker, dict[str, Any]], Run], Callable[[Any], None] | None]]
CASES = {
    'publish': (lambda b, f: b.publish_call('q', 3, P, routed=True, delay=Delay()), None),
    'publish-big': (lambda b, f: big_publish(b, Delay()), None),
    'publish-big-delayed': (lambda b, f: big_publish(b, Delay('+600000', 1000, 'later')), None),
    'publish-delayed': (lambda b, f: b.publish_call(
        'q', 6, P, delay=Delay('+600000', 1000, 'later')), None),
    # x-deduplication-window: a new id (remembered), a duplicate (counted), big and delayed
    'publish-dedup': (lambda b, f: b.publish_call('q', 3, P, routed=True, delay=Delay(),
                                                  dedup_id='new'), _dedup),
    'publish-dedup-duplicate': (lambda b, f: b.publish_call(
        'q', 3, P, routed=True, delay=Delay(), dedup_id='seen'), _dedup),
    'publish-dedup-big': (lambda b, f: big_publish(b, Delay(), 'new'), _dedup),
    'publish-dedup-delayed': (lambda b, f: b.publish_call(
        'q', 6, P, delay=Delay('+600000', 1000, 'later'), dedup_id='new'), _dedup),
    'fanout_publish': (lambda b, f: b.fanout_publish_call(
        'f', P, [(q, member(q)) for q in ('q', 'r')]), None),
    'declare': (lambda b, f: b.declare_call('n'), None),
    'declare-args': (lambda b, f: b.declare_call('n', LIMIT), None),
    'limits': (lambda b, f: b.limits_call('q', LIMIT), None),
    # q holds more than its limit of 5 (drop-head sets its head aside); under one of 500
    # (widened: a limited queue's publish sends all its streams, see Calls.widen)
    'publish-drop-head': (lambda b, f: b.widen(b.publish_call('q', 3, P, routed=True,
                                                              delay=Delay())),
                          lambda c: c.hset(K.args('q'), mapping=dict(zip(*[iter(LIMIT)] * 2)))),
    'publish-limited': (lambda b, f: b.widen(b.publish_call('q', 3, P, routed=True,
                                                            delay=Delay())),
                        lambda c: c.hset(K.args('q'), mapping={'x-max-length': '500'})),
    # message TTL: the queue's and the message's own, stamped on the entry or delayed value
    'publish-ttl': (lambda b, f: b.publish_call('q', 3, P, routed=True, delay=Delay(),
                                                expiration=60_000),
                    lambda c: c.hset(K.args('q'), mapping={'x-message-ttl': '600000'})),
    'publish-ttl-delayed': (lambda b, f: b.publish_call(
        'q', 6, P, delay=Delay('+600000', 1000, 'later'), expiration=0),
        lambda c: c.hset(K.args('q'), mapping={'x-message-ttl': '600000'})),
    'purge': (lambda b, f: b.purge_call('q', 2), None),
    'delete': (lambda b, f: b.delete_call('q'), None),
    'touch': (lambda b, f: b.touch_call('q', 60_000), None),
    'bind': (lambda b, f: b.bind_call('x', member('n', 'rk'), 60_000), None),
    'bind-fanout': (lambda b, f: b.bind_call('f', member('n'), 0, fanout_group='n'), None),
    'bind-unbind': (lambda b, f: b.bind_call('f', member('q'), -1, fanout_group='q'), None),
    'route': (lambda b, f: b.route_call('x', 100), None),
    'route-fanout': (lambda b, f: b.route_call('f', 100, SEP), None),
    'cancel': (lambda b, f: b.cancel_call('q', ['lbl']), None),
    'redrive': (lambda b, f: b.redrive_call('q', 10), None),
    'redrive-keyed': (lambda b, f: b.redrive_call('q', 10, keyed=[(f['letter'], 'k', '')]),
                      None),
    # a fair queue's letter is staged in its group
    'redrive-fair': (lambda b, f: b.redrive_call('q', 10, keyed=[(f['letter'], '', 'g')]),
                     lambda c: c.hset(K.args('q'), 'x-fairness', 'round-robin')),
    'reclaim': (lambda b, f: b.reclaim_call('q', 0, 100)[0], None),
    'reclaim-fanout': (lambda b, f: b.reclaim_call('q', 0, 100, exchange='f')[0], None),
    'renew': (lambda b, f: b.renew_call('q', 'c1', *f['renew']), None),
    'migrate': (lambda b, f: b.migrate_list_call('kq', 'q', 0, 10)[0], None),
    'migrate_unacked': (lambda b, f: b.migrate_unacked_call(
        'unacked', 'unacked_index', 't1', f['raw'], P, [('q', 0), ('r', 3)]), None),
    'layout': (lambda b, f: b.layout_call(), _unrecorded),
    'leave': (lambda b, f: b.leave_call('q', 'c9'), _joined_idle),
    # the settles, by the consumer that owns the entry (c1) and by an operator (ANY_OWNER)
    'ack': (lambda b, f: b.ack_calls('q', [(f['renew'][0], f['renew'][1][0])], None,
                                     'c1')[0], None),
    'ack-any': (lambda b, f: b.ack_calls('q', [(f['renew'][0], f['renew'][1][0])])[0], None),
    'ack-big': (lambda b, f: b.ack_calls('q', [(f['renew'][0], f['renew'][1][0])], None, 'c1',
                                         big=True)[0], None),
    'dlq_purge': (lambda b, f: b.dlq_purge_call('q', '9999999999999-0', 10), None),
    'requeue': (lambda b, f: b.requeue_calls('q', [(f['renew'][0], f['renew'][1][0])], None,
                                             'c1')[0], None),
    'deadletter': (lambda b, f: b.dead_letter_call('q', f['renew'][0], f['renew'][1][0],
                                                   'why', 1, None, 'c1'), None),
    'fanout_ack': (lambda b, f: b.ack_calls('q', [(K.fanout('f'), f['fanout_ids'][0])], 'f',
                                            'c1')[0], None),
    # retry backoff (x-requeue-delay): the given-back messages wait in the delayed set
    'requeue-backoff': (lambda b, f: b.requeue_calls(
        'q', [(f['renew'][0], f['renew'][1][0])], None, 'c1')[0], _backoff),
    'reclaim-backoff': (lambda b, f: b.reclaim_call('q', 0, 100)[0], _backoff),
    # x-unique-key: a free key, a taken one (refused, counted), one replacing a ready message
    'publish-unique': (lambda b, f: b.publish_call('q', 3, P, routed=True, delay=Delay(),
                                                   unique_key='new'), _unique),
    'publish-unique-delayed': (lambda b, f: b.publish_call(
        'q', 6, P, delay=Delay('+600000', 1000, 'later'), unique_key='new'), _unique),
    'publish-unique-duplicate': (lambda b, f: b.publish_call(
        'q', 3, P, routed=True, delay=Delay(), unique_key='held'), _unique),
    'publish-unique-replace': (lambda b, f: b.publish_call(
        'q', 3, P, routed=True, delay=Delay(), unique_key='held'),
        lambda c: _unique(c, 'replace')),
    'ack-unique': (lambda b, f: b.ack_calls('q', [(f['renew'][0], f['renew'][1][0])], None,
                                            'c1', unique=['held'])[0], _unique),
    'deadletter-unique': (lambda b, f: b.dead_letter_call(
        'q', f['renew'][0], f['renew'][1][0], 'why', 1, None, 'c1', 'held'), _unique),
    # x-max-in-flight: the flag raised, each settle that frees a slot lowers it, arms the marker
    'ack-capped': (lambda b, f: b.ack_calls('q', [(f['renew'][0], f['renew'][1][0])], None,
                                            'c1')[0], _capped),
    'deadletter-capped': (lambda b, f: b.dead_letter_call(
        'q', f['renew'][0], f['renew'][1][0], 'why', 1, None, 'c1'), _capped),
    'requeue-capped': (lambda b, f: b.requeue_calls(
        'q', [(f['renew'][0], f['renew'][1][0])], None, 'c1')[0], _capped),
    'reclaim-capped': (lambda b, f: b.reclaim_call('q', 0, 100)[0], _capped),
    # x-fairness: the message is staged in its group's FIFO (lua/lib/fair.lua)
    'publish-fair': (lambda b, f: b.publish_call('q', 3, P, routed=True, delay=Delay(),
                                                 group='g'), _fair),
    'purge-fair': (lambda b, f: b.purge_call('q', 2), _fair),
    'publish-fair-delayed': (lambda b, f: b.publish_call(
        'q', 6, P, delay=Delay('+600000', 1000, 'later'), group='g'), _fair),
    'publish-fair-limited': (lambda b, f: b.publish_call('q', 3, P, routed=True, delay=Delay(),
                                                         group='g'), _fair_limited),
    'wake': (lambda b, f: b.give_back_call(
        FANOUT_SOURCES, {('q', 'f'): member('q'), ('s', 'f'): member('s')}), _popped),
}

#: (case, position) whose key that call's path does not touch, so it may run with another
#: program's key there (and leaves it alone): publish checks no key it does not use, as a
#: command per publish (the first stream is only asked its TTL; the delayed keys of a queue
#: whose index says it holds none, or the stream of a message kept until due).
#: A queue without a length limit never looks at its dead-letter stream (4) nor at its
#: streams (7...) beyond the message's own; a limited one looks at all of them, since
#: it counts them and may set its head aside (its dead-letter stream only when full). Its
#: publish sends only the first stream (7) and the id store (8) (a limited queue's, widened
#: by Calls.widen, a big message's and a keyed one's send all: 7, 8 and 9, the id store 10,
#: and the counters 11, written only by a refusal or drop-head, which count there if they
#: can: another type there is left alone, the refusal or the drop is not undone).
_SHORT, _SHORT_DELAYED = {4, 6, 7}, {0, 4, 7}
_FULL, _FULL_DELAYED = {4, 6, 7, 8, 9}, {0, 4, 7, 8, 9}
_UNUSED = {'publish': _SHORT, 'publish-delayed': _SHORT_DELAYED, 'publish-big': _FULL,
           'publish-big-delayed': _FULL_DELAYED, 'publish-drop-head': {6},
           'publish-limited': {4, 6}, 'publish-ttl': _SHORT,
           'publish-ttl-delayed': _SHORT_DELAYED}
UNTOUCHED = {(case, i) for case, unused in _UNUSED.items() for i in unused}
UNTOUCHED |= {(case, 11) for case in ('publish-big', 'publish-big-delayed',
                                      'publish-drop-head', 'publish-limited')}
#: A queue without x-deduplication-window never looks at its id store; one with it does
#: what the same publish without does, and a duplicate stores nothing (not even its stream).
_STORE = {'publish': 8, 'publish-delayed': 8, 'publish-big': 10, 'publish-big-delayed': 10,
          'publish-drop-head': 10, 'publish-limited': 10, 'publish-ttl': 8,
          'publish-ttl-delayed': 8}
UNTOUCHED |= set(_STORE.items())
UNTOUCHED |= {(f'publish-dedup{tail}', i) for tail, like in (
    ('', 'publish'), ('-big', 'publish-big'), ('-delayed', 'publish-delayed'),
    ('-duplicate', 'publish')) for case, i in set(UNTOUCHED) if case == like}
UNTOUCHED.add(('publish-dedup-duplicate', 0))
#: A duplicate is refused before the marker's ZADD, which checks the marker's type itself.
UNTOUCHED.add(('publish-dedup-duplicate', 1))
#: A queue without x-requeue-delay never looks at its delayed keys in requeue and reclaim.
UNTOUCHED |= {('requeue', 4), ('reclaim', 7)}
#: With a unique key (its store at 12, all streams sent): a free key touches what the same
#: publish without one does; a taken one looks at its holder's stream (9) and stores nothing
#: (0); replacing it deletes that entry.
UNTOUCHED |= {(f'publish-unique{tail}', i) for tail, unused in (
    ('', _FULL), ('-delayed', _FULL_DELAYED), ('-duplicate', _FULL), ('-replace', _FULL))
    for i in unused | {10, 11}}
UNTOUCHED -= {('publish-unique-duplicate', 9), ('publish-unique-replace', 9)}
UNTOUCHED |= {('publish-unique-duplicate', 0), ('publish-unique-duplicate', 1)}  # 1: see above
#: A settle looks at its queue's marker (last) only when the in-flight flag is raised.
UNTOUCHED |= {('ack', 2), ('ack-any', 2), ('ack-big', 3), ('ack-unique', 3), ('deadletter', 4),
              ('deadletter-unique', 4)}
UNTOUCHED |= {('requeue-capped', 4), ('reclaim-capped', 7)}  # the delayed set: no backoff
#: The counters and the big hash (last) are looked at only while the counters keep the
#: queue's waiting bytes (x-max-length-bytes): a counters key of another type keeps none.
UNTOUCHED |= {(f'requeue{tail}', i) for tail in ('', '-backoff', '-capped') for i in (6, 7)}
UNTOUCHED |= {(f'reclaim{tail}', i) for tail in ('', '-backoff', '-capped') for i in (9, 10)}
UNTOUCHED |= {('cancel', 4), ('purge', 9), ('purge-fair', 9)}
UNTOUCHED |= {(f'redrive{tail}', i) for tail in ('-fair', '-keyed') for i in (11, 12)}
#: A staged message touches neither its stream (0) nor the others (7: only EXISTS and PTTL;
#: 8, 9), nor the dead-letter stream (4), the delayed messages (6), the id store (10), the
#: counters (11) or the key store (12, no unique key).
UNTOUCHED |= {('publish-fair', i) for i in (0, 4, 6, 7, 8, 9, 10, 11, 12)}
#: Delayed, it touches the delayed keys, the marker, the index and the staging hash (d:<member>
#: names its group): none of the streams (0, 7, 8, 9), the dead-letter stream (4), the id
#: store (10), the counters (11) or the key store (12).
UNTOUCHED |= {('publish-fair-delayed', i) for i in (0, 4, 7, 8, 9, 10, 11, 12)}
#: Limited, it counts every stream and the staging hash (their types so checked) first.
UNTOUCHED |= {('publish-fair-limited', i) for i in (4, 10, 11, 12)}
#: The big hash ends every wide layout; a message that is not big leaves it alone (with
#: x-max-length-bytes drop-head and replace mode ask the size of a big one they take out).
UNTOUCHED |= {('publish-drop-head', 12), ('publish-limited', 12)}
UNTOUCHED |= {(f'publish-unique{tail}', 13) for tail in ('', '-delayed', '-duplicate', '-replace')}
UNTOUCHED |= {(f'publish-fair{tail}', 14) for tail in ('', '-delayed', '-limited')}

_DUMMY = {'renew': (K.stream('q', 0), ['1-1']), 'raw': b'', 'fanout_ids': ['1-1'],
          'letter': '1-1'}


def _keys(name: str, facts: dict[str, Any] = _DUMMY) -> list[str]:
    """The distinct KEYS of case ``name``'s call (the layout does not depend on the state)."""
    return keys_of(CASES[name][0](Broker(None, K, LEVELS), facts))


POSITIONS = [(name, i) for name in sorted(CASES) for i in range(len(_keys(name)))]

_TAILS = [(r':\d+', 'stream'), (r':wake(:.*)?', 'zset'), (r':ready', 'set'),
          (r':delayed', 'zset'), (r':delayed:m', 'hash'), (r':dlq(:.*)?', 'stream'),
          (r':bindings', 'set'), (r':deadlines', 'zset'), (r':fanout', 'stream'),
          (r':big', 'hash'), (r':args', 'hash'), (r':counters', 'hash'), (r':dedup', 'zset'),
          (r':unique', 'hash'), (r':capped', 'string'), (r':fair', 'hash')]
_OTHERS = {'kq': 'list', 'unacked': 'hash', 'unacked_index': 'zset', K.layout(): 'string'}


def expected_type(key: str) -> str:
    """The type our layout (docs/design.rst, "Key layout") or Kombu's gives ``key``."""
    if key in _OTHERS:
        return _OTHERS[key]
    tail = key.rsplit('}', 1)[1]
    return next(kind for pattern, kind in _TAILS if re.fullmatch(pattern, tail))


def put_wrong(c: Any, key: str, kind: str) -> None:
    c.delete(key)
    {'string': lambda: c.set(key, b'someone else'),
     'list': lambda: c.rpush(key, b'someone', b'else'),
     'set': lambda: c.sadd(key, b'someone'),
     'zset': lambda: c.zadd(key, {b'someone': 1}),
     'hash': lambda: c.hset(key, b'someone', b'else'),
     'stream': lambda: c.xadd(key, {b'someone': b'else'})}[kind]()


#: The realistic states built, per server and expiring: (built at, facts, raw_dumps()).
#: Building one takes ~40 calls, restoring it one pipeline of RESTOREs, and 1,400 cases of
#: 2 examples each need it. A state older than _FRESH_S is built again: it holds absolute
#: times (delayed messages due in 10 minutes, leases' delivery times).
_STATES: dict[tuple[Any, ...], tuple[float, dict[str, Any], dict[bytes, tuple[str, Any, int]]]]
_STATES = {}
_FRESH_S = 60.0


def restored(c: Any, expiring: bool) -> dict[str, Any]:
    """An empty database given the realistic state: built once a minute, then restored."""
    c.flushall()
    where = (type(c).__name__, c.connection_pool.connection_kwargs.get('port'), expiring)
    built = _STATES.get(where)
    if built and time.monotonic() - built[0] < _FRESH_S:
        with c.pipeline(transaction=False) as pipe:
            for key, (_, value, ttl) in built[2].items():
                pipe.restore(key, max(ttl, 0), value)
            pipe.execute()
        return built[1]
    facts = realistic(c, expiring)
    _STATES[where] = (time.monotonic(), facts, raw_dumps(c))
    return facts


def raw_dumps(c: Any) -> dict[bytes, tuple[str, Any, int]]:
    """Every key of the database: (type, DUMP, ms to live), in one round trip."""
    keys = sorted(c.scan_iter(count=1000))
    with c.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
            pipe.dump(key)
            pipe.pttl(key)
        got = pipe.execute()
    return {key: (got[3 * i].decode(), got[3 * i + 1], got[3 * i + 2])
            for i, key in enumerate(keys)}


def dumped(c: Any) -> dict[bytes, tuple[str, Any, int]]:
    """Every key of the database as its DUMP (and ms to live), in two round trips: stricter
    than helpers.snapshot (any byte of a key changed counts, idle times included, which a
    call that fails on a wrong type must not touch either) and ~10 times cheaper. Sets and
    hashes are compared by their sorted content instead: a hashtable's DUMP follows its
    buckets, which a read-only lookup reorders (a step of Redis's incremental rehash)."""
    out = raw_dumps(c)
    unordered = [key for key, (kind, _, _) in out.items() if kind in ('set', 'hash')]
    with c.pipeline(transaction=False) as pipe:
        for key in unordered:
            if out[key][0] == 'set':
                pipe.smembers(key)
            else:
                pipe.hgetall(key)
        contents = pipe.execute() if unordered else []
    for key, content in zip(unordered, contents):
        kind, _, ttl = out[key]
        value = sorted(content) if kind == 'set' else sorted(content.items())
        out[key] = (kind, value, ttl)
    return out


def prepared(c: Any, name: str, expiring: bool) -> tuple[Broker, Run]:
    facts = restored(c, expiring)
    builder, prepare = CASES[name]
    if prepare:
        prepare(c)
    b = Broker(c, K, LEVELS)
    return b, builder(b, facts)


@pytest.mark.parametrize('name, position', POSITIONS)
@PROPERTY
@given(data=st.data())
def test_a_wrong_type_at_any_key_changes_nothing(script_client, name, position, data):
    c = script_client
    b, call = prepared(c, name, data.draw(st.booleans(), label='expiring'))
    key = keys_of(call)[position]
    put_wrong(c, key, data.draw(st.sampled_from(
        [t for t in TYPES if t != expected_type(key)]), label='wrong type'))
    before = dumped(c)
    try:
        run(b, call)
    except KeyTypeError as exc:
        assert 'WRONGTYPE' in str(exc)
        assert_same(before, dumped(c))
    else:  # only where the call's path never touches that key: it ran and left it alone
        assert (name, position) in UNTOUCHED, f'{key} of another type went unnoticed'
        assert dumped(c)[key.encode()] == before[key.encode()]


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('expiring', [False, True])
def test_each_call_writes_on_that_state(script_client, name, expiring):
    """Without a wrong type the same call succeeds and changes something, and the state
    holds every key with the type the layout gives it."""
    c = script_client
    b, call = prepared(c, name, expiring)
    for key in c.scan_iter(count=1000):
        assert c.type(key).decode() == expected_type(key.decode()), key
    before = snapshot(c)
    run(b, call)
    with pytest.raises(AssertionError):
        assert_same(before, snapshot(c))


def test_every_writing_script_has_a_case():
    from kombu_streams.scripts import SCRIPTS
    read_only = {'inspect', 'inspect_fanout', 'peek', 'scheduled', 'size', 'marked'}
    elsewhere = {'read'}  # see the docstring
    assert {name.split('-')[0] for name in CASES} == set(SCRIPTS) - read_only - elsewhere
