"""What the master knows about peers and groups: plain records, no logic.

The state machine (:mod:`pyccl.master.state`) owns every instance and is the
only writer; :class:`GroupInfo` is the read-only snapshot it hands out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyccl import protocol as P
from pyccl.master.sync import SyncPlan, SyncRequest
from pyccl.protocol import MasterFrame

__all__ = ["PeerPhase", "GroupPhase", "RoundDecision", "Send", "Close", "Action", "GroupInfo", "Peer", "Round",
           "DrainRecord", "SyncRound", "Group", "order_ring"]


class PeerPhase(enum.Enum):
    """Where a connection is in its life (see module docstring)."""

    CONNECTED = "connected"  # no hello yet
    CHALLENGED = "challenged"  # hello to a master with a secret; its proof (auth) is due
    PENDING = "pending"  # welcomed, waiting for admission
    RESUMING = "resuming"  # failover: a member of an earlier master re-registered, its group re-forms
    MEMBER = "member"  # in the group's current epoch
    GONE = "gone"  # closed, expelled or left; never comes back


class GroupPhase(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"


class RoundDecision(enum.Enum):
    ADMIT = "admit"
    NO_CHANGE = "no_change"
    OPTIMIZE = "optimize"  # optimize_topology(): reorder the ring from measurements (and admit)


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``frame`` to connection ``conn_id``.

    The same frame object is reused for every receiver of a fan-out, so the
    I/O layer may encode it once (compare by identity).
    """

    conn_id: int
    frame: MasterFrame


@dataclass(frozen=True, slots=True)
class Close:
    """Close connection ``conn_id`` after flushing what was sent to it."""

    conn_id: int
    reason: str


Action = Send | Close


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """Read-only snapshot of one peer group (for tests, logs, introspection)."""

    peer_group: int
    phase: GroupPhase
    epoch: int
    members: tuple[int, ...]  # peer ids in ring order
    pending: tuple[int, ...]  # peer ids in arrival order
    next_unused_round: int
    revision: int | None = None  # last synced shared-state revision (None: never synced)
    open_sync: int | None = None  # number of the sync round in progress, if any


def order_ring(members: list[Peer]) -> None:
    """Peers that gave an ``order`` key in their hello stand in the ring by that
    key (a torch backend uses its ranks, so ring position == torch rank); the
    others keep their admission order, after them. The sort is stable."""
    members.sort(key=lambda p: (p.order is None, p.order or 0))


class Peer:
    __slots__ = (
        "conn_id",
        "addr",
        "phase",
        "peer_id",
        "group",
        "data_host",
        "data_port",
        "name",
        "order",
        "wants_beat",
        "next_round",
        "waiting_round",
        "hello",
        "challenge",
        "host_id",
        "region",
        "since",
    )

    def __init__(self, conn_id: int, addr: str) -> None:
        self.conn_id = conn_id
        self.addr = addr
        self.phase = PeerPhase.CONNECTED
        self.peer_id = 0  # assigned at hello
        self.group: Group | None = None
        self.data_host = ""
        self.data_port = 0
        self.name = ""
        self.order: int | None = None  # ring-order key from the hello, if any
        self.wants_beat = False  # asked (hello "beat": true) for the master's heartbeats
        self.next_round = 0  # the round number this member's next vote must carry
        self.waiting_round: int | None = None  # voted this ADMIT round, not answered yet
        self.hello: P.Hello | None = None  # CHALLENGED: the hello to act on once the proof is in
        self.challenge: bytes = b""  # CHALLENGED: the master's nonce
        self.host_id = ""  # from the hello: which machine; passed on in epoch frames
        self.region: str | None = None  # from the hello (Communicator(region=...))
        self.since = 0.0  # when the connection was accepted

    def label(self) -> str:
        if not self.peer_id:
            return f"connection from {self.addr}"
        name = f" {self.name!r}" if self.name else ""
        return f"peer {self.peer_id}{name} ({self.addr})"

    def ring_entry(self) -> P.Member:
        return P.Member(self.peer_id, self.data_host, self.data_port)


class Round:
    __slots__ = ("decision", "joiners", "result", "order", "relink", "votes")

    def __init__(self, decision: RoundDecision, joiners: list[Peer]) -> None:
        self.decision = decision
        self.joiners = joiners  # ADMIT, OPTIMIZE: snapshot of the pending peers, arrival order
        # The ``changed`` answer once known. NO_CHANGE rounds know it at once;
        # ADMIT rounds when their epoch commits (or when every joiner is gone);
        # OPTIMIZE rounds when every member has voted (and, if the ring
        # changes, its epoch commits).
        self.result: bool | None = None if decision is not RoundDecision.NO_CHANGE else False
        self.order: list[Peer] | None = None  # OPTIMIZE: the planned ring (members, then joiners placed)
        self.relink = False  # OPTIMIZE: a voter asked for new links even if the order stays
        # Votes received while undecided: never fewer than the members waiting
        # on this round (voters who died or were answered still count), so a
        # round whose count is below the member count cannot be complete and
        # needs no scan (see Epochs.check_vote): O(1) per vote, not O(members).
        self.votes = 0


class DrainRecord:
    __slots__ = ("epoch", "kind", "reason", "expected", "reports", "deadline", "admit_round")

    def __init__(self, epoch: int, kind: str, reason: str, expected: set[int], deadline: float,
                 admit_round: int | None) -> None:
        self.epoch = epoch
        self.kind = kind
        self.reason = reason
        self.expected = expected  # peer ids whose `drained` is still missing
        self.reports: dict[int, list[tuple[int, int]]] = {}  # peer id -> next_seq pairs
        self.deadline = deadline
        self.admit_round = admit_round  # set for the drain that commits an ADMIT round


class SyncRound:
    """One shared-state sync round of a group (independent of epochs and drains).

    Collecting: ``plan`` is None and ``reports`` fills up with the `sync`
    frames of ``waiting``. Transfer: ``plan`` is set, ``waiting`` holds the
    planned participants still alive (none has its result yet) and ``done``
    their `sync_done` reports. A peer leaves ``waiting`` when it dies or gets
    its ``sync_result``.
    """

    __slots__ = ("number", "waiting", "reports", "plan", "done")

    def __init__(self, number: int, participants: list[Peer]) -> None:
        self.number = number
        self.waiting: dict[int, Peer] = {p.peer_id: p for p in participants}
        self.reports: dict[int, SyncRequest] = {}
        self.plan: SyncPlan | None = None
        self.done: dict[int, tuple[bool, str]] = {}  # peer id -> (ok, reason) from sync_done


class Group:
    __slots__ = ("gid", "epoch", "members", "pending", "rounds", "next_unused_round", "ops", "drain",
                 "revision", "syncs", "sync", "sync_queue", "links",
                 "recovery", "round_floor",  # failover (pyccl/master/recovery.py)
                 "fanout", "last_epoch")

    def __init__(self, gid: int) -> None:
        self.gid = gid
        self.epoch = 0  # 0: no epoch committed yet; the first admission commits epoch 1
        self.members: list[Peer] = []  # ring order
        self.pending: dict[int, Peer] = {}  # peer id -> peer, arrival order
        self.rounds: dict[int, Round] = {}
        self.next_unused_round = 0
        self.ops: dict[tuple[int, int], set[int]] = {}  # (tag, seq) -> ids that reported done
        self.drain: DrainRecord | None = None
        self.revision: int | None = None  # last synced shared-state revision
        self.syncs = 0  # sync rounds opened so far (the open round's number)
        self.sync: SyncRound | None = None
        # `sync` frames from members outside the open round (joiners admitted
        # during it, or peers rejected early): they open the next round.
        self.sync_queue: dict[int, tuple[Peer, SyncRequest]] = {}
        # Measured links from optimize_topology(): (from id, to id) -> (bytes/s, one-way s).
        self.links: dict[tuple[int, int], tuple[float, float]] = {}
        # Failover (pyccl/master/recovery.py): the re-registration in progress
        # (a recovery.Collecting), and the round below which every round counts
        # as answered NO_CHANGE (a member of the re-formed group is past it).
        self.recovery: object | None = None
        self.round_floor = 0
        # ((epoch, member count), the members' connection ids): the op_ok fan-out (pyccl/master/verdicts.py).
        self.fanout: tuple[tuple[int, int], tuple[int, ...]] | None = None
        # The last epoch frame its members hold: the next one goes to them as an epoch_delta from it.
        self.last_epoch: P.Epoch | None = None

    @property
    def epoch_size(self) -> int:
        """Members of the last committed epoch (a shrink to half or less may need a quorum)."""
        return len(self.last_epoch.members) if self.last_epoch is not None else 0

    @property
    def phase(self) -> GroupPhase:
        return GroupPhase.RUNNING if self.drain is None else GroupPhase.DRAINING
