"""Child-process bodies for the torch backend tests (tests/test_torch_*.py).

Each body runs in a process started by :class:`torch_mp.Launch` and reports
through a queue. Training bodies run the same script twice in one process,
once with ``backend="gloo"`` and once with ``backend="pyccl"`` (init, train,
destroy), so the comparison is "a user swapped the backend string".
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().clone()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def init(backend: str, rank: int, world: int, init_method: str, **kw: Any) -> None:
    if backend == "pyccl":
        import pyccl.torch  # noqa: F401
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, **kw)


# ------------------------------------------------------------------ models


class TinyNet(nn.Module):
    """Small MLP with an unused branch (for find_unused_parameters) and a buffer."""

    def __init__(self, d: int = 32, unused: bool = False) -> None:
        super().__init__()
        self.l1 = nn.Linear(d, 64)
        self.l2 = nn.Linear(64, 64)
        self.l3 = nn.Linear(64, 8)
        self.side = nn.Linear(64, 8)  # used only on even steps when unused=True
        self.unused = unused
        self.register_buffer("scale", torch.ones(8))
        self.step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        h = torch.relu(self.l2(h))
        out = self.l3(h) * self.scale
        if not self.unused or self.step % 2 == 0:
            out = out + self.side(h)
        self.step += 1
        return out


def batches(rank: int, steps: int, d: int = 32, bs: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(bs, d, generator=g), torch.randn(bs, 8, generator=g)) for _ in range(steps)]


def make_model(seed: int, **kw: Any) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], lr: float = 0.05) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def param_digests(model: nn.Module, full: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, str]:
    out = {}
    for name, p in model.named_parameters():
        t = full(p) if full is not None else p
        out[name] = digest(t)
    return out


# --------------------------------------------------------------- training


STEPS = 6


def run_ddp(variant: str, rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw: dict[str, Any] = {}
    unused = False
    if variant == "static_graph":
        kw["static_graph"] = True
    elif variant == "find_unused":
        kw["find_unused_parameters"] = True
        unused = True
    elif variant == "small_buckets":
        kw["bucket_cap_mb"] = 0.01
    model = DDP(make_model(0, unused=unused), **kw)
    if variant == "comm_hook":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    losses = train(model, batches(rank, STEPS))
    return {"losses": losses, "params": param_digests(model.module)}


def run_fsdp2(variant: str, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if variant == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    model = make_model(0)
    for layer in (model.l1, model.l2, model.l3, model.side):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = train(model, batches(rank, STEPS))
    return {"losses": losses, "params": param_digests(model, lambda p: p.full_tensor())}


def run_fsdp1(variant: str, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    strategy = getattr(ShardingStrategy, variant)
    model = FSDP(make_model(0), sharding_strategy=strategy, device_id=torch.device("cpu"), use_orig_params=True)
    losses = train(model, batches(rank, STEPS))
    with FSDP.summon_full_params(model):
        params = param_digests(model)
    return {"losses": losses, "params": params}


TRAINERS = {"ddp": run_ddp, "fsdp2": run_fsdp2, "fsdp1": run_fsdp1}


def training_body(rank: int, q: Any, world: int, ports: dict[str, int], jobs: list[tuple[str, str]]) -> None:
    """For each (trainer, variant): train on gloo, then on pyccl; report both."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for trainer, variant in jobs:
        res = {}
        for backend in ("gloo", "pyccl"):
            port = ports[f"{trainer}-{variant}-{backend}"]
            init(backend, rank, world, f"tcp://127.0.0.1:{port}")
            t0 = time.perf_counter()
            res[backend] = TRAINERS[trainer](variant, rank, world)
            res[backend]["seconds"] = time.perf_counter() - t0
            dist.destroy_process_group()
        q.put(("result", rank, (trainer, variant, res)))
