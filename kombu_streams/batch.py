"""``Producer.batch()`` (Kombu 5.7+): publish calls collected and sent pipelined, one round
trip per flush (per node on Redis Cluster)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

from .compat import BatchPublishError
from .scripts import Call, run_calls

if TYPE_CHECKING:
    from .channel import Channel


class PublishBatch:
    """The batch Kombu's ``Producer.batch()`` asks the channel for; the channel's publish
    path adds each publish script call here instead of running it."""

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

    def add(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        self._calls.append((script, keys, args))

    def run_alone(self, publish: Callable[[], Any]) -> None:
        """A publish that cannot be pipelined (a big message: a transaction of its own, see
        :meth:`kombu_streams.broker.Broker.publish_big`): the calls added before it are
        sent first, so the batch's order holds; a failure fails the batch, as a flush's."""
        self.flush()
        try:
            publish()
        except Exception as exc:
            self._failed = exc
            raise BatchPublishError(
                'kombu-streams publish batch failed; delivery is uncertain') from exc

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


__all__ = ('PublishBatch',)
