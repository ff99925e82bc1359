"""A data link that goes silent (both peers alive, heartbeats fine) fails the
op within the heartbeat timeout, and the group continues on fresh links.

A tiny threaded proxy sits in front of one peer's data port; the test tells
it to stop forwarding on the connections it has (new ones work), which is
what a stalled WAN path looks like.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from typing import Any

import numpy as np
import pyccl
import pytest

CTX = mp.get_context("spawn")


class StallingProxy:
    """Forwards 127.0.0.1:<port> to a target; stall() silences existing connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.generation = 0
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self.generation += 1  # pumps of older generations stop moving bytes

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                a.close()
                continue
            self.socks += [a, b]
            gen = self.generation
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst, gen), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gen: int) -> None:
        try:
            while not self.stop.is_set():
                data = src.recv(1 << 16)
                if not data:
                    break
                if self.generation != gen:
                    # stalled: swallow silently, never forward, never close
                    while not self.stop.is_set():
                        time.sleep(0.1)
                    return
                dst.sendall(data)
        except OSError:
            pass


def _peer(master: str, data_port: int, advertise_port: int, pipe: Any) -> None:
    comm = pyccl.Communicator(
        master, connections=1, data_port=data_port,
        advertise=("127.0.0.1", advertise_port) if advertise_port else None,
    )
    comm.connect(timeout=60)
    while comm.world_size < 2:
        comm.update_topology()
    x = np.ones(1 << 16, np.float32)
    events = []
    deadline = time.monotonic() + 40
    ok_after_failure = 0
    failed = False
    while time.monotonic() < deadline and ok_after_failure < 5:
        x[:] = 1
        t0 = time.monotonic()
        try:
            comm.all_reduce(x)
            assert np.all(x == 2)
            if failed:
                ok_after_failure += 1
            pipe.send(("ok",))
        except pyccl.PeerFailure as exc:
            failed = True
            events.append((time.monotonic() - t0, str(exc)))
            pipe.send(("failure", time.monotonic() - t0, str(exc)))
        time.sleep(0.05)
    pipe.send(("done", ok_after_failure, comm.world_size))
    comm.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(90)
def test_silent_link_fails_the_op_and_the_group_recovers():
    heartbeat_timeout = 3.0  # roomy: CI machines are loaded
    with pyccl.Master(host="127.0.0.1", port=0, heartbeat_timeout=heartbeat_timeout) as master:
        b_port = _free_port()
        proxy = StallingProxy(b_port)
        procs, pipes = [], []
        try:
            for data_port, adv in ((0, 0), (b_port, proxy.port)):
                r, w = CTX.Pipe(duplex=False)
                p = CTX.Process(target=_peer, args=(master.address, data_port, adv, w))
                p.start()
                w.close()
                procs.append(p)
                pipes.append(r)
            for r in pipes:  # a few good ops first
                for _ in range(3):
                    assert r.recv()[0] == "ok"
            t_stall = time.monotonic()
            proxy.stall()
            results = {0: [], 1: []}
            for i, r in enumerate(pipes):
                while True:
                    assert r.poll(60), "peer went quiet"
                    m = r.recv()
                    results[i].append(m)
                    if m[0] == "done":
                        break
        finally:
            proxy.close()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    for i in (0, 1):
        failures = [m for m in results[i] if m[0] == "failure"]
        assert failures, results[i]
        # the op that hit the stall failed within the heartbeat timeout + 1 s
        assert failures[0][1] <= heartbeat_timeout + 1.0, failures[0]
        done = results[i][-1]
        assert done[1] == 5 and done[2] == 2, done  # both alive, working again
    assert time.monotonic() - t_stall < 60
