"""What the scripts answer, decoded: the types the Broker's reply decoders return."""

from __future__ import annotations

from typing import Any, NamedTuple

from .state import Source


def _id_order(entry_id: Any) -> tuple[int, int]:
    """A stream id ("ms-seq", str or bytes) as numbers, for sorting."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition('-')
    return int(ms), int(seq or 0)


class Delivery(NamedTuple):
    """One message handed out by read.lua."""

    queue: str
    level: int
    stream: str
    entry_id: bytes
    deliveries: int
    payload: bytes
    #: the fanout exchange it came through, or None for the queue's own streams
    exchange: str | None = None
    #: a big message's token (its body is in the queue's big hash; ``payload`` is b'' until
    #: :meth:`~kombu_streams.broker.Broker.bodies` fetched it), None for one stored inline
    token: bytes | None = None


class ReadResult(NamedTuple):
    """What one read.lua call did."""

    deliveries: list[Delivery]
    #: per source: '1' may hold more ready messages, '0' nothing ready (or nothing its
    #: x-rate-limit lets out now), '-' not reached (the count ran out first), 'e' met a
    #: problem
    status: dict[Source, str]
    #: (source, error) for errors on a source's keys (another program's key at our names)
    problems: list[tuple[Source, str]]
    #: (source, stream key, entry id, reason) of entries moved to the dead-letter stream
    aside: list[tuple[Source, str, bytes, str]]
    #: per queue source the read opened: ms until its next delayed message is due (0: due
    #: now), -1: none delayed; for a queue its x-rate-limit held back, the earlier of that
    #: and its next slot
    dues: dict[Source, int] = {}
    #: per source: acks that rode along and were left alone, as the consumer no longer owns
    #: those entries (its lease ran out and another consumer took them)
    unsettled: dict[Source, int] = {}


class Reclaimed(NamedTuple):
    """What one reclaim.lua call did."""

    moved: int
    #: the budget ran out before every stopped consumer's messages were moved: call again
    more: bool
    #: ms until some live consumer's lease could run out at the earliest (-1: none owned)
    next_ms: int
    #: where the sweep goes on, per stream ('-': it reached the end)
    cursors: list[str]


class Ready(NamedTuple):
    """One ready message as peek.lua sees it, not delivered."""

    level: int
    stream: str
    entry_id: str
    #: parked with the holder (requeued or reclaimed): served before fresh ones of its level
    requeued: bool
    #: the entry's ``m`` field (a big message's body, fetched); b'' when it has none (a read
    #: sets such entries aside) or a big message's body is gone
    payload: bytes
    #: a big message's token in the queue's big hash, None for one stored inline
    token: bytes | None = None
    #: staged (x-fairness): waiting for its group's turn, with no entry yet (``entry_id``
    #: '', ``stream`` the level's stream a read will move it into)
    staged: bool = False


__all__ = ('Delivery', 'ReadResult', 'Reclaimed', 'Ready')
