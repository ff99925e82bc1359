"""Unit tests of the master's pure state machine (no sockets, no clocks)."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import pytest
from pyccl import protocol as P
from pyccl.master.state import (
    Close,
    GroupPhase,
    MasterState,
    PeerPhase,
    RoundDecision,
    Send,
)

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 5.0


class Harness:
    """Drives a MasterState and files every action per connection."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.st = MasterState(heartbeat_timeout=timeout)
        self.now = 100.0
        self._next_conn = 1
        self.inbox: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.closed: dict[int, str] = {}
        self.held: dict[int, P.Epoch] = {}  # each connection's last epoch (an epoch_delta expands from it)
        self.deltas = 0

    # -- events

    def connect(self) -> int:
        c = self._next_conn
        self._next_conn += 1
        assert self.st.on_connect(c, self.now, f"10.0.0.{c}:5{c:04d}") == []
        return c

    def send(self, c: int, frame: dict[str, Any]) -> None:
        self._file(self.st.on_frame(c, frame, self.now))

    def disconnect(self, c: int) -> None:
        self._file(self.st.on_disconnect(c, self.now))

    def tick(self, to: float) -> None:
        self.now = to
        self._file(self.st.on_tick(self.now))

    def _file(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send):
                assert a.conn_id not in self.closed, "sent to a closed connection"
                frame = a.frame
                if isinstance(frame, P.EpochDelta):  # as a Communicator does: expanded from the epoch it holds
                    frame = frame.expand(self.held.get(a.conn_id))
                    self.deltas += 1
                if isinstance(frame, P.Epoch):
                    self.held[a.conn_id] = frame
                self.inbox[a.conn_id].append(frame.to_wire())
            else:
                assert isinstance(a, Close)
                assert a.conn_id not in self.closed, "closed twice"
                self.closed[a.conn_id] = a.reason

    # -- helpers

    def take(self, c: int) -> list[dict[str, Any]]:
        frames, self.inbox[c] = self.inbox[c], []
        return frames

    def types(self, c: int) -> list[str]:
        return [f["type"] for f in self.take(c)]

    def hello(self, group: int = 0, name: str = "", **extra: Any) -> int:
        c = self.connect()
        frame = {"type": "hello", "version": 1, "peer_group": group, "data_host": "10.0.0.1",
                 "data_port": 7000 + c, **extra}
        if name:
            frame["name"] = name
        self.send(c, frame)
        return c

    def join_group(self, n: int, group: int = 0) -> list[int]:
        """n members in one group, inboxes emptied; returns their connection ids (ring order).

        Every peer runs a loop that starts with update_topology(): each joiner's
        first vote is the round that admitted it (answered at once), so at the
        end every member stands at the same position (next_round == n - 1).
        """
        conns = [self.hello(group)]
        for _ in range(n - 1):
            conns.append(self.hello(group))
            k = self.admit_round(conns[:-1], group)
            joiner = conns[-1]
            assert last_epoch(self.take(joiner))["next_round"] == k
            self.vote(joiner)
            assert self.take(joiner) == [{"type": "round_done", "round": k, "changed": True}]
        for c in conns:
            self.take(c)
        assert self.info(group).members == tuple(self.pid(c) for c in conns)
        assert {self.st._conns[c].next_round for c in conns} == {n - 1}
        return conns

    def admit_round(self, members: list[int], group: int = 0) -> int:
        """Every member votes its next round (the same one); the drain is answered.

        Returns the admitting round.
        """
        rounds = {self.st._conns[m].next_round for m in members}
        assert len(rounds) == 1, f"members stand at different positions: {rounds}"
        for m in members:
            self.vote(m)
        for m in members:
            self.drained(m, group=group)
        return rounds.pop()

    def vote(self, c: int) -> None:
        self.send(c, {"type": "vote", "round": self.st._conns[c].next_round})

    def drained(self, c: int, next_seq: list[list[int]] | None = None, epoch: int | None = None,
                group: int = 0) -> None:
        if epoch is None:
            epoch = self.info(group).epoch
        self.send(c, {"type": "drained", "epoch": epoch, "next_seq": next_seq or []})

    def done(self, c: int, tag: int = 0, seq: int = 0, epoch: int | None = None, group: int = 0) -> None:
        if epoch is None:
            epoch = self.info(group).epoch
        self.send(c, {"type": "done", "epoch": epoch, "tag": tag, "seq": seq})

    def info(self, group: int = 0):
        return self.st.group_info(group)

    def pid(self, c: int) -> int:
        pid = self.st.peer_id(c)
        assert pid is not None
        return pid


def last_epoch(frames: list[dict[str, Any]]) -> dict[str, Any]:
    eps = [f for f in frames if f["type"] == "epoch"]
    assert eps, f"no epoch frame in {frames}"
    return eps[-1]


def ring(frame: dict[str, Any]) -> list[int]:
    return [m[0] for m in frame["members"]]


# ------------------------------------------------------------------ admission


def test_first_peer_admitted_immediately():
    h = Harness()
    a = h.hello(name="a")
    welcome, epoch = h.take(a)
    assert welcome == {"type": "welcome", "peer_id": 1, "heartbeat_interval": TIMEOUT / 5,
                       "heartbeat_timeout": TIMEOUT, "term": 0}  # term: firm only once an epoch is committed
    assert epoch["type"] == "epoch"
    assert epoch["term"] == 1
    assert epoch["epoch"] == 1
    assert epoch["members"] == [[1, "10.0.0.1", 7001]]
    assert epoch["fence"] == []
    assert epoch["next_round"] == 0
    assert epoch["kind"] == "admit"
    assert h.st.peer_phase(a) is PeerPhase.MEMBER
    assert h.info().phase is GroupPhase.RUNNING


def test_epoch_frames_carry_the_members_host_ids_in_ring_order():
    h = Harness()
    a = h.hello(host_id="host-a")
    epoch = h.take(a)[1]
    assert epoch["hosts"] == ["host-a"]
    b = h.hello(host_id="host-b")
    c = h.hello()  # no host id: TCP for its links
    h.take(b), h.take(c)
    h.send(a, {"type": "vote", "round": 0})
    h.send(a, {"type": "drained", "epoch": 1, "next_seq": []})
    epoch = [f for f in h.take(a) if f["type"] == "epoch"][-1]
    assert [m[0] for m in epoch["members"]] == [1, 2, 3]
    assert epoch["hosts"] == ["host-a", "host-b", ""]


def test_no_hosts_field_when_no_member_gave_a_host_id():
    h = Harness()
    a = h.hello()
    assert "hosts" not in h.take(a)[1]


def test_peer_ids_increase_from_one_across_groups():
    h = Harness()
    conns = [h.hello(group=g % 2) for g in range(4)]
    assert [h.pid(c) for c in conns] == [1, 2, 3, 4]


def test_second_peer_pending_until_a_round():
    h = Harness()
    a = h.hello()
    h.take(a)
    b = h.hello()
    assert h.types(b) == ["welcome"]
    assert h.inbox[a] == []
    assert h.st.peer_phase(b) is PeerPhase.PENDING
    assert h.info().members == (1,) and h.info().pending == (2,)


def test_no_change_round_answered_at_once():
    h = Harness()
    a, b = h.join_group(2)
    h.vote(a)
    assert h.take(a) == [{"type": "round_done", "round": 1, "changed": False}]
    assert h.st.round_decision(0, 1) is RoundDecision.NO_CHANGE
    h.vote(a)  # a can go on without waiting for b
    assert h.take(a) == [{"type": "round_done", "round": 2, "changed": False}]
    h.vote(b)
    assert h.take(b) == [{"type": "round_done", "round": 1, "changed": False}]


def test_admit_round_waits_for_all_members_then_drains_and_appends_joiner():
    h = Harness()
    a, b = h.join_group(2)  # used round 0 to admit b; members now vote round 1
    c = h.hello(name="c")
    assert h.types(c) == ["welcome"]
    h.vote(a)
    assert h.st.round_decision(0, 1) is RoundDecision.ADMIT
    assert h.inbox[a] == [] and h.inbox[b] == []  # a waits for b
    h.vote(b)
    for m in (a, b):
        assert h.take(m) == [{"type": "drain", "epoch": 2, "kind": "admit",
                              "reason": "admitting peers [3] at round 1"}]
    assert h.info().phase is GroupPhase.DRAINING
    h.drained(a, [[0, 4]])
    assert h.inbox[a] == [] and h.inbox[c] == []
    h.drained(b, [[0, 4]])
    fa, fb, fc = h.take(a), h.take(b), h.take(c)
    assert [f["type"] for f in fa] == ["epoch", "round_done"]
    assert fa == fb
    assert fa[1] == {"type": "round_done", "round": 1, "changed": True}
    ep = fa[0]
    # the joiner inherits the admitting round's position
    assert ep["epoch"] == 3 and ring(ep) == [1, 2, 3] and ep["next_round"] == 1
    assert ep["fence"] == [[0, 4]] and ep["kind"] == "admit"
    assert fc == [ep]  # the joiner gets the epoch, and no round_done
    assert h.st.peer_phase(c) is PeerPhase.MEMBER
    assert h.info().phase is GroupPhase.RUNNING
    # the joiner's first update_topology() is round 1 itself: already decided,
    # answered at once with its recorded result, no new drain for anyone
    h.send(c, {"type": "vote", "round": 1})
    assert h.take(c) == [{"type": "round_done", "round": 1, "changed": True}]
    assert h.inbox[a] == [] and h.inbox[b] == [] and h.info().phase is GroupPhase.RUNNING
    # its next vote is round 2, like everyone else's next one
    h.send(c, {"type": "vote", "round": 2})
    assert h.take(c) == [{"type": "round_done", "round": 2, "changed": False}]


def test_single_member_admit_round_completes_on_its_own_vote():
    h = Harness()
    a = h.hello()
    b = h.hello()
    h.take(a), h.take(b)
    h.vote(a)
    assert h.types(a) == ["drain"]
    h.drained(a)
    assert h.types(a) == ["epoch", "round_done"]
    ep = last_epoch(h.take(b))
    assert ring(ep) == [1, 2] and ep["next_round"] == 0  # the admitting round
    h.vote(b)
    assert h.take(b) == [{"type": "round_done", "round": 0, "changed": True}]


def test_joiners_appended_in_admission_order():
    h = Harness()
    a = h.join_group(1)[0]
    j1, j2 = h.hello(), h.hello()
    h.vote(a)
    h.drained(a)
    ep = last_epoch(h.take(a))
    assert ring(ep) == [1, h.pid(j1), h.pid(j2)]
    assert h.take(j1)[-1] == h.take(j2)[-1] == ep


def test_no_deadlock_when_members_vote_at_different_times():
    h = Harness()
    a, b = h.join_group(2)
    k = h.st._conns[a].next_round
    h.send(a, {"type": "vote", "round": k})  # nobody pending: NO_CHANGE
    assert h.take(a) == [{"type": "round_done", "round": k, "changed": False}]
    j = h.hello()  # a joiner arrives while b has not voted round k yet
    h.take(j)
    h.send(a, {"type": "vote", "round": k + 1})  # first vote of k+1: ADMIT
    assert h.inbox[a] == []
    h.send(b, {"type": "vote", "round": k})  # k stays NO_CHANGE for b
    assert h.take(b) == [{"type": "round_done", "round": k, "changed": False}]
    h.send(b, {"type": "vote", "round": k + 1})
    assert h.types(a) == h.types(b) == ["drain"]
    h.drained(a)
    h.drained(b)
    ep = last_epoch(h.take(j))
    assert ring(ep) == [h.pid(a), h.pid(b), h.pid(j)] and ep["next_round"] == k + 1
    assert h.take(a)[-1] == {"type": "round_done", "round": k + 1, "changed": True}
    assert h.take(b)[-1] == {"type": "round_done", "round": k + 1, "changed": True}
    h.send(j, {"type": "vote", "round": k + 1})  # the joiner's first update_topology()
    assert h.take(j) == [{"type": "round_done", "round": k + 1, "changed": True}]
    assert h.inbox[a] == [] and h.inbox[b] == []


def test_vote_during_drain_is_recorded_and_admission_follows_commit():
    h = Harness()
    a, b, c = h.join_group(3)
    j = h.hello()
    h.take(j)
    h.send(c, {"type": "failed", "epoch": h.info().epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": "x"})
    h.vote(a)
    h.vote(b)  # ADMIT round while draining: recorded, drain goes on
    h.vote(c)
    for m in (a, b, c):
        assert h.types(m) == ["drain"]
        h.drained(m)
    # failure commit first, then (all three voted) the admission drain
    for m in (a, b, c):
        assert h.types(m) == ["epoch", "drain"]
    for m in (a, b, c):
        h.drained(m)
    for m in (a, b, c):
        frames = h.take(m)
        assert [f["type"] for f in frames] == ["epoch", "round_done"]
        assert frames[1]["changed"] is True
    assert h.info().members == (1, 2, 3, 4)


def test_pending_peer_gone_turns_admit_round_into_no_change_for_everyone():
    h = Harness()
    a, b = h.join_group(2)
    j = h.hello()
    h.vote(a)  # ADMIT [j]; a waits
    h.disconnect(j)
    assert h.take(a) == [{"type": "round_done", "round": 1, "changed": False}]
    h.vote(b)
    assert h.take(b) == [{"type": "round_done", "round": 1, "changed": False}]
    assert h.info().pending == () and h.info().phase is GroupPhase.RUNNING


def test_joiner_gone_during_admission_drain_commits_without_it():
    h = Harness()
    a, b = h.join_group(2)
    j = h.hello()
    h.vote(a)
    h.vote(b)
    h.disconnect(j)
    h.drained(a)
    h.drained(b)
    frames = h.take(a)
    assert [f["type"] for f in frames] == ["drain", "epoch", "round_done"]
    assert ring(frames[1]) == [1, 2]
    assert frames[2]["changed"] is False


# ------------------------------------------------------------------ rounds by program position

VOTE_BITS = 20  # round = (collectives begun) << 20 | (update_topology calls since the last one)


def position(ops: int, votes: int = 0) -> int:
    return (ops << VOTE_BITS) | votes


def test_vote_may_skip_ahead_and_starts_a_new_round():
    h = Harness()
    a, b = h.join_group(2)
    h.vote(a)  # round 1
    h.vote(a)  # round 2
    assert h.types(a) == ["round_done", "round_done"]
    assert h.st._conns[a].next_round == 3
    j = h.hello()
    h.take(j)
    p = position(1)  # a ran its first collective: the next vote jumps from 3 to 1 << 20
    assert h.st.round_decision(0, p) is None
    h.send(a, {"type": "vote", "round": p})
    assert a not in h.closed
    assert h.st.round_decision(0, p) is RoundDecision.ADMIT  # a new round, decided by this vote
    assert h.info().next_unused_round == p + 1
    assert h.inbox[a] == []  # a waits for b
    h.send(b, {"type": "vote", "round": p})  # b jumps from 1 straight to 1 << 20
    assert b not in h.closed
    assert h.types(a) == h.types(b) == ["drain"]
    h.drained(a)
    h.drained(b)
    ep = last_epoch(h.take(j))
    assert ring(ep) == [h.pid(a), h.pid(b), h.pid(j)] and ep["next_round"] == p
    for m in (a, b):
        assert h.take(m)[-1] == {"type": "round_done", "round": p, "changed": True}
        assert h.st._conns[m].next_round == p + 1
    # a skip without anyone pending is a NO_CHANGE round, answered at once
    h.send(a, {"type": "vote", "round": position(7, 3)})
    assert h.take(a) == [{"type": "round_done", "round": position(7, 3), "changed": False}]
    assert h.st.round_decision(0, position(7, 3)) is RoundDecision.NO_CHANGE
    # but a round below the last one + 1 is a protocol error
    h.send(a, {"type": "vote", "round": position(7, 3)})
    (err,) = h.take(a)
    assert err["type"] == "error"
    assert err["reason"] == f"'vote' for round {position(7, 3)}, expected round {position(7, 4)} or later"
    assert a in h.closed and b not in h.closed


def test_vote_equal_to_next_round_and_lower_vote_after_skip():
    h = Harness()
    a, b = h.join_group(2)
    h.send(b, {"type": "vote", "round": 1})  # exactly next_round: still fine
    assert h.take(b) == [{"type": "round_done", "round": 1, "changed": False}]
    h.send(b, {"type": "vote", "round": position(2)})
    assert h.take(b) == [{"type": "round_done", "round": position(2), "changed": False}]
    h.send(b, {"type": "vote", "round": 3})  # between the old next_round and the skip: too late
    assert "expected round 2097153 or later" in h.take(b)[0]["reason"]
    assert b in h.closed
    assert h.types(a) == ["drain"]


def test_joiner_voting_its_admitting_round_is_answered_at_once():
    h = Harness()
    a, b = h.join_group(2)
    k = h.st._conns[a].next_round
    j = h.hello()
    h.take(j)
    h.admit_round([a, b])
    assert last_epoch(h.take(j))["next_round"] == k
    assert h.st._conns[j].next_round == k
    for m in (a, b):
        assert h.take(m)[-1] == {"type": "round_done", "round": k, "changed": True}
    epoch, unused = h.info().epoch, h.info().next_unused_round
    j2 = h.hello()  # pending when j votes: must not be admitted by j's vote of round k
    h.take(j2)
    h.vote(j)
    assert h.take(j) == [{"type": "round_done", "round": k, "changed": True}]
    # no new round, no drain, nothing for the others; j2 still waits
    assert h.st.round_decision(0, k) is RoundDecision.ADMIT
    assert h.info().next_unused_round == unused and h.info().epoch == epoch
    assert h.info().phase is GroupPhase.RUNNING and h.info().pending == (h.pid(j2),)
    assert h.inbox[a] == [] and h.inbox[b] == [] and h.inbox[j2] == []
    assert h.st._conns[j].next_round == k + 1
    # everyone's next round (k + 1) admits j2
    for m in (a, b, j):
        h.vote(m)
    assert h.types(a) == h.types(b) == h.types(j) == ["drain"]
    for m in (a, b, j):
        h.drained(m)
    ep = last_epoch(h.take(j2))
    assert ring(ep) == [h.pid(c) for c in (a, b, j, j2)] and ep["next_round"] == k + 1
    for m in (a, b, j):
        assert h.take(m)[-1] == {"type": "round_done", "round": k + 1, "changed": True}


def test_joiner_record_survives_round_forgetting_until_it_votes():
    h = Harness()
    a, b = h.join_group(2)
    for m in (a, b):
        h.vote(m)  # round 1: NO_CHANGE
        assert h.take(m) == [{"type": "round_done", "round": 1, "changed": False}]
    assert h.st.round_decision(0, 1) is RoundDecision.NO_CHANGE
    p = position(3)
    j = h.hello()
    h.take(j)
    for m in (a, b):
        h.send(m, {"type": "vote", "round": p})
    h.drained(a)
    h.drained(b)
    h.take(a), h.take(b), h.take(j)
    # the old members run ahead; their new rounds let the master forget old ones
    for r in (p + 1, p + 2):
        for m in (a, b):
            h.send(m, {"type": "vote", "round": r})
            assert h.take(m) == [{"type": "round_done", "round": r, "changed": False}]
    assert h.st.round_decision(0, 1) is None  # everyone is past round 1: forgotten
    assert h.st.round_decision(0, p) is RoundDecision.ADMIT  # j still needs it
    h.send(j, {"type": "vote", "round": p})
    assert h.take(j) == [{"type": "round_done", "round": p, "changed": True}]
    h.send(j, {"type": "vote", "round": p + 1})  # decided by a's first vote: same answer
    assert h.take(j) == [{"type": "round_done", "round": p + 1, "changed": False}]
    h.send(a, {"type": "vote", "round": position(4)})  # a new round: now p can go
    assert h.take(a) == [{"type": "round_done", "round": position(4), "changed": False}]
    assert h.st.round_decision(0, p) is None


def test_joiner_starting_with_a_collective_votes_the_members_next_position():
    h = Harness()
    a, b = h.join_group(2)
    p = position(5)
    j = h.hello()
    h.take(j)
    for m in (a, b):
        h.send(m, {"type": "vote", "round": p})
    h.drained(a)
    h.drained(b)
    assert last_epoch(h.take(j))["next_round"] == p
    h.take(a), h.take(b)
    for m in (a, b, j):  # everyone's next action is a collective
        h.done(m)
    assert h.types(a) == h.types(b) == h.types(j) == ["op_ok"]
    p2 = position(6)
    j2 = h.hello()
    h.take(j2)
    h.send(j, {"type": "vote", "round": p2})  # j never votes p: it skips past it
    assert j not in h.closed and h.inbox[j] == []
    assert h.st.round_decision(0, p2) is RoundDecision.ADMIT
    for m in (a, b):
        h.send(m, {"type": "vote", "round": p2})
    for m in (a, b, j):
        assert h.types(m) == ["drain"]
        h.drained(m)
    ep = last_epoch(h.take(j2))
    assert ring(ep) == [h.pid(c) for c in (a, b, j, j2)] and ep["next_round"] == p2
    for m in (a, b, j):
        assert h.take(m)[-1] == {"type": "round_done", "round": p2, "changed": True}


def test_no_deadlock_with_position_numbered_rounds():
    """Members at position P admit J; J's loop starts with update_topology().

    J's first vote is P, already decided: answered at once. After one
    collective everybody votes P2 = (ops + 1) << 20, and a joiner pending
    then is admitted once all three have voted P2 -- whatever their order.
    """
    h = Harness()
    a, b = h.join_group(2)
    ops = 4  # A and B have begun 4 collectives
    P, P2 = position(ops), position(ops + 1)
    j = h.hello(name="J")
    h.take(j)
    h.send(a, {"type": "vote", "round": P})
    assert h.st.round_decision(0, P) is RoundDecision.ADMIT
    assert h.inbox[a] == []
    h.send(b, {"type": "vote", "round": P})
    for m in (a, b):
        assert h.types(m) == ["drain"]
        h.drained(m)
    ep = last_epoch(h.take(j))
    assert ep["next_round"] == P and ring(ep) == [h.pid(a), h.pid(b), h.pid(j)]
    for m in (a, b):
        frames = h.take(m)
        assert [f["type"] for f in frames] == ["epoch", "round_done"]
        assert frames == [ep, {"type": "round_done", "round": P, "changed": True}]
    # J's first update_topology() is round P: answered at once, nobody waits for anybody
    h.send(j, {"type": "vote", "round": P})
    assert h.take(j) == [{"type": "round_done", "round": P, "changed": True}]
    assert h.inbox[a] == [] and h.inbox[b] == []
    # one collective, all three
    for m in (a, b, j):
        h.done(m)
    assert h.types(a) == h.types(b) == h.types(j) == ["op_ok"]
    j2 = h.hello(name="J2")
    h.take(j2)
    # all three vote P2, J in the middle: nobody is answered before the last vote
    h.send(a, {"type": "vote", "round": P2})
    assert h.st.round_decision(0, P2) is RoundDecision.ADMIT
    h.send(j, {"type": "vote", "round": P2})
    assert h.inbox[a] == [] and h.inbox[j] == []
    assert h.info().phase is GroupPhase.RUNNING
    h.send(b, {"type": "vote", "round": P2})
    for m in (a, b, j):
        assert h.take(m) == [{"type": "drain", "epoch": h.info().epoch, "kind": "admit",
                              "reason": f"admitting peers [{h.pid(j2)}] at round {P2}"}]
    for m in (a, b, j):
        h.drained(m)
    ep2 = last_epoch(h.take(j2))
    assert ring(ep2) == [h.pid(c) for c in (a, b, j, j2)] and ep2["next_round"] == P2
    for m in (a, b, j):
        assert h.take(m) == [ep2, {"type": "round_done", "round": P2, "changed": True}]
    assert not h.closed
    assert h.info().pending == () and h.info().phase is GroupPhase.RUNNING
    # J2's loop starts with update_topology() too: round P2, answered at once
    h.send(j2, {"type": "vote", "round": P2})
    assert h.take(j2) == [{"type": "round_done", "round": P2, "changed": True}]


# ------------------------------------------------------------------ ops


def test_op_ok_only_after_every_members_done():
    h = Harness()
    a, b, c = h.join_group(3)
    h.done(a, tag=3, seq=0)
    h.done(b, tag=3, seq=0)
    h.done(a, tag=4, seq=0)
    assert all(h.inbox[m] == [] for m in (a, b, c))
    h.done(c, tag=3, seq=0)
    ok = {"type": "op_ok", "epoch": h.info().epoch, "tag": 3, "seq": 0}
    assert h.take(a) == h.take(b) == h.take(c) == [ok]


def test_op_ok_fan_out_reuses_one_frame_object():
    h = Harness()
    a, b = h.join_group(2)
    h.done(a)
    actions = h.st.on_frame(b, {"type": "done", "epoch": h.info().epoch, "tag": 0, "seq": 0}, h.now)
    assert len(actions) == 2 and actions[0].frame is actions[1].frame


def test_failed_drains_and_commits_same_members_with_max_fence():
    h = Harness()
    a, b, c = h.join_group(3)
    e = h.info().epoch
    h.done(a, tag=1, seq=5)
    h.send(b, {"type": "failed", "epoch": e, "tag": 1, "seq": 5, "kind": "mismatch", "reason": "size differs"})
    for m in (a, b, c):
        (drain,) = h.take(m)
        assert drain["type"] == "drain" and drain["epoch"] == e and drain["kind"] == "mismatch"
        assert "size differs" in drain["reason"]
    h.drained(a, [[1, 6], [2, 3]])
    h.drained(b, [[1, 5]])
    h.drained(c, [[1, 6], [2, 4], [7, 1]])
    ep = last_epoch(h.take(a))
    assert ep["epoch"] == e + 1 and ring(ep) == [1, 2, 3]
    assert ep["fence"] == [[1, 6], [2, 4], [7, 1]]
    assert ep["kind"] == "mismatch"
    assert h.take(b) == h.take(c) == [ep]
    # the undecided op failed with the old epoch: a late done for it is ignored
    h.done(c, tag=1, seq=5, epoch=e)
    assert h.inbox[c] == [] and c not in h.closed


def test_seq_restart_in_new_epoch():
    h = Harness()
    a, b = h.join_group(2)
    h.done(a, tag=0, seq=0)
    h.send(b, {"type": "failed", "epoch": h.info().epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": ""})
    h.drained(a)
    h.drained(b)
    h.take(a), h.take(b)
    h.done(b, tag=0, seq=0)
    assert h.inbox[a] == []  # a's done of the old epoch does not count
    h.done(a, tag=0, seq=0)
    assert h.types(a) == ["op_ok"]


# ------------------------------------------------------------------ deaths


def test_death_by_disconnect_drains_survivors(caplog):
    h = Harness()
    a, b, c = h.join_group(3)
    with caplog.at_level(logging.INFO, logger="pyccl.master"):
        h.disconnect(b)
    assert "died: connection closed" in caplog.text
    assert b not in h.closed  # already closed: nothing to close
    assert h.st.peer_phase(b) is PeerPhase.GONE
    for m in (a, c):
        (drain,) = h.take(m)
        assert drain["kind"] == "peer" and "peer 2" in drain["reason"]
    h.drained(a)
    h.drained(c)
    assert ring(last_epoch(h.take(a))) == [1, 3]


def test_death_by_heartbeat_timeout():
    h = Harness()
    a, b = h.join_group(2)
    assert h.st.next_deadline() == pytest.approx(h.now + TIMEOUT)
    h.now += 3
    h.send(a, {"type": "heartbeat"})
    assert h.st.next_deadline() == pytest.approx(h.now - 3 + TIMEOUT)  # b is the oldest
    h.tick(h.now - 3 + TIMEOUT - 0.01)
    assert not h.closed
    h.tick(h.now + 0.01)
    assert h.take(b)[0]["type"] == "error"
    assert "heartbeat" in h.closed[b]
    assert h.types(a) == ["drain"]
    h.drained(a)
    assert ring(last_epoch(h.take(a))) == [1]


def test_silent_connection_without_hello_is_dropped():
    h = Harness()
    c = h.connect()
    h.tick(h.now + TIMEOUT)
    assert c in h.closed and h.take(c)[0]["type"] == "error"
    assert h.st.next_deadline() is None


def test_death_by_drain_timeout():
    h = Harness()
    a, b, c = h.join_group(3)
    h.send(a, {"type": "failed", "epoch": h.info().epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": "x"})
    start = h.now
    assert h.st.next_deadline() == pytest.approx(start + TIMEOUT)
    h.drained(a)
    h.now += 4
    h.send(a, {"type": "heartbeat"})
    h.send(c, {"type": "heartbeat"})  # alive, but never answers the drain
    h.send(b, {"type": "heartbeat"})
    h.drained(b)
    h.tick(start + TIMEOUT)
    assert "drain timeout" in h.closed[c]
    assert ring(last_epoch(h.take(a))) == [1, 2]
    assert h.info().phase is GroupPhase.RUNNING


def test_death_during_drain_removes_it_from_acks_and_epoch():
    h = Harness()
    a, b, c = h.join_group(3)
    h.send(a, {"type": "failed", "epoch": h.info().epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": "x"})
    h.drained(a, [[0, 9]])
    h.drained(c, [[0, 2]])
    h.disconnect(b)  # b was the only ack missing: commit now
    ep = last_epoch(h.take(a))
    assert ring(ep) == [1, 3] and ep["fence"] == [[0, 9]]
    assert "peer 2 is gone" in ep["reason"]


def test_dead_peers_report_does_not_count_in_fence():
    h = Harness()
    a, b, c = h.join_group(3)
    h.send(a, {"type": "failed", "epoch": h.info().epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": "x"})
    h.drained(b, [[0, 9]])
    h.disconnect(b)
    h.drained(a, [[0, 1]])
    h.drained(c, [[0, 2]])
    assert last_epoch(h.take(a))["fence"] == [[0, 2]]


def test_bye_leaves_gracefully():
    h = Harness()
    a, b = h.join_group(2)
    h.send(b, {"type": "bye"})
    assert h.closed[b] == "bye" and h.inbox[b] == []  # no error frame
    (drain,) = h.take(a)
    assert drain["kind"] == "leave"


def test_last_member_gone_admits_pending_immediately():
    h = Harness()
    a, b = h.join_group(2)
    k = h.info().next_unused_round
    j1, j2 = h.hello(), h.hello()
    h.take(j1), h.take(j2)
    e = h.info().epoch
    h.disconnect(a)
    h.drained(b)  # b alone after a's death; still pending j1, j2
    assert ring(last_epoch(h.take(b))) == [2]
    h.disconnect(b)
    ep = last_epoch(h.take(j1))
    assert ring(ep) == [h.pid(j1), h.pid(j2)] and ep["epoch"] == e + 2
    assert ep["next_round"] == k  # the group's next unused round
    assert h.take(j2) == [ep]


def test_last_member_dies_during_admission_drain():
    h = Harness()
    a = h.join_group(1)[0]
    h.vote(a)  # round 0: NO_CHANGE
    j = h.hello()
    h.take(j)
    h.vote(a)  # round 1: ADMIT [j]
    assert h.types(a) == ["round_done", "drain"]
    h.disconnect(a)
    ep = last_epoch(h.take(j))
    assert ring(ep) == [h.pid(j)] and ep["next_round"] == 2
    assert h.info().phase is GroupPhase.RUNNING


def test_group_forgotten_when_empty():
    h = Harness()
    a = h.join_group(1)[0]
    h.disconnect(a)
    assert h.info() is None
    b = h.hello()
    # A new incarnation of the group goes on from its last epoch: epochs only grow.
    assert last_epoch(h.take(b))["epoch"] == 2


def test_peer_groups_are_independent():
    h = Harness()
    a0, b0 = h.join_group(2, group=0)
    a1, b1 = h.join_group(2, group=5)
    j0 = h.hello(group=0)
    h.take(j0)
    # group 5 votes: NO_CHANGE (its pending set is empty)
    h.vote(a1)
    assert h.take(a1) == [{"type": "round_done", "round": 1, "changed": False}]
    # ops with the same (epoch, tag, seq) do not mix
    e0, e1 = h.info(0).epoch, h.info(5).epoch
    assert e0 == e1
    h.done(a0, group=0)
    h.done(a1, group=5)
    assert all(h.inbox[c] == [] for c in (a0, b0, a1, b1))
    # a death in group 5 does not touch group 0
    h.disconnect(b1)
    assert h.types(a1) == ["drain"]
    assert h.inbox[a0] == [] and h.inbox[b0] == []
    h.done(b0, group=0)
    assert h.types(a0) == ["op_ok"]
    assert h.info(0).phase is GroupPhase.RUNNING and h.info(5).phase is GroupPhase.DRAINING


# ------------------------------------------------------------------ validation

GOOD_HELLO = {"type": "hello", "version": 1, "peer_group": 0, "data_host": "h", "data_port": 1}


def _hello(**kw: Any) -> dict[str, Any]:
    f = dict(GOOD_HELLO, **kw)
    return {k: v for k, v in f.items() if v is not ...}


BAD_HELLOS = [
    (_hello(version=2), "version"),
    (_hello(version=True), "version"),
    (_hello(version=...), "version"),
    (_hello(peer_group=-1), "peer_group"),
    (_hello(peer_group=1 << 31), "peer_group"),
    (_hello(peer_group="0"), "peer_group"),
    (_hello(peer_group=...), "peer_group"),
    (_hello(data_host=""), "data_host"),
    (_hello(data_host="x" * 256), "data_host"),
    (_hello(data_host=5), "data_host"),
    (_hello(data_port=0), "data_port"),
    (_hello(data_port=65536), "data_port"),
    (_hello(data_port=1.5), "data_port"),
    (_hello(name="n" * 129), "name"),
    (_hello(name=["n"]), "name"),
]


@pytest.mark.parametrize("frame,why", BAD_HELLOS)
def test_invalid_hello_closes_only_that_connection(frame, why, caplog):
    h = Harness()
    a, b = h.join_group(2)
    c = h.connect()
    with caplog.at_level(logging.WARNING, logger="pyccl.master"):
        h.send(c, frame)
    (err,) = h.take(c)
    assert err["type"] == "error" and why in err["reason"]
    assert c in h.closed and a not in h.closed and b not in h.closed
    assert h.inbox[a] == [] and h.inbox[b] == []
    assert f"rejected frame from 10.0.0.{c}" in caplog.text and why in caplog.text
    h.done(a)
    h.done(b)
    assert h.types(a) == ["op_ok"]


def _member_frames(epoch: int) -> list[tuple[dict[str, Any], str]]:
    return [
        ({"type": "vote"}, "round"),
        ({"type": "vote", "round": -1}, "round"),
        ({"type": "vote", "round": 1 << 63}, "round"),
        ({"type": "vote", "round": 0}, "expected round"),  # rounds never go back
        ({"type": "done", "epoch": epoch, "tag": 1 << 31, "seq": 0}, "tag"),
        ({"type": "done", "epoch": epoch, "tag": 0}, "seq"),
        ({"type": "done", "epoch": str(epoch), "tag": 0, "seq": 0}, "epoch"),
        ({"type": "done", "epoch": epoch + 1, "tag": 0, "seq": 0}, "newer"),
        ({"type": "failed", "epoch": epoch, "tag": 0, "seq": 0, "kind": "oops", "reason": ""}, "kind"),
        ({"type": "failed", "epoch": epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": "r" * 1025}, "reason"),
        ({"type": "failed", "epoch": epoch, "tag": 0, "seq": 0, "kind": "peer"}, "reason"),
        ({"type": "failed", "epoch": epoch + 1, "tag": 0, "seq": 0, "kind": "peer", "reason": ""}, "newer"),
        ({"type": "drained", "epoch": epoch, "next_seq": []}, "not draining"),
        ({"type": "drained", "epoch": epoch + 1, "next_seq": []}, "newer"),
        ({"type": "hello", **{k: v for k, v in GOOD_HELLO.items() if k != "type"}}, "'hello' not allowed"),
        ({"type": "nonsense"}, "unknown frame type"),
        ({"type": "x" * 5000}, "unknown frame type"),
    ]


@pytest.mark.parametrize("index", range(len(_member_frames(0))))
def test_invalid_frame_from_member_expels_it_and_drains(index, caplog):
    h = Harness()
    a, b, c = h.join_group(3)
    frame, why = _member_frames(h.info().epoch)[index]
    with caplog.at_level(logging.WARNING, logger="pyccl.master"):
        h.send(b, frame)
    (err,) = h.take(b)
    assert err["type"] == "error" and why in err["reason"], err
    assert len(err["reason"]) <= 1024
    assert b in h.closed and a not in h.closed and c not in h.closed
    assert "rejected frame from" in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 2000  # nothing echoed in full
    assert h.types(a) == h.types(c) == ["drain"]
    h.drained(a)
    h.drained(c)
    assert ring(last_epoch(h.take(a))) == ring(last_epoch(h.take(c))) == [1, 3]


@pytest.mark.parametrize("bad", [[[0]], [[1 << 31, 0]], [[0, -1]], "x", [[0, 1]] * 4097, [[True, 1]]])
def test_drained_with_bad_next_seq_is_rejected(bad):
    h = Harness()
    a, b = h.join_group(2)
    h.send(a, {"type": "failed", "epoch": h.info().epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": ""})
    h.drained(b, bad)
    assert b in h.closed and "next_seq" in h.take(b)[-1]["reason"]
    assert h.info().phase is GroupPhase.DRAINING  # still waiting for a
    h.drained(a)
    assert ring(last_epoch(h.take(a))) == [1]


@pytest.mark.parametrize(
    "frame,why",
    [
        ({"type": "vote", "round": 0}, "before 'hello'"),
        ({"type": "heartbeat"}, "before 'hello'"),
        ({"type": "done", "epoch": 1, "tag": 0, "seq": 0}, "before 'hello'"),
        ({"type": "bye"}, "before 'hello'"),
    ],
)
def test_frames_before_hello_are_rejected(frame, why):
    h = Harness()
    c = h.connect()
    h.send(c, frame)
    assert c in h.closed and why in h.take(c)[0]["reason"]


@pytest.mark.parametrize("ftype", ["vote", "done", "failed", "drained", "hello"])
def test_member_only_frames_from_pending_peer_are_rejected(ftype):
    h = Harness()
    a = h.join_group(1)[0]
    p = h.hello()
    h.take(p)
    h.send(p, {"type": ftype, "round": 0, "epoch": 1, "tag": 0, "seq": 0})
    assert p in h.closed
    assert "not allowed" in h.take(p)[0]["reason"]
    assert h.info().pending == () and h.inbox[a] == []


def test_second_vote_while_waiting_is_rejected():
    h = Harness()
    a, b = h.join_group(2)
    h.hello()
    h.vote(a)  # ADMIT: a waits
    h.send(a, {"type": "vote", "round": 2})
    assert "undecided" in h.take(a)[0]["reason"]


def test_duplicate_done_and_drained_are_rejected():
    h = Harness()
    a, b, c = h.join_group(3)
    h.done(a)
    h.done(a)
    assert "duplicate 'done'" in h.take(a)[0]["reason"]
    assert h.types(b) == ["drain"]
    h.drained(b)
    h.drained(b)
    assert "duplicate 'drained'" in h.take(b)[0]["reason"]
    assert c not in h.closed


def test_stale_frames_are_ignored():
    h = Harness()
    a, b = h.join_group(2)
    old = h.info().epoch
    h.send(a, {"type": "failed", "epoch": old, "tag": 0, "seq": 0, "kind": "peer", "reason": ""})
    h.take(a), h.take(b)
    # while draining: done and failed for the draining epoch are ignored
    h.done(b, epoch=old)
    h.send(b, {"type": "failed", "epoch": old, "tag": 0, "seq": 1, "kind": "peer", "reason": ""})
    assert h.inbox[a] == [] and h.inbox[b] == []
    h.drained(a)
    h.drained(b)
    h.take(a), h.take(b)
    # older epoch: done, failed, drained are ignored
    h.done(a, epoch=old)
    h.send(a, {"type": "failed", "epoch": old, "tag": 0, "seq": 0, "kind": "peer", "reason": ""})
    h.drained(a, epoch=old)
    assert h.inbox[a] == [] and h.inbox[b] == [] and not h.closed
    assert h.info().phase is GroupPhase.RUNNING
    # frames from a connection already closed are ignored too
    h.disconnect(b)
    assert h.st.on_frame(b, {"type": "heartbeat"}, h.now) == []


def test_unknown_extra_fields_are_tolerated():
    h = Harness()
    a = h.hello(future_field=[1, 2, 3])
    assert h.st.peer_phase(a) is PeerPhase.MEMBER


def test_too_many_open_ops_is_rejected(monkeypatch):
    import pyccl.master.state as state

    monkeypatch.setattr(state, "MAX_OPEN_OPS", 3)
    h = Harness()
    a, b = h.join_group(2)
    for seq in range(3):
        h.done(a, seq=seq)
    assert a not in h.closed
    h.done(a, seq=3)
    assert "undecided ops" in h.take(a)[0]["reason"]


def test_logs_admission_death_and_commit(caplog):
    h = Harness()
    with caplog.at_level(logging.INFO, logger="pyccl.master"):
        a = h.hello(name="alpha")
        b = h.hello()
        h.vote(a)
        h.drained(a)
        h.send(b, {"type": "bye"})
    text = caplog.text
    assert "peer 1 'alpha' (10.0.0.1:50001) admitted to group 0 in epoch 1" in text
    assert "committed epoch 2 (admit): ring [1, 2]" in text
    assert "died: bye" in text


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError):
        MasterState(heartbeat_timeout=0)
    with pytest.raises(ValueError):
        MasterState(heartbeat_timeout=1.0, heartbeat_interval=2.0)


def test_silent_pending_peer_is_expelled():
    h = Harness()
    a = h.join_group(1)[0]
    p = h.hello()
    h.take(p)
    h.now += 3
    h.send(a, {"type": "heartbeat"})
    h.tick(h.now + 2)  # p silent for 5 s, a for 2 s
    assert "heartbeat timeout" in h.closed[p] and a not in h.closed
    assert h.info().pending == ()
    h.vote(a)  # nobody pending any more
    assert h.take(a) == [{"type": "round_done", "round": 0, "changed": False}]


def test_member_dies_during_admission_drain_joiner_still_admitted():
    h = Harness()
    a, b, c = h.join_group(3)
    j = h.hello()
    h.take(j)
    for m in (a, b, c):
        h.vote(m)
    h.drained(a)
    h.disconnect(b)
    h.drained(c)
    frames = h.take(a)
    assert [f["type"] for f in frames] == ["drain", "epoch", "round_done"]
    assert ring(frames[1]) == [1, 3, h.pid(j)] and frames[1]["kind"] == "admit"
    assert frames[2]["changed"] is True
    assert h.take(j) == [frames[1]]
