"""How long a run stands still when its master dies (Guarantee 7).

Peers (processes) all-reduce in a loop against a master that runs as
``pyccl master`` in its own process. The master is SIGKILLed again and
again; three ways back are measured, interleaved kill by kill:

* restart: ``pyccl master`` started again on the same address at once;
* restart +1s: the same after one second (an operator or a supervisor);
* standby: a ``pyccl master --standby-of`` takes over (and is the next
  one killed, with the old address restarted as its standby).

Recovery = SIGKILL until every peer has completed an all-reduce that it
began after the kill. Also shown: how long the new master took to listen
(interpreter start), which bounds the restart cases. Each kill runs on a
fresh master and fresh peers, the three ways back taking turns.

    python benchmarks/failover_recovery.py [--kills 5] [--peers 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Master:
    def __init__(self, port: int, hb: float, standby_of: str | None = None) -> None:
        self.address = f"127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="failover-bench-", suffix=".log", delete=False).name
        args = [sys.executable, "-m", "pyccl.cli", "master", "--port", str(port), "--heartbeat-timeout", str(hb)]
        if standby_of:
            args += ["--standby-of", standby_of]
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, cwd=tempfile.gettempdir())
        while "listening on" not in open(self.log, errors="replace").read():
            if self.proc.poll() is not None or time.monotonic() - t0 > 30:
                raise RuntimeError(f"master did not start: {open(self.log).read()[-2000:]}")
            time.sleep(0.005)
        self.startup = time.monotonic() - t0

    def kill(self) -> float:
        t = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return t

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log)


def _peer(idx: int, masters: str, world: int, n: int, q: Any, stop: Any) -> None:
    import pyccl

    comm = pyccl.Communicator(masters, connections=2, master_timeout=120.0)
    comm.connect(timeout=60)
    comm.wait_for_world(world, 60)
    q.put(("ready", idx, 0.0, 0.0))
    x = np.ones(n, np.float32)
    while not stop.is_set():
        t0 = time.time()
        try:
            comm.update_topology()
            comm.all_reduce(x)
        except pyccl.PeerFailure:
            continue
        finally:
            x[:] = 1.0
        q.put(("ok", idx, t0, time.time()))
    comm.close()


def _recovered(q: Any, peers: int, since: float, timeout: float = 60.0) -> float:
    """Seconds from ``since`` until every peer finished an op begun after it."""
    done: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(done) < peers:
        kind, idx, t0, t1 = q.get(timeout=max(0.01, deadline - time.monotonic()))
        if kind == "ok" and t0 > since and idx not in done:
            done[idx] = t1
    return max(done.values()) - since


def _scenario(name: str, kills: int, peers: int, n: int, hb: float) -> tuple[list[float], list[float]]:
    ctx = mp.get_context("spawn")
    a_port, b_port = _free_port(), _free_port()
    a = Master(a_port, hb)
    b = Master(b_port, hb, standby_of=a.address) if name == "standby" else None
    masters = f"{a.address},{b.address}" if b else a.address
    q, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_peer, args=(i, masters, peers, n, q, stop), daemon=True) for i in range(peers)]
    for p in procs:
        p.start()
    rec, startup = [], []
    try:
        ready = 0
        while ready < peers:
            ready += q.get(timeout=60)[0] == "ready"
        for _ in range(kills):
            time.sleep(1.0)
            t = a.kill()
            if name == "standby":
                assert b is not None
                rec.append(_recovered(q, peers, t))
                old = a
                a, b = b, Master(int(old.address.rpartition(":")[2]), hb, standby_of=b.address)
                old.close()
                startup.append(b.startup)
                time.sleep(2 * hb)  # the new standby has watched the new master for a while
            else:
                if name == "restart +1s":
                    time.sleep(1.0)
                old, a = a, Master(a_port, hb)
                old.close()
                startup.append(a.startup)
                rec.append(_recovered(q, peers, t))
            while True:  # drop what piled up
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        a.close()
        if b:
            b.close()
    return rec, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--size", type=int, default=1 << 20, help="floats per all-reduce (default 1M = 4 MiB)")
    ap.add_argument("--heartbeat-timeout", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="also write the table to this file (markdown)")
    args = ap.parse_args()
    names = ("restart", "restart +1s", "standby")
    rows: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for _ in range(args.kills):  # interleaved: one kill of each way back per round
        for name in names:
            rec, startup = _scenario(name, 1, args.peers, args.size, args.heartbeat_timeout)
            rows[name][0].extend(rec)
            rows[name][1].extend(startup)
    lines = [f"master SIGKILL -> every peer completed an op begun after it; {args.peers} peers, "
             f"{4 * args.size // 1024} KiB all-reduces, heartbeat timeout {args.heartbeat_timeout:g} s, "
             f"{args.kills} kills each (interleaved)", "",
             "| way back | recovery median | recovery max | new master's start (median) |", "|---|---|---|---|"]
    for name, (rec, startup) in rows.items():
        lines.append(f"| {name} | {statistics.median(rec):.2f} s | {max(rec):.2f} s | "
                     f"{statistics.median(startup):.2f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
