"""Strict verification of what the peers report (pure: no I/O, no clocks).

Checks, each a :class:`Violation` when it fails:

* ``wrong_result`` / ``input_changed`` / ``mismatch_error`` /
  ``unexpected_error``: the peer's own findings (see
  :mod:`pyccl.stress.worker`): a result that is not the exact reduction over
  the op's participants, an input changed by a failed op, an error that
  cannot happen with matching inputs.
* ``hash_mismatch``: two participants of one op hold different result bytes
  (guarantee 1: bit-identical results).
* ``participants_disagree``: two participants of one op report different
  member lists.
* ``split_outcome``: a participant of an op that succeeded elsewhere moved on
  to a later epoch without succeeding in it (guarantee 1: one outcome per op).
  Participants that were killed, lost their Communicator (expelled) or left
  are exempt.
* ``state_divergence``: two syncs that ended at the same revision left
  different shared-state bytes (guarantee 5; the group's history is linear,
  so a revision names exactly one content).
* ``revision_regressed``: a member's revision went down between syncs.

An op is identified across peers by ``(epoch, tag, revision, occurrence)``:
every member issues the same ops in the same order (that is what fences
guarantee), and the occurrence counts a peer's earlier successes with the
same (epoch, tag, revision), which happens when a step is retried in the
same epoch after some of its ops failed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pyccl.stress.protocol import StepReport, SyncReport

__all__ = ["Violation", "Verifier", "OpKey"]

OpKey = tuple[int, int, int, int]  # epoch, tag, revision, occurrence

_DONE_MEMORY = 200_000


@dataclass(frozen=True)
class Violation:
    """One broken guarantee, with what is needed to reproduce and diagnose it."""

    kind: str
    t: float                          # seconds since the run started
    message: str
    rev: int | None = None            # the step: shared-state revision the op ran at
    epoch: int | None = None
    tag: int | None = None
    peers: tuple[int, ...] = ()
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        where = []
        if self.rev is not None:
            where.append(f"step(rev)={self.rev}")
        if self.epoch is not None:
            where.append(f"epoch={self.epoch}")
        if self.tag is not None:
            where.append(f"tag={self.tag}")
        if self.peers:
            where.append(f"peers={list(self.peers)}")
        vals = " ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())
        return f"VIOLATION [{self.kind}] t={self.t:.2f}s {' '.join(where)}: {self.message}" + (f" ({vals})" if vals else "")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "t": round(self.t, 4), "message": self.message, "rev": self.rev,
                "epoch": self.epoch, "tag": self.tag, "peers": list(self.peers),
                "values": {k: _jsonable(v) for k, v in self.values.items()}}


def _fmt(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v > 1 << 32:
        return f"{v:#018x}"
    if isinstance(v, float):
        return repr(v)  # every digit: a wrong value may differ in the last place only
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


@dataclass
class _Pending:
    peers: tuple[int, ...]
    hash: int
    first: int                          # peer id that reported first
    hashes: dict[int, int] = field(default_factory=dict)
    missing: set[int] = field(default_factory=set)


class Verifier:
    """Consumes peer reports in each peer's own order; returns violations as they are found.

    Times passed in are seconds since the run started. Peer identities are
    the master-assigned peer ids (one per Communicator).
    """

    def __init__(self) -> None:
        self._pending: dict[OpKey, _Pending] = {}
        self._done: collections.OrderedDict[OpKey, int] = collections.OrderedDict()
        self._occ: dict[int, dict[tuple[int, int, int], int]] = {}
        self._progress: dict[int, int] = {}
        self._exempt: set[int] = set()
        self._state_at: dict[int, tuple[int, int]] = {}
        self._last_rev: dict[int, int] = {}
        self.ops_completed = 0        # distinct ops that succeeded (once per op, not per peer)
        self.results_checked = 0      # results checked exactly by a peer
        self.syncs_checked = 0

    # ---------------------------------------------------------------- reports

    def on_step(self, rep: StepReport, now: float) -> tuple[list[Violation], list[OpKey]]:
        """Check one step report. Returns (violations, keys of ops seen for the first time)."""
        out: list[Violation] = []
        new: list[OpKey] = []
        me = rep.peer_id
        for f in rep.findings:
            out.append(_finding(me, f, now))
        occ = self._occ.setdefault(me, {})
        progress = self._progress.get(me, 0)
        for o in rep.ops:
            if o.status == "ok":
                self.results_checked += 1
                base = (o.epoch, o.tag, rep.rev)
                n = occ.get(base, 0)
                occ[base] = n + 1
                key: OpKey = (*base, n)
                progress = max(progress, o.epoch)
                if me not in o.peers:
                    out.append(Violation("participants_disagree", now, f"peer {me} reports an op it is not a member of",
                                         rep.rev, o.epoch, o.tag, o.peers))
                out.extend(self._result(key, me, o.peers, o.hash, now, new))
            elif o.status != "lost":
                progress = max(progress, o.e0)
        self._progress[me] = progress
        self._prune_occ(me, progress)
        out.extend(self._check_moved_on(me, now))
        return out, new

    def on_sync(self, rep: SyncReport, now: float) -> list[Violation]:
        out: list[Violation] = []
        self.syncs_checked += 1
        me = rep.peer_id
        seen = self._state_at.get(rep.rev)
        if seen is None:
            self._state_at[rep.rev] = (rep.hash, me)
        elif seen[0] != rep.hash:
            out.append(Violation(
                "state_divergence", now,
                f"shared state at revision {rep.rev} differs: peer {me} has {rep.hash:#018x}, "
                f"peer {seen[1]} had {seen[0]:#018x}",
                rep.rev, rep.epoch, None, rep.members, {"peer": me, "hash": rep.hash, "other": seen[1],
                                                        "other_hash": seen[0]}))
        last = self._last_rev.get(me)
        if last is not None and rep.rev < last:
            out.append(Violation("revision_regressed", now, f"peer {me}'s revision went from {last} to {rep.rev}",
                                 rep.rev, rep.epoch, None, rep.members))
        self._last_rev[me] = rep.rev
        self._progress[me] = max(self._progress.get(me, 0), rep.epoch)
        out.extend(self._check_moved_on(me, now))
        return out

    def exempt(self, peer_id: int) -> None:
        """``peer_id`` is gone (killed, expelled, left): it owes no more reports."""
        if peer_id <= 0:
            return
        self._exempt.add(peer_id)
        for key in [k for k, p in self._pending.items() if peer_id in p.missing]:
            p = self._pending[key]
            p.missing.discard(peer_id)
            if not p.missing:
                self._complete(key)

    def finish(self, peer_ids: Iterable[int]) -> None:
        """End of run: every listed peer stopped; nothing more is owed."""
        for pid in list(peer_ids):
            self.exempt(pid)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ---------------------------------------------------------------- internals

    def _result(self, key: OpKey, me: int, peers: tuple[int, ...], h: int, now: float,
                new: list[OpKey]) -> list[Violation]:
        epoch, tag, rev, _ = key
        done = self._done.get(key)
        if done is not None:
            if done != h:
                return [Violation("hash_mismatch", now, f"peer {me}'s result differs from the other participants'",
                                  rev, epoch, tag, peers, {"peer": me, "hash": h, "others": done})]
            return []
        p = self._pending.get(key)
        if p is None:
            missing = set(peers) - {me} - self._exempt
            p = _Pending(peers, h, me, {me: h}, missing)
            self.ops_completed += 1
            new.append(key)
            if not missing:
                self._remember(key, h)
                return []
            self._pending[key] = p
            late: list[Violation] = []
            for other in sorted(missing):  # owed by a peer that is already past this epoch?
                late.extend(self._check_moved_on(other, now))
            return late
        out: list[Violation] = []
        if peers != p.peers:
            out.append(Violation("participants_disagree", now,
                                 f"peer {me} says the op ran over {list(peers)}, peer {p.first} over {list(p.peers)}",
                                 rev, epoch, tag, p.peers))
        if h != p.hash:
            out.append(Violation("hash_mismatch", now,
                                 f"peer {me}'s result differs from peer {p.first}'s",
                                 rev, epoch, tag, p.peers, {"peer": me, "hash": h, "peer_" + str(p.first): p.hash}))
        p.hashes[me] = h
        p.missing.discard(me)
        if not p.missing:
            self._complete(key)
        return out

    def _check_moved_on(self, me: int, now: float) -> list[Violation]:
        """Ops that ``me`` owes but can no longer report: it is past their epoch."""
        progress = self._progress.get(me, 0)
        out = []
        for key in [k for k, p in self._pending.items() if me in p.missing and progress > k[0]]:
            p = self._pending[key]
            epoch, tag, rev, occ = key
            out.append(Violation(
                "split_outcome", now,
                f"peer {me} moved on to epoch {progress} without the result of this op, which "
                f"peer(s) {sorted(p.hashes)} got (occurrence {occ})",
                rev, epoch, tag, p.peers, {"peer": me}))
            p.missing.discard(me)
            if not p.missing:
                self._complete(key)
        return out

    def _complete(self, key: OpKey) -> None:
        p = self._pending.pop(key)
        self._remember(key, p.hash)

    def _remember(self, key: OpKey, h: int) -> None:
        self._done[key] = h
        while len(self._done) > _DONE_MEMORY:
            self._done.popitem(last=False)

    def _prune_occ(self, me: int, progress: int) -> None:
        occ = self._occ.get(me)
        if occ and len(occ) > 4096:
            for k in [k for k in occ if k[0] < progress]:
                del occ[k]


def _finding(peer: int, f: dict[str, Any], now: float) -> Violation:
    kind = str(f.get("kind", "finding"))
    rev = f.get("rev") if isinstance(f.get("rev"), int) else None
    epoch = f.get("epoch") if isinstance(f.get("epoch"), int) else None
    tag = f.get("tag") if isinstance(f.get("tag"), int) else None
    peers = tuple(p for p in f.get("peers", ()) if isinstance(p, int)) if isinstance(f.get("peers"), list) else ()
    values = {k: v for k, v in f.items() if k not in ("kind", "rev", "epoch", "tag", "peers")}
    values["peer"] = peer
    messages = {
        "wrong_result": f"peer {peer}'s result is not the exact reduction over the participants",
        "input_changed": f"peer {peer}'s input buffer changed",
        "mismatch_error": f"peer {peer} got MismatchError although every peer passes the same size, dtype and op",
        "unexpected_error": f"peer {peer} got an unexpected error",
    }
    return Violation(kind, now, messages.get(kind, f"peer {peer}: {kind}"), rev, epoch, tag, peers, values)
