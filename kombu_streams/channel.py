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
import threading
from bisect import bisect
from collections import deque
from collections.abc import Iterable
from itertools import count
from queue import Empty
from time import monotonic
from typing import Any, NamedTuple
from uuid import uuid4

from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.scheduling import cycle_by_name

from .broker import HOLDER, Broker, Delivery
from .compat import BATCH_PUBLISH, BatchPublishError
from .connection import POOL_OPTIONS
from .keys import Keys
from .scripts import Call, run_calls

logger = logging.getLogger(__name__)

__all__ = ('Channel', 'QoS', 'PublishBatch', 'HOLDER')

#: How _settle disposes of messages.
ACK, REQUEUE, DEAD_LETTER = 'ack', 'requeue', 'dead-letter'

#: Messages per read when the channel has no prefetch limit.
UNLIMITED_READ = 10

#: Seconds between two reads that look at every stream of their queues instead of only those
#: the queues' ready indexes name (read.lua): the repair for an index that names too little
#: (a publisher of an older version, keys changed by hand). As often as the poller's bounded
#: wait, the safety net for lost wake-ups.
WALK_INTERVAL = 1.0

#: Process-wide cache of routing tables: (server id, bindings key) -> (time read, table).
_ROUTES: dict[tuple[str, str], tuple[float, list[tuple[str, ...]]]] = {}


class Held(NamedTuple):
    """A message read by this channel and not yet settled."""

    queue: str
    stream: str
    entry_id: bytes
    deliveries: int
    exchange: str | None  # the fanout exchange whose stream holds it, if any


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
        return len(self._delivered) - len(self._dirty) + len(self.channel._buffer)

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

    from_transport_options = virtual.Channel.from_transport_options + (
        'sep', 'priority_steps', 'queue_order_strategy', 'visibility_timeout',
        'global_keyprefix', 'routing_cache_ttl', 'max_read_batch', 'purge_batch',
        'max_deliveries', 'dead_letter_rejected', 'reclaim_batch', 'publish_min_replicas',
        'publish_replica_timeout',
    ) + POOL_OPTIONS

    sep = '\x06\x16'
    priority_steps = [0, 3, 6, 9]
    queue_order_strategy = 'round_robin'
    visibility_timeout: float = 3600
    global_keyprefix = ''
    #: Seconds a routing table read from Redis is reused; bindings made through this process
    #: are seen at once. 0 reads the table on every publish.
    routing_cache_ttl: float = 1.0
    #: The most messages one read script call may deliver.
    max_read_batch = 100
    #: Entries deleted per purge script call (purge loops until done).
    purge_batch = 1000
    #: A message delivered this many times (rejects with requeue and crashes alike) goes to
    #: its queue's dead-letter stream instead of being delivered again. 0: no limit.
    max_deliveries = 20
    #: reject(requeue=False) moves the message to the dead-letter stream instead of dropping
    #: it (Kombu's Redis transport drops it).
    dead_letter_rejected = False
    #: PEL entries looked at per stream by one reclaim call.
    reclaim_batch = 100
    #: A publish returns only once this many replicas have it (WAIT, same round trip), else
    #: raises NotReplicated (a connection error: Kombu's retry publishes again). Makes an
    #: unplanned Sentinel failover lose no confirmed publish. 0: no waiting.
    publish_min_replicas = 0
    #: Seconds a publish waits for those replicas.
    publish_replica_timeout: float = 1.0

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._validate_options()
        self.keys = Keys(self.global_keyprefix, cluster=connection.cluster)
        self._levels = list(self.priority_steps)
        self._queue_cycle = cycle_by_name(self.queue_order_strategy)()
        #: delivery tag -> where the message sits until settled
        self._inflight: dict[str, Held] = {}
        #: acks made on an event loop, sent with the next read or before the loop waits
        self._acks: deque[Held] = deque()
        #: the last read took all the credit it had: more messages are probably ready
        self.more_ready = False
        self._buffer: deque[tuple[dict[str, Any], str]] = deque()
        #: the buffer is filled by the consuming thread and may be emptied by another (a
        #: requeue from a Celery threads-pool task, a cancel from the application)
        self._buffer_lock = threading.RLock()
        self._no_ack_queues: set[str] = set()
        self._tags = count(1)
        salt = uuid4().hex[:8]
        #: delivery tags are f'{channel id}.{n}.{salt}': unique per channel, one uuid per channel
        self._tag_suffix = f'.{salt}'
        self.consumer_name = f'{socket.gethostname()}:{os.getpid()}:{self.channel_id}:{salt}'
        self.client = connection.make_client()
        self.broker = Broker(self.client, self.keys, self._levels)
        self._reclaim_cursors: dict[tuple[str, str | None], list[str]] = {}
        #: sources read together -> when their next read walks every stream (WALK_INTERVAL)
        self._walk_at: dict[frozenset[tuple[str, str | None]], float] = {}
        #: queue -> x-expires in ms, for the queues declared here with one
        self._expires: dict[str, int] = {}
        connection.cycle.add(self)

    def _validate_options(self) -> None:
        steps = self.priority_steps
        if (not isinstance(steps, (list, tuple)) or not steps
                or any(not isinstance(s, int) or not 0 <= s <= 9 for s in steps)
                or list(steps) != sorted(set(steps)) or steps[0] != 0):
            raise ValueError(
                f'kombu-streams: priority_steps must be increasing integers from 0 to 9 '
                f'starting at 0, e.g. [0, 3, 6, 9]; got {steps!r}')
        try:
            cycle_by_name(self.queue_order_strategy)
        except (KeyError, ImportError, AttributeError, ValueError):
            raise ValueError(
                f'kombu-streams: queue_order_strategy must be round_robin, priority or '
                f'sorted; got {self.queue_order_strategy!r}') from None
        if not isinstance(self.max_deliveries, int) or self.max_deliveries < 0:
            raise ValueError(
                f'kombu-streams: max_deliveries must be an integer >= 0 (0: no limit); '
                f'got {self.max_deliveries!r}')
        if not isinstance(self.visibility_timeout, (int, float)) or self.visibility_timeout <= 0:
            raise ValueError(
                f'kombu-streams: visibility_timeout must be a positive number of seconds; '
                f'got {self.visibility_timeout!r}')
        replicas, timeout = self.publish_min_replicas, self.publish_replica_timeout
        if not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f'kombu-streams: publish_min_replicas must be an integer >= 0; '
                             f'got {replicas!r}')
        if replicas and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f'kombu-streams: publish_replica_timeout must be a positive '
                             f'number of seconds; got {timeout!r}')
        if replicas and self.connection.cluster:
            raise ValueError('kombu-streams: publish_min_replicas is not supported on Redis '
                             'Cluster yet (a resent call would go unconfirmed)')

    # -- publishing ------------------------------------------------------------------------

    def _level(self, message: dict[str, Any]) -> int:
        """Priority level as Kombu's Redis transport picks it: 0 is served first."""
        pri = self._get_message_priority(message, reverse=False)
        return self._levels[bisect(self._levels, pri) - 1]

    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str,
                      **kwargs: Any) -> Any:
        if exchange:  # copies routed to bound queues never recreate a deleted queue
            kwargs['_routed'] = True
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self._publish(self.broker.publish_call(queue, self._level(message), dumps(message),
                                               routed=kwargs.get('_routed', False)), kwargs)

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str,
                    **kwargs: Any) -> None:
        """One entry in the exchange's stream; every bound queue reads it with its group."""
        bindings = sorted({(queue, self._binding_member(rk, pattern, queue))
                           for rk, pattern, queue in self.get_table(exchange)})
        if not bindings:
            return  # like AMQP: a fanout exchange with no queue drops the message
        self._publish(self.broker.fanout_publish_call(exchange, dumps(message), bindings),
                      kwargs)

    def _publish(self, call: tuple[Any, list[str], list[Any]], kwargs: dict[str, Any]) -> None:
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
        return int(self.publish_min_replicas), int(self.publish_replica_timeout * 1000)

    if BATCH_PUBLISH:  # Kombu 5.7+: Producer.batch() asks for this (see compat.py)
        def create_publish_batch(self, max_size: int) -> PublishBatch:
            return PublishBatch(self, max_size)

    # -- routing tables, shared in Redis ----------------------------------------------------

    def _route_key(self, exchange: str) -> tuple[str, str]:
        return (self.connection.server_id, self.keys.bindings(exchange))

    def get_table(self, exchange: str) -> list[tuple[str, ...]]:
        cache_key = self._route_key(exchange)
        now = monotonic()
        hit = _ROUTES.get(cache_key)
        if hit is not None and now - hit[0] < self.routing_cache_ttl:
            return hit[1]
        members = self.broker.route(
            exchange, fanout_sep=self.sep if self._is_fanout(exchange) else None)
        table = [tuple(bytes_to_str(m).split(self.sep)) for m in members]
        _ROUTES[cache_key] = (now, table)
        return table

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        """Route with the cached table; when it finds no queue, read the table again first:
        the binding may be newer than the cache (Celery binds a fresh reply queue for each
        remote-control call, and the worker answers it at once)."""
        if exchange:
            cache_key = self._route_key(exchange)
            if cache_key in _ROUTES:
                try:
                    found = self.typeof(exchange).lookup(
                        self.get_table(exchange), exchange, routing_key, None)
                except KeyError:
                    found = []
                if not found:
                    _ROUTES.pop(cache_key, None)
        return super()._lookup(exchange, routing_key, default)

    def _is_fanout(self, exchange: str) -> bool:
        return self.typeof(exchange).type == 'fanout'

    def _fanout_exchanges(self, queue: str) -> list[str]:
        """The fanout exchanges ``queue`` was bound to through this connection: their streams
        are read through the queue's group (as Kombu's Redis transport subscribes only to
        what it bound itself)."""
        return sorted({ex for ex, _, _ in self.state.queue_bindings(queue)
                       if self._is_fanout(ex)})

    def _fanout_map(self, queues: Iterable[str]) -> dict[str, list[str]]:
        return {q: self._fanout_exchanges(q) for q in queues}

    def _binding_member(self, routing_key: str, pattern: str, queue: str) -> str:
        return self.sep.join([routing_key or '', pattern or '', queue or ''])

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        member = self._binding_member(routing_key, pattern, queue)
        fanout = self._is_fanout(exchange)
        self.broker.bind(exchange, member, self._expires.get(queue, 0),
                         fanout_group=queue if fanout else None)
        _ROUTES.pop(self._route_key(exchange), None)

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
        _ROUTES.pop(self._route_key(exchange), None)

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
        for queue in self.active_queues:
            ttl = self._expires.get(queue)
            if not ttl:
                continue
            self.broker.touch(queue, ttl)
            for exchange, routing_key, args in self.state.queue_bindings(queue):
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
        self.connection.leases.start()  # consumers reclaim their queues' stalled messages
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
        return result

    @property
    def active_queues(self) -> list[str]:
        return list(dict.fromkeys(self._active_queues))

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        delivered = self._read([queue], 1)
        if not delivered:
            return None
        message = self.Message(delivered[0][0], channel=self)
        if no_ack:
            self._settle([message.delivery_tag], ACK)
        else:
            self.qos.append(message, message.delivery_tag)
        return message

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        delivered = self._read([queue], 1)
        if not delivered:
            raise Empty()
        return delivered[0][0]

    def wake_keys(self) -> dict[str, str]:
        """Wake marker -> queue, for what this channel would read now (nothing while it is at
        its prefetch limit): its queues, and their groups on fanout exchanges."""
        if not self._consumers or self.closed or not self.qos.can_consume():
            return {}
        out = {}
        for queue in self.active_queues:
            out[self.keys.wake(queue)] = queue
            for exchange in self._fanout_exchanges(queue):
                out[self.keys.fanout_wake(exchange, queue)] = queue
        return out

    def next_delivery(self) -> tuple[dict[str, Any], str] | None:
        """The next message for the application: from the buffer, or read from Redis."""
        if not self._buffer and self._consumers and not self.closed:
            credit = self._credit()
            queues = self._queue_cycle.consume(len(self.active_queues))
            if credit > 0 and queues:
                got = self._read(queues, credit)
                self.more_ready = len(got) >= credit
                with self._buffer_lock:
                    self._buffer.extend(got)
        with self._buffer_lock:
            if not self._buffer:
                return None
            message, queue = self._buffer.popleft()
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

    def _read(self, queues: list[str], credit: int) -> list[tuple[dict[str, Any], str]]:
        """Run read.lua over ``queues`` and decode what it delivered.

        One script call covers every queue, on one Redis; on Redis Cluster one call per hash
        slot, in serving order, each taking what credit the ones before it left. Deferred
        acks ride along with the first call. If anything fails after messages were read,
        they go to the buffer (handed out next, or requeued at close) before the error is
        raised, and unsent acks are put back: nothing read is stranded, no ack dropped."""
        out: list[tuple[dict[str, Any], str]] = []
        groups = self.broker.slot_groups(self.broker.sources(queues, self._fanout_map(queues)))
        acks, calls = self._ack_calls()
        try:
            for sources in groups:
                if credit <= 0:
                    break
                read, parse = self._read_call(sources, credit)
                reply, failed = self._send_read(calls + [read], acks)
                acks, calls = [], []
                for delivery in parse(reply):
                    credit -= 1
                    message = self._decode(delivery)
                    if message is None:
                        continue
                    tag = message['properties']['delivery_tag']
                    self._inflight[tag] = Held(delivery.queue, delivery.stream,
                                               delivery.entry_id, delivery.deliveries,
                                               delivery.exchange)
                    out.append((message, delivery.queue))
                if failed is not None:
                    raise failed
            if calls:  # no read ran (no credit): the acks go on their own
                self._send_acks(acks, calls)
        except BaseException:
            if out:
                with self._buffer_lock:
                    self._buffer.extend(out)
            raise
        finally:
            if self._inflight:
                self.connection.leases.start()
        return out

    def _read_call(self, sources: list[tuple[str, str | None]], credit: int
                   ) -> tuple[Call, Any]:
        """The read call for one slot group, walking every stream once per WALK_INTERVAL."""
        now, key = monotonic(), frozenset(sources)
        walk = now >= self._walk_at.get(key, 0.0)
        if walk:
            if len(self._walk_at) > 1000:  # source sets come and go: forget old ones
                self._walk_at.clear()
            self._walk_at[key] = now + WALK_INTERVAL
        self.connection.cycle.note_read([q for q, _ in sources])
        return self.broker.sources_call(sources, self.consumer_name, credit,
                                        self.max_deliveries, self._expires, walk)

    def _send_read(self, calls: list[Call], acks: list[Held]
                   ) -> tuple[Any, BaseException | None]:
        """Send ack calls and the read (last) in one round trip: (the read's reply, the
        first ack error). Acks whose call failed, or that may not have been sent, are put
        back (sending an ack twice is harmless); an error of the read itself is raised."""
        if len(calls) == 1:
            script, keys, args = calls[0]
            return script(self.client, keys, args), None
        try:
            results = run_calls(self.client, calls, raise_errors=False)
        except Exception:
            self._put_back(acks)
            raise
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            self._put_back(acks)
        if isinstance(results[-1], Exception):
            raise results[-1]
        return results[-1], failed

    def _send_acks(self, acks: list[Held], calls: list[Call]) -> None:
        try:
            run_calls(self.client, calls)
        except Exception:
            self._put_back(acks)
            raise

    def _put_back(self, acks: list[Held]) -> None:
        """Deferred acks whose sending failed: delayed again, never dropped."""
        self._acks.extendleft(reversed(acks))

    def _decode(self, d: Delivery) -> dict[str, Any] | None:
        try:
            message = loads(bytes_to_str(d.payload))
            props = message['properties']
            info = props.setdefault('delivery_info', {})
            info.setdefault('exchange', '')
            info.setdefault('routing_key', d.queue)
        except Exception as exc:  # not a Kombu message: set it aside, never drop it
            logger.error('kombu-streams: entry %s of %s is not a Kombu message (%r); moving it '
                         'to the dead-letter stream of %r', bytes_to_str(d.entry_id), d.stream,
                         exc, d.queue)
            try:
                self.broker.dead_letter(d.queue, d.stream, d.entry_id, f'undecodable: {exc!r}',
                                        d.deliveries, d.exchange)
            except Exception as dl_exc:  # e.g. OOM: it stays pending and is reclaimed later
                logger.error('kombu-streams: could not dead-letter entry %s of %s: %r',
                             bytes_to_str(d.entry_id), d.stream, dl_exc)
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
        if not self.connection.cycle.batches_acks:
            self._settle([tag], ACK)
            return
        held = self._inflight.pop(tag, None)
        if held is not None:
            self._acks.append(held)

    def _ack_calls(self) -> tuple[list[Held], list[Call]]:
        """Take the deferred acks: (the acks, one script call per source). A caller whose
        calls fail puts the acks back."""
        by_source: dict[tuple[str, str | None], list[tuple[str, bytes]]] = {}
        taken: list[Held] = []
        while True:
            try:
                held = self._acks.popleft()
            except IndexError:
                break
            taken.append(held)
            by_source.setdefault((held.queue, held.exchange), []).append(
                (held.stream, held.entry_id))
        calls: list[Call] = []
        for (queue, exchange), entries in by_source.items():
            call = self.broker.ack_call(queue, entries, exchange)
            if call is not None:
                calls.append(call)
        return taken, calls

    def flush_acks(self) -> None:
        """Send deferred acks now."""
        acks, calls = self._ack_calls()
        if calls:
            self._send_acks(acks, calls)

    def _settle(self, tags: Iterable[str], mode: str, read_ahead: Iterable[str] = ()) -> int:
        """Ack (delete), requeue or dead-letter messages: one script call per queue.

        ``read_ahead`` are tags of messages read but never handed to the application; they
        can only be requeued, and go back with their delivery count lowered by one.
        """
        by_source: dict[tuple[str, str | None], list[tuple[str, bytes, int]]] = {}
        for tag, handed in [(t, True) for t in tags] + [(t, False) for t in read_ahead]:
            held = self._inflight.pop(tag, None)
            if held is not None:
                by_source.setdefault((held.queue, held.exchange), []).append(
                    (held.stream, held.entry_id,
                     held.deliveries if handed else held.deliveries - 1))
        done = 0
        for (queue, exchange), entries in by_source.items():
            if mode == REQUEUE:
                done += self.broker.requeue(queue, entries, exchange)
            elif mode == ACK:
                done += self.broker.ack(queue, [(s, i) for s, i, _ in entries], exchange)
            else:
                for stream, entry_id, deliveries in entries:
                    done += self.broker.dead_letter(queue, stream, entry_id, 'rejected',
                                                    deliveries, exchange)
        return done

    def _requeue_delivered(self, tags: list[str]) -> int:
        """Requeue delivered messages together with the read-ahead of their queues, so the
        queue's order is as if nothing had been read ahead (Kombu's Redis transport order:
        a requeued message comes back before the ones behind it)."""
        queues = {self._inflight[t].queue for t in tags if t in self._inflight}
        return self._settle(tags, REQUEUE, self._take_buffered(queues))

    def _take_buffered(self, queues: set[str] | None = None) -> list[str]:
        """Remove read-ahead messages of ``queues`` (or all) from the buffer; their tags."""
        keep: deque[tuple[dict[str, Any], str]] = deque()
        tags = []
        with self._buffer_lock:
            for message, q in self._buffer:
                if queues is None or q in queues:
                    tags.append(message['properties']['delivery_tag'])
                else:
                    keep.append((message, q))
            self._buffer = keep
        return tags

    # -- leases: run by the transport's LeaseKeeper thread ----------------------------------

    def renew_leases(self) -> int:
        """Renew the lease of every message this channel holds; log the ones it lost."""
        by_source: dict[tuple[str, str | None], list[tuple[str, bytes]]] = {}
        for held in list(self._inflight.values()):
            by_source.setdefault((held.queue, held.exchange), []).append(
                (held.stream, held.entry_id))
        renewed = 0
        for (queue, _), entries in by_source.items():
            lost = self.broker.renew(queue, self.consumer_name, entries)
            renewed += len(entries) - len(lost)
            still_held = {(h.stream, h.entry_id) for h in list(self._inflight.values())}
            for stream, entry_id in lost:
                if (stream, entry_id) not in still_held:
                    continue  # settled by this channel meanwhile: not lost
                logger.warning(
                    'kombu-streams: lost the lease of message %s in %s (it was reclaimed or '
                    'settled elsewhere); it may be processed twice', bytes_to_str(entry_id),
                    stream)
        return renewed

    def reclaim(self) -> int:
        """Give back stalled messages of the queues this channel consumes, and of their
        groups on fanout exchanges (bounded calls)."""
        total = 0
        vt_ms = int(self.visibility_timeout * 1000)
        expiry_ms = max(2 * vt_ms, 300_000)
        for queue in self.active_queues:
            for exchange in [None, *self._fanout_exchanges(queue)]:
                source = (queue, exchange)
                count, cursors = self.broker.reclaim(
                    queue, vt_ms, self.reclaim_batch, self._reclaim_cursors.get(source),
                    expiry_ms, exchange)
                self._reclaim_cursors[source] = cursors
                if count:
                    logger.info('kombu-streams: reclaimed %d stalled messages of %r',
                                count, queue)
                total += count
        return total

    def _return_buffered(self, queue: str | None = None) -> None:
        """Requeue messages read for ``queue`` (or all) but never handed to the application."""
        self._settle((), REQUEUE, self._take_buffered(None if queue is None else {queue}))

    def _restore(self, message: Any) -> None:
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


class PublishBatch:
    """``Producer.batch()`` support: publish scripts pipelined in one round trip per flush
    (per node on Redis Cluster)."""

    def __init__(self, channel: Channel, max_size: int) -> None:
        self.channel = channel
        self.max_size = max_size
        self._calls: list[Call] = []
        self._failed: BaseException | None = None
        self._closed = False
        self._aborted = False

    def _check_usable(self) -> None:
        if self._closed or self._aborted:
            raise RuntimeError('kombu-streams publish batch is closed or aborted')
        if self._failed is not None:
            raise BatchPublishError(
                'publish batch cannot be reused after a failure') from self._failed

    def publish(self, message: dict[str, Any], **kwargs: Any) -> Any:
        self._check_usable()
        result = self.channel.basic_publish(message, _publish_batch=self, **kwargs)
        if len(self._calls) >= self.max_size:
            self.flush()
        return result

    def add(self, script: Any, keys: list[str], args: list[Any]) -> None:
        self._calls.append((script, keys, args))

    def flush(self) -> None:
        self._check_usable()
        if not self._calls:
            return
        calls, self._calls = self._calls, []
        try:
            run_calls(self.channel.client, calls, wait=self.channel._replica_wait())
        except Exception as exc:
            self._failed = exc
            raise BatchPublishError(
                'kombu-streams publish batch failed; delivery is uncertain') from exc

    def discard(self) -> None:
        self._aborted = True
        self._calls = []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._calls = []
