"""Child processes of a stress run: the master, and free ports for the peers.

Every child is started with the ``spawn`` context from the orchestrator's
main thread and asks Linux to SIGKILL it when the orchestrator dies, so an
interrupted run leaves nothing behind.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import signal
import socket
import sys
import time
from typing import Any

__all__ = ["MasterProcess", "PortPool"]

log = logging.getLogger("pyccl.stress")


def _master_main(heartbeat_timeout: float, pipe: Any, log_path: str, secret: bytes | None, port: int,
                 hold: float) -> None:
    from pyccl.stress.worker import _die_with_parent, _redirect_output

    _die_with_parent()
    _redirect_output(log_path)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s master %(levelname)s %(name)s: %(message)s")
    import pyccl

    master = pyccl.Master(host="127.0.0.1", port=port, heartbeat_timeout=heartbeat_timeout,
                          secret=secret, recovery_hold=hold).start()
    pipe.send(master.address)
    try:
        pipe.recv()  # any message, or EOF when the orchestrator goes away, means stop
    except (EOFError, OSError):
        pass
    master.stop()
    os._exit(0)


class MasterProcess:
    """``pyccl.Master`` in a child process (its latency is on every op's critical path,
    so it gets its own interpreter and GIL). ``port``/``hold``: a master
    restarted after a kill binds the old address and holds new groups while
    the members re-register (see :class:`pyccl.Master`)."""

    def __init__(self, heartbeat_timeout: float, log_path: str, secret: bytes | None = None, port: int = 0,
                 hold: float = 0.0) -> None:
        ctx = mp.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_master_main, args=(heartbeat_timeout, child, log_path, secret, port, hold),
                                 name="pyccl-stress-master", daemon=True)
        self._proc.start()
        child.close()
        self.address = ""

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Block until the master listens; returns its ``host:port``."""
        if not self._pipe.poll(timeout):
            self.stop()
            raise RuntimeError(f"the master process did not start within {timeout:g} s")
        self.address = self._pipe.recv()
        return self.address

    @property
    def alive(self) -> bool:
        """Started, and neither killed nor stopped."""
        return not self._pipe.closed and self._proc.exitcode is None

    def kill(self) -> None:
        """SIGKILL (a fault): nothing is closed gracefully."""
        if self._proc.pid is not None and self._proc.exitcode is None:
            os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.join(10.0)
        self._pipe.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._pipe.closed:
            return
        try:
            self._pipe.send("stop")
        except (OSError, BrokenPipeError):
            pass
        self._proc.join(timeout)
        if self._proc.exitcode is None and self._proc.pid is not None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.join(5.0)
        self._pipe.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


class PortPool:
    """Hands out free TCP ports on 127.0.0.1 for peers' data listeners.

    A peer's port is chosen before the peer starts (its proxy must know
    where to forward), so it is picked *below* the kernel's ephemeral range:
    there, no outgoing connection of the busy machine can take it between
    the check and the peer's bind. Ports are not handed out twice in a run.
    """

    def __init__(self, seed: int = 0, low: int = 20000) -> None:
        eph_lo, _ = _ephemeral_range()
        self.low = low
        self.high = max(low + 1000, eph_lo - 1) if eph_lo > low + 1000 else 65000
        self._rng = random.Random(seed ^ os.getpid() ^ int(time.time()))
        self._used: set[int] = set()

    def take(self) -> int:
        for _ in range(2000):
            port = self._rng.randint(self.low, self.high)
            if port in self._used:
                continue
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            self._used.add(port)
            return port
        raise RuntimeError("no free TCP port found for a peer")
