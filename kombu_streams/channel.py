"""The Kombu channel: Kombu's virtual channel with every broker operation a Lua script.

Layout per queue (see :mod:`kombu_streams.keys`): one stream per priority level, each with
one consumer group named after the queue. A delivered message stays in the stream's PEL
until it is acked (then XACK + XDEL) or requeued (its PEL record moves to a holder consumer,
so it keeps its id and priority and is served before newer messages of its level).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterable
from itertools import count
from time import monotonic
from typing import Any
from uuid import uuid4

from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.scheduling import cycle_by_name

from . import due, envelope, options
from .batch import PublishBatch
from .broker import (
    CHUNK,
    HOLDER,
    READ,
    Broker,
    Delay,
    Delivery,
    ReadResult,
    Source,
    warn_unsettled,
)
from .compat import BATCH_PUBLISH
from .connection import socket_timeout
from .errors import ChannelClosed
from .keys import Keys
from .leases import ACK_DELAY, Leases
from .options import level_for
from .plan import ReadPlan
from .routing import TABLES, binding_member, parse_members
from .scripts import Call, run_calls
from .state import ConsumerState, InFlight, Reading, by_source

logger = logging.getLogger(__name__)

__all__ = ('Channel', 'QoS', 'HOLDER', 'MessageTooLarge')

#: How _settle disposes of messages.
ACK, REQUEUE, DEAD_LETTER = 'ack', 'requeue', 'dead-letter'

#: Messages per read when the channel has no prefetch limit.
UNLIMITED_READ = 10

#: Deferred acks are sent, at the latest, when this many wait (see :meth:`Channel._ack`).
ACK_BATCH = 100

#: (server id, key prefix) whose key layout this process checked (Broker.check_layout).
_LAYOUT_SEEN: set[tuple[str, str]] = set()


class MessageTooLarge(ValueError):
    """A message larger than the transport or the server takes: it was not published."""


def _queue_expires(declare_kwargs: dict[str, Any]) -> int:
    """x-expires (ms) from queue_declare's arguments, or 0."""
    try:
        return max(int(declare_kwargs['arguments']['x-expires']), 0)
    except (KeyError, TypeError, ValueError):
        return 0


class QoS(virtual.QoS):
    """Prefetch accounting plus ack / reject / restore, each a script call.

    Messages read from Redis but not yet handed to the application (the channel's buffer)
    count against the prefetch limit, so a channel never holds more than it was allowed.
    """

    def _in_use(self) -> int:
        return len(self._delivered) - len(self._dirty) + self.channel.consumer_state.buffered()

    def can_consume(self) -> bool:
        pcount = self.prefetch_count
        return not pcount or self._in_use() < pcount

    def can_consume_max_estimate(self) -> int | None:
        pcount = self.prefetch_count
        if pcount:
            return max(pcount - self._in_use(), 0)
        return None

    def ack(self, delivery_tag: str) -> None:
        self.channel._ack(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel._requeue_delivered([delivery_tag])
        else:
            mode = DEAD_LETTER if self.channel.dead_letter_rejected else ACK
            self.channel._settle([delivery_tag], mode)
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Requeue every delivered, unacked message in one script call per queue."""
        self._flush()
        tags = list(self._delivered)
        errors: list[tuple[BaseException, Any]] = []
        try:
            self.channel._settle(tags, REQUEUE)
        except Exception as exc:  # the messages stay in the PEL: reclaim will bring them back
            errors = [(exc, self._delivered[tag]) for tag in tags]
        self._delivered.clear()
        return errors


class Channel(virtual.Channel):
    """A Kombu channel on Redis Streams."""

    QoS = QoS
    supports_fanout = True
    do_restore = True

    # Transport options: Kombu sets each one given on the channel (from_transport_options,
    # in virtual.Channel.__init__). Their defaults, rules and help are rows of the table in
    # kombu_streams/options.py, set on this class right after it; the lines here only give
    # mypy their types (tests/test_options.py checks they match the table).
    from_transport_options = options.channel_names(virtual.Channel.from_transport_options)
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
    delayed_delivery: bool
    delayed_threshold: float

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
        salt = uuid4().hex[:8]
        #: delivery tags are f'{channel id}.{n}.{salt}': unique per channel, one uuid per channel
        self._tag_suffix = f'.{salt}'
        self.consumer_name = f'{socket.gethostname()}:{os.getpid()}:{self.channel_id}:{salt}'
        self.client = connection.make_client()
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
        options.check({name: getattr(self, name) for name in self.from_transport_options})
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

    # -- publishing ------------------------------------------------------------------------

    def _level(self, message: dict[str, Any]) -> int:
        """Priority level as Kombu's Redis transport picks it: 0 is served first."""
        return level_for(self._levels, self._get_message_priority(message, reverse=False))

    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str,
                      **kwargs: Any) -> Any:
        if exchange:  # copies routed to bound queues never recreate a deleted queue
            kwargs['_routed'] = True
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    def _payload(self, message: dict[str, Any]) -> str:
        """The message as stored, refused before it is sent when it is larger than
        ``max_message_size`` or than the server takes in one command (proto-max-bulk-len):
        sending it anyway ends in a dropped connection after the client built and sent it all.
        The body is checked first, so a huge body is refused before its envelope is built."""
        limit = self.transport.bulk_limit
        if self.max_message_size:
            limit = min(limit, self.max_message_size)
        body = message.get('body')
        size = len(body) if isinstance(body, (str, bytes)) else 0
        payload = None
        if size <= limit:
            payload = dumps(message)
            size = len(payload)
        if payload is None or size > limit:
            raise MessageTooLarge(
                f'kombu-streams: message of {size} bytes (encoded) not published: the limit is '
                f'{limit} bytes (transport option max_message_size, or the server\'s '
                f'proto-max-bulk-len)')
        return payload

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self._publish(self.broker.publish_call(queue, self._level(message),
                                               self._payload(message),
                                               routed=kwargs.get('_routed', False),
                                               delay=self._delay(message)), kwargs)

    def _delay(self, message: dict[str, Any]) -> Delay | None:
        """When the message is due, for publish.lua; None with delayed delivery off."""
        if not self.delayed_delivery:
            return None
        at, label = due.when(message)
        return Delay(at, int(self.delayed_threshold * 1000), label)

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str,
                    **kwargs: Any) -> None:
        """One entry in the exchange's stream; every bound queue reads it with its group."""
        bindings = sorted({(queue, self._binding_member(rk, pattern, queue))
                           for rk, pattern, queue in self.get_table(exchange)})
        if not bindings:
            return  # like AMQP: a fanout exchange with no queue drops the message
        self._publish(self.broker.fanout_publish_call(exchange, self._payload(message),
                                                      bindings),
                      kwargs)

    def _publish(self, call: Call, kwargs: dict[str, Any]) -> None:
        """Run a publish call now, or add it to the ``Producer.batch()`` being built."""
        batch = kwargs.get('_publish_batch')
        if batch is not None:
            batch.add(*call)
        else:
            wait = self._replica_wait()
            if wait:
                run_calls(self.client, [call], wait=wait)
            else:
                script, keys, args = call
                script(self.client, keys, args)

    def _replica_wait(self) -> tuple[int, int] | None:
        """WAIT arguments for publishes, or None."""
        if not self.publish_min_replicas:
            return None
        # at least 1 ms: WAIT n 0 would block for ever
        return (int(self.publish_min_replicas),
                max(math.ceil(self.publish_replica_timeout * 1000), 1))

    if BATCH_PUBLISH:  # Kombu 5.7+: Producer.batch() asks for this (see compat.py)
        def create_publish_batch(self, max_size: int) -> PublishBatch:
            return PublishBatch(self, max_size)

    # -- routing tables, shared in Redis ----------------------------------------------------

    def _route_key(self, exchange: str) -> tuple[str, str]:
        return (self.transport.server_id, self.keys.bindings(exchange))

    def get_table(self, exchange: str) -> list[tuple[str, ...]]:
        def read() -> list[tuple[str, ...]]:
            members = self.broker.route(
                exchange, fanout_sep=self.sep if self._is_fanout(exchange) else None)
            return parse_members(self.sep, members)

        return TABLES.get(self._route_key(exchange), self.routing_cache_ttl, read)

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        """Route with the cached table; when it finds no queue, read the table again first:
        the binding may be newer than the cache (Celery binds a fresh reply queue for each
        remote-control call, and the worker answers it at once)."""
        if exchange:
            cache_key = self._route_key(exchange)
            if TABLES.cached(cache_key):
                try:
                    found = self.typeof(exchange).lookup(
                        self.get_table(exchange), exchange, routing_key, None)
                except KeyError:
                    found = []
                if not found:
                    TABLES.forget(cache_key)
        return super()._lookup(exchange, routing_key, default)

    def _is_fanout(self, exchange: str) -> bool:
        return self.typeof(exchange).type == 'fanout'

    def bindings_changed(self) -> None:
        """Work out again what this channel reads: its consumed queues, and their groups on
        the fanout exchanges they were bound to through this connection (as Kombu's Redis
        transport subscribes only to what it bound itself). Run when consumers or bindings
        change (on any channel of the connection: Kombu's binding state is the
        transport's), not on every read or loop turn; the lease keeper reads the result."""
        queues = self.active_queues
        bindings = {q: tuple(tuple(b) for b in self.state.queue_bindings(q)) for q in queues}
        fanout = {q: self._fanout_of(q) for q in queues}
        sources = tuple(self.broker.sources(queues, fanout))
        self.consumer_state.set_reading(Reading(sources, fanout, bindings))

    def _bindings_changed_everywhere(self) -> None:
        for channel in list(self.transport.channels):
            if not channel.closed:
                channel.bindings_changed()

    def _binding_member(self, routing_key: str, pattern: str, queue: str) -> str:
        return binding_member(self.sep, routing_key, pattern, queue)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        member = self._binding_member(routing_key, pattern, queue)
        fanout = self._is_fanout(exchange)
        self.broker.bind(exchange, member, self._expires.get(queue, 0),
                         fanout_group=queue if fanout else None)
        TABLES.forget(self._route_key(exchange))
        self._bindings_changed_everywhere()

    def queue_unbind(self, queue: str, exchange: str | None = None, routing_key: str = '',
                     arguments: Any = None, **kwargs: Any) -> None:
        exchange = exchange or 'amq.direct'
        self.state.binding_delete(queue, exchange, routing_key)
        _, pattern, _ = self.typeof(exchange).prepare_bind(
            queue, exchange, routing_key, arguments)
        self._unbind(exchange, routing_key, pattern, queue)

    def _unbind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        fanout = self._is_fanout(exchange)
        self.broker.bind(exchange, self._binding_member(routing_key, pattern, queue), -1,
                         fanout_group=queue if fanout else None)
        TABLES.forget(self._route_key(exchange))
        self._bindings_changed_everywhere()

    # -- queues -------------------------------------------------------------------------------

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self.broker.declare(queue)
        expires = _queue_expires(kwargs)
        if expires:
            self._expires[queue] = expires
            self.broker.touch(queue, expires)
        else:
            self._expires.pop(queue, None)

    def keep_expiring_queues(self) -> None:
        """Refresh the expiry of the expiring queues this channel consumes, and of their
        bindings (run by the lease keeper, at a third of the shortest x-expires)."""
        for queue, bound in self.consumer_state.reading.bindings.items():
            ttl = self._expires.get(queue)
            if not ttl:
                continue
            self.broker.touch(queue, ttl)
            for exchange, routing_key, args in bound:
                _, pattern, _ = self.typeof(exchange).prepare_bind(
                    queue, exchange, routing_key, args)
                self.broker.bind(exchange, self._binding_member(routing_key, pattern, queue),
                                 ttl, fanout_group=queue if self._is_fanout(exchange) else None)

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

    # -- consuming ---------------------------------------------------------------------------

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

    def give_back(self, sources: list[Source],
                  bindings: dict[str, tuple[tuple[str, str, Any], ...]] | None = None) -> None:
        """Set the popped wake markers of ``sources`` again (wake.lua, one call per slot
        group), each only where its source still exists and with its expiry: a fanout
        group's marker expires with its binding (from ``bindings``, default the ones read
        now), as a publish sets it."""
        members: dict[Source, str] = {}
        if bindings is None:
            bindings = self.consumer_state.reading.bindings
        for queue, exchange in sources:
            for ex, routing_key, args in bindings.get(queue, ()) if exchange else ():
                if ex == exchange and self.connection is not None:
                    _, pattern, _ = self.typeof(ex).prepare_bind(queue, ex, routing_key, args)
                    members[(queue, ex)] = self._binding_member(routing_key, pattern, queue)
        self.broker.give_back(sources, members)

    @property
    def active_queues(self) -> list[str]:
        return list(dict.fromkeys(self._active_queues))

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        delivered = self._read([queue], 1, planned=False)
        if not delivered:
            return None
        message = self.Message(delivered[0][0], channel=self)
        if no_ack:
            self._settle([message.delivery_tag], ACK)
        else:
            self.qos.append(message, message.delivery_tag)
        return message

    def _sources(self, queues: list[str]) -> list[Source]:
        """What a read of ``queues`` covers, in serving order. A queue read without being
        consumed (basic_get) has its fanout groups looked up now."""
        fanout = self.consumer_state.reading.fanout
        if any(q not in fanout for q in queues):
            fanout = {**fanout, **{q: self._fanout_of(q) for q in queues if q not in fanout}}
        return self.broker.sources(queues, fanout)

    def _fanout_of(self, queue: str) -> tuple[str, ...]:
        return tuple(sorted({ex for ex, _, _ in self.state.queue_bindings(queue)
                             if self._is_fanout(ex)}))

    def wake_keys(self) -> dict[str, Source]:
        """Wake marker -> source, for what this channel would read now (nothing while it is
        at its prefetch limit): its queues, and their groups on fanout exchanges, but not
        those suspended for a broken key."""
        if not self._consumers or self.closed or not self.qos.can_consume():
            return {}
        return {self.broker.wake(q, ex): (q, ex)
                for q, ex in self.plan.live(self.consumer_state.reading.sources)}

    def due_in(self) -> float | None:
        """Seconds until a delayed message of a source this channel would read now is due,
        as its reads have told (0: due already); None when none is known."""
        if not self.plan.due or not self._consumers or self.closed:
            return None
        at = self.plan.next_due(self.plan.live(self.consumer_state.reading.sources))
        return None if at is None else max(at - monotonic(), 0.0)

    def woke(self, key: str) -> bool:
        """The poller popped wake marker ``key``: read its source next. False when it is
        not one of this channel's."""
        source = self.wake_keys().get(key)
        if source is None:
            return False
        self.plan.woke(source)
        return True

    def marked(self, keys: set[str]) -> None:
        """These wake markers of this channel were seen set (the poller's look at the
        queues it has no wait for, on Redis Cluster): read their sources next."""
        wakes = self.wake_keys()
        self.plan.marked([wakes[k] for k in keys if k in wakes])

    def unread_wake(self, key: str) -> bool:
        """Whether the marker ``key`` this channel was woken by is still unread (no read
        came to cover its source: the channel ran out of credit); it is then forgotten, and
        the caller gives the wake-up back."""
        for source in list(self.plan.woken):
            if self.broker.wake(*source) == key:
                self.plan.woken.discard(source)
                return True
        return False

    def check_wakes(self) -> None:
        """A wait failed with WRONGTYPE: find which of this channel's markers holds another
        type, and suspend its source."""
        keys = self.wake_keys()
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        for (key, source), kind in zip(keys.items(), pipe.execute()):
            kind = bytes_to_str(kind)
            if kind not in ('zset', 'none'):
                self.plan.suspend(source, f'WRONGTYPE {key} holds a {kind}, not a zset')

    def next_delivery(self) -> tuple[dict[str, Any], str] | None:
        """The next message for the application: from the buffer, or read from Redis."""
        state = self.consumer_state
        if not state.buffered() and self._consumers and not self.closed:
            credit = self._credit()
            queues = self._queue_cycle.consume(len(self.active_queues))
            if credit > 0 and queues:
                got = self._read(queues, credit)
                self.more_ready = len(got) >= credit or self._bytes_cut
                state.buffer(got)
        if state.acks_due(ACK_BATCH, ACK_DELAY):
            self.flush_acks()  # the buffer may last: acks do not wait for the next read
        while True:
            item = state.next_buffered()
            if item is None:
                return None
            message, queue = item
            try:
                confirmed = self.leases.confirm(message['properties']['delivery_tag'])
            except BaseException:  # e.g. no connection: it stays first in the buffer
                state.unread(item)
                raise
            if confirmed:
                break  # else its lease was lost: another consumer has it now
        self._queue_cycle.rotate(queue)
        if queue in self._no_ack_queues:  # no_ack: settled the moment it is handed over
            self._settle([message['properties']['delivery_tag']], ACK)
        return message, queue

    def _credit(self) -> int:
        """How many messages the next read may take."""
        qos = self.qos
        if not qos.can_consume():
            return 0
        if 'can_consume' in vars(qos):
            # can_consume was replaced on this instance (Celery's worker_disable_prefetch
            # does so, to take a message only when a pool process is free): honour it
            # message by message, as Kombu's Redis transport does with one BRPOP each.
            return 1
        credit = qos.can_consume_max_estimate()
        return min(UNLIMITED_READ if credit is None else credit, self.max_read_batch)

    def _read(self, queues: list[str], credit: int, planned: bool = True
              ) -> list[tuple[dict[str, Any], str]]:
        """Run read.lua over ``queues`` and decode what it delivered.

        ``planned``: cover the sources the read plan picks, each in its mode (see
        :mod:`kombu_streams.plan`); else read them all. One script call covers them, on one
        Redis; on Redis Cluster one call per hash slot, in serving order, each taking what
        credit and bytes (``max_read_bytes``) the ones before it left. Deferred acks ride
        along with the first call. If anything fails after messages were read, they go to
        the buffer (handed out next, or requeued at close) before the error is raised, and
        unsent acks are put back: nothing read is stranded, no ack dropped."""
        self.transport  # noqa: B018 (raises ChannelClosed on a closed channel)
        out: list[tuple[dict[str, Any], str]] = []
        sources = self._sources(queues)
        modes = self.plan.modes(sources) if planned else {s: READ for s in sources}
        groups = self.broker.slot_groups([s for s in sources if s in modes])
        mergeable = (self.broker.ack_merges(groups[0])
                     if self.consumer_state.has_acks() and groups and credit > 0 else set())
        acks, calls, merged = self._ack_calls(mergeable)
        budget, expect = int(self.max_read_bytes), 0
        self._bytes_cut = False
        try:
            for group in groups:
                if credit <= 0 or budget <= 0:
                    break
                read, parse = self.broker.read_call(
                    group, self.consumer_name, credit, self.max_deliveries, self._expires,
                    modes, [(stream, entry_id) for _, stream, entry_id in merged],
                    max_bytes=budget, hints=self.plan.sizes)
                merged = []
                sent_at = monotonic()  # the leases start when the read runs, not after
                reply, failed = self._send_read(calls + [read], acks)
                acks, calls = [], []
                result = parse(reply)
                for delivery in result.deliveries:  # as read.lua counts: field m and payload
                    size = len(delivery.payload) + 1
                    budget -= size
                    expect = max(expect, size, self.plan.sizes.get(
                        (delivery.queue, delivery.exchange), 0))
                self._bytes_cut = budget < expect  # read.lua stops so (see its batch())
                self._learn(modes, result)
                for delivery in result.deliveries:
                    credit -= 1
                    message = self._decode(delivery)
                    if message is None:
                        continue
                    tag = message['properties']['delivery_tag']
                    self.consumer_state.hold(tag, InFlight(delivery.queue, delivery.stream,
                                                  delivery.entry_id, delivery.deliveries,
                                                  delivery.exchange, sent_at))
                    out.append((message, delivery.queue))
                if failed is not None:
                    raise failed
            if calls or merged:  # no read ran (no credit): the acks go on their own
                self._send_acks(acks, calls + self._merged_calls(merged))
        except BaseException:
            self.consumer_state.buffer(out)
            raise
        finally:
            if out and self.connection is not None:
                self.connection.leases.start()
        return out

    def _learn(self, modes: dict[Source, str], result: ReadResult) -> None:
        """Take in a read's news: the plan's source states, and a log line for each entry
        read.lua set aside (it cannot log) and for acks that rode along but found their
        lease lost (one line per queue)."""
        self.plan.learn(modes, result)
        for (queue, _), stream, entry_id, reason in result.aside:
            logger.warning('kombu-streams: moved entry %s of %s to the dead-letter stream of '
                           '%r: %s', bytes_to_str(entry_id), stream, queue, reason)
        for (queue, _), left_alone in result.unsettled.items():
            warn_unsettled(queue, left_alone, ACK)

    def _send_read(self, calls: list[Call], acks: list[InFlight]
                   ) -> tuple[Any, BaseException | None]:
        """Send ack calls and the read (last, with the acks that ride inside it) in one round
        trip: (the read's reply, the first ack error). Acks whose call failed, or that may not
        have been sent, are put back (sending an ack twice is harmless); an error of the read
        itself is raised. Acks left alone (lease lost) are logged."""
        if len(calls) == 1:  # the read, perhaps with acks inside it
            script, keys, args = calls[0]
            try:
                return script(self.client, keys, args), None
            except Exception:
                self._put_back(acks)
                raise
        try:
            results = run_calls(self.client, calls, raise_errors=False)
        except Exception:
            self._put_back(acks)
            raise
        self.broker.settled(calls[:-1], results[:-1], ACK)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:  # an ack call or the read (which may carry acks) failed
            self._put_back(acks)
        if isinstance(results[-1], Exception):
            raise results[-1]
        return results[-1], failed

    def _send_acks(self, acks: list[InFlight], calls: list[Call]) -> None:
        try:
            replies = run_calls(self.client, calls)
        except Exception:
            self._put_back(acks)
            raise
        self.broker.settled(calls, replies, ACK)  # logs acks left alone: lease lost

    def _put_back(self, acks: list[InFlight]) -> None:
        """Deferred acks whose sending failed: delayed again, never dropped."""
        self.consumer_state.put_back_acks(acks)

    def _decode(self, d: Delivery) -> dict[str, Any] | None:
        try:
            message = loads(bytes_to_str(d.payload))
            envelope.check(message, self.decode_body)
            props = message['properties']
            info = props.setdefault('delivery_info', {})
            info.setdefault('exchange', '')
            info.setdefault('routing_key', d.queue)
        except Exception as exc:  # not a message a consumer can take: set aside, never drop
            what = exc if isinstance(exc, envelope.Unfit) else repr(exc)
            self._set_aside(d.queue, d.stream, d.entry_id, d.deliveries, d.exchange,
                            f'not a message a consumer can take: {what}')
            return None
        props['delivery_tag'] = f'{self.channel_id}.{next(self._tags)}{self._tag_suffix}'
        redelivered = d.deliveries > 1
        info['redelivered'] = redelivered
        info['delivery_count'] = d.deliveries
        if redelivered:
            headers = message.get('headers')
            if isinstance(headers, dict):
                headers['redelivered'] = True
        return message

    # -- settling: ack, reject, requeue --------------------------------------------------------

    def _ack(self, tag: str) -> None:
        """Ack now; or, on an event loop or from a drain_events callback, with the next read
        or before the next wait (Poller.on_tick, Poller.drain): one round trip then carries
        many acks. They are also sent when a consumer is cancelled, when the channel closes
        and by each lease keeper round. At-least-once holds either way: an ack not yet sent
        only means the message may be delivered again."""
        transport = self.connection
        if transport is None:  # closed: what it held was given back (or is reclaimed later)
            if self.consumer_state.get(tag) is None:
                logger.warning('kombu-streams: ack of message %s after its channel closed: '
                               'the channel gave it back at close, so it will be delivered '
                               'again', tag)
            self._settle([tag], ACK)  # else it is still ours: try to ack it
            return
        if not transport.cycle.batches_acks:
            self._settle([tag], ACK)
            return
        if self.consumer_state.defer_ack(tag):
            transport.leases.acks_waiting()  # sent within ACK_DELAY at the latest

    def _ack_calls(self, mergeable: set[str] | frozenset[str] = frozenset()
                   ) -> tuple[list[InFlight], list[Call], list[tuple[str, str, bytes]]]:
        """Take the deferred acks: (the acks, script calls: one per source and CHUNK acks,
        and the (queue, stream, id) of those on ``mergeable`` streams, at most CHUNK, which ride
        inside the next read call instead). A caller whose calls fail puts the acks back."""
        taken = self.consumer_state.take_acks()
        merged: list[tuple[str, str, bytes]] = []
        alone: list[InFlight] = []
        for msg in taken:
            if msg.stream in mergeable and msg.exchange is None and len(merged) < CHUNK:
                merged.append((msg.queue, msg.stream, msg.entry_id))
            else:
                alone.append(msg)
        calls: list[Call] = []
        for (queue, exchange), msgs in by_source(alone, lambda m: m).items():
            calls += self.broker.ack_calls(queue, [(m.stream, m.entry_id) for m in msgs],
                                           exchange, self.consumer_name)
        return taken, calls, merged

    def _merged_calls(self, merged: list[tuple[str, str, bytes]]) -> list[Call]:
        """Ack calls for acks that were to ride with a read that did not run."""
        by_queue: dict[str, list[tuple[str, bytes]]] = {}
        for queue, stream, entry_id in merged:
            by_queue.setdefault(queue, []).append((stream, entry_id))
        return [c for q, entries in by_queue.items()
                for c in self.broker.ack_calls(q, entries, None, self.consumer_name)]

    def flush_acks(self) -> None:
        """Send deferred acks now."""
        acks, calls, _ = self._ack_calls()
        if calls:
            self._send_acks(acks, calls)

    def _settle(self, tags: Iterable[str], mode: str, read_ahead: Iterable[str] = (),
                reason: str = 'rejected') -> int:
        """Ack (delete), requeue or dead-letter messages: one script call per queue (per
        message to dead-letter), all in one round trip.

        ``read_ahead`` are tags of messages read but never handed to the application; they
        can only be requeued, and go back with their delivery count lowered by one.

        Each call names this channel's consumer, so only messages it still owns are settled:
        one whose lease ran out while this process was stopped or cut off belongs to another
        consumer now and is left to it (a requeue here would hand it to a third one while
        the second runs it). Those are logged once per queue.
        """
        handed = list(tags)
        unhanded = set(read_ahead)
        # with the delivery count to keep
        msgs = [(msg, msg.deliveries - 1 if tag in unhanded else msg.deliveries)
                for tag, msg in self.consumer_state.release([*handed, *unhanded])]
        me = self.consumer_name
        calls: list[Call] = []
        for (queue, exchange), group in by_source(msgs, lambda m: m[0]).items():
            entries = [(m.stream, m.entry_id, n) for m, n in group]
            if mode == REQUEUE:
                calls += self.broker.requeue_calls(queue, entries, exchange, me)
            elif mode == ACK:
                calls += self.broker.ack_calls(queue, [(s, i) for s, i, _ in entries],
                                               exchange, me)
            else:
                calls += [self.broker.dead_letter_call(queue, stream, entry_id, reason,
                                                       deliveries, exchange, me)
                          for stream, entry_id, deliveries in entries]
        return self.broker.settled(calls, self.broker.run_all(calls), mode)

    def _set_aside(self, queue: str, stream: str, entry_id: bytes, deliveries: int,
                   exchange: str | None, reason: str) -> None:
        """Move an entry this channel read to its queue's dead-letter stream, logging why."""
        logger.error('kombu-streams: moving entry %s of %s to the dead-letter stream of %r: %s',
                     bytes_to_str(entry_id), stream, queue, reason)
        try:
            self.broker.dead_letter(queue, stream, entry_id, reason[:1000], deliveries,
                                    exchange, self.consumer_name)
        except Exception as exc:  # e.g. OOM: it stays pending and is reclaimed later
            logger.error('kombu-streams: could not dead-letter entry %s of %s: %r',
                         bytes_to_str(entry_id), stream, exc)

    def handler_failed(self, message: dict[str, Any], exc: BaseException) -> None:
        """The application's callback raised ``exc`` for ``message`` (Celery's strategy
        cannot take it, say): if the message is still unsettled it goes to the dead-letter
        stream now, instead of being redelivered into the same error (a crash loop)."""
        tag = message['properties']['delivery_tag']
        released = self.consumer_state.release([tag])
        if not released:
            logger.error('kombu-streams: the consumer callback raised %r for a message it had '
                         'already settled', exc, exc_info=exc)
            return
        msg = released[0][1]
        if tag in self.qos._delivered:
            self.qos._quick_ack(tag)  # gone from the prefetch count
        logger.error('kombu-streams: the consumer callback raised %r', exc, exc_info=exc)
        self._set_aside(msg.queue, msg.stream, msg.entry_id, msg.deliveries,
                        msg.exchange, f'consumer callback raised {exc!r}')

    def _requeue_delivered(self, tags: list[str]) -> int:
        """Requeue delivered messages together with the read-ahead of their queues, so the
        queue's order is as if nothing had been read ahead (Kombu's Redis transport order:
        a requeued message comes back before the ones behind it)."""
        queues = self.consumer_state.queues_of(tags)
        return self._settle(tags, REQUEUE, self.consumer_state.take_buffered(queues))

    def _return_buffered(self, queue: str | None = None) -> None:
        """Requeue messages read for ``queue`` (or all) but never handed to the application."""
        queues = None if queue is None else {queue}
        self._settle((), REQUEUE, self.consumer_state.take_buffered(queues))

    def _restore(self, message: Any) -> None:
        """Kombu's virtual channel would publish the message again (a copy, the original
        left in the PEL); our QoS never calls this, but whatever does gets a requeue."""
        self._requeue_delivered([message.delivery_tag])

    def close(self) -> None:
        if not self.closed:
            try:
                self.flush_acks()
            except Exception as exc:  # kept; the lease keeper sends them later
                logger.warning('kombu-streams: acks not sent at close, retrying later: %r', exc)
                self.connection.leases.adopt(self)
            try:
                self._return_buffered()
            except Exception as exc:  # they stay in the PEL and are reclaimed later
                logger.warning('kombu-streams: could not requeue buffered messages: %r', exc)
            self.connection.cycle.discard(self)
        super().close()


# The channel options' defaults, from the table (see the option block of Channel).
options.set_defaults(Channel)
