"""DiLoCo across two master failures: the master (a separate process) is
SIGKILLed twice during a two-peer DiLoCo run and restarted on its address;
every peer's global parameters after every outer step are bit-identical to
each other and to the single-process reference, i.e. to a run without
master failures over the same membership."""

from __future__ import annotations

import time
from typing import Any

import pytest

from diloco_helpers import H, Peers, global_arrays, make_inner, make_model, reference, train_step
from failover_helpers import MasterProc, free_port

STEPS = 8 * H


def failover_peer(pipe: Any, master: str, rank: int, steps: int, pace: float) -> None:
    import pyccl
    from pyccl.diloco import DiLoCo

    import torch

    torch.set_num_threads(1)
    comm = pyccl.Communicator(master, connections=1, name=f"rank{rank}", master_timeout=60.0)
    comm.connect(timeout=60)
    comm.wait_for_world(2, 60)
    model = make_model()
    dl = DiLoCo(model, make_inner(model), comm, sync_every=H)
    for s in range(1, steps + 1):
        train_step(model, rank, s)
        info = dl.step()
        time.sleep(pace)
        if info is not None:
            pipe.send(("outer", info.outer_step, info.world_size, info.retries, global_arrays(dl)))
    dl.finish()
    pipe.send(("done", comm.epoch))
    comm.close()


@pytest.mark.timeout(240)
def test_diloco_with_the_master_killed_twice_matches_the_reference_bit_for_bit() -> None:
    master = MasterProc(free_port(), heartbeat_timeout=2.0, hold=2.0).start()
    try:
        with Peers() as peers:
            for r in (0, 1):
                peers.start(f"p{r}", failover_peer, master.address, r, STEPS, 0.05)
            got: dict[str, list[Any]] = {"p0": [], "p1": []}
            retries = 0
            for kill_after in (2, 5):
                for name in got:
                    while len(got[name]) < kill_after:
                        msg = peers.recv(name, 60)
                        got[name].append(msg[4])
                        retries += msg[3]
                master.kill()  # the peers are in their inner steps of the next outer step
                time.sleep(0.3)
                master.start()
            for name in got:
                while True:
                    msg = peers.recv(name, 120)
                    if msg[0] == "done":
                        assert msg[1] > 2, "the group never re-formed"
                        break
                    assert msg[2] == 2, "an outer step ran without both peers"
                    got[name].append(msg[4])
                    retries += msg[3]
        want = reference({}, STEPS)
        assert len(got["p0"]) == len(got["p1"]) == len(want) == STEPS // H
        for k, (a, b, ref) in enumerate(zip(got["p0"], got["p1"], want)):
            for x, y, z in zip(a, b, ref):
                assert x.tobytes() == y.tobytes(), f"peers differ after outer step {k + 1}"
                assert x.tobytes() == z.tobytes(), f"outer step {k + 1} differs from the run without failures"
        assert master.text().count("re-formed at epoch") == 2
        print(f"DiLoCo: 2 master kills, {retries} outer all-reduce retries, {len(want)} outer steps bit-identical")
    finally:
        master.stop()
