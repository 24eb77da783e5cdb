"""``Producer.batch()`` (Kombu 5.7+): publish calls collected and sent pipelined, one round
trip per flush (per node on Redis Cluster). Messages a full queue refused (``x-overflow``
``reject-publish``) are reported by number, after the others were sent: their outcome is
certain, so the batch stays usable (:class:`BatchRefused`). Messages a queue did not store
again because it had stored their id within its ``x-deduplication-window`` are no failure
(as a NATS publish acknowledged ``duplicate``): the batch lists them by number in
``duplicates`` (and on a :class:`BatchRefused` raised meanwhile)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from .compat import BatchPublishError
from .dedup import is_duplicate, note
from .limits import QueueFull
from .scripts import Call, NeedsAllStreams, run_calls

if TYPE_CHECKING:
    from .channel import Channel


class Duplicate(NamedTuple):
    """A message of a batch its queue did not store: it had stored its id (``ident``)
    within the queue's ``x-deduplication-window``, or (``ident`` then is the key) a live
    message of the queue held its ``x-unique-key`` (kombu_streams/unique.py)."""

    queue: str
    ident: str


class BatchRefused(QueueFull):
    """Some messages of a ``Producer.batch()`` were refused by full queues; the others were
    published. ``refused`` maps each refused message's number in the batch (0: the first
    ``publish`` on it) to the :class:`~kombu_streams.limits.QueueFull` naming its queue;
    ``duplicates`` the numbers of the duplicates so far (:class:`Duplicate`)."""

    def __init__(self, refused: dict[int, QueueFull],
                 duplicates: dict[int, Duplicate] | None = None) -> None:
        self.refused = dict(refused)
        self.duplicates = dict(duplicates or {})
        first = next(iter(self.refused.values()))
        super().__init__(f'kombu-streams: {len(self.refused)} message(s) of the batch refused '
                         f'(numbers {sorted(self.refused)}), the others published; first: '
                         f'{first}')


class PublishBatch:
    """The batch Kombu's ``Producer.batch()`` asks the channel for; the channel's publish
    path adds each publish script call here instead of running it."""

    def __init__(self, channel: Channel, max_size: int) -> None:
        self.channel = channel
        self.max_size = max_size
        self._calls: list[Call] = []
        #: the number in the batch of the message each call of _calls publishes
        self._numbers: list[int] = []
        #: messages published on this batch so far, and those full queues refused
        self._count = 0
        self._refused: dict[int, QueueFull] = {}
        #: messages not stored as duplicates, by number in the batch (see :class:`Duplicate`)
        self.duplicates: dict[int, Duplicate] = {}
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
        try:
            result = self.channel.basic_publish(message, _publish_batch=self, **kwargs)
        finally:
            self._count += 1
        if len(self._calls) >= self.max_size:
            self._send()  # refusals wait for the batch's own flush, so the loop goes on
        return result

    def add(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        self._calls.append((script, keys, args))
        self._numbers.append(self._count)

    def _duplicate(self, number: int, reply: Any, call: Call) -> None:
        """Note message ``number`` if publish.lua's ``reply`` says it was a duplicate."""
        args = call[2]
        # ARGV[11] the id, ARGV[12] a unique key (kombu_streams/unique.py), ARGV[4] the queue
        if len(args) >= 11 and is_duplicate(reply):
            queue, ident = str(args[3]), str(args[11] if len(args) == 12 else args[10])
            self.duplicates[number] = Duplicate(queue, ident)
            note(queue, ident)

    def run_alone(self, publish: Callable[[], Any], queue: str = '', ident: str = '') -> None:
        """A publish that cannot be pipelined (a big message: a transaction of its own, see
        :meth:`kombu_streams.broker.Broker.publish_big`): the calls added before it are
        sent first, so the batch's order holds; a failure fails the batch, as a flush's."""
        self._send()
        try:
            reply = publish()
            if ident and is_duplicate(reply):
                self.duplicates[self._count] = Duplicate(queue, ident)
        except QueueFull as exc:  # certain: nothing stored; reported by the next flush
            self._refused[self._count] = exc
        except Exception as exc:
            self._failed = exc
            raise BatchPublishError(
                'kombu-streams publish batch failed; delivery is uncertain') from exc

    def flush(self) -> None:
        """Send what is left; then raise :class:`BatchRefused` for every message a full
        queue refused since the last flush (the others are published)."""
        self._send()
        if self._refused:
            refused, self._refused = self._refused, {}
            raise BatchRefused(refused, self.duplicates)

    def _send(self) -> None:
        """Send the calls collected, noting the messages refused by full queues."""
        self._check_usable()
        calls, self._calls = self._calls, []
        numbers, self._numbers = self._numbers, []
        if calls:
            try:
                replies = self._run(calls)
                for number, reply, call in zip(numbers, replies, calls):
                    if isinstance(reply, QueueFull):
                        self._refused[number] = reply
                    else:
                        self._duplicate(number, reply, call)
                failed = [r for r in replies
                          if isinstance(r, Exception) and not isinstance(r, QueueFull)]
                if failed:
                    raise failed[0]
            except Exception as exc:
                self._failed = exc
                raise BatchPublishError(
                    'kombu-streams publish batch failed; delivery is uncertain') from exc

    def _run(self, calls: list[Call]) -> list[Any]:
        """The replies to ``calls``, sent in one pipeline; those publish.lua refused for
        want of every stream of a limited queue (nothing written) sent again, widened, in
        their order, in a second one (once per queue: later calls are laid out widened).
        Only a limit removed while the first pipeline runs could let a later message of
        the queue in before an earlier one."""
        wait = self.channel._replica_wait()
        replies = run_calls(self.channel.client, calls, raise_errors=False, wait=wait)
        wide = [i for i, r in enumerate(replies) if isinstance(r, NeedsAllStreams)]
        if wide:
            widened = set(wide)
            calls[:] = [self.channel.broker.widen(c, replies[i].fair) if i in widened else c
                        for i, c in enumerate(calls)]
            again = run_calls(self.channel.client, [calls[i] for i in wide],
                              raise_errors=False, wait=wait)
            for i, reply in zip(wide, again):
                replies[i] = reply
        return replies

    def discard(self) -> None:
        self._aborted = True
        self._calls, self._numbers = [], []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._calls, self._numbers = [], []


__all__ = ('PublishBatch', 'BatchRefused', 'Duplicate')
