"""The master's I/O layer: an asyncio (uvloop) TCP server around MasterState.

This module only moves bytes and time: it splits the byte stream into frames
(bounded by :data:`pyccl.wire.MAX_FRAME_BYTES` before anything is buffered),
hands each frame to :class:`~pyccl.master.state.MasterState`, and carries
out the returned actions. Every protocol decision lives in the state machine.

Latency matters here: an ``op_ok`` sits on every collective's critical path.
So frames are parsed straight out of the received chunk when possible, each
fan-out frame is encoded once and written with ``transport.write`` (no
awaits), and the timer sleeps until the state's next deadline instead of
polling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from pyccl.auth import resolve_secret
from pyccl.master.state import Action, MasterState
from pyccl.master.verdicts import Verdict
from pyccl.master.watch import watch_loop
from pyccl.master.writer import MAX_WRITE_BUFFER, Writer
from pyccl.protocol import HEARTBEAT
from pyccl.wire import FrameError, clip, decode_body, decode_length, encode

__all__ = ["Master", "DEFAULT_PORT"]

log = logging.getLogger("pyccl.master")

DEFAULT_PORT = 48148
# How long stop() lets closed connections flush before aborting them.
_CLOSE_GRACE_S = 1.0
# Listen backlog (the kernel caps it at net.core.somaxconn): a join storm of
# thousands of peers must queue, not have its SYNs dropped and retried 1-3 s
# later into many small epochs.
LISTEN_BACKLOG = 65535


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (one descriptor
    per peer: 10,000 peers need more than the usual 1024); returns it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            log.warning("cannot raise the open-file limit from %d to %d; the master serves at most about %d peers",
                        soft, hard, soft)
    return int(soft)


def replacement_ids() -> int:
    """First peer id of a master that may replace another: above every id an
    earlier master gave out (unless it admitted over a million peers a
    second), so fresh peers and re-registering members never collide."""
    return (int(time.time()) << 20) + 1


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; degrade, don't die
        log.warning("uvloop is not installed; the master runs on the default asyncio loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_and_close(loop: asyncio.AbstractEventLoop, main: Any) -> None:
    """``loop.run_until_complete(main)``, then asyncio.run-style cleanup and close.

    Cancelling leftover tasks matters: the default loop accepts connections
    in a task, and one caught by shutdown must close its socket rather than
    leak it (the peer would never see EOF).
    """
    try:
        loop.run_until_complete(main)
    finally:
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(asyncio.sleep(0))  # transports' close callbacks
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _format_addr(sockaddr: Any) -> str:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = sockaddr[0], sockaddr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockaddr)


class _Core:
    """Loop-thread glue: connections <-> state machine, plus the deadline timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state: MasterState) -> None:
        self.loop = loop
        self.state = state
        self.transports: dict[int, asyncio.Transport] = {}
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._now = 0.0
        self._closing = False
        self._all_closed: asyncio.Event | None = None
        self.writer = Writer(loop, self.transports, self.overflow)

    def now(self) -> float:
        # The state machine wants non-decreasing times; loop timers may fire a
        # hair early, and we report those as exactly on time (see _on_timer).
        t = self.loop.time()
        if t > self._now:
            self._now = t
        return self._now

    # -- connections

    def accept(self, transport: asyncio.Transport) -> tuple[int, str]:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # not TCP (tests may use other transports)
                pass
        conn_id = next(self._ids)
        addr = _format_addr(transport.get_extra_info("peername"))
        self.transports[conn_id] = transport
        if self._closing:
            transport.close()
            return conn_id, addr
        self.apply(self.state.on_connect(conn_id, self.now(), addr))
        self.rearm()
        return conn_id, addr

    def lost(self, conn_id: int) -> None:
        self.transports.pop(conn_id, None)
        if self._closing:
            # Shutting down: nobody is left to tell, and logging every member
            # as "died" would only be noise.
            if not self.transports and self._all_closed is not None:
                self._all_closed.set()
            return
        self.apply(self.state.on_disconnect(conn_id, self.now()))
        self.rearm()

    def frame(self, conn_id: int, frame: dict[str, Any], now: float) -> None:
        try:
            actions = self.state.on_frame(conn_id, frame, now)
        except Exception:  # a bug in the state machine must not take the server down
            log.exception("internal error handling a %s frame on connection %d", clip(frame.get("type"), 40), conn_id)
            actions = self.state.on_bad_frame(conn_id, "internal error in the master", now)
        self.apply(actions)

    def done(self, conn_id: int, frame: dict[str, Any], now: float) -> bool:
        """A ``done`` frame (the hot path); True if the timer may need re-arming."""
        try:
            result = self.state.on_done(conn_id, frame, now)
        except Exception:  # a bug in the state machine must not take the server down
            log.exception("internal error handling a done frame on connection %d", conn_id)
            result = self.state.on_bad_frame(conn_id, "internal error in the master", now)
        if type(result) is Verdict:
            self.writer.fan_out(result)
            return False  # a done only moves deadlines later: the armed timer stands
        assert isinstance(result, list)
        if result:
            self.apply(result)
        return bool(result)

    def bad_frame(self, conn_id: int, why: str, now: float) -> None:
        self.apply(self.state.on_bad_frame(conn_id, why, now))
        t = self.transports.get(conn_id)
        if t is not None and not t.is_closing():  # the state no longer knew it: close anyway
            t.close()

    # -- actions

    def apply(self, actions: Iterable[Action]) -> None:
        """Carry out actions (see :class:`~pyccl.master.writer.Writer`)."""
        self.writer.apply(actions)

    def overflow(self, conn_ids: list[int]) -> None:
        """Connections that stopped reading (unsent bytes over the limit) are treated as dead."""
        for conn_id in conn_ids:
            t = self.transports.get(conn_id)
            if t is None or t.is_closing():
                continue
            cause = f"not reading its connection (over {MAX_WRITE_BUFFER} bytes unsent)"
            more = self.state.on_disconnect(conn_id, self.now(), cause)
            t.abort()
            self.apply(more)

    # -- timer

    def rearm(self) -> None:
        """Make sure the timer fires no later than the state's next deadline.

        Deadlines only move later when peers send frames, so an armed timer is
        kept unless the new deadline is earlier: at worst it fires once for
        nothing and re-arms. That keeps the per-frame cost at one comparison.
        """
        deadline = self.state.next_deadline()
        if deadline is None or self._closing:
            return
        if self._timer is not None:
            if deadline >= self._timer_at:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.now()
        if now < self._timer_at:  # fired early by the loop's clock granularity
            now = self._now = self._timer_at
        try:
            self.apply(self.state.on_tick(now))
        except Exception:  # never lose the timer: without it nobody is ever declared dead
            log.exception("internal error in the master's timer")
        finally:
            self.rearm()

    # -- shutdown

    async def close_all(self, server: asyncio.AbstractServer) -> None:
        """Stop accepting, close every connection (flushing briefly), stop the timer."""
        self._closing = True
        self.writer.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server.close()
        # The default asyncio loop finishes accepting in a task; let those run
        # so that late arrivals are closed by accept() instead of leaking.
        # (On CPython < 3.12 a connection whose accept task starts after
        # server.close() hits an assertion inside asyncio and its socket is
        # only closed by the GC; uvloop, the normal case, has no such race.)
        for _ in range(3):
            await asyncio.sleep(0)
        self._all_closed = asyncio.Event()
        for t in list(self.transports.values()):
            t.close()
        if self.transports:
            try:
                await asyncio.wait_for(self._all_closed.wait(), _CLOSE_GRACE_S)
            except asyncio.TimeoutError:
                for t in list(self.transports.values()):
                    t.abort()
                await asyncio.sleep(0)  # let connection_lost run


class _Connection(asyncio.Protocol):
    """One control connection: splits the byte stream into frames."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._transport: asyncio.Transport | None = None
        self._conn_id = 0
        self._addr = "?"
        self._buf = bytearray()  # bytes of an incomplete frame
        self._need = 4  # bytes _buf must hold before parsing is worth trying

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack alike.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._conn_id, self._addr = self._core.accept(transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        core = self._core
        now = core.now()
        conn_id = self._conn_id
        pos = 0
        end = len(data)
        rearm = False
        try:
            while end - pos >= 4:
                n = decode_length(data[pos : pos + 4])
                if end - pos - 4 < n:
                    break
                frame = decode_body(data[pos + 4 : pos + 4 + n])
                pos += 4 + n
                if frame["type"] == "done":
                    rearm = core.done(conn_id, frame, now) or rearm
                else:
                    core.frame(conn_id, frame, now)
                    rearm = True
                if transport.is_closing():
                    return
        except FrameError as exc:
            rearm = True
            core.bad_frame(conn_id, str(exc), now)
            return
        finally:
            if rearm:
                core.rearm()
        if pos < end:
            buf += data[pos:]
            self._need = 4 if len(buf) < 4 else 4 + int.from_bytes(buf[:4], "big")

    def eof_received(self) -> bool:
        if self._buf and self._transport is not None and not self._transport.is_closing():
            self._core.bad_frame(
                self._conn_id,
                f"truncated frame: connection closed with {len(self._buf)} of {self._need} bytes received",
                self._core.now(),
            )
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._core.lost(self._conn_id)


class Master:
    """The coordinator of one training run: one instance, one listening port.

    Contract:
        * ``Master(host, port=0)``: port 0 picks a free port. Nothing happens
          until :meth:`start` or :meth:`serve_forever`.
        * :meth:`start` runs the server on a daemon thread and returns once it
          listens; it raises ``OSError`` if the address cannot be bound.
        * :attr:`address` is ``"host:port"`` as bound, for ``Communicator``.
        * :meth:`stop` closes every connection, stops the loop and joins the
          thread; it is idempotent and safe to call if never started.
        * A Master is single-use: it cannot be started again after stop().
        * Usable as a context manager (``with Master() as m:`` starts it).
        * ``tls_cert``/``tls_key``: serve the control port over TLS (peers
          pass ``tls_ca=``), so membership traffic is encrypted; tensor
          traffic on the data plane is not (use a VPN where it must be).
        * ``secret`` (default: ``PYCCL_SECRET`` from the environment): only
          peers that prove they hold it are admitted; without one the run
          is open to anyone who can reach the port (logged once at start).
        * ``recovery_hold``: a master restarted in a running job waits this
          long before forming a *new* group from fresh peers, so that the
          previous members re-register first and the run goes on (see
          :mod:`pyccl.master.recovery`); 0 (the default here) admits at once.
        * ``standby_of="host:port"``: a standby. It serves no peer, probes that
          master every heartbeat interval and takes over once it has not
          answered for a heartbeat timeout (see :mod:`pyccl.master.standby`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_timeout: float = 5.0,
        heartbeat_interval: float | None = None,
        secret: str | bytes | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        recovery_hold: float = 0.0,
        standby_of: str | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: pass both (or neither, for a plain control port)")
        self._tls: ssl.SSLContext | None = None
        if tls_cert is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls.load_cert_chain(tls_cert, tls_key)
        self._host = host
        self._port = port
        self._secret = resolve_secret(secret)
        # Built now so that bad timeouts fail in the caller's thread.
        if standby_of is not None and not recovery_hold:
            recovery_hold = heartbeat_timeout  # after a takeover, members re-register before new groups form
        self._state = MasterState(heartbeat_timeout, heartbeat_interval, secret=self._secret,
                                  recovery_hold=recovery_hold, standby=standby_of is not None,
                                  first_peer_id=replacement_ids() if recovery_hold else 1)
        self._state.watch_address = standby_of
        self._lock = threading.Lock()
        self._used = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._bound: tuple[str, int] | None = None

    # -- public API

    @property
    def address(self) -> str:
        """``"host:port"`` the master listens on (after start)."""
        host, port = self._require_bound()
        return _format_addr((host, port))

    @property
    def host(self) -> str:
        return self._require_bound()[0]

    @property
    def port(self) -> int:
        return self._require_bound()[1]

    @property
    def heartbeat_timeout(self) -> float:
        return self._state.heartbeat_timeout

    def start(self) -> Master:
        """Listen and serve on a daemon thread; return once listening."""
        self._claim()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = _new_loop()
            asyncio.set_event_loop(loop)
            try:
                _run_and_close(loop, self._main(loop, ready.set, install_signals=False))
            except BaseException as exc:  # bind failure (reported to start()) or a crash
                if not ready.is_set():
                    failure.append(exc)
                    ready.set()
                else:
                    log.exception("master loop crashed")

        self._thread = threading.Thread(target=run, name="pyccl-master", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until SIGINT/SIGTERM (or :meth:`stop`)."""
        self._claim()
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            main_thread = threading.current_thread() is threading.main_thread()
            _run_and_close(loop, self._main(loop, lambda: None, install_signals=main_thread))
        finally:
            asyncio.set_event_loop(None)

    def stop(self) -> None:
        """Close every connection, stop serving, join the thread. Idempotent."""
        with self._lock:
            loop, event, thread = self._loop, self._stop_event, self._thread
            self._used = True  # a never-started Master cannot be started after stop()
        if thread is not None and thread is threading.current_thread():
            raise RuntimeError("Master.stop() called from the master's own thread")
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed in between: already stopped
                pass
        if thread is not None:
            thread.join()

    def __enter__(self) -> Master:
        if self._bound is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.address if self._bound else f"{self._host}:{self._port} (not started)"
        return f"Master({where})"

    # -- internals

    def _claim(self) -> None:
        with self._lock:
            if self._used:
                raise RuntimeError("this Master was already started (or stopped); create a new one")
            self._used = True

    def _require_bound(self) -> tuple[str, int]:
        if self._bound is None:
            raise RuntimeError("the master is not listening; call start() first")
        return self._bound

    async def _beat(self, core: _Core) -> None:
        """Send every connection a heartbeat each interval, so that peers can
        tell a frozen or unreachable master from a quiet one (they give up
        after two heartbeat timeouts of silence). A timer, not a poll."""
        data = encode(HEARTBEAT.to_wire())
        interval = self._state.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            wants = self._state.wants_heartbeat
            core.writer.broadcast([c for c in core.transports if wants(c)], data)

    async def _main(self, loop: asyncio.AbstractEventLoop, ready: Callable[[], None], install_signals: bool) -> None:
        core = _Core(loop, self._state)
        raise_fd_limit()
        server = await loop.create_server(
            lambda: _Connection(core), self._host, self._port, reuse_address=True, backlog=LISTEN_BACKLOG,
            ssl=self._tls
        )
        stop_event = asyncio.Event()
        sockname = server.sockets[0].getsockname()
        with self._lock:
            self._loop, self._stop_event = loop, stop_event
            self._bound = (str(sockname[0]), int(sockname[1]))
        log.info("pyccl master listening on %s (heartbeat timeout %g s)", self.address, self._state.heartbeat_timeout)
        if self._secret is None:
            log.warning("pyccl master on %s runs without a secret: anyone who can reach this port can join the "
                        "run; set PYCCL_SECRET or pass --secret-file / secret= to admit only peers that hold it",
                        self.address)
        signals = (signal.SIGINT, signal.SIGTERM) if install_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, stop_event.set)
        ready()
        beat = loop.create_task(self._beat(core))
        watch = loop.create_task(watch_loop(core, self._state, self._secret, self.address, self._tls is not None))
        try:
            await stop_event.wait()
        finally:
            beat.cancel()
            watch.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
            log.info("pyccl master on %s stopping", self.address)
            await core.close_all(server)
            await server.wait_closed()
