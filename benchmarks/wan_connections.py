"""One large all-reduce over an emulated long fat pipe: throughput vs connections.

Every peer sits behind the link emulator (``pyccl-linkemu``, compiled;
``--emulator python`` uses the stress tool's asyncio proxy instead) set to a
one-way delay and a per-connection window, which caps each TCP connection
at ``window / delay`` (50 ms and 4 MiB: 84 MB/s), like a window-limited
intercontinental path. pyccl stripes every collective over ``connections``
TCP connections per ring neighbour, so the time of one large all-reduce
should fall about linearly with the number of connections until something
else (here: the CPU of a small machine, which also runs the proxies) is the
limit. Two reference rows show those limits: the same all-reduce with no
proxy, and through the proxy with no delay.

Per row: a fresh master, proxy process and peer processes; one warm-up op,
then ``--reps`` timed ops (each after a tiny all-reduce that lines the peers
up); reported is the median of the slowest peer's time. Each peer sends
``2 (n-1)/n x size`` bytes over its one outgoing link, so

    link throughput = 2 (n-1)/n x size / time      bound = connections x window / delay

    python benchmarks/wan_connections.py                         # 256 MiB, 2 peers, 1/4/16 connections
    python benchmarks/wan_connections.py --size 64MiB --connections 1 4

Writes benchmarks/results/wan_connections.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pyccl.stress.config import parse_duration, parse_size
from pyccl.stress.processes import PortPool

HERE = Path(__file__).resolve().parent

CTX = mp.get_context("spawn")


def peer_main(master: str, n: int, connections: int, data_port: int, advertise: Any, count: int, reps: int,
              pipe: Any) -> None:
    import pyccl

    try:
        comm = pyccl.Communicator(master, connections=connections, data_port=data_port, advertise=advertise)
        comm.connect(timeout=120)
        deadline = time.monotonic() + 120
        while comm.world_size < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"group did not reach {n} peers")
            if not comm.update_topology():
                time.sleep(0.01)
        x = np.ones(count, dtype=np.float32)
        out = np.empty_like(x)
        tiny = np.ones(4, dtype=np.float32)
        comm.all_reduce(x, out=out)  # warm-up: connections, page faults
        times = []
        for _ in range(reps):
            comm.all_reduce(tiny)  # line the peers up
            t0 = time.perf_counter()
            comm.all_reduce(x, out=out)
            times.append(time.perf_counter() - t0)
        if not np.array_equal(out, np.full(count, n, dtype=np.float32)):
            raise RuntimeError("wrong all-reduce result")
        pipe.send(("ok", times))
        comm.all_reduce(tiny)  # nobody leaves while another still measures
        comm.close()
    except BaseException as exc:  # report, do not hang the benchmark
        pipe.send(("error", repr(exc)))
        raise


async def one_row(n: int, connections: int, size: int, reps: int, delay: float, window: int | None,
                  proxy: bool, emulator: str) -> list[float]:
    """Times (one per rep, slowest peer) of a ``size``-byte all-reduce."""
    import pyccl
    from pyccl.stress.emunet import CompiledNetem
    from pyccl.stress.linkemu import LinkParams
    from pyccl.stress.netem import NetemClient
    from pyccl.stress.proxy import LinkShape

    loop = asyncio.get_running_loop()
    master = pyccl.Master(host="127.0.0.1", port=0, heartbeat_timeout=30.0).start()
    netem: CompiledNetem | NetemClient | None = None
    if proxy:
        netem = (CompiledNetem(LinkParams(delay, None, window)) if emulator == "compiled"
                 else NetemClient(LinkShape(delay=delay, window=window)))
    procs, pipes = [], []
    try:
        if netem is not None:
            await netem.start()
        ports = PortPool()
        for _ in range(n):
            data_port = ports.take()
            adv = ("127.0.0.1", await netem.open(data_port)) if netem is not None else None
            parent, child = CTX.Pipe(duplex=False)
            p = CTX.Process(target=peer_main, args=(master.address, n, connections, data_port, adv, size // 4, reps,
                                                    child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        results = []
        for parent in pipes:
            ok = await loop.run_in_executor(None, parent.poll, 600)
            if not ok:
                raise RuntimeError("a peer did not report within 600 s")
            kind, payload = parent.recv()
            if kind != "ok":
                raise RuntimeError(f"peer failed: {payload}")
            results.append(payload)
        return [max(r[i] for r in results) for i in range(reps)]
    finally:
        for p in procs:
            await loop.run_in_executor(None, p.join, 30)
            if p.exitcode is None:
                p.kill()
                p.join()
        if netem is not None:
            await netem.close()
        master.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=256 << 20)
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--delay", type=parse_duration, default=0.05, help="one-way, e.g. 50ms")
    ap.add_argument("--window", type=parse_size, default=4 << 20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true", help="skip the no-proxy and no-delay rows")
    ap.add_argument("--emulator", choices=("compiled", "python"), default="compiled")
    ap.add_argument("--out", default=str(HERE / "results" / "wan_connections"))
    args = ap.parse_args()
    import uvloop

    n, size = args.peers, args.size
    per_link = 2 * (n - 1) / n * size
    rows = []
    plan: list[tuple[str, int, float, int | None, bool]] = []
    if not args.no_reference:
        top = max(args.connections)
        plan.append(("no proxy (loopback)", top, 0.0, None, False))
        plan.append((f"{args.emulator} emulator, no delay", top, 0.0, None, True))
    for k in args.connections:
        plan.append((f"{args.delay * 1e3:g} ms, window {args.window >> 20} MiB", k, args.delay, args.window, True))
    for label, k, delay, window, proxy in plan:
        times = uvloop.run(one_row(n, k, size, args.reps, delay, window, proxy, args.emulator))
        t = statistics.median(times)
        bound = k * window / delay if (window and delay) else None
        row = {"setup": label, "connections": k, "time_s": t, "times_s": times,
               "link_MBps": per_link / t / 1e6, "algbw_MBps": size / t / 1e6,
               "bound_MBps": bound / 1e6 if bound else None}
        rows.append(row)
        print(f"{label:<28} c={k:<3} {t:8.3f} s  link {row['link_MBps']:8.1f} MB/s"
              + (f"  bound {row['bound_MBps']:8.1f} MB/s ({row['link_MBps'] / row['bound_MBps']:.0%})" if bound else ""),
              flush=True)
    load = os.getloadavg()
    head = (f"# one {size >> 20} MiB all-reduce over an emulated long fat pipe "
            f"({datetime.date.today()}, {platform.node() or 'vm'}, {os.cpu_count()} cores, loopback)\n\n"
            f"Command: `python benchmarks/wan_connections.py {' '.join(sys.argv[1:])}`\n\n"
            f"{n} peers, each behind the {args.emulator} link emulator (one-way delay, window = bytes in flight per connection "
            f"and direction, so one connection carries at most window/delay). Median of {args.reps} ops, slowest "
            f"peer. link = bytes each peer sends on its link (2(n-1)/n x size) / time; bound = connections x "
            f"window / delay. Load average at the end: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}.\n\n")
    table = ["| setup | connections | time | link throughput | bound | of bound |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = r["bound_MBps"]
        table.append(f"| {r['setup']} | {r['connections']} | {r['time_s']:.3f} s | {r['link_MBps']:.1f} MB/s | "
                     + (f"{b:.1f} MB/s | {r['link_MBps'] / b:.0%} |" if b else "- | - |"))
    text = head + "\n".join(table) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"size": size, "peers": n, "rows": rows}, indent=1) + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
