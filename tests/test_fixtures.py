"""Sanity checks for the server fixtures in conftest.py."""

from __future__ import annotations

import pytest
import redis
from conftest import HOST, missing, start_redis, stop_redis


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


def test_redis_client_is_flushed_and_binary(redis_client):
    assert redis_client.ping() is True
    assert redis_client.dbsize() == 0
    redis_client.set(b"k", b"\xff")
    assert redis_client.get(b"k") == b"\xff"  # decode_responses=False


def test_redis_url_is_flushed(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0  # the previous test left b"k" behind
        assert client.ping() is True
    finally:
        client.close()


def test_fake_client_runs_lua(fake_client):
    assert fake_client.ping() is True
    assert fake_client.dbsize() == 0
    assert fake_client.eval("return redis.call('INCR', KEYS[1])", 1, "n") == 1
    fake_client.set("left-behind", 1)


def test_fake_client_is_fresh(fake_client):
    assert fake_client.dbsize() == 0


@pytest.mark.parametrize("round_", [1, 2])
def test_script_client(script_client, round_):
    assert script_client.ping() is True
    assert script_client.dbsize() == 0
    added = script_client.eval(
        "return redis.call('XADD', KEYS[1], '*', 'f', ARGV[1])", 1, b"s", b"v"
    )
    assert isinstance(added, bytes) and b"-" in added
    assert script_client.xlen(b"s") == 1


@pytest.mark.redis
def test_start_stop_with_extra_args(tmp_path):
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server not installed")
    proc, port = start_redis(binary, tmp_path, extra_args=("--maxmemory", "7mb"))
    try:
        client = redis.Redis(host=HOST, port=port)
        assert client.config_get("maxmemory")["maxmemory"] == str(7 * 1024 * 1024)
        client.close()
    finally:
        stop_redis(proc)
    assert proc.poll() is not None
