"""Client of the compiled link emulator (``pyccl-linkemu``, ``csrc/linkemu/``).

The emulator is one process of epoll worker threads that proxies every
peer's data port. Unlike :mod:`pyccl.stress.proxy` (asyncio, about
0.6 GB/s) it is not the bottleneck of what it emulates, and it shapes each
*ordered pair* of peers: a connection's source peer is known from its source
address (each peer binds its data connections to its own loopback address,
``Communicator(data_host=...)``), its destination from the proxy it reached.

:class:`LinkEmulator` is the blocking client (one request at a time, a line
each way); :class:`pyccl.stress.emunet.CompiledNetem` gives it the
asynchronous interface ``pyccl stress`` drives. The binary is looked up in ``PYCCL_LINKEMU``, next to
the installed package (``pip install .`` puts it there), then on ``PATH``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LinkParams", "LinkEmulator", "EmulatorError", "find_binary"]

log = logging.getLogger("pyccl.stress.linkemu")

BINARY = "pyccl-linkemu"


class EmulatorError(RuntimeError):
    """The emulator refused a command or went away."""

    def __init__(self, message: str, command: str = "") -> None:
        super().__init__(message)
        self.command = command


@dataclass(frozen=True)
class LinkParams:
    """One direction of an emulated path: one-way delay (s), rate (B/s, None:
    unlimited) shared by the pair's connections, window (bytes in flight per
    connection and direction, None: the emulator's default line)."""

    delay: float = 0.0
    rate: float | None = None
    window: int | None = None

    def words(self) -> str:
        return f"{self.delay:.9f} {self.rate or 0:.0f} {self.window or 0}"

    def connection_bound(self) -> float | None:
        """Upper bound on one connection's throughput in B/s (None: unbounded)."""
        bounds = []
        if self.window and self.delay > 0:
            bounds.append(self.window / self.delay)
        if self.rate:
            bounds.append(self.rate)
        return min(bounds) if bounds else None


def find_binary() -> str:
    """Path of ``pyccl-linkemu``; raises :class:`EmulatorError` saying how to build it."""
    env = os.environ.get("PYCCL_LINKEMU")
    candidates = [env] if env else []
    candidates.append(str(Path(__file__).resolve().parent.parent / BINARY))
    which = shutil.which(BINARY)
    if which:
        candidates.append(which)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise EmulatorError(f"{BINARY} was not found (looked in PYCCL_LINKEMU, the pyccl package and PATH); "
                        f"build it with cmake (target {BINARY}) and copy it next to pyccl/_core*.so, "
                        "or pip install the package")


class LinkEmulator:
    """A running ``pyccl-linkemu`` process (blocking client, thread-safe).

    ``open(upstream_port, name)`` puts a proxy in front of a peer's data port
    and returns the port to advertise; ``source``/``link``/``uplink``/
    ``default`` describe the geography; ``stall``/``reset``/``refuse`` are
    the faults; ``close()`` ends the process (every proxied connection is
    reset).
    """

    def __init__(self, threads: int = 2, seed: int = 0, log_path: str | None = None) -> None:
        self._lock = threading.Lock()
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen([find_binary(), "--threads", str(threads), "--seed", str(seed)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, bufsize=1)
        ready = self._readline()
        if ready != "ready":
            self.close()
            raise EmulatorError(f"{BINARY} did not start (said {ready!r})")

    def _readline(self) -> str:
        assert self._proc.stdout is not None
        return self._proc.stdout.readline().strip()

    def request(self, command: str) -> list[str]:
        """Sends one command line; returns the words after ``ok``."""
        with self._lock:
            if self._proc.poll() is not None or self._proc.stdin is None:
                raise EmulatorError(f"{BINARY} is not running", command)
            try:
                self._proc.stdin.write(command + "\n")
                self._proc.stdin.flush()
            except OSError as exc:
                raise EmulatorError(f"{BINARY} went away", command) from exc
            reply = self._readline()
        word, _, rest = reply.partition(" ")
        if word != "ok":
            raise EmulatorError(f"{BINARY} refused {command.split()[0]!r}: {rest or 'it went away'}", command)
        return rest.split()

    # ------------------------------------------------------------ geography

    def open(self, upstream_port: int, name: str, upstream_host: str = "127.0.0.1",
             listen_host: str = "127.0.0.1") -> int:
        """A proxy for peer ``name`` in front of upstream; returns its port."""
        return int(self.request(f"open {name} {upstream_host} {upstream_port} {listen_host}")[0])

    def source(self, ip: str, peer: str) -> None:
        self.request(f"source {ip} {peer}")

    def link(self, src: str, dst: str, params: LinkParams, shared: str = "") -> None:
        """Shape src -> dst; pairs naming the same ``shared`` share one rate (a region-to-region pipe)."""
        self.request(f"link {src} {dst} {params.words()}" + (f" {shared}" if shared else ""))

    def default(self, params: LinkParams) -> None:
        self.request(f"default {params.words()}")

    def uplink(self, peer: str, rate: float) -> None:
        self.request(f"uplink {peer} {rate:.0f}")

    # ---------------------------------------------------------------- faults

    def stall(self, port: int, duration: float | None) -> int:
        return int(self.request(f"stall {port} {'forever' if duration is None else f'{duration:.6f}'}")[0])

    def reset(self, port: int, all_connections: bool = False) -> int:
        return int(self.request(f"reset {port} {'all' if all_connections else 'one'}")[0])

    def refuse(self, port: int) -> None:
        self.request(f"refuse {port}")

    def close_proxy(self, port: int) -> None:
        self.request(f"close {port}")

    def stats(self) -> dict[int, list[int]]:
        """{proxy port: [down, up, active, accepted]}"""
        out: dict[int, list[int]] = {}
        for item in self.request("stats"):
            port, *vals = (int(v) for v in item.split(":"))
            out[port] = vals
        return out

    def close(self) -> None:
        with self._lock:
            if self._proc.stdin is not None:
                try:
                    self._proc.stdin.close()
                except OSError:
                    pass
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            if self._log is not subprocess.DEVNULL:
                self._log.close()  # type: ignore[union-attr]
