"""The hang detector: a peer stuck in one phase too long is a violation (pure; no clocks).

Every peer reports each phase of its loop as it enters it (see
:data:`pyccl.stress.protocol.PHASES`). A peer in a watched phase
(``connect``, ``topology``, ``sync``, ``ops``) is *stuck* when

    now - max(entered the phase, the last fault injected anywhere, its own SIGCONT)
        > threshold = heartbeat_timeout + slack

Counting from the last fault is what keeps the check strict without false
alarms: after a peer hangs, its ring neighbours legitimately wait up to the
heartbeat timeout before the master declares it dead, so every fault
restarts everyone's allowance; with no new fault, nothing may block longer
than the heartbeat timeout (guarantee 3) plus the slack for scheduling and a
state transfer. A peer that is itself stopped (SIGSTOP) is not timed.

``sync`` (and ``connect``, which waits for the members' next
``update_topology``, itself possibly behind a sync) gets the shared-state
fetch timeout instead of the heartbeat timeout: a fetcher learns that a
holder hung only from its own socket timeout, ``max(5 s, 2 x
heartbeat_timeout)`` (the planned fetch of ``sync_shared_state``), not from the master.

Each stuck phase is reported once, when it crosses the threshold; when the
peer finally moves on, the episode's total length is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyccl.stress.protocol import WATCHED_PHASES
from pyccl.stress.verify import Violation

__all__ = ["StuckWatchdog", "StuckEpisode"]


@dataclass
class _PeerPhase:
    phase: str = "idle"
    since: float = 0.0
    rev: int = 0
    epoch: int = 0
    peer_id: int = 0
    members: tuple[int, ...] = ()
    stopped: bool = False
    resumed: float = 0.0
    reported: bool = False


@dataclass
class StuckEpisode:
    """A phase that crossed the threshold; ``length`` is filled in when it ended."""

    index: int
    peer_id: int
    phase: str
    since: float
    rev: int
    epoch: int
    length: float | None = None


@dataclass
class StuckWatchdog:
    """Tracks each peer process (by spawn index) and reports phases that last too long."""

    threshold: float
    limits: dict[str, float] = field(default_factory=dict)  # per-phase thresholds overriding ``threshold``
    last_fault: float = 0.0
    episodes: list[StuckEpisode] = field(default_factory=list)
    _peers: dict[int, _PeerPhase] = field(default_factory=dict)
    _open: dict[int, StuckEpisode] = field(default_factory=dict)

    def on_phase(self, index: int, phase: str, t: float, rev: int, epoch: int, peer_id: int,
                 members: tuple[int, ...]) -> None:
        p = self._peers.setdefault(index, _PeerPhase())
        ep = self._open.pop(index, None)
        if ep is not None:
            ep.length = t - ep.since
        p.phase, p.since, p.rev, p.epoch, p.peer_id, p.members, p.reported = phase, t, rev, epoch, peer_id, members, False

    def on_fault(self, t: float) -> None:
        self.last_fault = max(self.last_fault, t)

    def on_stopped(self, index: int) -> None:
        self._peers.setdefault(index, _PeerPhase()).stopped = True

    def on_continued(self, index: int, t: float) -> None:
        p = self._peers.setdefault(index, _PeerPhase())
        p.stopped = False
        p.resumed = t

    def on_gone(self, index: int, t: float) -> None:
        self._peers.pop(index, None)
        ep = self._open.pop(index, None)
        if ep is not None:
            ep.length = t - ep.since

    def check(self, now: float) -> list[Violation]:
        out = []
        for index, p in self._peers.items():
            if p.stopped or p.reported or p.phase not in WATCHED_PHASES:
                continue
            start = max(p.since, self.last_fault, p.resumed)
            limit = self.limits.get(p.phase, self.threshold)
            if now - start <= limit:
                continue
            p.reported = True
            ep = StuckEpisode(index, p.peer_id, p.phase, p.since, p.rev, p.epoch)
            self.episodes.append(ep)
            self._open[index] = ep
            others = ", ".join(
                f"#{i}(id {q.peer_id}) {q.phase}{' STOPPED' if q.stopped else ''} {now - q.since:.1f}s"
                for i, q in sorted(self._peers.items()) if i != index
            )
            out.append(Violation(
                "stuck", now,
                f"peer #{index} (id {p.peer_id}) has been in '{p.phase}' for {now - p.since:.1f} s, "
                f"{now - start:.1f} s since the last fault (limit {limit:g} s); others: {others}",
                p.rev, p.epoch, None, p.members,
                {"peer": p.peer_id, "phase": p.phase, "seconds": round(now - p.since, 3)},
            ))
        return out

    def phases(self) -> dict[int, tuple[str, float]]:
        """Current phase and entry time per peer index (for the live view and the final report)."""
        return {i: (p.phase, p.since) for i, p in self._peers.items()}
