"""Helpers the test modules share (``from helpers import ...``, as with conftest).

* ``read_messages(broker, queues, consumer, count, ...)`` -- one read.lua call, as the
  transport lays it out (``Broker.read_call``), returning its deliveries
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kombu_streams.broker import READ, WALK, Broker, Delivery


def read_messages(broker: Broker, queues: Sequence[str], consumer: str, count: int,
                  max_deliveries: int = 0, fanout: dict[str, Iterable[str]] | None = None,
                  ttls: dict[str, int] | None = None, walk: bool = False,
                  hints: dict[tuple[str, str | None], int] | None = None) -> list[Delivery]:
    """Deliver up to ``count`` messages across ``queues``, highest priority first.

    ``fanout`` maps a queue to the fanout exchanges it is bound to: their streams are read
    (through the queue's group) before the queue's own. ``ttls`` gives the x-expires of
    expiring queues, for their markers. ``walk``: look at every stream, not only those the
    queues' ready indexes name, and rebuild the indexes (a repair). ``hints``: per source,
    the size read.lua expects of its entries, as a channel learns it (unknown: the first
    batch of a stream is one entry).
    """
    sources = broker.sources(queues, fanout)
    mode = WALK if walk else READ
    call, parse = broker.read_call(sources, consumer, count, max_deliveries, ttls,
                                   {src: mode for src in sources}, hints=hints)
    return parse(broker.run(call)).deliveries
