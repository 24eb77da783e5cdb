"""EVALSHA in the Redis protocol, packed here: the hot calls' bytes without redis-py's packer.

Every message a channel publishes, reads or acks is one EVALSHA, and redis-py packs each
argument anew through its encoder (a method call, type checks and a quadratic buffer per
argument). Here the part of a call that repeats (the command, the SHA, the number of keys and
the keys: a read's or publish's KEYS are the same for every call of the same layout) is packed
once and kept, and only the ARGV is packed per call, with redis-py's encoder's rules for
UTF-8/strict (its default): str as UTF-8, bytes as they are, int as its decimal text, float
as its ``repr``. Any other argument (a bool, which redis-py refuses; a str or int subclass,
whose text redis-py takes from ``repr``; a memoryview) gives None, and the caller sends the
call the plain way, where redis-py applies its own rules. The bytes sent are those redis-py
would send (tests/test_packing.py compares them). Nothing here talks to Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ('pack_evalsha', 'HEADS_KEPT')

#: Most packed heads kept (one per script and set of KEYS: a channel uses a handful of read
#: layouts and one publish layout per queue and level); past it they are dropped and packed
#: again as needed.
HEADS_KEPT = 256

_heads: dict[tuple[Any, ...], bytes] = {}


def _arg(value: Any) -> bytes | None:
    kind = type(value)
    if kind is str:
        return value.encode()
    if kind is bytes:
        return value
    if kind is int:
        return b'%d' % value
    if kind is float:
        return repr(value).encode()
    return None


def _head(command: str, sha: str, keys: Sequence[Any]) -> bytes | None:
    """The bytes of a call after its ``*N`` line and before its ARGV: kept per script and
    KEYS."""
    try:
        cache_key = (command, sha, *keys)
        head = _heads.get(cache_key)
    except TypeError:  # an unhashable key: not ours, pack it the plain way
        return None
    if head is None:
        parts = [b'$%d\r\n%s\r\n' % (len(command), command.encode()),
                 b'$%d\r\n%s\r\n' % (len(sha), sha.encode())]
        for value in (len(keys), *keys):
            packed = _arg(value)
            if packed is None:
                return None
            parts.append(b'$%d\r\n%s\r\n' % (len(packed), packed))
        head = b''.join(parts)
        # kept only for keys of text: a number equal to another (1, 1.0, True) would match
        # its packed bytes here, where redis-py packs (or refuses) each of them differently
        if all(type(key) is str or type(key) is bytes for key in keys):
            if len(_heads) >= HEADS_KEPT:
                _heads.clear()
            _heads[cache_key] = head
    return head


def pack_evalsha(command: str, sha: str, keys: Sequence[Any], args: Sequence[Any]
                 ) -> bytes | None:
    """``command`` (EVALSHA or EVALSHA_RO) of script ``sha`` with ``keys`` and ``args``, as
    the bytes redis-py would send with a UTF-8/strict encoder; None if an argument is of a
    type these rules do not cover (send the call the plain way then)."""
    head = _head(command, sha, keys)
    if head is None:
        return None
    parts = [b'*%d\r\n' % (3 + len(keys) + len(args)), head]
    append = parts.append
    for value in args:
        kind = type(value)
        if kind is str:
            packed = value.encode()
        elif kind is bytes:
            packed = value
        elif kind is int:
            packed = b'%d' % value
        else:
            packed = _arg(value)
            if packed is None:
                return None
        append(b'$%d\r\n' % len(packed))
        append(packed)
        append(b'\r\n')
    return b''.join(parts)
