"""Standby masters: when to take over, when to step down. Pure.

``pyccl master --standby-of host1:port`` starts a master that serves no peer
(it answers their hello with an ``error`` of kind ``standby``, so they try
the next master of their list) and probes the active one every heartbeat
interval with a ``probe`` frame. It takes over only after the active master
answered no probe for a whole heartbeat timeout, with a term one above the
highest it has seen. Terms order the masters:

* every ``welcome`` and ``epoch`` carries the master's term, and a peer never
  follows a master with a lower term than one it has seen;
* a master that meets a higher term steps down: in a peer's re-registration
  (the peer followed a newer master), or in the probe of an active master
  (the old master, back from a freeze or a partition, is probed by the one
  that replaced it and steps down, becoming that one's standby);
* an active prober that finds a higher term where it probes steps down too.

How far this excludes split brain is in docs/architecture.md, "Master
failover". :class:`Watcher` decides; :mod:`pyccl.master.server` probes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyccl import auth
from pyccl import protocol as P

__all__ = ["Decision", "Watcher", "make_probe", "probe_proven"]


class Decision(enum.Enum):
    NONE = "none"
    ACTIVATE = "activate"  # the watched master is gone: take over
    STEP_DOWN = "step_down"  # the watched master is active with a higher term


@dataclass
class Watcher:
    """What a master knows of the one it watches.

    Args:
        timeout: a standby takes over after this long without an answer from
            an active master (the heartbeat timeout).
    """

    timeout: float
    last_active: float | None = None  # when the watched master last answered as active
    first_probe: float | None = None
    seen_term: int = 0  # the highest term it answered with

    def on_answer(self, now: float, answer: P.Standing, my_term: int, i_am_active: bool) -> Decision:
        self.first_probe = self.first_probe if self.first_probe is not None else now
        self.seen_term = max(self.seen_term, answer.term)
        if answer.active:
            self.last_active = now
            if i_am_active and answer.term > my_term:
                return Decision.STEP_DOWN
        return self.on_silence(now, i_am_active)

    def on_silence(self, now: float, i_am_active: bool) -> Decision:
        """A probe got no answer (refused, timed out, garbled), or an answer from a passive master."""
        if self.first_probe is None:
            self.first_probe = now
        if i_am_active:
            return Decision.NONE
        since = self.last_active if self.last_active is not None else self.first_probe
        return Decision.ACTIVATE if now - since >= self.timeout else Decision.NONE

    def silence(self, now: float) -> float:
        """How long no active answer came (what a passive probe tells the watched master)."""
        since = self.last_active if self.last_active is not None else self.first_probe
        return 0.0 if since is None else max(0.0, now - since)

    def takeover_term(self, my_term: int) -> int:
        # At least 2: the watched master may have answered before its first
        # epoch (term 0) and made its term 1 just before it froze.
        return max(self.seen_term, my_term, 1) + 1


def make_probe(secret: bytes | None, term: int, active: bool, address: str, nonce: bytes,
               silence: float = 0.0) -> P.Probe:
    ms = max(0, int(silence * 1000))
    proof = auth.probe_proof(secret, nonce, term, active, address, ms) if secret is not None else None
    return P.Probe(term, active, address, nonce, proof, ms)


def probe_proven(secret: bytes | None, probe: P.Probe) -> bool:
    """Whether a probe may act on this master (a run with a secret: its proof matches)."""
    if secret is None:
        return True
    return probe.proof is not None and auth.same(
        probe.proof, auth.probe_proof(secret, probe.nonce, probe.term, probe.active, probe.address, probe.silence_ms))
