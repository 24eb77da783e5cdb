"""What a command prints: aligned tables and ages for people, JSON for machines (``--json``).

A table is a dozen lines here rather than a dependency (tabulate, rich): the package is a
broker transport installed on every worker, and this is all its one command needs."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ..text import text


def age(ms: int | None) -> str:
    """A duration in ms as people read it: 850ms, 12.3s, 4m05s, 2h03m, 1d04h; '-' for none."""
    if ms is None:
        return '-'
    if ms < 1000:
        return f'{ms}ms'
    if ms < 60_000:
        return f'{ms // 100 / 10:.1f}s'
    s = ms // 1000
    for unit, size, sub, subsize in (('d', 86400, 'h', 3600), ('h', 3600, 'm', 60)):
        if s >= size:
            return f'{s // size}{unit}{s % size // subsize:02d}{sub}'
    return f'{s // 60}m{s % 60:02d}s'


def entry_age(entry_id: str, now_ms: int) -> int:
    """How old a stream entry is, from the ms part of its id and the server's time."""
    return max(now_ms - int(entry_id.split('-')[0]), 0)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to their widest cell; numbers (and ages) right-aligned."""
    cells = [header] + [[text(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = [i > 0 and all(re.match(r'^[-\d.]+[\w+]*$', row[i] or '-') for row in cells[1:])
             for i in range(len(header))]
    lines = ['  '.join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right))
             for row in cells]
    return '\n'.join(line.rstrip() for line in lines)


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    """Print ``data`` as JSON with ``--json`` (one line per document with ``--watch``, so a
    stream of them can be read line by line), else ``human`` unless it is empty."""
    if args.json:
        print(json.dumps(data, indent=None if getattr(args, 'watch', None) else 2))
    elif human:
        print(human)


__all__ = ('age', 'entry_age', 'table', 'emit')
