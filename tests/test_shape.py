"""The shape the codebase promises (issue #19): small files, each with one job, and no
import cycle at run time, so each module can be read and tested on its own.

Imports under ``if TYPE_CHECKING:`` are for type hints only (never run) and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kombu_streams

PACKAGE = Path(kombu_streams.__file__).resolve().parent
#: The most lines a file of the package may have.
MAX_LINES = 450


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def runtime_imports(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The package's modules that ``path`` imports when it runs."""
    name = module_name(path, root)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and 'TYPE_CHECKING' in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif node.level:
            base = package.split('.')[:len(package.split('.')) - node.level + 1]
            target = '.'.join(base + ([node.module] if node.module else []))
            targets = [target] + [f'{target}.{a.name}' for a in node.names]
        else:
            targets = [node.module or ''] + [f'{node.module}.{a.name}' for a in node.names]
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_cycles(root: Path) -> list[str]:
    """Every cycle a depth-first walk of the run-time import graph of ``root`` meets."""
    paths = {module_name(p, root): p for p in root.rglob('*.py')}
    graph = {m: runtime_imports(p, set(paths), root) for m, p in paths.items()}
    cycles: list[str] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 'open'
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 'open':
                cycles.append(' -> '.join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 'done'

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycle_at_run_time():
    assert import_cycles(PACKAGE) == []


def test_the_cycle_finder_sees_a_cycle_and_skips_type_hints(tmp_path):
    """The test above can fail: a cycle written on purpose is found, and one closed only by
    an import under TYPE_CHECKING is not."""
    pkg = tmp_path / 'kombu_streams'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('from .b import x\n')
    (pkg / 'b.py').write_text('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n'
                              '    from .a import y\nfrom .c import z\n')
    (pkg / 'c.py').write_text('x = 1\n')
    assert import_cycles(pkg) == []
    (pkg / 'c.py').write_text('from . import a\n')
    assert import_cycles(pkg) == ['kombu_streams.a -> kombu_streams.b -> kombu_streams.c '
                                  '-> kombu_streams.a']


def test_no_file_over_the_line_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in sorted(PACKAGE.rglob('*.py'))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
