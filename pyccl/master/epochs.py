"""Epochs of a peer group on the master: admission rounds, drains, commits.

Called by :class:`~pyccl.master.state.MasterState` (which owns every record
and feeds the events); this module holds the transitions of a group's
membership: who is admitted at which round, when an epoch drains, how the
next one commits (its fence, its members in ring order, the joiners' round
position), and what happens when a group empties. Pure: actions out, no I/O.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from pyccl import protocol as P
from pyccl.master import sync_rounds, topology
from pyccl.master.model import Action, DrainRecord, Group, Peer, PeerPhase, Round, RoundDecision, Send, order_ring
from pyccl.protocol import clip_reason

log = logging.getLogger("pyccl.master")

# Emptied groups whose last epoch is remembered (a returning group goes on from it).
MAX_FORGOTTEN_GROUPS = 1 << 12


class Epochs:
    """The membership transitions of every group.

    Args:
        groups: the master's groups by number (an emptied group is removed).
        heartbeat_timeout: the deadline for answering a drain.
        salt: a fresh salt for each committed epoch's key, or None (open run).
    """

    def __init__(self, groups: dict[int, Group], heartbeat_timeout: float, salt: Callable[[], bytes | None]) -> None:
        self._groups = groups
        self.heartbeat_timeout = heartbeat_timeout
        self.salt = salt
        self.draining: dict[int, Group] = {}  # groups with a drain in progress
        self.term = 0  # failover: the master's term, carried by every epoch frame (pyccl/master/recovery.py)
        # No standby can have taken over before this time (None: no standby
        # ever probed this master). After it a group shrinks to half of its
        # epoch or less only with a quorum (docs/architecture.md, "How far
        # split brain is excluded").
        self.lease_until: float | None = None
        # Last epoch of groups forgotten when they emptied (bounded: oldest out).
        self._forgotten_epochs: OrderedDict[int, int] = OrderedDict()

    def new_group(self, gid: int) -> Group:
        """A group seen for the first time, or again after it emptied: it goes
        on from its last epoch, so its epochs only grow and a stale peer of an
        old incarnation can never match a new epoch."""
        group = self._groups[gid] = Group(gid)
        group.epoch = self._forgotten_epochs.pop(gid, 0)
        return group

    def drop_pending(self, group: Group, peer: Peer, out: list[Action]) -> None:
        del group.pending[peer.peer_id]
        committing = group.drain.admit_round if group.drain is not None else None
        for k, rnd in group.rounds.items():
            if rnd.result is not None or peer not in rnd.joiners:
                continue
            rnd.joiners.remove(peer)
            if not rnd.joiners and k != committing and rnd.decision is not RoundDecision.OPTIMIZE:
                # Nobody left to admit and no drain started for it: every voter
                # (past and future) gets changed=False, so they still agree.
                rnd.result = False
                done = P.RoundDone(k, False)
                for m in group.members:
                    if m.waiting_round == k:
                        m.waiting_round = None
                        out.append(Send(m.conn_id, done))
                log.info("group %d round %d: every joiner is gone, nothing to admit", group.gid, k)
        self.forget_if_empty(group)

    def drop_member(self, group: Group, peer: Peer, reason: str, kind: str, now: float,
                     out: list[Action]) -> None:
        group.members.remove(peer)
        drain = group.drain
        if not group.members:
            self.group_emptied(group, reason, out)
        elif drain is None:
            self.start_drain(group, kind, reason, now, out)
        else:
            # Dying mid-drain: no longer awaited, not part of the next epoch,
            # and its report (if any) no longer counts toward the fence.
            drain.expected.discard(peer.peer_id)
            drain.reports.pop(peer.peer_id, None)
            drain.reason = clip_reason(f"{drain.reason}; {reason}")
            if not drain.expected:
                self.commit(group, now, out)

    def group_emptied(self, group: Group, reason: str, out: list[Action]) -> None:
        """The last member is gone: the epoch ends with nobody to drain."""
        if group.drain is not None:
            self.draining.pop(group.gid, None)
            group.drain = None
        group.ops.clear()
        group.rounds.clear()  # every voter is gone; joiners start at next_unused_round
        log.info("group %d has no member left after epoch %d", group.gid, group.epoch)
        if group.pending and group.recovery is None:  # (while members re-register, joiners wait for them)
            self.admit_into_empty(group, f"{reason}; admitting waiting peers", out)
        else:
            self.forget_if_empty(group)

    def forget_if_empty(self, group: Group) -> None:
        # Empty groups are dropped so that hellos with ever-new group numbers
        # cannot grow the table; a later hello starts the group afresh.
        if (not group.members and not group.pending and group.recovery is None
                and self._groups.get(group.gid) is group):
            del self._groups[group.gid]
            self._forgotten_epochs[group.gid] = group.epoch
            if len(self._forgotten_epochs) > MAX_FORGOTTEN_GROUPS:
                self._forgotten_epochs.popitem(last=False)
            self.draining.pop(group.gid, None)

    def admit_into_empty(self, group: Group, reason: str, out: list[Action]) -> None:
        joiners = list(group.pending.values())
        group.pending.clear()
        group.epoch += 1
        for j in joiners:
            j.phase = PeerPhase.MEMBER
            j.next_round = group.next_unused_round
            group.members.append(j)
        order_ring(group.members)
        self.send_epoch(group, "admit", reason, [], group.next_unused_round, out)
        for j in joiners:
            log.info("%s admitted to group %d in epoch %d", j.label(), group.gid, group.epoch)

    def decide_round(self, group: Group, k: int, optimize: bool = False) -> Round:
        """First vote of round k: fix its decision from the pending peers now
        (``optimize``: the vote came from optimize_topology())."""
        # A peer already promised to an undecided ADMIT round is not pending
        # "for" another one (cannot happen with correct peers, cheap to rule out).
        promised = {id(p) for r in group.rounds.values() if r.result is None for p in r.joiners}
        joiners = [p for p in group.pending.values() if id(p) not in promised]
        if k < group.round_floor:
            joiners = []  # failover: a member of the re-formed group is already past round k
        if optimize:
            decision = RoundDecision.OPTIMIZE
        else:
            decision = RoundDecision.ADMIT if joiners else RoundDecision.NO_CHANGE
        rnd = Round(decision, joiners)
        # Forget answered rounds every member is past (once per round, O(members)).
        if group.members:
            oldest = min(m.next_round for m in group.members)
            for old in [r for r, v in group.rounds.items() if r < oldest and v.result is not None]:
                del group.rounds[old]
        group.rounds[k] = rnd
        if k + 1 > group.next_unused_round:
            group.next_unused_round = k + 1
        if joiners or optimize:
            log.info("group %d round %d: %s %s", group.gid, k, decision.name, [p.peer_id for p in joiners])
        return rnd

    def check_rounds(self, group: Group, now: float, out: list[Action]) -> None:
        """Start the admission drain of an ADMIT round every member has voted
        (after a commit: rounds voted during the drain wait for it)."""
        if group.drain is not None or not group.members:
            return  # re-checked after the running drain commits
        for k, rnd in list(group.rounds.items()):
            if rnd.result is None and all(m.waiting_round == k for m in group.members):
                if self._complete(group, k, rnd, now, out):
                    return

    def check_vote(self, group: Group, k: int, rnd: Round, now: float, out: list[Action]) -> None:
        """A member just voted undecided round ``k``: start its drain if every
        member has voted it. Only round k can have become complete, and only
        once its vote count reaches the member count is the scan worth doing."""
        rnd.votes += 1
        members = group.members
        if (group.drain is None and rnd.votes >= len(members) and members
                and all(m.waiting_round == k for m in members)):
            self._complete(group, k, rnd, now, out)

    def _complete(self, group: Group, k: int, rnd: Round, now: float, out: list[Action]) -> bool:
        """Every member voted round k: drain for it (True), or answer an
        OPTIMIZE round that leaves the ring as it is (False)."""
        if rnd.decision is RoundDecision.OPTIMIZE:
            if not self._plan_optimized(group, k, rnd, out):
                return False  # the ring stays as it is: answered already
            ring = [p.peer_id for p in rnd.order or []]
            self.start_drain(group, "topology", f"reordering the ring to {ring} at round {k}", now, out,
                             admit_round=k)
            return True
        ids = [p.peer_id for p in rnd.joiners]
        self.start_drain(group, "admit", f"admitting peers {ids} at round {k}", now, out, admit_round=k)
        return True

    def _plan_optimized(self, group: Group, k: int, rnd: Round, out: list[Action]) -> bool:
        """Plan an OPTIMIZE round every member voted; False (and the round
        answered changed=False) when the ring would not change."""
        joiners = [p for p in rnd.joiners if p.phase is PeerPhase.PENDING]
        ring = topology.place_joiners(topology.plan(group.members, group.links), joiners, group.links)
        if ring == group.members and not rnd.relink:
            rnd.result = False
            done = P.RoundDone(k, False)
            for m in group.members:
                m.waiting_round = None
                out.append(Send(m.conn_id, done))
            log.info("group %d round %d: the ring %s is already the best", group.gid, k,
                     [p.peer_id for p in ring])
            return False
        rnd.order = ring
        return True

    def start_drain(self, group: Group, kind: str, reason: str, now: float, out: list[Action],
                     admit_round: int | None = None) -> None:
        reason = clip_reason(reason)
        group.ops.clear()  # every undecided op of this epoch has failed
        group.drain = DrainRecord(
            group.epoch, kind, reason, {m.peer_id for m in group.members}, now + self.heartbeat_timeout, admit_round
        )
        self.draining[group.gid] = group
        frame = P.Drain(group.epoch, kind, reason)
        out.extend([Send(m.conn_id, frame) for m in group.members])
        log.info("group %d draining epoch %d (%s): %s", group.gid, group.epoch, kind, reason)

    def commit(self, group: Group, now: float, out: list[Action]) -> None:
        """Every survivor answered the drain: start the next epoch."""
        drain = group.drain
        assert drain is not None and not drain.expected
        if self.quorum_lost(group, now):
            # The others may be alive on the far side of a partition, re-forming
            # the group under a standby: wait for them, or for the standby's
            # next probe (:meth:`renew_lease`), rather than fork the run.
            log.warning("group %d: %d of the %d members of epoch %d are left and a standby may have taken over; "
                        "waiting for a probe from it or for members to return", group.gid, len(group.members),
                        group.epoch_size, group.epoch)
            return
        group.drain = None
        del self.draining[group.gid]
        fence: dict[int, int] = {}
        for pairs in drain.reports.values():
            for tag, n in pairs:
                if n > fence.get(tag, -1):
                    fence[tag] = n
        voters = list(group.members)
        k = drain.admit_round
        joiners: list[Peer] = []
        group.epoch += 1
        if k is not None:
            rnd = group.rounds[k]
            joiners = [p for p in rnd.joiners if p.phase is PeerPhase.PENDING]
            for j in joiners:
                del group.pending[j.peer_id]
                j.phase = PeerPhase.MEMBER
                # A joiner stands where the members stood when they voted k: its
                # first update_topology() (if its loop starts with one) is
                # round k itself, answered at once from the decided record.
                j.next_round = k
                group.members.append(j)
        order_ring(group.members)
        if k is not None and group.rounds[k].order is not None:
            # An optimize_topology() round: its planned ring, less whoever
            # died during the drain (survivors keep their planned order).
            alive = set(map(id, group.members))
            planned = [p for p in group.rounds[k].order or [] if id(p) in alive]
            group.members[:] = planned + [p for p in group.members if p not in planned]
        elif joiners and group.links:
            group.members[:] = topology.place_joiners([m for m in group.members if m not in joiners], joiners,
                                                      group.links)
        next_round = k if k is not None else group.next_unused_round
        self.send_epoch(group, drain.kind, drain.reason, sorted(fence.items()), next_round, out)
        for j in joiners:
            log.info("%s admitted to group %d in epoch %d", j.label(), group.gid, group.epoch)
        if k is not None:
            # round_done after the epoch frame: a voter that sees changed=True
            # already knows the new ring.
            rnd.result = bool(joiners) or rnd.order is not None
            done = P.RoundDone(k, rnd.result)
            for m in voters:
                m.waiting_round = None
                out.append(Send(m.conn_id, done))
        if group.sync is not None:
            sync_rounds.check_sync(group, out)  # a round held while the group had lost its quorum
        self.check_rounds(group, now, out)

    def rival_possible(self, now: float) -> bool:
        return self.lease_until is not None and now >= self.lease_until

    def quorum_lost(self, group: Group | None, now: float) -> bool:
        """Half of the group's epoch or more is gone and a standby may have taken over."""
        return group is not None and len(group.members) * 2 <= group.epoch_size and self.rival_possible(now)

    def renew_lease(self, until: float, now: float, out: list[Action]) -> None:
        """A passive standby's probe: it cannot take over before ``until``;
        commit the drains that waited for a quorum if that is still ahead."""
        self.lease_until = max(until, self.lease_until or until)
        for group in list(self.draining.values()):
            if group.drain is not None and not group.drain.expected:
                self.commit(group, now, out)

    def send_epoch(self, group: Group, kind: str, reason: str, fence: list[tuple[int, int]], next_round: int,
                    out: list[Action]) -> None:
        if self.term == 0:
            self.term = 1  # the first epoch this master commits makes its term firm
        # Host ids let ring neighbours on one machine use shared memory.
        hosts = tuple(m.host_id for m in group.members)
        frame = P.Epoch(group.epoch, tuple(m.ring_entry() for m in group.members), tuple(fence), next_round,
                        kind, reason, self.salt(), hosts if any(hosts) else None,
                        topology.region_labels(group.members, group.links), self.term)
        # Members that hold the previous epoch get the change (pyccl/epoch_frames.py); joiners the ring.
        prev, group.last_epoch = group.last_epoch, frame
        delta = P.make_delta(prev, frame) if prev is not None else None
        held = {m.peer_id for m in prev.members} if delta is not None and prev is not None else set()
        out.extend([Send(m.conn_id, delta if delta is not None and m.peer_id in held else frame)
                    for m in group.members])
        log.info("group %d committed epoch %d (%s): ring %s, fence %s",
                 group.gid, group.epoch, kind, [m.peer_id for m in group.members], fence)
