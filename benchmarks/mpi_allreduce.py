"""Open MPI's in-place all-reduce, timed like benchmarks/allreduce.py times
gloo and pyccl (barrier, one op, the slowest rank's time, median).

Started by allreduce.py under mpirun:

    mpirun -n 2 python benchmarks/mpi_allreduce.py 4 1048576 --reps 200 10

prints one line per size: ``MPI <bytes> <median seconds>``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from mpi4py import MPI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", type=int, nargs="+")
    ap.add_argument("--reps", type=int, nargs="+", required=True)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    n = comm.Get_size()
    for nbytes, reps in zip(args.sizes, args.reps, strict=True):
        x = np.ones(max(1, nbytes // 4), np.float32)
        comm.Allreduce(MPI.IN_PLACE, x)  # warm-up
        times = []
        for _ in range(reps):
            x.fill(1.0)
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, x)
            dt = time.perf_counter() - t0
            if not bool((x == n).all()):
                raise SystemExit(f"Open MPI: wrong result at {nbytes} bytes")
            times.append(comm.allreduce(dt, op=MPI.MAX))
        if comm.Get_rank() == 0:
            print(f"MPI {nbytes} {statistics.median(times)!r}", flush=True)


if __name__ == "__main__":
    main()
