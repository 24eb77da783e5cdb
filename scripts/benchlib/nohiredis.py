"""Run the bench without hiredis even where it is installed (``--no-hiredis``).

redis-py uses hiredis's reply parser whenever ``import hiredis`` succeeds. A directory whose
``hiredis.py`` raises ImportError, put first on ``sys.path`` and on ``PYTHONPATH``, makes that
import fail here and in every Python process the bench starts (the latency consumers, the
Celery workers), so all of them parse replies in Python. This module imports nothing of
redis: it must run before redis-py is imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

BLOCKER = 'raise ImportError("hiredis is kept out of this run (scripts/bench --no-hiredis)")\n'


def block_hiredis() -> str:
    """Make ``import hiredis`` fail in this process and its children; return the directory."""
    if 'redis' in sys.modules:
        raise RuntimeError('block_hiredis() must run before redis-py is imported')
    path = tempfile.mkdtemp(prefix='kombu-streams-bench-nohiredis-')
    atexit.register(shutil.rmtree, path, True)
    with open(os.path.join(path, 'hiredis.py'), 'w') as f:
        f.write(BLOCKER)
    sys.path.insert(0, path)
    os.environ['PYTHONPATH'] = os.pathsep.join(
        filter(None, [path, os.environ.get('PYTHONPATH')]))
    os.environ['KOMBU_STREAMS_BENCH_NO_HIREDIS'] = '1'
    return path


def installed_version() -> str | None:
    """The hiredis distribution installed (its metadata is found even when blocked)."""
    from importlib import metadata
    try:
        return metadata.version('hiredis')
    except metadata.PackageNotFoundError:
        return None


def blocked() -> bool:
    return os.environ.get('KOMBU_STREAMS_BENCH_NO_HIREDIS') == '1'
