"""One flat Lua text per script: ``--@include NAME`` lines replaced by the parts of
``lua/lib/NAME.lua`` the script uses.

Why only the parts it uses: Redis runs a script's whole text on every call, and each
``local function`` of an included library is a closure created again each time, used or
not. Every library included whole cost publish.lua about 3.5 us of Redis time per call (44
helpers defined, a dozen used; an empty script costs 0.7 us), which is Redis time every other
client of a shared server waits behind.

A library is a header comment, then top-level statements, each starting at column 0: ``local
function f``, ``local a, b = ...`` (or a bare ``local a, b`` declaring helpers defined further
down) and ``f = function``. A statement is kept when the script, or a kept statement, names
what it defines; a statement that defines nothing recognisable is always kept. The comment
lines right above a statement go with it. Names are found as identifiers, comments left out,
so a name only mentioned in a string keeps its helper too (never the reverse: a helper is left
out only when no kept code names it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ('flatten', 'Block', 'blocks_of')

_INCLUDE = re.compile(r'^--@include\s+(\w+)\s*$', re.M)
_IDENT = re.compile(r'[A-Za-z_]\w*')
_LOCAL_FUNCTION = re.compile(r'^local\s+function\s+(\w+)')
_LOCAL_NAMES = re.compile(r'^local\s+([\w\s,]+?)\s*(?:=|--|$)')
_ASSIGN_FUNCTION = re.compile(r'^(\w+)\s*=\s*function\b')


@dataclass
class Block:
    """One top-level statement of a library, with the comment lines above it."""

    lines: list[str]
    defines: frozenset[str]  # empty: not a definition, always kept

    @property
    def names(self) -> set[str]:
        """Identifiers its code uses (comments and its own names left out: a declaration
        ``local a, b`` keeps neither definition by itself)."""
        return set(_IDENT.findall('\n'.join(_code(line) for line in self.lines))) - self.defines


def _code(line: str) -> str:
    """LINE without its comment; a ``--`` after a quote may be inside a string: kept whole."""
    at = line.find('--')
    if at < 0 or "'" in line[:at] or '"' in line[:at]:
        return line
    return line[:at]


def _defines(line: str) -> frozenset[str] | None:
    """The names a top-level statement starting with LINE defines; None: not a start."""
    if not line[:1].isalpha() or re.match(r'end\b', line):
        return None
    m = _LOCAL_FUNCTION.match(line) or _ASSIGN_FUNCTION.match(line)
    if m:
        return frozenset({m.group(1)})
    m = _LOCAL_NAMES.match(line)
    if m:
        return frozenset(n.strip() for n in m.group(1).split(',') if n.strip())
    return frozenset()


def blocks_of(text: str) -> tuple[list[str], list[Block]]:
    """A library's header lines (before its first statement) and its statements in order."""
    header: list[str] = []
    blocks: list[Block] = []
    current = header
    for line in text.splitlines():
        defines = _defines(line)
        if defines is None:
            current.append(line)
            continue
        above: list[str] = []  # the comment lines right above go with the statement
        floor = 0
        if current is header:  # the header ends at its last blank line, if any
            blank = [n for n, h in enumerate(header) if not h.strip()]
            floor = blank[-1] + 1 if blank else len(header)
        while len(current) > floor and current[-1].startswith('--'):
            above.insert(0, current.pop())
        block = Block(above + [line], defines)
        blocks.append(block)
        current = block.lines
    return header, blocks


def _shake(body: str, libs: list[tuple[list[str], list[Block]]]) -> list[list[Block]]:
    """The blocks of each library that BODY uses, directly or through other kept blocks."""
    used = set(_IDENT.findall('\n'.join(_code(line) for line in body.splitlines())))
    kept: list[list[Block]] = [[] for _ in libs]
    pending = [(i, b) for i, (_, blocks) in enumerate(libs) for b in blocks]
    changed = True
    while changed:
        changed = False
        for item in list(pending):
            i, block = item
            if not block.defines or block.defines & used:
                used |= block.names
                pending.remove(item)
                kept[i].append(block)
                changed = True
    return [[b for b in blocks if any(b is k for k in kept[i])]
            for i, (_, blocks) in enumerate(libs)]


def flatten(path: Path, lib: Path) -> str:
    """The script at PATH with each ``--@include NAME`` replaced by what it uses of
    ``LIB/NAME.lua``, between ``-- begin include NAME`` and ``-- end include NAME`` lines."""
    text = path.read_text()
    names = _INCLUDE.findall(text)
    libs = [blocks_of((lib / f'{name}.lua').read_text()) for name in names]
    kept = _shake(_INCLUDE.sub('', text), libs)
    parts = {}
    for name, (header, _), blocks in zip(names, libs, kept):
        lines = [f'-- begin include {name}', *header]
        for block in blocks:
            lines.extend(block.lines)
        lines.append(f'-- end include {name}')
        parts[name] = '\n'.join(lines)
    return _INCLUDE.sub(lambda m: parts[m.group(1)], text)
