"""The Lua script registry: every broker operation is one script in ``lua/``.

Scripts are read once per process, with their ``--@include NAME`` lines replaced by
``lua/lib/NAME.lua`` (shared helpers live in one place, and Redis gets one flat text per
script). They are called with EVALSHA; when Redis answers NOSCRIPT (after SCRIPT FLUSH, a
restart or a failover) the script is loaded with SCRIPT LOAD and the call repeated, which is
safe because NOSCRIPT means the script did not run.

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
from redis.exceptions import NoScriptError, ResponseError

__all__ = ('Script', 'SCRIPTS', 'lua_dir', 'KeyTypeError', 'OutOfMemoryError', 'explain',
           'execute_pipeline')

_INCLUDE = re.compile(r'^--@include\s+(\w+)\s*$', re.M)


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


class OutOfMemoryError(redis_errors.OutOfMemoryError):
    """Redis refused a write because it reached ``maxmemory`` (with ``noeviction``)."""


@dataclass(frozen=True)
class Script:
    """One flat Lua script: its name, source text and SHA1."""

    name: str
    source: str
    sha: str

    @property
    def header(self) -> str:
        """The documenting comment at the top (KEYS, ARGV, reply)."""
        m = re.match(r'--\[\[(.*?)\]\]', self.source, re.S)
        return m.group(1).strip() if m else ''

    def __call__(self, client: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """Run on ``client`` with EVALSHA, loading the script if Redis lost it."""
        try:
            try:
                return client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                client.script_load(self.source)
                return client.evalsha(self.sha, len(keys), *keys, *args)
        except ResponseError as exc:
            raise explain(f'script {self.name!r}', exc, keys) from exc

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any] = ()) -> None:
        """Add the call to a pipeline; see :func:`execute_pipeline` for NOSCRIPT."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def explain(what: str, exc: ResponseError, keys: Sequence[Any]) -> ResponseError:
    """Turn WRONGTYPE into a :class:`KeyTypeError` naming the keys; other errors as they are."""
    text = str(exc)
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


def execute_pipeline(pipe: Any, calls: Sequence[tuple[Script, Sequence[Any], Sequence[Any]]]
                     ) -> list[Any]:
    """Run queued EVALSHAs in one round trip; rerun only those that met NOSCRIPT.

    ``calls`` lists the (script, keys, args) queued on ``pipe`` in order. A command answered
    NOSCRIPT did not run, so running it again after SCRIPT LOAD cannot duplicate a message.
    """
    results = pipe.execute(raise_on_error=False)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        client = pipe
        for script in {calls[i][0] for i in missing}:
            client.script_load(script.source)
        client.execute()
        for i in missing:
            script, keys, args = calls[i]
            script.queue(pipe, keys, args)
        for i, r in zip(missing, pipe.execute(raise_on_error=False)):
            results[i] = r
    for (script, keys, _), r in zip(calls, results):
        if isinstance(r, ResponseError):
            raise explain(f'script {script.name!r}', r, keys) from r
        if isinstance(r, Exception):
            raise r
    return results


def _flatten(path: Path, lib: Path) -> str:
    text = path.read_text()

    def include(m: re.Match[str]) -> str:
        part = (lib / f'{m.group(1)}.lua').read_text()
        return f'-- begin include {m.group(1)}\n{part}-- end include {m.group(1)}'

    return _INCLUDE.sub(include, text)


def load_all(directory: Path | None = None) -> dict[str, Script]:
    """Read and flatten every ``lua/*.lua`` script."""
    directory = directory or lua_dir()
    out = {}
    for path in sorted(directory.glob('*.lua')):
        source = _flatten(path, directory / 'lib')
        out[path.stem] = Script(path.stem, source, hashlib.sha1(source.encode()).hexdigest())
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
