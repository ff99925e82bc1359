"""Child-process bodies for tests/test_torch_conformance.py: where the pyccl
backend must behave exactly as gloo does (empty tensors, timeouts, the
monitored barrier, device-type introspection for state dicts and
checkpoints, sparse all-reduce).

Each body reports ``("result", rank, {"failures": [...], ...})``; a check
that would hang is bounded by ``Work.wait(timeout)`` and reported as a
failure instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.nn as nn

import torch
from torch_workers import digest, init

WAIT = timedelta(seconds=15)


def _setup(rank: int, world: int, port: int, **kw: Any) -> Any:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    init("pyccl", rank, world, f"tcp://127.0.0.1:{port}", **kw)
    return dist.new_group(backend="gloo")


def _both(failures: list[str], name: str, run: Callable[[Any], Any], gloo: Any) -> None:
    """``run(group)`` on pyccl (default group) and gloo; their outputs must be equal."""
    try:
        ours = run(None)
    except Exception as exc:
        failures.append(f"{name}: pyccl raised {type(exc).__name__}: {exc}"[:500])
        return
    theirs = run(gloo)
    ours_l = ours if isinstance(ours, (list, tuple)) else [ours]
    theirs_l = theirs if isinstance(theirs, (list, tuple)) else [theirs]
    if [(t.dtype, t.shape, digest(t)) for t in ours_l] != [(t.dtype, t.shape, digest(t)) for t in theirs_l]:
        failures.append(f"{name}: pyccl {ours_l} != gloo {theirs_l}"[:500])


# ------------------------------------------------------------ empty tensors


class _WithEmptyParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        self.nothing = nn.Parameter(torch.empty(0))  # used (it adds 0), so DDP reduces its empty grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.nothing.sum()


def empty_body(rank: int, q: Any, world: int, port: int) -> None:
    gl = _setup(rank, world, port)
    failures: list[str] = []
    e = torch.empty(0)

    def w(work: Any) -> None:
        if not hasattr(work, "get_future"):  # all_gather_coalesced hands out a future, not a Work
            work.wait()
        else:
            work.wait(WAIT)

    def all_reduce(g: Any) -> Any:
        x = e.clone()
        w(dist.all_reduce(x, group=g, async_op=True))
        return x

    def broadcast(g: Any) -> Any:
        x = torch.empty(0, 3)
        w(dist.broadcast(x, src=world - 1, group=g, async_op=True))
        return x

    def all_gather(g: Any) -> Any:
        outs = [e.clone() for _ in range(world)]
        w(dist.all_gather(outs, e, group=g, async_op=True))
        return outs

    def all_gather_into_tensor(g: Any) -> Any:
        out = torch.empty(0)
        w(dist.all_gather_into_tensor(out, e, group=g, async_op=True))
        return out

    def all_gather_coalesced(g: Any) -> Any:
        outs = [[e.clone(), torch.empty(0, 2)] for _ in range(world)]
        w(dist.all_gather_coalesced(outs, [e, torch.empty(0, 2)], group=g, async_op=True))
        return [t for lst in outs for t in lst]

    def all_to_all_single(g: Any) -> Any:
        out = torch.empty(0, 4)
        w(dist.all_to_all_single(out, torch.empty(0, 4), group=g, async_op=True))
        return out

    def reduce_scatter_tensor(g: Any) -> Any:
        out = torch.empty(0)
        w(dist.reduce_scatter_tensor(out, torch.empty(0), group=g, async_op=True))
        return out

    def all_reduce_sync(g: Any) -> Any:  # async_op=False: the inline path
        x = torch.empty(0, dtype=torch.int64)
        dist.all_reduce(x, group=g)
        return x

    def send_recv(g: Any) -> Any:
        x = torch.empty(0)
        if rank == 0:
            w(dist.isend(x, dst=1, group=g))
        elif rank == 1:
            w(dist.irecv(x, src=0, group=g))
        return x

    for name, fn in [("all_reduce", all_reduce), ("broadcast", broadcast), ("all_gather", all_gather),
                     ("all_gather_into_tensor", all_gather_into_tensor),
                     ("all_gather_coalesced", all_gather_coalesced), ("all_to_all_single", all_to_all_single),
                     ("reduce_scatter_tensor", reduce_scatter_tensor), ("all_reduce sync", all_reduce_sync),
                     ("send/recv", send_recv)]:
        _both(failures, name, fn, gl)

    # DDP with a zero-element parameter: its constructor broadcasts every parameter.
    from torch.nn.parallel import DistributedDataParallel as DDP

    losses: dict[str, list[float]] = {}
    for label, g in (("pyccl", None), ("gloo", gl)):
        torch.manual_seed(0)
        net = _WithEmptyParameter()
        try:
            model = DDP(net, process_group=g)
        except Exception as exc:
            failures.append(f"DDP with a zero-element parameter: {label} raised {exc}"[:500])
            continue
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(rank)
        xs = torch.randn(3, 4, 8)
        losses[label] = []
        for x in xs:
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            losses[label].append(loss.item())
    if losses.get("pyccl") != losses.get("gloo"):
        failures.append(f"DDP losses differ: {losses}")
    dist.destroy_process_group()
    q.put(("result", rank, {"failures": failures}))


# ---------------------------------------------------------------- timeouts


def timeout_body(rank: int, q: Any, world: int, port: int) -> None:
    """Rank 0 calls ops no other rank calls; each must fail after its timeout."""
    _setup(rank, world, port)
    report: dict[str, Any] = {"failures": []}

    def expect_timeout(name: str, call: Callable[[], Any], low: float, high: float) -> None:
        t0 = time.monotonic()
        try:
            call()
        except RuntimeError as exc:
            took = time.monotonic() - t0
            report[name] = (took, str(exc))
            if not low <= took <= high:
                report["failures"].append(f"{name}: raised after {took:.2f} s, expected {low}-{high} s: {exc}")
            return
        report["failures"].append(f"{name}: returned after {time.monotonic() - t0:.2f} s without an error")

    g_barrier = dist.new_group(timeout=timedelta(seconds=1))
    g_sync = dist.new_group(timeout=timedelta(seconds=2))
    g_async = dist.new_group(timeout=timedelta(seconds=2))
    g_wait = dist.new_group(timeout=timedelta(seconds=60))
    g_recv = dist.new_group(timeout=timedelta(seconds=1))
    if rank == 0:
        expect_timeout("barrier", lambda: dist.barrier(group=g_barrier), 0.9, 3.0)
        expect_timeout("sync all_reduce", lambda: dist.all_reduce(torch.ones(4), group=g_sync), 1.9, 4.0)
        expect_timeout("async all_reduce", lambda: dist.all_reduce(torch.ones(1 << 16), group=g_async,
                                                                   async_op=True).wait(), 1.9, 4.0)
        work = dist.all_reduce(torch.ones(4), group=g_wait, async_op=True)
        expect_timeout("Work.wait(0.5 s)", lambda: work.wait(timedelta(seconds=0.5)), 0.45, 1.5)
        expect_timeout("recv", lambda: dist.recv(torch.empty(3), src=1, group=g_recv), 0.9, 3.0)
        # After the timeout the group refuses further work at once.
        expect_timeout("barrier after the timeout", lambda: dist.barrier(group=g_barrier), 0.0, 0.5)
    dist.barrier()  # the default group is untouched
    t0 = time.monotonic()
    dist.destroy_process_group()
    report["destroy_seconds"] = time.monotonic() - t0
    q.put(("result", rank, report))


# -------------------------------------------------------- monitored barrier


def monitored_body(rank: int, q: Any, world: int, port: int) -> None:
    _setup(rank, world, port)
    pg = dist.distributed_c10d._get_default_group()
    report: dict[str, Any] = {"failures": []}
    pg.monitored_barrier(timedelta(seconds=10))  # everyone: passes
    pg.monitored_barrier(timedelta(seconds=10), wait_all_ranks=True)
    dist.barrier()
    if rank == 0:
        for name, kw, timeout, pattern in [
            ("first missing", {}, 1.0, "Rank 1 failed to pass monitoredBarrier in 1000 ms"),
            ("all missing", {"wait_all_ranks": True}, 1.0,
             f"Ranks {', '.join(str(r) for r in range(1, world))} failed to pass monitoredBarrier"),
            ("zero timeout", {}, 0.0, "Rank 0 timed out in monitoredBarrier after 0 ms"),
        ]:
            t0 = time.monotonic()
            try:
                pg.monitored_barrier(timedelta(seconds=timeout), **kw)
                report["failures"].append(f"{name}: passed although no other rank called it")
            except RuntimeError as exc:
                took = time.monotonic() - t0
                report[name] = (took, str(exc))
                if pattern not in str(exc):
                    report["failures"].append(f"{name}: {exc!s} does not say {pattern!r}")
                if not timeout - 0.05 <= took <= timeout + 1.0:
                    report["failures"].append(f"{name}: raised after {took:.2f} s with a {timeout} s timeout")
    dist.barrier()
    dist.destroy_process_group()
    q.put(("result", rank, report))


# ------------------------------------------- state dicts and checkpoints


def state_dict_body(rank: int, q: Any, world: int, port: int, ckpt_dir: str) -> None:
    """FSDP2 state-dict and checkpoint utilities, pyccl against gloo."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    _setup(rank, world, port)
    failures: list[str] = []
    pg = dist.distributed_c10d._get_default_group()
    if [d.type for d in pg._device_types] != ["cpu"]:
        failures.append(f"_device_types is {pg._device_types}, expected [cpu]")
    results: dict[str, dict[str, str]] = {}
    for label in ("pyccl", "gloo"):
        group = None if label == "pyccl" else dist.new_group(backend="gloo")
        mesh = DeviceMesh.from_group(group or pg, "cpu", mesh_dim_names=("dp",))

        def sharded_model(mesh: Any = mesh) -> nn.Module:
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
            for layer in m:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(m, mesh=mesh)
            return m

        model = sharded_model()
        # rank 0's full state dict, broadcast into the sharded model
        torch.manual_seed(1)
        full = {k: torch.randn_like(v.full_tensor()) for k, v in model.state_dict().items()}  # (collective)
        if rank != 0:
            full = {}
        try:
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=True))
            got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        except Exception as exc:
            failures.append(f"{label}: state dict round trip raised {type(exc).__name__}: {exc}"[:800])
            continue
        res = {f"full/{k}": digest(v) for k, v in got.items()}
        # torch.distributed.checkpoint: save (sync and async) and load into a fresh model
        path = f"{ckpt_dir}/{label}"
        dcp.save({"model": model.state_dict()}, checkpoint_id=f"{path}/sync", process_group=group)
        dcp.async_save({"model": model.state_dict()}, checkpoint_id=f"{path}/async",
                       process_group=group).result(timeout=60)
        for kind in ("sync", "async"):
            fresh = sharded_model()
            target = {"model": fresh.state_dict()}
            dcp.load(target, checkpoint_id=f"{path}/{kind}", process_group=group)
            for k, v in fresh.state_dict().items():
                res[f"{kind}/{k}"] = digest(v.full_tensor())
        results[label] = res
    if len(results) == 2 and results["pyccl"] != results["gloo"]:
        failures.append("pyccl and gloo state dicts differ: "
                        + str({k: (v, results["gloo"].get(k)) for k, v in results["pyccl"].items()
                               if results["gloo"].get(k) != v})[:800])
    dist.barrier()
    dist.destroy_process_group()
    q.put(("result", rank, {"failures": failures, "keys": sorted(results.get("pyccl", {}))}))


# ------------------------------------------------------------------ sparse


def sparse_body(rank: int, q: Any, world: int, port: int) -> None:
    gl = _setup(rank, world, port)
    failures: list[str] = []

    def sparse_input() -> torch.Tensor:
        g = torch.Generator().manual_seed(rank)
        idx = torch.randint(0, 10, (2, 6), generator=g)
        idx[:, 0] = torch.tensor([rank, rank])  # rank-dependent entries, some shared across ranks
        return torch.sparse_coo_tensor(idx, torch.randn(6, 3, generator=g), (10, 10, 3))

    def run(g: Any) -> Any:
        x = sparse_input()
        dist.all_reduce(x, group=g, async_op=True).wait(WAIT)
        x = x.coalesce()
        return [x.indices(), x.values()]

    _both(failures, "sparse all_reduce", run, gl)
    empty = torch.sparse_coo_tensor(torch.empty(2, 0, dtype=torch.int64), torch.empty(0), (4, 4))
    _both(failures, "sparse all_reduce of an all-zero tensor", lambda g: (
        dist.all_reduce(x := empty.clone(), group=g), x.coalesce().values())[1], gl)

    # DDP over an nn.Embedding(sparse=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    losses: dict[str, list[float]] = {}
    weights: dict[str, str] = {}
    for label, g in (("pyccl", None), ("gloo", gl)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(8 * 4, 1))
        # Beyond 2 ranks a dense float sum depends on the ring's order, which
        # differs from gloo's: train only the sparse part there, so the
        # comparison stays bit for bit (sparse sums run in rank order in both).
        net[2].requires_grad_(world == 2)
        model = DDP(net, process_group=g)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)
        losses[label] = []
        for _ in range(4):
            tokens = torch.randint(0, 50, (5, 4), generator=gen)
            opt.zero_grad()
            loss = model(tokens).square().mean()
            loss.backward()
            opt.step()
            losses[label].append(loss.item())
        weights[label] = digest(net[0].weight)
    if losses["pyccl"] != losses["gloo"] or weights["pyccl"] != weights["gloo"]:
        failures.append(f"DDP with a sparse embedding differs from gloo: {losses}")
    dist.destroy_process_group()
    q.put(("result", rank, {"failures": failures, "losses": losses["pyccl"]}))


# --------------------------------------------------------- a run with a secret


def secret_body(rank: int, q: Any, world: int, port: int) -> None:
    """PYCCL_SECRET set: the in-process master, the ring and the side channel
    all prove membership; a stranger without the secret is refused."""
    import os

    import pyccl

    gl = _setup(rank, world, port)
    failures: list[str] = []
    pg = dist.distributed_c10d._get_default_group()
    comm = pg.communicator
    if len(comm.membership_key) != 32:
        failures.append("no membership key in a run with a secret")

    def collectives(g: Any) -> Any:
        x = torch.arange(8, dtype=torch.float32) + rank
        dist.all_reduce(x, group=g)
        out = torch.empty(world * 2)
        dist.all_to_all_single(out, torch.arange(world * 2, dtype=torch.float32) + 10 * rank, group=g)
        y = torch.full((3,), float(rank))
        if rank == 0:
            dist.send(y, dst=1, group=g)
        elif rank == 1:
            dist.recv(y, src=0, group=g)
        return [x, out, y]

    _both(failures, "collectives and side channel", collectives, gl)
    if rank == 0:
        secret = os.environ.pop("PYCCL_SECRET")
        try:
            pyccl.Communicator(comm.master_address, peer_group=12345).connect(timeout=10)
            failures.append("a Communicator without the secret was admitted")
        except pyccl.AuthenticationError:
            pass
        finally:
            os.environ["PYCCL_SECRET"] = secret
    dist.barrier()
    dist.destroy_process_group()
    q.put(("result", rank, {"failures": failures}))


# ----------------------------------------------------------------- profiler


def profiler_body(rank: int, q: Any, world: int, port: int) -> None:
    """Every collective records a ``pyccl:<op>`` event, asynchronous and with
    the inputs' shapes, as gloo's record ``gloo:<op>`` (torch's suite checks it)."""
    _setup(rank, world, port)
    failures: list[str] = []
    x = torch.ones(5, 3)
    y = torch.ones(7)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        dist.all_reduce(x)                      # synchronous: completes inline on this thread
        dist.all_reduce(x, async_op=True).wait()
        dist.broadcast(y, src=0)
        if rank == 0:
            dist.send(y, dst=1)
        elif rank == 1:
            dist.recv(y, src=0)
    events = [e for e in prof.events() if e.name.startswith("pyccl:")]
    by_name: dict[str, list[Any]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e)
    want = {"pyccl:all_reduce": 2, "pyccl:broadcast": 1}
    if rank in (0, 1) and world > 1:
        want["pyccl:send" if rank == 0 else "pyccl:recv"] = 1
    for name, count in want.items():
        got = by_name.get(name, [])
        if len(got) != count:
            failures.append(f"{name}: {len(got)} events, expected {count} (all: {sorted(by_name)})")
        for e in got:
            if not e.is_async:
                failures.append(f"{name}: event is not async")
    shapes = [e.input_shapes for e in by_name.get("pyccl:all_reduce", [])]
    if shapes and any(s != [[5, 3]] for s in shapes):
        failures.append(f"pyccl:all_reduce input shapes {shapes}, expected [[5, 3]]")
    dist.destroy_process_group()
    q.put(("result", rank, {"failures": failures}))
