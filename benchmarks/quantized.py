"""Quantized (uint8) vs float32 all-reduce: error, bytes on the wire, time.

    python benchmarks/quantized.py [--world-size 2] [--size 64MiB]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from allreduce import fmt_size, parse_size


def _peer(master: str, n: int, nbytes: int, reps: int, pipe) -> None:
    import pyccl

    comm = pyccl.Communicator(master, connections=4)
    comm.connect(timeout=60)
    while comm.world_size < n:
        comm.update_topology()
    x = np.random.default_rng(comm.rank).standard_normal(nbytes // 4).astype(np.float32)
    ref = np.empty_like(x)
    q = np.empty_like(x)
    rows = {"float32": [], "uint8": []}
    info = {}
    for _ in range(reps):
        for mode in ("float32", "uint8"):
            comm.all_reduce(np.ones(1, np.float32))  # line up
            t0 = time.perf_counter()
            out = ref if mode == "float32" else q
            info[mode] = comm.all_reduce(x, out=out, op="avg", quantize=None if mode == "float32" else "uint8")
            rows[mode].append(time.perf_counter() - t0)
    err = np.abs(q - ref)
    rng = float(np.ptp(ref))
    pipe.send({
        "time": {m: statistics.median(v) for m, v in rows.items()},
        "tx": {m: info[m].tx_bytes for m in rows},
        "max_err": float(err.max()), "mean_err": float(err.mean()), "rms_ref": float(np.sqrt(np.mean(ref ** 2))),
        "range": rng,
    })
    comm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantized.md"))
    args = ap.parse_args()
    import pyccl

    nbytes = parse_size(args.size)
    ctx = mp.get_context("spawn")
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        pipes, procs = [], []
        for _ in range(args.world_size):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_peer, args=(master.address, args.world_size, nbytes, args.reps, w))
            p.start()
            w.close()
            pipes.append(r)
            procs.append(p)
        res = [r.recv() for r in pipes]
        for p in procs:
            p.join()
    t = {m: max(r["time"][m] for r in res) for m in ("float32", "uint8")}
    tx = {m: res[0]["tx"][m] for m in ("float32", "uint8")}
    r0 = res[0]
    n = args.world_size
    lines = [
        f"# quantized all-reduce ({datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, loopback)",
        "",
        f"Command: `python benchmarks/quantized.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"{n} peers, {fmt_size(nbytes)} of standard-normal float32 per peer, op=avg, median of {args.reps}.",
        "",
        "| mode | time | algbw | bytes sent per peer | max abs error | mean abs error |",
        "|---|---|---|---|---|---|",
        f"| float32 | {t['float32'] * 1e3:.1f} ms | {nbytes / t['float32'] / 1e9:.2f} GB/s | {tx['float32'] / 2**20:.1f} MiB | 0 | 0 |",
        f"| uint8 | {t['uint8'] * 1e3:.1f} ms | {nbytes / t['uint8'] / 1e9:.2f} GB/s | {tx['uint8'] / 2**20:.1f} MiB "
        f"({tx['float32'] / tx['uint8']:.2f}x fewer) | {r0['max_err']:.4g} | {r0['mean_err']:.4g} |",
        "",
        f"Result range {r0['range']:.3g}, rms {r0['rms_ref']:.3g}; max error is about half a code of the "
        f"chunk's range per hop ({r0['range'] / 255 / 2:.3g} per hop here). Results are bit-identical on every peer "
        f"(tests/test_quantized_mp.py).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
