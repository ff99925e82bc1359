"""Master failover: re-forming a group from the members that re-register.

When a master dies its peers keep everything the run needs. They reconnect
(to the same address restarted, or to a standby) and re-register: their
``hello`` carries a :class:`~pyccl.protocol.Resume` with the epoch they were
in, the ops they began and are waiting on, the last op results they
committed, their round position and their shared-state sync. This module
collects those re-registrations per group (until every member of the latest
epoch is back, or one heartbeat timeout after the first) and commits a new
epoch from them, so that:

* no op is committed on one peer and failed on another: an op any member
  saw ``op_ok`` for is confirmed (``op_ok``) to the members still waiting
  on it, before the new epoch; every other undecided op fails with the
  epoch change (``PeerFailure``, inputs intact);
* the fence of the new epoch is computed from what the members report, per
  member (a member that had answered the previous epoch's drain but not
  seen its successor began nothing in it, so it owes every op the others
  began there);
* a sync round whose result some member received is finished for the
  members that completed their transfer; otherwise it fails everywhere;
* the shared-state revision, the sync numbers and the round positions go on
  from the members' (rounds below the highest answered one are NO_CHANGE).

It also holds the master's *term* (docs/architecture.md, "Master
failover"): firm once the master commits its first epoch; a master that
meets a member from a higher term steps down.

Pure like the rest of the state machine: events and ``now`` in, actions out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pyccl import protocol as P
from pyccl.master import topology
from pyccl.master.epochs import Epochs
from pyccl.master.model import Action, Group, Peer, PeerPhase, Send, order_ring
from pyccl.protocol import clip_reason

__all__ = ["Collecting", "Recovery"]

log = logging.getLogger("pyccl.master")

Expel = Callable[[Peer, float, str, list[Action]], None]


@dataclass
class Collecting:
    """A group whose members are re-registering."""

    deadline: float
    resumes: dict[int, tuple[Peer, P.Resume]] = field(default_factory=dict)  # peer id ->
    top: int = 0  # the highest epoch reported
    expected: frozenset[int] = frozenset()  # the members of epoch ``top``
    gone: set[int] = field(default_factory=set)  # re-registered, then died: not awaited

    def add(self, peer: Peer, resume: P.Resume) -> None:
        self.resumes[peer.peer_id] = (peer, resume)
        if resume.epoch > self.top:
            self.top, self.expected = resume.epoch, frozenset(resume.members)

    def complete(self) -> bool:
        return self.expected - self.gone <= self.resumes.keys()

    def majority(self) -> bool:
        """More than half of the members of epoch ``top`` are back."""
        return len(self.expected & self.resumes.keys()) * 2 > len(self.expected)


class Recovery:
    """Re-registrations, the hold on new groups, and the term.

    Args:
        epochs: the group transitions (shared with the state machine).
        heartbeat_timeout: how long a group waits for its members to come back
            after the first one re-registered.
        hold: a new group's first peers wait this long after the master's
            first event before being admitted, so that a restarted master
            hears from the previous members before it forms a fresh group.
        expel: closes a peer's connection with an ``error`` of kind expelled.
    """

    def __init__(self, epochs: Epochs, heartbeat_timeout: float, hold: float, expel: Expel) -> None:
        self.epochs = epochs
        self.timeout = heartbeat_timeout
        self.hold = hold
        self.expel = expel
        self.hold_until: float | None = None
        self.held: dict[int, Group] = {}
        self.collecting: dict[int, Group] = {}
        # A standby that took over: the old master may still run on the far
        # side of a partition, so a group re-forms only from a majority of
        # its latest epoch (docs/architecture.md, "How far split brain is
        # excluded"). A master restarted on its own address needs none.
        self.quorum = False

    @property
    def term(self) -> int:
        return self.epochs.term

    # ------------------------------------------------------------ hold

    def start(self, now: float) -> None:
        if self.hold_until is None:
            self.hold_until = now + self.hold

    def holds(self, group: Group, now: float) -> bool:
        """Whether a new group's first peer must wait (hold or re-registration in progress)."""
        if group.recovery is not None:
            return True
        if self.hold_until is not None and now < self.hold_until:
            self.held[group.gid] = group
            return True
        return False

    # ------------------------------------------------------------ re-registration

    def newer_term(self, resume: P.Resume) -> bool:
        """The member comes from a master with a higher term than this one's firm term."""
        return self.term > 0 and resume.term > self.term

    def refusal(self, group: Group | None, resume: P.Resume, own: bool = False) -> str | None:
        """Why a re-registration cannot be accepted (None: accept it). ``own``:
        the peer was a member here (this master lost it, e.g. while frozen):
        it is collected like the others; if its group goes on without it
        here, it is refused when the collection ends. So is a member whose
        old connection this master saw close first (a thawed master reads
        the old connections' ends and the new hellos in any order): its
        group is still at the peer's epoch, it has not gone on yet."""
        if group is not None and group.epoch == resume.epoch and group.last_epoch is not None:
            own = own or any(m.peer_id == resume.peer_id for m in group.last_epoch.members)
        if group is None or group.recovery is not None or not group.members or own:
            return None
        if group.epoch >= resume.epoch:
            return (f"group {group.gid} re-formed without this peer (it is at epoch {group.epoch}, this peer "
                    f"re-registered from epoch {resume.epoch}); create a new Communicator to rejoin")
        return (f"group {group.gid} already runs on this master (epoch {group.epoch}); create a new Communicator "
                "to rejoin")

    def collect(self, group: Group, peer: Peer, resume: P.Resume, now: float, out: list[Action]) -> None:
        col = group.recovery
        if col is None:
            col = group.recovery = Collecting(now + self.timeout)
            self.collecting[group.gid] = group
            self.held.pop(group.gid, None)
            log.info("group %d: %s re-registered from epoch %d; collecting the others for %g s",
                     group.gid, peer.label(), resume.epoch, self.timeout)
        assert isinstance(col, Collecting)
        peer.phase = PeerPhase.RESUMING
        col.add(peer, resume)
        if col.complete():
            self.commit(group, now, out)

    def drop(self, group: Group, peer: Peer, now: float, out: list[Action]) -> None:
        """A re-registered peer is gone before its group re-formed."""
        col = group.recovery
        if not isinstance(col, Collecting) or col.resumes.pop(peer.peer_id, None) is None:
            return
        col.gone.add(peer.peer_id)
        if not col.resumes:
            group.recovery = None
            self.collecting.pop(group.gid, None)
            self.epochs.forget_if_empty(group)
        elif col.complete():
            self.commit(group, now, out)

    # ------------------------------------------------------------ time

    def on_tick(self, now: float, out: list[Action]) -> None:
        for group in list(self.collecting.values()):
            col = group.recovery
            if isinstance(col, Collecting) and col.deadline <= now:
                missing = sorted(col.expected - col.resumes.keys())
                log.warning("group %d: members %s did not re-register within %g s; re-forming without them",
                            group.gid, missing, self.timeout)
                self.commit(group, now, out)
        if self.held and self.hold_until is not None and now >= self.hold_until:
            held, self.held = self.held, {}
            for group in held.values():
                if group.recovery is None and not group.members and group.pending and group.drain is None:
                    self.epochs.admit_into_empty(group, "no earlier member re-registered; forming a new group", out)

    def next_deadline(self) -> float | None:
        times = [g.recovery.deadline for g in self.collecting.values() if isinstance(g.recovery, Collecting)]
        if self.held and self.hold_until is not None:
            times.append(self.hold_until)
        return min(times) if times else None

    # ------------------------------------------------------------ commit

    def commit(self, group: Group, now: float, out: list[Action]) -> None:
        """Form the group's next epoch from the members that re-registered."""
        col = group.recovery
        assert isinstance(col, Collecting)
        if self.quorum and not group.members and not col.majority():
            col.deadline = now + self.timeout
            log.warning("group %d: only %d of the %d members of epoch %d re-registered; waiting for a majority "
                        "(the others may still run under the old master)", group.gid,
                        len(col.expected & col.resumes.keys()), len(col.expected), col.top)
            return
        group.recovery = None
        self.collecting.pop(group.gid, None)
        if group.members:
            # The group went on here without them (their connections broke,
            # the others' did not): they are late, as after an expulsion.
            for peer, _ in col.resumes.values():
                self.expel(peer, now, f"group {group.gid} went on without this peer (epoch {group.epoch}); create "
                                      "a new Communicator to rejoin", out)
            return
        top = col.top
        keep: list[tuple[Peer, P.Resume]] = []
        for peer, r in col.resumes.values():
            # A member of the epoch before ``top`` that answered its drain is in
            # ``top`` (the drain committed it); one that did not was dropped.
            if r.epoch == top or (r.epoch == top - 1 and r.draining):
                keep.append((peer, r))
            else:
                self.expel(peer, now, f"this peer re-registered from epoch {r.epoch}, but the group had reached epoch "
                                 f"{top} without it; create a new Communicator to rejoin", out)
        if not keep:
            self.epochs.forget_if_empty(group)
            return
        if self.epochs.term == 0:
            self.epochs.term = max(r.term for _, r in keep) + 1
        self._form(group, top, keep, out)

    def _form(self, group: Group, top: int, keep: list[tuple[Peer, P.Resume]], out: list[Action]) -> None:
        ring = {pid: i for _, r in keep if r.epoch == top for i, pid in enumerate(r.members)}
        keep.sort(key=lambda e: ring.get(e[0].peer_id, len(ring)))
        committed = {op for _, r in keep if r.epoch == top for op in r.committed}
        fence: dict[int, int] = {}
        for _, r in keep:
            if r.epoch == top:
                for tag, n in r.next_seq:
                    fence[tag] = max(fence.get(tag, 0), n)
        results = {r.last_sync: r.revision for _, r in keep if r.last_sync and r.revision is not None}
        revisions = [r.revision for _, r in keep if r.revision is not None]
        group.epoch = max(group.epoch, top) + 1
        group.members = [p for p, _ in keep]
        order_ring(group.members)
        group.ops.clear()
        group.rounds.clear()
        group.round_floor = max(r.answered for _, r in keep)
        group.next_unused_round = max(group.next_unused_round, max(r.position for _, r in keep))
        group.syncs = max(group.syncs, max(max(r.last_sync, r.sync) for _, r in keep))
        group.revision = max(revisions) if revisions else None
        for peer, r in keep:
            peer.phase = PeerPhase.MEMBER
            peer.next_round = r.answered
            peer.waiting_round = None
            if r.epoch == top and not r.draining:
                out.extend(Send(peer.conn_id, P.OpOk(top, tag, seq)) for tag, seq in r.undecided
                           if (tag, seq) in committed)
            if r.sync and r.sync in results:
                out.append(Send(peer.conn_id, P.SyncResult(r.sync, r.sync_ok, results[r.sync],
                                                           "" if r.sync_ok else "this peer's transfer failed")))
        reason = clip_reason(f"the master was replaced; group re-formed from {len(keep)} re-registered members "
                             f"of epoch {top}")
        entries = tuple(m.ring_entry() for m in group.members)
        salt = self.epochs.salt()
        hosts = tuple(m.host_id for m in group.members)  # shared-memory links and regions survive a failover
        regions = topology.region_labels(group.members, group.links)
        own = {p.peer_id: r for p, r in keep}
        frames: dict[tuple[tuple[int, int], ...], P.Epoch] = {}  # one frame per distinct fence: encoded once
        for m in group.members:
            r = own[m.peer_id]
            # A member still in epoch top - 1 began nothing in ``top``: it owes
            # every op the others began there, on top of what it began before.
            extra = dict(r.next_seq) if r.epoch < top else {}
            f = tuple(sorted((tag, n + extra.get(tag, 0)) for tag, n in fence.items()))
            frame = frames.get(f)
            if frame is None:
                frame = frames[f] = P.Epoch(group.epoch, entries, f, group.next_unused_round, "peer", reason, salt,
                                            hosts if any(hosts) else None, regions, self.term)
                group.last_epoch = frame  # the ring is the same in each: the next delta's base
            out.append(Send(m.conn_id, frame))
        log.info("group %d re-formed at epoch %d (term %d): ring %s, fence %s, revision %s, %d ops confirmed",
                 group.gid, group.epoch, self.term, [m.peer_id for m in group.members], sorted(fence.items()),
                 group.revision, len(committed))
