"""In-process groups for tests of authentication: n Communicators that join
one master (each connects and votes until the group has all of them), and
an all-reduce across them on threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyccl


def group(address: str, n: int, secret: bytes | None, tls_ca: str | None = None) -> list[pyccl.Communicator]:
    """n members of one group; each connects and votes until all are in."""
    comms = [pyccl.Communicator(address, connections=2, secret=secret, tls_ca=tls_ca) for _ in range(n)]

    def join(c: pyccl.Communicator) -> None:
        c.connect(timeout=20)
        deadline = time.monotonic() + 20
        while c.world_size < n and time.monotonic() < deadline:
            if not c.update_topology():
                time.sleep(0.005)

    threads = [threading.Thread(target=join, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [c.world_size for c in comms] == [n] * n
    return comms


def all_reduce(comms: list[pyccl.Communicator], n: int = 1 << 16) -> list[np.ndarray]:
    """Member i contributes n copies of i + 1; returns the reduced arrays."""
    xs = [np.full(n, float(i + 1), np.float32) for i in range(len(comms))]
    ts = [threading.Thread(target=c.all_reduce, args=(x,)) for c, x in zip(comms, xs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return xs


def vote_all(comms: list[pyccl.Communicator]) -> None:
    """One update_topology() round: every member votes (on its own thread)."""
    threads = [threading.Thread(target=c.update_topology) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
