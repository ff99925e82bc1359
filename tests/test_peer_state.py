"""Unit tests of the peer's pure protocol state (pyccl/peer/state.py): no
sockets, no threads, no clocks; frames in, actions and answers out."""

from __future__ import annotations

import pytest
from pyccl import protocol as P
from pyccl.errors import CCLError, DrainKind, GroupLost, LostCause, MismatchError, PeerFailure
from pyccl.peer.state import (
    VOTE_BITS,
    AbortDataPlane,
    LocalResult,
    PeerState,
    SendFrame,
    SetDataPlaneEpoch,
)
from pyccl.wire import FrameError

pytestmark = pytest.mark.timeout(30)


def members(*ids: int) -> tuple[P.Member, ...]:
    return tuple(P.Member(i, "10.0.0.1", 7000 + i) for i in ids)


def epoch(n: int, ids: tuple[int, ...], fence: tuple[tuple[int, int], ...] = (), next_round: int = 0) -> P.Epoch:
    return P.Epoch(n, members(*ids), fence, next_round, "admit", "test")


def joined(me: int = 1, ids: tuple[int, ...] = (1, 2, 3), number: int = 1, next_round: int = 0) -> PeerState:
    st = PeerState()
    st.welcome(P.Welcome(me, 1.0, 5.0))
    e = epoch(number, ids, next_round=next_round)
    st.on_epoch(e, st.prepare_epoch(e))
    return st


def drain(st: PeerState, n: int, kind: str = "peer", reason: str = "peer 3 is gone") -> list:
    return st.on_drain(P.Drain(n, kind, reason))


def test_epoch_points_the_data_plane_at_the_ring_first() -> None:
    st = PeerState()
    st.welcome(P.Welcome(2, 1.0, 5.0))
    plan = st.prepare_epoch(epoch(1, (1, 2, 3)))
    assert plan == SetDataPlaneEpoch(1, 2, 1, 3, P.Member(3, "10.0.0.1", 7003), 1)
    assert st.epoch is None  # not published before the data plane is set
    st.on_epoch(epoch(1, (1, 2, 3)), plan)
    assert (st.world_size, st.epoch.rank if st.epoch else -1) == (3, 1)


def test_the_previous_epochs_key_is_kept_only_while_no_member_left() -> None:
    st = joined(me=1, ids=(1, 2, 3))
    grow = st.prepare_epoch(epoch(2, (1, 2, 3, 4)))
    assert grow.keep_previous_key  # a joiner: fetches planned in epoch 1 may still finish
    st.on_epoch(epoch(2, (1, 2, 3, 4)), grow)
    shrink = st.prepare_epoch(epoch(3, (1, 2, 4)))
    assert not shrink.keep_previous_key  # peer 3 left or was expelled: its key of epoch 2 must stop working


def test_shared_memory_only_towards_a_next_member_on_this_host() -> None:
    e = P.Epoch(1, members(1, 2, 3), (), 0, "admit", "", None, ("A", "A", "B"))
    for me, want in ((1, True), (2, False), (3, False)):  # 1 -> 2 same host; 2 -> 3 and 3 -> 1 cross
        st = PeerState()
        st.peer_id = me
        assert st.prepare_epoch(e).next_same_host is want, me
    st = PeerState()
    st.peer_id = 1
    assert not st.prepare_epoch(P.Epoch(1, members(1, 2), (), 0, "admit", "", None, ("", ""))).next_same_host
    assert not st.prepare_epoch(epoch(1, (1, 2))).next_same_host  # no host ids at all


def test_epoch_without_this_peer_or_not_newer_is_rejected() -> None:
    st = joined()
    with pytest.raises(FrameError, match="does not include this peer"):
        st.prepare_epoch(epoch(2, (2, 3)))
    with pytest.raises(FrameError, match="not newer"):
        st.prepare_epoch(epoch(1, (1, 2, 3)))


def test_ops_are_numbered_per_tag_in_program_order_and_reported() -> None:
    st = joined()
    a, b, c = st.begin_op(0), st.begin_op(5), st.begin_op(0)
    assert [(t.tag, t.seq) for t in (a, b, c)] == [(0, 0), (5, 0), (0, 1)]
    assert st.inflight == 3
    assert st.report(a, LocalResult.OK, "") == P.Done(1, 0, 0)
    failed = st.report(b, LocalResult.MISMATCH, "sizes differ")
    assert failed == P.Failed(1, 5, 0, "mismatch", "sizes differ")
    assert st.report(c, LocalResult.INVALID, "x").kind == "peer"  # type: ignore[union-attr]
    assert st.report(c, LocalResult.ABORTED, "x") is None


def test_op_ok_commits_and_only_that_op() -> None:
    st = joined()
    a, b = st.begin_op(0), st.begin_op(0)
    st.on_op_ok(P.OpOk(1, 0, 0))
    assert st.verdict_known(a) and not st.verdict_known(b)
    st.verdict(a, LocalResult.OK, "", "all_reduce")  # returns: committed


def test_drain_during_in_flight_op_fails_it_only_once_next_epoch_is_known() -> None:
    st = joined()
    op = st.begin_op(0)
    actions = drain(st, 1)
    assert actions == [AbortDataPlane(1, "the master ended epoch 1: peer 3 is gone"),
                       SendFrame(P.Drained(1, ((0, 1),)))]
    assert not st.can_begin() and not st.verdict_known(op)  # draining: wait for the next epoch
    e2 = epoch(2, (1, 2))
    st.on_epoch(e2, st.prepare_epoch(e2))
    assert st.verdict_known(op)
    with pytest.raises(PeerFailure) as info:
        st.verdict(op, LocalResult.PEER, "link to peer 3 broke", "all_reduce")
    exc = info.value
    assert (exc.epoch, exc.lost_peers, exc.kind, exc.op) == (1, (3,), DrainKind.PEER, "all_reduce")
    assert "world size is now 2" in str(exc) and exc.reason == "peer 3 is gone"


def test_op_ok_that_beat_the_drain_still_commits() -> None:
    st = joined()
    op = st.begin_op(0)
    st.on_op_ok(P.OpOk(1, 0, 0))
    drain(st, 1)
    st.verdict(op, LocalResult.OK, "", "all_reduce")  # committed, drain or not


def test_mismatch_drain_gives_mismatch_error() -> None:
    st = joined()
    op = st.begin_op(0)
    drain(st, 1, "mismatch", "peer 2 called all_gather")
    e2 = epoch(2, (1, 2, 3))
    st.on_epoch(e2, st.prepare_epoch(e2))
    with pytest.raises(MismatchError, match="all_gather") as info:
        st.verdict(op, LocalResult.OK, "", "all_reduce")
    assert info.value.op == "all_reduce"


def test_fence_debt_fails_ops_others_began_and_failed() -> None:
    st = joined()
    st.begin_op(0)  # tag 0 seq 0 in epoch 1: this peer began one op; others began three
    drain(st, 1)
    e2 = P.Epoch(2, members(1, 2), ((0, 3), (7, 1)), 0, "peer", "peer 3 is gone")
    st.on_epoch(e2, st.prepare_epoch(e2))
    assert st.fence_debt == {0: 2, 7: 1}
    for _ in range(2):
        with pytest.raises(PeerFailure):
            st.begin_op(0)
    with pytest.raises(PeerFailure):
        st.begin_op(7)
    t = st.begin_op(0)  # debt paid: numbered in the new epoch
    assert (t.epoch.number, t.seq) == (2, 0)
    assert st.inflight == 2  # the failed ones never went in flight


def test_no_op_begins_while_draining() -> None:
    st = joined()
    drain(st, 1)
    assert not st.can_begin()
    e2 = epoch(2, (1, 2))
    st.on_epoch(e2, st.prepare_epoch(e2))
    assert st.can_begin()


def test_epoch_arriving_while_a_verdict_is_pending() -> None:
    """An op waits for its verdict; the drain and the next epoch arrive: the
    op fails, and an op begun after it runs in the new epoch."""
    st = joined()
    pending = st.begin_op(0)
    assert st.report(pending, LocalResult.OK, "") == P.Done(1, 0, 0)  # done, no op_ok yet
    drain(st, 1, "admit", "admitting peers [4] at round 7")
    e2 = epoch(2, (1, 2, 3, 4))
    st.on_epoch(e2, st.prepare_epoch(e2))
    with pytest.raises(PeerFailure) as info:
        st.verdict(pending, LocalResult.OK, "", "all_reduce")
    assert info.value.kind is DrainKind.ADMIT and info.value.lost_peers == ()
    st.finish_op()
    nxt = st.begin_op(0)
    assert (nxt.epoch.number, nxt.seq, st.world_size) == (2, 0, 4)


def test_rounds_are_named_by_program_position() -> None:
    st = joined()
    assert st.vote() == 0 and st.vote() == 1  # two votes, no op between
    st.begin_op(0)
    st.finish_op()
    assert st.vote() == (1 << VOTE_BITS)  # first vote after one op
    st.on_round_done(P.RoundDone(1 << VOTE_BITS, True))
    assert st.round_known(1 << VOTE_BITS) and st.take_round_result(1 << VOTE_BITS) is True


def test_joiner_inherits_the_admitting_rounds_position() -> None:
    k = (5 << VOTE_BITS) | 2  # the members were at 5 ops, 2 votes
    st = joined(me=4, ids=(1, 2, 3, 4), number=3, next_round=k)
    assert st.vote() == k  # its first update_topology() is that very round
    st.begin_op(0)
    assert st.vote() == (6 << VOTE_BITS)  # after one op, in step with the members


def test_lost_and_closed_end_every_wait_with_a_clear_error() -> None:
    st = joined()
    op = st.begin_op(0)
    actions = st.on_lost(LostCause.MASTER_UNREACHABLE, "the master at 10.0.0.9:1 sent nothing for 10.0 s")
    assert actions == [AbortDataPlane(2**63 - 1, "the master at 10.0.0.9:1 sent nothing for 10.0 s")]
    assert st.verdict_known(op) and st.quiet() and st.can_begin() and st.round_known(99)
    with pytest.raises(GroupLost) as info:
        st.verdict(op, LocalResult.OK, "", "all_reduce")
    assert info.value.cause is LostCause.MASTER_UNREACHABLE and "no longer part of the group" in str(info.value)
    with pytest.raises(GroupLost):
        st.begin_op(0)
    st.close()
    with pytest.raises(CCLError, match="closed"):
        st.vote()


def test_drain_records_are_bounded() -> None:
    st = joined()
    for n in range(1, 60):
        drain(st, n)
        e = epoch(n + 1, (1, 2, 3))
        st.on_epoch(e, st.prepare_epoch(e))
    assert len(st._drains) <= 17 and len(st._members_of) <= 18


def test_auto_optimize_is_due_once_per_epoch_but_not_at_the_admission_round() -> None:
    st = joined(me=1, ids=(1, 2, 3), number=4, next_round=(2 << 20) | 1)
    assert not st.optimize_due(0)  # the next vote is the round that admitted this peer: decided
    st.vote()
    assert st.optimize_due(0)  # the members measure at the round after it
    assert not st.optimize_due(4)  # already optimized in this epoch
    alone = joined(me=1, ids=(1,), number=1)
    assert not alone.optimize_due(0)  # nothing to measure alone


def test_epoch_regions_give_the_two_level_rings() -> None:
    st = PeerState()
    st.welcome(P.Welcome(3, 1.0, 5.0))
    frame = P.Epoch(2, members(1, 2, 3, 4), (), 0, "admit", "test", None, regions=("a", "b", "a", "b"))
    plan = st.prepare_epoch(frame)
    # peer 3 is region a's second member (a: 1, 3) and region rank 1 of the cross ring (3, 4)
    assert plan.rings == ((1, 1, 2, 1, "10.0.0.1", 7001, 1), (2, 0, 2, 4, "10.0.0.1", 7004, 4))
    st.on_epoch(frame, plan)
    assert st.epoch is not None and st.epoch.two_level
    uneven = P.Epoch(3, members(1, 2, 3, 4, 5), (), 0, "admit", "test", None, regions=("a", "b", "a", "b", "a"))
    assert st.prepare_epoch(uneven).rings == ()
