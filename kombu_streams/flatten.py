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

Two more steps make a call cheaper, because Redis builds every closure again on each call and
each upvalue a closure captures is looked up among the chunk's open upvalues (a walk of that
list: about 60 ns each with read.lua's 96 top-level locals):

- **Constants are inlined.** A top-level ``local NAME = 'text'`` (or a number, or several
  such names at once) whose NAME is in capitals (two or more) is removed and NAME replaced
  by its literal wherever code names it (never in strings or comments, never after a
  ``.``). Such a name assigned, declared again or used as a table key is an error: the text
  would change meaning.
- **Lazy libraries.** A library whose header has a line starting ``--@lazy`` is built only
  when a call first needs it: its kept statements go inside ``local function lib_NAME()``,
  which builds them once per call and returns a table of its functions. Callers write
  ``lib_NAME().helper(...)``; a function of it named directly elsewhere is an error, because
  it would be nil. So a queue without priority aging, fair share, a rate limit, unique keys
  or deduplication pays one closure per such library per call, not all of theirs. A helper
  of an eager library that only lazy code names (read.lua's delay helpers, used only by
  serve_rare) is moved into each builder that needs it (_sink).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ('flatten', 'Block', 'blocks_of', 'inline_constants', 'FlattenError')

_INCLUDE = re.compile(r'^--@include\s+(\w+)\s*$', re.M)
_IDENT = re.compile(r'[A-Za-z_]\w*')
_LOCAL_FUNCTION = re.compile(r'^local\s+function\s+(\w+)')
_LOCAL_NAMES = re.compile(r'^local\s+([\w\s,]+?)\s*(?:=|--|$)')
_ASSIGN_FUNCTION = re.compile(r'^(\w+)\s*=\s*function\b')
_LAZY = re.compile(r'^--@lazy\b', re.M)
_LITERAL = r"(?:'[^'\\\n]*'|\"[^\"\\\n]*\"|\d+)"
_CONSTANT = re.compile(r'^local\s+([A-Z][A-Z0-9_]+(?:\s*,\s*[A-Z][A-Z0-9_]+)*)\s*=\s*'
                       rf'({_LITERAL}(?:\s*,\s*{_LITERAL})*)\s*(?:--.*)?$', re.M)
_TOKEN = re.compile(r'''--\[(=*)\[.*?\]\1\]|--[^\n]*|\[(=*)\[.*?\]\2\]'''
                    r'''|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"'''
                    r'''|[A-Za-z_]\w*|\d+(?:\.\d*)?|\.\.\.|\.\.|==|~=|<=|>=|\S''', re.S)


class FlattenError(ValueError):
    """A script or library that cannot be flattened without changing what it means."""


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
    ``LIB/NAME.lua``, between ``-- begin include NAME`` and ``-- end include NAME`` lines;
    lazy libraries wrapped in their builder, then constants inlined (see the top)."""
    text = path.read_text()
    names = _INCLUDE.findall(text)
    texts = [(lib / f'{name}.lua').read_text() for name in names]
    libs = [blocks_of(t) for t in texts]
    kept = _shake(_INCLUDE.sub('', text), libs)
    is_lazy = [bool(_LAZY.search(t)) and any(_is_function(b) for b in blocks)
               for t, blocks in zip(texts, kept)]
    kept, sunk = _sink(_INCLUDE.sub('', text), kept, is_lazy)
    parts: dict[str, str] = {}
    lazy: dict[str, set[str]] = {}
    for n, (name, (header, _), blocks) in enumerate(zip(names, libs, kept)):
        lines = [f'-- begin include {name}', *header]
        if is_lazy[n]:
            declared = re.compile(rf'^local lib_{name}\b', re.M)
            lines.extend(_lazy(name, sunk[n], blocks,
                               any(declared.search(p) for p in parts.values())))
            lazy[name] = {d for b in blocks + sunk[n] if _is_function(b) for d in b.defines}
        else:
            for block in blocks:
                lines.extend(block.lines)
        lines.append(f'-- end include {name}')
        parts[name] = '\n'.join(lines)
    flat = _INCLUDE.sub(lambda m: parts[m.group(1)], text)
    try:
        _check_lazy(flat, lazy)
        return inline_constants(flat)
    except FlattenError as exc:
        raise FlattenError(f'{path.name}: {exc}') from None


def _is_function(block: Block) -> bool:
    """Whether BLOCK defines a function (``local function f`` or ``f = function``)."""
    first = next(line for line in block.lines if not line.startswith('--'))
    return bool(_LOCAL_FUNCTION.match(first) or _ASSIGN_FUNCTION.match(first))


def _sink(body: str, kept: list[list[Block]], is_lazy: list[bool]
          ) -> tuple[list[list[Block]], list[list[Block]]]:
    """Move the statements of eager libraries that only lazy code names into the builders
    that need them: KEPT with those left out, and per library the statements to put first
    in its builder (copies, in include order; a statement two builders need is in both).
    Such a helper is then built only in a call that builds a library using it."""
    hot = set(_IDENT.findall('\n'.join(_code(line) for line in body.splitlines())))
    eager = [b for blocks, lazy in zip(kept, is_lazy) if not lazy for b in blocks]
    changed = True
    warm: list[Block] = []
    while changed:
        changed = False
        for block in eager:
            if not any(block is w for w in warm) and (not block.defines or block.defines & hot):
                warm.append(block)
                hot |= block.names
                changed = True
    cold = [b for b in eager if not any(b is w for w in warm)]
    sunk: list[list[Block]] = [[] for _ in kept]
    for n, blocks in enumerate(kept):
        if not is_lazy[n]:
            continue
        need = {name for b in blocks for name in b.names}
        take: list[Block] = []
        changed = True
        while changed:
            changed = False
            for block in cold:
                if not any(block is t for t in take) and block.defines & need:
                    take.append(block)
                    need |= block.names
                    changed = True
        sunk[n] = [b for b in cold if any(b is t for t in take)]
    left = [[b for b in blocks if lazy or not any(b is c for c in cold)]
            for blocks, lazy in zip(kept, is_lazy)]
    return left, sunk


def _lazy(name: str, sunk: list[Block], blocks: list[Block], declared: bool) -> list[str]:
    """A lazy library's kept BLOCKS inside its builder ``lib_NAME()``, which returns the table
    of its functions (built once per call), after the eager libraries' statements only it
    needs (SUNK; see _sink). DECLARED: a library included before this one declared ``local
    lib_NAME`` (its functions call it, and this one calls theirs): the builder is assigned
    to that local."""
    exported = sorted(n for b in blocks if _is_function(b) for n in b.defines)
    built = f'lib_{name}_built'
    lines = [f'local {built}  -- lib_{name}() builds it at its first use in a call',
             f'lib_{name} = function()' if declared else f'local function lib_{name}()',
             f'if {built} then return {built} end']
    for block in [*sunk, *blocks]:
        lines.extend(block.lines)
    lines.append(f'{built} = {{' + ', '.join(f'{n} = {n}' for n in exported) + '}')
    lines += [f'return {built}', 'end']
    return lines


def _tokens(text: str) -> list[tuple[int, int, str]]:
    """Lua tokens of TEXT as (start, end, token), comments left out (strings kept whole)."""
    return [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)
            if not m.group().startswith('--')]


def _check_lazy(flat: str, lazy: dict[str, set[str]]) -> None:
    """Refuse a function of a lazy library named outside its builder other than as a field
    (``lib_NAME().helper``): there it would be nil. (A helper sunk into several builders is
    defined in each: named in any of them, it is in scope.)"""
    if not lazy:
        return
    spans = {name: (flat.index(f'-- begin include {name}'),
                    flat.index(f'-- end include {name}')) for name in lazy}
    tokens = _tokens(flat)
    for n, (start, _, tok) in enumerate(tokens):
        owners = [name for name, functions in lazy.items() if tok in functions]
        if not owners or (n and tokens[n - 1][2] == '.'):
            continue
        if not any(spans[name][0] <= start < spans[name][1] for name in owners):
            raise FlattenError(f'{tok} of lazy library {owners[0]} is named directly; '
                               f'call lib_{owners[0]}().{tok}')


def inline_constants(text: str) -> str:
    """TEXT with each top-level constant (see the top of this file) replaced by its literal
    and its definition turned into a comment."""
    values: dict[str, str] = {}
    for m in _CONSTANT.finditer(text):
        names = [n.strip() for n in m.group(1).split(',')]
        literals = re.findall(_LITERAL, m.group(2))
        if len(names) != len(literals):
            raise FlattenError(f'constants {m.group(1)} take {len(literals)} values')
        for n, v in zip(names, literals):
            if n in values:
                raise FlattenError(f'constant {n} is defined twice')
            values[n] = v
    if not values:
        return text
    text = _CONSTANT.sub(lambda m: '-- inlined: ' + m.group(0)[len('local '):], text)
    tokens = _tokens(text)
    out, at = [], 0
    for n, (start, end, tok) in enumerate(tokens):
        if tok not in values:
            continue
        before = tokens[n - 1][2] if n else ''
        after = tokens[n + 1][2] if n + 1 < len(tokens) else ''
        if before in ('.', ':'):
            continue  # a field of that name, not the constant
        if after == '=' or before in ('local', 'function') or _declared(tokens, n):
            raise FlattenError(f'constant {tok} is assigned, declared again or a table key')
        out += [text[at:start], values[tok]]
        at = end
    return ''.join(out) + text[at:]


def _declared(tokens: list[tuple[int, int, str]], n: int) -> bool:
    """Whether token N is a later name of a ``local a, b`` list (or of a function's
    parameters): names and commas back to ``local`` (or to ``function f(``)."""
    k = n - 1
    while k >= 1 and tokens[k][2] == ',' and _IDENT.fullmatch(tokens[k - 1][2]):
        k -= 2
    if k == n - 1:
        return False
    return tokens[k][2] == 'local' or (tokens[k][2] == '(' and k >= 2
                                        and tokens[k - 2][2] == 'function')
