"""An idle peer uses ~0% CPU (no busy-waiting), and torch CPU tensors work like numpy arrays."""

from __future__ import annotations

import time

import numpy as np
import pyccl
import pytest

from pipe_peers import check_no_crash, run_pipe_peers


def _idle_peer(master: str, n: int, out) -> None:
    comm = pyccl.Communicator(master, connections=4)
    comm.connect(timeout=60)
    while comm.world_size < n:
        comm.update_topology()
    x = np.ones(1 << 20, np.float32)
    comm.all_reduce(x)  # links are up and warm
    t_cpu, t_wall = time.process_time(), time.monotonic()
    time.sleep(3.0)  # idle: heartbeats only
    cpu = time.process_time() - t_cpu
    wall = time.monotonic() - t_wall
    comm.all_reduce(x)  # still works after idling
    out.send(cpu / wall)
    comm.close()


@pytest.mark.timeout(60)
def test_idle_peer_uses_no_cpu():
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        shares = run_pipe_peers(_idle_peer, 2, master.address, 2, timeout=50)
    check_no_crash(shares)
    # Process CPU time over all threads (senders, readers, heartbeat): a
    # busy-poll anywhere would show up as tens of percent.
    assert max(shares) < 0.02, shares


def _torch_peer(master: str, n: int, out) -> None:
    import torch

    comm = pyccl.Communicator(master, connections=2)
    comm.connect(timeout=60)
    while comm.world_size < n:
        comm.update_topology()
    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        t = torch.full((1000,), comm.peer_id, dtype=dtype)
        comm.all_reduce(t, op="sum")
        out_t = torch.empty_like(t)
        comm.all_reduce(torch.full((1000,), comm.peer_id, dtype=dtype), out=out_t, op="max")
        results[str(dtype)] = (t[0].item(), out_t[0].item(), bool((t == t[0]).all()))
    out.send((comm.peer_id, results))
    comm.close()


@pytest.mark.timeout(90)
def test_torch_tensors_all_dtypes():
    pytest.importorskip("torch")
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        res = run_pipe_peers(_torch_peer, 2, master.address, 2, timeout=80)
    check_no_crash(res)
    ids = [r[0] for r in res]
    for _, results in res:
        for dtype, (s, m, uniform) in results.items():
            assert s == sum(ids) and m == max(ids) and uniform, (dtype, s, m)


def test_cuda_tensor_gives_a_clear_error():
    torch = pytest.importorskip("torch")
    from pyccl.types import as_buffer

    class FakeDevice:
        type = "cuda"

        def __str__(self) -> str:
            return "cuda:0"

    t = torch.ones(3)
    with pytest.raises(ValueError, match="contiguous"):
        as_buffer(torch.ones(4, 4).t())
    # A real CUDA tensor cannot exist on this CPU build; check the message path
    # through a tensor whose device reports cuda.
    class CudaLike(torch.Tensor):
        @property
        def device(self):  # type: ignore[override]
            return FakeDevice()

    with pytest.raises(ValueError, match="no CUDA path"):
        as_buffer(t.as_subclass(CudaLike))
