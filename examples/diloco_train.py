"""Train a small character-level transformer with DiLoCo over pyccl, through churn.

    PYTHONPATH=. python examples/diloco_train.py            # sync DiLoCo, delayed DiLoCo and a DDP-like baseline
    PYTHONPATH=. python examples/diloco_train.py --methods diloco --steps 300

Each method runs 4 peers (processes on this machine, one master). At 40% of
the run one peer is killed with SIGKILL and a new one is started; it is
admitted at the group's next outer step (DiLoCo) or next step (baseline)
and receives the group's state bit-exactly. Every peer trains the same
number of inner steps on its own stream of batches (the step counter is
shared, so a joiner picks up where the group is), so the three methods spend
the same compute:

* ``diloco``:  DiLoCo, H inner AdamW steps, then an outer step (all-reduce of
  the pseudo-gradients, outer SGD lr 0.7, momentum 0.9, Nesterov);
* ``delayed``: one-step-delayed DiLoCo: the all-reduce of each outer step runs
  during the next H inner steps and is applied one outer step later. The
  stale update diverges with momentum 0.9 here, so this run uses plain SGD
  (lr 0.7, no momentum) as the outer optimizer (the best of a small sweep:
  lr 0.5/0.7/1.0, momentum 0/0.3/0.5/0.9);
* ``--methods`` also takes the newer modes (``eager``, ``lookahead``,
  ``overlap``, ``stream``, ``uint8``, ``int4``, ...): see
  ``examples/diloco_compare.py``, which runs them over several seeds;
* ``ddp``:     the baseline: gradients all-reduced (averaged) at every step,
  then the same AdamW step on every peer (what DDP does), parameters and
  AdamW state in a SharedState so that the joiner receives them.

The corpus is ``examples/data/shakespeare.txt`` (Hamlet and Macbeth, public
domain; nothing is downloaded). 90% trains, the last 10% is the validation
text. Writes a loss-curve PNG (needs matplotlib: ``pip install 'pyccl[plot]'``)
and a JSON file with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "shakespeare.txt"
CTX = mp.get_context("spawn")


@dataclass
class Config:
    steps: int = 600          # inner steps per peer (the shared step counter's end)
    sync_every: int = 20      # H
    batch: int = 16
    context: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    warmup: int = 30
    peers: int = 4
    kill_at: float = 0.4      # fraction of the run at which a peer is killed and a new one started
    eval_batches: int = 8
    seed: int = 0             # model initialization and the peers' batch streams
    tau: int = 5              # streaming: sync delay (inner steps) of the "stream" method
    alpha: float | str = 0.5  # streaming: mixing of the "stream" method (or "rebase")
    fragments: int = 4        # streaming: fragments of the "stream" method


# ------------------------------------------------------------------ model


def build_model(vocab: int, cfg: Config) -> Any:
    import torch.nn as nn
    import torch.nn.functional as F

    import torch

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(cfg.d_model)
            self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
            self.proj = nn.Linear(cfg.d_model, cfg.d_model)
            self.ln2 = nn.LayerNorm(cfg.d_model)
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                     nn.Linear(4 * cfg.d_model, cfg.d_model))

        def forward(self, x: Any) -> Any:
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, cfg.heads, d // cfg.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(a)
            return x + self.mlp(self.ln2(x))

    class CharTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, cfg.d_model)
            self.pos = nn.Parameter(torch.randn(cfg.context, cfg.d_model) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(cfg.layers)])
            self.ln = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, vocab, bias=False)

        def forward(self, idx: Any) -> Any:
            x = self.tok(idx) + self.pos[: idx.shape[1]]
            return self.head(self.ln(self.blocks(x)))

    torch.manual_seed(cfg.seed)  # the same initial model on every peer (a joiner receives the group's anyway)
    return CharTransformer()


class Corpus:
    def __init__(self, cfg: Config) -> None:
        import torch

        text = DATA.read_text(encoding="ascii")
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(data))
        self.train, self.val = data[:n], data[n:]
        self.cfg = cfg
        g = torch.Generator().manual_seed(1234)
        self.val_batches = [self._batch(self.val, g) for _ in range(cfg.eval_batches)]

    def _batch(self, src: Any, gen: Any) -> tuple[Any, Any]:
        import torch

        t = self.cfg.context
        ix = torch.randint(len(src) - t - 1, (self.cfg.batch,), generator=gen)
        x = torch.stack([src[i:i + t] for i in ix.tolist()])
        y = torch.stack([src[i + 1:i + t + 1] for i in ix.tolist()])
        return x, y

    def train_batch(self, gen: Any) -> tuple[Any, Any]:
        return self._batch(self.train, gen)


def loss_of(model: Any, x: Any, y: Any) -> Any:
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def evaluate(model: Any, corpus: Corpus) -> float:
    import torch

    with torch.no_grad():
        return sum(float(loss_of(model, x, y)) for x, y in corpus.val_batches) / len(corpus.val_batches)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ------------------------------------------------------------------- peers


def peer_main(pipe: Any, method: str, master: str, cfg: Config, seed: int, go: Any = None) -> None:
    import pyccl

    import torch

    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # die with the orchestrator
    except OSError:
        pass
    torch.set_num_threads(1)
    corpus = Corpus(cfg)
    model = build_model(len(corpus.chars), cfg)
    inner = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1000 * cfg.seed + seed)  # this peer's own stream of batches
    comm = pyccl.Communicator(master, connections=2, name=f"{method}-{seed}")
    if go is not None:  # the spare: started with the others (importing torch takes seconds), joins when told
        go.recv()
    comm.connect(timeout=600)  # a joiner is admitted at the group's next outer step
    try:
        if method == "ddp":
            _train_ddp(pipe, comm, model, inner, corpus, gen, cfg)
        else:
            _train_diloco(pipe, comm, model, inner, corpus, gen, cfg, method)
    finally:
        comm.close()


def diloco_options(method: str, cfg: Config) -> dict[str, Any]:
    """DiLoCo's keyword arguments for each method of the example."""
    import torch

    if method == "delayed":  # one-step delayed, as first shipped: Nesterov 0.9 diverged, plain SGD did best
        return {"delayed": True, "outer_optimizer": lambda ps: torch.optim.SGD(ps, lr=0.7)}
    return {
        "diloco": {},
        "delayed-nesterov": {"delayed": True},
        "eager": {"delayed": "eager"},
        "lookahead": {"delayed": "lookahead"},
        "stream": {"fragments": cfg.fragments, "sync_delay": cfg.tau, "mixing": cfg.alpha},
        "stream-rebase": {"fragments": cfg.fragments, "sync_delay": cfg.tau, "mixing": "rebase"},
        "overlap": {"delayed": "overlap"},  # sync delay H / 2, rebase
        "uint8": {"quantize": "uint8"},
        "int4": {"quantize": "int4"},
        "int4-noef": {"quantize": "int4", "error_feedback": False},
    }[method]


def _train_diloco(pipe: Any, comm: Any, model: Any, inner: Any, corpus: Corpus, gen: Any, cfg: Config,
                  method: str) -> None:
    from pyccl.diloco import DiLoCo

    dl = DiLoCo(model, inner, comm, sync_every=cfg.sync_every, **diloco_options(method, cfg))
    pipe.send(("joined", comm.peer_id, dl.inner_step, dl.join_info.rx_bytes))
    tx = state_tx = 0
    blocked = 0.0
    while dl.inner_step < cfg.steps:
        step = dl.inner_step
        for g in inner.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = loss_of(model, *corpus.train_batch(gen))
        loss.backward()
        info = dl.step()
        pipe.send(("loss", comm.peer_id, step + 1, float(loss.detach())))
        if info is not None:
            tx += info.tx_bytes
            state_tx += info.state_tx_bytes
            blocked += info.seconds
            if comm.rank == 0 and info.synced:  # evaluate the global parameters once per round
                pipe.send(("eval", info.inner_step, _eval_global(dl, model, corpus), info.world_size))
    dl.finish()
    pipe.send(("final", comm.peer_id, dl.inner_step, evaluate(model, corpus), dl.state_hash(), tx, blocked,
               state_tx))


def _eval_global(dl: Any, model: Any, corpus: Corpus) -> float:
    """Validation loss of the global parameters (the model holds local ones
    in eager and streaming modes), leaving the model as it was."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, (_, g) in zip(params, dl.global_parameters()):
            p.copy_(g)
        val = evaluate(model, corpus)
        for p, v in zip(params, saved):
            p.copy_(v)
    return val


def _train_ddp(pipe: Any, comm: Any, model: Any, inner: Any, corpus: Corpus, gen: Any, cfg: Config) -> None:
    """The baseline: average gradients every step, identical AdamW steps."""
    import pyccl
    from pyccl.diloco import initialize_optimizer_state

    import torch

    initialize_optimizer_state(inner)  # AdamW state must exist before the first sync
    named = list(model.named_parameters())
    counter = torch.zeros(1, dtype=torch.int64)
    tensors = {"step": counter}
    for n, p in named:
        tensors[f"param.{n}"] = p.detach()
        for k, v in inner.state[p].items():
            tensors[f"adamw.{n}.{k}"] = v
    state = pyccl.SharedState(tensors)
    grads = torch.zeros(sum(p.numel() for _, p in named))
    views = [v.view(p.shape) for v, (_, p) in zip(grads.split([p.numel() for _, p in named]), named)]
    comm.update_topology()
    sync = comm.sync_shared_state(state)
    pipe.send(("joined", comm.peer_id, int(counter[0]), sync.rx_bytes))
    tx = state_tx = 0
    blocked = 0.0
    while int(counter[0]) < cfg.steps:
        step = int(counter[0])
        loss = loss_of(model, *corpus.train_batch(gen))
        loss.backward()
        t0 = time.perf_counter()
        torch.cat([p.grad.reshape(-1) for _, p in named], out=grads)
        while True:
            try:
                tx += comm.all_reduce(grads, op="avg").tx_bytes
                break
            except pyccl.PeerFailure:
                continue  # grads are intact; redo over the survivors
        for (_, p), v in zip(named, views):
            p.grad.copy_(v)
        for g in inner.param_groups:
            g["lr"] = lr_at(step, cfg)
        inner.step()
        inner.zero_grad(set_to_none=False)
        counter[0] = step + 1
        state.revision += 1
        comm.update_topology()
        sync = comm.sync_shared_state(state)
        tx += sync.tx_bytes
        state_tx += sync.tx_bytes
        blocked += time.perf_counter() - t0
        pipe.send(("loss", comm.peer_id, step + 1, float(loss.detach())))
        if (step + 1) % cfg.sync_every == 0 and comm.rank == 0:
            pipe.send(("eval", step + 1, evaluate(model, corpus), comm.world_size))
    h = 0
    for v in state.hashes().values():
        h = (h * 1_000_003 + v) & 0xFFFFFFFFFFFFFFFF
    pipe.send(("final", comm.peer_id, int(counter[0]), evaluate(model, corpus), h, tx, blocked, state_tx))


# ------------------------------------------------------------ orchestrator


def run_method(method: str, cfg: Config, say: Any) -> dict[str, Any]:
    import pyccl

    t_start = time.monotonic()
    master = pyccl.Master(host="127.0.0.1", port=0, heartbeat_timeout=5.0).start()
    procs: dict[int, Any] = {}     # seed -> process
    pipes: dict[Any, int] = {}     # reader -> seed
    losses: dict[int, dict[int, float]] = {}  # step -> seed -> loss
    evals: dict[int, float] = {}
    finals: dict[int, tuple] = {}
    events: list[tuple[str, int, int]] = []   # (what, step, seed)
    last_step = 0

    def spawn(seed: int, go: Any = None) -> None:
        r, w = CTX.Pipe(duplex=False)
        p = CTX.Process(target=peer_main, args=(w, method, master.address, cfg, seed, go), daemon=True)
        p.start()
        w.close()
        procs[seed] = p
        pipes[r] = seed

    try:
        victim, joiner = 1, cfg.peers
        go_recv, go_send = CTX.Pipe(duplex=False)
        for seed in range(cfg.peers):
            spawn(seed)
        spawn(joiner, go_recv)  # the peer that joins mid-run, ready and waiting
        killed = False
        deadline = time.monotonic() + 1800
        while pipes and time.monotonic() < deadline:
            for r in mpc.wait(list(pipes), 1.0):
                seed = pipes[r]
                try:
                    msg: Any = r.recv()  # type: ignore[union-attr,call-arg]
                except (EOFError, OSError) as exc:
                    del pipes[r]
                    if seed != victim and seed not in finals:
                        raise RuntimeError(f"{method}: peer {seed} exited without finishing "
                                           f"(exit code {procs[seed].exitcode})") from exc
                    continue
                kind = msg[0]
                if kind == "loss":
                    _, pid, step, loss = msg
                    losses.setdefault(step, {})[seed] = loss
                    last_step = max(last_step, step)
                    if not killed and step >= cfg.kill_at * cfg.steps:
                        os.kill(procs[victim].pid, signal.SIGKILL)
                        killed = True
                        events.append(("killed", last_step, victim))
                        say(f"  [{method}] step {last_step}: killed peer {victim} (SIGKILL), started a new one")
                        go_send.send("go")
                elif kind == "joined":
                    _, pid, step, rx = msg
                    if seed == joiner:
                        events.append(("joined", step, seed))
                        say(f"  [{method}] step {step}: the new peer joined and received {rx / 1e3:.0f} kB of state")
                elif kind == "eval":
                    _, step, val, world = msg
                    evals[step] = val
                elif kind == "final":
                    finals[seed] = msg[1:]
        if len(finals) != cfg.peers:
            raise RuntimeError(f"{method}: only {len(finals)} peers finished")
    finally:
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        master.stop()
    vals = {f[2] for f in finals.values()}
    hashes = {f[3] for f in finals.values()}
    if len(hashes) != 1:
        raise RuntimeError(f"{method}: the peers' final states differ")
    steps = sorted(losses)
    return {
        "method": method,
        "final_val_loss": next(iter(vals)),
        "train_loss": [sum(losses[s].values()) / len(losses[s]) for s in steps],
        "steps": steps,
        "evals": sorted(evals.items()),
        "events": events,
        "tx_bytes_per_peer": sum(f[4] for f in finals.values()) / len(finals),
        # what the shared-state syncs sent (the joiner's transfer), the rest is the collectives
        "state_tx_bytes_per_peer": sum(f[6] for f in finals.values()) / len(finals),
        "blocked_seconds_per_peer": sum(f[5] for f in finals.values()) / len(finals),
        "wall_seconds": time.monotonic() - t_start,
    }


LABELS = {"diloco": "DiLoCo (sync)", "delayed": "DiLoCo (one-step delayed, SGD)",
          "delayed-nesterov": "DiLoCo (one-step delayed, Nesterov)", "eager": "DiLoCo (delayed, eager updates)",
          "lookahead": "DiLoCo (delayed, own look-ahead)",
          "overlap": "DiLoCo (delayed overlap, tau = H/2, rebase)",
          "stream": "streaming DiLoCo (F=4, tau, alpha)",
          "stream-rebase": "delayed overlap, F=4 (tau, rebase)", "uint8": "DiLoCo (uint8 + EF)",
          "int4": "DiLoCo (int4 + EF)",
          "int4-noef": "DiLoCo (int4, no EF)", "ddp": "DDP-like baseline"}
COLORS = {"diloco": "tab:blue", "delayed": "tab:orange", "delayed-nesterov": "tab:brown", "eager": "tab:green",
          "lookahead": "tab:red", "overlap": "black",
          "stream": "tab:purple", "stream-rebase": "tab:blue",
          "uint8": "tab:cyan", "int4": "tab:olive", "int4-noef": "tab:pink",
          "ddp": "tab:gray"}


def plot(results: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        ys, smooth, out = r["train_loss"], None, []
        for y in ys:
            smooth = y if smooth is None else 0.95 * smooth + 0.05 * y
            out.append(smooth)
        ax1.plot(r["steps"], out, color=COLORS[r["method"]], label=LABELS[r["method"]])
        xs, vs = zip(*r["evals"]) if r["evals"] else ((), ())
        ax2.plot(xs, vs, color=COLORS[r["method"]], marker=".",
                 label=f"{LABELS[r['method']]}: final {r['final_val_loss']:.3f}")
    for ax in (ax1, ax2):
        for what, step, _ in results[0]["events"]:
            ax.axvline(step, color="red" if what == "killed" else "green", linestyle=":", linewidth=1)
        ax.set_xlabel("inner step (equal compute per peer)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("training loss (mean over peers, EMA 0.95)")
    ax2.set_ylabel("validation loss of the global model")
    ax1.set_title("training loss")
    ax2.set_title(f"validation loss (H={cfg.sync_every}; red: peer killed, green: peer joined)")
    ax1.legend()
    ax2.legend()
    lo = min(min(v for _, v in r["evals"]) for r in results if r["evals"])
    ax2.set_ylim(lo - 0.1, lo + 1.2)
    ax1.set_ylim(lo - 0.3, lo + 1.5)
    fig.suptitle(f"char transformer on Hamlet + Macbeth, {cfg.peers} peers on pyccl, one killed and one joining")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["diloco", "delayed", "ddp"], choices=list(LABELS))
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument("--alpha", type=lambda v: v if v == "rebase" else float(v), default=Config.alpha,
                    help="mixing of the 'stream' method: a float in [0, 1] or 'rebase'")
    ap.add_argument("--tau", type=int, default=Config.tau, help="sync delay of the 'stream' method")
    ap.add_argument("--fragments", type=int, default=Config.fragments, help="fragments of the 'stream' method")
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--sync-every", type=int, default=Config.sync_every)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "diloco_train.png"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "diloco_train.json"))
    args = ap.parse_args(argv)
    cfg = Config(steps=args.steps, sync_every=args.sync_every, seed=args.seed, alpha=args.alpha,
                 tau=args.tau, fragments=args.fragments)

    def say(s: str) -> None:
        print(s, flush=True)

    say(f"corpus {DATA.name}: {DATA.stat().st_size / 1e3:.0f} kB; {cfg.peers} peers x {cfg.steps} steps x batch "
        f"{cfg.batch} x {cfg.context} chars; H = {cfg.sync_every}")
    results = []
    for method in args.methods:
        say(f"{LABELS[method]} ...")
        r = run_method(method, cfg, say)
        results.append(r)
        say(f"  [{method}] final validation loss {r['final_val_loss']:.4f} ({r['wall_seconds']:.0f} s, "
            f"{r['tx_bytes_per_peer'] / 1e6:.1f} MB sent per peer)")
    base = next((r for r in results if r["method"] == "ddp"), None)
    say("")
    say(f"{'method':<28} {'final val loss':>14} {'vs baseline':>12} {'MB sent/peer':>13} {'wall':>6}")
    for r in results:
        rel = f"{(r['final_val_loss'] / base['final_val_loss'] - 1) * 100:+.1f}%" if base else "-"
        say(f"{LABELS[r['method']]:<28} {r['final_val_loss']:>14.4f} {rel:>12} {r['tx_bytes_per_peer'] / 1e6:>13.2f} "
            f"{r['wall_seconds']:>5.0f}s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=1))
    try:
        plot(results, cfg, Path(args.plot))
        say(f"wrote {args.plot} and {args.json}")
    except ImportError:
        say(f"wrote {args.json} (no plot: pip install 'pyccl[plot]')")
    if base is not None:
        worst = max((r["final_val_loss"] / base["final_val_loss"] - 1 for r in results if r["method"] == "diloco"),
                    default=0.0)
        if worst > 0.05:
            say(f"DiLoCo's final loss is {worst * 100:.1f}% above the baseline's (more than 5%)")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
