"""One path to Redis: the Broker (kombu_streams/broker.py, running scripts.py's calls) is the
only code that sends a Redis command by hand. A raw command elsewhere (send_command /
read_response on a connection, execute_command on a client) is a broker operation laid out
in a second place, out of reach of what the Broker does for every call (NOSCRIPT reload,
error explanations, one round trip per server), as the waits' BZPOPMIN, CLIENT ID and CLIENT
UNBLOCK were in waits.py."""

from __future__ import annotations

import re
from pathlib import Path

import kombu_streams

PACKAGE = Path(kombu_streams.__file__).resolve().parent
EXECUTOR = {'broker.py', 'scripts.py'}
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
