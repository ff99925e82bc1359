"""Two-level all-reduce across regions (Communicator(region=..., two_level=...)).

Four peers in two regions (given with ``region=``) all-reduce every dtype
with every op in two levels: exact, bit-identical on every peer. A SIGKILL
of a peer (every peer owns a shard) mid-op fails the op everywhere with the
inputs intact, and the retry runs over the survivors (flat ring: the
regions are no longer of equal size). Joiners arriving into one region and
then the other switch the ring off and on again, results exact throughout.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from mp_helpers import PeerProcs, digest

NP_DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64"]
OPS = ["sum", "avg", "min", "max", "prod"]
COUNTS = [1001, 300_003]  # uneven shards; several chunks per shard


def make_input(peer_id: int, dtype: str, op: str, count: int) -> np.ndarray:
    rng = np.random.default_rng(peer_id * 7919 + count)
    if op == "prod":
        v = rng.integers(1, 3, count)  # 1 or 2: 4 peers multiply to at most 16
    elif dtype == "uint8":
        v = rng.integers(0, 60, count)
    else:
        v = rng.integers(-30, 30, count)
    return v.astype(dtype)


def reference(peer_ids: list[int], dtype: str, op: str, count: int) -> np.ndarray:
    xs = np.stack([make_input(p, dtype, op, count).astype(np.float64) for p in peer_ids])
    out = {"sum": xs.sum(0), "avg": xs.mean(0), "min": xs.min(0), "max": xs.max(0), "prod": xs.prod(0)}[op]
    return out


def _matrix_peer(idx: int, q, master: str, region: str, n: int) -> None:
    import pyccl

    comm = pyccl.Communicator(master, connections=2, region=region, two_level="on", name=f"p{idx}")
    comm.connect(timeout=60)
    comm.wait_for_world(n, 60)
    comm.all_reduce(np.zeros(4, np.float32))  # line the program positions up after wait_for_world
    out = {}
    for count in COUNTS:
        for dtype in NP_DTYPES:
            for op in OPS:
                x = make_input(comm.peer_id, dtype, op, count)
                info = comm.all_reduce(x, op=op)
                out[(count, dtype, op)] = (digest(x), x.astype(np.float64), info.two_level, info.peers)
        try:
            import torch
        except ImportError:
            continue
        for op in ("sum", "max"):
            t = torch.from_numpy(make_input(comm.peer_id, "int8", op, count).astype(np.float32)).to(torch.bfloat16)
            info = comm.all_reduce(t, op=op)
            out[(count, "bfloat16", op)] = (digest(t), t.to(torch.float64).numpy(), info.two_level, info.peers)
    q.put(("results", idx, out))
    comm.all_reduce(np.zeros(4, np.float32))
    comm.close()


@pytest.mark.timeout(240)
def test_two_level_every_dtype_and_op_exact_and_bit_identical() -> None:
    import pyccl

    n = 4
    with pyccl.Master(host="127.0.0.1", port=0) as master, PeerProcs() as procs:
        for i in range(n):
            procs.start(i, _matrix_peer, master.address, "ab"[i % 2], n)
        res = procs.gather("results", range(n), 200)
        keys = res[0].keys()
        assert len(keys) >= len(COUNTS) * len(NP_DTYPES) * len(OPS)
        for key in keys:
            count, dtype, op = key
            digests = {res[i][key][0] for i in range(n)}
            assert len(digests) == 1, f"{key}: results differ across peers"
            _, got, two, peers = res[0][key]
            assert two, f"{key} did not run two-level"
            if dtype == "bfloat16":
                want = reference(list(peers), "int8", op, count)
            else:
                want = reference(list(peers), dtype, op, count)
            if op == "avg":
                if np.dtype(dtype if dtype != "bfloat16" else "float32").kind in "iu":
                    want = np.trunc(want)  # integer AVG truncates (twice: by m, then by R)
                    assert np.all(np.abs(got - want) <= 1), key
                else:
                    assert np.allclose(got, want, rtol=1e-2, atol=1e-2), key
            else:
                assert np.array_equal(got, want), key


def _kill_peer(idx: int, q, master: str, region: str, n: int, count: int) -> None:
    import pyccl

    comm = pyccl.Communicator(master, connections=2, region=region, two_level="on", name=f"p{idx}")
    comm.connect(timeout=60)
    comm.wait_for_world(n, 60)
    comm.all_reduce(np.zeros(4, np.float32))
    two_level_ops = failures = 0
    after = None
    base = make_input(comm.peer_id, "float32", "sum", count)
    want: dict[tuple[int, ...], np.ndarray] = {}
    x = base.copy()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # ops back to back: the kill lands inside one
        x[:] = base
        try:
            info = comm.all_reduce(x)
        except pyccl.PeerFailure:
            failures += 1
            assert np.array_equal(x, base), "the input changed after PeerFailure"
            continue
        if info.peers not in want:
            want[info.peers] = reference(list(info.peers), "float32", "sum", count).astype(np.float32)
        # A strided sample keeps this peer inside ops most of the time (the
        # kill must find ops in flight); the last result is checked in full.
        assert np.array_equal(x[::997], want[info.peers][::997]), "wrong result"
        if info.two_level:
            two_level_ops += 1
            if two_level_ops == 3:
                q.put(("running", idx, comm.peer_id))
        if info.world_size < n:
            assert np.array_equal(x, want[info.peers]), "wrong result over the survivors"
            after = info
            break
    q.put(("survived", idx, (two_level_ops, failures, after.two_level if after else None,
                             after.world_size if after else None)))
    comm.close()


@pytest.mark.timeout(180)
def test_sigkill_of_a_shard_owner_fails_everywhere_and_the_retry_runs_over_the_survivors() -> None:
    import pyccl

    n = 4
    with pyccl.Master(host="127.0.0.1", port=0) as master, PeerProcs() as procs:
        for i in range(n):
            procs.start(i, _kill_peer, master.address, "ab"[i % 2], n, 4 << 20)
        procs.gather("running", range(n), 90)
        # Not at once: the victim's queue feeder may still hold the queue's
        # write lock right after its message arrived (a kill then would
        # deadlock the other children's reports, not pyccl). Its ops go on.
        time.sleep(0.3)
        procs.signal(1, signal.SIGKILL)
        procs.expected_dead.add(1)
        got = procs.gather("survived", [0, 2, 3], 120)
        for two_level_ops, _, after_two_level, world in got.values():
            assert two_level_ops >= 3
            assert world == n - 1 and after_two_level is False  # 2 + 1: the flat ring
        assert sum(failures for _, failures, _, _ in got.values()) >= 1, got  # the op in flight failed


def _join_peer(idx: int, q, master: str, region: str, final: int, joiner: bool) -> None:
    import pyccl

    comm = pyccl.Communicator(master, connections=2, region=region, two_level="on", name=f"p{idx}")
    comm.connect(timeout=60)
    seen: set[tuple[int, bool]] = set()
    deadline = time.monotonic() + 100
    while time.monotonic() < deadline:
        comm.update_topology()
        x = make_input(comm.peer_id, "int32", "sum", 5000)
        try:
            info = comm.all_reduce(x)
        except pyccl.PeerFailure:
            continue
        assert np.array_equal(x.astype(np.float64), reference(list(info.peers), "int32", "sum", 5000))
        if (info.world_size, info.two_level) not in seen:
            seen.add((info.world_size, info.two_level))
            q.put(("state", idx, (info.world_size, info.two_level)))
        if info.world_size == final and info.two_level:
            break
        time.sleep(0.01)
    q.put(("done", idx, sorted(seen)))
    for _ in range(3):
        comm.update_topology()
        comm.all_reduce(np.zeros(4, np.float32))
    comm.close()


@pytest.mark.timeout(180)
def test_joiners_into_regions_switch_two_level_off_and_on() -> None:
    import pyccl

    with pyccl.Master(host="127.0.0.1", port=0) as master, PeerProcs() as procs:
        for i in range(4):
            procs.start(i, _join_peer, master.address, "ab"[i % 2], 6, False)
        procs.get(60, ("state",))
        procs.start(4, _join_peer, master.address, "a", 6, True)  # 3 + 2: flat
        time.sleep(2.0)
        procs.start(5, _join_peer, master.address, "b", 6, True)  # 3 + 3: two-level again
        done = {}
        while len(done) < 6:
            kind, idx, payload = procs.get(120, ("state", "done"))
            if kind == "done":
                done[idx] = payload
        assert (4, True) in done[0] and (6, True) in done[0], done[0]
        assert all((6, True) in states for states in done.values()), done
