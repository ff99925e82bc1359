"""Guarantee 7 on loopback: the master (a separate process) is SIGKILLed in
the middle of a run and restarted on the same address; the peers re-register
and the run goes on. Checked: every step's result is exact and identical on
every peer, an op aborted by the failover failed on every peer (never a
split outcome) with its input intact, shared state stays identical, and the
run completes. Also: no master coming back ends in pyccl.Timeout."""

from __future__ import annotations

import signal
import time
from typing import Any

import numpy as np
import pyccl
import pytest

from failover_helpers import MasterProc, free_port, trainer
from mp_helpers import PeerProcs

HB = 2.0  # heartbeat timeout of these runs


def _check_run(logs: dict[int, list[tuple[Any, ...]]], killed_at: list[float]) -> list[float]:
    """Every invariant of the run; returns the recovery time of each kill."""
    per_peer = {}
    for idx, log in logs.items():
        for entry in log:
            if entry[0] == "ok":
                assert entry[3], f"peer {idx}: wrong all_reduce result at step {entry[1]}"
            if entry[0] == "fail":
                assert entry[3], f"peer {idx}: input changed by a failed all_reduce at step {entry[1]}"
        # The sequence of outcomes (ok/fail per step, and the result digest) is the same on every peer.
        per_peer[idx] = [(e[0], e[1], e[2] if e[0] in ("ok", "sync") else None) for e in log
                         if e[0] in ("ok", "fail", "sync", "sync_fail")]
    first = next(iter(per_peer.values()))
    for idx, seq in per_peer.items():
        assert seq == first, f"peer {idx} saw other outcomes than peer 0:\n{seq}\n{first}"
    kinds = [e[0] for e in first]
    print(f"outcomes on every peer: {kinds.count('fail')} all_reduce and {kinds.count('sync_fail')} sync "
          "aborted by the failover")
    recoveries = []
    for t in killed_at:
        done = [min(e[4] for e in log if e[0] == "ok" and e[4] > t) for log in logs.values()]
        recoveries.append(max(done) - t)
    return recoveries


def _run(kill_when: str, sync: bool, steps: int, n: int, kills: int = 1, pace: float = 0.0,
         master_log: list[str] | None = None) -> list[float]:
    port = free_port()
    master = MasterProc(port, heartbeat_timeout=HB, hold=HB).start()
    killed_at: list[float] = []
    try:
        with PeerProcs() as procs:
            for i in range(3):
                procs.start(i, trainer, master.address, 3, steps, n, sync, pace)
            procs.gather("ready", range(3), timeout=60, ignore=("step", "syncing"))
            seen: dict[int, int] = {}
            logs: dict[int, Any] = {}
            for k in range(kills):
                at = 3 + k * 6
                # "sync": kill once every peer has entered the sync of step ``at``.
                want = "syncing" if kill_when == "sync" else "step"
                while min(seen.get(i, -1) for i in range(3)) < at:
                    kind, idx, payload = procs.get(60, ("step", "syncing", "result"))
                    if kind == want:
                        seen[idx] = payload
                    elif kind == "result":
                        logs[idx] = payload
                killed_at.append(master.kill())
                time.sleep(0.5)
                master.start()
            while len(logs) < 3:
                kind, idx, payload = procs.get(120, ("step", "syncing", "result"))
                if kind == "result":
                    logs[idx] = payload
            procs.join(range(3), 30)
        assert "re-formed at epoch" in master.text()
        if master_log is not None:
            master_log.append(master.text())
        return _check_run(logs, killed_at)
    finally:
        master.stop()


@pytest.mark.timeout(180)
def test_master_killed_during_all_reduce_restarts_and_the_run_goes_on() -> None:
    rec = _run("all_reduce", sync=False, steps=12, n=1 << 21, kills=2)
    print(f"recovery after master SIGKILL (restart after 0.5 s): {[f'{r:.2f}' for r in rec]} s")


@pytest.mark.timeout(180)
def test_with_a_secret_members_re_register_through_the_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYCCL_SECRET", "failover-secret")  # the master and every peer (spawned) read it
    text: list[str] = []
    rec = _run("all_reduce", sync=True, steps=6, n=1 << 18, master_log=text)
    print(f"recovery with a secret: {[f'{r:.2f}' for r in rec]} s")
    assert "runs without a secret" not in text[0]


@pytest.mark.timeout(180)
def test_master_killed_during_shared_state_sync() -> None:
    rec = _run("sync", sync=True, steps=8, n=1 << 10)
    print(f"recovery after master SIGKILL during sync: {[f'{r:.2f}' for r in rec]} s")


def _member(idx: int, q: Any, address: str, steps: int) -> None:
    comm = pyccl.Communicator(address, connections=1, name=f"m{idx}", master_timeout=60.0)
    comm.connect(timeout=60)
    comm.wait_for_world(2, 60)
    q.put(("ready", idx, comm.peer_id))
    sizes = []
    for step in range(steps):
        x = np.ones(1024, np.float32)
        while True:
            try:
                comm.update_topology()
                info = comm.all_reduce(x)
                break
            except pyccl.PeerFailure:
                x[:] = 1.0
        assert (x == info.world_size).all()
        sizes.append(info.world_size)
        q.put(("step", idx, (step, info.world_size)))
        time.sleep(0.05)
    q.put(("result", idx, sizes))
    comm.close()


def _joiner(idx: int, q: Any, address: str) -> None:
    comm = pyccl.Communicator(address, connections=1, name="joiner", master_timeout=60.0)
    q.put(("connecting", idx, 0))
    comm.connect(timeout=60)
    q.put(("admitted", idx, comm.world_size))
    x = np.ones(1024, np.float32)
    while True:
        try:
            comm.update_topology()
            info = comm.all_reduce(x)
            break
        except pyccl.PeerFailure:
            x[:] = 1.0
    q.put(("result", idx, info.world_size))
    comm.close()


@pytest.mark.timeout(180)
def test_master_killed_during_an_admission_round() -> None:
    port = free_port()
    master = MasterProc(port, heartbeat_timeout=HB, hold=HB).start()
    try:
        with PeerProcs() as procs:
            for i in range(2):
                procs.start(i, _member, master.address, 200)
            procs.gather("ready", range(2), timeout=60)
            procs.start(2, _joiner, master.address)
            procs.get(30, ("connecting",), ignore=("step",))
            master.wait_log("is waiting for admission", 30)
            master.kill()
            time.sleep(0.5)
            master.start()
            kind, _, world = procs.get(60, ("admitted",), ignore=("step",))
            assert world == 3
            results = {}
            while len(results) < 3:
                kind, idx, payload = procs.get(120, ("result",), ignore=("step",))
                results[idx] = payload
            assert results[2] == 3 and 3 in results[0] and 3 in results[1]
            procs.join(range(3), 30)
        assert "re-formed at epoch" in master.text()
    finally:
        master.stop()


@pytest.mark.timeout(60)
def test_no_master_coming_back_raises_timeout_naming_it() -> None:
    port = free_port()
    master = MasterProc(port, heartbeat_timeout=HB, hold=0).start()
    try:
        comm = pyccl.Communicator(master.address, connections=1, master_timeout=2.0)
        comm.connect(timeout=30)
        master.kill()
        t0 = time.monotonic()
        with pytest.raises(pyccl.Timeout, match=f"master at {master.address} has been unreachable since"):
            while time.monotonic() - t0 < 20:
                comm.all_reduce(np.ones(4, np.float32))  # world of one: local until the master is given up
                time.sleep(0.05)
        assert 1.5 < time.monotonic() - t0 < 10
        comm.close()
    finally:
        master.stop()


def _state_peer(idx: int, q: Any, address: str, world: int, steps: int, n: int) -> None:
    """Members (idx < world) and a joiner (idx == world) run the same loop:
    update_topology, sync_shared_state (retried on PeerFailure), a local
    deterministic update. Every successful sync reports (revision, digest)."""
    from mp_helpers import digest

    comm = pyccl.Communicator(address, connections=2, name=f"s{idx}", master_timeout=60.0)
    comm.connect(timeout=60)
    if idx < world:
        comm.wait_for_world(world, 60)
    w = np.zeros(n, np.float32)
    state = pyccl.SharedState({"w": w}, revision=0)
    q.put(("ready", idx, comm.peer_id))
    synced: list[tuple[int, str]] = []
    failures = 0
    while len(synced) < steps:
        comm.update_topology()
        q.put(("syncing", idx, len(synced)))
        try:
            comm.sync_shared_state(state)
        except pyccl.PeerFailure:
            failures += 1
            continue
        synced.append((state.revision, digest(w)))
        w[state.revision % n] += 1.0
        state.revision += 1
        time.sleep(0.02)
    q.put(("result", idx, (synced, failures, comm.world_size)))
    comm.close()


@pytest.mark.timeout(180)
def test_master_killed_while_a_joiner_fetches_the_state() -> None:
    port = free_port()
    master = MasterProc(port, heartbeat_timeout=HB, hold=HB).start()
    n = 16 << 20  # 64 MiB of state: the joiner's first sync takes a while
    try:
        with PeerProcs() as procs:
            for i in range(2):
                procs.start(i, _state_peer, master.address, 2, 60, n)
            procs.gather("ready", range(2), timeout=60, ignore=("syncing",))
            procs.start(2, _state_peer, master.address, 2, 15, n)
            procs.get(60, ("ready",), ignore=("syncing",))
            while True:  # the joiner's first sync: it is fetching the whole state
                kind, idx, payload = procs.get(60, ("syncing",))
                if idx == 2:
                    break
            master.kill()
            time.sleep(0.3)
            master.start()
            results = {}
            while len(results) < 3:
                kind, idx, payload = procs.get(120, ("result", "syncing"))
                if kind == "result":
                    results[idx] = payload
            procs.join(range(3), 30)
        by_rev: dict[int, set[str]] = {}
        for synced, _, _ in results.values():
            for rev, d in synced:
                by_rev.setdefault(rev, set()).add(d)
        assert all(len(ds) == 1 for ds in by_rev.values()), "members hold different states at one revision"
        joiner = results[2][0]
        assert joiner[0][0] > 0 and joiner[0][1] in by_rev[joiner[0][0]]  # it got the group's state
        print(f"syncs aborted by the failover: {[results[i][1] for i in range(3)]}")
        assert "re-formed at epoch" in master.text()
    finally:
        master.stop()


@pytest.mark.timeout(120)
def test_a_frozen_master_that_thaws_takes_its_members_back() -> None:
    """SIGSTOP of the master for longer than the heartbeat timeout: the peers
    declare it lost, keep dialing it, and re-register once it thaws."""
    port = free_port()
    master = MasterProc(port, heartbeat_timeout=HB, hold=HB).start()
    try:
        with PeerProcs() as procs:
            for i in range(3):
                procs.start(i, trainer, master.address, 3, 14, 1 << 16, False, 0.05)
            procs.gather("ready", range(3), timeout=60, ignore=("step",))
            seen: dict[int, int] = {}
            while min(seen.get(i, -1) for i in range(3)) < 3:
                kind, idx, payload = procs.get(60, ("step",))
                seen[idx] = payload
            master.signal(signal.SIGSTOP)
            frozen_at = time.time()
            time.sleep(2.5 * HB)
            master.signal(signal.SIGCONT)
            logs: dict[int, Any] = {}
            while len(logs) < 3:
                kind, idx, payload = procs.get(120, ("step", "result"))
                if kind == "result":
                    logs[idx] = payload
            procs.join(range(3), 30)
        assert "re-formed at epoch" in master.text()
        rec = _check_run(logs, [frozen_at])
        print(f"frozen for {2.5 * HB:g} s: the run went on {rec[0]:.2f} s after the freeze")
    finally:
        master.stop()
