"""Shared machinery for the multi-process tests on loopback.

The master runs inside the test process; every peer is a child started with
the ``spawn`` context, so it shares nothing with the test but the arguments.
Children report to the test through a ``multiprocessing`` queue:

* ``("ready", idx, payload)`` / ``("result", idx, payload)`` / any other kind
  the test and its child agree on;
* ``("error", idx, traceback_text)`` when the child's body raised: the test
  fails at once with the child's traceback instead of timing out.

:class:`PeerProcs` owns the children: it kills (SIGCONT + SIGKILL) and joins
every one of them on exit, so a failing test leaves no process behind.

Children import this module by name (``mp_helpers``): pytest puts ``tests/``
on ``sys.path`` and ``spawn`` hands ``sys.path`` to every child.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

CTX = mp.get_context("spawn")

# Wire layouts of the data plane (csrc/net/wire_format.h), little-endian.
LINK_MAGIC = 0x4B4E4C50  # "PLNK"
DATA_MAGIC = 0x41544450  # "PDTA"


def digest(a: Any) -> str:
    """sha1 of the raw bytes of a numpy array or torch tensor."""
    if not isinstance(a, np.ndarray):  # torch tensor (bfloat16 has no numpy twin)
        import torch

        a = a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.uint8).numpy()
    return hashlib.sha1(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()


# --------------------------------------------------------------- child side


def child_main(body: Callable[..., Any], idx: int, q: Any, *args: Any) -> None:
    """Run ``body(idx, q, *args)`` in a child; report an exception as ``error``.

    SIGUSR1 dumps every thread's stack to stderr (the test sends it before
    giving up on a child that hangs)."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        body(idx, q, *args)
    except BaseException:
        q.put(("error", idx, traceback.format_exc()))
        raise


def redirect_stderr(path: str) -> None:
    """Send this process's fd 2 (where the C++ core logs) to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def join_group(address: str, n: int, connections: int = 2, timeout: float = 60.0, name: str = "") -> Any:
    """Connect and call update_topology() (from the very first iteration on)
    until the group has ``n`` members. Returns the Communicator."""
    import pyccl

    comm = pyccl.Communicator(address, connections=connections, name=name)
    comm.connect(timeout=timeout)
    deadline = time.monotonic() + timeout
    while comm.world_size < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"group did not reach {n} members in {timeout} s (has {comm.world_size})")
        if not comm.update_topology():
            time.sleep(0.005)
    if comm.world_size != n:
        raise AssertionError(f"group overshot: {comm.world_size} members, expected {n}")
    return comm


# ---------------------------------------------------------------- test side


class ChildError(AssertionError):
    pass


class PeerProcs:
    """Children of one test. Use as a context manager; exit kills and joins all."""

    def __init__(self) -> None:
        self.q = CTX.Queue()
        self.procs: dict[int, Any] = {}
        self.expected_dead: set[int] = set()

    def start(self, idx: int, body: Callable[..., Any], *args: Any) -> Any:
        p = CTX.Process(target=child_main, args=(body, idx, self.q, *args), name=f"pyccl-test-peer-{idx}", daemon=True)
        p.start()
        self.procs[idx] = p
        return p

    def pid(self, idx: int) -> int:
        return self.procs[idx].pid

    def signal(self, idx: int, sig: int) -> None:
        os.kill(self.procs[idx].pid, sig)

    def get(
        self, timeout: float, kinds: tuple[str, ...] | None = None, ignore: tuple[str, ...] = ()
    ) -> tuple[str, int, Any]:
        """Next message (of one of ``kinds`` if given; others are an error,
        except kinds in ``ignore``, which are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.dump_stacks()
                raise ChildError(f"no message from the peers within {timeout:.0f} s; {self.describe()}")
            try:
                kind, idx, payload = self.q.get(timeout=min(left, 0.5))
            except queue_mod.Empty:
                for i, p in self.procs.items():
                    if i not in self.expected_dead and p.exitcode not in (None, 0):
                        # Give a last report a moment to arrive before blaming the exit.
                        with contextlib.suppress(queue_mod.Empty):
                            kind, idx, payload = self.q.get(timeout=1.0)
                            break
                        raise ChildError(f"peer {i} exited with code {p.exitcode}; {self.describe()}") from None
                else:
                    continue
            if kind == "error":
                raise ChildError(f"peer {idx} failed:\n{payload}")
            if kind in ignore:
                continue
            if kinds is not None and kind not in kinds:
                raise ChildError(f"unexpected message {kind!r} from peer {idx}: {payload!r}"[:2000])
            return kind, idx, payload

    def gather(self, kind: str, idxs: Any, timeout: float, ignore: tuple[str, ...] = ()) -> dict[int, Any]:
        """One ``kind`` message from each peer in ``idxs`` (skipping kinds in ``ignore``)."""
        want = set(idxs)
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while want - set(got):
            k, idx, payload = self.get(max(0.01, deadline - time.monotonic()), (kind,), ignore)
            if idx in got:
                raise ChildError(f"peer {idx} sent {kind!r} twice")
            got[idx] = payload
        return got

    def join(self, idxs: Any, timeout: float) -> None:
        """Wait for children to exit by themselves with code 0."""
        deadline = time.monotonic() + timeout
        for i in idxs:
            p = self.procs[i]
            p.join(max(0.01, deadline - time.monotonic()))
            if p.exitcode is None:
                raise ChildError(f"peer {i} did not exit within {timeout} s")
            if p.exitcode != 0:
                raise ChildError(f"peer {i} exited with code {p.exitcode}")

    def describe(self) -> str:
        return ", ".join(f"peer {i}: pid {p.pid} exit {p.exitcode}" for i, p in self.procs.items())

    def dump_stacks(self) -> None:
        """Ask every live child to print its threads' stacks to stderr."""
        for p in self.procs.values():
            if p.exitcode is None and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.5)

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.exitcode is None and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in self.procs.values():
            p.join(10)
        self.q.close()
        self.q.join_thread()

    def __enter__(self) -> PeerProcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()


@contextlib.contextmanager
def running_master(heartbeat_timeout: float = 5.0) -> Iterator[Any]:
    import pyccl

    m = pyccl.Master(host="127.0.0.1", port=0, heartbeat_timeout=heartbeat_timeout)
    m.start()
    port = m.port
    try:
        yield m
    finally:
        m.stop()
    assert port_is_free(port), f"the master's port {port} still accepts connections after stop()"


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port any more."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def reduce_or_hang(comm: Any, x: Any, out: Any = None, op: str = "sum", tag: int = 0, timeout: float = 30.0) -> Any:
    """all_reduce that turns a hang into an AssertionError after ``timeout`` s
    (a hung op then still holds its thread; the test kills the process)."""
    import pyccl

    handle = comm.all_reduce_async(x, out=out, op=op, tag=tag)
    try:
        return handle.wait(timeout)
    except pyccl.Timeout:
        raise AssertionError(
            f"all_reduce (tag {tag}) hung for {timeout:.0f} s in epoch {comm.epoch} "
            f"(world size {comm.world_size})"
        ) from None
