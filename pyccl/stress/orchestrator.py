"""The stress orchestrator: one asyncio (uvloop) loop that runs the whole experiment.

It starts a master (child process), the network emulator (child process,
when any ``--net-*`` option is set) and the peers (one spawned process each,
every one behind its own proxy), then for the run's duration:

* receives every peer's telemetry (one TCP connection per peer, msgpack
  frames, :mod:`pyccl.stress.protocol`) and feeds it to the
  :class:`~pyccl.stress.verify.Verifier` and the statistics;
* injects faults on the seeded schedule of :mod:`pyccl.stress.faults`,
  keeping at least ``min_alive`` peers running and at most ``peer_cap``
  processes;
* runs the :class:`~pyccl.stress.watchdog.StuckWatchdog` and watches for
  peers that exit without being told to;
* draws the live view and samples the timeline.

No fault starts in the last ``fault_cooldown`` seconds, and the run must end
with progress: every fault must be followed by a completed step (else a
``not_recovered`` violation). Then every peer is told to stop (SIGCONT
first for stopped ones), stragglers are killed, and every child process and
port is released, also when the run is interrupted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing as mp
import os
import secrets
import signal
import tempfile
import time
from typing import Any

from pyccl.auth import resolve_secret
from pyccl.stress import intruders, master_faults, worker
from pyccl.stress.config import StressConfig
from pyccl.stress.emunet import CompiledNetem
from pyccl.stress.faults import FaultKind, FaultRecord, FaultScheduler
from pyccl.stress.geography import Geography
from pyccl.stress.linkemu import LinkParams
from pyccl.stress.live import LiveView, Snapshot
from pyccl.stress.netem import NetemClient
from pyccl.stress.peer_procs import PeerProc, PeerState
from pyccl.stress.processes import MasterProcess, PortPool
from pyccl.stress.proxy import LinkShape
from pyccl.stress.report import StressResult
from pyccl.stress.stats import RunStats
from pyccl.stress.telemetry import TelemetryConn, TelemetryRouter
from pyccl.stress.verify import Verifier, Violation
from pyccl.stress.watchdog import StuckWatchdog

__all__ = ["Orchestrator", "run"]

log = logging.getLogger("pyccl.stress")

_TICK = 0.05
_SAMPLE_EVERY = 1.0
_VIEW_EVERY = 0.5
_PROXY_LINGER = 5.0


class Orchestrator:
    """Runs one stress experiment; :meth:`run` returns its :class:`StressResult`."""

    def __init__(self, cfg: StressConfig) -> None:
        self.cfg = cfg.validate()
        self.base = time.monotonic()
        self.run_start: float | None = None  # seconds since base when faults may start
        self.ending = False
        self.workdir = cfg.workdir or tempfile.mkdtemp(prefix="pyccl-stress-")
        os.makedirs(self.workdir, exist_ok=True)
        self.telemetry = TelemetryRouter(self)
        self.peers: dict[int, PeerProc] = {}
        self.by_pid: dict[int, PeerProc] = {}
        self.verifier = Verifier()
        self.watchdog = StuckWatchdog(cfg.stuck_threshold, {"sync": cfg.sync_threshold, "connect": cfg.sync_threshold})
        self.stats = RunStats(cfg.size)
        self.violations: list[Violation] = []
        self.sched = FaultScheduler({
            FaultKind.KILL: cfg.kill_rate, FaultKind.HANG: cfg.hang_rate, FaultKind.JOIN: cfg.join_rate,
            FaultKind.NET_STALL: cfg.net.stall_rate, FaultKind.NET_RESET: cfg.net.reset_rate,
            FaultKind.INTRUDER: cfg.intruder_rate, FaultKind.MASTER_KILL: cfg.master_kill_rate,
        }, cfg.seed)
        self.rng = self.sched.rng
        self.ports = PortPool(cfg.seed)
        self.master: MasterProcess | None = None
        self.netem: NetemClient | CompiledNetem | None = None
        self.server: asyncio.AbstractServer | None = None
        self.telemetry_port = 0
        self.view = LiveView(self._view_mode())
        self.notes: list[str] = []
        self._next_index = 0
        self._stop = asyncio.Event()
        self._bg: set[asyncio.Task[Any]] = set()
        self._ctx = mp.get_context("spawn")
        self._file_log: logging.Handler | None = None
        # Intruders need a run to keep them out: the run's secret, or a fresh one.
        self.secret = resolve_secret(None)
        if self.secret is None and cfg.intruder_rate > 0:
            self.secret = secrets.token_bytes(24)
            self.notes.append("intruders: the run used a fresh random secret (PYCCL_SECRET was not set)")
        self.intruders = intruders.IntruderTally()
        self._intruder_pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ helpers

    def now(self) -> float:
        return time.monotonic() - self.base

    def rel(self, t_mono: float) -> float:
        return t_mono - self.base

    def _view_mode(self) -> str:
        if self.cfg.quiet:
            return "off"
        live = self.cfg.live
        if live is None:
            import sys

            live = sys.stdout.isatty()
        return "tty" if live else "plain"

    def violation(self, v: Violation) -> None:
        self.violations.append(v)
        self.stats.violations = len(self.violations)
        self.view.message(v.line())
        log.error("%s", v.line())

    def _task(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def alive_count(self) -> int:
        return sum(1 for p in self.peers.values() if p.alive)

    def process_count(self) -> int:
        return sum(1 for p in self.peers.values() if p.state not in (PeerState.KILLED, PeerState.EXITED))

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> StressResult:
        loop = asyncio.get_running_loop()
        self._setup_logging()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
            loop.add_signal_handler(signal.SIGTERM, self._interrupt)
        try:
            await self._start()
            ok = await self._warmup()
            if ok:
                await self._main_loop()
        finally:
            await self._shutdown()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGTERM)
            self.view.close()
            if self._file_log is not None:
                logging.getLogger("pyccl").removeHandler(self._file_log)
                self._file_log.close()
        end = self.now()
        elapsed = end - self.run_start if self.run_start is not None else 0.0
        ports: dict[str, Any] = {
            "master": int(self.master.address.rpartition(":")[2]) if self.master and self.master.address else None,
            "telemetry": self.telemetry_port or None,
            "peers": [[p.index, p.data_port or None, p.proxy_port] for p in self.peers.values()],
        }
        return StressResult(
            self.cfg, self.stats, self.violations, self.watchdog.episodes, elapsed, len(self.peers),
            self.verifier.results_checked, self.verifier.syncs_checked, self.workdir, self.notes,
            self.run_start or 0.0, ports, self.intruders,
        )

    def _interrupt(self) -> None:
        if not self._stop.is_set():
            self.notes.append(f"interrupted at t={self.now():.1f}s")
            self.view.message("interrupted: stopping the peers ...")
        self._stop.set()

    def _setup_logging(self) -> None:
        h = logging.FileHandler(os.path.join(self.workdir, "orchestrator.log"))
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lg = logging.getLogger("pyccl")
        lg.addHandler(h)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
        lg.propagate = False  # the terminal belongs to the live view
        self._file_log = h

    async def _start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.master = MasterProcess(cfg.heartbeat_timeout, os.path.join(self.workdir, "master.log"), self.secret)
        if cfg.net.enabled:
            netlog = os.path.join(self.workdir, "netem.log")
            if cfg.net.emulator == "compiled":
                geo = Geography.load(cfg.net.geography) if cfg.net.geography else None
                self.netem = CompiledNetem(LinkParams(cfg.net.delay, cfg.net.bandwidth, cfg.net.window), cfg.seed,
                                           netlog, geo)
            else:
                self.netem = NetemClient(LinkShape(cfg.net.delay, cfg.net.window, cfg.net.bandwidth), cfg.seed,
                                         netlog)
            await self.netem.start()
        await loop.run_in_executor(None, self.master.wait_ready, 60.0)
        self.server = await loop.create_server(lambda: TelemetryConn(self.telemetry), "127.0.0.1", 0)
        self.telemetry_port = self.server.sockets[0].getsockname()[1]
        log.info("master %s, telemetry port %d, workdir %s", self.master.address, self.telemetry_port, self.workdir)
        for _ in range(cfg.peers):
            await self._spawn()

    async def _warmup(self) -> bool:
        """Wait until the initial peers form one group; then the run's clock starts."""
        deadline = self.now() + self.cfg.warmup_timeout
        while not self._stop.is_set():
            self._reap()
            if self.stats.world_size >= self.cfg.peers and self.stats.ops_completed > 0:
                break
            if not any(p.alive for p in self.peers.values()):
                self.violation(Violation("warmup", self.now(), "every initial peer exited during warm-up"))
                return False
            if self.now() > deadline:
                self.violation(Violation(
                    "warmup", self.now(),
                    f"the {self.cfg.peers} initial peers did not form a group within {self.cfg.warmup_timeout:g} s "
                    f"(world size {self.stats.world_size}, {self.stats.ops_completed} ops)"))
                return False
            self._update_view("warmup")
            await asyncio.sleep(_TICK)
        if self._stop.is_set():
            return False
        self.run_start = self.now()
        self.watchdog.on_fault(self.run_start)
        self.sched.start(self.run_start)
        return True

    async def _main_loop(self) -> None:
        assert self.run_start is not None
        end = self.run_start + self.cfg.duration
        faults_until = end - self.cfg.fault_cooldown
        next_sample = self.now()
        next_view = self.now()
        while not self._stop.is_set():
            now = self.now()
            if now >= end:
                break
            if now < faults_until:
                for kind in self.sched.due(now):
                    await self._inject(kind)
            for v in self.watchdog.check(self.now()):
                self.violation(v)
            self._reap()
            if now >= next_sample:
                self.stats.sample(now, self.alive_count())
                next_sample = now + _SAMPLE_EVERY
            if now >= next_view:
                self._update_view("running")
                next_view = now + _VIEW_EVERY
            await asyncio.sleep(_TICK)
        self._final_checks()

    def _final_checks(self) -> None:
        """The run must end with progress after every fault."""
        now = self.now()
        for f in self.stats.unrecovered():
            if f.kind == FaultKind.JOIN:
                continue
            self.violation(Violation(
                "not_recovered", now,
                f"no step completed after the {f.kind.value} of {f.victim} at t={f.t:.1f}s "
                f"(the run ended {now - f.t:.1f} s later)", values={"fault": f.kind.value}))
        last = self.stats.last_completion()
        if last is None or now - last > self.cfg.stuck_threshold:
            self.violation(Violation(
                "no_progress", now,
                "no step completed in the last "
                f"{now - (last if last is not None else (self.run_start or 0.0)):.1f} s of the run"))

    async def _shutdown(self) -> None:
        self.ending = True
        self._update_view("stopping")
        for p in self.peers.values():
            if p.hang_timer is not None:
                p.hang_timer.cancel()
                p.hang_timer = None
            if p.state == PeerState.STOPPED:
                self._signal(p, signal.SIGCONT)
                p.state = PeerState.RUNNING
                if p.hang is not None:
                    p.hang.ended_at, p.hang.outcome = self.now(), "cont"
        for p in self.peers.values():
            if p.conn is not None:
                p.conn.send({"type": "stop"})
        deadline = time.monotonic() + max(15.0, 3 * self.cfg.heartbeat_timeout)
        while time.monotonic() < deadline and any(p.process.exitcode is None for p in self.peers.values()):
            await asyncio.sleep(0.1)
        for p in self.peers.values():
            if p.process.exitcode is None:
                log.warning("peer #%d did not stop in time; killing it", p.index)
                self._signal(p, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        for p in self.peers.values():
            await loop.run_in_executor(None, p.process.join, 10.0)
        self.verifier.finish(p.peer_id for p in self.peers.values())
        for t in list(self._bg):
            t.cancel()
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        if self.netem is not None:
            with contextlib.suppress(Exception):
                await self.netem.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5.0)
        if self._intruder_pool is not None:
            self._intruder_pool.shutdown(wait=True, cancel_futures=True)
        if self.master is not None:
            await loop.run_in_executor(None, self.master.stop)
        if self.run_start is not None:
            self.stats.sample(self.now(), 0)

    # ------------------------------------------------------------------ peers

    async def _spawn(self) -> PeerProc:
        cfg = self.cfg
        index = self._next_index
        self._next_index += 1
        # The port is chosen here even without a proxy so that the run knows
        # (and reports) every port it used.
        data_port, proxy_port, advertise = self.ports.take(), None, None
        data_host = region = None
        if isinstance(self.netem, CompiledNetem):
            data_host, region = self.netem.placement(index)
            proxy_port = await self.netem.open(data_port, name=f"peer{index}", index=index)
            advertise = ("127.0.0.1", proxy_port)
        elif self.netem is not None:
            proxy_port = await self.netem.open(data_port, name=f"peer{index}")
            advertise = ("127.0.0.1", proxy_port)
        assert self.master is not None
        spec = worker.WorkerSpec(
            index=index, master=self.master.address, telemetry=("127.0.0.1", self.telemetry_port),
            data_port=data_port, advertise=advertise, data_host=data_host, region=region,
            connections=cfg.connections, concurrency=cfg.concurrency,
            count=cfg.element_count, dtype=cfg.dtype, op=cfg.op, seed=cfg.seed, max_world=cfg.peer_cap,
            state_size=cfg.state_size, pace=cfg.pace, optimize_every=cfg.optimize_every,
            log_path=os.path.join(self.workdir, f"peer-{index}.log"),
            connect_timeout=max(60.0, 4 * cfg.stuck_threshold), corrupt=cfg.corrupt_peer == index, secret=self.secret,
        )
        proc = self._ctx.Process(target=worker.main, args=(spec,), name=f"pyccl-stress-peer-{index}", daemon=True)
        proc.start()
        assert proc.pid is not None
        p = PeerProc(index, proc, data_port, proxy_port, self.now())
        self.peers[index] = p
        self.by_pid[proc.pid] = p
        log.info("started peer #%d (pid %d, data port %d, proxy %s)", index, proc.pid, data_port, proxy_port)
        return p

    def _signal(self, p: PeerProc, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)

    def _gone(self, p: PeerProc, state: PeerState) -> None:
        """``p`` stopped existing (killed or exited): release what it held."""
        p.state = state
        if p.hang_timer is not None:
            p.hang_timer.cancel()
            p.hang_timer = None
        self.verifier.exempt(p.peer_id)
        self.watchdog.on_gone(p.index, self.now())
        if self.netem is not None and p.proxy_port is not None:
            self._task(self._retire_proxy(p.proxy_port))

    async def _retire_proxy(self, port: int) -> None:
        assert self.netem is not None
        with contextlib.suppress(Exception):
            await self.netem.refuse(port)
            await asyncio.sleep(_PROXY_LINGER)
            await self.netem.close_proxy(port)

    def _reap(self) -> None:
        """Notice peers that exited by themselves."""
        for p in self.peers.values():
            if p.state in (PeerState.KILLED, PeerState.EXITED) or p.process.exitcode is None:
                continue
            code = p.process.exitcode
            self._gone(p, PeerState.EXITED)
            if not self.ending:
                self.violation(Violation(
                    "peer_exited", self.now(),
                    f"peer #{p.index} (id {p.peer_id}) exited by itself with code {code}; see "
                    f"{os.path.join(self.workdir, f'peer-{p.index}.log')}", values={"peer": p.peer_id}))

    # ------------------------------------------------------------------ faults

    async def _inject(self, kind: FaultKind) -> None:
        now = self.now()
        if kind == FaultKind.INTRUDER:
            self._intrude()
            return
        rec: FaultRecord | None = None
        if kind == FaultKind.KILL:
            rec = self._kill()
        elif kind == FaultKind.HANG:
            rec = self._hang()
        elif kind == FaultKind.JOIN:
            if self.process_count() < self.cfg.peer_cap:
                p = await self._spawn()
                rec = FaultRecord(kind, now, p.index, "new peer process")
        elif kind in (FaultKind.NET_STALL, FaultKind.NET_RESET):
            rec = await self._net_fault(kind)
        elif kind == FaultKind.MASTER_KILL:
            rec = await master_faults.kill_master(self, self.cfg.heartbeat_timeout,
                                                  self.cfg.restart_range.draw(self.rng.random()) or 0.0)
        if rec is None:
            log.info("skipped a %s fault at t=%.2f (not applicable now)", kind.value, now)
            return
        self.stats.add_fault(rec)
        self.watchdog.on_fault(rec.t)
        log.info("fault: %s of %s at t=%.2f %s", kind.value, rec.victim, rec.t, rec.detail)

    def background(self, coro: Any) -> None:
        self._task(coro)

    def on_master_back(self, rec: FaultRecord) -> None:
        """The master killed by ``rec`` runs again: peers may wait for it until now."""
        self.watchdog.on_fault(self.now())

    def _victim(self, states: tuple[PeerState, ...]) -> PeerProc | None:
        """A random peer in one of ``states``; members (RUNNING) only while more
        than ``min_alive`` of them run, so at least that many always do."""
        running = sum(1 for p in self.peers.values() if p.state == PeerState.RUNNING)
        cands = [p for _, p in sorted(self.peers.items()) if p.state in states
                 and (p.state != PeerState.RUNNING or running - 1 >= self.cfg.min_alive)]
        return self.rng.choice(cands) if cands else None

    def _kill(self) -> FaultRecord | None:
        p = self._victim((PeerState.RUNNING, PeerState.STARTING))
        if p is None:
            return None
        self._signal(p, signal.SIGKILL)
        detail = f"(id {p.peer_id}, {p.state.value})"
        self._gone(p, PeerState.KILLED)
        return FaultRecord(FaultKind.KILL, self.now(), p.index, detail)

    def _hang(self) -> FaultRecord | None:
        p = self._victim((PeerState.RUNNING,))
        if p is None:
            return None
        self._signal(p, signal.SIGSTOP)
        p.state = PeerState.STOPPED
        p.hung_since_admission = True
        self.watchdog.on_stopped(p.index)
        duration = self.cfg.hang_range.draw(self.rng.random())
        kill = self.rng.random() < self.cfg.hang_kill_fraction
        rec = FaultRecord(FaultKind.HANG, self.now(), p.index,
                          f"(id {p.peer_id}) for {'ever' if duration is None else f'{duration:.2f} s'}, then "
                          f"{'SIGKILL' if kill else 'SIGCONT'}")
        p.hang = rec
        if duration is not None:
            p.hang_timer = asyncio.get_running_loop().call_later(duration, self._end_hang, p, kill)
        return rec

    def _end_hang(self, p: PeerProc, kill: bool) -> None:
        p.hang_timer = None
        if p.state != PeerState.STOPPED:
            return
        now = self.now()
        if p.hang is not None:
            p.hang.ended_at, p.hang.outcome = now, "kill" if kill else "cont"
        if kill:
            self._signal(p, signal.SIGKILL)
            self._signal(p, signal.SIGCONT)
            self._gone(p, PeerState.KILLED)
        else:
            self._signal(p, signal.SIGCONT)
            p.state = PeerState.RUNNING
            self.watchdog.on_continued(p.index, now)
        log.info("hang of peer #%d ended at t=%.2f by %s", p.index, now, "SIGKILL" if kill else "SIGCONT")

    async def _net_fault(self, kind: FaultKind) -> FaultRecord | None:
        if self.netem is None:
            return None
        cands = [p for _, p in sorted(self.peers.items())
                 if p.proxy_port is not None and p.state in (PeerState.RUNNING, PeerState.STOPPED)]
        if not cands:
            return None
        p = self.rng.choice(cands)
        assert p.proxy_port is not None
        try:
            if kind == FaultKind.NET_STALL:
                duration = self.cfg.net.stall_duration.draw(self.rng.random())
                n = await self.netem.stall(p.proxy_port, duration)
                detail = f"{n} connections into id {p.peer_id} for " + (
                    "ever" if duration is None else f"{duration:.2f} s")
                rec = FaultRecord(kind, self.now(), p.index, detail)
                if duration is not None:
                    rec.ended_at = rec.t + duration
            else:
                n = await self.netem.reset(p.proxy_port)
                rec = FaultRecord(kind, self.now(), p.index, f"1 of the connections into id {p.peer_id}")
        except (RuntimeError, asyncio.TimeoutError) as exc:
            log.warning("network fault on peer #%d failed: %s", p.index, exc)
            return None
        return rec if n > 0 else None

    def _intrude(self) -> None:
        """Start one intruder attempt (it runs on the intruders' own threads, so
        an attempt that waits for a close never delays the orchestrator)."""
        assert self.master is not None and self.secret is not None
        kind = self.rng.choice(list(intruders.Attack))
        if kind.on_data_port:
            running = [p for _, p in sorted(self.peers.items()) if p.state == PeerState.RUNNING]
            if not running:
                return
            p = self.rng.choice(running)
            target, label = ("127.0.0.1", p.data_port), f"peer #{p.index} data port {p.data_port}"
        else:
            host, _, port = self.master.address.rpartition(":")
            target, label = (host, int(port)), f"master {self.master.address}"
        if self._intruder_pool is None:
            self._intruder_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pyccl-intruder")
        self._task(self._attempt(kind, target, label, self.rng.getrandbits(32)))

    async def _attempt(self, kind: intruders.Attack, target: tuple[str, int], label: str, seed: int) -> None:
        assert self.secret is not None
        t0 = self.now()
        loop = asyncio.get_running_loop()
        try:
            rejected, leak, detail = await loop.run_in_executor(
                self._intruder_pool, intruders.attack, kind, target, self.secret, seed)
        except (OSError, ValueError) as exc:  # the attempt itself failed (e.g. the target was gone): no verdict
            log.info("intruder %s on %s could not be made: %s", kind.value, label, exc)
            return
        a = intruders.Attempt(kind, t0, label, rejected, self.now() - t0, leak, detail)
        self.intruders.add(a)
        log.info("intruder %s on %s: %s (%.3f s) %s", kind.value, label,
                 "rejected" if rejected else f"NOT rejected: {leak}", a.seconds, detail)
        if leak or not rejected:
            self.violation(Violation(
                "intruder", self.now(), f"an intruder's {kind.value} on {label} was not rejected: "
                f"{leak or detail}", values={"attack": kind.value}))

    # ------------------------------------------------------------------ view

    def _update_view(self, phase: str) -> None:
        by_kind = {k.value: 0 for k in FaultKind}
        for f in self.stats.faults:
            by_kind[f.kind.value] += 1
        last = self.stats.samples[-1].gbps if self.stats.samples else 0.0
        elapsed = self.now() - self.run_start if self.run_start is not None else self.now()
        self.view.update(Snapshot(
            elapsed=elapsed, duration=self.cfg.duration, world_size=self.stats.world_size,
            alive=self.alive_count(), stopped=sum(1 for p in self.peers.values() if p.state == PeerState.STOPPED),
            ops=self.stats.ops_completed, gbps=last, faults=len(self.stats.faults), survived=self.stats.survived,
            faults_by_kind=by_kind, violations=len(self.violations), phase=phase,
        ))


def run(cfg: StressConfig) -> StressResult:
    """Run one experiment on a fresh uvloop event loop (asyncio's if uvloop is missing)."""
    orch = Orchestrator(cfg)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(orch.run())
    return uvloop.run(orch.run())
