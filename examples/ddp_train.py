"""DDP training on backend "pyccl" (a drop-in for "gloo").

Run with torchrun (CPU, any number of processes):

    torchrun --nproc_per_node 2 examples/ddp_train.py
    torchrun --nproc_per_node 2 examples/ddp_train.py --backend gloo   # same losses, bit for bit at 2 ranks

(from a source checkout without `pip install`, prefix with `PYTHONPATH=.`).
The only pyccl-specific line is `import pyccl.torch`, which registers the
backend name. Options come from the environment: PYCCL_MASTER=host:port to use
an external `pyccl master`, PYCCL_HEARTBEAT_TIMEOUT (seconds), PYCCL_CONNECTIONS.
"""

from __future__ import annotations

import argparse
import time

import pyccl.torch  # noqa: F401  (registers backend "pyccl")
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="pyccl")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    dist.init_process_group(args.backend)  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = DDP(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data shard
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(args.batch, 64, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        avg = loss.detach().clone()
        dist.all_reduce(avg, op=dist.ReduceOp.AVG)
        if rank == 0:
            print(f"step {step:3d}  loss {avg.item():.6f}", flush=True)
    elapsed = time.perf_counter() - t0
    checksum = sum(p.double().sum().item() for p in model.parameters())
    sums = [None] * world
    dist.all_gather_object(sums, checksum)
    if rank == 0:
        same = all(s == sums[0] for s in sums)
        print(f"{args.backend}: {args.steps} steps in {elapsed:.2f} s; parameters identical on all {world} ranks: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
