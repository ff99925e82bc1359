"""The peer's end of the master connection.

One ``ControlClient`` per Communicator. It owns the TCP connection to the
master, a reader thread that validates every incoming frame and hands it to
the Communicator, and a heartbeat timer thread. Sending is thread-safe (op
threads report ``done``/``failed`` directly, without a hand-off).

After the handshake a plain TCP connection is read by the C++ core
(``_core.ControlChannel``, csrc/control/control_channel.h): ``op_ok``
frames wake the caller waiting for that op directly (:mod:`pyccl.peer.verdict`),
heartbeats count as liveness, and every other frame comes back to the reader
thread here, in order, to be parsed and validated as before. Before handing
one on, the reader applies the ``op_ok`` frames that arrived ahead of it and
that no caller has taken yet, so the Communicator sees the master's frames in
the order they were sent. A TLS connection keeps the Python reader for
everything (the core does not speak TLS).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from pyccl import _core, auth, wire
from pyccl import protocol as P
from pyccl.errors import AuthenticationError, CCLError, GroupLost, LostCause, ProtocolError, Timeout

log = logging.getLogger("pyccl.control")

FrameHandler = Callable[[P.MasterFrame], None]
LostHandler = Callable[[LostCause, str], None]


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"``; raise ValueError with the expected form otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"master address {address!r} is not of the form 'host:port'")
    return host, int(port)


class ControlClient:
    """Blocking client of the master's control protocol (see docs/architecture.md)."""

    def __init__(self, address: str, tls_ca: str | None = None) -> None:
        self.address = address
        self._tls_ca = tls_ca  # verify a TLS master against this CA bundle (None: plain TCP)
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._channel: _core.ControlChannel | None = None  # plain TCP after start(): the core reads
        self.peer_id: int = 0
        self.heartbeat_interval = 1.0
        self.heartbeat_timeout = 5.0

    # ------------------------------------------------------------ lifecycle

    def open(self, timeout: float) -> str:
        """Connect to the master; returns the local IP the master sees us on."""
        host, port = parse_address(self.address)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise CCLError(
                f"cannot reach the master at {self.address} ({exc}); check that `pyccl master` runs there"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls_ca is not None:
            ctx = ssl.create_default_context(cafile=self._tls_ca)
            try:
                sock = ctx.wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise AuthenticationError(
                    f"the master at {self.address} did not present a certificate that {self._tls_ca} vouches "
                    f"for ({exc}); check tls_ca (or PYCCL_TLS_CA) and the master's --tls-cert",
                    master=self.address) from exc
        self._sock = sock
        return str(sock.getsockname()[0])

    def handshake(self, hello: P.Hello, timeout: float, secret: bytes | None) -> P.Welcome:
        """Send ``hello``, answer a challenge with the proof of ``secret`` (see
        :mod:`pyccl.auth`), and wait for ``welcome``; returns it."""
        assert hello.nonce is not None
        self.send(hello)
        deadline = time.monotonic() + timeout
        frame = self._receive(deadline, timeout)
        if isinstance(frame, P.Challenge):
            if secret is None:
                raise AuthenticationError(
                    f"the master at {self.address} requires the run secret: set PYCCL_SECRET (or pass secret= to "
                    "the Communicator) to the master's secret", master=self.address)
            if not auth.same(frame.proof, auth.master_proof(secret, hello.nonce, frame.nonce)):
                raise AuthenticationError(
                    f"the master at {self.address} could not prove it holds this peer's run secret: the secrets "
                    "differ (check PYCCL_SECRET / secret= on both sides), or this is not the run's master",
                    master=self.address)
            self.send(P.Auth(auth.peer_proof(secret, hello.nonce, frame.nonce)))
            frame = self._receive(deadline, timeout)
        elif isinstance(frame, P.Welcome) and secret is not None:
            raise AuthenticationError(
                f"the master at {self.address} runs without a secret, but this peer was given one: start the "
                "master with the secret (--secret-file, secret= or PYCCL_SECRET), or give this peer none",
                master=self.address)
        if isinstance(frame, P.Error):
            if frame.kind == "standby":  # not the active master: the caller tries the next one
                raise CCLError(f"the master at {self.address} is not active: {frame.reason}")
            if frame.kind == "auth":
                raise AuthenticationError(f"the master at {self.address} refused this peer: {frame.reason}",
                                          master=self.address)
            raise GroupLost(f"the master at {self.address} refused this peer: {frame.reason}",
                            cause=LostCause.EXPELLED, reason=frame.reason)
        if not isinstance(frame, P.Welcome):
            raise ProtocolError(f"expected 'welcome' from the master at {self.address}, got {frame.TYPE!r}")
        self.peer_id = frame.peer_id
        self.heartbeat_interval = frame.heartbeat_interval
        self.heartbeat_timeout = frame.heartbeat_timeout
        return frame

    def _receive(self, deadline: float, timeout: float) -> P.MasterFrame:
        """One frame of the handshake, by ``deadline``."""
        assert self._sock is not None
        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            return P.parse_master_frame(wire.recv_frame(self._sock))
        except TimeoutError as exc:
            raise Timeout(f"the master at {self.address} did not answer the hello within {timeout:.1f} s",
                          seconds=timeout) from exc
        except (ConnectionError, OSError) as exc:
            raise CCLError(f"the master at {self.address} closed the connection during the hello ({exc})") from exc
        except wire.FrameError as exc:
            raise ProtocolError(f"the master at {self.address} sent an invalid frame: {exc}") from exc
        finally:
            self._sock.settimeout(None)

    @property
    def channel(self) -> _core.ControlChannel | None:
        """The core's reader of this connection (None: TLS, or not started)."""
        return self._channel

    def start(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        """Start the reader and heartbeat threads."""
        assert self._sock is not None
        if not isinstance(self._sock, ssl.SSLSocket):
            # preempt=False: the background reader is not asked to step aside for
            # a waiting caller; on 2 cores the extra hand-offs cost more than
            # the hop they save (benchmarks/results/latency_split.md).
            self._channel = _core.ControlChannel(self._sock.fileno(), self.heartbeat_timeout, preempt=False)
        reader = threading.Thread(target=self._read_loop, args=(on_frame, on_lost), name="pyccl-control", daemon=True)
        beat = threading.Thread(target=self._heartbeat_loop, name="pyccl-heartbeat", daemon=True)
        self._threads = [reader, beat]
        for t in self._threads:
            t.start()

    def close(self, say_bye: bool = True) -> None:
        """Leave (optionally with ``bye``), close the socket and join the threads."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            if say_bye:
                try:
                    self.send(P.Bye())
                except CCLError:
                    pass
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader; later reads see EOF at once
            except OSError:
                pass
        if self._channel is not None:
            self._channel.end(_core.ChannelEnd.STOPPED, "the connection was closed")
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5.0)
                if t.is_alive():
                    log.warning("thread %s did not stop within 5 s of closing the connection to the master at %s",
                                t.name, self.address)
        self._threads = []
        # The descriptor is released only after the reader is gone: a thread
        # about to poll a number that was just closed and handed to a new
        # socket (the data plane opens them all the time) would wait on that
        # socket instead and miss the shutdown.
        if sock is not None:
            sock.close()

    # -------------------------------------------------------------- sending

    def send(self, frame: P.PeerFrame) -> None:
        data = wire.encode(frame.to_wire())
        channel = self._channel
        if channel is not None:
            if not channel.send(data):  # the core serialises every sender
                raise CCLError(f"lost the connection to the master at {self.address}")
            return
        sock = self._sock
        if sock is None:
            raise CCLError("not connected to the master")
        try:
            with self._send_lock:
                sock.sendall(data)  # the socket's timeout also bounds a send to a stuck master
        except OSError as exc:
            raise CCLError(f"lost the connection to the master at {self.address} ({exc})") from exc

    # -------------------------------------------------------------- threads

    def _next_from_socket(self) -> P.MasterFrame:
        assert self._sock is not None
        return P.parse_master_frame(wire.recv_frame(self._sock))

    def _next_from_core(self, channel: _core.ControlChannel, on_frame: FrameHandler) -> P.MasterFrame:
        """The next frame the core hands over; its endings raise what a socket read would."""
        end, data = channel.next_frame()
        if end == _core.ChannelEnd.NONE:
            self._hand_decided(channel, on_frame)  # op_ok frames that came before this one
            return P.parse_master_frame(wire.decode_body(data))
        why = data.decode("utf-8", "replace")
        if end == _core.ChannelEnd.SILENT:
            raise TimeoutError(why)
        if end == _core.ChannelEnd.INVALID:
            raise wire.FrameError(why)
        raise ConnectionError(why)

    @staticmethod
    def _hand_decided(channel: _core.ControlChannel, on_frame: FrameHandler) -> None:
        for epoch, tag, seq in channel.take_decided():
            on_frame(P.OpOk(epoch, tag, seq))

    def _read_loop(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        assert self._sock is not None
        reason = f"the master at {self.address} closed the connection"
        cause = LostCause.MASTER_UNREACHABLE
        # The master heart-beats every interval (a fifth of the timeout): a
        # timeout of silence means it froze or the path to it died.
        silence = self.heartbeat_timeout
        channel = self._channel
        if channel is None:
            self._sock.settimeout(silence)
        try:
            while not self._stop.is_set():
                try:
                    frame = (self._next_from_socket() if channel is None
                             else self._next_from_core(channel, on_frame))
                except TimeoutError:
                    reason = f"the master at {self.address} sent nothing for {silence:.1f} s"
                    log.warning("%s; closing the connection", reason)
                    break
                if isinstance(frame, P.Error):
                    reason = f"the master at {self.address} removed this peer: {frame.reason}"
                    # A master that stepped down is gone for us like a dead one.
                    cause = LostCause.MASTER_UNREACHABLE if frame.kind == "standby" else LostCause.EXPELLED
                    log.error("%s", reason)
                    break
                if not isinstance(frame, P.Heartbeat):
                    on_frame(frame)
                if channel is not None:
                    channel.wake()  # callers waiting in the core look at the new state
        except wire.FrameError as exc:
            reason = f"the master sent an invalid frame ({exc})"
            log.error("%s; leaving the group", reason)
        except (ConnectionError, OSError) as exc:
            if not self._stop.is_set():
                reason = f"lost the connection to the master at {self.address} ({exc})"
        except CCLError as exc:  # a handler could not answer the master
            reason = str(exc)
        except Exception as exc:  # a bug in a handler must not die silently
            reason = f"control thread failed: {type(exc).__name__}: {exc}"
            if not self._stop.is_set():
                log.exception("control thread failed")
        if channel is not None:
            channel.end(_core.ChannelEnd.STOPPED, reason)  # callers now wait on the Communicator's state
            try:
                self._hand_decided(channel, on_frame)  # commits that arrived before the end still count
            except Exception:
                log.exception("control thread failed applying the last op_ok frames")
        if not self._stop.is_set():
            on_lost(cause, reason)

    def _heartbeat_loop(self) -> None:
        # A timer, not a poll: sleeps on the stop event between beats.
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self.send(P.HEARTBEAT)
            except CCLError:
                return
