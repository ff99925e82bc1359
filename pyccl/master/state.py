"""The master's pure state machine: admission, epochs, rounds, op outcomes.

:class:`MasterState` knows nothing about sockets, clocks or asyncio. The I/O
layer (:mod:`pyccl.master.server`) feeds it events -- a connection opened, a
decoded frame, a connection closed, the clock reached :meth:`next_deadline` --
together with the current monotonic time, and carries out the returned
actions (:class:`Send`, :class:`Close`) in order. Everything protocol-related
is decided here, which is what makes it unit-testable without a network.

The protocol itself (frames, fields, rounds, drains, fences) is specified in
``docs/architecture.md``, sections "Control protocol" and "Master state
machine". Short version of the invariants this module keeps, per peer group:

* Peer phases only move forward: ``CONNECTED -> PENDING -> MEMBER -> GONE``
  (any phase may jump to ``GONE``).
* At most one drain is in progress; while it runs the group is ``DRAINING``
  and ``members`` holds the survivors of the draining epoch in ring order.
* A round's decision is fixed by its first vote and never changes, except
  that an ``ADMIT`` round whose every joiner is gone before its drain starts
  is answered ``changed=False`` (every voter gets that same answer).
* Every frame is validated before it changes anything: handlers parse all
  fields first and only then mutate, so a rejected frame leaves no trace
  except the expulsion of its sender.
* Shared-state sync rounds (``sync`` / ``sync_plan`` / ``sync_done`` /
  ``sync_result``) are independent of epochs and drains: at most one round
  per group is open; it includes the members of the moment it opened, loses
  participants only by death, and is planned by the pure
  :func:`pyccl.master.sync.plan_sync`. A ``sync`` from a member outside the
  open round (admitted after it opened, or already answered) waits in
  ``sync_queue`` and opens the next round when this one ends.

Callers must pass non-decreasing ``now`` values (the liveness order relies on
it) and must stop delivering events for a connection once a :class:`Close`
for it was returned (events for unknown connections are ignored anyway).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from pyccl import auth
from pyccl import protocol as P
from pyccl.master import sync_rounds, topology, verdicts
from pyccl.master.epochs import Epochs
from pyccl.master.gate import AuthRefused, Gate
from pyccl.master.model import (
    Action,
    Close,
    Group,
    GroupInfo,
    GroupPhase,
    Peer,
    PeerPhase,
    RoundDecision,
    Send,
)
from pyccl.master.recovery import Recovery
from pyccl.master.standby import probe_proven
from pyccl.master.verdicts import Verdict
from pyccl.protocol import PROTOCOL_VERSION, PeerFrame, clip_reason
from pyccl.wire import FrameError, clip

__all__ = [
    "PROTOCOL_VERSION",
    "PeerPhase",
    "GroupPhase",
    "RoundDecision",
    "Send",
    "Close",
    "Action",
    "GroupInfo",
    "MasterState",
]

log = logging.getLogger("pyccl.master")

# Undecided (tag, seq) entries per group. A correct group has a handful in
# flight; the cap only stops a broken member from growing the table forever.
MAX_OPEN_OPS = 1 << 16


_Handler = Callable[["MasterState", Peer, Any, float, "list[Action]"], None]
_ANY_PEER = frozenset({PeerPhase.PENDING, PeerPhase.MEMBER, PeerPhase.RESUMING})
_MEMBER = frozenset({PeerPhase.MEMBER})
_NEW = frozenset({PeerPhase.CONNECTED})
_CHALLENGED = frozenset({PeerPhase.CHALLENGED})
_PHASE_WORDS = {
    PeerPhase.CONNECTED: "before 'hello'",
    PeerPhase.CHALLENGED: "before 'auth' (the proof of the run secret)",
    PeerPhase.PENDING: "from a pending (not yet admitted) peer",
    PeerPhase.MEMBER: "from a member",
    PeerPhase.RESUMING: "from a peer whose group is re-forming",
}




# ---------------------------------------------------------------- the machine


class MasterState:
    """Control-plane state of every peer group, driven by events.

    Args:
        heartbeat_timeout: a connection that sends no frame for this long is
            declared dead; also the deadline for answering ``drain``.
        heartbeat_interval: how often peers are told to send a heartbeat
            (in ``welcome``); defaults to ``heartbeat_timeout / 5``.
        secret: the run secret; a peer is welcomed only after proving it
            holds it (see :mod:`pyccl.auth`). None: an open run.
        nonce: source of the master's challenge nonces (tests pass their own).
        recovery_hold: seconds after the first connection during which a new
            group's first peers wait instead of being admitted at once, so a
            restarted master hears from the previous members first (see
            :mod:`pyccl.master.recovery`).
        standby: start passive (refuse every peer) until :meth:`activate`.
        first_peer_id: the first id given to a new peer. A master that may
            replace another passes one above every id the other gave out,
            so a fresh peer never takes the id of a member re-registering.

    Every event method returns the actions to carry out, in order. Methods
    never raise on peer input: an invalid frame becomes ``Send(error)`` +
    ``Close`` for its connection only (and a death, if it was a member).
    """

    def __init__(self, heartbeat_timeout: float = 5.0, heartbeat_interval: float | None = None,
                 secret: bytes | None = None, nonce: Callable[[], bytes] = auth.new_nonce,
                 recovery_hold: float = 0.0, standby: bool = False, first_peer_id: int = 1) -> None:
        if not heartbeat_timeout > 0:
            raise ValueError(f"heartbeat_timeout must be > 0, got {heartbeat_timeout}")
        if heartbeat_interval is None:
            heartbeat_interval = heartbeat_timeout / 5
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError(
                f"heartbeat_interval must be in (0, heartbeat_timeout={heartbeat_timeout}), got {heartbeat_interval}"
            )
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.heartbeat_interval = float(heartbeat_interval)
        self._conns: dict[int, Peer] = {}
        # conn id -> time of its last frame, oldest first. Times only grow, so
        # refreshing = move to the end, and the next liveness deadline is
        # always the first entry: O(1) per frame and per next_deadline().
        self._live: OrderedDict[int, float] = OrderedDict()
        self._groups: dict[int, Group] = {}
        self._next_peer_id = first_peer_id
        self._gate = Gate(secret, nonce)  # the run-secret check (an open run without a secret)
        self._epochs = Epochs(self._groups, self.heartbeat_timeout, self._gate.salt)
        # ---- failover (pyccl/master/recovery.py)
        self._recovery = Recovery(self._epochs, self.heartbeat_timeout, recovery_hold, self._expel)
        self._ids: dict[int, Peer] = {}  # peer id -> its live connection (re-registrations must not collide)
        # Why this master serves nobody (a standby not yet active, or one that stepped down), or None.
        self.passive: str | None = "this master is a standby and not active" if standby else None
        self.watch_address: str | None = None  # the master this one probes (set by the server, or on stepping down)

    # ------------------------------------------------------------ events

    def on_connect(self, conn_id: int, now: float, addr: str = "?") -> list[Action]:
        """A connection was accepted. It must send ``hello`` within the heartbeat timeout."""
        if conn_id in self._conns:
            raise ValueError(f"connection id {conn_id} is already in use")
        self._conns[conn_id] = peer = Peer(conn_id, addr)
        peer.since = now
        self._live[conn_id] = now
        self._recovery.start(now)
        return []

    def on_frame(self, conn_id: int, frame: Mapping[str, Any], now: float) -> list[Action]:
        """A decoded frame (a map with a string ``type``) arrived on ``conn_id``:
        parsed into its :mod:`pyccl.protocol` class here, so a malformed one
        expels its sender like any other protocol error."""
        peer = self._conns.get(conn_id)
        if peer is None:  # already closed by us; the I/O layer may still hold parsed bytes
            return []
        live = self._live
        live[conn_id] = now
        live.move_to_end(conn_id)
        out: list[Action] = []
        cls = P.PEER_FRAMES.get(frame.get("type"))  # type: ignore[arg-type]
        if cls is None:
            self._reject(peer, f"unknown frame type {clip(frame.get('type'), 40)}", now, out)
            return out
        handler, phases = _DISPATCH[cls]
        if peer.phase not in phases:
            self._reject(peer, f"'{cls.TYPE}' not allowed {_PHASE_WORDS[peer.phase]}", now, out)
            return out
        try:
            msg: PeerFrame = cls.parse(frame)
            handler(self, peer, msg, now, out)
        except AuthRefused as exc:
            self._refuse(peer, str(exc), now, out)
        except FrameError as exc:
            self._reject(peer, str(exc), now, out)
        return out

    def on_done(self, conn_id: int, frame: Mapping[str, Any], now: float) -> Verdict | list[Action]:
        """The hot path of a decoded ``done`` map: the same outcome as
        :meth:`on_frame`, but a complete op comes back as one
        :class:`~pyccl.master.verdicts.Verdict` (one frame, every member's
        connection) instead of one Send per member; anything unusual (a bad
        field, a sender not a member) takes the general path."""
        peer = self._conns.get(conn_id)
        fields = verdicts.done_fields(frame)
        if peer is None or fields is None or peer.phase is not PeerPhase.MEMBER:
            return self.on_frame(conn_id, frame, now)
        live = self._live
        live[conn_id] = now
        live.move_to_end(conn_id)
        try:
            verdict = verdicts.record_done(peer, *fields, MAX_OPEN_OPS)
        except FrameError as exc:
            out: list[Action] = []
            self._reject(peer, str(exc), now, out)
            return out
        return [] if verdict is None else verdict

    def on_bad_frame(self, conn_id: int, why: str, now: float) -> list[Action]:
        """The I/O layer could not decode a frame (bad length, garbage, truncated)."""
        peer = self._conns.get(conn_id)
        if peer is None:
            return []
        out: list[Action] = []
        self._reject(peer, why, now, out)
        return out

    def on_disconnect(self, conn_id: int, now: float, cause: str = "connection closed") -> list[Action]:
        """The connection is gone (EOF, reset, or closed by the I/O layer for ``cause``)."""
        peer = self._conns.get(conn_id)
        if peer is None:
            return []
        out: list[Action] = []
        self._kill(peer, cause, now, out, error=None, closed=True)
        return out

    def on_tick(self, now: float) -> list[Action]:
        """The clock reached (or passed) :meth:`next_deadline`: expire what is due."""
        out: list[Action] = []
        timeout = self.heartbeat_timeout
        live = self._live
        while live:
            conn_id, seen = next(iter(live.items()))
            if seen + timeout > now:  # same expression as next_deadline(): no float drift
                break
            peer = self._conns[conn_id]
            if peer.phase is PeerPhase.CONNECTED:
                cause, error = "no 'hello' in time", f"no 'hello' within {self.heartbeat_timeout:g} s"
            elif peer.phase is PeerPhase.CHALLENGED:
                cause, error = "no 'auth' in time", f"no 'auth' within {self.heartbeat_timeout:g} s"
            else:
                cause = f"heartbeat timeout (no frame for {self.heartbeat_timeout:g} s)"
                error = f"expelled: no frame for {self.heartbeat_timeout:g} s"
            self._kill(peer, cause, now, out, error=error, error_kind="expelled")
        for group in list(self._epochs.draining.values()):
            drain = group.drain
            if drain is None or drain.deadline > now:
                continue
            for member in list(group.members):
                # Killing the last silent member commits (and may start the
                # next drain), so stop as soon as this drain is over.
                if group.drain is not drain:
                    break
                if member.peer_id in drain.expected:
                    self._kill(
                        member,
                        f"drain timeout (no 'drained' for epoch {drain.epoch} within {self.heartbeat_timeout:g} s)",
                        now,
                        out,
                        error=f"expelled: no 'drained' within {self.heartbeat_timeout:g} s",
                        error_kind="expelled",
                    )
        self._recovery.on_tick(now, out)
        return out

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`on_tick` has something to do, or None."""
        best: float | None = None
        if self._live:
            best = next(iter(self._live.values())) + self.heartbeat_timeout
        for group in self._epochs.draining.values():
            assert group.drain is not None
            if best is None or group.drain.deadline < best:
                best = group.drain.deadline
        held = self._recovery.next_deadline()
        if held is not None and (best is None or held < best):
            best = held
        return best

    # ------------------------------------------------------------ queries

    def peer_phase(self, conn_id: int) -> PeerPhase:
        """Phase of a connection; ``GONE`` for closed or unknown ones."""
        peer = self._conns.get(conn_id)
        return PeerPhase.GONE if peer is None else peer.phase

    def peer_id(self, conn_id: int) -> int | None:
        """The peer id the master gave this connection (None before hello or when gone)."""
        peer = self._conns.get(conn_id)
        if peer is None or not peer.peer_id:
            return None
        return peer.peer_id

    def group_info(self, peer_group: int) -> GroupInfo | None:
        """Snapshot of a group, or None if it has no member and no pending peer."""
        g = self._groups.get(peer_group)
        if g is None:
            return None
        return GroupInfo(
            peer_group=g.gid,
            phase=g.phase,
            epoch=g.epoch,
            members=tuple(m.peer_id for m in g.members),
            pending=tuple(g.pending),
            next_unused_round=g.next_unused_round,
            revision=g.revision,
            open_sync=g.sync.number if g.sync is not None else None,
        )

    def round_decision(self, peer_group: int, round_: int) -> RoundDecision | None:
        """Decision of a round still remembered by the group (old rounds are forgotten)."""
        g = self._groups.get(peer_group)
        rnd = g.rounds.get(round_) if g is not None else None
        return rnd.decision if rnd is not None else None

    def wants_heartbeat(self, conn_id: int) -> bool:
        """Whether the peer on this connection asked for the master's heartbeats."""
        peer = self._conns.get(conn_id)
        return peer is not None and peer.wants_beat

    def connection_count(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------ frame handlers
    # Each handler validates every field before it changes anything, raising
    # FrameError (-> the sender is expelled); see _DISPATCH for who may send what.

    def _on_hello(self, peer: Peer, frame: P.Hello, now: float, out: list[Action]) -> None:
        if self.passive is not None:
            self._kill(peer, "refused: not active", now, out, error=self.passive, error_kind="standby")
            return
        if self._gate.open:
            self._welcome(peer, frame, now, out)
            return
        challenge = self._gate.challenge(frame)
        peer.hello, peer.challenge, peer.phase = frame, challenge.nonce, PeerPhase.CHALLENGED
        out.append(Send(peer.conn_id, challenge))

    def _on_auth(self, peer: Peer, frame: P.Auth, now: float, out: list[Action]) -> None:
        assert peer.hello is not None
        self._gate.check(peer.hello, peer.challenge, frame)
        self._welcome(peer, peer.hello, now, out)

    def _welcome(self, peer: Peer, frame: P.Hello, now: float, out: list[Action]) -> None:
        """Welcome a peer (authenticated, or the run is open) and queue it for admission,
        or, if it re-registers (``resume``), for its group's re-forming."""
        gid = frame.peer_group
        resume = frame.resume
        if resume is not None and not self._may_resume(peer, gid, resume, now, out):
            return
        peer.order = frame.order
        peer.wants_beat = frame.beat
        if resume is not None:
            peer.peer_id = resume.peer_id
            self._next_peer_id = max(self._next_peer_id, resume.peer_id + 1)
        else:
            peer.peer_id = self._next_peer_id
            self._next_peer_id += 1
        self._ids[peer.peer_id] = peer
        peer.data_host, peer.data_port, peer.name = frame.data_host, frame.data_port, frame.name
        peer.host_id = frame.host_id
        peer.region = frame.region
        group = self._groups.get(gid)
        if group is None:
            group = self._epochs.new_group(gid)
        peer.group = group
        welcome = P.Welcome(peer.peer_id, self.heartbeat_interval, self.heartbeat_timeout, self._epochs.term)
        out.append(Send(peer.conn_id, welcome))
        if resume is not None:
            self._recovery.collect(group, peer, resume, now, out)
            return
        peer.phase = PeerPhase.PENDING
        group.pending[peer.peer_id] = peer
        if not group.members and not self._recovery.holds(group, now):
            # Nobody to agree with: an empty group admits at once.
            self._epochs.admit_into_empty(group, f"{peer.label()} joined an empty group", out)
        else:
            log.info("%s is waiting for admission to group %d", peer.label(), gid)

    # ---- failover (pyccl/master/recovery.py)

    @property
    def term(self) -> int:
        """This master's term: 0 until it commits its first epoch (see :mod:`pyccl.master.recovery`)."""
        return self._epochs.term

    def activate(self, term: int, now: float) -> None:
        """A standby takes over with ``term`` (higher than the active master's):
        it serves peers from now on, holding new groups for the recovery hold."""
        self.passive = None
        self._epochs.term = max(self._epochs.term, term)
        self._recovery.hold_until = now + self._recovery.hold
        self._recovery.quorum = True  # the old master may live on behind a partition
        log.warning("this master is now active (term %d)", self._epochs.term)

    def _may_resume(self, peer: Peer, gid: int, resume: P.Resume, now: float, out: list[Action]) -> bool:
        """Whether a re-registration goes on; if not, the peer is refused (or this master stepped down)."""
        if self._recovery.newer_term(resume):
            self.step_down(f"a peer of group {gid} comes from a master with term {resume.term}, newer than this "
                           f"master's {self._epochs.term}", out)
            return False
        old = self._ids.get(resume.peer_id)
        own = (old is not None and old.phase in (PeerPhase.MEMBER, PeerPhase.RESUMING) and old.group is not None
               and old.group.gid == gid)
        if own:
            # This master is the one the peer lost (frozen, or the path broke):
            # its old connection is dead for the peer; drop it like a death.
            assert old is not None
            self._kill(old, "re-registered on a new connection", now, out, error=None)
        why = self._recovery.refusal(self._groups.get(gid), resume, own)
        if why is None and resume.peer_id in self._ids:
            why = f"peer id {resume.peer_id} is in use on this master; create a new Communicator to rejoin"
        if why is not None:
            self._kill(peer, f"re-registration refused: {why}", now, out, error=why, error_kind="expelled")
            return False
        return True

    def _on_probe(self, peer: Peer, frame: P.Probe, now: float, out: list[Action]) -> None:
        """Another master asks whether this one is alive and active (pyccl/master/standby.py)."""
        if not probe_proven(self._gate.secret, frame):
            raise AuthRefused("a probe without a valid proof of the run secret")
        out.append(Send(peer.conn_id, P.Standing(self._epochs.term, self.passive is None)))
        self._kill(peer, "probe answered", now, out, error=None, quiet=True)
        if not frame.active and self.passive is None:
            # The prober sent this after the connection opened (``since``) and
            # was then silent for ``silence_ms``: it cannot take over before
            # since + timeout - silence, however late the probe arrived.
            self._epochs.renew_lease(peer.since + self.heartbeat_timeout * 0.9 - frame.silence_ms / 1000, now, out)
        if frame.active and frame.term > self._epochs.term and self.passive is None:
            self.step_down(f"the master at {frame.address} is active with term {frame.term}", out,
                           watch=frame.address)

    def step_down(self, why: str, out: list[Action], watch: str | None = None) -> None:
        """Serve nobody from now on: a master with a higher term runs the run
        (``watch``: its address; this master becomes its standby)."""
        log.warning("this master steps down (term %d): %s", self._epochs.term, why)
        self.passive = f"this master stepped down: {why}"
        if watch is not None:
            self.watch_address = watch
        error = P.Error(clip_reason(self.passive), "standby")
        for conn_id in list(self._conns):
            out.append(Send(conn_id, error))
            out.append(Close(conn_id, "stepped down"))
        self._conns.clear()
        self._live.clear()
        self._groups.clear()
        self._ids.clear()
        self._epochs.draining.clear()
        self._recovery.collecting.clear()
        self._recovery.held.clear()

    def _expel(self, peer: Peer, now: float, why: str, out: list[Action]) -> None:
        self._kill(peer, f"expelled: {why}", now, out, error=why, error_kind="expelled")

    def _on_heartbeat(self, peer: Peer, frame: P.Heartbeat, now: float, out: list[Action]) -> None:
        pass  # liveness was refreshed by on_frame; that is all a heartbeat is for

    def _on_bye(self, peer: Peer, frame: P.Bye, now: float, out: list[Action]) -> None:
        self._kill(peer, "bye", now, out, error=None, drain_kind="leave")

    def _on_vote(self, peer: Peer, frame: P.Vote, now: float, out: list[Action]) -> None:
        k = frame.round
        if peer.waiting_round is not None:
            raise FrameError(f"'vote' for round {k} while round {peer.waiting_round} is undecided")
        if k < peer.next_round:
            # Round numbers encode the voter's program position (ops begun,
            # votes since the last op), so they only ever grow; members at the
            # same point of the program vote the same number.
            raise FrameError(f"'vote' for round {k}, expected round {peer.next_round} or later")
        group = peer.group
        assert group is not None
        rnd = group.rounds.get(k)
        if rnd is None:
            rnd = self._epochs.decide_round(group, k, optimize=frame.links is not None)
        if frame.links is not None and rnd.result is None and rnd.decision is RoundDecision.OPTIMIZE:
            topology.record(group.links, peer.peer_id, frame.links)
            rnd.relink = rnd.relink or bool(frame.relink)
        peer.next_round = k + 1
        if rnd.result is not None:
            out.append(Send(peer.conn_id, P.RoundDone(k, rnd.result)))
            return
        peer.waiting_round = k
        self._epochs.check_vote(group, k, rnd, now, out)

    def _on_done(self, peer: Peer, frame: P.Done, now: float, out: list[Action]) -> None:
        verdict = verdicts.record_done(peer, frame.epoch, frame.tag, frame.seq, MAX_OPEN_OPS)
        if verdict is not None:
            out.extend([Send(c, verdict.frame) for c in verdict.conn_ids])

    def _on_failed(self, peer: Peer, frame: P.Failed, now: float, out: list[Action]) -> None:
        epoch, tag, seq, kind, reason = frame.epoch, frame.tag, frame.seq, frame.kind, frame.reason
        group = peer.group
        assert group is not None
        if epoch > group.epoch:
            raise FrameError(f"'failed' for epoch {epoch}, newer than the current epoch {group.epoch}")
        if epoch < group.epoch or group.drain is not None:
            return  # that epoch is already over (or ending): the op has failed anyway
        log.warning("%s reports op (tag %d, seq %d) of epoch %d failed (%s): %s",
                    peer.label(), tag, seq, epoch, kind, reason)
        self._epochs.start_drain(group, kind, f"peer {peer.peer_id} failed op (tag {tag}, seq {seq}): {reason}", now, out)

    def _on_drained(self, peer: Peer, frame: P.Drained, now: float, out: list[Action]) -> None:
        epoch, pairs = frame.epoch, frame.next_seq
        group = peer.group
        assert group is not None
        if epoch > group.epoch:
            raise FrameError(f"'drained' for epoch {epoch}, newer than the current epoch {group.epoch}")
        if epoch < group.epoch:
            return  # a reply that lost the race with a drain timeout or an expulsion
        drain = group.drain
        if drain is None:
            raise FrameError(f"'drained' for epoch {epoch}, which is not draining")
        if peer.peer_id not in drain.expected:
            raise FrameError(f"duplicate 'drained' for epoch {epoch}")
        drain.expected.discard(peer.peer_id)
        drain.reports[peer.peer_id] = list(pairs)
        if not drain.expected:
            self._epochs.commit(group, now, out)

    def _on_sync(self, peer: Peer, frame: P.Sync, now: float, out: list[Action]) -> None:
        sync_rounds.on_sync(peer, frame, out, self._epochs.quorum_lost(peer.group, now))

    def _on_sync_done(self, peer: Peer, frame: P.SyncDone, now: float, out: list[Action]) -> None:
        sync_rounds.on_sync_done(peer, frame, out, self._epochs.quorum_lost(peer.group, now))

    # ------------------------------------------------------------ transitions

    def _refuse(self, peer: Peer, why: str, now: float, out: list[Action]) -> None:
        """A connection failed to prove it holds the run secret: close it. Logged
        once per source address (a scanner must not flood the log)."""
        if self._gate.first_refusal(peer.addr):
            log.warning("refused connection from %s: %s (further refusals from it are not logged)", peer.addr, why)
        self._kill(peer, f"authentication: {why}", now, out, error=why, error_kind="auth")

    def _reject(self, peer: Peer, why: str, now: float, out: list[Action]) -> None:
        who = f"{peer.addr} (peer {peer.peer_id})" if peer.peer_id else peer.addr
        log.warning("rejected frame from %s: %s", who, why)
        self._kill(peer, f"protocol error: {why}", now, out, error=why)

    def _kill(self, peer: Peer, cause: str, now: float, out: list[Action], *, error: str | None,
              closed: bool = False, drain_kind: str = "peer", error_kind: str = "protocol",
              quiet: bool = False) -> None:
        """Take ``peer`` out of everything; ``error`` is sent first if given."""
        if peer.phase is PeerPhase.GONE:
            return
        conn_id = peer.conn_id
        del self._conns[conn_id]
        self._live.pop(conn_id, None)
        if self._ids.get(peer.peer_id) is peer:
            del self._ids[peer.peer_id]
        if not closed:
            if error is not None:
                out.append(Send(conn_id, P.Error(clip_reason(error), error_kind)))
            out.append(Close(conn_id, cause))
        previous, peer.phase = peer.phase, PeerPhase.GONE
        group = peer.group
        if previous in (PeerPhase.CONNECTED, PeerPhase.CHALLENGED) or group is None:
            log.log(logging.DEBUG if quiet else logging.INFO, "%s closed before 'hello': %s", peer.label(), cause)
            return
        level = logging.INFO if cause == "bye" else logging.WARNING
        if previous is PeerPhase.RESUMING:
            log.log(level, "%s (re-registering to group %d) is gone: %s", peer.label(), group.gid, cause)
            self._recovery.drop(group, peer, now, out)
        elif previous is PeerPhase.PENDING:
            log.log(level, "%s (pending in group %d) is gone: %s", peer.label(), group.gid, cause)
            self._epochs.drop_pending(group, peer, out)
        else:
            log.log(level, "%s of group %d died: %s", peer.label(), group.gid, cause)
            self._epochs.drop_member(group, peer, f"peer {peer.peer_id} is gone: {cause}", drain_kind, now, out)
            # After the drop: a sync round opened from here must not include the dead peer.
            sync_rounds.sync_drop(group, peer, out, self._epochs.quorum_lost(group, now))


# Frame type -> (handler, the phases allowed to send it). Anything else, or a
# frame from another phase, is a protocol error that expels its sender.
_DISPATCH: dict[type, tuple[_Handler, frozenset[PeerPhase]]] = {
    P.Hello: (MasterState._on_hello, _NEW),
    P.Auth: (MasterState._on_auth, _CHALLENGED),
    P.Heartbeat: (MasterState._on_heartbeat, _ANY_PEER),
    P.Bye: (MasterState._on_bye, _ANY_PEER),
    P.Vote: (MasterState._on_vote, _MEMBER),
    P.Done: (MasterState._on_done, _MEMBER),
    P.Failed: (MasterState._on_failed, _MEMBER),
    P.Drained: (MasterState._on_drained, _MEMBER),
    P.Sync: (MasterState._on_sync, _MEMBER),
    P.SyncDone: (MasterState._on_sync_done, _MEMBER),
    P.Probe: (MasterState._on_probe, _NEW),
}
assert set(_DISPATCH) == set(P.PEER_FRAMES.values()), "every peer frame needs a handler"

