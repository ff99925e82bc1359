"""Failover on the peer, without sockets or threads: PeerState keeps its ops
and rounds across a master loss, reports them (resume), and settles every
op once the group re-forms; Backoff paces the search for a master."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

import pytest
from pyccl import protocol as P
from pyccl.errors import CCLError, GroupLost, LostCause, PeerFailure, Timeout
from pyccl.peer.reconnect import Backoff, Reconnector, combined_hash, parse_masters
from pyccl.peer.state import VOTE_BITS, AbortDataPlane, LocalResult, SendFrame

from test_peer_state import epoch, joined

pytestmark = pytest.mark.timeout(30)


def recovered(number: int, ids: tuple[int, ...], fence: tuple[tuple[int, int], ...] = (), term: int = 2) -> P.Epoch:
    e = epoch(number, ids, fence)
    return P.Epoch(e.epoch, e.members, e.fence, e.next_round, "peer", "re-formed", None, term=term)


def test_a_lost_master_blocks_new_ops_and_votes_but_keeps_waiting_ops() -> None:
    st = joined(me=1, ids=(1, 2, 3), number=4)
    t = st.begin_op(0)
    assert st.report(t, LocalResult.OK, "") == P.Done(4, 0, 0)
    st.on_master_lost()
    assert not st.can_begin() and not st.can_vote() and not st.verdict_known(t)
    assert t.session == 0 and st.session == 1  # its report belongs to the lost connection
    r = st.resume()
    assert r is not None and (r.peer_id, r.epoch, r.members) == (1, 4, (1, 2, 3))
    assert r.undecided == ((0, 0),) and r.next_seq == ((0, 1),) and not r.draining
    assert r.position == 1 << VOTE_BITS and r.answered == r.position


def test_an_op_ok_a_caller_took_but_has_not_recorded_is_reported_committed() -> None:
    # The verdict path in the core: the caller's wait returned op_ok for (4, 0, 1),
    # the master was lost before the caller recorded it; it will commit, so the
    # resume must say so (and not call it undecided).
    st = joined(me=1, ids=(1, 2, 3), number=4)
    a, b = st.begin_op(0), st.begin_op(0)
    st.report(a, LocalResult.OK, "")
    st.report(b, LocalResult.OK, "")
    st.on_op_ok(P.OpOk(4, 0, 0))
    st.on_master_lost()
    r = st.resume(arriving=[(4, 0, 1), (3, 0, 9)])  # a key of an older epoch is not this epoch's
    assert r is not None and r.committed == ((0, 0), (0, 1)) and (0, 1) not in r.undecided
    st.on_op_ok(P.OpOk(4, 0, 1))  # the caller records it
    e = recovered(5, (1, 2, 3))
    st.on_epoch(e, st.prepare_epoch(e))
    st.verdict(b, LocalResult.OK, "", "all_reduce")  # committed, as the resume said


def test_the_re_formed_epoch_commits_confirmed_ops_and_fails_the_others() -> None:
    st = joined(me=1, ids=(1, 2, 3), number=4)
    a, b = st.begin_op(0), st.begin_op(1)
    st.report(a, LocalResult.OK, "")
    st.report(b, LocalResult.OK, "")
    st.on_master_lost()
    st.on_op_ok(P.OpOk(4, 0, 0))  # the new master: another member saw op_ok for it
    e = recovered(5, (1, 2))
    assert st.recovery_prelude() == [AbortDataPlane(4, "the master was lost; the group re-formed with a new one")]
    st.on_epoch(e, st.prepare_epoch(e))
    assert st.verdict_known(a) and st.verdict_known(b) and st.can_begin()
    st.verdict(a, LocalResult.OK, "", "all_reduce")  # committed, as on the member that saw op_ok
    with pytest.raises(PeerFailure) as info:
        st.verdict(b, LocalResult.OK, "", "all_reduce")
    assert info.value.lost_peers == (3,) and st.world_size == 2
    assert st.term == 2


def test_the_fence_of_the_re_formed_epoch_fails_ops_others_began() -> None:
    st = joined(me=1, ids=(1, 2), number=4)
    st.on_master_lost()
    e = recovered(5, (1, 2), fence=((0, 2),))
    st.on_epoch(e, st.prepare_epoch(e))
    for _ in range(2):
        with pytest.raises(PeerFailure):
            st.begin_op(0)
    assert st.begin_op(0).seq == 0


def test_a_vote_sent_to_the_lost_master_is_sent_again() -> None:
    st = joined(me=1, ids=(1, 2), number=4)
    k = st.vote()
    st.on_master_lost()
    r = st.resume()
    assert r is not None and r.answered == k and r.position == k + 1
    e = recovered(5, (1, 2))
    st.on_epoch(e, st.prepare_epoch(e))
    assert st.after_epoch() == [SendFrame(P.Vote(k))]
    assert st.after_epoch() == []
    st.on_round_done(P.RoundDone(k, False))
    assert st.take_round_result(k) is False and st.waiting_round is None


def test_a_sync_is_cut_off_unless_its_result_comes_first() -> None:
    st = joined(me=1, ids=(1, 2), number=4)
    st.sync_begin()
    st.sync_fetched(7, True)
    st.on_master_lost()
    r = st.resume()
    assert r is not None and (r.sync, r.sync_ok) == (7, True)
    assert not st.sync_cut_off()  # still waiting: the new master may confirm the result
    e = recovered(5, (1, 2))
    st.on_epoch(e, st.prepare_epoch(e))
    assert st.sync_cut_off() and isinstance(st.sync_failure(), PeerFailure)
    st.sync_end()
    st.sync_begin()
    assert not st.sync_cut_off()


def test_an_older_term_is_never_followed() -> None:
    st = joined(me=1, ids=(1, 2), number=4)
    st.on_master_lost()
    e = recovered(5, (1, 2), term=3)
    st.on_epoch(e, st.prepare_epoch(e))
    assert not st.accepts_term(2) and st.accepts_term(3) and st.accepts_term(0)
    with pytest.raises(Exception, match="older"):
        st.prepare_epoch(recovered(6, (1, 2), term=2))


def test_giving_up_makes_every_call_raise_timeout() -> None:
    st = joined(me=1, ids=(1, 2), number=4)
    st.on_master_lost()
    why = "the master at h:1 has been unreachable since 2026-01-01 00:00:00 UTC (600 s; ...)"
    actions = st.give_up(why, 600.0)
    assert actions and isinstance(actions[0], AbortDataPlane)
    with pytest.raises(Timeout, match="unreachable since") as info:
        st.begin_op(0)
    assert info.value.seconds == 600.0


def test_backoff_goes_round_the_list_then_waits_longer() -> None:
    b = Backoff(["a:1", "b:2"], first=0.1, cap=0.4, rng=random.Random(1))
    assert [b.address(i) for i in range(4)] == ["a:1", "b:2", "a:1", "b:2"]
    assert b.delay(0) == 0 and b.delay(1) == 0 and b.delay(3) == 0
    assert 0.05 <= b.delay(2) <= 0.1 and 0.1 <= b.delay(4) <= 0.2 and 0.2 <= b.delay(40) <= 0.4


def test_master_lists() -> None:
    assert parse_masters("h1:1, h2:2") == ("h1:1", "h2:2")
    with pytest.raises(ValueError):
        parse_masters("h1:1,,h2:2")
    with pytest.raises(ValueError):
        parse_masters("h1")
    assert combined_hash([1, 2]) != combined_hash([2, 1])


def _reconnector(dial: Any, events: list[Any], give_up: float = 0.3) -> Reconnector:
    return Reconnector(Backoff(["a:1", "b:2"], first=0.01, cap=0.02), give_up, dial,
                       on_back=lambda c, w, t: events.append(("back", c, w)) or True,
                       on_give_up=lambda why, s: events.append(("gave_up", why, s)),
                       on_refused=lambda exc: events.append(("refused", exc)), per_try=0.1)


def _wait(events: list[Any], n: int = 1) -> None:
    deadline = time.monotonic() + 10
    while len(events) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_reconnector_gives_up_naming_the_masters_and_since_when() -> None:
    tried: list[str] = []

    def dial(address: str, timeout: float) -> Any:
        tried.append(address)
        raise CCLError(f"cannot reach the master at {address}")

    events: list[Any] = []
    r = _reconnector(dial, events)
    r.start("the master at a:1 closed the connection")
    _wait(events)
    r.stop()
    kind, why, seconds = events[0]
    assert kind == "gave_up" and seconds == 0.3
    assert why.startswith("the master at a:1,b:2 has been unreachable since ") and "UTC" in why
    assert tried[:4] == ["a:1", "b:2", "a:1", "b:2"]


def test_the_reconnector_goes_on_past_a_standby_and_stops_at_a_refusal() -> None:
    answers = iter([CCLError("the master at a:1 is not active"), "welcome"])

    def dial(address: str, timeout: float) -> Any:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return SimpleNamespace(address=address), a

    events: list[Any] = []
    r = _reconnector(dial, events)
    r.start("lost")
    _wait(events)
    assert events == [("back", SimpleNamespace(address="b:2"), "welcome")]
    refusal = GroupLost("refused", cause=LostCause.EXPELLED)

    def refuse(address: str, timeout: float) -> Any:
        raise refusal

    r._dial = refuse  # type: ignore[method-assign]
    r.start("lost again")  # a second loss starts a new search
    _wait(events, 2)
    r.stop()
    assert events[1] == ("refused", refusal)
