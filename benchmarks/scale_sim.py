"""The simulated peers of benchmarks/master_scale.py (imported from there).

A real ``pyccl master`` in its own process (:class:`MasterProc`: its CPU
time, kernel share and RSS from /proc) and N peers in one asyncio process
speaking the control protocol frame for frame with the frame classes of
:mod:`pyccl.protocol`, without data planes: :class:`SimPeer` is one
connection, :class:`SimGroup` the peers of one group and the frames the
coordinator waits for (:class:`Tally`), :class:`Sim` drives them through
each phase and times it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class MasterProc:
    """``pyccl master`` in its own process (inheriting the raised fd limit)."""

    def __init__(self, heartbeat_timeout: float, pythonpath: str | None, profile: str | None = None) -> None:
        port = free_port()
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
        self.bases: dict[int, P.Epoch] = {}  # the last epochs by number (what an epoch_delta expands from)
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
            self.bases.setdefault(frame.epoch, frame)
            self._on_epoch(peer, frame, t)
        elif type(frame) is P.EpochDelta:
            # Every member holds the same ring: expand once per epoch, as each Communicator would for itself.
            full = self.bases.get(frame.epoch)
            if full is None:
                full = self.bases[frame.epoch] = frame.expand(self.bases.get(frame.base))
                for old in [e for e in self.bases if e < frame.epoch - 4]:
                    del self.bases[old]
            self._on_epoch(peer, full, t)
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
        return {"median_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * pct(lat, 0.99),
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


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]
