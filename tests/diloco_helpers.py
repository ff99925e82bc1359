"""Shared pieces of the DiLoCo tests: a tiny model, its data, the peer
processes' bodies and a single-process reference of the algorithm.

Children are started with the ``spawn`` context and import this module by
name (pytest puts ``tests/`` on ``sys.path`` and spawn hands it over). Each
child reports through its own pipe (never a shared queue: a SIGKILL during a
write would wedge a shared queue for every peer).
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

CTX = mp.get_context("spawn")
H = 4  # inner steps per outer step in the tests


# ------------------------------------------------------------------ model


def make_model(seed: int = 0) -> Any:
    """A small MLP with a float64 parameter, so DiLoCo reduces two dtypes."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(8, 16)
            self.l2 = torch.nn.Linear(16, 4)
            self.scale = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x: Any) -> Any:
            return self.l2(torch.tanh(self.l1(x))) * self.scale.float()

    torch.manual_seed(seed)
    return Net()


def batch(rank: int, step: int) -> tuple[Any, Any]:
    """Peer ``rank``'s data at inner step ``step`` (deterministic)."""
    import torch

    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 8, generator=g)
    w = torch.linspace(-1, 1, 32).reshape(8, 4)
    return x, torch.sin(x @ w)


def train_step(model: Any, rank: int, step: int) -> float:
    import torch

    x, y = batch(rank, step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return float(loss.detach())


def make_inner(model: Any) -> Any:
    import torch

    return torch.optim.AdamW(model.parameters(), lr=0.02)


def global_arrays(dl: Any) -> list[np.ndarray]:
    return [t.detach().numpy().copy() for _, t in dl.global_parameters()]


# ---------------------------------------------------------------- reference


def reference(opts: dict[str, Any], steps: int, ranks: tuple[int, ...] = (0, 1)) -> list[list[np.ndarray]]:
    """DiLoCo for two peers simulated in one process, per-parameter tensors,
    written from the algorithms' definitions (not from the implementation).

    ``opts``: ``delayed`` (False, True, "eager", "lookahead"), ``fragments``,
    ``sync_delay`` and ``mixing`` as DiLoCo takes them. With two peers a ring
    all-reduce computes a + b (= b + a) at each chunk's owner, so the average
    (a + b) / 2 here is bit-identical to the multi-process result. Returns
    the global parameters after every outer step (not after streaming landings).
    """
    from pyccl.diloco import partition

    import torch

    assert len(ranks) == 2
    delayed = opts.get("delayed", False)
    fragments = opts.get("fragments", 1)
    tau = opts.get("sync_delay", 0)
    alpha = opts.get("mixing", 0.5)
    if delayed == "overlap":  # streaming's overlap on the whole model, rebased
        delayed, tau = False, tau or max(1, H // max(2, fragments))
        alpha = opts.get("mixing", "rebase")
    rebase = alpha == "rebase"
    eager = delayed in ("eager", "lookahead")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = make_model()
        models = [copy.deepcopy(base) for _ in ranks]
        inners = [make_inner(m) for m in models]
        theta = [p.detach().clone() for p in base.parameters()]
        outer = torch.optim.SGD(theta, lr=0.7, momentum=0.9, nesterov=True)  # lazily created momentum
        frags = partition([p.numel() for p in theta], fragments)
        offsets = {f * H // fragments: f for f in range(fragments)}
        landings = {(f * H // fragments + tau) % H: f for f in range(fragments)} if tau else {}
        pending: dict[int, list[Any]] = {}
        mine: dict[int, list[list[Any]]] = {}       # eager: each peer's last pseudo-gradient of a fragment
        starts = [[t.clone() for t in theta] for _ in ranks]  # eager, rebase: each peer's start point
        anchors = [[t.clone() for t in theta] for _ in ranks]  # rebase: the local parameters at the last sync
        snaps = []

        def outer_step(idx: list[int], grads: list[Any]) -> None:
            for i, g in zip(idx, grads):
                theta[i].grad = g
            outer.step()
            for i in idx:
                theta[i].grad = None

        def trial(idx: list[int], grads: list[Any]) -> list[Any]:
            """One outer step on copies: the parameters it would produce."""
            copies = [theta[i].detach().clone() for i in idx]
            opt = torch.optim.SGD(copies, lr=0.7, momentum=0.9, nesterov=True)
            for c, i in zip(copies, idx):
                buf = outer.state[theta[i]].get("momentum_buffer")
                opt.state[c]["momentum_buffer"] = buf.clone() if buf is not None else torch.zeros_like(c)
                c.grad = grads[idx.index(i)]
            opt.step()
            return copies

        for s in range(1, steps + 1):
            for r, m, opt in zip(ranks, models, inners):
                train_step(m, r, s)
                opt.step()
                opt.zero_grad(set_to_none=True)
            local = [list(m.parameters()) for m in models]
            g = landings.get(s % H)
            if g is not None and g in pending:  # a streaming fragment's sum arrives: apply it, mix the locals
                idx = frags[g]
                outer_step(idx, [t / 2.0 for t in pending.pop(g)])
                with torch.no_grad():
                    for k in range(2):
                        for i in idx:
                            if rebase:  # keep the progress since the sync, on the new global parameters
                                local[k][i].sub_(anchors[k][i]).add_(theta[i])
                                starts[k][i] = theta[i].detach().clone()
                            else:
                                local[k][i].mul_(alpha).add_(theta[i], alpha=1.0 - alpha)
            f = offsets.get(s % H)
            if f is None:
                continue
            idx = frags[f]
            src = starts if eager or (tau and rebase) else [theta, theta]
            deltas = [[src[k][i] - local[k][i].detach() for i in idx] for k in range(2)]
            if tau:
                pending[f] = [a + b for a, b in zip(*deltas)]
                for k in range(2):
                    for i in idx:
                        anchors[k][i] = local[k][i].detach().clone()
                snaps.append([t.detach().numpy().copy() for t in theta])
                continue
            if not delayed:
                outer_step(idx, [(a + b) / 2 for a, b in zip(*deltas)])
            else:
                prev = pending.get(f)
                if eager:
                    # the stand-in for the average in flight, per peer
                    if delayed == "eager" and prev is not None:
                        proxies = [[(p - o + d) / 2.0 for p, o, d in zip(prev, mine[f][k], deltas[k])]
                                   for k in range(2)]
                    else:
                        proxies = [list(deltas[k]) for k in range(2)]
                if prev is not None:  # the sum started one outer step of this fragment ago
                    outer_step(idx, [t / 2.0 for t in prev])
                pending[f] = [a + b for a, b in zip(*deltas)]
                if eager:
                    mine[f] = deltas
                    for k in range(2):
                        for i, v in zip(idx, trial(idx, proxies[k])):
                            starts[k][i] = v
            with torch.no_grad():
                for k in range(2):
                    for i in idx:
                        local[k][i].copy_(starts[k][i] if eager else theta[i])
            snaps.append([t.detach().numpy().copy() for t in theta])
        return snaps
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------ processes


class Peers:
    """Peer processes, each with its own pipe back to the test; every one is
    killed and joined on exit."""

    def __init__(self) -> None:
        self.procs: dict[str, Any] = {}
        self.pipes: dict[str, Any] = {}

    def start(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        r, w = CTX.Pipe(duplex=False)
        p = CTX.Process(target=_run_child, args=(fn, w, *args), name=f"diloco-{name}", daemon=True)
        p.start()
        w.close()
        self.procs[name], self.pipes[name] = p, r

    def recv(self, name: str, timeout: float = 60.0) -> Any:
        pipe = self.pipes[name]
        if not pipe.poll(timeout):
            raise AssertionError(f"peer {name} sent nothing within {timeout} s")
        try:
            msg = pipe.recv()
        except EOFError:
            raise AssertionError(f"peer {name} exited (code {self.procs[name].exitcode}) without reporting") from None
        if isinstance(msg, tuple) and msg and msg[0] == "crash":
            raise AssertionError(f"peer {name} crashed:\n{msg[1]}")
        return msg

    def poll_any(self, timeout: float) -> list[tuple[str, Any]]:
        """Messages that arrive within ``timeout`` from any peer (closed pipes are dropped)."""
        import multiprocessing.connection as mpc

        by_pipe = {id(p): n for n, p in self.pipes.items()}
        out = []
        for p in mpc.wait(list(self.pipes.values()), timeout):
            name = by_pipe[id(p)]
            try:
                msg = p.recv()  # type: ignore[union-attr,call-arg]
            except (EOFError, OSError):
                del self.pipes[name]
                continue
            if isinstance(msg, tuple) and msg and msg[0] == "crash":
                raise AssertionError(f"peer {name} crashed:\n{msg[1]}")
            out.append((name, msg))
        return out

    def kill(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].join(10)
        self.pipes.pop(name, None)

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs.values():
            p.join(timeout=0 if exc[0] else 10)
            if p.is_alive():
                p.kill()
                p.join(10)


def _run_child(fn: Callable[..., None], pipe: Any, *args: Any) -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Ask Linux to kill this child if the test process dies.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    try:
        fn(pipe, *args)
    except BaseException:
        try:
            pipe.send(("crash", traceback.format_exc()))
        except OSError:
            pass


def connect(master: str, world: int, group: int = 0, timeout: float = 60.0) -> Any:
    """Connect and call update_topology() until the group has ``world`` members."""
    import pyccl

    comm = pyccl.Communicator(master, peer_group=group, connections=1)
    comm.connect(timeout=timeout)
    deadline = time.monotonic() + timeout
    while comm.world_size < world:
        if time.monotonic() > deadline:
            raise AssertionError(f"group {group} did not reach {world} members")
        if not comm.update_topology():
            time.sleep(0.005)
    return comm


# ---------------------------------------------------------- peer bodies


def exact_peer(pipe: Any, master: str, rank: int, modes: list[dict[str, Any]], steps: int,
               group_base: int = 0) -> None:
    """Run every mode (DiLoCo keyword arguments) on its own peer group;
    report the global parameters after every outer step."""
    from pyccl.diloco import DiLoCo, sync_offsets

    import torch

    torch.set_num_threads(1)
    for group, opts in enumerate(modes, start=group_base):
        comm = connect(master, 2, group=group)
        model = make_model()
        dl = DiLoCo(model, make_inner(model), comm, sync_every=H, **opts)
        offsets = set(sync_offsets(H, dl.fragments))
        for s in range(1, steps + 1):
            train_step(model, rank, s)
            info = dl.step()
            if info is not None and info.inner_step % H in offsets:  # outer steps, not streaming landings
                pipe.send(("outer", group, info.outer_step, info.fragment, info.inner_step, info.world_size,
                           global_arrays(dl)))
        dl.finish()
        pipe.send(("done", group))
        comm.close()


def churn_peer(pipe: Any, master: str, rank: int, opts: dict[str, Any], initial: int, pace: float,
               limit: float) -> None:
    """Train until three outer steps of fragment 0 have applied an average
    that a peer admitted after the first ``initial`` ones took part in (the
    stop is decided from the all-reduce's participant list, which every
    participant gets identically, so all peers stop at the same step).

    Every peer starts from a different initialization: the first sync makes
    them identical.
    """
    import pyccl
    from pyccl.diloco import DiLoCo, sync_offsets

    import torch

    torch.set_num_threads(1)
    deadline = time.monotonic() + limit
    comm = pyccl.Communicator(master, connections=1, name=f"rank{rank}")
    comm.connect(timeout=limit)
    model = make_model(seed=100 + rank) if not opts.get("quantize") else make_wide_model(seed=100 + rank)
    dl = DiLoCo(model, make_inner(model), comm, sync_every=H, **opts)
    local_is_global = all(torch.equal(p, g) for p, (_, g) in zip(model.parameters(), dl.global_parameters()))
    pipe.send(("joined", comm.peer_id, dl.state.revision, dl.inner_step, dl.state_hash(), local_is_global,
               dl.join_info.rx_bytes))
    offsets = set(sync_offsets(H, dl.fragments))
    seen = 0
    while seen < 3:
        if time.monotonic() > deadline:
            raise AssertionError(f"no joiner took part within {limit} s")
        train_step(model, rank, dl.inner_step + 1)
        info = dl.step()
        time.sleep(pace)
        if info is None:
            continue
        if info.inner_step % H in offsets:  # an outer step (not only a streaming landing): report the state
            pipe.send(("outer", comm.peer_id, info.outer_step, info.revision, info.fragment, dl.state_hash(),
                       info.peers, info.world_size, info.retries))
        if info.applied and info.fragment == 0 and info.peers and max(info.peers) > initial:
            seen += 1
    dl.finish()
    pipe.send(("final", comm.peer_id, dl.inner_step, dl.state_hash(),
               [p.detach().numpy().tobytes() for p in model.parameters()]))
    comm.close()


def make_wide_model(seed: int = 0) -> Any:
    """float32 only, ~8K parameters: big enough that quantization headers are noise."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4))


def quant_peer(pipe: Any, master: str, rank: int, modes: list[tuple[bool, str | None]], steps: int) -> None:
    """Each (delayed, quantize) mode on its own peer group; report the global
    parameters and the all-reduce bytes sent after every outer step."""
    from pyccl.diloco import DiLoCo

    import torch

    torch.set_num_threads(1)
    for group, (delayed, quantize) in enumerate(modes):
        comm = connect(master, 2, group=group)
        model = make_wide_model()
        dl = DiLoCo(model, make_inner(model), comm, sync_every=H, delayed=delayed, quantize=quantize)
        for s in range(1, steps + 1):
            train_step(model, rank, s)
            info = dl.step()
            if info is not None:
                pipe.send(("outer", group, info.outer_step, info.tx_bytes if info.applied else 0, global_arrays(dl)))
        dl.finish()
        pipe.send(("done", group))
        comm.close()
