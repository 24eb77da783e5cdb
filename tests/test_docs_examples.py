"""Every example in the documentation runs here, against a real redis-server, so a renamed
option, a changed default or a changed command output breaks the build instead of
misleading a reader (issue #24).

What runs, per page (``docs/**/*.rst`` and README.rst), in the page's order, in one
namespace per page (an example may use what an earlier one on the page made):

* ``.. code-block:: python``: executed; it must not raise (nor warn about an unknown
  transport option: a renamed one in an example fails too). A block whose first line is
  ``# NAME.py`` (``# tasks.py``, ``# proj/settings.py``) is also written to that file in the
  page's directory, which is on ``sys.path``, so a later ``from tasks import add`` imports it.
* ``.. code-block:: pycon``: run by doctest; the shown output must match (ELLIPSIS,
  whitespace normalised), exceptions included.
* ``.. code-block:: console``: each ``$ kombu-streams ...`` line runs (in this process, through
  ``kombu_streams.cli.main``) and must exit 0; its shown output is checked for shape: the
  same lines, each the same once every word that holds a digit (counts, ages, ids, SHAs) is
  masked. Any other command in a console block fails: show it in a ``shell`` block.
* ``shell`` blocks: a ``celery -A APP worker ...`` line starts that worker (in the page's
  directory, stopped when the page ends), so a later example can wait for its result; other
  shell lines (an install, a scrape with curl) are shown, not run. ``text`` blocks are shown
  only; any other language fails, so a new kind of example gets decided on here.

The docs write Redis as ``127.0.0.1:6379``: that is replaced by the test server's address.
Each page's test prints how many examples ran.
"""

from __future__ import annotations

import doctest
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis

from kombu_streams.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / 'docs').rglob('*.rst')), ROOT / 'README.rst']
#: Where the docs say Redis is.
DOCS_REDIS = '127.0.0.1:6379'
RUN = ('python', 'pycon', 'console')
SHOWN = ('shell', 'text')
WORKER = re.compile(r'celery -A \S+ worker\b')
FILE_LINE = re.compile(r'#\s*([\w/]+\.py)\s*$')


class Example(NamedTuple):
    page: Path
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f'{self.page.relative_to(ROOT)}:{self.line}'


def examples(page: Path) -> list[Example]:
    """The ``code-block`` directives of a page, in order, with their dedented text."""
    lines = page.read_text(encoding='utf-8').splitlines()
    found = []
    for i, line in enumerate(lines):
        m = re.match(r'\s*\.\. code-block::\s*(\S+)\s*$', line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and re.match(r'\s+:\w[\w-]*:', lines[j]):  # directive options
            j += 1
        body = []
        indent = len(line) - len(line.lstrip())
        for text in lines[j:]:
            if text.strip() and len(text) - len(text.lstrip()) <= indent:
                break
            body.append(text)
        found.append(Example(page, i + 1, m.group(1), textwrap.dedent('\n'.join(body)).strip()))
    return found


def skeleton(line: str) -> str:
    """A line's shape: whitespace collapsed, each word holding a digit masked."""
    return re.sub(r'\S*\d\S*', '#', ' '.join(line.split()))


def commands(example: Example) -> list[tuple[str, list[str]]]:
    """A console block's ``$`` commands, each with the output shown under it."""
    out: list[tuple[str, list[str]]] = []
    for line in example.code.splitlines():
        if line.startswith('$ '):
            out.append((line[2:], []))
        else:
            assert out, f'{example.where}: output before any $ command'
            out[-1][1].append(line)
    return out


class Page:
    """Runs one page's examples against the server at ``address``."""

    def __init__(self, page: Path, address: str, folder: Path,
                 capsys: pytest.CaptureFixture[str]) -> None:
        self.page, self.address, self.folder, self.capsys = page, address, folder, capsys
        self.namespace: dict[str, Any] = {'__name__': '__docs__'}
        self.workers: list[tuple[subprocess.Popen[bytes], Path]] = []

    def local(self, text: str) -> str:
        return text.replace(DOCS_REDIS, self.address).replace('/tmp/flat',
                                                              str(self.folder / 'flat'))

    def python(self, example: Example) -> None:
        code = self.local(example.code)
        m = FILE_LINE.match(code.splitlines()[0])
        if m:
            target = self.folder / m.group(1)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(code + '\n', encoding='utf-8')
        exec(compile(code, example.where, 'exec'), self.namespace)

    def pycon(self, example: Example) -> None:
        test = doctest.DocTestParser().get_doctest(
            self.local(example.code), self.namespace, example.where, str(example.page),
            example.line)
        report: list[str] = []
        runner = doctest.DocTestRunner(
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test, out=report.append, clear_globs=False)
        self.namespace.update(test.globs)  # doctest ran on a copy: keep what it made
        assert not runner.failures, ''.join(report)

    def console(self, example: Example) -> None:
        for command, shown in commands(example):
            words = shlex.split(self.local(command))
            assert words[0] == 'kombu-streams', (
                f'{example.where}: a console block runs its commands; show {words[0]!r} in a '
                f'shell block')
            self.capsys.readouterr()
            code = cli(words[1:])
            got = self.capsys.readouterr().out
            assert code == 0, f'{example.where}: $ {command} exited {code}:\n{got}'
            want = [skeleton(self.local(s)) for s in shown if s.strip()]
            have = [skeleton(s) for s in got.splitlines() if s.strip()]
            assert have == want, (f'{example.where}: $ {command}: output of another shape\n'
                                  'shown:\n' + '\n'.join(shown) + '\ngot:\n' + got)


    def shell(self, example: Example) -> int:
        """Start the Celery workers the block shows; returns how many."""
        started = 0
        for line in example.code.splitlines():
            if not WORKER.match(line):
                continue
            log = self.folder / f'worker-{len(self.workers)}.log'
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(self.folder), os.environ.get('PYTHONPATH', '')]))
            with open(log, 'wb') as out:
                proc = subprocess.Popen([sys.executable, '-m', *shlex.split(self.local(line))],
                                        cwd=self.folder, env=env, stdout=out,
                                        stderr=subprocess.STDOUT)
            self.workers.append((proc, log))
            started += 1
        return started

    def stop_workers(self) -> str:
        """Stop the workers this page started (by pid); their logs, for a failure."""
        logs = []
        for proc, log in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            logs.append(log.read_text(errors='replace')[-3000:])
        return '\n'.join(logs)


def runnable(page: Path) -> list[Example]:
    found = examples(page)
    for example in found:
        assert example.lang in RUN + SHOWN, (
            f'{example.where}: code-block {example.lang!r}: run it as python, pycon or '
            f'console, or show it as shell or text')
    return [e for e in found if e.lang in RUN]


PAGES_WITH_EXAMPLES = [p for p in PAGES if runnable(p)]


@pytest.fixture
def page_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: Any):
    """A clean server, the page's folder on sys.path and as the working directory, and
    environment and imported modules put back afterwards (Django's settings variable,
    ``tasks``)."""
    redis.Redis(host=redis_server.host, port=redis_server.port).flushall()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv('KOMBU_STREAMS_URL', f'redis-streams://{redis_server.host}:'
                       f'{redis_server.port}/0')
    environ, modules = dict(os.environ), set(sys.modules)
    yield f'{redis_server.host}:{redis_server.port}'
    for name in set(sys.modules) - modules:
        if str(tmp_path) in str(getattr(sys.modules[name], '__file__', '') or ''):
            del sys.modules[name]
    os.environ.clear()
    os.environ.update(environ)


# An option an example names that the transport does not know (renamed, misspelt) only warns
# in an app: here it fails. Django's layout sets DJANGO_SETTINGS_MODULE, and Django itself is
# not installed for the tests: Celery's warning about that is expected.
@pytest.mark.filterwarnings('error:kombu-streams')
@pytest.mark.filterwarnings('ignore:Environment variable DJANGO_SETTINGS_MODULE')
@pytest.mark.parametrize('page', PAGES_WITH_EXAMPLES,
                         ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_EXAMPLES])
def test_the_examples_of_a_page_run(page: Path, page_env: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    runner = Page(page, page_env, tmp_path, capsys)
    counts = dict.fromkeys(RUN, 0)
    workers = 0
    try:
        for example in examples(page):
            if example.lang == 'shell':
                workers += runner.shell(example)
            elif example.lang in RUN:
                getattr(runner, example.lang)(example)
                counts[example.lang] += 1
    except BaseException:
        print('worker logs:', runner.stop_workers())
        raise
    finally:
        runner.stop_workers()
    ran = sum(counts.values())
    assert ran == len(runnable(page))
    shown = len(examples(page)) - ran
    with capsys.disabled():
        print(f'\ndocs examples: {page.relative_to(ROOT)}: {ran} ran ('
              + ', '.join(f'{lang} {n}' for lang, n in counts.items())
              + f'), {shown} shown only'
              + (f', of which {workers} started a Celery worker' if workers else ''))


def test_the_docs_have_examples_of_each_kind(capsys: pytest.CaptureFixture[str]) -> None:
    """The collection itself: every kind is found, in the pages that should have them."""
    every = [e for p in PAGES for e in examples(p)]
    counts = {lang: sum(e.lang == lang for e in every) for lang in RUN + SHOWN}
    with capsys.disabled():
        print(f'\ndocs examples: {sum(counts[k] for k in RUN)} run in '
              f'{len(PAGES_WITH_EXAMPLES)} pages ('
              + ', '.join(f'{k} {n}' for k, n in counts.items() if k in RUN)
              + f'), {sum(counts[k] for k in SHOWN)} shown only')
    assert all(counts[lang] for lang in RUN), counts
    names = {p.name for p in PAGES_WITH_EXAMPLES}
    assert {'getting-started.rst', 'switching.rst', 'guide.rst', 'operations.rst',
            'options.rst', 'README.rst'} <= names, names
    workers = [e.where for e in every if e.lang == 'shell' and WORKER.search(e.code)]
    assert any('getting-started.rst' in where for where in workers), workers


def test_shapes_mask_numbers_but_not_words() -> None:
    assert skeleton('celery   all   5  0  260ms') == skeleton('celery all 12 3 1.8s')
    assert skeleton('celery all 5') != skeleton('celery all 5 0')
    assert skeleton('moved 1 dead letter(s)') != skeleton('moved 1 message(s)')
