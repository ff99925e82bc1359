"""Where a 4-byte all-reduce spends its time: the data plane (the C++ ring,
`DataPlane.collective`) against the whole call, whose rest is the verdict
round trip (`done` to the master, its `op_ok` back through the peer's
control thread) and the Python around it. Shared memory and TCP side by side.

    python benchmarks/latency_split.py --world-sizes 2 4 --reps 1000
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class TimedDataPlane:
    """Forwards to the core's DataPlane and times each collective call."""

    def __init__(self, dp: Any) -> None:
        self.dp = dp
        self.seconds: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dp, name)

    def collective(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        r = self.dp.collective(*args)
        self.seconds.append(time.perf_counter() - t0)
        return r


def peer(addr: str, n: int, transport: str, reps: int, q: Any) -> None:
    import pyccl

    c = pyccl.Communicator(addr, connections=1, transport=transport)
    c.connect(timeout=60)
    while c.world_size < n:
        c.update_topology()
    x = np.ones(1, np.float32)
    out = np.empty_like(x)
    for _ in range(50):
        c.all_reduce(x, out=out)
    timed = TimedDataPlane(c._dp)
    c._dp = timed
    total = []
    for _ in range(reps):
        t0 = time.perf_counter()
        c.all_reduce(x, out=out)
        total.append(time.perf_counter() - t0)
    c._dp = timed.dp
    c.all_reduce(x, out=out)  # nobody leaves before everyone finished timing
    q.put((statistics.median(total), statistics.median(timed.seconds)))
    c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency_split.md"))
    args = ap.parse_args()
    import pyccl

    lines = [f"# 4-byte all-reduce: data plane vs verdict ({datetime.date.today()}, {os.cpu_count()} cores)", "",
             f"Command: `python benchmarks/latency_split.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             "Medians over the ops of each peer, then the slowest peer; out of place, back to back.", "",
             "| n | transport | whole call | data plane | rest (verdict round trip, Python) |", "|---|---|---|---|---|"]
    ctx = mp.get_context("spawn")
    for n in args.world_sizes:
        for transport in ("auto", "tcp"):
            with pyccl.Master(host="127.0.0.1", port=0) as m:
                q = ctx.Queue()
                procs = [ctx.Process(target=peer, args=(m.address, n, transport, args.reps, q)) for _ in range(n)]
                for p in procs:
                    p.start()
                res = [q.get(timeout=600) for _ in procs]
                for p in procs:
                    p.join(60)
            whole, data = max(r[0] for r in res), max(r[1] for r in res)
            name = {"auto": "shm", "tcp": "tcp"}[transport]
            lines.append(f"| {n} | {name} | {whole * 1e3:.3f} ms | {data * 1e3:.3f} ms | {(whole - data) * 1e3:.3f} ms |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
