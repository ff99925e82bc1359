"""A TCP forwarder that can be cut and healed: a network partition between
the processes on its two sides, on loopback.

While cut, nothing moves through it in either direction and nothing is
closed: bytes already read are held, new connections are accepted but go
nowhere, a close is not passed on. That is what a partition looks like to
TCP (silence, no RST), so each side finds out only by its own timeouts.
Healing lets everything held on established connections flow on, as TCP's
retransmissions do when a partition heals; a connection opened during the
cut never reached the other side (its SYN was lost) and is closed.
"""

from __future__ import annotations

import socket
import threading


class PartitionProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; :meth:`cut` / :meth:`heal`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._open = threading.Event()
        self._open.set()
        self._closing = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self._listener.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closing.set()
        self._open.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                s.close()
        for t in self._threads:
            t.join(5)

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.append(s)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            t = threading.Thread(target=self._connect, args=(client,), daemon=True)
            self._threads.append(t)
            t.start()

    def _connect(self, client: socket.socket) -> None:
        if not self._open.is_set():
            self._open.wait()  # a connection made during a cut never got through
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        self._track(upstream)
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        self._threads.append(back)
        back.start()
        self._pump(client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            self._open.wait()  # held during a cut, end of stream included
            if self._closing.is_set():
                return
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return
