"""Child-process bodies for the torch backend tests (tests/test_torch_*.py).

Each body runs in a process started by :class:`torch_mp.Launch` and reports
through a queue. Training bodies run the same script twice in one process,
once with ``backend="gloo"`` and once with ``backend="pyccl"`` (init, train,
destroy), so the comparison is "a user swapped the backend string".
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.nn as nn

import torch


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


# ------------------------------------------------------------ collectives

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]
ALL_DTYPES = FLOATS + INTS + [torch.bool]


def make_input(kind: str, dtype: torch.dtype, rank: int, n: int, seed: int, exact: bool) -> torch.Tensor:
    """Deterministic per-rank data. ``exact``: small integers (sums exact in any order)."""
    g = torch.Generator().manual_seed(seed * 131 + rank)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if kind == "prod":
        base = torch.randint(1, 4, (n,), generator=g)
        if dtype.is_floating_point and not exact:
            return (base.to(torch.float64) * (0.75 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64))).to(dtype)
        return base.to(dtype)
    if dtype.is_floating_point:
        if exact:
            return torch.randint(-20, 21, (n,), generator=g).to(dtype)
        return (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    lo, hi = (0, 60) if dtype == torch.uint8 else (-30, 30)
    return torch.randint(lo, hi, (n,), generator=g).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and digest(a) == digest(b)


def collectives_body(rank: int, q: Any, world: int, port: int) -> None:
    """Every collective on pyccl (default group) against gloo (a gloo group of the same ranks)."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from torch.distributed import ReduceOp

    init("pyccl", rank, world, f"tcp://127.0.0.1:{port}")
    gl = dist.new_group(backend="gloo")
    exact = world > 2  # sum order differs from gloo's ring beyond 2 ranks: use order-free data
    checked: list[str] = []
    failures: list[str] = []

    def check(name: str, ours: Any, theirs: Any) -> None:
        checked.append(name)
        ours_l = ours if isinstance(ours, (list, tuple)) else [ours]
        theirs_l = theirs if isinstance(theirs, (list, tuple)) else [theirs]
        if len(ours_l) != len(theirs_l) or not all(same(a, b) for a, b in zip(ours_l, theirs_l)):
            failures.append(f"{name}: pyccl {ours_l} != gloo {theirs_l}"[:600])

    ops = {
        "sum": ReduceOp.SUM, "avg": ReduceOp.AVG, "min": ReduceOp.MIN, "max": ReduceOp.MAX,
        "prod": ReduceOp.PRODUCT, "band": ReduceOp.BAND, "bor": ReduceOp.BOR, "bxor": ReduceOp.BXOR,
    }

    def gloo_reference(x: torch.Tensor, opname: str) -> torch.Tensor:
        """gloo's all_reduce, or (where gloo refuses the combination) a local
        reduction of the inputs gathered by gloo."""
        y = x.clone()
        try:
            dist.all_reduce(y, op=ops[opname], group=gl)
            return y
        except (RuntimeError, ValueError):
            pass
        xb = x.view(torch.uint8)  # gloo gathers bytes of any dtype
        parts_b = [torch.empty_like(xb) for _ in range(world)]
        dist.all_gather(parts_b, xb, group=gl)
        parts = [p.view(x.dtype) for p in parts_b]
        acc = parts[0].clone()
        fn = {"sum": torch.add, "avg": torch.add, "min": torch.minimum, "max": torch.maximum, "prod": torch.mul,
              "band": torch.bitwise_and, "bor": torch.bitwise_or, "bxor": torch.bitwise_xor}[opname]
        for p in parts[1:]:
            acc = fn(acc, p)
        if opname == "avg":
            acc = torch.div(acc, world, rounding_mode="trunc") if not acc.is_floating_point() else acc / world
        return acc.to(x.dtype)

    seed = 0
    # ---- all_reduce / reduce / reduce_scatter per dtype and op
    for dtype in ALL_DTYPES:
        for opname in ops:
            is_float = dtype.is_floating_point
            if opname in ("band", "bor", "bxor") and is_float:
                continue
            if opname == "avg" and dtype == torch.bool:
                continue
            seed += 1
            x = make_input(opname, dtype, rank, 37 * world, seed, exact)
            ref = gloo_reference(x, opname)
            y = x.clone()
            dist.all_reduce(y, op=ops[opname])
            check(f"all_reduce {opname} {dtype}", y, ref)
            if opname in ("sum", "max") or dtype == torch.float32:
                y = x.clone()
                dist.all_reduce(y, op=ops[opname], async_op=True).wait()
                check(f"all_reduce async {opname} {dtype}", y, ref)
                # reduce to root 1
                y = x.clone()
                dist.reduce(y, dst=1, op=ops[opname])
                if rank == 1:
                    check(f"reduce {opname} {dtype}", y, ref)
            # reduce_scatter_tensor and list form, against the all-reduced reference
            m = x.numel() // world
            out = torch.empty(m, dtype=dtype)
            dist.reduce_scatter_tensor(out, x, op=ops[opname])
            check(f"reduce_scatter_tensor {opname} {dtype}", out, ref[rank * m:(rank + 1) * m])
            if opname in ("sum", "min") or dtype == torch.bfloat16:
                out2 = torch.empty(m, dtype=dtype)
                dist.reduce_scatter(out2, list(x.split(m)), op=ops[opname])
                check(f"reduce_scatter {opname} {dtype}", out2, ref[rank * m:(rank + 1) * m])
                g_out = torch.empty(m, dtype=dtype)
                try:
                    dist.reduce_scatter_tensor(g_out, x.clone(), op=ops[opname], group=gl)
                    check(f"reduce_scatter_tensor vs gloo {opname} {dtype}", out, g_out)
                except (RuntimeError, ValueError):
                    pass
    # ---- PREMUL_SUM: x * f summed (gloo has no PREMUL_SUM: reference = gloo SUM of x * f)
    for dtype in FLOATS:
        for factor in (0.5, torch.tensor(0.25, dtype=torch.float32)):
            seed += 1
            x = make_input("sum", dtype, rank, 16 * world, seed, exact)
            f = factor if isinstance(factor, float) else factor.item()
            ref = (x * f).to(dtype)
            dist.all_reduce(ref, group=gl)
            y = x.clone()
            dist.all_reduce(y, op=dist._make_nccl_premul_sum(factor))
            check(f"all_reduce premul_sum {dtype} {type(factor).__name__}", y, ref)
            out = torch.empty(16, dtype=dtype)
            dist.reduce_scatter_tensor(out, x, op=dist._make_nccl_premul_sum(factor))
            check(f"reduce_scatter_tensor premul_sum {dtype}", out, ref[rank * 16:(rank + 1) * 16])
    # ---- complex SUM
    xc = torch.complex(make_input("sum", torch.float32, rank, 12, 999, exact),
                       make_input("sum", torch.float32, rank, 12, 998, exact))
    yc, rc = xc.clone(), xc.clone()
    dist.all_reduce(yc)
    dist.all_reduce(rc, group=gl)
    check("all_reduce sum complex64", yc, rc)
    # ---- data movement: every dtype, 2-D shapes
    for dtype in ALL_DTYPES + [torch.complex64]:
        seed += 1
        base = make_input("sum", dtype if not dtype.is_complex else torch.float32, rank, 12, seed, exact)
        x = base.view(3, 4) if not dtype.is_complex else torch.complex(base, base).view(3, 4)
        u8 = lambda t: t.view(torch.uint8)  # noqa: E731 - gloo moves bytes of any dtype
        b1, b2 = x.clone(), x.clone()
        dist.broadcast(b1, src=world - 1)
        dist.broadcast(u8(b2), src=world - 1, group=gl)
        check(f"broadcast {dtype}", b1, b2)
        l1 = [torch.empty_like(x) for _ in range(world)]
        l2 = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(l1, x)
        dist.all_gather([u8(t) for t in l2], u8(x), group=gl)
        check(f"all_gather {dtype}", l1, l2)
        o1 = torch.empty((3 * world, 4), dtype=dtype)
        o2 = torch.empty_like(o1)
        dist.all_gather_into_tensor(o1, x)
        dist.all_gather_into_tensor(u8(o2), u8(x), group=gl)
        check(f"all_gather_into_tensor {dtype}", o1, o2)
        # in place (FSDP2 style: the input is this rank's slice of the output)
        o3 = torch.empty_like(o1)
        o3[rank * 3:(rank + 1) * 3].copy_(x)
        dist.all_gather_into_tensor(o3, o3[rank * 3:(rank + 1) * 3])
        check(f"all_gather_into_tensor in place {dtype}", o3, o2)
        a1 = torch.empty((world * 2, 3), dtype=dtype)
        a2 = torch.empty_like(a1)
        src = torch.cat([x.reshape(-1)] * world)[: world * 6].view(world * 2, 3)
        dist.all_to_all_single(a1, src)
        dist.all_to_all_single(u8(a2), u8(src), group=gl)
        check(f"all_to_all_single {dtype}", a1, a2)
    # non-contiguous tensors
    x = make_input("sum", torch.float32, rank, 24, 4242, exact).view(4, 6).t()
    y1, y2 = x.clone(), torch.empty(4, 6).t()  # y2: non-contiguous, like x
    y2.copy_(x)
    dist.all_reduce(y2)
    dist.all_reduce(y1, group=gl)
    check("all_reduce non-contiguous", y2.contiguous(), y1.contiguous())
    # uneven all_to_all_single
    in_splits = [(rank + r) % 3 + 1 for r in range(world)]
    out_splits = [(r + rank) % 3 + 1 for r in range(world)]
    x = torch.arange(sum(in_splits) * 2, dtype=torch.int64).view(-1, 2) + 1000 * rank
    a1 = torch.empty((sum(out_splits), 2), dtype=torch.int64)
    a2 = torch.empty_like(a1)
    dist.all_to_all_single(a1, x, out_splits, in_splits)
    dist.all_to_all_single(a2, x, out_splits, in_splits, group=gl)
    check("all_to_all_single uneven", a1, a2)
    # all_to_all (lists)
    ins = [torch.full((3,), float(rank * 10 + r)) for r in range(world)]
    o1 = [torch.empty(3) for _ in range(world)]
    o2 = [torch.empty(3) for _ in range(world)]
    dist.all_to_all(o1, ins)
    dist.all_to_all(o2, ins, group=gl)
    check("all_to_all", o1, o2)
    ins = [torch.full((r + 1,), float(rank * 10 + r)) for r in range(world)]  # uneven (gloo refuses)
    o1 = [torch.empty(rank + 1) for _ in range(world)]
    dist.all_to_all(o1, ins)
    check("all_to_all uneven", o1, [torch.full((rank + 1,), float(s * 10 + rank)) for s in range(world)])
    # gather / scatter
    x = make_input("sum", torch.float32, rank, 5, 77, exact)
    gl1 = [torch.empty(5) for _ in range(world)] if rank == 0 else None
    gl2 = [torch.empty(5) for _ in range(world)] if rank == 0 else None
    dist.gather(x, gl1, dst=0)
    dist.gather(x, gl2, dst=0, group=gl)
    if rank == 0:
        check("gather", gl1, gl2)
    sl = [torch.full((4,), float(i) + 0.5) for i in range(world)] if rank == world - 1 else None
    s1, s2 = torch.empty(4), torch.empty(4)
    dist.scatter(s1, sl, src=world - 1)
    dist.scatter(s2, sl, src=world - 1, group=gl)
    check("scatter", s1, s2)
    # coalesced (the coalescing manager's fast paths)
    from torch.distributed.distributed_c10d import _coalescing_manager

    ts = [make_input("sum", torch.float32, rank, k + 3, 500 + k, exact) for k in range(3)]
    t1, t2 = [t.clone() for t in ts], [t.clone() for t in ts]
    with _coalescing_manager(async_ops=True) as cm:
        for t in t1:
            dist.all_reduce(t)
    cm.wait()
    for t in t2:
        dist.all_reduce(t, group=gl)
    check("all_reduce coalesced", t1, t2)
    outs1 = [torch.empty(world * (k + 3)) for k in range(3)]
    outs2 = [torch.empty(world * (k + 3)) for k in range(3)]
    with _coalescing_manager():
        for o, t in zip(outs1, ts):
            dist.all_gather_into_tensor(o, t)
    for o, t in zip(outs2, ts):
        dist.all_gather_into_tensor(o, t, group=gl)
    check("all_gather_into_tensor coalesced", outs1, outs2)
    rs_in = [make_input("sum", torch.float32, rank, world * (k + 2), 600 + k, exact) for k in range(3)]
    r1 = [torch.empty(k + 2) for k in range(3)]
    r2 = [torch.empty(k + 2) for k in range(3)]
    with _coalescing_manager():
        for o, t in zip(r1, rs_in):
            dist.reduce_scatter_tensor(o, t)
    for o, t in zip(r2, rs_in):
        dist.reduce_scatter_tensor(o, t, group=gl)
    check("reduce_scatter_tensor coalesced", r1, r2)
    ar1 = [t.clone() for t in ts]
    ar2 = [t.clone() for t in ts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist.all_reduce_coalesced(ar1)
        dist.all_reduce_coalesced(ar2, group=gl)
    check("all_reduce_coalesced", ar1, ar2)
    # legacy / direct ProcessGroup method names (what older torch and C++ callers use)
    pg = dist.group.WORLD
    from torch.distributed.distributed_c10d import AllgatherOptions, ReduceScatterOptions

    x = make_input("sum", torch.float32, rank, 6, 700, exact)
    o_new, o_old = torch.empty(6 * world), torch.empty(6 * world)
    dist.all_gather_into_tensor(o_new, x)
    pg._allgather_base(o_old, x, AllgatherOptions()).wait()
    check("_allgather_base", o_old, o_new)
    big = make_input("sum", torch.float32, rank, 6 * world, 701, exact)
    r_new, r_old = torch.empty(6), torch.empty(6)
    dist.reduce_scatter_tensor(r_new, big)
    pg._reduce_scatter_base(r_old, big, ReduceScatterOptions()).wait()
    check("_reduce_scatter_base", r_old, r_new)
    a_new, a_old = torch.empty(6 * world), torch.empty(6 * world)
    dist.all_to_all_single(a_new, big)
    pg.alltoall_base(a_old, big, [], []).wait()
    check("alltoall_base", a_old, a_new)
    outs = [torch.empty(6 * world), torch.empty(6 * world)]
    pg.allgather_into_tensor_coalesced(outs, [x, x + 1], AllgatherOptions()).wait()
    check("allgather_into_tensor_coalesced", outs, [o_new, o_new + 1])
    rs = [torch.empty(6), torch.empty(6)]
    pg.reduce_scatter_tensor_coalesced(rs, [big, big], ReduceScatterOptions()).wait()
    check("reduce_scatter_tensor_coalesced", rs, [r_new, r_new])
    b = torch.full((3,), float(rank))
    pg.broadcast(b, world - 1).wait()  # legacy broadcast(tensor, root)
    check("broadcast(tensor, root)", b, torch.full((3,), float(world - 1)))
    y = x.clone()
    pg.allreduce(y, dist.ReduceOp.MAX).wait()  # legacy allreduce(tensor, op)
    ref = x.clone()
    dist.all_reduce(ref, op=dist.ReduceOp.MAX, group=gl)
    check("allreduce(tensor, op)", y, ref)
    ins = [x, (x * 2)[:4], x[:1] + 0.5]
    og = [[torch.empty_like(t) for t in ins] for _ in range(world)]
    og_ref = [[torch.empty_like(t) for t in ins] for _ in range(world)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist.all_gather_coalesced(og, ins)
        dist.all_gather_coalesced(og_ref, ins, group=gl)
    check("all_gather_coalesced", [t for lst in og for t in lst], [t for lst in og_ref for t in lst])
    # a future callback that runs (and waits for) another collective of the same group
    a_cb, b_cb = torch.ones(4), torch.full((4,), 2.0)

    def in_callback(f: Any) -> Any:
        dist.all_reduce(b_cb)
        return f.value()

    dist.all_reduce(a_cb, async_op=True).get_future().then(in_callback).wait()
    check("collective waited for inside a future callback", [a_cb, b_cb],
          [torch.full((4,), float(world)), torch.full((4,), 2.0 * world)])
    # point to point: ring of send/recv, isend/irecv, any-source recv, batch_isend_irecv
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    payload = torch.arange(10, dtype=torch.float64) * (rank + 1)
    got = torch.empty(10, dtype=torch.float64)
    if rank % 2 == 0:
        dist.send(payload, nxt)
        dist.recv(got, prv)
    else:
        dist.recv(got, prv)
        dist.send(payload, nxt)
    check("send/recv", got, torch.arange(10, dtype=torch.float64) * (prv + 1))
    reqs = [dist.isend(payload.to(torch.bfloat16), nxt, tag=7), dist.irecv(got2 := torch.empty(10, dtype=torch.bfloat16), prv, tag=7)]
    for r in reqs:
        r.wait()
    check("isend/irecv bf16", got2, (torch.arange(10, dtype=torch.float64) * (prv + 1)).to(torch.bfloat16))
    if rank == 0:
        srcs = set()
        for _ in range(world - 1):
            buf = torch.empty(3, dtype=torch.int32)
            srcs.add(dist.recv(buf, tag=3))
            check("recv any source", buf, torch.full((3,), int(buf[0]), dtype=torch.int32))
        check("recv any source senders", torch.tensor(sorted(srcs)), torch.arange(1, world))
    else:
        dist.send(torch.full((3,), rank, dtype=torch.int32), 0, tag=3)
    bx = torch.empty(4, dtype=torch.int64)
    ops_list = [dist.P2POp(dist.isend, torch.full((4,), rank, dtype=torch.int64), nxt),
                dist.P2POp(dist.irecv, bx, prv)]
    for r in dist.batch_isend_irecv(ops_list):
        r.wait()
    check("batch_isend_irecv", bx, torch.full((4,), prv, dtype=torch.int64))
    # objects (all_gather_object / broadcast_object_list go through allgather/broadcast)
    objs: list[Any] = [None] * world
    dist.all_gather_object(objs, {"rank": rank, "s": "x" * rank})
    check("all_gather_object", torch.tensor([o["rank"] for o in objs]), torch.arange(world))
    bl = [f"hello from {rank}", rank]
    dist.broadcast_object_list(bl, src=world - 1)
    check("broadcast_object_list", torch.tensor([bl[1]]), torch.tensor([world - 1]))
    # barrier, and a subgroup of every other rank
    dist.barrier()
    evens = list(range(0, world, 2))
    sub = dist.new_group(evens)
    if rank in evens:
        z = torch.full((5,), float(rank + 1))
        dist.all_reduce(z, group=sub)
        check("subgroup all_reduce", z, torch.full((5,), float(sum(r + 1 for r in evens))))
        assert dist.get_world_size(sub) == len(evens) and dist.get_rank(sub) == evens.index(rank)
    # ranks that disagree on a collective get a clear error (no hang), and the group goes on
    err = ""
    try:
        dist.all_reduce(torch.ones(4 + rank))
    except RuntimeError as exc:
        err = str(exc)
    if "pyccl" not in err or "different arguments" not in err:
        failures.append(f"mismatched all_reduce: unclear error {err!r}")
    z = torch.ones(3)
    dist.all_reduce(z)
    check("all_reduce after a mismatch", z, torch.full((3,), float(world)))
    # errors are clear
    err = ""
    try:
        dist.all_reduce(torch.zeros(2, device="meta"))
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
    if "pyccl" not in err or "CUDA" not in err:
        failures.append(f"non-CPU tensor error is not clear: {err!r}")
    checked.append("non-CPU tensor error")
    dist.barrier()
    hub = __import__("pyccl.torch._runtime", fromlist=["RUNTIME"]).RUNTIME.hub
    hub_port = int(hub.address.rsplit(":", 1)[1])
    master_port = int(dist.group.WORLD.communicator.master_address.rsplit(":", 1)[1]) if rank == 0 else 0
    t0 = time.monotonic()
    dist.destroy_process_group()
    took = time.monotonic() - t0
    # destroy joins every pyccl thread it owns; a short grace covers a thread
    # descheduled between its last line and its exit on a busy machine
    grace = time.monotonic() + 0.3
    for t in [t for t in threading.enumerate() if "pyccl" in t.name]:
        t.join(max(0.0, grace - time.monotonic()))
    frames = sys._current_frames()
    leftover = [f"{t.name} (destroy took {took:.2f} s; at {''.join(traceback.format_stack(frames[t.ident])[-4:])})"
                for t in threading.enumerate() if "pyccl" in t.name and t.ident in frames]
    q.put(("result", rank, {"checked": checked, "failures": failures, "threads": leftover,
                            "ports": [p for p in (hub_port, master_port) if p]}))


# ---------------------------------------------------------------- failures


def failure_body(rank: int, q: Any, world: int, port: int, mode: str, hb_timeout: float) -> None:
    """Train DDP until a collective fails (the test kills or stops a rank).

    Reports ``("ready", rank, None)`` after the first step, then
    ``("failed", rank, (time, where, message, next_message, next_seconds))``:
    where the first failure surfaced (``backward``, ``wait``...), its text,
    and what the *next* collective raised and how long that took.
    """
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import pyccl.torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    init("pyccl", rank, world, f"tcp://127.0.0.1:{port}", pg_options=pyccl.torch.Options(heartbeat_timeout=hb_timeout))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    model = DDP(net, bucket_cap_mb=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 256)
    big = torch.ones(1 << 18)
    step = 0
    where = ""
    message = ""
    while True:
        try:
            where = "backward"
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            where = "async all_reduce wait"
            dist.all_reduce(big, async_op=True).wait()
        except Exception as exc:
            t_fail = time.time()
            message = f"{type(exc).__name__}: {exc}"
            first_is_runtime_error = isinstance(exc, RuntimeError)
            break
        step += 1
        if step == 3:
            q.put(("ready", rank, None))
    t0 = time.perf_counter()
    next_is_runtime_error = False
    try:
        dist.all_reduce(torch.ones(4))
        next_message = "(no error)"
    except Exception as exc:
        next_message = f"{type(exc).__name__}: {exc}"
        next_is_runtime_error = isinstance(exc, RuntimeError)
    next_seconds = time.perf_counter() - t0
    q.put(("failed", rank, {"time": t_fail, "where": where, "message": message, "next": next_message,
                            "next_seconds": next_seconds,
                            "runtime_errors": first_is_runtime_error and next_is_runtime_error}))
    t0 = time.perf_counter()
    dist.destroy_process_group()
    q.put(("destroyed", rank, time.perf_counter() - t0))
