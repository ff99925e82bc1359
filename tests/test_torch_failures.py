"""Failure semantics of the torch backend: a dead or hung rank never hangs
or crashes the others.

Three ranks train DDP (plus an async all_reduce per step) on backend="pyccl";
the test kills (SIGKILL) or stops (SIGSTOP) one of them. Every survivor's
pending collective (DDP's bucket all-reduce inside backward, or the async
all_reduce) must raise a RuntimeError naming pyccl and the lost rank within
2 s of a SIGKILL (within the heartbeat timeout + 1 s of a SIGSTOP), the next
collective must raise at once, and destroy_process_group() must return.
Killing rank 0 takes the in-process master with it: the survivors must say
so (and name rank 0).
"""

from __future__ import annotations

import signal
import time

import pytest

pytest.importorskip("torch")

import torch_workers
from mp_helpers import PeerProcs
from torch_mp import free_port, launch

WORLD = 3


def _collect(pp: PeerProcs, ranks: list[int], kinds: tuple[str, ...], timeout: float) -> dict:
    want = {(k, r) for k in kinds for r in ranks}
    got: dict = {}
    deadline = time.monotonic() + timeout
    while want - set(got):
        kind, rank, payload = pp.get(max(0.01, deadline - time.monotonic()), kinds, ignore=("ready",))
        got[(kind, rank)] = payload
    return got


def _run(victim: int, sig: int, hb_timeout: float, budget: float) -> None:
    with PeerProcs() as pp:
        launch(pp, WORLD, torch_workers.failure_body, free_port(), "ddp", hb_timeout)
        pp.gather("ready", range(WORLD), 60)
        time.sleep(0.3)
        t_signal = time.time()
        pp.signal(victim, sig)
        pp.expected_dead.add(victim)
        survivors = [r for r in range(WORLD) if r != victim]
        msgs = _collect(pp, survivors, ("failed", "destroyed"), budget + 30)
        for rank in survivors:
            res = msgs[("failed", rank)]
            delay = res["time"] - t_signal
            msg = res["message"]
            assert res["runtime_errors"], f"rank {rank}: not RuntimeErrors: {msg} / {res['next']}"
            assert "pyccl" in msg and f"rank {victim}" in msg, f"rank {rank}: {msg}"
            assert delay < budget, f"rank {rank}: the collective failed {delay:.2f} s after the signal ({msg})"
            assert "pyccl" in res["next"] and f"rank {victim}" in res["next"], f"rank {rank}: {res['next']}"
            assert res["next_seconds"] < 1.0, f"rank {rank}: the next collective took {res['next_seconds']:.2f} s to fail"
        destroyed = {r: msgs[("destroyed", r)] for r in survivors}
        assert all(s < 15 for s in destroyed.values()), destroyed
        if sig == signal.SIGSTOP:
            pp.signal(victim, signal.SIGCONT)
            pp.signal(victim, signal.SIGKILL)
        pp.join(survivors, 30)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", [2, 0], ids=["rank2", "rank0-master-host"])
def test_sigkill_fails_pending_and_next_collective(victim: int) -> None:
    _run(victim, signal.SIGKILL, hb_timeout=5.0, budget=2.0)


@pytest.mark.timeout(90)
def test_sigstop_fails_within_heartbeat_timeout() -> None:
    hb = 1.5
    _run(1, signal.SIGSTOP, hb_timeout=hb, budget=hb + 1.0)
