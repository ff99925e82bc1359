"""Split brain, pure parts: a standby that took over re-forms a group only
from a majority of its latest epoch, and a master a standby watches shrinks
a group to half or less only while the standby's probes say it has not
taken over (docs/architecture.md, "How far split brain is excluded")."""

from __future__ import annotations

import pytest
from pyccl.master.standby import make_probe
from pyccl.master.state import MasterState

from test_master_recovery import rejoin
from test_master_state import TIMEOUT, Harness, last_epoch, ring

pytestmark = pytest.mark.timeout(30)

FOUR = (1, 2, 3, 4)


def _standby_took_over() -> Harness:
    h = Harness()
    h.st = MasterState(heartbeat_timeout=TIMEOUT, standby=True)
    h.st.activate(4, h.now)
    return h


def _wait(h: Harness, conns: list[int], seconds: float) -> None:
    """Let ``seconds`` pass in steps, the given peers heartbeating."""
    end = h.now + seconds
    while h.now < end:
        h.now = min(end, h.now + TIMEOUT / 3)
        for c in conns:
            h.send(c, {"type": "heartbeat"})
        h.tick(h.now)


def test_a_standby_that_took_over_waits_for_a_majority_of_the_last_epoch() -> None:
    h = _standby_took_over()
    half = [rejoin(h, pid, members=FOUR) for pid in (1, 2)]
    _wait(h, half, 3 * TIMEOUT)  # two of four: the other two may run under the old master
    for c in half:
        assert h.types(c) == ["welcome"] and c not in h.closed
    assert h.info().members == ()
    third = rejoin(h, 3, members=FOUR)
    _wait(h, [*half, third], TIMEOUT)  # three of four: a majority, re-formed without the fourth
    assert ring(last_epoch(h.take(third))) == [1, 2, 3] and h.info().members == (1, 2, 3)


def test_a_master_restarted_on_its_own_address_needs_no_majority() -> None:
    h = Harness()
    half = [rejoin(h, pid, members=FOUR) for pid in (1, 2)]
    _wait(h, half, TIMEOUT)
    assert ring(last_epoch(h.take(half[0]))) == [1, 2]


def _lose_two_of_four(h: Harness, conns: list[int]) -> list[int]:
    survivors, lost = conns[:2], conns[2:]
    for c in lost:
        h.disconnect(c)
    for c in survivors:
        assert "drain" in h.types(c)
        h.drained(c)
    return survivors


def _probe(h: Harness, silence: float = 0.0, sent_after: float = 0.0) -> None:
    """A passive standby's probe, ``silence`` s after it last heard this master
    active, arriving ``sent_after`` s after its connection was accepted."""
    c = h.connect()
    h.now += sent_after
    h.send(c, make_probe(None, 0, False, "standby:1", b"n" * 32, silence).to_wire())
    assert h.types(c) == ["standing"] and c in h.closed


def test_a_watched_master_without_probes_keeps_half_a_group_waiting_until_a_probe_returns() -> None:
    h = Harness()
    conns = h.join_group(4)
    _probe(h)
    _wait(h, conns, TIMEOUT)  # the standby's probes stop: it may have taken over by now
    survivors = _lose_two_of_four(h, conns)
    _wait(h, survivors, 2 * TIMEOUT)
    for c in survivors:
        assert h.types(c) == [] and c not in h.closed  # waiting, no epoch without the other half
    _probe(h, sent_after=TIMEOUT)  # a probe held up in the network says nothing about now
    _probe(h, silence=TIMEOUT)  # a standby about to take over: no lease left
    for c in survivors:
        assert h.types(c) == []
    _probe(h)  # the standby hears this master again: nobody took over
    for c in survivors:
        assert ring(last_epoch(h.take(c))) == [h.pid(s) for s in survivors]


def test_a_watched_master_with_fresh_probes_shrinks_as_usual() -> None:
    h = Harness()
    conns = h.join_group(4)
    _probe(h)
    survivors = _lose_two_of_four(h, conns)
    assert ring(last_epoch(h.take(survivors[0]))) == [h.pid(s) for s in survivors]


def test_a_watched_master_without_probes_still_loses_fewer_than_half() -> None:
    h = Harness()
    conns = h.join_group(3)
    _probe(h)
    _wait(h, conns, 2 * TIMEOUT)
    h.disconnect(conns[2])
    for c in conns[:2]:
        assert "drain" in h.types(c)
        h.drained(c)
    assert ring(last_epoch(h.take(conns[0]))) == [h.pid(c) for c in conns[:2]]


def test_a_sync_round_of_half_a_group_waits_like_its_epoch() -> None:
    h = Harness()
    conns = h.join_group(4)
    _probe(h)
    _wait(h, conns, 2 * TIMEOUT)
    for c in conns:
        h.send(c, {"type": "sync", "revision": 0, "strategy": "enforce_popular", "keys": []})
    assert all(h.types(c) == ["sync_plan"] for c in conns)
    survivors = _lose_two_of_four(h, conns)
    for c in survivors:
        h.send(c, {"type": "sync_done", "sync": 1, "ok": True, "reason": ""})
    assert all(h.types(c) == [] for c in survivors)  # no revision committed by half of the group
    _probe(h)
    for c in survivors:
        assert h.types(c) == ["epoch", "sync_result"]
