"""Shared-state sync on the master: the pure planner and the state machine's sync rounds."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
from pyccl.master.state import GroupPhase, PeerPhase
from pyccl.master.sync import StateKey, SyncRequest, parse_keys, plan_sync
from pyccl.wire import MAX_UINT64, FrameError, decode_body, encode, get_pairs

from test_master_state import Harness, last_epoch, ring

pytestmark = pytest.mark.timeout(30)

SKIP_AHEAD = "skips ahead of the group's revision"

# The default layout: three keys sorted by name.
LAYOUT = [("a", "float32", (4,), 16), ("b", "int64", (2, 3), 48), ("c", "bfloat16", (), 2)]
H = (11, 22, 33)  # the default content


def keys(hashes=H, layout=LAYOUT) -> list[tuple[Any, ...]]:
    return [(n, d, s, b, h) for (n, d, s, b), h in zip(layout, hashes)]


def req(pid: int, revision: int = 5, hashes=H, strategy: str = "enforce_popular", layout=LAYOUT) -> SyncRequest:
    return SyncRequest(pid, strategy, revision, keys(hashes, layout), f"10.1.0.{pid}", 9000 + pid)


# ------------------------------------------------------------------ planner


def test_popular_copy_wins_and_the_minority_fetches_only_differing_keys():
    plan = plan_sync(5, [req(1), req(2), req(3, hashes=(11, 99, 33))])
    assert plan.revision == 5
    assert plan.holders == (1, 2)
    assert plan.holder_entries == ((1, "10.1.0.1", 9001), (2, "10.1.0.2", 9002))
    assert dict(plan.fetch) == {1: (), 2: (), 3: ((1, 22),)}
    assert plan.rejected == {} and plan.notes == ()
    assert plan.planned == (1, 2, 3)


def test_majority_with_other_content_beats_minority_even_if_minority_has_lowest_id():
    plan = plan_sync(None, [req(1, hashes=(1, 2, 3)), req(2), req(3)])
    assert plan.holders == (2, 3)
    assert plan.fetch[1] == ((0, 11), (1, 22), (2, 33))


def test_everyone_identical_means_no_fetches():
    plan = plan_sync(4, [req(p) for p in (3, 1, 2)])
    assert plan.revision == 5 and plan.holders == (1, 2, 3)
    assert all(f == () for f in plan.fetch.values()) and len(plan.fetch) == 3
    assert "fetches {}" in plan.describe()


def test_peer_behind_fetches_differing_keys_or_nothing():
    plan = plan_sync(5, [req(1, 6, hashes=(7, 22, 33)), req(2, 5), req(3, 5, hashes=(7, 22, 33)), req(4, 4)])
    # Highest revision wins even when more peers hold older content.
    assert plan.revision == 6 and plan.holders == (1,)
    assert plan.fetch[2] == ((0, 7),) and plan.fetch[4] == ((0, 7),)
    assert plan.fetch[3] == ()  # only behind in revision: nothing to fetch
    assert plan.rejected == {}


def test_far_behind_peer_is_accepted():
    plan = plan_sync(50, [req(1, 51), req(2, 0, hashes=(0, 0, 0))])
    assert plan.revision == 51 and plan.fetch[2] == ((0, 11), (1, 22), (2, 33))


def test_skip_ahead_is_rejected_with_the_exact_reason():
    plan = plan_sync(5, [req(1, 6), req(2, 7), req(3, 5)])
    assert plan.rejected == {
        2: "revision 7 skips ahead of the group's revision 5: advance it by exactly 1 per sync"
    }
    assert plan.revision == 6 and plan.holders == (1,)
    assert set(plan.fetch) == {1, 3}


def test_first_sync_of_a_new_group_accepts_any_revision():
    plan = plan_sync(None, [req(1, 1000), req(2, 3)])
    assert plan.rejected == {} and plan.revision == 1000 and plan.holders == (1,)


LAYOUT_EXTRA = LAYOUT + [("d", "float32", (1,), 4)]
LAYOUT_MISSING = LAYOUT[:1] + LAYOUT[2:]
LAYOUT_RENAMED = [("a", "float32", (4,), 16), ("bb", "int64", (2, 3), 48), ("c", "bfloat16", (), 2)]
LAYOUT_DTYPE = [LAYOUT[0], ("b", "int32", (2, 3), 48), LAYOUT[2]]
LAYOUT_SHAPE = [LAYOUT[0], ("b", "int64", (3, 2), 48), LAYOUT[2]]
LAYOUT_NBYTES = [LAYOUT[0], LAYOUT[1], ("c", "bfloat16", (), 4)]


@pytest.mark.parametrize(
    "layout,why",
    [
        (LAYOUT_EXTRA, "key 'd' is not in the group's state"),
        (LAYOUT_MISSING, "key 'b' of the group's state is missing"),
        (LAYOUT_RENAMED, "key 'b' of the group's state is missing"),
        (LAYOUT_DTYPE, "key 'b' has dtype 'int32' where the group's has 'int64'"),
        (LAYOUT_SHAPE, "key 'b' has shape (3, 2) where the group's has (2, 3)"),
        (LAYOUT_NBYTES, "key 'c' has 4 bytes where the group's has 2"),
    ],
)
def test_schema_mismatch_rejects_only_that_peer(layout, why):
    odd = req(2, hashes=(1,) * len(layout), layout=layout)
    plan = plan_sync(5, [req(1, hashes=(11, 22, 34)), odd, req(3)])
    assert set(plan.rejected) == {2}
    reason = plan.rejected[2]
    assert reason.endswith(why), reason
    assert "the layout of 2 of 3 peers" in reason
    assert plan.revision == 5 and set(plan.fetch) == {1, 3}
    assert plan.holders == (1,)  # 1 vs 3: one each, lowest peer id wins


def test_schema_majority_can_reject_the_lowest_peer():
    plan = plan_sync(None, [req(1, layout=LAYOUT_DTYPE), req(2), req(3)])
    assert set(plan.rejected) == {1} and plan.holders == (2, 3)


def test_schema_tie_goes_to_the_lowest_peer_id():
    plan = plan_sync(None, [req(2, layout=LAYOUT_SHAPE), req(1)])
    assert set(plan.rejected) == {2} and plan.holders == (1,)


def test_content_tie_goes_to_the_group_with_the_lowest_peer_id():
    x, y = (1, 2, 3), (4, 5, 6)
    reqs = [req(4, hashes=x), req(2, hashes=y), req(3, hashes=x), req(5, hashes=y)]
    for _ in range(5):
        random.shuffle(reqs)
        plan = plan_sync(None, reqs)
        assert plan.holders == (2, 5)
        assert plan.fetch[3] == plan.fetch[4] == ((0, 4), (1, 5), (2, 6))


def test_receive_only_never_sets_the_target_nor_holds():
    plan = plan_sync(5, [req(1, 6, hashes=(9, 9, 9), strategy="receive_only"), req(2, 5), req(3, 5)])
    assert plan.revision == 5 and plan.holders == (2, 3)
    assert plan.fetch[1] == ((0, 11), (1, 22), (2, 33))  # ahead but receive_only: takes the popular copy


def test_receive_only_outnumbering_others_does_not_make_the_popular_copy():
    plan = plan_sync(None, [req(p, hashes=(1, 1, 1), strategy="receive_only") for p in (1, 2, 3)] + [req(4)])
    assert plan.holders == (4,) and all(plan.fetch[p] == ((0, 11), (1, 22), (2, 33)) for p in (1, 2, 3))


def test_send_only_that_differs_is_left_alone_and_noted():
    plan = plan_sync(5, [req(1), req(2), req(3, 4, hashes=(11, 0, 33), strategy="send_only")])
    assert plan.fetch[3] == () and plan.holders == (1, 2)
    (note,) = plan.notes
    assert "peer 3 is send_only" in note and "1 key differ" in note and "left alone" in note


def test_send_only_can_hold_and_identical_send_only_is_not_noted():
    plan = plan_sync(5, [req(1, strategy="send_only"), req(2, strategy="send_only"), req(3, 4, hashes=(0, 0, 0))])
    assert plan.holders == (1, 2) and plan.notes == ()
    assert plan.fetch[3] == ((0, 11), (1, 22), (2, 33))


def test_no_holder_when_everyone_is_receive_only():
    plan = plan_sync(5, [req(p, strategy="receive_only") for p in (1, 2)])
    assert plan.revision is None and plan.holders == () and plan.fetch == {}
    assert set(plan.rejected) == {1, 2}
    assert "no participant can provide the shared state" in plan.rejected[1]
    assert "receive_only" in plan.rejected[1]


def test_no_holder_when_every_sender_was_rejected():
    plan = plan_sync(5, [req(1, 7), req(2, strategy="receive_only"), req(3, layout=LAYOUT_EXTRA,
                                                                           hashes=(1, 2, 3, 4))])
    assert SKIP_AHEAD in plan.rejected[1]
    assert "is not in the group's state" in plan.rejected[3]
    assert "no participant can provide" in plan.rejected[2]
    assert plan.fetch == {} and plan.revision is None


def test_empty_state_and_no_requests():
    assert plan_sync(None, []).revision is None
    plan = plan_sync(0, [SyncRequest(1, "enforce_popular", 1, ()), SyncRequest(2, "receive_only", 0, ())])
    assert plan.revision == 1 and plan.fetch == {1: (), 2: ()}


def test_request_validation():
    r = SyncRequest(1, "send_only", 0, [("x", "uint8", [2], 2, 5)])
    assert r.keys == (StateKey("x", "uint8", (2,), 2, 5),)
    with pytest.raises(ValueError, match="strategy"):
        SyncRequest(1, "popular", 0, ())
    with pytest.raises(ValueError, match="duplicate"):
        plan_sync(None, [req(1), req(1)])


def test_plan_is_deterministic_whatever_the_input_order():
    base = [req(1, 5, hashes=(1, 2, 3)), req(2, 5), req(3, 4), req(4, 5, hashes=(1, 2, 3)), req(5, 5),
            req(6, 5, strategy="receive_only", hashes=(0, 0, 0)), req(7, layout=LAYOUT_SHAPE)]
    first = plan_sync(4, base)
    for _ in range(10):
        random.shuffle(base)
        assert plan_sync(4, base) == first
    assert first.holders == (1, 4)


# ------------------------------------------------------------ key list check


def _keys_frame(entries: Any) -> dict[str, Any]:
    return {"type": "sync", "keys": entries}


GOOD_ENTRY = ["w", "float32", [2, 2], 16, 0]


def test_parse_keys_accepts_the_limits():
    entries = [[f"k{i:05d}", "d" * 16, [0] * 32, (1 << 63) - 1, (1 << 64) - 1] for i in range(65536)]
    got = parse_keys(_keys_frame(entries))
    assert len(got) == 65536 and got[0] == StateKey("k00000", "d" * 16, (0,) * 32, (1 << 63) - 1, (1 << 64) - 1)
    assert parse_keys(_keys_frame([["n" * 256, "u8", [], 0, 0]]))[0].name == "n" * 256
    assert parse_keys(_keys_frame([])) == ()


BAD_KEYS = [
    ("x", "must be a list"),
    (None, "must be a list"),
    ([GOOD_ENTRY] * 65537, "more than 65536"),
    ([["w", "float32", [2, 2], 16]], "must be [name"),
    (["w"], "must be [name"),
    ([["n" * 257, "f", [], 0, 0]], "name"),
    ([[1, "f", [], 0, 0]], "name"),
    ([["w", "", [], 0, 0]], "dtype"),
    ([["w", "d" * 17, [], 0, 0]], "dtype"),
    ([["w", 5, [], 0, 0]], "dtype"),
    ([["w", "f", [1] * 33, 0, 0]], "shape"),
    ([["w", "f", [-1], 0, 0]], "shape"),
    ([["w", "f", [True], 0, 0]], "shape"),
    ([["w", "f", [1 << 63], 0, 0]], "shape"),
    ([["w", "f", "2", 0, 0]], "shape"),
    ([["w", "f", [], -1, 0]], "nbytes"),
    ([["w", "f", [], 1.0, 0]], "nbytes"),
    ([["w", "f", [], 0, 1 << 64]], "hash"),
    ([["w", "f", [], 0, -1]], "hash"),
    ([["w", "f", [], 0, False]], "hash"),
    ([["b", "f", [], 0, 0], ["a", "f", [], 0, 0]], "not sorted"),
    ([["a", "f", [], 0, 0], ["a", "f", [], 0, 0]], "duplicate key"),
]


@pytest.mark.parametrize("entries,why", BAD_KEYS)
def test_parse_keys_rejects(entries, why):
    with pytest.raises(FrameError, match="keys") as ei:
        parse_keys(_keys_frame(entries))
    assert why in str(ei.value)
    assert len(str(ei.value)) < 300


# ------------------------------------------------------------ state machine


def sync_frame(revision: int = 5, hashes=H, strategy: str = "enforce_popular", layout=LAYOUT) -> dict[str, Any]:
    return {"type": "sync", "revision": revision, "strategy": strategy,
            "keys": [[n, d, list(s), b, h] for n, d, s, b, h in keys(hashes, layout)]}


def sync(h: Harness, c: int, revision: int = 5, hashes=H, **kw: Any) -> None:
    h.send(c, sync_frame(revision, hashes, **kw))


def sync_done(h: Harness, c: int, number: int = 1, ok: bool = True, reason: str = "") -> None:
    h.send(c, {"type": "sync_done", "sync": number, "ok": ok, "reason": reason})


def holder(h: Harness, c: int) -> list[Any]:
    return [h.pid(c), "10.0.0.1", 7000 + c]  # the data address each Harness peer gives in hello


def only(h: Harness, c: int, ftype: str) -> dict[str, Any]:
    frames = h.take(c)
    assert [f["type"] for f in frames] == [ftype], frames
    return frames[0]


def result(number: int, ok: bool, revision: int, reason: str = "") -> dict[str, Any]:
    return {"type": "sync_result", "sync": number, "ok": ok, "revision": revision, "reason": reason}


def test_round_with_three_members(caplog):
    h = Harness()
    a, b, c = h.join_group(3)
    with caplog.at_level(logging.INFO, logger="pyccl.master"):
        sync(h, a)
        assert h.info().open_sync == 1
        sync(h, b)
        assert h.inbox[a] == h.inbox[b] == [] == h.inbox[c]
        sync(h, c, hashes=(11, 22, 77))
    holders = [holder(h, a), holder(h, b)]
    plan = {"type": "sync_plan", "sync": 1, "revision": 5, "holders": holders}
    assert only(h, a, "sync_plan") == {**plan, "fetch": []}
    assert only(h, b, "sync_plan") == {**plan, "fetch": []}
    assert only(h, c, "sync_plan") == {**plan, "fetch": [[2, 33]]}
    assert "group 0 sync 1 plan: target revision 5, holders [1, 2], fetches {peer 3: 1 key}" in caplog.text
    sync_done(h, a)
    sync_done(h, b)
    assert h.inbox[a] == h.inbox[b] == [] == h.inbox[c]
    assert h.info().revision is None
    sync_done(h, c)
    for m in (a, b, c):
        assert h.take(m) == [result(1, True, 5)]
    info = h.info()
    assert info.revision == 5 and info.open_sync is None and info.phase is GroupPhase.RUNNING
    assert not h.closed


def test_group_revision_is_remembered_for_the_next_round():
    h = Harness()
    a, b, c = h.join_group(3)
    for m in (a, b, c):
        sync(h, m, 5)
    for m in (a, b, c):
        h.take(m)
        sync_done(h, m)
    for m in (a, b, c):
        h.take(m)
    assert h.info().revision == 5
    # Round 2: a and b advance by one; c skips ahead and is told so at once.
    sync(h, a, 6, hashes=(1, 2, 3))
    sync(h, c, 7)
    assert h.inbox[c] == []  # the plan (and its rejections) waits for every participant
    sync(h, b, 6, hashes=(1, 2, 3))
    (res,) = h.take(c)
    assert res == result(2, False, 7, "revision 7 skips ahead of the group's revision 5: "
                                      "advance it by exactly 1 per sync")
    assert only(h, a, "sync_plan")["revision"] == 6 and only(h, b, "sync_plan")["holders"] == [
        holder(h, a), holder(h, b)]
    sync_done(h, a, 2)
    sync_done(h, b, 2)
    assert h.take(a) == [result(2, True, 6)] and h.take(b) == [result(2, True, 6)]
    assert h.inbox[c] == [] and h.info().revision == 6 and c not in h.closed


def test_behind_peer_gets_fetch_list_and_the_groups_revision():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a, 9, hashes=(1, 2, 3))
    sync(h, b, 8)
    assert only(h, b, "sync_plan")["fetch"] == [[0, 1], [1, 2], [2, 3]]
    assert only(h, a, "sync_plan")["holders"] == [holder(h, a)]
    sync_done(h, a)
    sync_done(h, b)
    assert h.take(b) == [result(1, True, 9)]


def test_rejected_schema_gets_result_at_once_others_go_on(caplog):
    h = Harness()
    a, b, c = h.join_group(3)
    sync(h, a)
    sync(h, b, hashes=(1, 1, 1, 1), layout=LAYOUT_EXTRA)
    with caplog.at_level(logging.WARNING, logger="pyccl.master"):
        sync(h, c)
    (res,) = h.take(b)
    assert res["type"] == "sync_result" and res["ok"] is False and res["revision"] == 5
    assert "key 'd' is not in the group's state" in res["reason"]
    assert "rejected peer 2" in caplog.text and "key 'd'" in caplog.text
    assert only(h, a, "sync_plan")["holders"] == [holder(h, a), holder(h, c)]
    h.take(c)
    # b got its answer: a sync_done from it is a protocol error.
    sync_done(h, b)
    assert "no transfer planned" in h.take(b)[-1]["reason"] and b in h.closed
    h.take(a), h.take(c)
    sync_done(h, a)
    sync_done(h, c)
    assert h.take(a) == [result(1, True, 5)] and h.take(c) == [result(1, True, 5)]


def test_failed_transfer_reports_its_reason_and_revision_still_advances():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a)
    sync(h, b, 4, hashes=(0, 22, 33))
    h.take(a), h.take(b)
    sync_done(h, b, ok=False, reason="holder 1 died; no holder left")
    sync_done(h, a)
    assert h.take(b) == [result(1, False, 5, "holder 1 died; no holder left")]
    assert h.take(a) == [result(1, True, 5)]
    assert h.info().revision == 5


def test_revision_unchanged_when_nobody_finishes_ok():
    h = Harness()
    a = h.join_group(1)[0]
    sync(h, a, 3)
    h.take(a)
    sync_done(h, a, ok=False, reason="x")
    assert h.take(a) == [result(1, False, 3, "x")]
    assert h.info().revision is None


def test_holder_dying_after_the_plan_does_not_stop_the_round():
    h = Harness()
    a, b, c = h.join_group(3)
    sync(h, a)
    sync(h, b)
    sync(h, c, 4, hashes=(0, 0, 0))
    for m in (a, b, c):
        assert h.types(m) == ["sync_plan"]
    sync_done(h, a)
    h.disconnect(a)  # a holder dies (after its sync_done; its report no longer counts)
    assert h.types(b) == h.types(c) == ["drain"]
    h.drained(b)  # the epoch drains as usual, independently of the sync round
    h.drained(c)
    assert ring(last_epoch(h.take(b))) == [2, 3]
    h.take(c)
    sync_done(h, b)
    assert h.inbox[b] == h.inbox[c] == []
    sync_done(h, c)
    assert h.take(b) == h.take(c) == [result(1, True, 5)]
    assert h.info().revision == 5 and h.info().open_sync is None


def test_holder_dying_before_its_sync_done():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a)
    sync(h, b, hashes=(0, 0, 0))
    h.take(a), h.take(b)
    h.disconnect(a)
    assert h.types(b) == ["drain"]
    sync_done(h, b, ok=False, reason="every holder failed")
    assert h.take(b) == [result(1, False, 5, "every holder failed")]


def test_last_awaited_sync_done_missing_because_of_death_finishes_round():
    h = Harness()
    a, b, c = h.join_group(3)
    for m in (a, b, c):
        sync(h, m)
    for m in (a, b, c):
        assert h.types(m) == ["sync_plan"]
    sync_done(h, a)
    sync_done(h, b)
    h.send(c, {"type": "bye"})
    assert h.take(a) == [{"type": "drain", "epoch": h.info().epoch, "kind": "leave",
                          "reason": "peer 3 is gone: bye"}, result(1, True, 5)]
    assert h.take(b)[-1] == result(1, True, 5)


def test_participant_dying_before_its_sync_means_a_plan_without_it():
    h = Harness()
    a, b, c = h.join_group(3)
    sync(h, a)
    sync(h, b, 4, hashes=(0, 22, 33))
    h.disconnect(c)
    fa, fb = h.take(a), h.take(b)
    assert [f["type"] for f in fa] == ["drain", "sync_plan"]
    assert fb[1] == {"type": "sync_plan", "sync": 1, "revision": 5, "fetch": [[0, 11]], "holders": [holder(h, a)]}
    sync_done(h, a)
    sync_done(h, b)
    assert h.take(a)[-1] == h.take(b)[-1] == result(1, True, 5)


def test_silent_participant_expelled_by_heartbeat_is_left_out():
    h = Harness()
    a, b, c = h.join_group(3)
    h.now += 3
    sync(h, a)
    sync(h, b)
    h.tick(h.now + 2)  # c silent for 5 s
    assert c in h.closed and "heartbeat" in h.closed[c]
    assert [f["type"] for f in h.take(a)] == ["drain", "sync_plan"]


def test_every_participant_gone_ends_the_round():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a)
    h.disconnect(a)
    h.disconnect(b)
    assert h.info() is None  # group forgotten; its sync state with it
    c = h.hello()
    h.take(c)
    sync(h, c, 42)
    assert only(h, c, "sync_plan")["sync"] == 1  # a fresh group: any revision, numbering restarts


def test_round_ends_when_the_only_reporter_dies():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a)
    h.disconnect(a)
    h.take(b)
    assert h.info().open_sync == 1  # b is still awaited
    sync(h, b)
    assert only(h, b, "sync_plan")["holders"] == [holder(h, b)]


def test_single_member_and_empty_state():
    h = Harness()
    a = h.join_group(1)[0]
    h.send(a, {"type": "sync", "revision": 0, "strategy": "enforce_popular", "keys": []})
    assert h.take(a) == [{"type": "sync_plan", "sync": 1, "revision": 0, "fetch": [],
                          "holders": [holder(h, a)]}]
    sync_done(h, a)
    assert h.take(a) == [result(1, True, 0)]


def test_no_holder_rejects_everyone():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a, strategy="receive_only")
    sync(h, b, strategy="receive_only")
    for m in (a, b):
        (res,) = h.take(m)
        assert res["ok"] is False and "no participant can provide" in res["reason"]
    assert h.info().open_sync is None and h.info().revision is None
    sync(h, a)  # the next call opens round 2
    assert h.info().open_sync == 2


def test_send_only_differing_peer_gets_empty_fetch(caplog):
    h = Harness()
    a, b, c = h.join_group(3)
    sync(h, a)
    sync(h, b)
    with caplog.at_level(logging.WARNING, logger="pyccl.master"):
        sync(h, c, hashes=(0, 0, 0), strategy="send_only")
    assert only(h, c, "sync_plan")["fetch"] == []
    assert "peer 3 is send_only" in caplog.text


def test_sync_is_accepted_while_the_epoch_drains():
    h = Harness()
    a, b, c = h.join_group(3)
    h.send(a, {"type": "failed", "epoch": h.info().epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": "x"})
    for m in (a, b, c):
        assert h.types(m) == ["drain"]
        sync(h, m)
    assert h.info().phase is GroupPhase.DRAINING
    for m in (a, b, c):
        assert h.types(m) == ["sync_plan"]
        h.drained(m)
        sync_done(h, m)
    assert [f["type"] for f in h.take(a)] == ["epoch", "sync_result"]


def test_joiner_admitted_during_a_round_waits_for_the_next_one(caplog):
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a)  # opens sync 1 with a and b
    j = h.hello()
    h.take(j)
    k = h.admit_round([a, b])
    assert h.st.peer_phase(j) is PeerPhase.MEMBER
    h.vote(j)
    h.take(a), h.take(b), h.take(j)
    assert h.st._conns[j].next_round == k + 1
    with caplog.at_level(logging.INFO, logger="pyccl.master"):
        sync(h, j, 0, hashes=(0, 0, 0))  # not part of sync 1: queued for the next round
    assert "waits for the next sync round" in caplog.text
    assert h.inbox[j] == []
    sync(h, b)
    # sync 1 is planned without j
    assert only(h, a, "sync_plan")["holders"] == [holder(h, a), holder(h, b)]
    h.take(b)
    assert h.inbox[j] == []
    sync_done(h, a)
    sync_done(h, b)
    assert h.take(a) == h.take(b) == [result(1, True, 5)]
    # sync 2 opened with j's report already in; it includes every member
    assert h.info().open_sync == 2 and h.inbox[j] == []
    sync(h, a, 6, hashes=(1, 2, 3))
    sync(h, b, 6, hashes=(1, 2, 3))
    plan_j = only(h, j, "sync_plan")
    assert plan_j["sync"] == 2 and plan_j["revision"] == 6
    assert plan_j["fetch"] == [[0, 1], [1, 2], [2, 3]]
    for m in (a, b, j):
        h.take(m)
        sync_done(h, m, 2)
    assert h.take(j) == [result(2, True, 6)]
    assert h.info().revision == 6


def test_joiner_syncing_after_round_ends_opens_the_next_one():
    h = Harness()
    a = h.join_group(1)[0]
    sync(h, a)
    j = h.hello()
    h.take(j)
    h.admit_round([a])
    h.take(a), h.take(j)
    # j joined after the plan; sync 1 still waits for a's sync_done
    sync(h, j, 0, hashes=(0, 0, 0))
    assert h.inbox[j] == []
    sync_done(h, a)
    assert h.take(a) == [result(1, True, 5)]
    assert h.info().open_sync == 2
    sync(h, a, 6)
    assert only(h, j, "sync_plan")["fetch"] == [[0, 11], [1, 22], [2, 33]]


def test_rejected_peer_calling_again_is_queued_for_the_next_round():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a)
    sync(h, b, layout=LAYOUT_DTYPE)  # 1 vs 1: a's layout wins (lowest peer id)
    assert only(h, b, "sync_result")["ok"] is False
    h.take(a)
    sync(h, b)  # retry with the right layout while sync 1 still waits for a
    assert b not in h.closed and h.inbox[b] == []
    sync(h, b)  # but not twice
    assert "previous 'sync' has no result yet" in h.take(b)[-1]["reason"]
    sync_done(h, a)
    assert h.take(a)[-1] == result(1, True, 5)


def test_rejected_peer_retry_joins_round_two():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a)
    sync(h, b, layout=LAYOUT_DTYPE)
    h.take(a), h.take(b)
    sync(h, b, 4, hashes=(0, 22, 33))
    sync_done(h, a)
    h.take(a)
    sync(h, a, 5)
    assert only(h, b, "sync_plan") == {"type": "sync_plan", "sync": 2, "revision": 5, "fetch": [[0, 11]],
                                       "holders": [holder(h, a)]}


def test_second_sync_without_result_is_a_protocol_error():
    h = Harness()
    a, b, c = h.join_group(3)
    sync(h, a)
    sync(h, a)
    assert "no result yet" in h.take(a)[-1]["reason"] and a in h.closed
    assert h.types(b) == h.types(c) == ["drain"]
    sync(h, b)
    sync(h, c)
    assert h.types(b) == h.types(c) == ["sync_plan"]
    sync(h, b)  # planned, no result yet
    assert "no result yet" in h.take(b)[-1]["reason"] and b in h.closed
    assert h.inbox[c] == []  # b died during the running drain: nothing new for c
    sync_done(h, c)
    assert h.take(c) == [result(1, True, 5)]


@pytest.mark.parametrize(
    "frame,why",
    [
        ({"type": "sync_done", "sync": 1, "ok": True, "reason": ""}, "no transfer planned"),  # nothing open
        ({"type": "sync_done", "sync": 1, "ok": 1, "reason": ""}, "ok"),
        ({"type": "sync_done", "sync": 1, "ok": True}, "reason"),
        ({"type": "sync_done", "sync": 1, "ok": True, "reason": "r" * 1025}, "reason"),
        ({"type": "sync_done", "sync": -1, "ok": True, "reason": ""}, "sync"),
        ({"type": "sync_done", "ok": True, "reason": ""}, "sync"),
    ],
)
def test_bad_sync_done_expels_only_the_sender(frame, why):
    h = Harness()
    a, b = h.join_group(2)
    h.send(a, frame)
    assert why in h.take(a)[-1]["reason"] and a in h.closed and b not in h.closed


def test_sync_done_checks_round_number_duplicates_and_timing():
    h = Harness()
    a, b, c = h.join_group(3)
    sync(h, a)
    sync_done(h, a)  # the round is still collecting
    assert "no transfer planned" in h.take(a)[-1]["reason"]
    sync(h, b)
    sync(h, c)
    h.take(b), h.take(c)
    sync_done(h, b, number=2)
    assert "sync 2" in h.take(b)[-1]["reason"] and b in h.closed
    sync_done(h, c)
    assert h.take(c)[-1] == result(1, True, 5)
    assert h.info().revision == 5


def test_duplicate_sync_done_is_rejected():
    h = Harness()
    a, b = h.join_group(2)
    sync(h, a)
    sync(h, b)
    h.take(a), h.take(b)
    sync_done(h, a)
    sync_done(h, a)
    assert "duplicate 'sync_done'" in h.take(a)[-1]["reason"]
    assert h.types(b) == ["drain"]
    sync_done(h, b)
    assert h.take(b) == [result(1, True, 5)]


def _bad_syncs() -> list[tuple[dict[str, Any], str]]:
    good = sync_frame()
    return [
        ({**good, "revision": -1}, "revision"),
        ({**good, "revision": "5"}, "revision"),
        ({k: v for k, v in good.items() if k != "revision"}, "revision"),
        ({**good, "strategy": "popular"}, "strategy"),
        ({**good, "strategy": None}, "strategy"),
        ({k: v for k, v in good.items() if k != "keys"}, "keys"),
        ({**good, "keys": [["b", "f", [], 0, 0], ["a", "f", [], 0, 0]]}, "not sorted"),
        ({**good, "keys": [["a", "f", [], 0, 1 << 64]]}, "hash"),
        ({**good, "keys": [["a" * 100000, "f", [], 0, 0]]}, "name"),
        ({**good, "keys": [GOOD_ENTRY] * 70000}, "more than 65536"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_syncs())))
def test_malformed_sync_expels_only_the_sender(index, caplog):
    h = Harness()
    a, b, c = h.join_group(3)
    sync(h, a)  # a round is open; b's bad frame must not disturb it
    frame, why = _bad_syncs()[index]
    with caplog.at_level(logging.WARNING, logger="pyccl.master"):
        h.send(b, frame)
    (err,) = h.take(b)
    assert err["type"] == "error" and why in err["reason"], err
    assert b in h.closed and a not in h.closed and c not in h.closed
    assert "rejected frame from" in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 2000
    assert h.types(a) == h.types(c) == ["drain"]
    sync(h, c)
    assert h.types(a) == h.types(c) == ["sync_plan"]


@pytest.mark.parametrize("ftype", ["sync", "sync_done"])
def test_sync_frames_from_pending_peer_are_rejected(ftype):
    h = Harness()
    a = h.join_group(1)[0]
    p = h.hello()
    h.take(p)
    h.send(p, {**sync_frame(), "type": ftype})
    assert p in h.closed and "not allowed" in h.take(p)[0]["reason"]
    assert h.inbox[a] == [] and h.info().open_sync is None


def test_groups_sync_independently():
    h = Harness()
    a = h.join_group(1, group=0)[0]
    x, y = h.join_group(2, group=1)
    sync(h, a, 3)
    assert h.types(a) == ["sync_plan"]
    sync(h, x, 9)
    assert h.inbox[x] == [] and h.st.group_info(1).open_sync == 1
    sync(h, y, 9)
    assert h.types(x) == ["sync_plan"]


def test_logs_plan_info_and_rejection_warning(caplog):
    h = Harness()
    a, b, c = h.join_group(3)
    with caplog.at_level(logging.INFO, logger="pyccl.master"):
        sync(h, a)
        sync(h, b, hashes=(1, 22, 33))
        sync(h, c, layout=LAYOUT_SHAPE)
    plan = [r for r in caplog.records if "plan:" in r.getMessage()]
    assert len(plan) == 1 and plan[0].levelno == logging.INFO
    assert "target revision 5, holders [1], fetches {peer 2: 1 key}, 1 rejected" in plan[0].getMessage()
    rej = [r for r in caplog.records if "rejected peer 3" in r.getMessage()]
    assert len(rej) == 1 and rej[0].levelno == logging.WARNING
    assert "shape (3, 2)" in rej[0].getMessage()


def test_full_64_bit_hashes_survive_the_wire_and_the_plan():
    h = Harness()
    a, b = h.join_group(2)
    top = (MAX_UINT64, 1 << 63, 0)
    sync(h, a, 1, hashes=top)
    frame = sync_frame(0, hashes=(1, 2, 3))
    h.send(b, decode_body(encode(frame)[4:]))  # what the server hands over after msgpack
    plan = only(h, b, "sync_plan")
    assert plan["fetch"] == [[0, MAX_UINT64], [1, 1 << 63], [2, 0]]
    # A peer checks `fetch` with get_pairs; hashes need the full 64-bit range there.
    wire_plan = decode_body(encode(plan)[4:])
    assert get_pairs(wire_plan, "fetch", 65536, hi_first=2, hi_second=MAX_UINT64) == [
        (0, MAX_UINT64), (1, 1 << 63), (2, 0)]
    with pytest.raises(FrameError):
        get_pairs(wire_plan, "fetch", 65536, hi_first=2)  # default bound is 2**63 - 1


def test_sync_round_through_the_real_server():
    from pyccl.master import Master

    from test_master_server import make_group

    m = Master(host="127.0.0.1", port=0, heartbeat_timeout=5.0)
    m.start()
    try:
        a, b, _ = make_group(m.address)
        a.send(sync_frame(3, hashes=(MAX_UINT64, 2, 3)))
        b.send(sync_frame(2))
        pa, pb = a.expect("sync_plan", sync=1, revision=3), b.expect("sync_plan", sync=1, revision=3)
        assert pa["fetch"] == [] and pb["fetch"] == [[0, MAX_UINT64], [1, 2], [2, 3]]
        assert pa["holders"] == pb["holders"] == [[a.peer_id, "127.0.0.1", 9000]]
        a.send({"type": "sync_done", "sync": 1, "ok": True, "reason": ""})
        b.send({"type": "sync_done", "sync": 1, "ok": True, "reason": ""})
        assert a.expect("sync_result") == b.expect("sync_result") == result(1, True, 3)
        a.close()
        b.close()
    finally:
        m.stop()
