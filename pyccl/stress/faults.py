"""When faults happen: a seeded Poisson schedule per fault kind, and the record of each fault.

:class:`FaultScheduler` is pure (no clocks, no processes): the orchestrator
asks it which kinds are due at time ``now`` and applies them, choosing
victims with :attr:`FaultScheduler.rng` so that one seed gives one sequence
of decisions. A kind whose fault cannot be applied right now (too few peers
alive to kill one, no link to stall) is simply skipped; its next arrival is
drawn as usual, so the configured rate is an upper bound on what is injected.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

__all__ = ["FaultKind", "FaultScheduler", "FaultRecord"]


class FaultKind(str, enum.Enum):
    """Faults the orchestrator injects."""

    KILL = "kill"              # SIGKILL of a running peer
    HANG = "hang"              # SIGSTOP; later SIGCONT or SIGKILL
    JOIN = "join"              # a new peer process
    NET_STALL = "net_stall"    # every connection into one peer goes silent
    NET_RESET = "net_reset"    # one connection into one peer is reset (RST)
    INTRUDER = "intruder"      # a stranger's attempt (pyccl.stress.intruders); not a FaultRecord
    MASTER_KILL = "master_kill"  # SIGKILL of the master, restarted on its address after a random delay


@dataclass
class FaultRecord:
    """One injected fault and what became of it.

    ``recovered_at`` is the end of the first completed step (every op of it
    succeeded) that began after the fault; ``recovery`` is the time from
    injection to then. For a join, recovery is the joiner's first completed
    step (how long it took to become a useful member).
    """

    kind: FaultKind
    t: float                         # seconds since the run started
    target: int                      # peer index (process) it hit
    detail: str = ""
    recovered_at: float | None = None
    ended_at: float | None = None    # hangs: SIGCONT/SIGKILL time; stalls: end of the stall
    outcome: str = ""                # hangs: "cont" or "kill"

    @property
    def victim(self) -> str:
        """Who the fault hit, in words."""
        return "the master" if self.kind is FaultKind.MASTER_KILL else f"peer #{self.target}"

    @property
    def recovery(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.t

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "t": round(self.t, 4), "target": self.target, "detail": self.detail,
                "recovery_s": None if self.recovery is None else round(self.recovery, 4),
                "ended_at": None if self.ended_at is None else round(self.ended_at, 4), "outcome": self.outcome}


@dataclass
class FaultScheduler:
    """Independent Poisson arrivals per kind at ``rates[kind]`` events per second.

    Contract: ``due(now)`` returns every kind whose arrival time is <= now
    (at most one per kind per call, so a long pause does not unleash a burst),
    in a fixed kind order, and draws that kind's next arrival from ``now``.
    Kinds with rate 0 never fire. ``start(now)`` (re)arms every kind.
    """

    rates: dict[FaultKind, float]
    seed: int = 0
    rng: random.Random = field(init=False)
    _next: dict[FaultKind, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def start(self, now: float) -> None:
        self._next = {k: now + self.rng.expovariate(r) for k, r in self.rates.items() if r > 0}

    def due(self, now: float) -> list[FaultKind]:
        out = []
        for kind in FaultKind:
            t = self._next.get(kind)
            if t is not None and t <= now:
                out.append(kind)
                self._next[kind] = now + self.rng.expovariate(self.rates[kind])
        return out

    def next_time(self) -> float | None:
        """The earliest pending arrival (None if every rate is 0)."""
        return min(self._next.values()) if self._next else None
