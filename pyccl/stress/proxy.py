"""A fault-injecting TCP proxy (asyncio; uvloop where the caller's loop is uvloop).

One :class:`FaultProxy` stands in front of one peer's data port: the other
peers connect to the proxy (the peer advertises the proxy's address), and
the proxy connects on to the peer. Every connection is two independent
*directions*; each direction is a delay line:

* **delay**: every byte is forwarded ``delay`` seconds after the proxy read
  it (one-way; both directions are delayed).
* **window**: at most ``window`` bytes per connection and direction are in
  the delay line (read, not yet forwarded). The proxy stops reading while the
  line is full, so TCP back-pressure reaches the sender, exactly like a
  sender whose TCP window is exhausted. Each byte spends ``delay`` in the
  line, so one connection carries at most ``window / delay`` bytes per
  second: a window-limited long fat pipe (``--net-delay 50ms --net-window
  4MiB`` caps a connection at 80 MiB/s; K connections at K times that).
  Reads never exceed the free space, so the bound is strict. With no window
  set, the line is still bounded (64 MiB with a delay, 4 MiB without) so a
  stalled receiver cannot make the proxy buffer without limit.
* **bandwidth**: bytes per second per proxy and direction, shared by all of
  its connections (a link's capacity), paced on a virtual clock.
* **stall** (a fault): every connection open at that moment stops moving
  bytes in both directions, silently: no FIN, no RST, the sockets stay open
  and the proxy stops reading (the sender's buffers fill, then it blocks). A
  close by either end is not passed on either: a black hole. A finite stall
  ends by itself and everything queued flows again; ``None`` stalls until
  the proxy is closed. New connections are not affected.
* **reset** (a fault): a connection is torn down with a TCP RST to both ends.

A direction that reads EOF forwards it (``shutdown(SHUT_WR)``) after the
delay; an error on either socket resets the whole connection (RST both ends),
as a real path would deliver the RST.

Contract: all methods run on the loop that called :meth:`FaultProxy.start`;
:meth:`FaultProxy.close` releases every socket and task.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["LinkShape", "FaultProxy", "Pacer", "ProxyStats"]

log = logging.getLogger("pyccl.stress.proxy")

READ_MAX = 256 << 10
_UNBOUNDED_DELAYED = 64 << 20
_UNBOUNDED_PLAIN = 4 << 20
_RESET = object()  # queue marker: the source was reset
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class LinkShape:
    """How the proxy shapes every link (see the module docstring)."""

    delay: float = 0.0
    window: int | None = None
    bandwidth: float | None = None

    @property
    def line_capacity(self) -> int:
        """Bytes a direction may hold in its delay line."""
        if self.window:
            return int(self.window)
        return _UNBOUNDED_DELAYED if self.delay > 0 else _UNBOUNDED_PLAIN

    @property
    def connection_bound(self) -> float | None:
        """Upper bound on one connection's throughput in B/s (None: unbounded)."""
        bounds = []
        if self.window and self.delay > 0:
            bounds.append(self.window / self.delay)
        if self.bandwidth:
            bounds.append(self.bandwidth)
        return min(bounds) if bounds else None


class Pacer:
    """Spaces transmissions on a virtual clock so they average ``rate`` bytes/s.

    ``await pace(n)`` returns once sending ``n`` more bytes keeps the
    long-run rate at most ``rate`` (at most ``burst`` bytes of credit build
    up while idle).
    """

    def __init__(self, rate: float, burst: int = 64 << 10) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst_s = burst / rate
        self._t = 0.0

    async def pace(self, n: int) -> None:
        now = asyncio.get_running_loop().time()
        start = max(self._t, now - self.burst_s)
        self._t = start + n / self.rate
        wait = self._t - self.burst_s - now
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass
class ProxyStats:
    """Counters of one proxy: bytes forwarded to the peer (``down``) and back (``up``)."""

    down: int = 0
    up: int = 0
    accepted: int = 0
    active: int = 0
    resets: int = 0
    stalls: int = 0


class _Direction:
    """One way of one connection: a bounded delay line from ``src`` to ``dst``."""

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, pacer: Pacer | None,
                 down: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.pacer = pacer
        self.down = down
        self.cap = conn.proxy.shape.line_capacity
        self.delay = conn.proxy.shape.delay
        self.queue: collections.deque[tuple[float, Any]] = collections.deque()
        self.in_flight = 0
        self.space = asyncio.Event()
        self.data = asyncio.Event()
        self.finished = False

    def wake(self) -> None:
        self.space.set()
        self.data.set()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self.in_flight >= self.cap or self.conn.stalled:
                    self.space.clear()
                    await self.space.wait()
                data = await loop.sock_recv(self.src, min(self.cap - self.in_flight, READ_MAX))
                due = loop.time() + self.delay
                if not data:
                    self.queue.append((due, None))
                    self.data.set()
                    return
                self.in_flight += len(data)
                self.queue.append((due, data))
                self.data.set()
        except OSError:
            self.queue.append((loop.time() + self.delay, _RESET))
            self.data.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue or self.conn.stalled:
                self.data.clear()
                await self.data.wait()
            due, item = self.queue[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # the link may have stalled meanwhile
            if item is None:
                self.queue.popleft()
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.finished = True
                self.conn.direction_finished()
                return
            if item is _RESET:
                self.conn.abort("reset by the other end")
                return
            if self.pacer is not None:
                await self.pacer.pace(len(item))
            try:
                await loop.sock_sendall(self.dst, item)
            except OSError:
                self.conn.abort("send failed")
                return
            self.queue.popleft()
            self.in_flight -= len(item)
            stats = self.conn.proxy.stats
            if self.down:
                stats.down += len(item)
            else:
                stats.up += len(item)
            self.space.set()


class _Connection:
    """A proxied connection: client <-> upstream, two directions, four tasks."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.stalled = False
        self._unstall: asyncio.TimerHandle | None = None
        self.dirs = (
            _Direction(self, client, upstream, proxy.pacer_down, down=True),
            _Direction(self, upstream, client, proxy.pacer_up, down=False),
        )
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False

    def start(self) -> None:
        for d in self.dirs:
            self.tasks.append(asyncio.ensure_future(d.read()))
            self.tasks.append(asyncio.ensure_future(d.write()))

    def stall(self, duration: float | None) -> None:
        self.stalled = True
        if self._unstall is not None:
            self._unstall.cancel()
            self._unstall = None
        if duration is not None:
            self._unstall = asyncio.get_running_loop().call_later(duration, self.unstall)

    def unstall(self) -> None:
        self.stalled = False
        self._unstall = None
        for d in self.dirs:
            d.wake()

    def direction_finished(self) -> None:
        if all(d.finished for d in self.dirs):
            self._teardown(rst=False)

    def abort(self, why: str) -> None:
        """Tear down with a TCP RST to both ends."""
        log.debug("proxy %s: connection reset (%s)", self.proxy.name, why)
        self._teardown(rst=True)

    def _teardown(self, rst: bool) -> None:
        if self.closing:
            return
        self.closing = True
        if self._unstall is not None:
            self._unstall.cancel()
        asyncio.ensure_future(self._close(rst))

    async def _close(self, rst: bool) -> None:
        # Cancel the pumps and let them unwind before closing their sockets:
        # a socket must not be closed while the loop still watches its fd.
        me = asyncio.current_task()
        others = [t for t in self.tasks if t is not me and not t.done()]
        for t in others:
            t.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        for s in (self.client, self.upstream):
            if rst:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            s.close()
        self.proxy._forget(self)


class FaultProxy:
    """A listening proxy in front of ``upstream`` (host, port) with a :class:`LinkShape`.

    Lifecycle: ``port = await proxy.start()``; faults with :meth:`stall` and
    :meth:`reset`; :meth:`stop_accepting` refuses new connections (the peer
    behind it is gone); ``await proxy.close()`` resets everything left.
    """

    def __init__(self, upstream: tuple[str, int], shape: LinkShape, host: str = "127.0.0.1", port: int = 0,
                 name: str = "") -> None:
        self.upstream = upstream
        self.shape = shape
        self.host = host
        self.port = port
        self.name = name or f"->{upstream[1]}"
        self.stats = ProxyStats()
        self.pacer_down = Pacer(shape.bandwidth) if shape.bandwidth else None
        self.pacer_up = Pacer(shape.bandwidth) if shape.bandwidth else None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: set[_Connection] = set()
        self._opening: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen; returns the port the proxy accepts on."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(256)
        s.setblocking(False)
        self._listener = s
        self.port = s.getsockname()[1]
        self._accept_task = asyncio.ensure_future(self._accept_loop())
        return self.port

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                client, _ = await loop.sock_accept(self._listener)
            except OSError:
                return
            client.setblocking(False)
            task = asyncio.ensure_future(self._open(client))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(up, self.upstream), 5.0)
        except (OSError, asyncio.TimeoutError):
            # Nobody behind the proxy: refuse the client like a dead host would.
            up.close()
            try:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
            client.close()
            return
        for s in (client, up):
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        conn = _Connection(self, client, up)
        self._conns.add(conn)
        self.stats.accepted += 1
        self.stats.active = len(self._conns)
        conn.start()

    def _forget(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self.stats.active = len(self._conns)

    # ------------------------------------------------------------- faults

    def stall(self, duration: float | None) -> int:
        """Silently stall every open connection for ``duration`` s (None: until closed).
        Returns how many connections were stalled."""
        live = [c for c in self._conns if not c.closing]
        for c in live:
            c.stall(duration)
        if live:
            self.stats.stalls += 1
        return len(live)

    def reset(self, rng: random.Random | None = None, all_connections: bool = False) -> int:
        """RST one open connection (chosen with ``rng``) or all; returns how many."""
        live = sorted((c for c in self._conns if not c.closing), key=id)
        if not live:
            return 0
        victims = live if all_connections else [(rng or random).choice(live)]
        for c in victims:
            c.abort("reset fault")
        self.stats.resets += len(victims)
        return len(victims)

    def stop_accepting(self) -> None:
        """Close the listener: new connections are refused; open ones carry on."""
        listener, task = self._listener, self._accept_task
        self._listener, self._accept_task = None, None
        if listener is None:
            return
        if task is None or task.done():
            listener.close()
            return
        # Close only once the accept task has unwound (the loop watches the fd).
        task.add_done_callback(lambda _t: listener.close())
        task.cancel()

    async def close(self) -> None:
        """Stop accepting and reset every connection; returns when all sockets are closed."""
        task = self._accept_task
        self.stop_accepting()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        for t in list(self._opening):
            t.cancel()
        if self._opening:
            await asyncio.gather(*self._opening, return_exceptions=True)
        for c in list(self._conns):
            c.abort("proxy closed")
        for _ in range(100):
            if not self._conns:
                break
            await asyncio.sleep(0.01)
