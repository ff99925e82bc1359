"""How far one master scales: N simulated peers against a real master.

The master runs as ``pyccl master`` in its own process (its CPU time and RSS
are read from /proc). The peers are simulated in this process: one asyncio
(uvloop) loop, one TCP connection per peer, speaking the control protocol
frame for frame with the frame classes of :mod:`pyccl.protocol` (hello with
a nonce and ``beat``, votes, ``done``, ``drained``, ``bye``, heartbeats) but
without data planes. Per N (``--peers 100 1000 10000``), on a fresh master:

* join storm: all N connect at once; the group's members call
  update_topology() once all were welcomed, or when welcomes pause for
  0.1 s, until one epoch holds all N (time, and how many epochs that took);
* collective verdicts: every member sends ``done`` for the same op; the
  latency of each ``op_ok`` from the first ``done`` written (median, p99),
  and the simulator's own share: how long writing the N ``done`` frames took;
* admission rounds: one new peer waits, every member votes, in shuffled or
  in ring order (interleaved); the time until every voter has its
  ``round_done`` (drain, drained, the new epoch included);
* leave storm: 10% of the members send ``bye`` at once; the time until the
  survivors all hold the epoch without them;
* master CPU per collective and per admission round, and its RSS.

``--groups`` (item 5 of issue 12): a quiet group of ``--quiet-peers`` runs
collectives (in a second simulator process, so that the storm's own
simulation does not slow it) while a storm hits another group of
``--storm-peers`` on the same master: its join storm, 10% joining, 10%
leaving, a mismatch. The quiet group's verdict latency per window shows how
much the storm delays another group.

    python benchmarks/master_scale.py --peers 100 1000 10000 --groups --out results.md

``--master-pythonpath DIR`` runs the master from another source tree (the
simulator is unchanged): how the before/after tables were measured.
"""


from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from pyccl import protocol as P

# The simulator sits next to this script (sys.path[0] when it runs).
from scale_sim import PHASE_TIMEOUT, MasterProc, Sim, SimGroup, Tally, encoded, free_port, now, pct, raise_nofile

# ---------------------------------------------------------------- runs


async def scale_run(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every phase for n peers on a fresh master."""
    master = MasterProc(args.heartbeat_timeout, args.master_pythonpath, args.master_profile)
    try:
        sim = Sim(master.address, master)
        group = SimGroup(1)
        beat = asyncio.ensure_future(sim.beat([group], args.heartbeat_timeout / 5))
        row: dict[str, Any] = {"peers": n, "join": await sim.join_storm(group, n)}
        perf = _perf(master, args.perf_collectives, n)
        row["collective"] = await sim.collectives(group, args.reps)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        row["admission"] = await sim.admissions(group, args.admissions)
        row["rss_mib"], row["hwm_mib"] = master.rss_mib()
        sim.heartbeat(group)
        await asyncio.sleep(0.05)
        row["leave"] = await sim.leave_storm(group, 0.1)
        beat.cancel()
        for p in group.peers:
            if p.transport is not None:
                p.transport.close()
        if args.floor:
            await asyncio.sleep(0.5)
            row["floor"] = await floor_run(n, args.reps)
        return row
    finally:
        master.close()


def _perf(master: MasterProc, out: str | None, n: int) -> subprocess.Popen[bytes] | None:
    """``perf record`` of the master during the collectives phase (``--perf-collectives``)."""
    if out is None:
        return None
    proc = subprocess.Popen(["perf", "record", "-F", "4999", "-g", "-p", str(master.proc.pid), "-o",
                             f"{out}.{n}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # perf attaches
    return proc


async def quiet_run(args: argparse.Namespace) -> None:
    """The quiet group (its own process): join, say ready, run collectives every
    --period until stdin closes, then print every collective's latencies as JSON."""
    sim = Sim(args.address, None)
    group = SimGroup(args.group)
    beat = asyncio.ensure_future(sim.beat([group], args.heartbeat_timeout / 5))
    await sim.join_storm(group, args.quiet_peers)
    loop = asyncio.get_running_loop()
    stop = loop.run_in_executor(None, sys.stdin.read)
    print("ready", flush=True)
    samples: list[tuple[float, list[float]]] = []
    while not stop.done():
        t = now()
        times, _ = await sim.collective(group)
        samples.append((t, times))
        await asyncio.sleep(max(0.0, args.period - (now() - t)))
    beat.cancel()
    print(json.dumps(samples), flush=True)


async def groups_run(args: argparse.Namespace) -> dict[str, Any]:
    """A storm in one group while another runs collectives; windows of the storm."""
    master = MasterProc(args.heartbeat_timeout, args.master_pythonpath)
    quiet = None
    try:
        quiet = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", "quiet", "--address",
                                  master.address, "--quiet-peers", str(args.quiet_peers), "--period",
                                  str(args.period), "--heartbeat-timeout", str(args.heartbeat_timeout)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert quiet.stdout is not None and quiet.stdin is not None
        if quiet.stdout.readline().strip() != "ready":
            raise RuntimeError("the quiet group's simulator did not start")
        sim = Sim(master.address, master)
        storm = SimGroup(2)
        beat = asyncio.ensure_future(sim.beat([storm], args.heartbeat_timeout / 5))
        windows: list[tuple[str, float, float]] = []

        async def window(name: str, phase: Any) -> None:
            t0 = now()
            await phase
            windows.append((name, t0, now()))
            print(f"  storm group: {name} took {now() - t0:.3f} s", file=sys.stderr, flush=True)

        await window("calm", asyncio.sleep(args.calm))
        await window("join storm", sim.join_storm(storm, args.storm_peers))
        await window("calm", asyncio.sleep(args.calm))
        for _ in range(args.storms):
            await window("10% join", sim.join_storm(storm, max(1, args.storm_peers // 10)))
            await window("10% leave", sim.leave_storm(storm, 0.1))
            await window("mismatch", sim.mismatch(storm))
        await window("calm", asyncio.sleep(args.calm))
        beat.cancel()
        out, _ = quiet.communicate(timeout=120)
        samples = json.loads(out.strip().splitlines()[-1])
        return {"windows": _per_window(samples, windows), "quiet_peers": args.quiet_peers,
                "storm_peers": args.storm_peers}
    finally:
        if quiet is not None and quiet.poll() is None:
            quiet.kill()
            quiet.wait()
        master.close()


def _per_window(samples: list[tuple[float, list[float]]], windows: list[tuple[str, float, float]]
                ) -> dict[str, dict[str, float]]:
    """Quiet-group latencies of collectives begun in each kind of window."""
    by: dict[str, list[float]] = {}
    for t, times in samples:
        for name, a, b in windows:
            if a <= t < b:
                by.setdefault(name, []).extend(times)
    return {name: {"n": len(v), "median_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * pct(v, 0.99),
                   "max_ms": 1e3 * max(v)} for name, v in by.items() if v}


# ---------------------------------------------------------------- floor


class _FloorServer(asyncio.Protocol):
    """--role floor: no protocol at all. Counts frames; once every connection
    sent one, writes one pre-encoded frame to every connection. What one
    uvloop process pays per peer and round for one read and one write."""

    conns: list[asyncio.Transport] = []
    count = 0
    reply = encoded(P.OpOk(1, 0, 0))

    def connection_made(self, transport: Any) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _FloorServer.conns.append(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        _FloorServer.conns = [t for t in _FloorServer.conns if not t.is_closing()]

    def data_received(self, data: bytes) -> None:
        _FloorServer.count += 1
        if _FloorServer.count == len(_FloorServer.conns):
            _FloorServer.count = 0
            reply = _FloorServer.reply
            for t in _FloorServer.conns:
                t.write(reply)


async def floor_server(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_FloorServer, "127.0.0.1", port, backlog=65535)
    async with server:
        await server.serve_forever()


class _FloorClient(asyncio.Protocol):
    tally: Tally | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if _FloorClient.tally is not None:
            _FloorClient.tally.hit(now())


async def floor_run(n: int, reps: int) -> dict[str, float]:
    """The same round trip as a collective (N frames in, N out) against the bare server."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", "floor", "--address",
                             f"127.0.0.1:{port}"])
    try:
        loop = asyncio.get_running_loop()
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            await asyncio.sleep(0.1)
        clients = [(await loop.create_connection(_FloorClient, "127.0.0.1", port))[1] for _ in range(n)]
        await asyncio.sleep(0.5)
        data = encoded(P.Done(1, 0, 0))
        master = MasterProc.__new__(MasterProc)
        master.proc = proc  # type: ignore[assignment]
        cpu0 = master.cpu()
        for _ in range(reps):
            tally = _FloorClient.tally = Tally(n)
            for c in clients:
                c.transport.write(data)
            await asyncio.wait_for(tally.fut, PHASE_TIMEOUT)
        return {"cpu_ms": 1e3 * (master.cpu() - cpu0) / reps}
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- report


def scale_table(rows: list[dict[str, Any]], label: str) -> str:
    lines = [f"master: {label}", "",
             "| peers | join storm | verdict median / p99 | sim send of the N `done` | admission shuffled / ring "
             "| 10% leave | master CPU per collective (kernel share) | per admission shuffled / ring (kernel share) | master RSS (peak) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        j, c, a, lv = r["join"], r["collective"], r["admission"], r["leave"]
        lines.append(
            f"| {r['peers']:,} | {j['s']:.2f} s ({j['epochs']} epochs) | {c['median_ms']:.2f} / {c['p99_ms']:.2f} ms "
            f"| {c['send_ms']:.2f} ms | {a['shuffled']:.1f} / {a['ring']:.1f} ms "
            f"| {lv['ms']:.0f} ms ({lv['epochs']} epochs) | {c['cpu_ms']:.2f} ms ({100 * c['sys_share']:.0f}%) "
            f"| {a['cpu_shuffled']:.1f} / {a['cpu_ring']:.1f} ms ({100 * a.get('sys_share', 0):.0f}%) | {r['rss_mib']:.0f} ({r['hwm_mib']:.0f}) MiB |")
    floors = [r for r in rows if "floor" in r]
    if floors:
        lines += ["", "Floor: a bare uvloop server (no protocol: N frames in, one frame written to each of N "
                  "connections) costs per round " + ", ".join(
                      f"{r['floor']['cpu_ms']:.2f} ms at {r['peers']:,}" for r in floors) + "."]
    return "\n".join(lines)


def groups_table(res: dict[str, Any], label: str) -> str:
    w = res["windows"]
    base = w.get("calm", {"median_ms": float("nan"), "p99_ms": float("nan")})
    lines = [f"master: {label}; quiet group of {res['quiet_peers']} peers, storm group of {res['storm_peers']}", "",
             "| storm window | quiet collectives' op_ok | median | p99 | max | p99 growth vs calm |",
             "|---|---|---|---|---|---|"]
    for name, v in w.items():
        lines.append(f"| {name} | {v['n']} | {v['median_ms']:.2f} ms | {v['p99_ms']:.2f} ms | {v['max_ms']:.1f} ms "
                     f"| {v['p99_ms'] - base['p99_ms']:+.2f} ms |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, nargs="*", default=[100, 1000, 10000])
    ap.add_argument("--reps", type=int, default=30, help="collectives per N")
    ap.add_argument("--admissions", type=int, default=5, help="admission rounds per vote order per N")
    ap.add_argument("--floor", action="store_true",
                    help="also measure a bare uvloop server: one read and one write per peer, no protocol")
    ap.add_argument("--groups", action="store_true", help="also measure a storm next to a quiet group")
    ap.add_argument("--quiet-peers", type=int, default=100)
    ap.add_argument("--storm-peers", type=int, default=1000)
    ap.add_argument("--storms", type=int, default=3, help="join/leave/mismatch cycles in the storm group")
    ap.add_argument("--period", type=float, default=0.01, help="seconds between the quiet group's collectives")
    ap.add_argument("--calm", type=float, default=2.0, help="seconds of calm before and after the storm")
    ap.add_argument("--heartbeat-timeout", type=float, default=60.0)
    ap.add_argument("--master-pythonpath", default=None, help="PYTHONPATH of the master (another source tree)")
    ap.add_argument("--master-profile", default=None, metavar="FILE",
                    help="run the master under cProfile, stats to FILE (distorts the times: for profiles only)")
    ap.add_argument("--perf-collectives", default=None, metavar="FILE",
                    help="perf record the master during the collectives phase, to FILE.N")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--out", default=None, help="also write the tables (markdown) and a .json next to it")
    ap.add_argument("--role", default="main", choices=["main", "quiet", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--group", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    raise_nofile()
    try:
        import uvloop
        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.role == "quiet":
        runner(quiet_run(args))
        return
    if args.role == "floor":
        runner(floor_server(int(args.address.rpartition(":")[2])))
        return
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"label": args.label, "scale": rows}
    text = ""
    for n in args.peers:
        rows.append(runner(scale_run(n, args)))
        text = scale_table(rows, args.label)
        _report(text, result, args.out)
    if args.groups:
        result["groups"] = runner(groups_run(args))
        text += ("\n\n" if text else "") + groups_table(result["groups"], args.label)
        _report(text, result, args.out)
    print(text)


def _report(text: str, result: dict[str, Any], out: str | None) -> None:
    """Write what was measured so far (a long run that fails late keeps its tables)."""
    print(text.splitlines()[-1], file=sys.stderr, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
        with open(out + ".json", "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
