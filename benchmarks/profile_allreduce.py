"""Where the time of a large all-reduce goes: CPU per byte and the share of
copies, with shared memory and over TCP, next to memcpy on this machine.

Peers loop one all-reduce (in place) for a while; the CPU time they used
comes from /proc (user + system), and, where `perf` is installed, a sampled
profile splits it into memcpy/memmove (libc), the reduction kernels
(pyccl's core), the kernel (TCP copies, wake-ups) and the rest.

    python benchmarks/profile_allreduce.py --world-size 2 --size 256MiB --seconds 8
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(s: str) -> int:
    for unit, mult in UNITS.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peer(addr: str, n: int, transport: str, nbytes: int, conns: int, go, stop, q) -> None:
    import pyccl

    c = pyccl.Communicator(addr, connections=conns, transport=transport)
    c.connect(timeout=60)
    while c.world_size < n:
        c.update_topology()
    x = np.ones(nbytes // 4, np.float32)
    for _ in range(2):
        c.all_reduce(x)
    q.put(("ready", os.getpid()))
    go.wait()
    ops = 0
    flag = np.zeros(1, np.float32)
    while True:
        c.all_reduce(x)
        ops += 1
        flag[0] = 1.0 if stop.is_set() else 0.0
        c.all_reduce(flag, op="max")  # every peer stops after the same op
        if flag[0] > 0:
            break
    q.put(("ops", ops))
    c.close()


def memcpy_gbs(nbytes: int) -> float:
    a = np.ones(nbytes, np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        t.append(time.perf_counter() - t0)
    return nbytes / min(t) / 1e9


def perf_split(data: str) -> dict[str, float]:
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio"],
                         capture_output=True, text=True).stdout
    split = {"memcpy/memmove": 0.0, "reduce kernels (core)": 0.0, "kernel": 0.0, "other": 0.0}
    for line in out.splitlines():
        parts = line.split()
        if not parts or not parts[0].endswith("%"):
            continue
        pct = float(parts[0][:-1])
        if "memmove" in line or "memcpy" in line:
            split["memcpy/memmove"] += pct
        elif "_core" in line:
            split["reduce kernels (core)"] += pct
        elif "[k]" in line:
            split["kernel"] += pct
        else:
            split["other"] += pct
    return split


def run(n: int, transport: str, nbytes: int, conns: int, seconds: float) -> list[str]:
    import pyccl

    ctx = mp.get_context("spawn")
    with pyccl.Master(host="127.0.0.1", port=0) as m:
        q, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
        procs = [ctx.Process(target=peer, args=(m.address, n, transport, nbytes, conns, go, stop, q))
                 for _ in range(n)]
        for p in procs:
            p.start()
        pids = [q.get(timeout=120)[1] for _ in procs]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        perf = None
        tmp = tempfile.mkdtemp()
        data = str(Path(tmp) / "perf.data")
        if shutil.which("perf"):
            perf = subprocess.Popen(["perf", "record", "-q", "-o", data, "-p", ",".join(map(str, pids)), "--",
                                     "sleep", str(seconds)], stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        go.set()
        time.sleep(seconds)
        stop.set()
        ops = [q.get(timeout=300)[1] for _ in procs]
        wall = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        for p in procs:
            p.join(60)
        if perf is not None:
            perf.wait()
    k = min(ops)
    per_op = wall / k
    cpu_per_byte = cpu / k / n / nbytes * 1e9  # ns of CPU per tensor byte per peer
    name = {"auto": "shm", "tcp": "tcp"}[transport]
    lines = [f"| {name} | {n} | {conns} | {nbytes >> 20} MiB | {per_op * 1e3:.1f} ms | "
             f"{nbytes / per_op * 2 * (n - 1) / n / 1e9:.2f} GB/s | {cpu / k * 1e3:.0f} ms | {cpu_per_byte:.2f} ns |"]
    if perf is not None:
        split = perf_split(data)
        lines[0] += " " + ", ".join(f"{name} {pct:.0f}%" for name, pct in split.items()) + " |"
    else:
        lines[0] += " (perf not installed) |"
    print(lines[0], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--transports", nargs="+", default=["auto", "tcp"], choices=["auto", "tcp"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_allreduce.md"))
    args = ap.parse_args()
    nbytes = parse_size(args.size)
    lines = [
        f"# Where a large all-reduce spends its time ({datetime.date.today()}, {os.cpu_count()} cores)",
        "",
        f"Command: `python benchmarks/profile_allreduce.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"memcpy on this machine: {memcpy_gbs(min(nbytes, 256 << 20)):.1f} GB/s (one core, numpy copy of "
        f"{min(nbytes, 256 << 20) >> 20} MiB). In place; CPU = user + system time of all peers per op; "
        "CPU per byte = per peer and tensor byte.",
        "",
        "| transport | n | c | size | time/op | busbw | CPU/op | CPU per byte | perf split |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for t in args.transports:
        lines += run(args.world_size, t, nbytes, args.connections, args.seconds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
