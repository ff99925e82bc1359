"""A network partition between two masters, half of the peers on each side
(loopback, :class:`partition_proxy.PartitionProxy` on every path that crosses
it). The old master keeps two of four members, the standby gets the other
two: neither side may go on alone (two groups would commit different
results for the same revision), so both wait; when the partition heals the
old master steps down before the standby's higher term and the group
re-forms there with all four. Checked: every result exact, every peer saw
the same outcomes and the same shared-state bytes at every revision, and
no peer finished a step while the partition lasted."""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest

from failover_helpers import MasterProc, free_port, trainer
from mp_helpers import PeerProcs
from partition_proxy import PartitionProxy
from test_failover_mp import HB, _check_run

WORLD = 4


@pytest.mark.timeout(240)
def test_a_partition_with_half_the_peers_on_each_side_forks_nothing() -> None:
    a = MasterProc(free_port(), heartbeat_timeout=HB, hold=HB).start()
    to_a = PartitionProxy(("127.0.0.1", a.port))  # the standby's side reaches the old master through it
    b = MasterProc(free_port(), heartbeat_timeout=HB, extra=("--standby-of", to_a.address)).start()
    to_b = PartitionProxy(("127.0.0.1", b.port))  # the old master's side reaches the standby through it
    masters = [f"{a.address},{to_b.address}"] * 2 + [f"{to_a.address},{b.address}"] * 2
    try:
        with PeerProcs() as procs:
            for i in range(WORLD):
                procs.start(i, trainer, masters[i], WORLD, 14, 1 << 16, True, 0.1)
            procs.gather("ready", range(WORLD), timeout=60, ignore=("step", "syncing"))
            seen: dict[int, int] = {}
            logs: dict[int, Any] = {}

            def pump(until: float) -> None:
                while time.monotonic() < until:
                    try:
                        kind, idx, payload = procs.q.get(timeout=max(0.05, until - time.monotonic()))
                    except queue.Empty:
                        return
                    assert kind != "error", f"peer {idx} failed:\n{payload}"
                    if kind == "step":
                        seen[idx] = payload
                    elif kind == "result":
                        logs[idx] = payload

            while min(seen.get(i, -1) for i in range(WORLD)) < 3:
                pump(time.monotonic() + 0.5)
            to_a.cut()
            to_b.cut()
            cut_at = time.time()
            pump(time.monotonic() + 2 * HB)  # both sides notice; steps begun before the cut may end
            during = dict(seen)
            pump(time.monotonic() + 3 * HB)
            assert seen == during, f"a side went on alone during the partition: {during} -> {seen}"
            b.wait_log("waiting for a majority", 10)
            a.wait_log("a standby may have taken over", 10)
            to_a.heal()
            to_b.heal()
            healed_at = time.time()
            while len(logs) < WORLD:
                kind, idx, payload = procs.get(60, ("step", "syncing", "result"))
                if kind == "result":
                    logs[idx] = payload
            procs.join(range(WORLD), 30)
        assert "steps down" in a.text() and "re-formed at epoch" in b.text()
        _check_run(logs, [])
        for idx, log in logs.items():
            assert not [e for e in log if e[0] == "ok" and cut_at + 2 * HB < e[4] < healed_at], idx
    finally:
        for m in (a, b):
            m.stop()
        to_a.close()
        to_b.close()
