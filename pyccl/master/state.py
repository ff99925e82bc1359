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
from pyccl.master import sync_rounds
from pyccl.master.model import (
    Action,
    Close,
    DrainRecord,
    Group,
    GroupInfo,
    GroupPhase,
    Peer,
    PeerPhase,
    Round,
    RoundDecision,
    Send,
    order_ring,
)
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
# Emptied groups whose last epoch is remembered (a returning group goes on from it).
MAX_FORGOTTEN_GROUPS = 1 << 12


_Handler = Callable[["MasterState", Peer, Any, float, "list[Action]"], None]
_ANY_PEER = frozenset({PeerPhase.PENDING, PeerPhase.MEMBER})
_MEMBER = frozenset({PeerPhase.MEMBER})
_NEW = frozenset({PeerPhase.CONNECTED})
_CHALLENGED = frozenset({PeerPhase.CHALLENGED})
_PHASE_WORDS = {
    PeerPhase.CONNECTED: "before 'hello'",
    PeerPhase.CHALLENGED: "before 'auth' (the proof of the run secret)",
    PeerPhase.PENDING: "from a pending (not yet admitted) peer",
    PeerPhase.MEMBER: "from a member",
}




class AuthRefused(FrameError):
    """A connection failed the run-secret check (closed with an ``error`` of kind ``auth``)."""


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

    Every event method returns the actions to carry out, in order. Methods
    never raise on peer input: an invalid frame becomes ``Send(error)`` +
    ``Close`` for its connection only (and a death, if it was a member).
    """

    def __init__(self, heartbeat_timeout: float = 5.0, heartbeat_interval: float | None = None,
                 secret: bytes | None = None, nonce: Callable[[], bytes] = auth.new_nonce) -> None:
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
        self._draining: dict[int, Group] = {}
        self._next_peer_id = 1
        # Last epoch of groups forgotten when they emptied (bounded: oldest out).
        self._forgotten_epochs: OrderedDict[int, int] = OrderedDict()
        self._secret = secret  # None: an open run (no challenge)
        self._nonce = nonce
        self._refused_from: set[str] = set()  # sources whose failed proof was logged (once each)

    # ------------------------------------------------------------ events

    def on_connect(self, conn_id: int, now: float, addr: str = "?") -> list[Action]:
        """A connection was accepted. It must send ``hello`` within the heartbeat timeout."""
        if conn_id in self._conns:
            raise ValueError(f"connection id {conn_id} is already in use")
        self._conns[conn_id] = Peer(conn_id, addr)
        self._live[conn_id] = now
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
        for group in list(self._draining.values()):
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
        return out

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`on_tick` has something to do, or None."""
        best: float | None = None
        if self._live:
            best = next(iter(self._live.values())) + self.heartbeat_timeout
        for group in self._draining.values():
            assert group.drain is not None
            if best is None or group.drain.deadline < best:
                best = group.drain.deadline
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
        if self._secret is None:
            self._welcome(peer, frame, out)
            return
        if frame.nonce is None:
            raise AuthRefused("this master requires the run secret; the peer sent no challenge nonce")
        peer.hello, peer.challenge = frame, self._nonce()
        peer.phase = PeerPhase.CHALLENGED
        out.append(Send(peer.conn_id, P.Challenge(peer.challenge,
                                                  auth.master_proof(self._secret, frame.nonce, peer.challenge))))

    def _on_auth(self, peer: Peer, frame: P.Auth, now: float, out: list[Action]) -> None:
        hello = peer.hello
        assert hello is not None and hello.nonce is not None and self._secret is not None
        if not auth.same(frame.proof, auth.peer_proof(self._secret, hello.nonce, peer.challenge)):
            raise AuthRefused("authentication failed: the peer does not hold this run's secret")
        self._welcome(peer, hello, out)

    def _welcome(self, peer: Peer, frame: P.Hello, out: list[Action]) -> None:
        """Welcome a peer (authenticated, or the run is open) and queue it for admission."""
        gid = frame.peer_group
        peer.order = frame.order
        peer.wants_beat = frame.beat
        peer.peer_id = self._next_peer_id
        self._next_peer_id += 1
        peer.data_host, peer.data_port, peer.name = frame.data_host, frame.data_port, frame.name
        group = self._groups.get(gid)
        if group is None:
            group = self._groups[gid] = Group(gid)
            # A group that emptied and was forgotten goes on from its last
            # epoch: its epochs only grow, and a stale peer of the old
            # incarnation can never match a new epoch.
            group.epoch = self._forgotten_epochs.pop(gid, 0)
        peer.group = group
        peer.phase = PeerPhase.PENDING
        group.pending[peer.peer_id] = peer
        out.append(Send(peer.conn_id, P.Welcome(peer.peer_id, self.heartbeat_interval, self.heartbeat_timeout)))
        if not group.members:
            # Nobody to agree with: an empty group admits at once.
            self._admit_into_empty(group, f"{peer.label()} joined an empty group", out)
        else:
            log.info("%s is waiting for admission to group %d", peer.label(), gid)

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
            rnd = self._decide_round(group, k)
        peer.next_round = k + 1
        if rnd.result is not None:
            out.append(Send(peer.conn_id, P.RoundDone(k, rnd.result)))
            return
        peer.waiting_round = k
        self._check_rounds(group, now, out)

    def _on_done(self, peer: Peer, frame: P.Done, now: float, out: list[Action]) -> None:
        # Hot path: every collective of every member passes here. Keep it flat.
        epoch, tag, seq = frame.epoch, frame.tag, frame.seq
        group = peer.group
        assert group is not None
        if epoch != group.epoch:
            if epoch > group.epoch:
                raise FrameError(f"'done' for epoch {epoch}, newer than the current epoch {group.epoch}")
            return  # stale: that epoch's undecided ops already failed
        if group.drain is not None:
            return  # the drain failed every undecided op of this epoch
        key = (tag, seq)
        reported = group.ops.get(key)
        if reported is None:
            if len(group.ops) >= MAX_OPEN_OPS:
                raise FrameError(f"more than {MAX_OPEN_OPS} undecided ops in epoch {epoch}")
            reported = group.ops[key] = set()
        elif peer.peer_id in reported:
            raise FrameError(f"duplicate 'done' for epoch {epoch} tag {tag} seq {seq}")
        reported.add(peer.peer_id)
        members = group.members
        if len(reported) == len(members):
            del group.ops[key]
            ok = P.OpOk(epoch, tag, seq)
            out.extend([Send(m.conn_id, ok) for m in members])

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
        self._start_drain(group, kind, f"peer {peer.peer_id} failed op (tag {tag}, seq {seq}): {reason}", now, out)

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
            self._commit(group, now, out)

    def _on_sync(self, peer: Peer, frame: P.Sync, now: float, out: list[Action]) -> None:
        sync_rounds.on_sync(peer, frame, out)

    def _on_sync_done(self, peer: Peer, frame: P.SyncDone, now: float, out: list[Action]) -> None:
        sync_rounds.on_sync_done(peer, frame, out)

    # ------------------------------------------------------------ transitions

    def _refuse(self, peer: Peer, why: str, now: float, out: list[Action]) -> None:
        """A connection failed to prove it holds the run secret: close it. Logged
        once per source address (a scanner must not flood the log)."""
        source = peer.addr.rpartition(":")[0] or peer.addr
        if source not in self._refused_from:
            if len(self._refused_from) >= 4096:
                self._refused_from.clear()
            self._refused_from.add(source)
            log.warning("refused connection from %s: %s (further refusals from it are not logged)", peer.addr, why)
        self._kill(peer, f"authentication: {why}", now, out, error=why, error_kind="auth")

    def _reject(self, peer: Peer, why: str, now: float, out: list[Action]) -> None:
        who = f"{peer.addr} (peer {peer.peer_id})" if peer.peer_id else peer.addr
        log.warning("rejected frame from %s: %s", who, why)
        self._kill(peer, f"protocol error: {why}", now, out, error=why)

    def _kill(self, peer: Peer, cause: str, now: float, out: list[Action], *, error: str | None,
              closed: bool = False, drain_kind: str = "peer", error_kind: str = "protocol") -> None:
        """Take ``peer`` out of everything; ``error`` is sent first if given."""
        if peer.phase is PeerPhase.GONE:
            return
        conn_id = peer.conn_id
        del self._conns[conn_id]
        self._live.pop(conn_id, None)
        if not closed:
            if error is not None:
                out.append(Send(conn_id, P.Error(clip_reason(error), error_kind)))
            out.append(Close(conn_id, cause))
        previous, peer.phase = peer.phase, PeerPhase.GONE
        group = peer.group
        if previous in (PeerPhase.CONNECTED, PeerPhase.CHALLENGED) or group is None:
            log.info("%s closed before 'hello': %s", peer.label(), cause)
            return
        level = logging.INFO if cause == "bye" else logging.WARNING
        if previous is PeerPhase.PENDING:
            log.log(level, "%s (pending in group %d) is gone: %s", peer.label(), group.gid, cause)
            self._drop_pending(group, peer, out)
        else:
            log.log(level, "%s of group %d died: %s", peer.label(), group.gid, cause)
            self._drop_member(group, peer, f"peer {peer.peer_id} is gone: {cause}", drain_kind, now, out)
            # After the drop: a sync round opened from here must not include the dead peer.
            sync_rounds.sync_drop(group, peer, out)

    def _drop_pending(self, group: Group, peer: Peer, out: list[Action]) -> None:
        del group.pending[peer.peer_id]
        committing = group.drain.admit_round if group.drain is not None else None
        for k, rnd in group.rounds.items():
            if rnd.result is not None or peer not in rnd.joiners:
                continue
            rnd.joiners.remove(peer)
            if not rnd.joiners and k != committing:
                # Nobody left to admit and no drain started for it: every voter
                # (past and future) gets changed=False, so they still agree.
                rnd.result = False
                done = P.RoundDone(k, False)
                for m in group.members:
                    if m.waiting_round == k:
                        m.waiting_round = None
                        out.append(Send(m.conn_id, done))
                log.info("group %d round %d: every joiner is gone, nothing to admit", group.gid, k)
        self._forget_if_empty(group)

    def _drop_member(self, group: Group, peer: Peer, reason: str, kind: str, now: float,
                     out: list[Action]) -> None:
        group.members.remove(peer)
        drain = group.drain
        if not group.members:
            self._group_emptied(group, reason, out)
        elif drain is None:
            self._start_drain(group, kind, reason, now, out)
        else:
            # Dying mid-drain: no longer awaited, not part of the next epoch,
            # and its report (if any) no longer counts toward the fence.
            drain.expected.discard(peer.peer_id)
            drain.reports.pop(peer.peer_id, None)
            drain.reason = clip_reason(f"{drain.reason}; {reason}")
            if not drain.expected:
                self._commit(group, now, out)

    def _group_emptied(self, group: Group, reason: str, out: list[Action]) -> None:
        """The last member is gone: the epoch ends with nobody to drain."""
        if group.drain is not None:
            self._draining.pop(group.gid, None)
            group.drain = None
        group.ops.clear()
        group.rounds.clear()  # every voter is gone; joiners start at next_unused_round
        log.info("group %d has no member left after epoch %d", group.gid, group.epoch)
        if group.pending:
            self._admit_into_empty(group, f"{reason}; admitting waiting peers", out)
        else:
            self._forget_if_empty(group)

    def _forget_if_empty(self, group: Group) -> None:
        # Empty groups are dropped so that hellos with ever-new group numbers
        # cannot grow the table; a later hello starts the group afresh.
        if not group.members and not group.pending and self._groups.get(group.gid) is group:
            del self._groups[group.gid]
            self._forgotten_epochs[group.gid] = group.epoch
            if len(self._forgotten_epochs) > MAX_FORGOTTEN_GROUPS:
                self._forgotten_epochs.popitem(last=False)
            self._draining.pop(group.gid, None)

    def _admit_into_empty(self, group: Group, reason: str, out: list[Action]) -> None:
        joiners = list(group.pending.values())
        group.pending.clear()
        group.epoch += 1
        for j in joiners:
            j.phase = PeerPhase.MEMBER
            j.next_round = group.next_unused_round
            group.members.append(j)
        order_ring(group.members)
        self._send_epoch(group, "admit", reason, [], group.next_unused_round, out)
        for j in joiners:
            log.info("%s admitted to group %d in epoch %d", j.label(), group.gid, group.epoch)

    def _decide_round(self, group: Group, k: int) -> Round:
        """First vote of round k: fix its decision from the pending peers now."""
        # A peer already promised to an undecided ADMIT round is not pending
        # "for" another one (cannot happen with correct peers, cheap to rule out).
        promised = {id(p) for r in group.rounds.values() if r.result is None for p in r.joiners}
        joiners = [p for p in group.pending.values() if id(p) not in promised]
        rnd = Round(RoundDecision.ADMIT if joiners else RoundDecision.NO_CHANGE, joiners)
        # Forget answered rounds every member is past (once per round, O(members)).
        if group.members:
            oldest = min(m.next_round for m in group.members)
            for old in [r for r, v in group.rounds.items() if r < oldest and v.result is not None]:
                del group.rounds[old]
        group.rounds[k] = rnd
        if k + 1 > group.next_unused_round:
            group.next_unused_round = k + 1
        if joiners:
            log.info("group %d round %d: ADMIT %s", group.gid, k, [p.peer_id for p in joiners])
        return rnd

    def _check_rounds(self, group: Group, now: float, out: list[Action]) -> None:
        """Start the admission drain of an ADMIT round every member has voted."""
        if group.drain is not None or not group.members:
            return  # re-checked after the running drain commits
        for k, rnd in group.rounds.items():
            if rnd.result is None and all(m.waiting_round == k for m in group.members):
                ids = [p.peer_id for p in rnd.joiners]
                self._start_drain(group, "admit", f"admitting peers {ids} at round {k}", now, out, admit_round=k)
                return

    def _start_drain(self, group: Group, kind: str, reason: str, now: float, out: list[Action],
                     admit_round: int | None = None) -> None:
        reason = clip_reason(reason)
        group.ops.clear()  # every undecided op of this epoch has failed
        group.drain = DrainRecord(
            group.epoch, kind, reason, {m.peer_id for m in group.members}, now + self.heartbeat_timeout, admit_round
        )
        self._draining[group.gid] = group
        frame = P.Drain(group.epoch, kind, reason)
        out.extend([Send(m.conn_id, frame) for m in group.members])
        log.info("group %d draining epoch %d (%s): %s", group.gid, group.epoch, kind, reason)

    def _commit(self, group: Group, now: float, out: list[Action]) -> None:
        """Every survivor answered the drain: start the next epoch."""
        drain = group.drain
        assert drain is not None and not drain.expected
        group.drain = None
        del self._draining[group.gid]
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
        next_round = k if k is not None else group.next_unused_round
        self._send_epoch(group, drain.kind, drain.reason, sorted(fence.items()), next_round, out)
        for j in joiners:
            log.info("%s admitted to group %d in epoch %d", j.label(), group.gid, group.epoch)
        if k is not None:
            # round_done after the epoch frame: a voter that sees changed=True
            # already knows the new ring.
            rnd.result = bool(joiners)
            done = P.RoundDone(k, rnd.result)
            for m in voters:
                m.waiting_round = None
                out.append(Send(m.conn_id, done))
        self._check_rounds(group, now, out)

    def _send_epoch(self, group: Group, kind: str, reason: str, fence: list[tuple[int, int]], next_round: int,
                    out: list[Action]) -> None:
        salt = self._nonce() if self._secret is not None else None
        frame = P.Epoch(group.epoch, tuple(m.ring_entry() for m in group.members), tuple(fence), next_round,
                        kind, reason, salt)
        out.extend([Send(m.conn_id, frame) for m in group.members])
        log.info("group %d committed epoch %d (%s): ring %s, fence %s",
                 group.gid, group.epoch, kind, [m.peer_id for m in group.members], fence)


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
}
assert set(_DISPATCH) == set(P.PEER_FRAMES.values()), "every peer frame needs a handler"

