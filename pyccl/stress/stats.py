"""Run statistics: counters, the timeline the plot draws, and recovery times (pure).

All times are seconds since the run started.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from pyccl.stress.faults import FaultKind, FaultRecord

__all__ = ["Sample", "RunStats"]


@dataclass(frozen=True)
class Sample:
    """One point of the timeline (taken about once per second)."""

    t: float
    world_size: int          # members of the newest epoch any peer reported
    alive: int               # peer processes running and not stopped
    ops: int                 # distinct ops completed so far
    gbps: float              # reduced GB/s since the previous sample (1 GB = 1e9 bytes)
    faults: int              # faults injected so far
    violations: int

    def to_json(self) -> list[Any]:
        return [round(self.t, 3), self.world_size, self.alive, self.ops, round(self.gbps, 5), self.faults,
                self.violations]


@dataclass
class RunStats:
    """Everything counted during a run.

    ``op_bytes`` is the size of one all-reduce; throughput counts each
    distinct completed op once (the data reduced per second, "algbw").
    """

    op_bytes: int
    faults: list[FaultRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    ops_completed: int = 0
    steps_completed: int = 0        # complete steps, summed over peers
    op_failures: int = 0            # PeerFailure results, summed over peers
    syncs: int = 0
    sync_failures: int = 0
    state_rx_bytes: int = 0
    rejoins: int = 0
    expelled: int = 0
    violations: int = 0
    world_size: int = 0
    newest_epoch: int = 0
    _unrecovered: list[FaultRecord] = field(default_factory=list)
    _last_sample_ops: int = 0
    _last_sample_t: float = 0.0
    _completions: list[float] = field(default_factory=list)

    def add_fault(self, f: FaultRecord) -> None:
        self.faults.append(f)
        if f.kind != FaultKind.JOIN:
            self._unrecovered.append(f)

    def on_epoch(self, epoch: int, members: int) -> None:
        if epoch >= self.newest_epoch:
            self.newest_epoch = epoch
            self.world_size = members

    def on_complete_step(self, index: int, t0: float, t1: float) -> None:
        """A peer (spawn index ``index``) completed a step whose ops began at ``t0``."""
        self.steps_completed += 1
        self._completions.append(t1)
        keep = []
        for f in self._unrecovered:
            if f.t <= t0:
                f.recovered_at = t1
            else:
                keep.append(f)
        self._unrecovered = keep
        for f in self.faults:
            if f.kind == FaultKind.JOIN and f.target == index and f.recovered_at is None:
                f.recovered_at = t1

    def sample(self, t: float, alive: int) -> Sample:
        dt = max(1e-9, t - self._last_sample_t)
        gbps = (self.ops_completed - self._last_sample_ops) * self.op_bytes / dt / 1e9
        self._last_sample_ops, self._last_sample_t = self.ops_completed, t
        s = Sample(t, self.world_size, alive, self.ops_completed, gbps, len(self.faults), self.violations)
        self.samples.append(s)
        return s

    def last_completion(self) -> float | None:
        return self._completions[-1] if self._completions else None

    def completions_after(self, t: float) -> int:
        return len(self._completions) - bisect.bisect_right(self._completions, t)

    # ---------------------------------------------------------------- summaries

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """Per fault kind: injected, survived (recovered), slowest and median recovery."""
        out: dict[str, dict[str, Any]] = {}
        for kind in FaultKind:
            if kind == FaultKind.INTRUDER:  # attempts are counted by the IntruderTally
                continue
            fs = [f for f in self.faults if f.kind == kind]
            rec = sorted(f.recovery for f in fs if f.recovery is not None)
            out[kind.value] = {
                "injected": len(fs),
                "survived": len(rec),
                "median_recovery_s": rec[len(rec) // 2] if rec else None,
                "max_recovery_s": rec[-1] if rec else None,
            }
            if kind == FaultKind.HANG:
                out[kind.value]["ended_by_cont"] = sum(1 for f in fs if f.outcome == "cont")
                out[kind.value]["ended_by_kill"] = sum(1 for f in fs if f.outcome == "kill")
        return out

    def slowest_recovery(self) -> FaultRecord | None:
        done = [f for f in self.faults if f.recovery is not None]
        return max(done, key=lambda f: f.recovery or 0.0) if done else None

    @property
    def survived(self) -> int:
        return sum(1 for f in self.faults if f.recovered_at is not None)

    def unrecovered(self) -> list[FaultRecord]:
        return [f for f in self.faults if f.recovered_at is None]
