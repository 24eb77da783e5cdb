"""Sphinx configuration of the kombu-streams documentation (``bash scripts/docs`` builds it;
CI builds it with ``-W -n``: a warning or a broken reference fails the build)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS / '_ext'), str(DOCS.parent)]

import kombu_streams  # noqa: E402  (after the path: the package of this checkout)

project = 'kombu-streams'
author = 'kombu-streams contributors'
copyright = 'kombu-streams contributors'
release = version = kombu_streams.__version__

extensions = [
    'sphinx.ext.autodoc',
    'ksdocs',  # docs/_ext/ksdocs.py: the option and CLI reference, generated at build time
]
html_theme = 'furo'
html_title = f'kombu-streams {release}'
exclude_patterns = ['_build']
nitpicky = True
# Types from other projects: without intersphinx (the build runs offline) they cannot resolve.
nitpick_ignore_regex = [
    (r'py:.*', r'(kombu|redis|celery|flower|prometheus_client|typing|collections)\..*'),
    (r'py:class', r'(Any|Callable|Iterator|Iterable|Sequence|Mapping|Metric|optional)'),
]
autodoc_typehints = 'none'  # signatures stay short; the docstrings say what a value is
autodoc_member_order = 'bysource'
# Literal blocks (``::``) are key layouts, tables and synopses, not Python: no guessing.
# Examples are code-block directives with a language (tests/test_docs_examples.py runs them).
highlight_language = 'none'
