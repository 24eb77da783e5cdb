"""Flattening: a script gets the library helpers it uses, directly or through other helpers,
and no other (each one left in is a closure Redis builds again on every call)."""

from __future__ import annotations

import re

import pytest

from kombu_streams.broker import Broker
from kombu_streams.flatten import _IDENT, FlattenError, _code, blocks_of, flatten
from kombu_streams.keys import Keys
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


def flat_of(tmp_path, body: str, **libs: str) -> str:
    """BODY flattened as a script of TMP_PATH, with the libraries LIBS (name=text)."""
    lib = tmp_path / 'lib'
    lib.mkdir()
    for name, text in libs.items():
        (lib / f'{name}.lua').write_text(text)
    script = tmp_path / 'script.lua'
    script.write_text(body)
    return flatten(script, lib)


def write(tmp_path, body: str) -> str:
    return flat_of(tmp_path, body, mini=LIB)


def test_keeps_what_is_used_transitively_and_drops_the_rest(tmp_path):
    flat = write(tmp_path, '--@include mini\nreturn late_one(ARGV[1])\n')
    assert '-- A library for the test' in flat and '-- Second header line.' in flat
    for kept in ('-- inlined: LIMIT = 10', 'local function helper_a', 'local function helper_b',
                 'local late_one, late_two', 'late_one = function', 'return x + 10'):
        assert kept in flat
    for dropped in ('local function unused', '-- unused: nobody names it', 'late_two = function'):
        assert dropped not in flat
    assert flat.index('inlined: LIMIT') < flat.index('helper_a(x)') < flat.index('late_one =')
    assert flat.startswith('-- begin include mini\n') and flat.rstrip().endswith('return late_one'
                                                                                  '(ARGV[1])')


def test_a_name_only_in_a_comment_keeps_nothing(tmp_path):
    flat = write(tmp_path, '--@include mini\n-- helper_b is not called here\nreturn 1\n')
    assert 'local function helper_b' not in flat and 'LIMIT' not in flat


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
    # a lazy library's table of its functions ({f = f}) names each twice: not a use
    exports = _code_names('\n'.join(re.findall(r'^lib_\w+_built = \{.*\}$', source, re.M)))
    unused = [n for n in defined if names.count(n) - exports.count(n) < 2]
    assert unused == []


def test_flat_scripts_match_a_fresh_flattening():
    for name, script in SCRIPTS.items():
        assert flatten(lua_dir() / f'{name}.lua', lua_dir() / 'lib') == script.source


CONSTANTS = """\
-- Constants of a test library.

local NAME, LEVELS = 'x-name', 3
local MIXED = 'a'  -- a comment after it
local lower = 'not a constant'
local TABLE = {1, 2}

local function use(t)
  -- NAME in a comment stays
  return NAME .. ':NAME:' .. t.NAME .. LEVELS .. lower .. MIXED .. #TABLE
end
"""


def test_constants_are_inlined_in_code_only(tmp_path):
    flat = flat_of(tmp_path, '--@include consts\nreturn use(ARGV)\n', consts=CONSTANTS)
    assert "return 'x-name' .. ':NAME:' .. t.NAME .. 3 .. lower .. 'a' .. #TABLE" in flat
    assert "-- inlined: NAME, LEVELS = 'x-name', 3" in flat
    assert '-- NAME in a comment stays' in flat and "local lower = 'not a constant'" in flat
    assert 'local TABLE = {1, 2}' in flat  # not a literal: a local still


@pytest.mark.parametrize('misuse', ['LIMIT = 11', 'local x, LIMIT = 1, 2', 'local t = {LIMIT = 1}',
                                    'local function f(a, LIMIT) return a end'])
def test_a_constant_given_another_meaning_is_refused(tmp_path, misuse):
    with pytest.raises(FlattenError, match='LIMIT'):
        flat_of(tmp_path, f'--@include c\n{misuse}\nreturn LIMIT\n',
                c='-- c\n\nlocal LIMIT = 10\n')


LAZY = """\
-- A lazy library for the test.
--@lazy: built at its first use

local BASE = 100

local function inner(x)
  return x + BASE
end

local function outer(x)
  return inner(x) * 2 + shared_helper()
end

local function unused(x)
  return x
end
"""


def lazy_script(tmp_path, body: str) -> str:
    return flat_of(tmp_path, '--@include hot\n--@include lz\n' + body, lz=LAZY,
                   hot='-- hot\n\nlocal function shared_helper()\n  return 1\nend\n')


def test_a_lazy_library_is_built_by_its_first_use_and_runs(tmp_path, fake_client):
    flat = lazy_script(tmp_path, 'if ARGV[1] == "skip" then return 0 end\n'
                                 'return lib_lz().outer(tonumber(ARGV[1]))\n')
    assert 'local function lib_lz()' in flat
    assert 'lib_lz_built = {inner = inner, outer = outer}' in flat
    assert 'local function unused' not in flat  # shaken as any library
    assert flat.index('local function lib_lz()') < flat.index('local function inner')
    assert fake_client.eval(flat, 0, '5') == 211  # (5 + 100) * 2 + 1
    assert fake_client.eval(flat, 0, 'skip') == 0


def test_eager_helpers_only_lazy_code_names_are_built_with_it(tmp_path, fake_client):
    """shared_helper (an eager library's) is named only by the lazy outer: it moves into
    lib_lz's builder, so a call that never builds lib_lz does not build it either; named by
    the script too, it stays where it was."""
    flat = lazy_script(tmp_path, 'return lib_lz().outer(tonumber(ARGV[1]))\n')
    builder = flat.index('local function lib_lz()')
    assert flat.index('local function shared_helper') > builder
    assert fake_client.eval(flat, 0, '5') == 211
    again = tmp_path / 'again'
    again.mkdir()
    flat = lazy_script(again, 'return shared_helper() + lib_lz().outer(1)\n')
    assert flat.index('local function shared_helper') < flat.index('local function lib_lz()')
    assert fake_client.eval(flat, 0) == 204


def test_a_lazy_function_named_directly_is_refused(tmp_path):
    with pytest.raises(FlattenError, match='outer of lazy library lz'):
        lazy_script(tmp_path, 'return outer(1)\n')


def _lazy_refused(source: str) -> str:
    """SOURCE with every lazy library's builder raising instead of building."""
    return re.sub(r'((?:local function (lib_\w+)\(\)|(lib_\w+) = function\(\))\n)',
                  r"\1error('built \2\3')\n", source)


@pytest.mark.redis
def test_a_queue_without_arguments_builds_no_lazy_library(script_client):
    """The hot path (publish, read with acks riding along, prefetch 1 and 100) of a queue
    without arguments never calls lib_NAME(): each such call sits behind the argument or
    state that needs it. With every builder raising, the cycle still runs."""
    c = script_client
    b = Broker(c, Keys(), [0, 3, 6, 9])
    b.declare('q')
    read = _lazy_refused(SCRIPTS['read'].source)
    publish = _lazy_refused(SCRIPTS['publish'].source)
    assert read.count("error('built lib_") >= 5 and publish.count("error('built lib_") >= 3
    assert "lib_serve_rare = function()\nerror('built lib_serve_rare')" in read

    def publish_all(n: int, script: str) -> None:
        for k in range(n):
            _, keys, args = b.publish_call('q', 3 * (k % 2), f'{{"n": {k}}}')
            c.eval(script, len(keys), *keys, *args)

    def read_some(count: int, script: str, acks: list) -> list:
        (_, keys, args), parse = b.read_call(b.sources(['q']), 'c1', count, acks=acks)
        result = parse(c.eval(script, len(keys), *keys, *args))
        assert not result.problems
        return result.deliveries

    # Warming up: the first read walks the queue (its ready index is not complete yet), a
    # repair that looks at the delayed set and at what may be held in every stream, so it
    # builds serve_rare; what it leaves is the steady state, which never does.
    publish_all(2, SCRIPTS['publish'].source)
    acks = [(d.stream, d.entry_id) for d in read_some(10, SCRIPTS['read'].source, [])]
    publish_all(150, publish)
    got = []
    for count in (1, 1, 100, 100):
        delivered = read_some(count, read, acks)
        got += delivered
        acks = [(d.stream, d.entry_id) for d in delivered]
    assert len(got) == 150 and c.xlen('ks:q:{q}:0') + c.xlen('ks:q:{q}:3') == 48
