"""FSDP2 (`fully_shard`) training of a small transformer on backend "pyccl".

    torchrun --nproc_per_node 2 examples/fsdp_train.py
    torchrun --nproc_per_node 4 examples/fsdp_train.py --hsdp     # 2 replicas x 2 shards
    torchrun --nproc_per_node 2 examples/fsdp_train.py --classic  # FullyShardedDataParallel

(from a source checkout without `pip install`, prefix with `PYTHONPATH=.`).
All-gathers and reduce-scatters run as ring collectives in the pyccl core;
HSDP adds an all-reduce across replicas.
"""

from __future__ import annotations

import argparse
import time

import pyccl.torch  # noqa: F401  (registers backend "pyccl")
import torch.distributed as dist
import torch.nn as nn

import torch


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="pyccl")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hsdp", action="store_true", help="2-D mesh: replicate x shard (needs an even world size)")
    p.add_argument("--classic", action="store_true", help="torch.distributed.fsdp.FullyShardedDataParallel")
    args = p.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyLM()
    if args.classic:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if args.hsdp:
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)
    t0 = time.perf_counter()
    for step in range(args.steps):
        tokens = torch.randint(0, 256, (8, 33), generator=gen)
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        avg = loss.detach().clone()
        dist.all_reduce(avg, op=dist.ReduceOp.AVG)
        if rank == 0:
            print(f"step {step:3d}  loss {avg.item():.6f}", flush=True)
    if rank == 0:
        kind = "FSDP (classic)" if args.classic else ("HSDP" if args.hsdp else "FSDP2")
        print(f"{args.backend} {kind}: {args.steps} steps on {world} ranks in {time.perf_counter() - t0:.2f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
