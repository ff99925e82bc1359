"""Throughput of the compiled link emulator (``pyccl-linkemu``) itself.

A sender process pushes bytes over ``connections`` TCP connections through
one emulated link to a receiver process (each connection on its own thread,
4 MiB writes and reads); reported is bytes / (first byte sent .. last byte
received). Rows: plain loopback without the emulator (what this machine's
TCP does), the emulator with no delay (the splice path), then a 50 ms
one-way delay with a per-connection window for each connection count, whose
bound is ``connections x window / delay``. Each shaped row moves about
``--seconds`` worth of its bound, so one delay of start-up costs ~2.5%.
Repetitions are interleaved row by row; the median is reported, with the
emulator's CPU time per GB (user + system, from /proc) to show what it costs.

    python benchmarks/linkemu.py                      # 1/4/16/32 connections, 50 ms, window 1 MiB
    python benchmarks/linkemu.py --connections 1 4 --window 4MiB --reps 1

Writes benchmarks/results/linkemu.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pyccl.stress.config import parse_duration, parse_size
from pyccl.stress.linkemu import LinkEmulator, LinkParams

HERE = Path(__file__).resolve().parent
CTX = mp.get_context("spawn")
BLOCK = 4 << 20


def receiver_main(conns: int, pipe: Any) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    pipe.send(srv.getsockname()[1])
    totals = [0] * conns
    done = [0.0] * conns

    def sink(i: int, c: socket.socket) -> None:
        buf = bytearray(BLOCK)
        n = 0
        while True:
            k = c.recv_into(buf)
            if not k:
                break
            n += k
        totals[i] = n
        done[i] = time.time()
        c.close()

    threads = []
    for i in range(conns):
        c, _ = srv.accept()
        t = threading.Thread(target=sink, args=(i, c))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    srv.close()
    pipe.send((sum(totals), max(done)))


def sender_main(port: int, conns: int, nbytes: int, pipe: Any) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    data = memoryview(bytearray(BLOCK))
    per = nbytes // conns

    def push(s: socket.socket) -> None:
        left = per
        while left > 0:
            k = min(left, BLOCK)
            s.sendall(data[:k])
            left -= k
        s.shutdown(socket.SHUT_WR)

    pipe.recv()  # go
    t0 = time.time()
    threads = [threading.Thread(target=push, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pipe.send(t0)
    pipe.recv()  # the receiver has everything: now close
    for s in socks:
        s.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(conns: int, nbytes: int, params: LinkParams | None) -> tuple[float, float]:
    """(bytes/s, emulator CPU seconds per GB) for one transfer."""
    rp, rc = CTX.Pipe()
    recv = CTX.Process(target=receiver_main, args=(conns, rc), daemon=True)
    recv.start()
    port = rp.recv()
    emu = LinkEmulator(threads=2) if params is not None else None
    try:
        if emu is not None and params is not None:
            emu.default(params)
            port = emu.open(port, "dst")
        sp, sc = CTX.Pipe()
        send = CTX.Process(target=sender_main, args=(port, conns, nbytes, sc), daemon=True)
        send.start()
        cpu0 = cpu_seconds(emu._proc.pid) if emu is not None else 0.0
        sp.send("go")
        t0 = sp.recv()
        got, t1 = rp.recv()
        sp.send("close")
        cpu = (cpu_seconds(emu._proc.pid) - cpu0) if emu is not None else 0.0
        send.join(30)
        recv.join(30)
        if got != nbytes // conns * conns:
            raise RuntimeError(f"received {got} of {nbytes} bytes")
        return got / (t1 - t0), cpu / (got / 1e9)
    finally:
        if emu is not None:
            emu.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--delay", type=parse_duration, default=0.05)
    ap.add_argument("--window", type=parse_size, default=1 << 20)
    ap.add_argument("--plain-bytes", type=parse_size, default=4 << 30, help="bytes of the no-delay rows")
    ap.add_argument("--plain-connections", type=int, nargs="+", default=[1, 4],
                    help="connections of the no-delay rows through the emulator")
    ap.add_argument("--seconds", type=float, default=2.0, help="shaped rows move this many seconds of their bound")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "linkemu"))
    args = ap.parse_args()
    shaped = LinkParams(args.delay, None, args.window)
    plan: list[tuple[str, int, LinkParams | None, int, float | None]] = [
        ("loopback, no emulator", 1, None, args.plain_bytes, None),
    ]
    for k in args.plain_connections:
        plan.append(("emulator, no delay", k, LinkParams(), args.plain_bytes, None))
    for k in args.connections:
        bound = k * args.window / args.delay
        plan.append((f"{args.delay * 1e3:g} ms, window {args.window >> 10} KiB", k, shaped,
                     int(bound * args.seconds) // BLOCK * BLOCK or BLOCK, bound))
    results: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(plan))}
    for _ in range(args.reps):
        for i, (_label, k, params, nbytes, _b) in enumerate(plan):
            results[i].append(one_run(k, nbytes, params))
    rows = []
    for i, (label, k, params, nbytes, bound) in enumerate(plan):
        rate = statistics.median(r[0] for r in results[i])
        cpu = statistics.median(r[1] for r in results[i])
        rows.append({"setup": label, "connections": k, "bytes": nbytes, "MBps": rate / 1e6,
                     "runs_MBps": [r[0] / 1e6 for r in results[i]], "bound_MBps": bound / 1e6 if bound else None,
                     "emulator_cpu_s_per_GB": cpu if params is not None else None})
        print(f"{label:<28} c={k:<3} {rate / 1e6:9.1f} MB/s" + (f"  bound {bound / 1e6:8.1f} ({rate / bound:.0%})" if bound else ""),
              flush=True)
    load = os.getloadavg()
    head = (f"# link emulator throughput ({datetime.date.today()}, {platform.node() or 'vm'}, {os.cpu_count()} cores)\n\n"
            f"Command: `python benchmarks/linkemu.py {' '.join(sys.argv[1:])}`\n\n"
            f"One emulated link (sender process -> pyccl-linkemu, 2 worker threads -> receiver process; a connection is served by one worker), "
            f"median of {args.reps} interleaved runs; bound = connections x window / delay. Load average at "
            f"the end (the machine is shared): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}.\n\n")
    table = ["| setup | connections | throughput | bound | of bound | emulator CPU |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bound_MBps"]
        cpu = r["emulator_cpu_s_per_GB"]
        table.append(f"| {r['setup']} | {r['connections']} | {r['MBps']:.1f} MB/s | "
                     + (f"{b:.1f} MB/s | {r['MBps'] / b:.0%} |" if b else "- | - |")
                     + (f" {cpu:.2f} s/GB |" if cpu is not None else " - |"))
    text = head + "\n".join(table) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
