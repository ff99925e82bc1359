"""pyccl vs torch.distributed gloo (and Open MPI where installed): all-reduce
time and bus bandwidth, side by side.

pyccl runs twice per connection count: with its default transport (ring
neighbours on one host exchange bytes through shared memory; `shm` columns)
and with PYCCL_TRANSPORT=tcp semantics (`transport="tcp"`; `tcp` columns).
gloo and every pyccl variant run in the same worker processes on loopback,
interleaved per repetition (gloo, shm c=1, tcp c=1, ...), so machine noise
hits all of them alike. Reported: the median over repetitions of the slowest
rank's time per op, and bus bandwidth as NCCL-tests define it:
bytes / time * 2 (n - 1) / n.

Open MPI (mpi4py over Debian's openmpi-bin, shared memory) cannot share
processes with the others (mpirun starts its own), so where `mpirun` and
mpi4py are installed it runs as a separate phase per world size, timed the
same way (barrier, op, max over ranks, median); otherwise its column is left
out.

    python benchmarks/allreduce.py                       # full table (several minutes)
    python benchmarks/allreduce.py --world-sizes 2 --sizes 4 16MiB --reps 5

Needs torch (pip install torch==2.13.0) for the gloo side.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(s: str) -> int:
    for unit in sorted(UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * UNITS[unit])
    return int(s)


def fmt_size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]} {unit}"
    return f"{n} B"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reps_for(nbytes: int, base: int) -> int:
    # Small messages are cheap and noisy: more repetitions; huge ones fewer.
    if nbytes <= 64 << 10:
        return base * 40
    if nbytes <= 16 << 20:
        return base * 2
    return base


SECRET = b"benchmark run secret"
TRANSPORTS = {"auto": "shm", "tcp": "tcp"}  # Communicator(transport=...) -> column name


def worker(rank: int, n: int, gloo_port: int, master_addr: str, secret_addr: str | None, sizes: list[int],
           conns: list[int], base_reps: int, q) -> None:
    import pyccl
    import torch.distributed as dist

    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=rank, world_size=n)
    comms = {}
    for k in conns:
        for transport in TRANSPORTS:
            c = pyccl.Communicator(master_addr, peer_group=k + (1000 if transport == "tcp" else 0), connections=k,
                                   transport=transport)
            c.connect(timeout=60)
            while c.world_size < n:
                c.update_topology()
            comms[f"{TRANSPORTS[transport]} c={k}"] = c
    secured = None
    if secret_addr is not None:  # the same group once more, through a master with a run secret
        secured = pyccl.Communicator(secret_addr, connections=conns[-1], secret=SECRET)
        secured.connect(timeout=60)
        while secured.world_size < n:
            secured.update_topology()
    dist.barrier()

    results: dict[tuple[str, int], list[float]] = {}
    for nbytes in sizes:
        count = max(1, nbytes // 4)
        x = torch.ones(count, dtype=torch.float32)
        xa = x.numpy()
        out = np.empty_like(xa)
        # in-place like gloo, per connection count, plus out-of-place at the
        # largest count (shows what the in-place commit copy costs)
        backends = ["gloo", *comms, f"out shm c={conns[-1]}"]
        if secured is not None:
            backends.append(f"secret c={conns[-1]}")
        # one warm-up each (allocations, connection slow start)
        dist.all_reduce(x)
        for c in comms.values():
            c.all_reduce(xa)
        if secured is not None:
            secured.all_reduce(xa)
        for _ in range(reps_for(nbytes, base_reps)):
            for b in backends:
                x.fill_(1.0)
                dist.barrier()
                t0 = time.perf_counter()
                if b == "gloo":
                    dist.all_reduce(x)
                elif b.startswith("out "):
                    comms[b[4:]].all_reduce(xa, out=out)
                elif b.startswith("secret"):
                    assert secured is not None
                    secured.all_reduce(xa)
                else:
                    comms[b].all_reduce(xa)
                dt = time.perf_counter() - t0
                result = out if b.startswith("out ") else xa
                if not bool((result == n).all()):
                    raise SystemExit(f"{b}: wrong result at {nbytes} bytes")
                # the op takes as long as its slowest rank
                t = torch.tensor([dt], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                results.setdefault((b, nbytes), []).append(float(t.item()))
        del x, xa, out
    for c in [*comms.values(), *([secured] if secured is not None else [])]:
        c.close()
    dist.destroy_process_group()
    if rank == 0:
        q.put({f"{b}|{s}": v for (b, s), v in results.items()})


def busbw(nbytes: int, seconds: float, n: int) -> float:
    return nbytes / seconds * 2 * (n - 1) / n / 1e9


def column_names(conns: list[int], with_secret: bool) -> list[str]:
    names = [f"{t} c={k}" for k in conns for t in TRANSPORTS.values()] + [f"out shm c={conns[-1]}"]
    return names + ([f"secret c={conns[-1]}"] if with_secret else [])


def run_world(n: int, sizes: list[int], args: argparse.Namespace) -> dict[str, list[float]]:
    """gloo and every pyccl variant, interleaved, in n worker processes."""
    import pyccl

    ctx = mp.get_context("spawn")
    with pyccl.Master(host="127.0.0.1", port=0) as master, \
            pyccl.Master(host="127.0.0.1", port=0, secret=SECRET) as secured:
        q = ctx.Queue()
        gloo_port = free_port()
        secret_addr = secured.address if args.with_secret else None
        procs = [
            ctx.Process(target=worker, args=(r, n, gloo_port, master.address, secret_addr, sizes, args.connections,
                                             args.reps, q))
            for r in range(n)
        ]
        for p in procs:
            p.start()
        try:
            res: dict[str, list[float]] = q.get(timeout=3600)
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return res


def run_mpi(n: int, sizes: list[int], base_reps: int) -> dict[int, float] | None:
    """Open MPI's all-reduce (mpi4py, in place) in its own mpirun; None if not installed."""
    import shutil
    import subprocess

    if shutil.which("mpirun") is None:
        return None
    script = Path(__file__).with_name("mpi_allreduce.py")
    cmd = ["mpirun", "--oversubscribe", "-n", str(n), sys.executable, str(script),
           *[str(s) for s in sizes], "--reps", *[str(reps_for(s, base_reps)) for s in sizes]]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        print(f"Open MPI run failed (column left out):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("MPI ")]
    return {int(r[1]): float(r[2]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", nargs="+", default=["4", "64KiB", "1MiB", "16MiB", "64MiB", "256MiB"])
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=5, help="repetitions for large sizes (small ones get more)")
    ap.add_argument("--with-secret", action="store_true",
                    help="add a column: the same group through a master with a run secret (every connection "
                         "proves membership), to show what authentication costs")
    ap.add_argument("--no-mpi", action="store_true", help="leave out Open MPI even where it is installed")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "allreduce.md"))
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes]
    os.environ.pop("PYCCL_SECRET", None)  # the baseline columns are an open run; --with-secret adds one with a secret
    os.environ.pop("PYCCL_TRANSPORT", None)  # each column names its transport itself
    names = column_names(args.connections, args.with_secret)
    worlds = {n: run_world(n, sizes, args) for n in args.world_sizes}
    mpi = {} if args.no_mpi else {n: run_mpi(n, sizes, args.reps) for n in args.world_sizes}
    has_mpi = any(v is not None for v in mpi.values())

    lines = [
        f"# all-reduce: pyccl vs gloo ({datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, loopback)",
        "",
        f"Command: `python benchmarks/allreduce.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "Median over repetitions of the slowest rank's time; busbw = bytes/time x 2(n-1)/n. In place unless "
        "marked `out`.",
        "",
        "`shm`: pyccl's default transport (ring neighbours on one host exchange bytes through shared memory); "
        "`tcp`: `PYCCL_TRANSPORT=tcp`; `c=`: connections per neighbour. x gloo = gloo time / pyccl time "
        "(above 1: pyccl is faster). `out shm` is out of place (gloo has none; in place, pyccl pays one extra "
        "copy to keep the input intact until every peer agreed on the outcome)."
        + (" Open MPI ran in its own mpirun after the others (it cannot share their processes), timed the "
           "same way." if has_mpi else " Open MPI (mpirun + mpi4py) is not installed here: no column."),
        "",
        "| n | size | gloo | gloo busbw | " + " | ".join(f"{c} | {c} busbw | x gloo" for c in names)
        + (" | Open MPI | Open MPI busbw" if has_mpi else "") + " |",
        "|---" * (4 + 3 * len(names) + (2 if has_mpi else 0)) + "|",
    ]
    for n, res in worlds.items():
        for s in sizes:
            g = statistics.median(res[f"gloo|{s}"])
            row = [str(n), fmt_size(s), f"{g * 1e3:.3f} ms", f"{busbw(s, g, n):.2f} GB/s"]
            for name in names:
                t = statistics.median(res[f"{name}|{s}"])
                row += [f"{t * 1e3:.3f} ms", f"{busbw(s, t, n):.2f} GB/s", f"{g / t:.2f}"]
            if has_mpi:
                m = (mpi.get(n) or {}).get(s)
                row += [f"{m * 1e3:.3f} ms", f"{busbw(s, m, n):.2f} GB/s"] if m else ["-", "-"]
            lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
