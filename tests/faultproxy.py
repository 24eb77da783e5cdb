"""A TCP proxy on 127.0.0.1 for fault tests: it forwards to a Redis and, when told, freezes
the connections it has (nothing passes any more, nothing is closed: what a client sees of a
half-open connection after a silent network drop) while new connections pass as usual.

    with FaultProxy(port_of_redis) as proxy:
        url = f'redis-streams://127.0.0.1:{proxy.port}/0'
        ...
        proxy.freeze()   # every connection open now hangs for ever
"""

from __future__ import annotations

import selectors
import socket
import threading
from types import TracebackType

HOST = '127.0.0.1'


class FaultProxy:
    def __init__(self, target_port: int) -> None:
        self.target = (HOST, target_port)
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        #: (client side, server side, frozen) per connection
        self._pairs: list[list] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='fault-proxy', daemon=True)
        self._thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def freeze(self) -> int:
        """Stop forwarding on every connection open now, both ways, keeping them open.
        Returns how many were frozen."""
        with self._lock:
            live = [p for p in self._pairs if not p[2]]
            for pair in live:
                pair[2] = True
        return len(live)

    def connections(self) -> int:
        """Connections open now that still pass data."""
        with self._lock:
            return sum(1 for p in self._pairs if not p[2])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for client, server, _ in self._pairs:
                client.close()
                server.close()
            self._pairs.clear()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        self._listener.setblocking(False)
        selector.register(self._listener, selectors.EVENT_READ)
        watched: set[socket.socket] = set()
        while not self._stop.is_set():
            with self._lock:
                live = {s: (p, other) for p in self._pairs if not p[2]
                        for s, other in ((p[0], p[1]), (p[1], p[0]))}
            for sock in watched - set(live):  # frozen: no longer read
                selector.unregister(sock)
                watched.discard(sock)
            for sock in set(live) - watched:
                selector.register(sock, selectors.EVENT_READ)
                watched.add(sock)
            for key, _ in selector.select(0.05):
                sock = key.fileobj
                if sock is self._listener:
                    self._accept()
                    continue
                pair, other = live[sock]
                try:
                    data = sock.recv(65536)
                    if data:
                        with self._lock:
                            frozen = pair[2]
                        if not frozen:  # else frozen since the select: it never arrives
                            other.sendall(data)
                        continue
                except OSError:
                    pass
                with self._lock:  # closed by one side: close both
                    if pair in self._pairs:
                        self._pairs.remove(pair)
                for s in pair[:2]:
                    if s in watched:
                        selector.unregister(s)
                        watched.discard(s)
                    s.close()
        selector.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        server = socket.create_connection(self.target)
        client.setblocking(True)
        with self._lock:
            self._pairs.append([client, server, False])
