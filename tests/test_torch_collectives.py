"""torch.distributed backend "pyccl": every collective against gloo.

One set of processes per world size: the default group is pyccl, and a gloo
group of the same ranks computes the reference in the same processes. Every
dtype torch trains with, every reduce op (SUM, AVG, MIN, MAX, PRODUCT,
PREMUL_SUM, BAND/BOR/BXOR), current and legacy entry points, async_op,
coalescing, all-to-all, gather/scatter, send/recv, subgroups, and the clear
error for non-CPU tensors. At 2 ranks the inputs are random floats and the
results must be bit-identical to gloo's; at 4 ranks floating-point sums
depend on the ring's summation order (pyccl's and gloo's rings differ), so
the inputs are small integers whose sums are exact in any order.
After destroy_process_group() no pyccl thread is left and the master's and
the side channel's ports are closed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch_workers
from mp_helpers import PeerProcs, port_is_free
from torch_mp import free_port, launch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_every_collective_matches_gloo(world: int) -> None:
    with PeerProcs() as pp:
        launch(pp, world, torch_workers.collectives_body, free_port())
        got = pp.gather("result", range(world), 100)
        pp.join(range(world), 30)
    for rank, res in sorted(got.items()):
        assert not res["failures"], f"rank {rank}: " + "\n".join(res["failures"])
        assert len(res["checked"]) > 250, res["checked"]
        assert res["threads"] == [], f"rank {rank} left pyccl threads behind: {res['threads']}"
        for port in res["ports"]:
            assert port_is_free(port), f"rank {rank}: port {port} still accepts connections after destroy"
    names = set(got[0]["checked"])
    for must in ("all_reduce premul_sum torch.bfloat16 float", "reduce_scatter_tensor avg torch.float32",
                 "all_gather_into_tensor in place torch.bfloat16", "all_to_all_single uneven",
                 "batch_isend_irecv", "subgroup all_reduce", "non-CPU tensor error"):
        assert must in names, must
