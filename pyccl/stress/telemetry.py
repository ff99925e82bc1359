"""Telemetry of a stress run: one TCP connection per peer (msgpack frames,
:mod:`pyccl.stress.protocol`), read by :class:`TelemetryConn` and routed by
:class:`TelemetryRouter` into the orchestrator's verifier, watchdog and
statistics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any, Protocol

from pyccl import wire
from pyccl.stress import protocol
from pyccl.stress.config import StressConfig
from pyccl.stress.peer_procs import PeerProc, PeerState
from pyccl.stress.stats import RunStats
from pyccl.stress.verify import Verifier, Violation
from pyccl.stress.watchdog import StuckWatchdog


class Run(Protocol):
    """What telemetry reads and feeds of the running experiment (the orchestrator)."""

    cfg: StressConfig
    ending: bool
    workdir: str
    peers: dict[int, PeerProc]
    stats: RunStats
    verifier: Verifier
    watchdog: StuckWatchdog

    def now(self) -> float: ...
    def rel(self, t_mono: float) -> float: ...
    def violation(self, v: Violation) -> None: ...

__all__ = ["TelemetryConn", "TelemetryRouter"]

log = logging.getLogger("pyccl.stress")


class TelemetryConn(asyncio.Protocol):
    """One peer's telemetry connection (asyncio protocol)."""

    def __init__(self, router: TelemetryRouter) -> None:
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.peer: PeerProc | None = None
        self._reader = protocol.FrameReader(self._on_frame)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
        except wire.FrameError as exc:
            self.router.bad_frame(self, str(exc))
            if self.transport is not None:
                self.transport.close()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        try:
            self.router.on_frame(self, frame)
        except Exception:  # noqa: BLE001 - a bug in the checks must fail the run loudly, not drop a peer's telemetry
            import traceback

            log.error("internal error on a telemetry frame:\n%s", traceback.format_exc())
            self.router.orch.violation(Violation("internal_error", self.router.orch.now(),
                                          f"the orchestrator failed on a '{frame.get('type')}' frame: "
                                          f"{traceback.format_exc().strip().splitlines()[-1]}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.closed(self)

    def send(self, frame: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.encode(frame))


class TelemetryRouter:
    """Routes every peer's telemetry into the orchestrator's checks."""

    def __init__(self, orch: Run) -> None:
        self.orch = orch

    def bad_frame(self, conn: TelemetryConn, why: str) -> None:
        who = f"peer #{conn.peer.index}" if conn.peer else "an unidentified peer"
        self.orch.violation(Violation("bad_telemetry", self.orch.now(), f"{who} sent an invalid telemetry frame: {why}"))

    def closed(self, conn: TelemetryConn) -> None:
        if conn.peer is not None and conn.peer.conn is conn:
            conn.peer.conn = None

    def on_frame(self, conn: TelemetryConn, frame: dict[str, Any]) -> None:
        try:
            msg = protocol.parse_peer_frame(frame)
        except wire.FrameError as exc:
            self.bad_frame(conn, str(exc))
            return
        if isinstance(msg, protocol.Other) and msg.type == "hello":
            p = self.orch.peers.get(msg.fields["index"])
            if p is None or p.pid != msg.fields["pid"]:
                self.bad_frame(conn, f"hello from unknown peer {msg.fields}")
                return
            conn.peer = p
            p.conn = conn
            if self.orch.ending:
                conn.send({"type": "stop"})
            return
        p = conn.peer
        if p is None:
            self.bad_frame(conn, f"'{frame['type']}' before 'hello'")
            return
        if isinstance(msg, protocol.PhaseReport):
            # A report read after the peer was killed (it was in the socket
            # buffer) must not bring it back to the watchdog as a live peer.
            if not self.orch.ending and p.state not in (PeerState.KILLED, PeerState.EXITED):
                self.orch.watchdog.on_phase(p.index, msg.phase, self.orch.rel(msg.t), msg.rev, msg.epoch, msg.peer_id,
                                       msg.members)
            if msg.members:
                self.orch.stats.on_epoch(msg.epoch, len(msg.members))
        elif isinstance(msg, protocol.StepReport):
            self._on_step(p, msg)
        elif isinstance(msg, protocol.SyncReport):
            self.orch.stats.syncs += 1
            self.orch.stats.state_rx_bytes += msg.rx
            self.orch.stats.on_epoch(msg.epoch, len(msg.members))
            for v in self.orch.verifier.on_sync(msg, self.orch.now()):
                self.orch.violation(v)
        else:
            self._on_other(p, msg)

    def _on_step(self, p: PeerProc, rep: protocol.StepReport) -> None:
        violations, _new = self.orch.verifier.on_step(rep, self.orch.now())
        self.orch.stats.ops_completed = self.orch.verifier.ops_completed
        self.orch.stats.op_failures += sum(1 for o in rep.ops if o.status == "peer_failure")
        for o in rep.ops:
            if o.status == "ok":
                self.orch.stats.on_epoch(o.epoch, len(o.peers))
        if rep.complete and not self.orch.ending:
            self.orch.stats.on_complete_step(p.index, self.orch.rel(rep.t0), self.orch.rel(rep.t1))
        for v in violations:
            self.orch.violation(v)

    def _on_other(self, p: PeerProc, msg: protocol.Other) -> None:
        f = msg.fields
        if msg.type == "admitted":
            p.peer_id = f["peer_id"]
            p.admissions += 1
            if p.admissions > 1:
                self.orch.stats.rejoins += 1
            p.hung_since_admission = False
            if p.state == PeerState.STARTING:
                p.state = PeerState.RUNNING
            self.orch.stats.on_epoch(f["epoch"], len(f["members"]))
        elif msg.type == "lost":
            self.orch.verifier.exempt(f["peer_id"])
            if p.hung_since_admission:
                self.orch.stats.expelled += 1
            elif not self.orch.ending:
                self.orch.violation(Violation(
                    "expelled", self.orch.now(),
                    f"peer #{p.index} (id {f['peer_id']}) lost its Communicator without having been hung: "
                    f"{f['reason']}", peers=(f["peer_id"],)))
        elif msg.type == "sync_failed":
            self.orch.verifier.exempt(f["peer_id"])
            self.orch.stats.sync_failures += 1
            since_fault = self.orch.now() - self.orch.watchdog.last_fault
            if not self.orch.ending and since_fault > self.orch.cfg.stuck_threshold:
                self.orch.violation(Violation(
                    "sync_failed", self.orch.now(),
                    f"peer #{p.index} (id {f['peer_id']}): sync_shared_state failed {since_fault:.1f} s after "
                    f"the last fault: {f['reason']}", peers=(f["peer_id"],)))
        elif msg.type == "error":
            text = f["text"].strip().splitlines()
            self.orch.violation(Violation(
                "peer_error", self.orch.now(),
                f"peer #{p.index} (id {p.peer_id}) raised: {text[-1] if text else '?'} (traceback in "
                f"{os.path.join(self.orch.workdir, f'peer-{p.index}.log')})", peers=(p.peer_id,)))
        elif msg.type == "bye":
            p.said_bye = True
