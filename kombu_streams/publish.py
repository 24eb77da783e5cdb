"""Publishing on a channel: one script call per message (publish.lua, fanout_publish.lua),
or one pipeline per ``Producer.batch()``; messages with a due time kept in Redis; big
messages (``big_message_bytes``) stored apart, their body never passed through a script."""

from __future__ import annotations

import logging
import math
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import dumps

from .batch import PublishBatch
from .broker import (
    Delay,
)
from .compat import BATCH_PUBLISH
from .dedup import dedup_id, is_duplicate, note
from .due import when as due_at
from .fair import group as fair_group
from .limits import QueueFull, expiration_ms
from .options import level_for
from .scripts import Call, NeedsAllStreams, run_calls
from .unique import note as note_unique
from .unique import unique_key

logger = logging.getLogger('kombu_streams.channel')


class MessageTooLarge(ValueError):
    """A message larger than the transport or the server takes: it was not published."""


class Publishing(virtual.Channel):
    """The publishing part of :class:`kombu_streams.channel.Channel`."""

    def _level(self, message: dict[str, Any]) -> int:
        """Priority level as Kombu's Redis transport picks it: 0 is served first."""
        return level_for(self._levels, self._get_message_priority(message, reverse=False))

    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str,
                      **kwargs: Any) -> Any:
        if exchange:  # copies routed to bound queues never recreate a deleted queue
            kwargs['_routed'] = True
        # A full queue (QueueFull) does not keep the copies for the other bound queues from
        # being published: raised once every queue had its copy, as RabbitMQ nacks a
        # publish some queue refused while the others keep theirs.
        refused: list[QueueFull] = []
        result = super().basic_publish(message, exchange, routing_key, _refused=refused,
                                       **kwargs)
        if refused:
            raise refused[0]
        return result

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
        try:
            self._put_one(queue, message, kwargs)
        except QueueFull as exc:
            refused = kwargs.get('_refused')
            if refused is None:
                raise
            refused.append(exc)

    def _put_one(self, queue: str, message: dict[str, Any], kwargs: dict[str, Any]) -> None:
        payload = self._payload(message)
        level, delay = self._level(message), self._delay(message)
        routed = kwargs.get('_routed', False)
        expiration = expiration_ms(message)
        ident = dedup_id(message)  # the queue's x-deduplication-window, if any, applies
        key = unique_key(message)  # x-unique-key: stored only while none of the queue has it
        group = fair_group(message)  # x-group: staged per group on a queue with x-fairness
        if self.big_message_bytes and len(payload) >= self.big_message_bytes:
            self._publish_big(queue, level, payload, routed, delay, kwargs, expiration, ident,
                              key, group)
            return
        reply = self._publish(self.broker.publish_call(queue, level, payload, routed=routed,
                                                       delay=delay, expiration=expiration,
                                                       dedup_id=ident, unique_key=key,
                                                       group=group), kwargs)
        if (ident or key) and is_duplicate(reply):
            _noted(queue, ident, key)

    def _publish_big(self, queue: str, level: int, payload: str, routed: bool,
                     delay: Delay | None, kwargs: dict[str, Any],
                     expiration: int | None = None, ident: str = '', key: str = '',
                     group: str | None = None) -> None:
        """A big message: body and entry in one transaction of their own (Broker.publish_big);
        in a ``Producer.batch()`` too, after the calls added before it (their order kept)."""
        def publish() -> Any:
            reply = self.broker.publish_big(queue, level, payload, routed, delay,
                                            self._replica_wait(), expiration, ident, key,
                                            group)
            if (ident or key) and is_duplicate(reply):
                _noted(queue, ident, key)
            return reply

        batch = kwargs.get('_publish_batch')
        if batch is not None:
            batch.run_alone(publish, queue, ident or key)
        else:
            publish()

    def _delay(self, message: dict[str, Any]) -> Delay | None:
        """When the message is due, for publish.lua; None with delayed delivery off."""
        if not self.delayed_delivery:
            return None
        at, label = due_at(message)
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

    def _publish(self, call: Call, kwargs: dict[str, Any]) -> Any:
        """Run a publish call now and return its reply, or add it to the
        ``Producer.batch()`` being built (None: the batch learns the reply)."""
        batch = kwargs.get('_publish_batch')
        if batch is not None:
            batch.add(*call)
            return None
        try:
            return self._run_publish(call)
        except NeedsAllStreams as exc:  # a length limit or x-fairness: nothing written; once
            return self._run_publish(self.broker.widen(call, exc.fair))  # more, laid out wider

    def _run_publish(self, call: Call) -> Any:
        wait = self._replica_wait()
        if wait:
            return run_calls(self.client, [call], wait=wait)[0]
        script, keys, args = call
        return script(self.client, keys, args)

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


def _noted(queue: str, ident: str, key: str) -> None:
    """Log a publish not stored (a duplicate reply): by its unique key when it has one (a
    taken key refuses it whether or not the id was seen), else by its id."""
    if key:
        note_unique(queue, key)
    else:
        note(queue, ident)


__all__ = ('Publishing', 'MessageTooLarge')
