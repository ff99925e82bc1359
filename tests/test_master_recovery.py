"""Failover on the master (pyccl/master/recovery.py), driven without sockets:
a restarted master re-forms a group from the members that re-register
(ops confirmed or failed alike everywhere, fences per member, sync rounds
finished or failed everywhere, revisions and rounds going on), refuses late
or stale members, holds new groups, and steps down for a higher term."""

from __future__ import annotations

from typing import Any

import pytest
from pyccl import auth
from pyccl import protocol as P
from pyccl.master.state import MasterState, PeerPhase

from test_master_state import TIMEOUT, Harness, last_epoch, ring

pytestmark = pytest.mark.timeout(30)


def resume(pid: int, epoch: int = 5, members: tuple[int, ...] = (1, 2, 3), **kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(draining=False, next_seq=(), undecided=(), committed=(), answered=0, position=0)
    fields.update(kw)
    return P.Resume(pid, epoch, members, **fields).to_wire()


def rejoin(h: Harness, pid: int, group: int = 0, **kw: Any) -> int:
    return h.hello(group, resume=resume(pid, **kw))


def test_members_re_form_the_group_at_the_next_epoch_with_their_ids() -> None:
    h = Harness()
    conns = [rejoin(h, pid, next_seq=((0, 4),), term=1) for pid in (2, 3, 1)]
    frames = {c: h.take(c) for c in conns}
    for c, pid in zip(conns, (2, 3, 1)):
        welcome, ep = frames[c][0], last_epoch(frames[c])
        assert welcome["type"] == "welcome" and welcome["peer_id"] == pid
        assert ep["epoch"] == 6 and ring(ep) == [1, 2, 3]  # the old ring order
        assert ep["fence"] == [[0, 4]] and ep["term"] == 2  # one above the old master's term
    assert h.info().members == (1, 2, 3) and h.st.term == 2
    h.hello()  # a fresh peer waits for a round; it gets the next id
    assert h.st.peer_id(h._next_conn - 1) == 4 and h.info().pending == (4,)


def test_an_op_anyone_committed_is_confirmed_to_the_others_before_the_epoch() -> None:
    h = Harness()
    a = rejoin(h, 1, committed=((0, 1), (0, 2)), next_seq=((0, 3),))
    b = rejoin(h, 2, undecided=((0, 2),), committed=((0, 1),), next_seq=((0, 3),))
    c = rejoin(h, 3, undecided=((0, 2),), next_seq=((0, 3),))
    assert [f["type"] for f in h.take(a)] == ["welcome", "epoch"]
    for conn in (b, c):
        frames = h.take(conn)
        assert [f["type"] for f in frames] == ["welcome", "op_ok", "epoch"]
        assert frames[1] == {"type": "op_ok", "epoch": 5, "tag": 0, "seq": 2}


def test_an_op_nobody_committed_is_confirmed_to_nobody() -> None:
    h = Harness()
    conns = [rejoin(h, pid, undecided=((3, 0),), next_seq=((3, 1),)) for pid in (1, 2, 3)]
    for conn in conns:
        assert [f["type"] for f in h.take(conn)] == ["welcome", "epoch"]


def test_a_member_that_missed_the_last_epoch_owes_every_op_begun_in_it() -> None:
    h = Harness()
    a = rejoin(h, 1, epoch=5, next_seq=((0, 2),))
    b = rejoin(h, 2, epoch=5, next_seq=((0, 3),))
    c = rejoin(h, 3, epoch=4, draining=True, next_seq=((0, 7), (1, 1)))
    assert last_epoch(h.take(a))["fence"] == [[0, 3]]
    assert last_epoch(h.take(b))["fence"] == [[0, 3]]
    assert last_epoch(h.take(c))["fence"] == [[0, 10]]  # 7 began in epoch 4, plus the 3 of epoch 5


def test_members_that_do_not_come_back_are_left_out_after_a_heartbeat_timeout() -> None:
    h = Harness()
    a = rejoin(h, 1)
    b = rejoin(h, 2)
    assert [f["type"] for f in h.take(a)] == ["welcome"]
    assert h.st.next_deadline() == pytest.approx(h.now + TIMEOUT)
    t0 = h.now
    h.now += TIMEOUT / 2
    for c in (a, b):
        h.send(c, {"type": "heartbeat"})  # they stay alive while waiting
    h.tick(t0 + TIMEOUT)
    assert ring(last_epoch(h.take(a))) == [1, 2] and ring(last_epoch(h.take(b))) == [1, 2]
    late = rejoin(h, 3)
    assert h.take(late)[-1]["kind"] == "expelled" and late in h.closed


def test_a_stale_member_is_expelled_and_the_others_go_on() -> None:
    h = Harness()
    old = rejoin(h, 3, epoch=3, members=(1, 2, 3))
    a = rejoin(h, 1)
    b = rejoin(h, 2)
    assert h.take(old)[-1]["kind"] == "expelled" and old in h.closed
    assert ring(last_epoch(h.take(a))) == [1, 2] and h.info().epoch == 6
    assert b not in h.closed


def test_a_sync_round_finishes_only_where_someone_got_its_result() -> None:
    h = Harness()
    a = rejoin(h, 1, last_sync=4, revision=7)
    b = rejoin(h, 2, sync=4, sync_ok=True, last_sync=3, revision=6)
    c = rejoin(h, 3, sync=5, sync_ok=True, last_sync=4, revision=7)
    assert [f["type"] for f in h.take(a)] == ["welcome", "epoch"]
    frames = h.take(b)
    assert frames[1] == {"type": "sync_result", "sync": 4, "ok": True, "revision": 7, "reason": ""}
    assert [f["type"] for f in h.take(c)] == ["welcome", "epoch"]  # nobody finished sync 5
    assert h.info().revision == 7  # the revision goes on from the members'


def test_rounds_a_member_is_past_are_no_change_the_others_go_on_as_before() -> None:
    h = Harness()
    k = (5 << 20) | 1
    a = rejoin(h, 1, members=(1, 2), answered=k + 1, position=k + 1)  # got round k's answer from the old master
    b = rejoin(h, 2, members=(1, 2), answered=k, position=k + 1)  # voted k, no answer yet
    j = h.hello()  # a joiner waiting
    h.take(a), h.take(b), h.take(j)
    h.send(b, {"type": "vote", "round": k})
    assert h.take(b) == [{"type": "round_done", "round": k, "changed": False}]
    for c in (a, b):
        h.send(c, {"type": "vote", "round": k + 1})
    for c in (a, b):
        h.drained(c)
    assert ring(last_epoch(h.take(j))) == [1, 2, 3]  # round k + 1 admitted the joiner


def test_a_new_group_is_held_while_the_master_is_young() -> None:
    h = Harness()
    h.st = MasterState(heartbeat_timeout=TIMEOUT, recovery_hold=2.0)
    a = h.hello()
    assert [f["type"] for f in h.take(a)] == ["welcome"]
    assert h.st.next_deadline() == pytest.approx(h.now + 2.0)
    h.tick(h.now + 2.0)
    assert last_epoch(h.take(a))["epoch"] == 1


def test_a_fresh_peer_held_waits_for_the_re_formed_group_and_joins_at_a_round() -> None:
    h = Harness()
    h.st = MasterState(heartbeat_timeout=TIMEOUT, recovery_hold=2.0, first_peer_id=1000)
    j = h.hello()
    a = rejoin(h, 1, members=(1,))
    assert [f["type"] for f in h.take(j)] == ["welcome"]
    assert last_epoch(h.take(a))["epoch"] == 6 and h.info().pending == (1000,)
    h.tick(h.now + 3.0)
    assert h.take(j) == []  # not formed into a group of its own


def test_a_group_running_here_refuses_re_registration() -> None:
    h = Harness()
    h.join_group(2)
    x = rejoin(h, 9, epoch=50, members=(9,))
    assert h.take(x)[-1]["kind"] == "expelled"


def test_a_master_that_meets_a_higher_term_steps_down() -> None:
    h = Harness()
    conns = h.join_group(2)  # this master's term is 1
    x = rejoin(h, 7, epoch=9, members=(7,), term=2)
    for c in [*conns, x]:
        assert h.take(c)[-1]["kind"] == "standby" and c in h.closed
    y = h.hello()
    frames = h.take(y)
    assert frames[-1]["kind"] == "standby" and y in h.closed
    assert h.st.passive is not None and h.info() is None


def test_a_dying_re_registered_peer_is_not_awaited() -> None:
    h = Harness()
    a = rejoin(h, 1)
    b = rejoin(h, 2)
    h.disconnect(b)
    assert h.st.peer_phase(a) is PeerPhase.RESUMING
    c = rejoin(h, 3)
    assert ring(last_epoch(h.take(a))) == [1, 3] and ring(last_epoch(h.take(c))) == [1, 3]


def test_re_registration_goes_through_the_secret_handshake() -> None:
    secret = b"s3cret"
    h = Harness()
    h.st = MasterState(heartbeat_timeout=TIMEOUT, secret=secret, nonce=lambda: b"m" * 32)
    np_ = b"p" * 32
    c = h.hello(resume=resume(1, members=(1,)), nonce=np_)
    assert [f["type"] for f in h.take(c)] == ["challenge"] and h.info() is None
    h.send(c, {"type": "auth", "proof": auth.peer_proof(secret, np_, b"m" * 32)})
    frames = h.take(c)
    assert frames[0]["peer_id"] == 1 and last_epoch(frames)["epoch"] == 6 and "salt" in last_epoch(frames)
    bad = h.hello(resume=resume(2, members=(2,), term=99), nonce=np_)
    h.send(bad, {"type": "auth", "proof": b"x" * 32})
    assert h.take(bad)[-1]["kind"] == "auth" and h.st.passive is None  # an unproven term changes nothing


def test_members_re_dialing_their_own_thawed_master_re_form_the_group() -> None:
    """The master froze; its members gave up their connections and re-dial it.
    Their old connections are still registered when the re-registrations
    come in: each replaces its old connection and the group re-forms."""
    h = Harness()
    old = h.join_group(3)
    ids = [h.pid(c) for c in old]
    e = h.info().epoch
    new = [h.hello(resume=resume(pid, epoch=e, members=tuple(ids))) for pid in ids]
    for c in new:
        frames = h.take(c)
        assert frames[0]["type"] == "welcome" and last_epoch(frames)["epoch"] > e
        assert ring(last_epoch(frames)) == ids
    assert all(c in h.closed for c in old) and h.info().members == tuple(ids)


def test_a_member_whose_path_broke_is_refused_if_the_others_go_on() -> None:
    h = Harness()
    old = h.join_group(3)
    ids = [h.pid(c) for c in old]
    e = h.info().epoch
    c = h.hello(resume=resume(ids[0], epoch=e, members=tuple(ids)))
    assert old[0] in h.closed
    for m in old[1:]:
        h.drained(m, epoch=e)  # the others are alive: the group goes on without it
    assert h.info().members == tuple(ids[1:])
    t0 = h.now
    h.now += TIMEOUT / 2
    for m in old[1:]:
        h.send(m, {"type": "heartbeat"})
    h.send(c, {"type": "heartbeat"})
    h.tick(t0 + TIMEOUT)
    assert h.take(c)[-1]["kind"] == "expelled" and c in h.closed


def test_a_member_that_re_dials_during_the_collection_replaces_its_first_try() -> None:
    h = Harness()
    a = rejoin(h, 1, members=(1, 2))
    a2 = rejoin(h, 1, members=(1, 2))  # its first re-registration's connection broke on its side
    assert a in h.closed
    b = rejoin(h, 2, members=(1, 2))
    assert ring(last_epoch(h.take(a2))) == [1, 2] and ring(last_epoch(h.take(b))) == [1, 2]


def test_members_whose_old_connections_closed_first_re_form_the_group() -> None:
    """A thawed master may read a member's closed old connection before its
    new hello: the group is still at that member's epoch, so it is collected,
    not refused."""
    h = Harness()
    conns = h.join_group(3)
    pids = [h.pid(c) for c in conns]
    epoch = h.info().epoch
    h.disconnect(conns[0])  # the old connection's end comes first
    first = rejoin(h, pids[0], epoch=epoch, members=tuple(pids))
    assert first not in h.closed and h.types(first) == ["welcome"]
    h.disconnect(conns[1])
    second = rejoin(h, pids[1], epoch=epoch, members=tuple(pids))
    third = rejoin(h, pids[2], epoch=epoch, members=tuple(pids))  # its old connection is replaced
    for c in (first, second, third):
        assert ring(last_epoch(h.take(c))) == pids and c not in h.closed
