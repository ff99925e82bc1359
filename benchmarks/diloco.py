"""Time per outer step: sync vs one-step-delayed DiLoCo over a slow link.

Every peer sits behind the stress tool's proxy (:mod:`pyccl.stress.proxy`,
in its own process) set to a one-way delay and a bandwidth cap, so the
all-reduce of the pseudo-gradients takes several inner steps. Sync DiLoCo
waits for it at every outer step; delayed DiLoCo runs it during the next H
inner steps and should hide it.

An inner step is a real AdamW step on the model (8 square linear layers,
``--size`` bytes of float32 parameters, gradients from a fixed set of random
tensors) padded with sleep to ``--inner-ms``: the
accelerator's forward/backward, which leaves the CPU (and the network) free.
So compute does not fight the proxy and the peers for this small machine's
two cores, and the numbers show the schedule, not CPU contention.

Per row: a fresh master, proxy process and peers; one outer step of warm-up,
then ``--outer`` timed outer steps. Reported per row (slowest peer):

    time per outer step      wall time of H inner steps + the outer step
    compute                  H x the inner step time (the no-communication floor)
    exposed comm             time per outer step - compute
    all-reduce               how long the outer all-reduce itself took

    python benchmarks/diloco.py            # 2 peers, 16 MiB of parameters, 40 MB/s, 25 ms, H = 20, 50 ms steps

Writes benchmarks/results/diloco.md and .json.
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

from pyccl.stress.config import parse_duration, parse_size
from pyccl.stress.processes import PortPool

ROOT = Path(__file__).resolve().parents[1]

CTX = mp.get_context("spawn")


def peer_main(master: str, n: int, connections: int, data_port: int, advertise: Any, params: int, mode: dict,
              sync_every: int, inner_s: float, outer: int, pipe: Any) -> None:
    import pyccl
    from pyccl.diloco import DiLoCo

    import torch

    try:
        torch.set_num_threads(1)
        comm = pyccl.Communicator(master, connections=connections, data_port=data_port, advertise=advertise)
        comm.connect(timeout=120)
        deadline = time.monotonic() + 120
        while comm.world_size < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"group did not reach {n} peers")
            if not comm.update_topology():
                time.sleep(0.01)
        torch.manual_seed(0)
        side = int((params // 8) ** 0.5)
        model = torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(8)])
        inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
        dl = DiLoCo(model, inner, comm, sync_every=sync_every, **mode)
        gen = torch.Generator().manual_seed(comm.peer_id)
        noise = [[torch.randn(p.shape, generator=gen) * 1e-3 for p in model.parameters()] for _ in range(2)]
        compute: list[float] = []

        def inner_step() -> Any:
            t0 = time.perf_counter()
            for p, g in zip(model.parameters(), noise[dl.inner_step % 2]):
                p.grad = g
            info = dl.step()
            left = inner_s - (time.perf_counter() - t0 - (info.seconds if info else 0.0))
            if left > 0:  # pad the step's own work to the accelerator's step time
                time.sleep(left)
            compute.append(time.perf_counter() - t0 - (info.seconds if info else 0.0))
            return info

        fragments = mode.get("fragments", 1)
        rounds = outer + 1
        infos = []
        t_start = 0.0
        for r in range(rounds):
            if r == 1:
                comm.all_reduce(torch.zeros(1), tag=1)  # line the peers up after the warm-up round
                t_start = time.perf_counter()
                compute.clear()
            for _ in range(sync_every):
                info = inner_step()
                if info is not None and r >= 1:
                    infos.append(info)
        elapsed = time.perf_counter() - t_start
        dl.finish()
        pipe.send(("ok", {
            "per_outer_s": elapsed / outer,
            "compute_s": sum(compute) / outer,
            "blocked_s": sum(i.seconds for i in infos) / outer,
            "allreduce_s": statistics.median(i.reduce_seconds for i in infos if i.reduce_seconds > 0),
            "tx_bytes": sum(i.tx_bytes for i in infos) / outer,
            "fragments": fragments,
        }))
        comm.all_reduce(torch.zeros(1), tag=1)  # nobody leaves while another still measures
        comm.close()
    except BaseException as exc:  # report, do not hang the benchmark
        pipe.send(("error", repr(exc)))
        raise


async def one_row(n: int, connections: int, params: int, mode: dict, args: argparse.Namespace) -> list[dict]:
    import pyccl
    from pyccl.stress.netem import NetemClient
    from pyccl.stress.proxy import LinkShape

    loop = asyncio.get_running_loop()
    master = pyccl.Master(host="127.0.0.1", port=0, heartbeat_timeout=30.0).start()
    netem = NetemClient(LinkShape(delay=args.delay, bandwidth=args.bandwidth))
    procs, pipes = [], []
    try:
        await netem.start()
        ports = PortPool()
        for _ in range(n):
            data_port = ports.take()
            adv = ("127.0.0.1", await netem.open(data_port))
            parent, child = CTX.Pipe(duplex=False)
            p = CTX.Process(target=peer_main, args=(master.address, n, connections, data_port, adv, params, mode,
                                                    args.sync_every, args.inner_ms / 1e3, args.outer, child),
                            daemon=True)
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
        return results
    finally:
        for p in procs:
            await loop.run_in_executor(None, p.join, 30)
            if p.exitcode is None:
                p.kill()
                p.join()
        await netem.close()
        master.stop()


MODES: list[tuple[str, dict[str, Any]]] = [
    ("sync", {}),
    ("delayed", {"delayed": True}),
    ("sync, uint8", {"quantize": "uint8"}),
    ("delayed, uint8", {"delayed": True, "quantize": "uint8"}),
    ("sync, 4 fragments", {"fragments": 4}),
    ("delayed, 4 fragments", {"delayed": True, "fragments": 4}),
    ("delayed, eager", {"delayed": "eager"}),
    ("delayed overlap, tau = H/2, rebase", {"delayed": "overlap"}),
    ("streaming, 4 fragments, tau = H/4", {"fragments": 4, "sync_delay": "H/4", "mixing": 0.5}),
    ("sync, int4", {"quantize": "int4"}),
]


def resolve(mode: dict[str, Any], sync_every: int) -> dict[str, Any]:
    """Replace "H/k" sync delays by inner-step counts."""
    out = dict(mode)
    d = out.get("sync_delay")
    if isinstance(d, str):
        out["sync_delay"] = sync_every // int(d.split("/")[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--size", type=parse_size, default=16 << 20, help="bytes of float32 parameters")
    ap.add_argument("--bandwidth", type=parse_size, default=40_000_000, help="bytes/s per proxy and direction")
    ap.add_argument("--delay", type=parse_duration, default=0.025, help="one-way")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--sync-every", type=int, default=20)
    ap.add_argument("--inner-ms", type=float, default=50.0)
    ap.add_argument("--outer", type=int, default=4, help="timed outer steps per row")
    ap.add_argument("--modes", nargs="+", default=[m for m, _ in MODES], choices=[m for m, _ in MODES])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diloco"))
    args = ap.parse_args()
    import uvloop

    params = args.size // 4
    side = int((params // 8) ** 0.5)
    params = 8 * side * side  # 8 square layers, so that fragments have parameters to split
    compute_s = args.sync_every * args.inner_ms / 1e3
    rows = []
    for label, mode in MODES:
        if label not in args.modes:
            continue
        res = uvloop.run(one_row(args.peers, args.connections, params, resolve(mode, args.sync_every), args))
        per_outer = max(r["per_outer_s"] for r in res)
        compute = max(r["compute_s"] for r in res)
        row = {
            "mode": label,
            "per_outer_s": per_outer,
            "compute_s": compute,
            "exposed_s": per_outer - compute,
            "allreduce_s": max(r["allreduce_s"] for r in res),
            "blocked_s": max(r["blocked_s"] for r in res),
            "tx_MB": max(r["tx_bytes"] for r in res) / 1e6,
            "peers": res,
        }
        rows.append(row)
        print(f"{label:<22} {per_outer:7.3f} s/outer step  compute {compute:6.3f} s  exposed "
              f"{row['exposed_s']:6.3f} s  all-reduce {row['allreduce_s']:6.3f} s", flush=True)
    base = next((r for r in rows if r["mode"] == "sync"), None)
    load = os.getloadavg()
    head = (f"# DiLoCo: time per outer step, sync vs one-step delayed ({datetime.date.today()}, "
            f"{platform.node() or 'vm'}, {os.cpu_count()} cores, loopback through the stress proxy)\n\n"
            f"Command: `python benchmarks/diloco.py {' '.join(sys.argv[1:])}`\n\n"
            f"{args.peers} peers, {params * 4 / 2**20:.0f} MiB of float32 parameters, H = {args.sync_every} "
            f"inner steps of {args.inner_ms:g} ms (AdamW step padded with sleep: an accelerator's step), "
            f"{args.connections} connections per neighbour; every link through the proxy at "
            f"{args.bandwidth / 1e6:g} MB/s per direction and {args.delay * 1e3:g} ms one way. "
            f"{args.outer} timed outer steps per row after one of warm-up; slowest peer. "
            f"compute = H x inner step; exposed = time per outer step - compute (the communication training "
            f"waited for); all-reduce = the outer all-reduce's own duration (median; with fragments, one "
            f"fragment's). Load average at the end: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}.\n\n")
    table = ["| mode | time per outer step | compute | exposed comm | all-reduce | MB sent per outer step | "
             "comm hidden | vs sync |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ar = r["allreduce_s"] * (4 if "4 fragments" in r["mode"] else 1)
        hidden = max(0.0, 1 - r["exposed_s"] / ar) if ar > 0 else 0.0
        rel = f"{base['per_outer_s'] / r['per_outer_s']:.2f}x" if base else "-"
        table.append(f"| {r['mode']} | {r['per_outer_s']:.3f} s | {r['compute_s']:.3f} s | {r['exposed_s']:.3f} s | "
                     f"{r['allreduce_s']:.3f} s | {r['tx_MB']:.1f} | {hidden:.0%} | {rel} |")
    text = head + "\n".join(table) + "\n\ncomm hidden = 1 - exposed / (all-reduce time per outer step, all fragments).\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "params": params,
                                                    "compute_floor_s": compute_s, "rows": rows}, indent=1) + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
