"""The Lua script registry: every broker operation is one script in ``lua/``.

Scripts are read once per process, with their ``--@include NAME`` lines replaced by what
they use of ``lua/lib/NAME.lua`` (shared helpers live in one place, and Redis gets one flat
text per script: ``flatten.py``). They are called with EVALSHA; when Redis answers NOSCRIPT
(after SCRIPT FLUSH, a restart or a failover) the script is loaded with SCRIPT LOAD and the
call repeated, which is safe because NOSCRIPT means the script did not run.

``python -m kombu_streams.scripts DIR`` writes the flat scripts to DIR, for
``redis-cli --eval DIR/read.lua k1 k2 , a1 a2`` or SCRIPT LOAD + EVALSHA by hand.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from .direct import PLAIN, direct_evalsha, direct_evalshas
from .flatten import flatten
from .limits import QueueArgumentsDiffer, QueueFull

__all__ = ('Script', 'SCRIPTS', 'lua_dir', 'KeyTypeError', 'OutOfMemoryError', 'NotReplicated',
           'explain', 'run_calls', 'run_after', 'is_cluster', 'Call')

_FLAGS = re.compile(r'^--@flags\s+([\w,-]+)\s*$', re.M)


def lua_dir() -> Path:
    """Where the ``.lua`` files are: inside the installed package, or the checkout's ``lua/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / 'lua', here.parent / 'lua'):
        if (candidate / 'read.lua').is_file():
            return candidate
    raise FileNotFoundError(
        f'kombu-streams: Lua scripts not found next to {here} (broken install?)')


class KeyTypeError(ResponseError):
    """A key under one of our names holds another Redis type (WRONGTYPE)."""


class NeedsAllStreams(ResponseError):
    """publish.lua was sent only its queue's first stream and met a length limit, which
    counts every stream, or x-fairness, whose staging needs a group and the staging hash:
    nothing was written; the caller sends the call again laid out wider
    (:meth:`kombu_streams.calls.Calls.widen`). Never reaches a user."""

    @property
    def fair(self) -> bool:
        """The queue has x-fairness (publish.lua names the argument it met)."""
        return 'x-fairness' in str(self)


class OutOfMemoryError(redis_errors.OutOfMemoryError):
    """Redis refused a write because it reached ``maxmemory`` (with ``noeviction``)."""


@dataclass(frozen=True)
class Script:
    """One flat Lua script: its name, source text and SHA1."""

    name: str
    source: str
    sha: str
    #: Redis 7 script flags (``--@flags no-writes`` in the file), for :meth:`call_ro`
    flags: str = ''

    @property
    def header(self) -> str:
        """The documenting comment at the top (KEYS, ARGV, reply)."""
        m = re.match(r'--\[\[(.*?)\]\]', self.source, re.S)
        return m.group(1).strip() if m else ''

    def _evalsha(self, client: Any, keys: Sequence[Any], args: Sequence[Any],
                 read_only: bool = False) -> Any:
        """EVALSHA (or EVALSHA_RO), loading the script first if Redis lost it."""
        if not read_only:
            try:
                reply = direct_evalsha(client, self.sha, keys, args)
            except NoScriptError:
                client.script_load(self.source)
                reply = direct_evalsha(client, self.sha, keys, args)
            if reply is not PLAIN:
                return reply
        run = client.evalsha_ro if read_only else client.evalsha
        try:
            return run(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return run(self.sha, len(keys), *keys, *args)

    def __call__(self, client: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """Run on ``client`` with EVALSHA, loading the script if Redis lost it."""
        try:
            return self._evalsha(client, keys, args)
        except ResponseError as exc:
            raise explain(f'script {self.name!r}', exc, keys) from exc

    @property
    def flagged(self) -> Script:
        """The same script with its ``#!lua flags=...`` line: Redis 7.0+ only (6.2 cannot
        compile it), and a text of its own, so its own SHA."""
        source = f'#!lua flags={self.flags}\n{self.source}'
        return Script(self.name, source, hashlib.sha1(source.encode()).hexdigest(), self.flags)

    def call_ro(self, client: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """Run a read-only script as such: EVALSHA_RO with the ``no-writes`` flag on Redis
        7.0+, so it runs on read-only replicas and while the server is out of memory, and
        Redis itself refuses any write in it; plain EVALSHA on 6.2, which has neither."""
        try:
            return self.flagged._evalsha(client, keys, args, read_only=True)
        except ResponseError as exc:
            if 'unknown command' not in str(exc).lower():
                raise explain(f'script {self.name!r}', exc, keys) from exc
        return self(client, keys, args)  # Redis 6.2

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> None:
        """Add the call to a pipeline; see :func:`run_calls` for NOSCRIPT."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def explain(what: str, exc: ResponseError, keys: Sequence[Any]) -> ResponseError:
    """Turn WRONGTYPE into a :class:`KeyTypeError` naming the keys, a full queue into
    :class:`~kombu_streams.limits.QueueFull`, a declare with other queue arguments into
    :class:`~kombu_streams.limits.QueueArgumentsDiffer`; other errors as they are."""
    text = str(exc)
    if text.startswith('QUEUEFULL '):
        return QueueFull(f'kombu-streams: {text[len("QUEUEFULL "):]}')
    if text.startswith('NEEDKEYS '):
        return NeedsAllStreams(text)
    if text.startswith('PRECONDITION '):
        return QueueArgumentsDiffer(f'kombu-streams: {text[len("PRECONDITION "):]}')
    if 'WRONGTYPE' in text:
        names = ', '.join(k.decode() if isinstance(k, bytes) else str(k) for k in keys)
        return KeyTypeError(
            f'kombu-streams: {what} met a key of the wrong Redis type among '
            f'[{names}]: another program uses these names; rename or delete that key '
            f'({text})')
    if isinstance(exc, redis_errors.OutOfMemoryError) or text.startswith('OOM'):
        return OutOfMemoryError(
            f'kombu-streams: {what} was refused because Redis reached maxmemory; nothing was '
            f'written. Acks and reclaims still work and free memory; raise maxmemory or drain '
            f'queues ({text})')
    return exc


Call = tuple[Script, Sequence[Any], Sequence[Any]]

#: Replies that mean "this command did not run": safe to send again. NOSCRIPT after SCRIPT
#: FLUSH or a restart; MOVED / ASK / TRYAGAIN while Redis Cluster moves a slot.
_NOT_RUN = (NoScriptError, redis_errors.AskError, redis_errors.TryAgainError)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


class NotReplicated(redis_errors.ConnectionError):
    """Fewer replicas than asked for confirmed a write in time (``WAIT``): it may be lost
    if the primary fails now. A connection error, so Kombu's publish retry reconnects (via
    Sentinel to the current primary) and publishes again; at-least-once, so a copy may
    also survive."""


def _send(client: Any, calls: Sequence[Call], which: Sequence[int],
          wait: tuple[int, int] | None = None) -> dict[int, Any]:
    """One pipeline per server: all of them on one Redis; per node on Redis Cluster, whose
    own pipeline refuses EVALSHA (each call's keys share one slot, so one node runs it).
    ``wait`` (replicas, ms): end each pipeline with WAIT, which covers the writes of its own
    connection, and raise NotReplicated when fewer replicas confirmed them."""
    # keyed by node name: redis-py 4.6's ClusterNode is not hashable
    groups: dict[str | None, tuple[Any, list[int]]] = {}
    for i in which:
        node = client.get_node_from_key(calls[i][1][0]) if is_cluster(client) else None
        groups.setdefault(None if node is None else node.name, (node, []))[1].append(i)
    out: dict[int, Any] = {}
    for node, indices in groups.values():
        if node is None and not wait:
            replies = direct_evalshas(client, [(calls[i][0].sha, calls[i][1], calls[i][2])
                                               for i in indices])
            if replies is not PLAIN:
                out.update(zip(indices, replies))
                continue
        target = client if node is None else client.get_redis_connection(node)
        pipe = target.pipeline(transaction=False)
        for i in indices:
            script, keys, args = calls[i]
            script.queue(pipe, keys, args)
        if wait:
            pipe.execute_command('WAIT', *wait)
        replies = pipe.execute(raise_on_error=False)
        if wait:
            acked = replies.pop()
            if isinstance(acked, Exception):
                raise acked
            ran = any(not isinstance(r, _NOT_RUN) for r in replies)  # else: sent again
            if ran and int(acked) < wait[0]:
                raise NotReplicated(
                    f'kombu-streams: {acked} of {wait[0]} replicas confirmed the write within '
                    f'{wait[1]} ms; it may be lost if the primary fails now')
        out.update(zip(indices, replies))
    return out


def run_calls(client: Any, calls: Sequence[Call], raise_errors: bool = True,
              wait: tuple[int, int] | None = None) -> list[Any]:
    """Run script calls in one round trip per server; rerun only those that did not run.

    A call answered NOSCRIPT, MOVED, ASK or TRYAGAIN did not run, so sending it again cannot
    duplicate a message: on one Redis the missing scripts are loaded and those calls sent
    again in one pipeline; on Redis Cluster each is sent again on its own through the
    cluster client, which loads scripts and follows MOVED / ASK (with ASKING) / TRYAGAIN.
    Any other error is raised after every call was sent, or, with ``raise_errors=False``,
    returned in its call's place (so a caller can still use the replies of the others).
    ``wait`` (replicas, ms): see :func:`_send` (one Redis only).
    """
    results = _send(client, calls, range(len(calls)), wait)
    again = [i for i, r in results.items() if isinstance(r, _NOT_RUN)]
    if again and is_cluster(client):
        for i in again:
            script, keys, args = calls[i]
            try:
                results[i] = script(client, keys, args)
            except Exception as exc:  # already explained by Script.__call__
                results[i] = exc
    elif again:
        for script in {calls[i][0] for i in again if isinstance(results[i], NoScriptError)}:
            client.script_load(script.source)
        results.update(_send(client, calls, again, wait))
    ordered = []
    for i, (script, keys, _) in enumerate(calls):
        r = results[i]
        if isinstance(r, ResponseError):
            r = explain(f'script {script.name!r}', r, keys)
        ordered.append(r)
    if raise_errors:
        for r in ordered:
            if isinstance(r, Exception):
                raise r
    return ordered


#: Replies to a command queued in MULTI on a Cluster node that no longer serves its slot (or
#: not yet): the transaction is refused whole (EXECABORT), nothing ran.
_REDIRECTED = (redis_errors.MovedError, redis_errors.AskError, redis_errors.TryAgainError,
               redis_errors.ClusterDownError)


def _check_replicas(acked: Any, wait: tuple[int, int]) -> None:
    if isinstance(acked, Exception):
        raise acked
    if int(acked) < wait[0]:
        raise NotReplicated(
            f'kombu-streams: {acked} of {wait[0]} replicas confirmed the write within '
            f'{wait[1]} ms; it may be lost if the primary fails now')


def run_after(client: Any, command: Sequence[Any], call: Call,
              wait: tuple[int, int] | None = None) -> Any:
    """Run ``command`` (a big message's HSET) and then the script ``call`` in one MULTI/EXEC,
    in one round trip: Redis runs both or neither, so a publisher that dies in between
    leaves no body without its entry (nor an entry without its body: the script checks).
    Returns the call's reply; its errors are raised as :func:`explain` says.

    NOSCRIPT inside EXEC means the command ran and the script did not: the script is loaded
    and the same transaction sent again (the command must be idempotent, as an HSET of the
    same token is). ``wait`` (replicas, ms): WAIT after EXEC on the same connection, as
    :func:`run_calls` does.

    On Redis Cluster the transaction goes to the node serving the call's slot, on that
    node's own connection: redis-py's cluster pipeline refuses transactions up to 5.x (4.6
    to 5.2: "transaction is deprecated in cluster mode"). Should the slot have moved (MOVED
    or ASK at queueing, so EXECABORT: nothing ran) the two are sent one after the other
    through the cluster client, which follows the slot: a publisher that dies between them
    leaves a body no entry refers to (one message's memory until its queue is deleted)."""
    script, keys, args = call
    target = client
    if is_cluster(client):
        target = client.get_redis_connection(client.get_node_from_key(keys[0]))
    for attempt in range(2):
        pipe = target.pipeline(transaction=False)
        pipe.execute_command('MULTI')
        pipe.execute_command(*command)
        pipe.execute_command('EVALSHA', script.sha, len(keys), *keys, *args)
        pipe.execute_command('EXEC')
        if wait:
            pipe.execute_command('WAIT', *wait)
        replies = pipe.execute(raise_on_error=False)
        acked = replies.pop() if wait else None
        done = replies[-1]
        if isinstance(done, Exception):  # EXECABORT: refused at queueing, nothing ran
            refused = next((r for r in replies[:-1] if isinstance(r, Exception)), done)
            if is_cluster(client) and isinstance(refused, _REDIRECTED):
                client.execute_command(*command)
                return script(client, keys, args)
            if isinstance(refused, ResponseError):
                raise explain(f'script {script.name!r}', refused, keys) from refused
            raise refused
        reply = done[-1]
        if isinstance(reply, NoScriptError) or (
                isinstance(reply, ResponseError) and str(reply).startswith('NOSCRIPT')):
            if attempt == 0:
                target.script_load(script.source)
                continue
        if wait:
            _check_replicas(acked, wait)
        if isinstance(reply, ResponseError):
            raise explain(f'script {script.name!r}', reply, keys) from reply
        return reply
    raise AssertionError('unreachable')  # pragma: no cover


def load_all(directory: Path | None = None) -> dict[str, Script]:
    """Read and flatten every ``lua/*.lua`` script."""
    directory = directory or lua_dir()
    out = {}
    for path in sorted(directory.glob('*.lua')):
        source = flatten(path, directory / 'lib')
        flags = _FLAGS.search(source)
        out[path.stem] = Script(path.stem, source, hashlib.sha1(source.encode()).hexdigest(),
                                flags.group(1) if flags else '')
    return out


SCRIPTS: dict[str, Script] = load_all()


def main(argv: list[str] | None = None) -> int:
    """Write the flat scripts to a directory and print name, SHA and header of each."""
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0]) if argv else None
    if target:
        target.mkdir(parents=True, exist_ok=True)
    for script in SCRIPTS.values():
        if target:
            (target / f'{script.name}.lua').write_text(script.source)
        print(f'{script.name}  {script.sha}')
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
