"""A private RabbitMQ node for ``--peers``: Debian's ``rabbitmq-server``, on 127.0.0.1 only.

The node gets its own name, AMQP port, distribution port, epmd port, data, log and config
(the ``RABBITMQ_*`` variables; ``HOME`` for its Erlang cookie), no plugins, and is never a
system service: it runs as a child of the bench (``rabbitmq-server`` in the foreground, in
a session of its own) and is stopped by its pid: SIGTERM, which the script passes on to the
Erlang VM and waits for. The epmd daemon that Erlang starts for the node listens on its own
port; ``epmd -kill`` on that port stops it once the node is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .servers import free_port

SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'  # Debian's; /usr/sbin's wrapper su's
START_TIMEOUT = 90.0


@dataclass
class RabbitNode:
    proc: subprocess.Popen
    url: str
    epmd_port: int
    workdir: str
    version: str


def find_server() -> str | None:
    """The rabbitmq-server to run, or None (then ``--peers`` is skipped)."""
    if os.access(SERVER, os.X_OK):
        return SERVER
    return shutil.which('rabbitmq-server')


def version() -> str:
    """The installed package's version (Debian's), or '?'."""
    try:
        out = subprocess.run(['dpkg-query', '-W', '-f=${Version}', 'rabbitmq-server'],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return '?'
    return out.split('-')[0] or '?'


def start(exe: str) -> RabbitNode:
    """Start a node and wait until it accepts an AMQP connection; RuntimeError if it does not
    (with its log's tail), after stopping what was started."""
    workdir = tempfile.mkdtemp(prefix='kombu-streams-bench-rabbit-')
    amqp, dist, epmd = free_port(), free_port(), free_port()
    with open(os.path.join(workdir, 'enabled_plugins'), 'w') as f:
        f.write('[].\n')
    open(os.path.join(workdir, 'rabbitmq-env.conf'), 'w').close()
    env = dict(
        os.environ,
        HOME=workdir,
        RABBITMQ_CONF_ENV_FILE=os.path.join(workdir, 'rabbitmq-env.conf'),
        RABBITMQ_NODENAME=f'kombu-streams-bench-{os.getpid()}@localhost',
        RABBITMQ_NODE_IP_ADDRESS='127.0.0.1',
        RABBITMQ_NODE_PORT=str(amqp),
        RABBITMQ_DIST_PORT=str(dist),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}',
        ERL_EPMD_PORT=str(epmd),
        ERL_EPMD_ADDRESS='127.0.0.1',
        RABBITMQ_MNESIA_BASE=os.path.join(workdir, 'mnesia'),
        RABBITMQ_LOG_BASE=os.path.join(workdir, 'log'),
        RABBITMQ_LOGS='-',
        RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(workdir, 'enabled_plugins'),
        RABBITMQ_CONFIG_FILE=os.path.join(workdir, 'rabbitmq'),  # absent: the defaults
        RABBITMQ_PID_FILE=os.path.join(workdir, 'pid'),
    )
    with open(os.path.join(workdir, 'out.log'), 'wb') as log:
        proc = subprocess.Popen([exe], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node = RabbitNode(proc, f'amqp://guest:guest@127.0.0.1:{amqp}//', epmd, workdir, version())
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if accepts(node.url):
            return node
        time.sleep(0.5)
    tail = log_tail(node)
    stop(node)
    raise RuntimeError(f'rabbitmq-server did not accept connections within '
                       f'{START_TIMEOUT:.0f}s; its log ends:\n{tail}')


def accepts(url: str) -> bool:
    from kombu import Connection
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.connect()
            return True
    except Exception:
        return False


def log_tail(node: RabbitNode, size: int = 2000) -> str:
    try:
        with open(os.path.join(node.workdir, 'out.log'), 'rb') as f:
            return f.read().decode(errors='replace')[-size:].strip()
    except OSError:
        return '(no log)'


def stop(node: RabbitNode) -> None:
    """SIGTERM to the node's script (by pid; after 60 s SIGKILL to its session), then its epmd."""
    proc = node.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            # the leader still runs (not reaped), so its group id is still ours
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    epmd = shutil.which('epmd') or '/usr/lib/erlang/bin/epmd'
    try:
        subprocess.run([epmd, '-kill'], env=dict(os.environ, ERL_EPMD_PORT=str(node.epmd_port)),
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass
    shutil.rmtree(node.workdir, ignore_errors=True)
