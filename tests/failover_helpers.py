"""Masters as separate processes (so a test can SIGKILL and restart them on
the same address) and the peers' training loop for the failover tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from conftest import pyccl_pythonpath
from mp_helpers import digest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MasterProc:
    """``pyccl master`` on a fixed loopback port, as a child process."""

    def __init__(self, port: int, heartbeat_timeout: float = 2.0, hold: float | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.args = [sys.executable, "-m", "pyccl.cli", "master", "--host", "127.0.0.1", "--port", str(port),
                     "--heartbeat-timeout", str(heartbeat_timeout), *extra]
        if hold is not None:
            self.args += ["--recovery-hold", str(hold)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="pyccl-master-", suffix=".log", delete=False)
        self.log.close()

    def start(self, wait_for: str = "listening on", timeout: float = 30.0) -> MasterProc:
        out = open(self.log.name, "ab")
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=out, cwd=tempfile.gettempdir(),
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pyccl_pythonpath()})
        out.close()
        self.wait_log(wait_for, timeout)
        return self

    def text(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def wait_log(self, pattern: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.text())) < count:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the master exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the master did not log {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> float:
        """SIGKILL; returns the time it was sent."""
        assert self.proc is not None
        t = time.time()
        self.proc.kill()
        self.proc.wait(10)
        return t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def expected_sum(step: int, world: int) -> float:
    return float(sum(step * 10 + i for i in range(world)))


def trainer(idx: int, q: Any, address: str, world: int, steps: int, n: int, sync: bool, pace: float) -> None:
    """A peer's loop: update_topology, all_reduce (retried on PeerFailure), and
    optionally sync_shared_state; every outcome and its time is reported."""
    import pyccl

    comm = pyccl.Communicator(address, connections=2, name=f"t{idx}", master_timeout=60.0)
    comm.connect(timeout=60)
    comm.wait_for_world(world, 60)
    q.put(("ready", idx, comm.peer_id))
    w = np.zeros(1 << 20, np.float32)
    state = pyccl.SharedState({"w": w}, revision=0)
    log: list[tuple[Any, ...]] = []
    for step in range(steps):
        q.put(("step", idx, step))
        while True:
            x = np.full(n, float(step * 10 + idx), np.float32)
            try:
                comm.update_topology()
                info = comm.all_reduce(x)
            except pyccl.PeerFailure as exc:
                intact = bool((x == step * 10 + idx).all())
                log.append(("fail", step, exc.epoch, intact, time.time()))
                continue
            ok = bool((x == expected_sum(step, world)).all())
            log.append(("ok", step, digest(x), ok, time.time(), info.epoch, info.world_size))
            break
        if sync:
            q.put(("syncing", idx, step))
            while True:
                try:
                    info_s = comm.sync_shared_state(state)
                except pyccl.PeerFailure as exc:
                    log.append(("sync_fail", step, exc.epoch, state.revision, time.time()))
                    continue
                log.append(("sync", step, info_s.revision, digest(w), time.time()))
                break
            w[(step * 7919) % w.size] += 1.0  # the same deterministic update everywhere
            if idx == world - 1:
                w[0] += 1000.0  # this peer diverges: the next sync fetches the popular copy back
            state.revision += 1
        if pace:
            time.sleep(pace)
    q.put(("result", idx, log))
    comm.close()
