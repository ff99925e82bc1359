"""Standby masters on loopback: the active master is SIGKILLed and the
standby (``pyccl master --standby-of``) takes over the run; a frozen master
that comes back after the standby took over steps down and new peers join
the standby's group."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from failover_helpers import MasterProc, free_port, trainer
from mp_helpers import PeerProcs
from test_failover_mp import HB, _check_run, _joiner, _member


def _pair() -> tuple[MasterProc, MasterProc]:
    a = MasterProc(free_port(), heartbeat_timeout=HB, hold=HB).start()
    b_port = free_port()
    b = MasterProc(b_port, heartbeat_timeout=HB, extra=("--standby-of", a.address)).start()
    return a, b


@pytest.mark.timeout(180)
def test_the_standby_takes_over_when_the_master_is_killed() -> None:
    a, b = _pair()
    masters = f"{a.address},{b.address}"
    try:
        with PeerProcs() as procs:
            for i in range(3):
                procs.start(i, trainer, masters, 3, 10, 1 << 20, True, 0.0)
            procs.gather("ready", range(3), timeout=60, ignore=("step", "syncing"))
            seen: dict[int, int] = {}
            logs: dict[int, Any] = {}
            while min(seen.get(i, -1) for i in range(3)) < 3:
                kind, idx, payload = procs.get(60, ("step", "syncing", "result"))
                if kind == "step":
                    seen[idx] = payload
            killed = a.kill()
            while len(logs) < 3:
                kind, idx, payload = procs.get(120, ("step", "syncing", "result"))
                if kind == "result":
                    logs[idx] = payload
            procs.join(range(3), 30)
        assert "taking over" in b.text() and "re-formed at epoch" in b.text()
        rec = _check_run(logs, [killed])
        print(f"recovery after SIGKILL of the active master, standby takeover: {[f'{r:.2f}' for r in rec]} s")
    finally:
        a.stop()
        b.stop()


@pytest.mark.timeout(180)
def test_a_master_returning_after_the_takeover_steps_down() -> None:
    a, b = _pair()
    masters = f"{a.address},{b.address}"
    try:
        with PeerProcs() as procs:
            for i in range(2):
                procs.start(i, _member, masters, 400)
            procs.gather("ready", range(2), timeout=60, ignore=("step",))
            a.signal(signal.SIGSTOP)  # frozen, or cut off: its peers and its standby hear nothing
            b.wait_log("taking over", 30)
            b.wait_log("re-formed at epoch", 30)
            a.signal(signal.SIGCONT)
            a.wait_log("steps down", 30)  # probed by the master that replaced it
            procs.start(2, _joiner, masters)  # tries the old master first: refused, goes on to the standby
            kind, _, world = procs.get(60, ("admitted",), ignore=("step", "connecting"))
            assert world == 3
            kind, idx, world = procs.get(60, ("result",), ignore=("step",))
            assert (idx, world) == (2, 3)
        assert "admitted to group" in b.text()
        assert a.text().count("admitted to group") == 2  # only the two first members, before the freeze
    finally:
        a.stop()
        b.stop()
        time.sleep(0)
