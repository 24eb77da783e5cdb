"""Noticing that Redis lost data, so that a loss is never silent.

Redis can drop what it acknowledged: a restart without persistence (or with an AOF fsynced
every second, up to a second of writes), FLUSHDB / FLUSHALL, a failover to a replica that had
not received the writes, or eviction under a ``maxmemory-policy`` other than ``noeviction``.
No consumer sees a message that is gone, so nothing would say so. The first channel of a
process records the key layout version under its prefix (``ks:layout``, see
:mod:`kombu_streams.keys`); every lease round asks for it again (layout.lua, O(1)). A record
that vanished means Redis lost data under that prefix since, and each queue this process
consumes there is named in an error, once per loss.

It is a sign, not a proof either way: a lost record with nothing else lost is reported too
(it is the least recently used key, so eviction takes it early: the warning comes before
most queues are hit), and on Redis Cluster it watches the one node that holds the record.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .channel import Channel

logger = logging.getLogger(__name__)

#: Most queues named, one error each, per loss; the rest are counted in one more line.
NAMED = 20


class LossWatch:
    """Run by the lease keeper: one layout.lua call per (server, prefix) of its channels."""

    def check(self, channels: list[Channel]) -> int:
        """Look for a vanished layout record under each prefix the channels use; returns how
        many prefixes lost it (it is recorded again, so each loss is reported once)."""
        by_prefix: dict[tuple[str, str], list[Channel]] = {}
        for channel in channels:
            try:
                where = (channel.transport.server_id, channel.keys.prefix)
            except Exception:  # closed meanwhile, or no connection: the next round
                continue
            by_prefix.setdefault(where, []).append(channel)
        lost = 0
        for (_, prefix), group in by_prefix.items():
            try:
                vanished = group[0].broker.layout_vanished()
            except Exception as exc:  # e.g. an ACL without GET/SET: the check is advisory
                logger.debug('kombu-streams: could not check the layout record: %r', exc)
                continue
            if vanished:
                lost += 1
                self._report(prefix, group)
        return lost

    @staticmethod
    def _report(prefix: str, channels: list[Channel]) -> None:
        queues = sorted({q for ch in channels for q in ch.active_queues})
        logger.error('kombu-streams: Redis lost data under key prefix %r: the layout record '
                     '%sks:layout this process saw is gone (a restart without persistence, '
                     'FLUSHDB/FLUSHALL, a failover to a replica that had not synced, or '
                     'eviction: see maxmemory-policy). Messages may have been lost; Redis '
                     'settings that avoid it are in the docs, "Reliability and Redis '
                     'settings".', prefix, prefix)
        for queue in queues[:NAMED]:
            logger.error('kombu-streams: queue %r may have lost messages (Redis lost data)',
                         queue)
        if len(queues) > NAMED:
            logger.error('kombu-streams: and %d more queues consumed here',
                         len(queues) - NAMED)


__all__ = ('LossWatch',)
