"""Standby masters, pure parts (pyccl/master/standby.py and the probe
handling of MasterState): when a standby takes over, when a master steps
down, and that only a proven probe can make it."""

from __future__ import annotations

import pytest
from pyccl import protocol as P
from pyccl.master.standby import Decision, Watcher, make_probe
from pyccl.master.state import MasterState

from test_master_state import TIMEOUT, Harness

pytestmark = pytest.mark.timeout(30)


def test_a_standby_takes_over_only_after_a_heartbeat_timeout_without_an_active_answer() -> None:
    w = Watcher(timeout=5.0)
    assert w.on_answer(0.0, P.Standing(3, True), 0, False) is Decision.NONE
    assert w.on_silence(4.0, False) is Decision.NONE
    assert w.on_answer(4.5, P.Standing(3, False), 0, False) is Decision.NONE  # alive but passive: no alibi
    assert w.on_silence(5.0, False) is Decision.ACTIVATE
    assert w.takeover_term(0) == 4


def test_a_standby_that_never_heard_the_master_waits_a_timeout_from_its_first_probe() -> None:
    w = Watcher(timeout=5.0)
    assert w.on_silence(10.0, False) is Decision.NONE
    assert w.on_silence(15.0, False) is Decision.ACTIVATE and w.takeover_term(0) == 2


def test_an_active_prober_steps_down_before_a_higher_term() -> None:
    w = Watcher(timeout=5.0)
    assert w.on_answer(0.0, P.Standing(2, True), 2, True) is Decision.NONE
    assert w.on_answer(1.0, P.Standing(3, True), 2, True) is Decision.STEP_DOWN
    assert w.on_silence(100.0, True) is Decision.NONE  # an active master never "takes over"


def _probe(h: Harness, frame: P.Probe) -> dict:
    c = h.connect()
    h.send(c, frame.to_wire())
    frames = h.take(c)
    assert c in h.closed
    return frames[0]


def test_a_probe_is_answered_and_an_active_higher_term_makes_the_master_step_down() -> None:
    h = Harness()
    conns = h.join_group(2)
    assert _probe(h, make_probe(None, 0, False, "b:1", b"n" * 32)) == {"type": "standing", "term": 1,
                                                                       "active": True}
    assert h.st.passive is None  # a passive prober changes nothing
    assert _probe(h, make_probe(None, 5, True, "b:1", b"n" * 32))["active"] is True
    assert h.st.passive is not None and h.st.watch_address == "b:1"
    for c in conns:
        assert h.take(c)[-1]["kind"] == "standby" and c in h.closed
    assert _probe(h, make_probe(None, 0, False, "b:1", b"n" * 32)) == {"type": "standing", "term": 1,
                                                                       "active": False}


def test_with_a_secret_only_a_proven_probe_is_answered() -> None:
    h = Harness()
    h.st = MasterState(heartbeat_timeout=TIMEOUT, secret=b"k")
    forged = make_probe(b"other", 9, True, "b:1", b"n" * 32)
    c = h.connect()
    h.send(c, forged.to_wire())
    assert h.take(c)[-1]["kind"] == "auth" and h.st.passive is None
    assert _probe(h, make_probe(b"k", 9, True, "b:1", b"n" * 32))["type"] == "standing"
    assert h.st.passive is not None


def test_a_standby_refuses_peers_until_activated() -> None:
    h = Harness()
    h.st = MasterState(heartbeat_timeout=TIMEOUT, standby=True, recovery_hold=1.0)
    a = h.hello()
    assert h.take(a)[-1]["kind"] == "standby" and a in h.closed
    h.st.activate(4, h.now)
    b = h.hello()
    assert [f["type"] for f in h.take(b)] == ["welcome"]  # held: members may be re-registering
    h.tick(h.now + 1.0)
    frames = h.take(b)
    assert frames[-1]["type"] == "epoch" and frames[-1]["term"] == 4
