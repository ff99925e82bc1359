"""Stateful property test of the master's pure state machine (Hypothesis).

Random interleavings of connections, hellos, votes, done/failed reports,
drain answers, leaves, disconnects, bad frames and clock ticks, with every
action the master returns checked against the protocol's invariants after
each step:

* epochs of a group only grow, and every epoch frame goes to exactly the
  members it lists, all of them alive;
* one outcome per op: ``op_ok`` for (epoch, tag, seq) only after every
  member of that epoch reported ``done``, at most once per member, and
  never for an op of an epoch whose drain has started;
* a peer is a member of at most one group at a time;
* every voter of a round gets the same ``changed`` answer.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule  # noqa: E402
from pyccl.master.state import Close, MasterState, Send  # noqa: E402
from pyccl.master.verdicts import Verdict  # noqa: E402

TIMEOUT = 5.0


class MasterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.st = MasterState(heartbeat_timeout=TIMEOUT)
        self.now = 0.0
        self.next_conn = 1
        self.open: set[int] = set()
        self.peer_of: dict[int, int] = {}  # conn -> peer id (after welcome)
        self.group_of: dict[int, int] = {}  # conn -> group it said hello to
        self.epoch_members: dict[tuple[int, int], tuple[int, ...]] = {}  # (group, epoch) -> peer ids
        self.current: dict[int, tuple[int, tuple[int, ...]]] = {}  # conn -> (epoch, members) it last got
        self.last_epoch: dict[int, int] = defaultdict(int)  # group -> last epoch number seen
        self.drained: set[tuple[int, int]] = set()  # (group, epoch) whose drain started
        self.done: dict[tuple[int, int, int, int], set[int]] = defaultdict(set)  # (g, e, tag, seq) -> peer ids
        self.op_ok: dict[tuple[int, int, int, int], set[int]] = defaultdict(set)
        self.ops_begun: dict[int, dict[int, int]] = defaultdict(dict)  # conn -> tag -> ops begun this epoch
        self.round_answers: dict[tuple[int, int], set[bool]] = defaultdict(set)
        self.pending_drain: dict[int, int] = {}  # conn -> epoch it must answer

    # ------------------------------------------------------------ plumbing

    def apply(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Close):
                assert a.conn_id in self.open, "closed a connection twice"
                self.open.discard(a.conn_id)
                continue
            assert isinstance(a, Send) and a.conn_id in self.open, "sent to a closed connection"
            f = a.frame.to_wire()
            c = a.conn_id
            g = self.group_of.get(c, -1)
            kind = f["type"]
            if kind == "welcome":
                self.peer_of[c] = f["peer_id"]
            elif kind == "epoch":
                ids = tuple(m[0] for m in f["members"])
                assert self.peer_of.get(c) in ids, "epoch frame sent to a non-member"
                key = (g, f["epoch"])
                if key in self.epoch_members:
                    assert self.epoch_members[key] == ids, "two member lists for one epoch"
                else:
                    assert f["epoch"] > self.last_epoch[g], "epochs must grow"
                    self.last_epoch[g] = f["epoch"]
                    self.epoch_members[key] = ids
                self.current[c] = (f["epoch"], ids)
                self.ops_begun[c] = {}
                self.pending_drain.pop(c, None)
            elif kind == "drain":
                self.drained.add((g, f["epoch"]))
                self.pending_drain[c] = f["epoch"]
            elif kind == "op_ok":
                key = (g, f["epoch"], f["tag"], f["seq"])
                assert (g, f["epoch"]) not in self.drained, "op_ok for an op of a drained epoch"
                members = set(self.epoch_members[(g, f["epoch"])])
                assert self.done[key] == members, "op_ok before every member reported done"
                pid = self.peer_of[c]
                assert pid not in self.op_ok[key], "op_ok twice"
                self.op_ok[key].add(pid)
            elif kind == "round_done":
                self.round_answers[(g, f["round"])].add(f["changed"])

    def members(self) -> list[int]:
        return sorted(c for c in self.open if c in self.current and c not in self.pending_drain)

    # --------------------------------------------------------------- rules

    @initialize()
    def first_peer(self) -> None:
        self.connect_and_hello(0)

    @rule(group=st.integers(0, 1))
    def connect_and_hello(self, group: int) -> None:
        c = self.next_conn
        self.next_conn += 1
        self.open.add(c)
        self.apply(self.st.on_connect(c, self.now, f"10.0.0.{c}:{5000 + c}"))
        self.group_of[c] = group
        self.apply(self.st.on_frame(c, {"type": "hello", "version": 1, "peer_group": group,
                                         "data_host": "10.0.0.1", "data_port": 7000 + c}, self.now))

    @rule(pick=st.integers(0, 50), tag=st.integers(0, 2), fast=st.booleans())
    def report_done(self, pick: int, tag: int, fast: bool) -> None:
        ms = self.members()
        if not ms:
            return
        c = ms[pick % len(ms)]
        epoch, _ = self.current[c]
        seq = self.ops_begun[c].get(tag, 0)
        self.ops_begun[c][tag] = seq + 1
        self.done[(self.group_of[c], epoch, tag, seq)].add(self.peer_of[c])
        frame = {"type": "done", "epoch": epoch, "tag": tag, "seq": seq}
        if not fast:
            self.apply(self.st.on_frame(c, frame, self.now))
            return
        result = self.st.on_done(c, frame, self.now)  # the server's hot path: one Verdict for the fan-out
        if isinstance(result, Verdict):
            result = [Send(m, result.frame) for m in result.conn_ids]
        self.apply(result)

    @rule(pick=st.integers(0, 50), kind=st.sampled_from(["peer", "mismatch", "protocol"]))
    def report_failed(self, pick: int, kind: str) -> None:
        ms = self.members()
        if not ms:
            return
        c = ms[pick % len(ms)]
        epoch, _ = self.current[c]
        seq = self.ops_begun[c].get(0, 0)
        self.ops_begun[c][0] = seq + 1
        self.apply(self.st.on_frame(c, {"type": "failed", "epoch": epoch, "tag": 0, "seq": seq, "kind": kind,
                                        "reason": "test"}, self.now))

    @rule(pick=st.integers(0, 50))
    def answer_drain(self, pick: int) -> None:
        waiting = sorted(c for c in self.pending_drain if c in self.open)
        if not waiting:
            return
        c = waiting[pick % len(waiting)]
        epoch = self.pending_drain.pop(c)
        pairs = [[t, n] for t, n in sorted(self.ops_begun[c].items())]
        self.apply(self.st.on_frame(c, {"type": "drained", "epoch": epoch, "next_seq": pairs}, self.now))

    @rule(pick=st.integers(0, 50))
    def vote(self, pick: int) -> None:
        ms = self.members()
        if not ms:
            return
        c = ms[pick % len(ms)]
        # Members vote in lockstep rounds named by their op count, as real peers do.
        k = sum(self.ops_begun[c].values()) << 20
        self.apply(self.st.on_frame(c, {"type": "vote", "round": k}, self.now))

    @rule(pick=st.integers(0, 50), how=st.sampled_from(["bye", "disconnect", "garbage"]))
    def leave(self, pick: int, how: str) -> None:
        live = sorted(self.open)
        if not live:
            return
        c = live[pick % len(live)]
        if how == "bye":
            self.apply(self.st.on_frame(c, {"type": "bye"}, self.now))
        elif how == "garbage":
            self.apply(self.st.on_frame(c, {"type": "done", "epoch": "x"}, self.now))
        else:
            self.open.discard(c)
            self.apply(self.st.on_disconnect(c, self.now))

    @rule(dt=st.floats(0.0, 2 * TIMEOUT))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.apply(self.st.on_tick(self.now))

    # ---------------------------------------------------------- invariants

    @invariant()
    def one_answer_per_round(self) -> None:
        for g in (0, 1):
            if self.st.group_info(g) is None:  # emptied: a new incarnation numbers its rounds afresh
                for key in [k for k in self.round_answers if k[0] == g]:
                    del self.round_answers[key]
        for key, answers in self.round_answers.items():
            assert len(answers) == 1, f"round {key} answered both ways"

    @invariant()
    def members_are_in_one_group_and_alive(self) -> None:
        seen: dict[int, int] = {}
        for g in (0, 1):
            info = self.st.group_info(g)
            if info is None:
                continue
            for pid in info.members:
                assert pid not in seen, f"peer {pid} is a member of groups {seen[pid]} and {g}"
                seen[pid] = g
            live_ids = {self.peer_of[c] for c in self.open if c in self.peer_of}
            assert set(info.members) <= live_ids, "a closed connection is still a member"


MasterMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestMasterStateMachine = pytest.mark.timeout(300)(MasterMachine.TestCase)
