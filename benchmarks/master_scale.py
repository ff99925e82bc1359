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
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pyccl import protocol as P
from pyccl import wire

now = time.monotonic  # CLOCK_MONOTONIC: comparable between the two simulator processes
PHASE_TIMEOUT = 300.0
SETTLE = 0.1  # join storm: members vote once no newcomer was welcomed for this long


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class MasterProc:
    """``pyccl master`` in its own process (inheriting the raised fd limit)."""

    def __init__(self, heartbeat_timeout: float, pythonpath: str | None, profile: str | None = None) -> None:
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="master-scale-", suffix=".log", delete=False).name
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        args = [sys.executable, *prof, "-m", "pyccl.cli", "master", "--port", str(port), "--heartbeat-timeout",
                str(heartbeat_timeout), "--recovery-hold", "0"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, cwd=tempfile.gettempdir(), env=env)
        t0 = now()
        while "listening on" not in open(self.log, errors="replace").read():
            if self.proc.poll() is not None or now() - t0 > 30:
                raise RuntimeError(f"the master did not start: {open(self.log, errors='replace').read()[-2000:]}")
            time.sleep(0.01)

    def cpu(self) -> float:
        """CPU seconds of every thread of the master (scheduler statistics: ns resolution)."""
        total = 0
        base = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(base):
            with contextlib.suppress(OSError), open(f"{base}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9

    def user_sys(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the master (/proc/PID/stat, clock ticks)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        vals = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    vals[key] = int(rest.split()[0]) / 1024
        return vals["VmRSS"], vals["VmHWM"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log)


def encoded(frame: P.Frame) -> bytes:
    return wire.encode(frame.to_wire())


class Tally:
    """Arrival times of one awaited frame at ``need`` peers."""

    def __init__(self, need: int) -> None:
        self.need = need
        self.times: list[float] = []
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def hit(self, t: float) -> None:
        self.times.append(t)
        if len(self.times) >= self.need and not self.fut.done():
            self.fut.set_result(None)

    async def wait(self, what: str, group: SimGroup) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.fut), PHASE_TIMEOUT)
        except asyncio.TimeoutError as exc:
            raise RuntimeError(f"{what}: only {len(self.times)} of {self.need} peers heard back within "
                               f"{PHASE_TIMEOUT:g} s (errors: {group.errors[:3]})") from exc
        group.check()


class SimPeer(asyncio.Protocol):
    """One simulated peer: its connection, what it was told, how many ops it began."""

    def __init__(self, group: SimGroup) -> None:
        self.group = group
        self.transport: asyncio.Transport | None = None
        self.peer_id = 0
        self.epoch = 0
        self.began = 0  # ops begun in the current epoch (for `drained`)
        self.member = False
        self.gone = False
        self._buf = bytearray()
        self._need = 4

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        g = self.group
        port = 1 + (len(g.peers) % 65535)
        g.peers.append(self)
        transport.write(encoded(P.Hello(g.gid, "127.0.0.1", port, f"sim-{g.gid}-{len(g.peers)}", beat=True,
                                        nonce=os.urandom(P.NONCE_BYTES))))

    def data_received(self, data: bytes) -> None:
        t = now()
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        pos, end = 0, len(data)
        handle = self.group.handle
        while end - pos >= 4:
            n = int.from_bytes(data[pos:pos + 4], "big")
            if end - pos - 4 < n:
                break
            handle(self, data[pos + 4:pos + 4 + n], t)
            pos += 4 + n
        if pos < end:
            buf += data[pos:]
            self._need = 4 + int.from_bytes(buf[:4], "big") if len(buf) >= 4 else 4

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self.member and not self.group.leaving_ok(self):
            self.group.errors.append(f"peer {self.peer_id}: connection lost ({exc})")

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class SimGroup:
    """The simulated peers of one group and the frames the coordinator waits for."""

    _parsed: dict[bytes, P.MasterFrame] = {}
    _big: tuple[bytes, P.MasterFrame] | None = None

    def __init__(self, gid: int) -> None:
        self.gid = gid
        self.peers: list[SimPeer] = []
        self.by_id: dict[int, SimPeer] = {}
        self.members: list[SimPeer] = []  # ring order of the newest epoch
        self.epoch = 0
        self.epochs_seen = 0
        self.welcomed = 0
        self.last_welcome = 0.0
        self.admitted = 0
        self.next_round = 0
        self.errors: list[str] = []
        self.leavers: set[int] = set()
        self.rounds: dict[int, Tally] = {}
        self.op_oks: dict[tuple[int, int], Tally] = {}
        self.epoch_waiters: list[tuple[Callable[[P.Epoch], bool], Tally]] = []
        self.changed = asyncio.Event()
        self._drained: dict[tuple[int, int], bytes] = {}

    def parse(self, body: bytes) -> P.MasterFrame:
        """A master frame, decoded and checked once per distinct body (a fan-out sends one body to all)."""
        if len(body) > 512:
            big = SimGroup._big
            if big is not None and big[0] == body:
                return big[1]
            frame = P.parse_master_frame(wire.decode_body(body))
            SimGroup._big = (body, frame)
            return frame
        cached = SimGroup._parsed.get(body)
        if cached is None:
            cached = P.parse_master_frame(wire.decode_body(body))
            if len(SimGroup._parsed) > 100_000:
                SimGroup._parsed.clear()
            SimGroup._parsed[body] = cached
        return cached

    def handle(self, peer: SimPeer, body: bytes, t: float) -> None:
        frame = self.parse(body)
        if type(frame) is P.OpOk:
            tally = self.op_oks.get((frame.epoch, frame.seq))
            if tally is not None:
                tally.hit(t)
        elif type(frame) is P.RoundDone:
            tally = self.rounds.get(frame.round)
            if tally is not None:
                tally.hit(t)
        elif type(frame) is P.Drain:
            key = (frame.epoch, peer.began)
            data = self._drained.get(key)
            if data is None:
                data = self._drained[key] = encoded(P.Drained(frame.epoch, ((0, peer.began),) if peer.began else ()))
            peer.send(data)
        elif type(frame) is P.Epoch:
            self._on_epoch(peer, frame, t)
        elif type(frame) is P.Welcome:
            peer.peer_id = frame.peer_id
            self.by_id[frame.peer_id] = peer
            self.welcomed += 1
            self.last_welcome = t
            self.changed.set()
        elif type(frame) is P.Error:
            self.errors.append(f"peer {peer.peer_id}: error {frame.kind}: {frame.reason}")

    def _on_epoch(self, peer: SimPeer, frame: P.Epoch, t: float) -> None:
        if frame.epoch > self.epoch:
            self.epoch = frame.epoch
            self.epochs_seen += 1
            self.members = [self.by_id[m.peer_id] for m in frame.members]
            self.next_round = max(self.next_round, frame.next_round)
            self.changed.set()
        if not peer.member:
            self.admitted += 1
        peer.epoch, peer.began, peer.member = frame.epoch, 0, True
        for pred, tally in self.epoch_waiters:
            if pred(frame):
                tally.hit(t)

    def wait_epoch(self, pred: Callable[[P.Epoch], bool], need: int) -> Tally:
        tally = Tally(need)
        self.epoch_waiters.append((pred, tally))
        return tally

    def take_round(self) -> int:
        k = self.next_round
        self.next_round += 1
        return k

    def pending(self) -> int:
        return self.welcomed - self.admitted

    def leaving_ok(self, peer: SimPeer) -> bool:
        return peer.peer_id in self.leavers

    def check(self) -> None:
        if self.errors:
            raise RuntimeError(f"group {self.gid}: {len(self.errors)} peers failed, e.g. {self.errors[:3]}")

    def live(self) -> list[SimPeer]:
        return [p for p in self.peers if not p.gone and p.peer_id not in self.leavers]


# ---------------------------------------------------------------- phases


class Sim:
    """The coordinator: drives the simulated peers through each phase and times it."""

    def __init__(self, address: str, master: MasterProc | None) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.master = master

    def cpu(self) -> float:
        return self.master.cpu() if self.master is not None else 0.0

    def user_sys(self) -> tuple[float, float]:
        return self.master.user_sys() if self.master is not None else (0.0, 0.0)

    async def connect(self, group: SimGroup, n: int) -> None:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *[loop.create_connection(lambda: SimPeer(group), self.host, self.port) for _ in range(n)],
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {n} connections failed, e.g. {failed[0]!r}")

    @staticmethod
    def heartbeat(group: SimGroup) -> None:
        """Every live peer sends one heartbeat (between phases: nobody is expelled for silence)."""
        data = encoded(P.HEARTBEAT)
        for p in group.live():
            p.send(data)

    @staticmethod
    async def beat(groups: list[SimGroup], interval: float) -> None:
        """What each peer's heartbeat thread does: a heartbeat every interval, pending peers included."""
        while True:
            await asyncio.sleep(interval)
            for g in groups:
                Sim.heartbeat(g)

    async def join_storm(self, group: SimGroup, n: int) -> dict[str, float]:
        """n peers connect at once. The members call update_topology() once every
        newcomer was welcomed, or when welcomes paused for SETTLE seconds (a
        storm the master cannot take in one go forms in several epochs)."""
        target = len(group.members) + n
        tally = group.wait_epoch(lambda f: len(f.members) == target, target)
        epochs0, cpu0, t0 = group.epochs_seen, self.cpu(), now()
        all_welcomed = group.welcomed + n
        connecting = asyncio.ensure_future(self.connect(group, n))
        votes = 0
        while not tally.fut.done():
            settled = group.welcomed >= all_welcomed or now() - group.last_welcome > SETTLE
            if group.members and group.pending() > 0 and settled:
                await self.vote_round(group, list(group.members))
                votes += 1
            else:
                group.changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(group.changed.wait(), 0.05)
            group.check()
            if connecting.done() and connecting.exception() is not None:
                raise connecting.exception()  # type: ignore[misc]
            if now() - t0 > PHASE_TIMEOUT:
                raise RuntimeError(f"join storm: {len(group.members)} of {target} members after {PHASE_TIMEOUT:g} s")
        await connecting
        return {"s": max(tally.times) - t0, "epochs": group.epochs_seen - epochs0, "rounds": votes,
                "cpu_s": self.cpu() - cpu0}

    async def vote_round(self, group: SimGroup, voters: list[SimPeer]) -> tuple[float, float]:
        """Every voter votes the next round; returns (time to the last round_done, time spent writing)."""
        k = group.take_round()
        tally = group.rounds[k] = Tally(len(voters))
        data = encoded(P.Vote(k))
        t0 = now()
        for p in voters:
            p.send(data)
        sent = now() - t0
        await tally.wait(f"round {k}", group)
        del group.rounds[k]
        return max(tally.times) - t0, sent

    async def collective(self, group: SimGroup, fail: SimPeer | None = None) -> tuple[list[float], float]:
        """Every member reports the same op done (or ``fail`` reports a mismatch):
        per-member op_ok latencies from the first done written, and the writing time."""
        members = list(group.members)
        epoch, seq = group.epoch, members[0].began
        tally = group.op_oks[(epoch, seq)] = Tally(len(members))
        done = encoded(P.Done(epoch, 0, seq))
        t0 = now()
        for p in members:
            p.began += 1
            p.send(done if p is not fail else encoded(P.Failed(epoch, 0, seq, "mismatch", "sim: size mismatch")))
        sent = now() - t0
        if fail is None:
            await tally.wait(f"op_ok of op {seq} in epoch {epoch}", group)
        del group.op_oks[(epoch, seq)]
        return [t - t0 for t in tally.times], sent

    async def collectives(self, group: SimGroup, reps: int) -> dict[str, Any]:
        lat: list[float] = []
        sends: list[float] = []
        self.heartbeat(group)
        await asyncio.sleep(0.05)
        cpu0, (user0, sys0) = self.cpu(), self.user_sys()
        for _ in range(reps):
            times, sent = await self.collective(group)
            lat += times
            sends.append(sent)
        cpu = (self.cpu() - cpu0) / reps
        user, sys_ = self.user_sys()
        return {"median_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * _pct(lat, 0.99),
                "send_ms": 1e3 * statistics.median(sends), "cpu_ms": 1e3 * cpu,
                "sys_share": (sys_ - sys0) / max(1e-9, (user - user0) + (sys_ - sys0))}

    async def admissions(self, group: SimGroup, reps: int) -> dict[str, Any]:
        """One joiner per round; votes in shuffled and in ring order, interleaved."""
        out: dict[str, list[float]] = {"shuffled": [], "ring": [], "cpu_shuffled": [], "cpu_ring": [],
                                       "send_shuffled": [], "send_ring": []}
        user = kernel = 0.0
        for i in range(2 * reps):
            order = "shuffled" if i % 2 == 0 else "ring"
            self.heartbeat(group)
            need = group.welcomed + 1
            await self.connect(group, 1)
            while group.welcomed < need:
                group.changed.clear()
                await asyncio.wait_for(group.changed.wait(), PHASE_TIMEOUT)
            await asyncio.sleep(0.02)
            voters = list(group.members)
            if order == "shuffled":
                random.shuffle(voters)
            cpu0, us0 = self.cpu(), self.user_sys()
            took, sent = await self.vote_round(group, voters)
            out[f"cpu_{order}"].append(self.cpu() - cpu0)
            us1 = self.user_sys()
            user += us1[0] - us0[0]
            kernel += us1[1] - us0[1]
            out[order].append(took)
            out[f"send_{order}"].append(sent)
            if group.pending():
                raise RuntimeError("an admission round ended without admitting its joiner")
        res = {k: 1e3 * statistics.median(v) for k, v in out.items()}
        res["sys_share"] = kernel / max(1e-9, user + kernel)
        return res

    async def leave_storm(self, group: SimGroup, fraction: float) -> dict[str, float]:
        members = list(group.members)
        leavers = random.sample(members, max(1, int(len(members) * fraction)))
        target = len(members) - len(leavers)
        tally = group.wait_epoch(lambda f: len(f.members) == target, target)
        group.leavers.update(p.peer_id for p in leavers)
        bye = encoded(P.Bye())
        epochs0, cpu0, t0 = group.epochs_seen, self.cpu(), now()
        for p in leavers:
            p.send(bye)
        await tally.wait("leave storm", group)
        return {"ms": 1e3 * (max(tally.times) - t0), "epochs": group.epochs_seen - epochs0,
                "cpu_ms": 1e3 * (self.cpu() - cpu0)}

    async def mismatch(self, group: SimGroup) -> float:
        """One member reports a mismatch: the group drains and commits a new epoch."""
        members = list(group.members)
        epoch = group.epoch
        tally = group.wait_epoch(lambda f: f.epoch > epoch and len(f.members) == len(members), len(members))
        t0 = now()
        await self.collective(group, fail=random.choice(members))
        await tally.wait("mismatch", group)
        return max(tally.times) - t0


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


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
    return {name: {"n": len(v), "median_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * _pct(v, 0.99),
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
    port = _free_port()
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
    _raise_nofile()
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
