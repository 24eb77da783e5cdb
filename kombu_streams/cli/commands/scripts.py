"""``scripts``: each Lua script's SHA, KEYS/ARGV (from its header) and an EVALSHA template;
``scripts --load`` loads them; ``scripts --call NAME QUEUE`` prints one call for a queue as
runnable ``redis-cli`` lines (which call: :mod:`.calls`)."""

from __future__ import annotations

import argparse
import re
import shlex
import tempfile
from itertools import takewhile
from pathlib import Path
from typing import Any

from ...broker import Broker
from ...scripts import SCRIPTS, Script
from ...text import text
from ..connect import offline
from ..errors import OK, USAGE, Failure
from ..render import emit
from .calls import queue_call


def script_doc(name: str) -> dict[str, Any]:
    """A script's SHA, KEYS and ARGV lines (from its header) and a redis-cli template."""
    script = SCRIPTS[name]
    lines = script.header.splitlines()
    keys: list[str] = []
    argv: list[str] = []
    current = None
    for line in lines:
        if line.startswith('KEYS'):
            current = keys
        elif line.startswith('ARGV'):
            current = argv
        elif not line.startswith(' ') or not line.strip():
            current = None
            continue
        if current is not None:
            current.append(line.rstrip())
    labels = [line.split()[0] for line in keys + argv if re.match(r'(KEYS|ARGV)\[', line)]
    key_labels = [x for x in labels if x.startswith('KEYS')]
    fixed = all(re.fullmatch(r'KEYS\[\d+\]', x) for x in key_labels)
    numkeys = str(len(key_labels)) if fixed else '<numkeys>'
    template = ' '.join(['redis-cli', 'EVALSHA', script.sha, numkeys]
                        + [f"'<{x}>'" for x in labels])
    first = ' '.join(takewhile(lambda line: line.strip() and not line.startswith('KEYS'), lines))
    doc = {'name': name, 'sha': script.sha, 'summary': first.partition(':')[2].strip(),
           'keys': keys, 'argv': argv, 'template': template}
    if script.flags:  # Redis 7.0+ runs the flagged text, which has its own SHA
        doc.update(flags=script.flags, flagged_sha=script.flagged.sha,
                   template_ro=template.replace(f'EVALSHA {script.sha}',
                                                f'EVALSHA_RO {script.flagged.sha}'))
    return doc


def flat_file(script: Script, directory: str | None) -> str:
    """The path of the script's flat text, written to ``directory`` (default: a new private
    temporary directory) for ``redis-cli --eval``."""
    where = Path(directory) if directory else Path(tempfile.mkdtemp(prefix='kombu-streams-'))
    where.mkdir(parents=True, exist_ok=True)
    path = where / f'{script.name}.lua'
    path.write_text(script.source)
    return str(path)


def cmd_call(args: argparse.Namespace, broker: Broker | None) -> int:
    """``scripts --call NAME QUEUE``: that call as redis-cli lines (--eval and EVALSHA)."""
    name, queue = args.call
    if broker is None:  # no server needed: the keys are named as on the server
        broker = offline(args)
    try:
        (script, keys, argv), note = queue_call(broker, name, queue, args.expires)
    except ValueError as exc:  # a name the keys cannot hold (Keys._tag)
        raise Failure(str(exc).replace('kombu-streams: ', '', 1), USAGE) from None
    words = [shlex.quote(text(x)) for x in keys]
    values = [shlex.quote(text(x)) for x in argv]
    path = flat_file(script, args.lua_dir)
    evaluate = ' '.join(['redis-cli', '--eval', shlex.quote(path), *words,
                         *([',', *values] if values else [])])
    evalsha = ' '.join(['redis-cli', 'EVALSHA', script.sha, str(len(keys)), *words, *values])
    data: dict[str, Any] = {'name': name, 'queue': queue, 'levels': broker.levels,
                            'note': note, 'sha': script.sha, 'keys': [text(x) for x in keys],
                            'argv': [text(x) for x in argv], 'lua_file': path,
                            'eval': evaluate, 'evalsha': evalsha}
    lines = [f"# {name} for queue {queue!r}, levels {','.join(map(str, broker.levels))}"
             + (f': {note}' if note else ''), evaluate, evalsha]
    if script.flags:
        data['evalsha_ro'] = evalsha.replace(f'EVALSHA {script.sha}',
                                             f'EVALSHA_RO {script.flagged.sha}')
        lines += [f'# Redis 7.0+ (#!lua flags={script.flags}):', data['evalsha_ro']]
    lines.append('# (EVALSHA needs the script loaded: kombu-streams scripts --load; --eval '
                 'sends the text itself; add -h/-p/-n/-a for your server)')
    emit(args, data, '\n'.join(lines))
    return OK


def cmd_scripts(args: argparse.Namespace, broker: Broker | None) -> int:
    if args.expires is not None and not args.call:
        raise Failure('scripts: --expires goes with --call', USAGE)
    if broker is not None:  # --load
        broker.load_scripts()
    if args.call:
        return cmd_call(args, broker)
    docs = [script_doc(name) for name in sorted(SCRIPTS)]
    blocks = []
    for d in docs:
        blocks.append('\n'.join([f"{d['name']}  {d['sha']}", f"  {d['summary']}",
                                 *(f'  {line}' for line in d['keys'] + d['argv']),
                                 f"  {d['template']}",
                                 *([f"  Redis 7.0+ (#!lua flags={d['flags']}): "
                                    f"{d['template_ro']}"] if 'flags' in d else [])]))
    note = ('(EVALSHA needs the script loaded: kombu-streams scripts --load, or any client '
            'of the transport loads it on first use)')
    emit(args, docs, '\n\n'.join(blocks) + '\n\n' + note)
    return OK


__all__ = ('cmd_scripts', 'cmd_call', 'script_doc')
