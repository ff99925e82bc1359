"""torch.distributed backend "pyccl" vs "gloo", side by side in one run.

Two worker processes on loopback hold both backends at once: the default
process group is pyccl and a gloo group spans the same ranks. Every
measurement alternates between the two (gloo block, pyccl block, gloo
block, ...) so machine noise hits both alike.

* DDP step time (forward + backward + optimizer step) of a small transformer
  language model (~3.7 M parameters), median over steps;
* ``dist.all_reduce``, ``dist.all_gather_into_tensor`` and
  ``dist.reduce_scatter_tensor`` at 1 KiB, 1 MiB and 64 MiB (size = the full
  tensor: the all-reduced tensor, the gathered output, the reduce-scatter
  input), float32: the slowest rank's time per op, median over repetitions.

    python benchmarks/torch_backend.py            # about a minute or two on 2 cores
    python benchmarks/torch_backend.py --quick    # fewer repetitions

Writes benchmarks/results/torch_backend.md.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import queue
import socket
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = [("1 KiB", 1 << 10), ("1 MiB", 1 << 20), ("64 MiB", 64 << 20)]
OPS = ["all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(ctx, world: int, quick: bool, attempts: int = 3) -> tuple[int, dict]:
    """Start the ranks and wait for rank 0's results. A rank that dies (for
    example when another process took the rendezvous port between
    free_port() and the bind) fails the attempt at once instead of leaving
    the wait to its timeout; the next attempt gets a fresh port."""
    for attempt in range(1, attempts + 1):
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, quick, q), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 1800
        try:
            while time.monotonic() < deadline:
                try:
                    return q.get(timeout=1.0)
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        break
            else:
                raise TimeoutError("the benchmark's ranks did not report within 1800 s")
        finally:
            for p in procs:
                p.join(5)
                if p.exitcode is None:
                    p.kill()
                    p.join(5)
        print(f"attempt {attempt}: a rank exited with {[p.exitcode for p in procs]}; retrying on a new port")
    raise RuntimeError(f"the benchmark's ranks failed {attempts} times (see their tracebacks above)")


def samples_for(nbytes: int, quick: bool) -> int:
    """Timed ops per backend. Every op is timed on its own, the two backends
    alternate op by op (the first one alternates too), so load from other
    processes hits both alike."""
    if nbytes <= 4 << 10:
        n = 400
    elif nbytes <= 1 << 20:
        n = 80
    else:
        n = 8
    return max(2, n // 4) if quick else n


def build_model():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.ln2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class LM(nn.Module):
        def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, heads: int = 4) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
            self.head = nn.Linear(d, vocab)

        def forward(self, t):
            x = self.emb(t)
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    return LM()


def worker(rank: int, world: int, port: int, quick: bool, q) -> None:
    import pyccl.torch  # noqa: F401
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import torch

    torch.set_num_threads(1)
    dist.init_process_group("pyccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    groups = {"pyccl": dist.group.WORLD, "gloo": dist.new_group(backend="gloo")}
    gloo = groups["gloo"]

    def timed(fns: dict[str, object], samples: int) -> dict[str, float]:
        """Median over ``samples`` of the slowest rank's time of one call, per backend."""
        times = {name: [] for name in fns}
        names = list(fns)
        for i in range(samples):
            for name in (names if i % 2 == 0 else names[::-1]):
                dist.barrier(group=gloo)
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
        out = {}
        for name, v in times.items():
            t = torch.tensor(v, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=gloo)  # slowest rank, sample by sample
            out[name] = float(t.median().item())
        return out

    results: dict[str, dict[str, float]] = {}

    # ---------------------------------------------------------------- DDP
    torch.manual_seed(0)
    models = {}
    for name, g in groups.items():
        torch.manual_seed(0)
        m = DDP(build_model(), process_group=g)
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    nparams = sum(p.numel() for p in models["gloo"][0].parameters())
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 1000, (4, 65), generator=gen)

    def step(name: str) -> None:
        m, opt = models[name]
        opt.zero_grad(set_to_none=True)
        logits = m(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 1000), tokens[:, 1:].reshape(-1)).backward()
        opt.step()

    for name in groups:  # warm up
        for _ in range(2):
            step(name)
    results["ddp"] = timed({name: (lambda name=name: step(name)) for name in groups}, 6 if quick else 24)
    models.clear()

    # --------------------------------------------------------- collectives
    n = world
    for label, nbytes in SIZES:
        numel = nbytes // 4
        full = torch.randn(numel)
        part = torch.randn(numel // n)
        for opname in OPS:
            out_ag = torch.empty(numel)
            out_rs = torch.empty(numel // n)

            def run(g, opname=opname, out_ag=out_ag, out_rs=out_rs, full=full, part=part) -> None:
                if opname == "all_reduce":
                    dist.all_reduce(full, group=g)
                elif opname == "all_gather_into_tensor":
                    dist.all_gather_into_tensor(out_ag, part, group=g)
                else:
                    dist.reduce_scatter_tensor(out_rs, full, group=g)

            for g in groups.values():  # warm up
                run(g)
            full.normal_()
            results[f"{opname} {label}"] = timed(
                {name: (lambda g=g: run(g)) for name, g in groups.items()}, samples_for(nbytes, quick)
            )
            full.normal_()  # (repeated in-place sums grow; start afresh)
    if rank == 0:
        q.put((nparams, results))
    dist.destroy_process_group()


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 10 else f"{seconds:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "torch_backend.md"))
    args = ap.parse_args()
    world = 2
    ctx = mp.get_context("spawn")
    t0 = time.time()
    nparams, results = run_workers(ctx, world, args.quick)
    rows = []
    for key, r in results.items():
        g, p = r["gloo"], r["pyccl"]
        label = f"DDP step ({nparams / 1e6:.1f} M-param transformer)" if key == "ddp" else key
        rows.append(f"| {label} | {fmt(g)} | {fmt(p)} | {g / p:.2f}x |")
    cmd = "python benchmarks/torch_backend.py" + (" --quick" if args.quick else "")
    text = "\n".join(
        [
            f"# torch.distributed backend: pyccl vs gloo ({datetime.date.today()}, {platform.node() or 'host'}, "
            f"{os.cpu_count()} cores, loopback, {world} processes)",
            "",
            f"Command: `{cmd}` ({time.time() - t0:.0f} s). Both backends live in the same two processes "
            "(default group pyccl, a gloo group of the same ranks) and alternate op by op; every op is timed "
            "on its own after a barrier. Times: median over samples of the slowest rank's time per op "
            "(DDP: per step). "
            "Sizes are float32 tensors: the all-reduced tensor, the all-gather output, the reduce-scatter input. "
            "pyccl uses its defaults (4 connections per neighbour, in-process master).",
            "",
            "ratio = gloo time / pyccl time (above 1: pyccl is faster).",
            "",
            "| measurement | gloo | pyccl | ratio |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
