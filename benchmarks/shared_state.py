"""How fast a joiner catches up: shared-state sync from 1 and 3 holders, on loopback.

For each size and holder count, H holder processes and one joiner (whose
state is all zeros) run a sync; the joiner's SyncInfo.seconds (hash, plan,
transfer from every holder at once, verification) gives the catch-up rate.
A plain single TCP stream between two processes is measured in the same run
for reference.

    python benchmarks/shared_state.py                  # 256 MiB and 1 GiB, 1 and 3 holders
    python benchmarks/shared_state.py --sizes 64MiB --holders 1
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from allreduce import fmt_size, parse_size


def _state(nbytes: int, fill: bool):
    import pyccl

    # Four keys, like a model + optimizer state.
    per = nbytes // 4 // 4
    keys = {}
    for i, name in enumerate(["params", "grads", "opt.m", "opt.v"]):
        a = np.empty(per, np.float32)
        if fill:
            a[:] = np.arange(per, dtype=np.float32) * (i + 1)
        else:
            a[:] = 0
        keys[name] = a
    return pyccl.SharedState(keys, revision=1 if fill else 0)


def _holder(master: str, world: int, nbytes: int, pipe) -> None:
    import pyccl

    comm = pyccl.Communicator(master)
    comm.connect(timeout=120)
    state = _state(nbytes, fill=True)
    while comm.world_size < world:
        comm.update_topology()
    info = comm.sync_shared_state(state)
    pipe.send(("holder", info.tx_bytes))
    comm.close()


def _joiner(master: str, world: int, nbytes: int, pipe) -> None:
    import pyccl

    state = _state(nbytes, fill=False)
    comm = pyccl.Communicator(master)
    comm.connect(timeout=120)
    while comm.world_size < world:
        comm.update_topology()
    info = comm.sync_shared_state(state)
    pipe.send(("joiner", info.seconds, info.rx_bytes))
    comm.close()


def catch_up(nbytes: int, holders: int) -> tuple[float, int]:
    import pyccl

    ctx = mp.get_context("spawn")
    world = holders + 1
    with pyccl.Master(host="127.0.0.1", port=0, heartbeat_timeout=30) as master:
        pipes, procs = [], []
        for i in range(world):
            r, w = ctx.Pipe(duplex=False)
            target = _joiner if i == world - 1 else _holder
            p = ctx.Process(target=target, args=(master.address, world, nbytes, w))
            p.start()
            w.close()
            pipes.append(r)
            procs.append(p)
            time.sleep(0.3)  # holders first, so the joiner is the last to connect
        try:
            msgs = [r.recv() for r in pipes]
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    joiner = [m for m in msgs if m[0] == "joiner"][0]
    return joiner[1], joiner[2]


def _stream_sender(port: int, nbytes: int) -> None:
    buf = np.ones(64 << 20, np.uint8)
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < nbytes:
            n = min(len(buf), nbytes - sent)
            s.sendall(memoryview(buf)[:n])
            sent += n


def single_stream(nbytes: int) -> float:
    """GB/s of one plain TCP stream between two processes on loopback."""
    ctx = mp.get_context("spawn")
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        p = ctx.Process(target=_stream_sender, args=(ls.getsockname()[1], nbytes))
        p.start()
        conn, _ = ls.accept()
        buf = np.empty(64 << 20, np.uint8)
        view = memoryview(buf)
        got = 0
        t0 = time.perf_counter()
        with conn:
            while got < nbytes:
                k = conn.recv_into(view, min(len(buf), nbytes - got))
                if k == 0:
                    break
                got += k
        dt = time.perf_counter() - t0
        p.join()
    return got / dt / 1e9


def hash_vs_copy(nbytes: int = 256 << 20, reps: int = 5, threads: int = 1) -> tuple[float, float]:
    """GB/s of the content hash (on `threads` threads; 0 = all cores) and of a
    plain numpy copy of the same buffer (best of reps)."""
    from pyccl import _core

    a = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    t_hash = t_copy = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        _core.content_hash(a.ctypes.data, a.nbytes, threads)
        t_hash = min(t_hash, time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(b, a)
        t_copy = min(t_copy, time.perf_counter() - t0)
    return nbytes / t_hash / 1e9, nbytes / t_copy / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["256MiB", "1GiB"])
    ap.add_argument("--holders", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--reps", type=int, default=2, help="best of N per case")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "shared_state.md"))
    args = ap.parse_args()

    stream = max(single_stream(2 << 30) for _ in range(2))
    h_rate, c_rate = hash_vs_copy(threads=1)
    h_all, _ = hash_vs_copy(threads=0)
    lines = [
        f"# shared-state catch-up ({datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, loopback)",
        "",
        f"Command: `python benchmarks/shared_state.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Single plain TCP stream between two processes, same run: **{stream:.2f} GB/s**",
        "",
        f"Content hash of 256 MiB on one core: **{h_rate:.2f} GB/s**; numpy copy of the same buffer: "
        f"{c_rate:.2f} GB/s; hash/copy = **{h_rate / c_rate:.2f}**. On all {os.cpu_count()} cores (what a sync "
        f"uses): {h_all:.2f} GB/s.",
        "",
        "Joiner time = its whole sync_shared_state call (hash, plan, transfer, verify); best of "
        f"{args.reps}.",
        "",
        "| state | holders | joiner time | catch-up rate | vs one TCP stream |",
        "|---|---|---|---|---|",
    ]
    for size in (parse_size(s) for s in args.sizes):
        for h in args.holders:
            best = min(catch_up(size, h) for _ in range(args.reps))
            secs, rx = best
            rate = rx / secs / 1e9
            lines.append(f"| {fmt_size(size)} | {h} | {secs:.3f} s | {rate:.2f} GB/s | {rate / stream:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
