"""The compiled link emulator (pyccl-linkemu): delay, window, rates, per-pair
shaping by source address, stall and reset faults, control errors."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pyccl.stress.linkemu import EmulatorError, LinkEmulator, LinkParams, find_binary

try:
    find_binary()
except EmulatorError as exc:  # pragma: no cover - a build without the emulator
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def emulated(params: LinkParams | None = None,
             host: str = "127.0.0.1") -> Iterator[tuple[LinkEmulator, socket.socket, int]]:
    """An emulator with one proxy in front of a listening socket on ``host``."""
    emu = LinkEmulator(threads=2)
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen(16)
    try:
        emu.default(params or LinkParams())
        port = emu.open(srv.getsockname()[1], "dst", upstream_host=host)
        yield emu, srv, port
    finally:
        srv.close()
        emu.close()


def pair(srv: socket.socket, port: int, source: str | None = None) -> tuple[socket.socket, socket.socket]:
    c = socket.socket()
    if source:
        c.bind((source, 0))
    c.connect(("127.0.0.1", port))
    s, _ = srv.accept()
    for x in (c, s):
        x.settimeout(10)
    return c, s


def rtt(a: socket.socket, b: socket.socket) -> float:
    t0 = time.monotonic()
    a.sendall(b"p")
    assert b.recv(1) == b"p"
    b.sendall(b"q")
    assert a.recv(1) == b"q"
    return time.monotonic() - t0


def stream(c: socket.socket, s: socket.socket, nbytes: int) -> float:
    """Seconds to move nbytes from c to s."""
    done = threading.Event()
    got = [0]

    def sink() -> None:
        while got[0] < nbytes:
            k = len(s.recv(1 << 20))
            assert k
            got[0] += k
        done.set()

    t = threading.Thread(target=sink)
    t0 = time.monotonic()
    t.start()
    c.sendall(b"x" * nbytes)
    t.join(30)
    assert done.is_set()
    return time.monotonic() - t0


def test_delay_is_one_way_in_each_direction() -> None:
    with emulated(LinkParams(delay=0.03)) as (_, srv, port):
        c, s = pair(srv, port)
        times = [rtt(c, s) for _ in range(4)]
        assert 0.059 <= min(times) < 0.15, times
        c.close()
        s.close()


def test_window_bounds_one_connection_to_window_over_delay() -> None:
    with emulated(LinkParams(delay=0.02, window=64 << 10)) as (_, srv, port):
        c, s = pair(srv, port)
        secs = stream(c, s, 4 << 20)  # bound: 64 KiB / 20 ms = 3.3 MB/s -> >= 1.28 s
        assert secs >= 0.95 * (4 << 20) / ((64 << 10) / 0.02), secs
        assert secs < 3.0, secs
        c.close()
        s.close()


def test_rate_is_shared_by_a_pairs_connections() -> None:
    with emulated(LinkParams(rate=8e6)) as (_, srv, port):
        conns = [pair(srv, port) for _ in range(2)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=stream, args=(c, s, 2 << 20)) for c, s in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        secs = time.monotonic() - t0
        assert secs >= 0.9 * (4 << 20) / 8e6, secs  # 4 MiB at 8 MB/s in all, not each
        for c, s in conns:
            c.close()
            s.close()


def test_links_are_shaped_per_source_address() -> None:
    with emulated() as (emu, srv, port):
        emu.source("127.1.0.1", "near")
        emu.source("127.1.0.2", "far")
        emu.link("near", "dst", LinkParams(delay=0.001))
        emu.link("far", "dst", LinkParams(delay=0.04))
        near = pair(srv, port, "127.1.0.1")
        far = pair(srv, port, "127.1.0.2")
        assert min(rtt(*near) for _ in range(3)) < 0.03
        assert min(rtt(*far) for _ in range(3)) >= 0.04  # 40 ms there, the default (0) back
        for c, s in (near, far):
            c.close()
            s.close()


def test_stall_is_silent_holds_a_fin_and_ends() -> None:
    with emulated() as (emu, srv, port):
        c, s = pair(srv, port)
        c.sendall(b"a")
        assert s.recv(1) == b"a"
        assert emu.stall(port, 0.6) == 1
        t0 = time.monotonic()
        c.sendall(b"b")
        c.shutdown(socket.SHUT_WR)  # a FIN during the stall is held back too
        s.settimeout(0.4)
        with pytest.raises(TimeoutError):
            s.recv(1)
        s.settimeout(5)
        assert s.recv(1) == b"b"
        assert time.monotonic() - t0 >= 0.55
        assert s.recv(1) == b""
        c2, s2 = pair(srv, port)  # a new connection is not stalled
        assert rtt(c2, s2) < 0.5
        for x in (c, s, c2, s2):
            x.close()


def test_stall_forever_is_a_black_hole_until_closed() -> None:
    with emulated() as (emu, srv, port):
        c, s = pair(srv, port)
        assert emu.stall(port, None) == 1
        c.sendall(b"z" * 1000)
        c.close()
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):
            s.recv(1)  # neither bytes nor EOF
        emu.close_proxy(port)  # closing the proxy resets what it held
        s.settimeout(5)
        with pytest.raises(ConnectionResetError):
            if s.recv(1) == b"":
                raise ConnectionResetError
        s.close()


def test_reset_sends_rst_to_both_ends_and_stats_count() -> None:
    with emulated() as (emu, srv, port):
        c, s = pair(srv, port)
        c.sendall(b"hello")
        assert s.recv(5) == b"hello"
        assert emu.reset(port) == 1
        for x in (c, s):
            with pytest.raises(ConnectionResetError):
                x.recv(10)
            x.close()
        down, up, active, accepted = emu.stats()[port]
        assert (down, up, accepted) == (5, 0, 1)


def test_refuses_when_nobody_is_behind_it_and_after_refuse() -> None:
    emu = LinkEmulator()
    try:
        with socket.socket() as dead:
            dead.bind(("127.0.0.1", 0))
            gone = dead.getsockname()[1]
        port = emu.open(gone, "gone")
        # The emulator accepts, finds nobody behind it and resets the client:
        # the RST may even beat the end of connect().
        with pytest.raises((ConnectionResetError, AssertionError)):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                assert c.recv(1) != b""
            finally:
                c.close()
        emu.refuse(port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        emu.close()


def test_bad_commands_are_refused_with_the_reason() -> None:
    emu = LinkEmulator()
    try:
        with pytest.raises(EmulatorError, match="no proxy on port 9"):
            emu.stall(9, 1.0)
        with pytest.raises(EmulatorError, match="unknown command"):
            emu.request("bogus")
        with pytest.raises(EmulatorError, match="non-negative number"):
            emu.request("default -1 0 0")
        assert emu.stats() == {}
    finally:
        emu.close()
