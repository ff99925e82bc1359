"""update_topology() is safe on every iteration, whatever the shape of the loop.

A joiner connects while members loop; it must be admitted at their next
update_topology() and the group must keep all-reducing together, for loops
that call update_topology() before the collective, after it, or twice in a
row (PCCL deadlocks on the first shape).
"""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pyccl
import pytest

SHAPES = ["topology_first", "collective_first", "topology_twice"]


def _loop(master: str, shape: str, steps_after_full: int, world: int, out) -> None:
    comm = pyccl.Communicator(master, connections=2)
    comm.connect(timeout=60)
    x = np.zeros(1000, np.float32)
    full_steps = 0
    try:
        while full_steps < steps_after_full:
            if shape in ("topology_first", "topology_twice"):
                comm.update_topology()
            if shape == "topology_twice":
                comm.update_topology()
            x[:] = comm.peer_id
            info = comm.all_reduce(x)
            assert np.all(x == sum(info.peers)), (x[:3], info)
            if shape == "collective_first":
                comm.update_topology()
            if info.world_size == world:
                full_steps += 1
            time.sleep(0.01)
        out.put(("ok", comm.peer_id, info.world_size))
    except Exception as exc:  # report, never hang the test
        out.put(("error", comm.peer_id, repr(exc)))
    finally:
        comm.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("shape", SHAPES)
def test_joiners_never_deadlock(shape):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = []
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        try:
            for i in range(4):
                p = ctx.Process(target=_loop, args=(master.address, shape, 20, 4, out))
                p.start()
                procs.append(p)
                time.sleep(0.7 if i else 1.5)  # later peers join a group that is already looping
            results = [out.get(timeout=60) for _ in procs]
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    assert all(r[0] == "ok" for r in results), results
    assert all(r[2] == 4 for r in results), results


def _ordered_peer(master: str, order: int, out) -> None:
    comm = pyccl.Communicator(master, connections=1, order=order)
    comm.connect(timeout=60)
    while comm.world_size < 3:
        comm.update_topology()
    x = np.full(3, float(comm.rank), np.float32)
    g = np.empty(9, np.float32)
    comm.all_gather(x, g)
    out.put((order, comm.rank, g.tolist()))
    comm.close()


@pytest.mark.timeout(60)
def test_order_key_sets_ring_rank():
    """Peers that pass order= stand in the ring by it, whatever their join order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        procs = []
        try:
            for order in (2, 0, 1):  # join in an order unrelated to the keys
                p = ctx.Process(target=_ordered_peer, args=(master.address, order, out))
                p.start()
                procs.append(p)
                time.sleep(0.5)
            res = [out.get(timeout=50) for _ in procs]
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    for order, rank, g in res:
        assert rank == order
        assert g == [0.0] * 3 + [1.0] * 3 + [2.0] * 3
