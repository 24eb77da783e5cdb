"""One path to Redis: the Broker (kombu_streams/broker.py and its operator half admin.py,
running scripts.py's calls) is the only code that sends a Redis command. A raw command
elsewhere (send_command / read_response on a connection, execute_command on a client, a
redis-py command method) is a broker operation laid out
in a second place, out of reach of what the Broker does for every call (NOSCRIPT reload,
error explanations, one round trip per server), as the waits' BZPOPMIN, CLIENT ID and CLIENT
UNBLOCK were in waits.py."""

from __future__ import annotations

import re
from pathlib import Path

import redis

import kombu_streams

PACKAGE = Path(kombu_streams.__file__).resolve().parent
EXECUTOR = {'broker.py', 'admin.py', 'scripts.py', 'direct.py'}
RAW = re.compile(r'\.(send_command|read_response|execute_command|send_packed_command)\(')


def test_no_raw_redis_command_outside_the_broker():
    found = []
    for path in sorted(PACKAGE.rglob('*.py')):
        if path.name in EXECUTOR and path.parent == PACKAGE:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if RAW.search(line):
                found.append(f'{path.relative_to(PACKAGE)}:{n}: {line.strip()}')
    assert found == []


def test_only_compat_reads_the_socket_of_a_redis_py_connection():
    found = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob('*.py'))
             if re.search(r'\b_sock\b', path.read_text())]
    assert found == ['compat.py']


#: redis-py's command methods (Redis.xrange, .info, .scan_iter, ...), minus the ones that
#: are not commands to the server.
COMMANDS = {name for name in dir(redis.Redis) if not name.startswith('_')
            and callable(getattr(redis.Redis, name))} - {
    'from_url', 'from_pool', 'close', 'get_connection_kwargs', 'get_encoder', 'get_retry',
    'set_retry', 'set_response_callback', 'load_external_module', 'pipeline', 'lock',
    'pubsub', 'monitor', 'transaction', 'client', 'register_script', 'parse_response',
    'initialize', 'connection'}
#: a redis-py command method called on something named as a client, pipeline or connection
CLIENT_CALL = re.compile(r'\b(client|source|pipe|pipeline|node|redis_client)\.(\w+)\(')


def test_no_redis_py_command_method_outside_the_broker():
    """The same through redis-py's methods (client.xrange(...), client.info(...)): the
    migration's reads of Kombu's keys and the connect-time INFO / CONFIG GET were such calls
    in migrate.py and connection.py; they are Broker (admin.py) methods now."""
    found = []
    for path in sorted(PACKAGE.rglob('*.py')):
        if path.name in EXECUTOR and path.parent == PACKAGE:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in CLIENT_CALL.finditer(line):
                if m.group(2) in COMMANDS:
                    found.append(f'{path.relative_to(PACKAGE)}:{n}: {line.strip()}')
    assert found == []
