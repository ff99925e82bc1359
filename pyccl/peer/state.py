"""The peer's half of the control protocol, as a pure state machine.

:class:`PeerState` holds what a peer knows about its group's protocol:
the current epoch, drains, the per-tag sequence numbers of ops begun in the
epoch, fence debt, decided ops, round results, and whether the peer is
still part of the group. It has no sockets, threads or clocks: the
:class:`~pyccl.peer.communicator.Communicator` feeds it frames from the
master and the calls of the program (begin an op, vote, ask for a verdict),
carries out the :data:`Action` values it returns, and waits on its own
condition variable for the predicates it offers (:meth:`can_begin`,
:meth:`verdict`, ...). The same methods are driven directly by
tests/test_peer_state.py.

The rules (docs/architecture.md, "Op lifecycle" and "Rounds, drains and
fences"):

* An op is numbered ``(epoch, tag, seq)`` in program order; ``seq`` counts
  the ops of that tag begun in the epoch. No op begins while an epoch is
  draining.
* An op is committed only by the master's ``op_ok``; it has failed once its
  epoch was drained and the next epoch is known (``world_size`` is already
  the new one when the caller sees ``PeerFailure``).
* A drain is answered with ``drained`` carrying, per tag, how many ops this
  peer began in the epoch. The next epoch's *fence* says how many every
  member began; ops this peer has not begun yet but others have (and
  failed) are *fence debt*: they fail at once when this peer begins them,
  so every member agrees on their outcome.
* ``update_topology()`` votes in round ``(ops begun << 20) | votes since
  the last op``: members at the same point of the same program vote the
  same round, and a joiner inherits the position of the round that
  admitted it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from pyccl import protocol as P
from pyccl.errors import CCLError, DrainKind, GroupLost, LostCause, MismatchError, PeerFailure, Timeout
from pyccl.peer import hierarchy
from pyccl.wire import FrameError

VOTE_BITS = 20
VOTE_MASK = (1 << VOTE_BITS) - 1
KEEP_EPOCHS = 16  # drains and memberships remembered (for late verdicts)
RECENT_OK = 1024  # failover: op_ok frames remembered, reported when re-registering


class LocalResult(enum.Enum):
    """How this peer's data plane ended an op (the core's FailKind, mapped)."""

    OK = "ok"
    PEER = "peer"  # a link or a neighbour failed
    MISMATCH = "mismatch"  # the neighbours called it with other arguments
    PROTOCOL = "protocol"  # a malformed data frame
    INVALID = "invalid"  # the call was invalid for this epoch (reported like PEER)
    ABORTED = "aborted"  # the master already ended the epoch: nothing to report


@dataclass(frozen=True, slots=True)
class EpochView:
    """The current epoch as this peer sees it."""

    number: int
    members: tuple[P.Member, ...]  # ring order
    rank: int
    two_level: bool = False  # the epoch has region and cross-region rings (pyccl.peer.hierarchy)

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def peer_ids(self) -> tuple[int, ...]:
        return tuple(m.peer_id for m in self.members)


# ------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Send ``frame`` to the master."""

    frame: P.PeerFrame


@dataclass(frozen=True, slots=True)
class SetDataPlaneEpoch:
    """Point the data plane at a new ring (before the epoch is published)."""

    epoch: int
    peer_id: int
    rank: int
    world_size: int
    next_member: P.Member
    prev_peer_id: int
    salt: bytes | None = None  # a run with a secret: derive the epoch's key from it
    # Every member of the previous epoch is in this one: state fetches planned
    # in it may still use its key. Otherwise a peer that left (or was
    # expelled) at this epoch must lose access now, so the old key goes.
    keep_previous_key: bool = True
    next_same_host: bool = False  # the next member runs on this host: its links may use shared memory
    rings: tuple[hierarchy.Ring, ...] = ()  # the two-level rings, if the epoch has them


@dataclass(frozen=True, slots=True)
class AbortDataPlane:
    """Fail every data-plane op of epochs up to ``through``."""

    through: int
    reason: str


Action = SendFrame | SetDataPlaneEpoch | AbortDataPlane

ALL_EPOCHS = 2**63 - 1


@dataclass(frozen=True, slots=True)
class _DrainRecord:
    kind: DrainKind
    reason: str


@dataclass(frozen=True, slots=True)
class OpTicket:
    """An op's place in the sequence."""

    epoch: EpochView
    tag: int
    seq: int
    session: int = 0  # failover: the master connection it began under (its report goes nowhere else)


class PeerState:
    """The peer's protocol state (see the module docstring). Not thread-safe:
    the Communicator calls it under its own lock."""

    def __init__(self) -> None:
        self.peer_id = 0
        self.epoch: EpochView | None = None
        self.draining: int | None = None  # epoch being drained: new ops wait
        self.drained_through = 0  # every epoch <= this has ended
        self._drains: dict[int, _DrainRecord] = {}
        self._members_of: dict[int, tuple[int, ...]] = {}  # epoch -> peer ids
        self._next_seq: dict[int, int] = {}  # per tag, in the current epoch
        self.fence_debt: dict[int, int] = {}  # per tag: ops to fail at once
        self._decided: set[tuple[int, int, int]] = set()
        self.inflight = 0
        self.ops_begun = 0
        self.votes_since_op = 0
        self.admitted_round: int | None = None  # the round that admitted this peer (decided before it votes)
        self._round_results: dict[int, bool] = {}
        self.lost: GroupLost | None = None
        self.closed = False
        # ---- failover (see "Failover" below and pyccl/peer/reconnect.py)
        self.session = 0  # master connections lost so far: a frame of an older session is never sent
        self.recovering = False  # the master is lost: no op or vote begins until the group re-forms
        self.term = 0  # the highest master term seen
        self.gave_up: tuple[str, float] | None = None  # no master came back: (why, after how many seconds)
        self._undecided: set[tuple[int, int, int]] = set()  # reported done, verdict pending
        self._recent_ok: deque[tuple[int, int, int]] = deque(maxlen=RECENT_OK)
        self.waiting_round: int | None = None  # voted, not answered
        self._vote_session = 0
        self._sync: tuple[int, int, bool] | None = None  # (session, sync number (0: no plan yet), own transfer ok)
        self._sync_fetched = False
        self.last_sync = 0  # number of the last sync result received
        self.revision: int | None = None  # the group's revision announced by that result
        self.state_hash = 0

    # ------------------------------------------------------------ queries

    @property
    def world_size(self) -> int:
        return self.epoch.world_size if self.epoch else 0

    def usable_error(self) -> CCLError | None:
        """Why no call may run now, or None."""
        if self.closed:
            return CCLError("this Communicator is closed; create a new one to rejoin")
        if self.gave_up is not None:
            return Timeout(f"{self.gave_up[0]}; this peer is no longer part of the group, create a new "
                           "Communicator", seconds=self.gave_up[1])
        if self.lost is not None:
            return GroupLost(f"{self.lost}; this peer is no longer part of the group, create a new Communicator",
                             cause=self.lost.cause, reason=self.lost.reason)
        return None

    def stopped(self) -> bool:
        """Closed or lost: every wait ends."""
        return self.closed or self.lost is not None

    def can_begin(self) -> bool:
        """Whether an op may begin now (no drain running), or must raise."""
        return (self.draining is None and not self.recovering) or self.stopped()

    def quiet(self) -> bool:
        """No op of this peer in flight (votes and syncs wait for it)."""
        return self.inflight == 0 or self.stopped()

    # --------------------------------------------------------- program side

    def begin_op(self, tag: int, what: str = "collective") -> OpTicket:
        """Number an op in program order. Call when :meth:`can_begin`.

        Raises the usable error, or ``PeerFailure`` for an op owed to the
        fence (others began and failed it in the epoch that ended).
        """
        err = self.usable_error()
        if err is not None:
            raise err
        assert self.epoch is not None and self.draining is None
        self.ops_begun += 1
        self.votes_since_op = 0
        debt = self.fence_debt.get(tag, 0)
        if debt:
            self.fence_debt[tag] = debt - 1
            raise self.failure_for(self.drained_through, what=what)
        seq = self._next_seq.get(tag, 0)
        self._next_seq[tag] = seq + 1
        self.inflight += 1
        return OpTicket(self.epoch, tag, seq, self.session)

    def finish_op(self) -> None:
        """An op begun with :meth:`begin_op` returned (either way)."""
        self.inflight -= 1

    def report(self, ticket: OpTicket, result: LocalResult, message: str) -> P.PeerFrame | None:
        """The frame that reports this peer's part of an op (None: nothing to report)."""
        e, tag, seq = ticket.epoch.number, ticket.tag, ticket.seq
        if result is LocalResult.OK:
            self._undecided.add((e, tag, seq))
            return P.Done(e, tag, seq)
        if result is LocalResult.ABORTED:
            return None  # the master already ended this epoch
        kind = result.value if result in (LocalResult.MISMATCH, LocalResult.PROTOCOL) else "peer"
        return P.Failed(e, tag, seq, kind, P.clip_reason(message))

    def verdict_known(self, ticket: OpTicket) -> bool:
        """Whether :meth:`verdict` can answer (the Communicator waits for this)."""
        e = ticket.epoch.number
        return ((e, ticket.tag, ticket.seq) in self._decided
                or (self.drained_through >= e and self.draining is None) or self.stopped())

    def verdict(self, ticket: OpTicket, result: LocalResult, message: str, what: str) -> None:
        """Return if the op was committed (``op_ok``); else raise its error.
        Call once :meth:`verdict_known`."""
        key = (ticket.epoch.number, ticket.tag, ticket.seq)
        self._undecided.discard(key)
        if key in self._decided:
            self._decided.discard(key)
            return
        raise self.failure_for(ticket.epoch.number, local=(result, message), what=what)

    def failure_for(self, epoch: int, local: tuple[LocalResult, str] | None = None,
                    what: str = "collective") -> CCLError:
        """The exception for an op of ``epoch`` that did not succeed."""
        err = self.usable_error()
        if self.closed:
            return CCLError("the Communicator was closed while the op was running")
        if err is not None:
            return err
        drain = self._drains.get(epoch)
        if local is not None and local[0] is LocalResult.MISMATCH:
            return MismatchError(local[1], op=what)
        if drain is not None and drain.kind is DrainKind.MISMATCH:
            return MismatchError(drain.reason, op=what)
        why = drain.reason if drain is not None else (local[1] if local else "the membership changed")
        before = self._members_of.get(epoch, ())
        now = set(self.epoch.peer_ids) if self.epoch else set()
        return PeerFailure(
            f"{what} aborted because the group changed ({why}); world size is now {self.world_size}: "
            "retry the call",
            epoch=epoch, lost_peers=tuple(p for p in before if p not in now),
            kind=drain.kind if drain is not None else DrainKind.PEER, op=what, reason=why,
        )

    def vote(self) -> int:
        """Round number of this ``update_topology()`` call (send ``Vote`` with it).
        Call when :meth:`quiet`."""
        err = self.usable_error()
        if err is not None:
            raise err
        if self.votes_since_op >= VOTE_MASK:
            raise CCLError("update_topology() was called over a million times in a row without a collective")
        k = (self.ops_begun << VOTE_BITS) | self.votes_since_op
        self.votes_since_op += 1
        self.waiting_round, self._vote_session = k, self.session
        return k

    def optimize_due(self, optimized_epoch: int) -> bool:
        """``auto_optimize``: whether this ``update_topology()`` should be an
        ``optimize_topology()``: the group has more than one member and the
        epoch changed since the last one, unless the next vote is for the
        round that admitted this peer (decided already: the members measure
        at the round after it, and so does this peer)."""
        if self.epoch is None or self.epoch.world_size < 2 or self.epoch.number == optimized_epoch:
            return False
        return ((self.ops_begun << VOTE_BITS) | self.votes_since_op) != self.admitted_round

    def round_known(self, k: int) -> bool:
        return k in self._round_results or self.stopped()

    def take_round_result(self, k: int) -> bool:
        """Whether round ``k`` changed the membership. Call once :meth:`round_known`."""
        err = self.usable_error()
        if err is not None:
            raise err
        if self.waiting_round == k:
            self.waiting_round = None
        return self._round_results.pop(k)

    # --------------------------------------------------------- master side

    def welcome(self, frame: P.Welcome) -> None:
        self.peer_id = frame.peer_id

    def prepare_epoch(self, frame: P.Epoch) -> SetDataPlaneEpoch:
        """Check an ``epoch`` frame and say how to point the data plane at it;
        carried out before :meth:`on_epoch`, so an op that sees the new epoch
        finds its links. Raises FrameError if this peer is not in it."""
        ids = [m.peer_id for m in frame.members]
        if self.peer_id not in ids:
            raise FrameError(f"epoch {frame.epoch} does not include this peer ({self.peer_id})")
        if self.epoch is not None and frame.epoch <= self.epoch.number:
            raise FrameError(f"epoch {frame.epoch} is not newer than the current epoch {self.epoch.number}")
        if frame.term < self.term:
            raise FrameError(f"epoch {frame.epoch} comes from a master with term {frame.term}, older than {self.term}")
        rank = ids.index(self.peer_id)
        n = len(ids)
        keep = self.epoch is None or set(self.epoch.peer_ids) <= set(ids)
        hosts = frame.hosts
        same_host = hosts is not None and hosts[rank] != "" and hosts[rank] == hosts[(rank + 1) % n]
        return SetDataPlaneEpoch(frame.epoch, self.peer_id, rank, n, frame.members[(rank + 1) % n],
                                 frame.members[(rank - 1) % n].peer_id, frame.salt, keep_previous_key=keep,
                                 next_same_host=same_host,
                                 rings=hierarchy.sub_rings(frame.members, frame.regions, self.peer_id))

    def on_epoch(self, frame: P.Epoch, plan: SetDataPlaneEpoch) -> None:
        """Publish the epoch (after :meth:`prepare_epoch`'s action ran)."""
        self.term = max(self.term, frame.term)
        if self.recovering and self.epoch is not None:
            # The group re-formed under a new master: every op of the old epoch
            # without op_ok (confirmed just before this frame) has failed.
            old = self.epoch.number
            self.drained_through = max(self.drained_through, old)
            self._drains.setdefault(old, _DrainRecord(DrainKind.PEER, "the master was lost and the group re-formed "
                                                                      "with a new one"))
        self.recovering = False
        if self.epoch is None:
            # Admitted now: stand where the round that admitted us stood.
            self.ops_begun = frame.next_round >> VOTE_BITS
            self.votes_since_op = frame.next_round & VOTE_MASK
            self.admitted_round = frame.next_round
        else:
            for tag, target in frame.fence:
                owed = target - self._next_seq.get(tag, 0)
                if owed > 0:
                    self.fence_debt[tag] = self.fence_debt.get(tag, 0) + owed
        self.epoch = EpochView(frame.epoch, frame.members, plan.rank, bool(plan.rings))
        self._members_of[frame.epoch] = self.epoch.peer_ids
        for old in [e for e in self._members_of if e < frame.epoch - KEEP_EPOCHS]:
            del self._members_of[old]
        self._next_seq = {}
        self.draining = None

    def on_drain(self, frame: P.Drain) -> list[Action]:
        """The master ends epoch ``frame.epoch``: fail its ops, report what began."""
        number = frame.epoch
        self.draining = number
        self.drained_through = max(self.drained_through, number)
        self._drains[number] = _DrainRecord(DrainKind.parse(frame.kind), frame.reason)
        for old in [e for e in self._drains if e < number - KEEP_EPOCHS]:
            del self._drains[old]
        started = tuple(sorted(self._next_seq.items()))
        return [AbortDataPlane(number, f"the master ended epoch {number}: {frame.reason}"),
                SendFrame(P.Drained(number, started))]

    def on_op_ok(self, frame: P.OpOk) -> None:
        key = (frame.epoch, frame.tag, frame.seq)
        self._decided.add(key)
        self._recent_ok.append(key)

    def on_round_done(self, frame: P.RoundDone) -> None:
        self._round_results[frame.round] = frame.changed

    def on_lost(self, cause: LostCause, reason: str) -> list[Action]:
        """The group is gone for this peer (master unreachable, expelled)."""
        if self.lost is None:
            self.lost = GroupLost(reason, cause=cause, reason=reason)
        return [AbortDataPlane(ALL_EPOCHS, reason)]

    def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------ failover
    # The master is lost (connection closed or silent): the peer keeps its
    # epoch and its ops waiting, re-registers with a restarted or standby
    # master (pyccl/peer/reconnect.py) sending :meth:`resume`, and the group
    # re-forms at a new epoch: ops the new master confirms (op_ok) commit,
    # the others fail with PeerFailure there (docs/architecture.md, "Master
    # failover").

    def on_master_lost(self) -> None:
        """The master connection is gone; a new one is being sought."""
        self.recovering = True
        self.session += 1

    def can_vote(self) -> bool:
        return not self.recovering or self.stopped()

    def give_up(self, reason: str, seconds: float) -> list[Action]:
        """No master came back in time: every call raises :class:`~pyccl.Timeout`."""
        self.gave_up = (reason, seconds)
        return self.on_lost(LostCause.MASTER_UNREACHABLE, reason)

    def accepts_term(self, term: int) -> bool:
        """A master of this term may be followed (never one older than a term seen)."""
        return term == 0 or term >= self.term

    def resume(self, arriving: Collection[tuple[int, int, int]] = ()) -> P.Resume | None:
        """What this peer holds, for the hello to a new master (None: not admitted yet).

        ``arriving``: ``op_ok`` keys a caller has taken but not yet recorded
        with :meth:`on_op_ok` (the verdict path in the core); those ops will
        commit, so they are reported committed, not undecided."""
        e = self.epoch
        if e is None:
            return None
        n = e.number
        position = (self.ops_begun << VOTE_BITS) | self.votes_since_op
        late = sorted((t, s) for ep, t, s in arriving if ep == n)
        undecided = tuple(sorted((t, s) for ep, t, s in self._undecided
                                 if ep == n and (t, s) not in late))[:P.MAX_RESUME_PAIRS]
        committed = (tuple((t, s) for ep, t, s in self._recent_ok if ep == n) + tuple(late))[-P.MAX_RESUME_PAIRS:]
        sync, ok = (self._sync[1], self._sync[2]) if self._sync is not None and self._sync_fetched else (0, False)
        return P.Resume(self.peer_id, n, e.peer_ids, self.draining == n, tuple(sorted(self._next_seq.items())),
                        undecided, committed, self.waiting_round if self.waiting_round is not None else position,
                        position, sync, ok, self.last_sync, self.revision, self.state_hash, self.term)

    def recovery_prelude(self) -> list[Action]:
        """Before a re-formed group's first epoch: end the old epoch's data-plane ops."""
        if self.recovering and self.epoch is not None:
            return [AbortDataPlane(self.epoch.number, "the master was lost; the group re-formed with a new one")]
        return []

    def after_epoch(self) -> list[Action]:
        """After an epoch: a vote sent to a master that is gone is sent again."""
        if self.waiting_round is not None and self._vote_session != self.session:
            self._vote_session = self.session
            return [SendFrame(P.Vote(self.waiting_round))]
        return []

    # A sync in flight across a failover: it finishes only if the new master
    # confirms its result (some member received it); otherwise PeerFailure.

    def sync_begin(self) -> int:
        self._sync, self._sync_fetched = (self.session, 0, False), False
        return self.session

    def sync_fetched(self, number: int, ok: bool) -> None:
        assert self._sync is not None
        self._sync, self._sync_fetched = (self._sync[0], number, ok), True

    def sync_result(self, frame: P.SyncResult, state_hash: int) -> None:
        self.last_sync = frame.sync
        if frame.ok:
            self.revision, self.state_hash = frame.revision, state_hash

    def sync_end(self) -> None:
        self._sync, self._sync_fetched = None, False

    def sync_cut_off(self) -> bool:
        """The sync began with a master that is gone and the group re-formed without finishing it."""
        return self._sync is not None and self._sync[0] != self.session and not self.recovering

    def sync_failure(self) -> PeerFailure:
        return PeerFailure("shared-state sync aborted because the master was lost and the group re-formed; "
                           f"world size is now {self.world_size}: retry the call", epoch=self.drained_through,
                           kind=DrainKind.PEER, op="sync_shared_state", reason="the master was lost")
