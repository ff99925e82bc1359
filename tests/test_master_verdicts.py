"""The master's hot paths: the ``done`` fast path (MasterState.on_done,
pyccl/master/verdicts.py) gives the same outcomes as the general path, and an
admission round is decided by its last vote whatever the vote order."""

from __future__ import annotations

from typing import Any

import pytest
from pyccl.master.state import MasterState, Send
from pyccl.master.verdicts import Verdict

from test_master_state import Harness

pytestmark = pytest.mark.timeout(30)


class FastHarness(Harness):
    """A Harness whose members report ``done`` through the server's fast path."""

    def __init__(self) -> None:
        super().__init__()
        self.verdicts: list[Verdict] = []

    def send(self, c: int, frame: dict[str, Any]) -> None:
        if frame.get("type") != "done":
            super().send(c, frame)
            return
        result = self.st.on_done(c, frame, self.now)
        if isinstance(result, Verdict):
            self.verdicts.append(result)
            result = [Send(m, result.frame) for m in result.conn_ids]
        self._file(result)


def script(h: Harness) -> list[int]:
    """Three members: ops in two tags, a stale report, then a duplicate (expelled)."""
    a, b, c = h.join_group(3)
    for s in range(3):
        for m in (a, b, c):
            h.done(m, tag=1, seq=s)
    h.done(a, tag=2, seq=0)
    h.done(b, tag=2, seq=0)
    h.done(c, tag=2, seq=0, epoch=h.info().epoch - 1)  # stale: ignored
    h.done(a, tag=2, seq=0)  # duplicate: a protocol error
    return [a, b, c]


def test_fast_path_gives_the_general_paths_frames():
    slow, fast = Harness(), FastHarness()
    conns = script(slow)
    assert script(fast) == conns
    for c in conns:
        assert fast.take(c) == slow.take(c)
    assert fast.closed == slow.closed and conns[0] in fast.closed
    assert [v.frame.seq for v in fast.verdicts] == [0, 1, 2]
    assert all(v.conn_ids == tuple(conns) for v in fast.verdicts)


@pytest.mark.parametrize("frame", [
    {"type": "done", "epoch": 1, "tag": -1, "seq": 0},
    {"type": "done", "epoch": 1, "tag": 0, "seq": "x"},
    {"type": "done", "epoch": True, "tag": 0, "seq": 0},
    {"type": "done", "epoch": 1, "tag": 1 << 31, "seq": 0},
])
def test_fast_path_sends_bad_fields_to_the_full_parser(frame: dict[str, Any]):
    slow, fast = Harness(), FastHarness()
    for h in (slow, fast):
        a, _ = h.join_group(2)
        h.send(a, dict(frame))
    assert fast.closed == slow.closed and len(fast.closed) == 1
    assert fast.take(1) == slow.take(1)
    assert "field" in next(iter(fast.closed.values()))


def test_fast_path_from_a_pending_peer_or_unknown_connection():
    h = FastHarness()
    a = h.hello()
    p = h.hello()  # pending
    h.take(a)
    h.take(p)
    h.send(p, {"type": "done", "epoch": 1, "tag": 0, "seq": 0})
    assert p in h.closed
    assert h.take(p)[-1]["reason"] == "'done' not allowed from a pending (not yet admitted) peer"
    assert h.st.on_done(99, {"type": "done", "epoch": 1, "tag": 0, "seq": 0}, h.now) == []


def test_verdict_connections_follow_the_epoch():
    h = FastHarness()
    a, b = h.join_group(2)
    h.done(a)
    h.done(b)
    assert h.verdicts[-1].conn_ids == (a, b)
    c = h.hello()
    h.admit_round([a, b])
    h.vote(c)
    for m in (a, b, c):
        h.take(m)
        h.done(m)
    assert h.verdicts[-1].conn_ids == (a, b, c)
    h.disconnect(b)
    for m in (a, c):
        h.drained(m)
    for m in (a, c):
        h.take(m)
        h.done(m, seq=0)
    assert h.verdicts[-1].conn_ids == (a, c)
    assert h.take(a) == [{"type": "op_ok", "epoch": h.info().epoch, "tag": 0, "seq": 0}]


@pytest.mark.parametrize("order", ["ring", "reversed", "interleaved"])
def test_admission_round_completes_on_its_last_vote_in_any_order(order: str):
    h = Harness()
    members = h.join_group(6)
    joiner = h.hello()
    voters = {"ring": members, "reversed": members[::-1],
              "interleaved": members[::2] + members[1::2]}[order]
    for i, m in enumerate(voters):
        h.vote(m)
        drained = [f for c in members for f in h.take(c) if f["type"] == "drain"]
        assert len(drained) == (len(members) if i == len(voters) - 1 else 0)
    for m in members:
        h.drained(m)
    assert h.info().members[-1] == h.pid(joiner)


def test_a_voter_that_died_does_not_complete_a_round_for_the_others():
    h = Harness()
    a, b, c = h.join_group(3)
    j = h.hello()
    h.vote(a)
    h.vote(b)
    h.disconnect(b)  # its vote was counted; the death drains the epoch
    for m in (a, c):
        h.drained(m)
    for m in (a, c, j):
        h.take(m)
    assert h.pid(j) not in h.info().members
    h.vote(c)  # a's vote of the same round stands: c's completes it
    assert [f["type"] for f in h.take(a)] == ["drain"]
    h.drained(a)
    h.drained(c)
    assert h.info().members == (h.pid(a), h.pid(c), h.pid(j))


def test_on_done_is_pure_like_on_frame():
    st = MasterState(heartbeat_timeout=5.0)
    assert st.on_connect(1, 0.0) == []
    assert st.on_done(1, {"type": "done", "epoch": 0, "tag": 0, "seq": 0}, 0.0)  # before hello: rejected
    assert st.connection_count() == 0
