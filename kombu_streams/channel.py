"""The Kombu channel: Kombu's virtual channel with every broker operation a Lua script.

Layout per queue (see :mod:`kombu_streams.keys`): one stream per priority level, each with
one consumer group named after the queue. A delivered message stays in the stream's PEL
until it is acked (then XACK + XDEL) or requeued (its PEL record moves to a holder consumer,
so it keeps its id and priority and is served before newer messages of its level).
"""

from __future__ import annotations

import logging
import os
import socket
from itertools import count
from typing import Any
from uuid import uuid4

from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.scheduling import cycle_by_name

from .bindings import Bindings
from .broker import (
    HOLDER,
    Broker,
)
from .carried import Carrying
from .connection import socket_timeout
from .envelope import decoder as envelope_decoder
from .errors import ChannelClosed
from .keys import Keys
from .leases import Leases
from .limits import QueueFull, stored_pairs
from .options import channel_names, set_defaults
from .options import check as check_options
from .plan import ReadPlan
from .publish import MessageTooLarge, Publishing
from .settle import ACK, QoS, Settling
from .state import ConsumerState

logger = logging.getLogger(__name__)

__all__ = ('Channel', 'QoS', 'HOLDER', 'MessageTooLarge', 'QueueFull')

#: (server id, key prefix) whose key layout this process checked (Broker.check_layout).
_LAYOUT_SEEN: set[tuple[str, str]] = set()


def _queue_expires(declare_kwargs: dict[str, Any]) -> int:
    """x-expires (ms) from queue_declare's arguments, or 0."""
    try:
        return max(int(declare_kwargs['arguments']['x-expires']), 0)
    except (KeyError, TypeError, ValueError):
        return 0


class Channel(Carrying, Settling, Publishing, Bindings):
    """A Kombu channel on Redis Streams: the parts are in consume.py (reads), settle.py
    (acks, requeues, dead letters), publish.py and bindings.py; here what ties them
    together: options, queues, consumers and the channel's life."""

    QoS = QoS
    supports_fanout = True
    do_restore = True

    # Transport options: Kombu sets each one given on the channel (from_transport_options,
    # in virtual.Channel.__init__). Their defaults, rules and help are rows of the table in
    # kombu_streams/options.py, set on this class right after it; the lines here only give
    # mypy their types (tests/test_options.py checks they match the table).
    from_transport_options = channel_names(virtual.Channel.from_transport_options)
    sep: str
    priority_steps: list[int]
    queue_order_strategy: str
    visibility_timeout: float
    global_keyprefix: str
    body_encoding: str | None
    deadletter_queue: str | None
    routing_cache_ttl: float
    max_read_batch: int
    max_read_bytes: int
    purge_batch: int
    reclaim_batch: int
    max_deliveries: int
    dead_letter_rejected: bool
    publish_min_replicas: int
    publish_replica_timeout: float
    max_message_size: int | None
    big_message_bytes: int
    delayed_delivery: bool
    delayed_threshold: float
    queue_arguments: dict[str, dict[str, Any]]

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._validate_options()
        self.keys = Keys(self.global_keyprefix, cluster=connection.cluster)
        self._levels = list(self.priority_steps)
        self._queue_cycle = cycle_by_name(self.queue_order_strategy)()
        #: in-flight messages, read-ahead buffer, deferred acks, sources: their one owner
        self.consumer_state = ConsumerState()
        #: the last read took all the credit it had: more messages are probably ready
        self.more_ready = False
        #: the last read stopped on max_read_bytes (another message would not fit)
        self._bytes_cut = False
        self._no_ack_queues: set[str] = set()
        self._tags = count(1)
        self._decode_envelope = envelope_decoder()
        salt = uuid4().hex[:8]
        #: delivery tags are f'{channel id}.{n}.{salt}': unique per channel, one uuid per channel
        self._tag_suffix = f'.{salt}'
        self.consumer_name = f'{socket.gethostname()}:{os.getpid()}:{self.channel_id}:{salt}'
        #: the client of the channel's script calls: on a connection it holds while open
        #: (Transport.make_client), the shared pool's after (unpin)
        self.client = connection.make_client(pinned=True)
        self._pool_client = connection.make_client()
        self.broker = Broker(self.client, self.keys, self._levels)
        layout_seen = (connection.server_id, self.keys.prefix)
        if layout_seen not in _LAYOUT_SEEN:  # once per process, server and prefix
            self.broker.check_layout()
            _LAYOUT_SEEN.add(layout_seen)
        #: which sources a read covers (see kombu_streams.plan)
        self.plan = ReadPlan()
        #: renewal and reclaim (see kombu_streams.leases)
        self.leases = Leases(self)
        #: queue -> x-expires in ms, for the queues declared here with one
        self._expires: dict[str, int] = {}
        connection.cycle.add(self)

    @property
    def transport(self) -> Any:
        """The transport of this open channel. Kombu sets ``connection`` to None when it
        closes a channel (e.g. after a connection error); using the channel after that raises
        :class:`~kombu_streams.errors.ChannelClosed`, a connection error Kombu's ``ensure()``
        and Celery recover from (reconnect, revive), never an AttributeError."""
        transport = self.connection
        if transport is None:
            raise ChannelClosed(f'kombu-streams: channel {self.channel_id} is closed')
        return transport

    @property
    def state(self) -> Any:
        """Kombu's exchange and binding state, from the transport (ChannelClosed once the
        channel is closed)."""
        return self.transport.state

    def _validate_options(self) -> None:
        """Check the options as this channel got them (the transport checked what was
        given; this also covers what was set on it since, and a subclass's own values),
        then the rules that tie an option to another or to the connection."""
        check_options({name: getattr(self, name) for name in self.from_transport_options})
        if self.global_keyprefix is None:  # as Kombu's Redis transport takes it: no prefix
            self.global_keyprefix = ''
        if self.publish_min_replicas and self.connection.cluster:
            raise ValueError('kombu-streams: publish_min_replicas is not supported on Redis '
                             'Cluster yet (a resent call would go unconfirmed)')
        if self.publish_min_replicas:
            timeout = socket_timeout(self.connection.pool)
            if timeout and self.publish_replica_timeout >= timeout:
                raise ValueError(
                    f'kombu-streams: publish_replica_timeout ({self.publish_replica_timeout} s) '
                    f'must be shorter than socket_timeout ({timeout} s): a publish waiting '
                    f'that long for replicas would end in a TimeoutError, not NotReplicated')

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self.broker.declare(queue, self._limit_arguments(queue, kwargs))
        expires = _queue_expires(kwargs)
        if expires:
            self._expires[queue] = expires
            self.broker.touch(queue, expires)
        else:
            self._expires.pop(queue, None)

    def _limit_arguments(self, queue: str, declare_kwargs: dict[str, Any]) -> list[str]:
        """The limit arguments this declare records or checks (kombu_streams/limits.py): the
        Queue's own (``queue_arguments``), else the transport option's for this queue; none
        of either: the declare takes what the queue has in Redis."""
        pairs = stored_pairs(queue, declare_kwargs.get('arguments'))
        return pairs or stored_pairs(queue, self.queue_arguments.get(queue))

    def refill_low(self) -> bool:
        """Whether a read now would take less than half of the prefetch limit (and of
        max_read_batch) while the application holds the rest: the event loop may then wait
        for more credit before it reads (see kombu_streams.hubloop). Never without a limit,
        nor when can_consume was replaced (Celery's worker_disable_prefetch: each message
        is taken only when a process is free)."""
        qos = self.qos
        limit = qos.prefetch_count
        if not limit or 'can_consume' in vars(qos):
            return False
        credit = qos.can_consume_max_estimate() or 0
        return 0 < credit < min(limit / 2, self.max_read_batch)

    def keeper_interval(self) -> float:
        """Seconds between two lease-keeper rounds this channel needs."""
        periods = [float(self.visibility_timeout)]
        periods += [self._expires[q] / 1000.0 for q in self.active_queues if q in self._expires]
        return min(periods) / 3.0

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.broker.exists(queue)

    def _size(self, queue: str) -> int:
        return self.broker.size(queue)

    def _purge(self, queue: str) -> int:
        return self.broker.purge(queue, self.purge_batch)

    def _delete(self, queue: str, exchange: str, routing_key: str, pattern: str,
                *args: Any, **kwargs: Any) -> None:
        self._unbind(exchange, routing_key, pattern, queue)

    def queue_delete(self, queue: str, if_unused: bool = False, if_empty: bool = False,
                     **kwargs: Any) -> None:
        """Delete the queue in Redis even when this process never declared or bound it."""
        if if_empty and self._size(queue):
            return
        super().queue_delete(queue, if_unused=if_unused, if_empty=False, **kwargs)
        self.broker.delete(queue)

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        self._queue_cycle.update(self.active_queues)
        self.bindings_changed()
        self.transport.leases.start()  # consumers reclaim their queues' stalled messages
        return result

    def basic_cancel(self, consumer_tag: str) -> Any:
        try:
            self.flush_acks()  # no read of this consumer may come to carry them
        except Exception as exc:  # kept: sent later, or the messages come back (at least once)
            logger.warning('kombu-streams: could not send acks at cancel: %r', exc)
        if self.connection is not None:  # what a wait's read took comes to the buffer
            self.connection.cycle.end_carried(self)
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._return_buffered(queue)
        self._queue_cycle.update(self.active_queues)
        before = self.consumer_state.reading
        self.bindings_changed()
        dropped = self.plan.forget(self.consumer_state.reading.sources)
        if dropped:
            try:  # popped, and now no read of this channel will cover them: give them back
                self.give_back([s for s in before.sources if s in dropped], before.bindings)
            except Exception as exc:  # the sweep of another consumer will find its work
                logger.warning('kombu-streams: could not give back wake-ups: %r', exc)
        return result

    @property
    def active_queues(self) -> list[str]:
        return list(dict.fromkeys(self._active_queues))

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        self.consumer_state.join(self._sources([queue]))
        delivered = self._read([queue], 1, planned=False)
        if not delivered:
            return None
        message = self.Message(delivered[0][0], channel=self)
        if no_ack:
            self._settle([message.delivery_tag], ACK)
        else:
            self.qos.append(message, message.delivery_tag)
        return message

    def close(self) -> None:
        if not self.closed:
            healthy = True  # the connection answered at close: worth leaving the groups
            try:
                self.flush_acks()
            except Exception as exc:  # kept; the lease keeper sends them later
                healthy = False
                logger.warning('kombu-streams: acks not sent at close, retrying later: %r', exc)
                self.connection.leases.adopt(self)
            # first: the waits end, and what a read they carried took comes to the buffer
            self.connection.cycle.discard(self)
            try:
                self._return_buffered()
            except Exception as exc:  # they stay in the PEL and are reclaimed later
                healthy = False
                logger.warning('kombu-streams: could not requeue buffered messages: %r', exc)
            super().close()  # cancels the consumers, gives back what was delivered
            if healthy:  # else no more waiting on a broken connection: reclaim forgets it
                self._leave()
            self.unpin()
        else:
            super().close()

    def unpin(self, forked: bool = False) -> None:
        """Give the connection the channel's script calls held back to the pool: calls made
        after (the lease keeper's, for acks it adopted) check one out each. Under the
        client's lock, which a call of the lease keeper's thread may hold. ``forked``: in a
        child process, the parent's connection and lock are only dropped (the lock may be
        held by a thread the child does not have; the transport disconnects the pool)."""
        pinned = self.client
        self.client = self.broker.client = self._pool_client
        lock = getattr(pinned, 'single_connection_lock', None)  # None: a pool's client
        if lock is None or pinned is self._pool_client or forked:
            return
        with lock:
            pinned.close()

    def _leave(self) -> None:
        """This channel's consumer leaves the groups it read, where it owns nothing now
        (leave.lua), so consumer lists do not grow by one per closed channel. What it could
        not leave (no connection, a message still owned) reclaim forgets later."""
        joined = self.consumer_state.joined()
        if not joined:
            return
        try:
            self.broker.leave(joined, self.consumer_name)
        except Exception as exc:
            logger.debug('kombu-streams: could not leave the groups at close: %r', exc)


# The channel options' defaults, from the table (see the option block of Channel).
set_defaults(Channel)
