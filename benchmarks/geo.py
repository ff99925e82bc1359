"""Geography-aware collectives on an emulated geography: join-order ring,
optimized ring, two-level all-reduce.

Every peer runs on this machine with its own loopback address behind the
compiled link emulator (``pyccl-linkemu``), which shapes each ordered pair
of peers as a geography says (``pyccl.stress.geography``):

* inside a region: 1 ms one-way, 100 MB/s per pair;
* between two regions: 40 ms one-way, a per-connection window (200 KB:
  with 4 connections at most 20 MB/s per ring link) and one pipe per
  direction between the two regions (30 MB/s: the regions' WAN link,
  shared by every connection across it);
* a per-peer uplink of 100 MB/s.

Peers join in alternating region order (a, b, a, b, ...), so the ring in
join order crosses regions on every link and each pipe is shared by all the
ring links through it. Rows per configuration and size: the ring in join
order, the ring after ``comm.optimize_topology()`` (both with
``two_level="off"``) and the two-level all-reduce (``two_level="on"``:
reduce-scatter in each region, all-reduce of each shard across regions,
all-gather in each region), each next to its bound from the emulated link
parameters: for a ring ``2 (n-1)/n x size / c``, ``c`` the slowest ring
link's capacity (rates, shared pipes split among the ring links through
them, windows, uplinks); for two-level the sum of its three phases' bounds
(``Geography.two_level_time``). Also reported: CPU use during the timed
ops (peers and emulator, as a share of the machine's cores), to show that
the CPU is not the bound.

    python benchmarks/geo.py                          # 6 peers / 2 regions and 12 / 3; 64 and 256 MiB
    python benchmarks/geo.py --configs 6x2 --sizes 8MiB --reps 1

Writes benchmarks/results/geo.md, .json and .png (with matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pyccl.stress.config import parse_size
from pyccl.stress.geography import Geography, peer_ip
from pyccl.stress.linkemu import LinkEmulator

HERE = Path(__file__).resolve().parent
CTX = mp.get_context("spawn")
CONNECTIONS = 4
PHASES = ("join", "optimized", "two_level")


def geography(regions: int) -> Geography:
    names = ["eu", "us", "ap", "sa"][:regions]
    inside = {"delay": "1ms", "rate": "100MB/s", "uplink": "100MB/s"}
    between = [{"regions": [a, b], "delay": "40ms", "window": "200KB", "rate": "30MB/s", "shared": True}
               for i, a in enumerate(names) for b in names[i + 1:]]
    return Geography.from_mapping({"regions": {n: inside for n in names}, "between": between})


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(comm: Any, x: np.ndarray, tiny: np.ndarray) -> tuple[float, float]:
    comm.all_reduce(tiny)  # line the peers up
    c0, t0 = cpu_now(), time.perf_counter()
    comm.all_reduce(x)
    return time.perf_counter() - t0, cpu_now() - c0


def peer_main(idx: int, master: str, ip: str, port: int, adv: int, region: str, n: int, sizes: list[int],
              reps: int, pipe: Any) -> None:
    import pyccl

    try:
        comm = pyccl.Communicator(master, connections=CONNECTIONS, data_port=port, data_host=ip,
                                  advertise=("127.0.0.1", adv), region=region, name=f"p{idx}")
        comm.connect(timeout=120)
        pipe.send(("hello", comm.peer_id))
        comm.wait_for_world(n, 300)
        tiny = np.ones(4, np.float32)
        comm.all_reduce(tiny)  # program positions line up after wait_for_world's votes
        result: dict[str, Any] = {"peer_id": comm.peer_id, "region": region}
        warm = np.ones(1 << 19, np.float32)  # 2 MiB: sets up the links (and the two-level rings)
        for phase in PHASES:
            if phase == "optimized":
                t0 = time.perf_counter()
                comm.optimize_topology()
                result["optimize_s"] = time.perf_counter() - t0
            comm.two_level = "on" if phase == "two_level" else "off"  # every peer switches at this point
            result[f"{phase}_ring"] = comm.peers
            comm.all_reduce(warm)
            for size in sizes:
                x = np.ones(size // 4, np.float32)
                runs = []
                for _ in range(reps):
                    x[:] = 1
                    runs.append(timed(comm, x, tiny))
                if not np.array_equal(x, np.full_like(x, n)):
                    raise RuntimeError("wrong all-reduce result")
                result[f"{phase}_{size}"] = runs
                del x
        pipe.send(("ok", result))
        comm.all_reduce(tiny)  # nobody leaves while another still measures
        comm.close()
    except BaseException as exc:  # report, do not hang the benchmark
        pipe.send(("error", repr(exc)))
        raise


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_config(n: int, regions: int, sizes: list[int], reps: int) -> dict[str, Any]:
    import pyccl

    geo = geography(regions)
    emu = LinkEmulator(threads=2)
    master = pyccl.Master(host="127.0.0.1", port=0, heartbeat_timeout=60.0).start()
    procs, pipes = [], []
    try:
        peers = []
        for i in range(n):
            ip = peer_ip(i)
            port = free_port(ip)
            peers.append((f"p{i}", geo.region_of(i), ip, port, emu.open(port, f"p{i}", upstream_host=ip)))
        geo.apply(emu, [(name, region, ip) for name, region, ip, _, _ in peers])
        emu_cpu0 = proc_cpu(emu._proc.pid)
        t_start = time.perf_counter()
        for i, (_, region, ip, port, adv) in enumerate(peers):  # one by one: the join order alternates
            parent, child = CTX.Pipe(duplex=False)
            p = CTX.Process(target=peer_main, args=(i, master.address, ip, port, adv, region, n, sizes, reps, child),
                            daemon=True)
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
            if not parent.poll(120):
                raise RuntimeError(f"peer {i} did not connect")
            kind, payload = parent.recv()
            if kind != "hello":
                raise RuntimeError(f"peer {i}: {payload}")
        results = []
        for parent in pipes:
            if not parent.poll(3600):
                raise RuntimeError("a peer did not report within an hour")
            kind, payload = parent.recv()
            if kind != "ok":
                raise RuntimeError(f"peer failed: {payload}")
            results.append(payload)
        wall = time.perf_counter() - t_start
        emu_cpu = proc_cpu(emu._proc.pid) - emu_cpu0
    finally:
        for p in procs:
            p.join(60)
            if p.exitcode is None:
                p.kill()
                p.join()
        emu.close()
        master.stop()
    region_of = {r["peer_id"]: r["region"] for r in results}
    out: dict[str, Any] = {"peers": n, "regions": regions, "rows": [], "emulator_cpu_s": emu_cpu, "wall_s": wall,
                           "optimize_s": max(r["optimize_s"] for r in results)}
    for phase in PHASES:
        ring = results[0][f"{phase}_ring"]
        ring_regions = [region_of[p] for p in ring]
        caps = geo.ring_link_capacity(ring_regions, CONNECTIONS)
        crossings = sum(1 for i in range(n) if ring_regions[i] != ring_regions[(i + 1) % n])
        order = list(dict.fromkeys(ring_regions))  # regions in order of first appearance: the cross rings
        for size in sizes:
            per_rep = [max(r[f"{phase}_{size}"][k][0] for r in results) for k in range(reps)]
            cpu = [sum(r[f"{phase}_{size}"][k][1] for r in results) for k in range(reps)]
            t = statistics.median(per_rep)
            if phase == "two_level":
                bound = geo.two_level_time(order, n // regions, size, CONNECTIONS)
            else:
                bound = 2 * (n - 1) / n * size / min(caps)
            out["rows"].append({"ring": phase, "size": size, "time_s": t, "times_s": per_rep, "bound_s": bound,
                                "crossings": crossings, "ring_order": ring, "ring_regions": ring_regions,
                                "peer_cpu_share": statistics.median(c / tt / (os.cpu_count() or 1)
                                                                    for c, tt in zip(cpu, per_rep))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["6x2", "12x3"], help="PEERSxREGIONS")
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=[64 << 20, 256 << 20])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "geo"))
    args = ap.parse_args()
    configs = []
    for c in args.configs:
        n, r = (int(v) for v in c.split("x"))
        print(f"{n} peers in {r} regions ...", flush=True)
        res = run_config(n, r, args.sizes, args.reps)
        configs.append(res)
        for row in res["rows"]:
            print(f"  {row['ring']:<10} {row['size'] >> 20:4d} MiB {row['time_s']:8.2f} s  bound {row['bound_s']:7.2f} s"
                  f"  crossings {row['crossings']}", flush=True)
    load = os.getloadavg()
    lines = [f"# geography-aware all-reduce on an emulated geography ({datetime.date.today()}, "
             f"{platform.node() or 'vm'}, {os.cpu_count()} cores)", "",
             f"Command: `python benchmarks/geo.py {' '.join(sys.argv[1:])}`", "",
             "Inside a region 1 ms one-way and 100 MB/s per pair; between regions 40 ms one-way, 200 KB window "
             f"per connection ({CONNECTIONS} connections: 20 MB/s per ring link), one 30 MB/s pipe per direction "
             "between two regions shared by every connection across it; 100 MB/s uplink per peer. Peers joined in "
             "alternating region order. join and optimized: the flat ring (two_level='off'); two_level: "
             "reduce-scatter in each region, all-reduce of each shard across regions, all-gather in each region. "
             f"Time: median over {args.reps} ops of the slowest peer. Bound: for a ring 2(n-1)/n x size / (slowest "
             "ring link's capacity), for two-level the sum of its phases' bounds. "
             "CPU: peers' CPU time during the op / (time x cores); emulator: its CPU over the whole run. "
             f"Load average at the end (shared machine): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}.", "",
             "| peers / regions | ring | crossings | size | time | bound | of bound | speed-up | peers' CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in configs:
        join = {r["size"]: r["time_s"] for r in res["rows"] if r["ring"] == "join"}
        for r in res["rows"]:
            speed = join[r["size"]] / r["time_s"]
            lines.append(f"| {res['peers']} / {res['regions']} | {r['ring']} | {r['crossings']} | "
                         f"{r['size'] >> 20} MiB | {r['time_s']:.2f} s | {r['bound_s']:.2f} s | "
                         f"{r['bound_s'] / r['time_s']:.0%} | {speed:.2f}x | {r['peer_cpu_share']:.0%} |")
    lines.append("")
    for res in configs:
        t = {(r["ring"], r["size"]): r["time_s"] for r in res["rows"]}
        for size in sorted({r["size"] for r in res["rows"]}):
            lines.append(f"{res['peers']} peers, {size >> 20} MiB: optimized ring {t[('join', size)] / t[('optimized', size)]:.2f}x "
                         f"the join-order ring; two-level {t[('optimized', size)] / t[('two_level', size)]:.2f}x the "
                         "optimized ring.")
    lines.append("")
    for res in configs:
        lines.append(f"{res['peers']} peers: optimize_topology() took {res['optimize_s']:.1f} s; emulator CPU "
                     f"{res['emulator_cpu_s']:.1f} s over a {res['wall_s']:.0f} s run "
                     f"({res['emulator_cpu_s'] / res['wall_s'] / (os.cpu_count() or 1):.0%} of the machine).")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"configs": configs}, indent=1) + "\n")
    try:
        plot(configs, args.out + ".png")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    print("\n" + text)


def plot(configs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, res in zip(axes[0], configs):
        sizes = sorted({r["size"] for r in res["rows"]})
        width = 0.2
        for k, (ring, color) in enumerate((("join", "tab:red"), ("optimized", "tab:green"),
                                           ("two_level", "tab:blue"))):
            rows = {r["size"]: r for r in res["rows"] if r["ring"] == ring}
            xs = [i + (k - 1) * 1.2 * width for i in range(len(sizes))]
            ax.bar(xs, [rows[s]["time_s"] for s in sizes], width, color=color, label=ring.replace("_", "-"))
            ax.bar(xs, [rows[s]["bound_s"] for s in sizes], width * 0.4, color="black", alpha=0.5,
                   label="bound" if k == 0 else None)
        ax.set_xticks(range(len(sizes)), [f"{s >> 20} MiB" for s in sizes])
        ax.set_ylabel("all-reduce time (s)")
        ax.set_title(f"{res['peers']} peers in {res['regions']} regions")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
