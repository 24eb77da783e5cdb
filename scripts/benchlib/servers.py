"""The bench's private redis-server, the delay proxy of ``--rtt`` and the PING round trip."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


#: A TCP proxy that holds every chunk for half the round trip in each direction, in order:
#: a network between client and Redis (argv: listen port, server host, server port, rtt ms).
DELAY_PROXY = r'''
import queue, socket, sys, threading, time
listen, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
half = float(sys.argv[4]) / 2000  # seconds each way

def pipe(src, dst):
    # one thread reads, one writes each chunk once its time has come (time.sleep is
    # precise to a few tens of microseconds; asyncio's timers round up to a millisecond)
    chunks = queue.SimpleQueue()

    def read():
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b''
            chunks.put((time.monotonic() + half, data))
            if not data:
                return

    def write():
        while True:
            due, data = chunks.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    for target in (read, write):
        threading.Thread(target=target, daemon=True).start()

server = socket.create_server(('127.0.0.1', listen))
print('ready', flush=True)
while True:
    client, _ = server.accept()
    try:
        upstream = socket.create_connection((host, port))
    except OSError:
        client.close()
        continue
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pipe(client, upstream)
    pipe(upstream, client)
'''


def start_proxy(where: str, rtt_ms: float) -> tuple[subprocess.Popen, str]:
    """The delay proxy in a process of its own (not sharing this one's GIL) in front of
    ``where``; returns it and the HOST:PORT/DB to give the clients."""
    hostport, _, db = where.partition('/')
    host, _, port = hostport.rpartition(':')
    listen = free_port()
    proc = subprocess.Popen([sys.executable, '-c', DELAY_PROXY, str(listen), host, port,
                             str(rtt_ms)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    if proc.stdout.readline().strip() != 'ready':
        sys.exit('bench: the delay proxy did not start')
    return proc, f'127.0.0.1:{listen}/{db or 0}'


def ping_rtt_ms(where: str, n: int = 200) -> float:
    """Median PING round trip to ``where``, in ms."""
    client = redis.Redis.from_url(f'redis://{where}')
    try:
        client.ping()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.ping()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    finally:
        client.close()


def start_server(path: str | None):
    exe = path or shutil.which('redis-server')
    if not exe:
        sys.exit('bench: redis-server not found on PATH; pass --redis-server or --url')
    workdir = tempfile.mkdtemp(prefix='kombu-streams-bench-')
    port = free_port()
    proc = subprocess.Popen(
        [exe, '--port', str(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
         '--daemonize', 'no', '--dir', workdir, '--logfile', os.path.join(workdir, 'log')],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # Ctrl-C goes to us; we stop the server ourselves
    client = redis.Redis(host='127.0.0.1', port=port)
    for _ in range(200):
        if proc.poll() is not None:
            break
        try:
            client.ping()
            return proc, f'127.0.0.1:{port}/0', workdir
        except redis.ConnectionError:
            time.sleep(0.05)
    stop_server(proc, workdir)
    sys.exit(f'bench: {exe} did not start on 127.0.0.1:{port}')


def stop_server(proc, workdir) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)

