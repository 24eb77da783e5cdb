"""Flattening: a script gets the library helpers it uses, directly or through other helpers,
and no other (each one left in is a closure Redis builds again on every call)."""

from __future__ import annotations

import re

import pytest

from kombu_streams.flatten import _IDENT, _code, blocks_of, flatten
from kombu_streams.scripts import SCRIPTS, lua_dir

LIB = """\
-- A library for the test (its header, always kept).
-- Second header line.

local LIMIT = 10  -- used by helper_a only

-- helper_a: uses LIMIT
local function helper_a(x)
  return x + LIMIT
end

-- helper_b: uses helper_a
local function helper_b(x)
  return helper_a(x) * 2
end

-- unused: nobody names it; its comment goes with it
local function unused(x)
  return helper_b(x) -- a caller of helper_b, yet left out
end

local late_one, late_two  -- declared here, defined below

late_one = function(x)
  return x .. '--' .. helper_b(x)  -- '--' inside a string: the line is kept whole
end

late_two = function(x)
  return x
end
"""


def write(tmp_path, body: str) -> str:
    lib = tmp_path / 'lib'
    lib.mkdir()
    (lib / 'mini.lua').write_text(LIB)
    script = tmp_path / 'script.lua'
    script.write_text(body)
    return flatten(script, lib)


def test_keeps_what_is_used_transitively_and_drops_the_rest(tmp_path):
    flat = write(tmp_path, '--@include mini\nreturn late_one(ARGV[1])\n')
    assert '-- A library for the test' in flat and '-- Second header line.' in flat
    for kept in ('local LIMIT = 10', 'local function helper_a', 'local function helper_b',
                 'local late_one, late_two', 'late_one = function'):
        assert kept in flat
    for dropped in ('local function unused', '-- unused: nobody names it', 'late_two = function'):
        assert dropped not in flat
    assert flat.index('local LIMIT') < flat.index('helper_a(x)') < flat.index('late_one =')
    assert flat.startswith('-- begin include mini\n') and flat.rstrip().endswith('return late_one'
                                                                                  '(ARGV[1])')


def test_a_name_only_in_a_comment_keeps_nothing(tmp_path):
    flat = write(tmp_path, '--@include mini\n-- helper_b is not called here\nreturn 1\n')
    assert 'local function helper_b' not in flat and 'local LIMIT' not in flat


def test_statements_of_the_library():
    header, blocks = blocks_of(LIB)
    assert header[0].startswith('-- A library') and len(header) == 3
    assert [sorted(b.defines) for b in blocks] == [
        ['LIMIT'], ['helper_a'], ['helper_b'], ['unused'], ['late_one', 'late_two'],
        ['late_one'], ['late_two']]
    assert blocks[3].lines[0] == '-- unused: nobody names it; its comment goes with it'
    assert 'helper_b' in blocks[5].names  # found past the '--' inside a string


def _code_names(text: str) -> list[str]:
    return _IDENT.findall('\n'.join(_code(line) for line in text.splitlines()))


@pytest.mark.parametrize('name', sorted(SCRIPTS))
def test_every_helper_left_in_a_script_is_used(name):
    """No dead helper in a real script: each name an included part defines is named again in
    the flat text's code (a bare forward declaration's partner may stay undefined)."""
    source = SCRIPTS[name].source
    names = _code_names(source)
    parts = re.findall(r'-- begin include (\w+)\n(.*?)-- end include \1', source, re.S)
    defined = [n for _, part in parts for n in re.findall(
        r'^local function (\w+)|^(\w+) = function', part, re.M) for n in n if n]
    unused = [n for n in defined if names.count(n) < 2]
    assert unused == []


def test_flat_scripts_match_a_fresh_flattening():
    for name, script in SCRIPTS.items():
        assert flatten(lua_dir() / f'{name}.lua', lua_dir() / 'lib') == script.source
