"""Compare DiLoCo's modes: loss over 3 seeds, bytes per peer, exposed communication on a slow link.

    PYTHONPATH=. python examples/diloco_compare.py                  # ~15 minutes on 2 cores
    PYTHONPATH=. python examples/diloco_compare.py --seeds 1 --methods diloco eager

Two measurements, one table (``docs/diloco_compare.md``, ``.json``, ``.png``):

1. Quality and bytes: every method trains the char transformer of
   ``examples/diloco_train.py`` (4 peers, one SIGKILLed at 40% and a new one
   joining, equal compute: the same inner steps of the same batch size per
   peer) with each seed (the seed sets the initial model and every peer's
   batch stream); final validation loss of the global model (mean, standard
   deviation and range over the seeds) and the bytes each peer sent: all
   of them, and those of the collectives alone (the rest is the shared
   state sent to the joiner, whose split among the members varies). The run is shorter than the example's
   default (``--steps 200``, 10 outer steps of H = 20) so that 8 methods x 3
   seeds fit in about 15 minutes on two cores (more when other jobs share
   them). ``--methods lookahead --merge`` adds the own-look-ahead delayed
   mode to an existing table.
2. Exposed communication: ``benchmarks/diloco.py``'s harness, 2 peers behind
   the stress tool's proxy (10 MB/s per direction, 25 ms one way), 4 MiB of
   float32 parameters, H = 20 inner steps of 50 ms: the sync all-reduce takes
   about 9 inner steps. Exposed = time per outer step - compute. The
   DDP-like baseline all-reduces a gradient of the same size at every inner
   step and waits for it, so its exposed time per H steps is derived as H x
   the sync all-reduce time.

Methods: the DDP-like baseline; sync DiLoCo; one-step-delayed DiLoCo as first
shipped (plain SGD outer optimizer: Nesterov diverged); delayed with eager
updates (Nesterov 0.9); delayed overlap: delayed by tau = H/2 inner steps,
local progress rebased onto the new global parameters (streaming DiLoCo's
overlap, one fragment; Nesterov 0.9); streaming DiLoCo
with 4 fragments, tau = 5, mixing 0.5; sync DiLoCo with uint8 and with int4
pseudo-gradients, both with error feedback. ``--methods lookahead
stream-rebase --merge`` adds the own-look-ahead delayed mode and the
delayed overlap with 4 fragments (``delayed="overlap", fragments=4``).
"""

from __future__ import annotations

import argparse
import argparse as _ap
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Sibling scripts this one reuses (the example's model, the benchmark's link
# emulation); pyccl itself is the installed package.
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

METHODS = ["ddp", "diloco", "delayed", "eager", "overlap", "stream", "uint8", "int4"]
SHORT = {"ddp": "DDP-like baseline", "diloco": "sync DiLoCo", "delayed": "delayed, old (SGD, no momentum)",
         "delayed-nesterov": "delayed, old, Nesterov 0.9", "eager": "delayed, eager updates (Nesterov)",
         "lookahead": "delayed, own look-ahead (Nesterov)", "overlap": "delayed overlap, tau = H/2, rebase (Nesterov)",
         "stream": "streaming F = 4, tau = 5, alpha 0.5",
         "stream-rebase": "delayed overlap, F = 4 (tau = 5, rebase)", "uint8": "sync, uint8 + error feedback",
         "int4": "sync, int4 + error feedback", "int4-noef": "sync, int4, no error feedback"}


def bench_mode(method: str, sync_every: int, cfg: Any) -> dict[str, Any] | None:
    """DiLoCo options of a method for the timing harness (None: DDP, derived)."""
    from diloco_train import diloco_options

    if method == "ddp":
        return None
    opts = dict(diloco_options(method, cfg))
    opts.pop("outer_optimizer", None)  # the outer optimizer does not change the timing
    return opts


def run_bench(methods: list[str], cfg: Any, say: Any) -> dict[str, dict[str, float]]:
    import uvloop

    from diloco import one_row  # benchmarks/diloco.py

    ns = _ap.Namespace(delay=0.025, bandwidth=10_000_000, sync_every=cfg.sync_every, inner_ms=50.0, outer=2)
    side = int(((4 << 20) // 4 // 8) ** 0.5)
    params = 8 * side * side
    out: dict[str, dict[str, float]] = {}
    first = ["diloco"] if "diloco" in methods or "ddp" in methods else []  # ddp's is derived from it
    for m in first + [x for x in methods if x != "diloco"]:
        mode = bench_mode(m, cfg.sync_every, cfg)
        if mode is None:
            continue
        res = uvloop.run(one_row(2, 4, params, mode, ns))
        per_outer = max(r["per_outer_s"] for r in res)
        compute = max(r["compute_s"] for r in res)
        frags = mode.get("fragments", 1)
        ar = max(r["allreduce_s"] for r in res) * frags
        out[m] = {"per_outer_s": per_outer, "compute_s": compute, "exposed_s": per_outer - compute,
                  "allreduce_s": ar, "hidden": max(0.0, 1 - (per_outer - compute) / ar) if ar > 0 else 0.0}
        say(f"  timing {m:<10} exposed {per_outer - compute:6.3f} s per outer step, all-reduce {ar:6.3f} s")
    if "ddp" in methods and "diloco" in out:
        ar = out["diloco"]["allreduce_s"]
        out["ddp"] = {"per_outer_s": float("nan"), "compute_s": float("nan"), "exposed_s": cfg.sync_every * ar,
                      "allreduce_s": ar, "hidden": 0.0, "derived": 1.0}
    return out


def summarize(runs: dict[str, list[dict[str, Any]]], bench: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for m, rs in runs.items():
        vals = [r["final_val_loss"] for r in rs]
        rows.append({
            "method": m, "label": SHORT.get(m, m), "seeds": len(vals), "losses": vals,
            "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals),
            "MB_per_peer": statistics.fmean(r["tx_bytes_per_peer"] for r in rs) / 1e6,
            "collective_MB_per_peer": statistics.fmean(r["tx_bytes_per_peer"] - r.get("state_tx_bytes_per_peer", 0.0)
                                                       for r in rs) / 1e6,
            "blocked_s_per_peer": statistics.fmean(r["blocked_seconds_per_peer"] for r in rs),
            "exposed_s": bench.get(m, {}).get("exposed_s"), "hidden": bench.get(m, {}).get("hidden"),
            "exposed_derived": bool(bench.get(m, {}).get("derived")),
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["method"]: r["mean"] for r in rows}
    out = ["| method | final val loss, mean ± std (3 seeds) | range | vs sync DiLoCo | vs DDP-like | MB sent per peer "
           "(all) | of which collectives | exposed comm per outer step (slow link) | comm hidden |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_sync = f"{(r['mean'] / base['diloco'] - 1) * 100:+.1f}%" if "diloco" in base else "-"
        vs_ddp = f"{(r['mean'] / base['ddp'] - 1) * 100:+.1f}%" if "ddp" in base else "-"
        exp = "-" if r["exposed_s"] is None else f"{r['exposed_s']:.2f} s"
        if r["exposed_derived"]:
            exp += " (derived)"
        hid = "-" if r["hidden"] is None else f"{r['hidden']:.0%}"
        out.append(f"| {r['label']} | {r['mean']:.4f} ± {r['std']:.4f} | {r['min']:.3f} – {r['max']:.3f} | "
                   f"{vs_sync} | "
                   f"{vs_ddp} | {r['MB_per_peer']:.2f} | {r['collective_MB_per_peer']:.2f} | {exp} | {hid} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path, cfg: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5))
    labels = [r["label"] for r in rows]
    ys = list(range(len(rows)))[::-1]
    sync = next((r["mean"] for r in rows if r["method"] == "diloco"), None)
    lo = min(r["min"] for r in rows) - 0.02
    hi = max(r["max"] for r in rows) + 0.02 if sync is None else min(max(r["max"] for r in rows) + 0.02, sync * 1.08)
    for y, r in zip(ys, rows):
        if r["mean"] > hi:  # off the scale: say where it is
            ax1.annotate(f"{r['mean']:.2f} ± {r['std']:.2f} →", (hi, y), ha="right", va="center", fontsize=8,
                         color="tab:red")
            continue
        ax1.errorbar(r["mean"], y, xerr=r["std"], fmt="o", color="tab:blue", capsize=4)
        ax1.scatter(r["losses"], [y] * len(r["losses"]), color="tab:gray", s=12, zorder=3)
    ax1.set_xlim(lo, hi)
    if sync is not None:
        ax1.axvline(sync, color="tab:blue", linestyle=":", linewidth=1)
        ax1.axvspan(sync, sync * 1.02, color="tab:green", alpha=0.12, label="within 2% of sync DiLoCo")
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_yticks(ys, labels, fontsize=8)
    ax1.set_xlabel("final validation loss (mean ± std; dots: seeds)")
    ax1.set_title(f"{cfg.peers} peers, kill + join, {cfg.steps} inner steps, H = {cfg.sync_every}")
    coll = [r.get("collective_MB_per_peer", r["MB_per_peer"]) for r in rows]
    ax2.barh(ys, coll, color="tab:orange", label="collectives")
    ax2.barh(ys, [r["MB_per_peer"] - c for r, c in zip(rows, coll)], left=coll, color="tab:gray",
             label="state sent to the joiner")
    ax2.legend(loc="lower right", fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlim(left=0.5 * min(coll))
    ax2.set_yticks(ys, [""] * len(rows))
    ax2.set_xlabel("MB sent per peer (log)")
    ax2.set_title("bytes each peer sent")
    ex = [r["exposed_s"] if r["exposed_s"] is not None else 0.0 for r in rows]
    ax3.barh(ys, ex, color=["tab:red" if r["exposed_derived"] else "tab:purple" for r in rows])
    ax3.set_xscale("symlog", linthresh=0.05)
    ax3.set_yticks(ys, [""] * len(rows))
    ax3.set_xlabel("exposed comm per H inner steps, s (red: derived)")
    ax3.set_title("slow link: 10 MB/s, 25 ms, 4 MiB model")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from diloco_train import Config, run_method

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=list(SHORT))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--no-timing", action="store_true", help="skip the slow-link timing")
    ap.add_argument("--out", default=str(ROOT / "docs" / "diloco_compare"))
    ap.add_argument("--merge", action="store_true",
                    help="add these methods' runs and timings to those already in --out's JSON (same config)")
    ap.add_argument("--replot", action="store_true", help="only rewrite the table and picture from --out's JSON")
    args = ap.parse_args(argv)
    cfg = Config(steps=args.steps)
    t0 = time.monotonic()

    def say(s: str) -> None:
        print(s, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = f"PYTHONPATH=. python examples/diloco_compare.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    old: dict[str, Any] = json.loads(out.with_suffix(".json").read_text()) if args.merge or args.replot else {}
    if old and old["config"] != asdict(cfg):
        raise SystemExit(f"{out}.json was made with another config: {old['config']}")
    if args.replot:
        return _write(old["runs"], old.get("timing", {}), cfg, out, old.get("commands", []),
                      old.get("minutes", 0.0), say)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    partial = out.with_name(out.name + ".partial.json")
    for seed in range(args.seeds):
        for m in args.methods:
            r = run_method(m, replace(cfg, seed=seed), lambda s: None)
            r = {k: v for k, v in r.items() if k in ("final_val_loss", "tx_bytes_per_peer", "state_tx_bytes_per_peer",
                                                     "blocked_seconds_per_peer", "wall_seconds", "evals", "events")}
            r["seed"] = seed
            runs[m].append(r)
            say(f"seed {seed} {m:<10} final val loss {r['final_val_loss']:.4f}  {r['tx_bytes_per_peer'] / 1e6:7.2f} MB "
                f"sent per peer  ({r['wall_seconds']:.0f} s; {time.monotonic() - t0:.0f} s so far)")
            partial.write_text(json.dumps({"config": asdict(cfg), "runs": runs}, indent=1))  # if interrupted
    bench = {} if args.no_timing else run_bench(args.methods, cfg, say)
    partial.unlink(missing_ok=True)
    minutes = (time.monotonic() - t0) / 60
    commands = [f"{command} ({minutes:.1f} minutes)"]
    if old:
        commands = old.get("commands", []) + commands
        minutes += old.get("minutes", 0.0)
        merged = {m: rs for m, rs in old["runs"].items() if m not in runs}
        runs = {m: (runs.get(m) or merged[m]) for m in [*METHODS, *SHORT] if m in runs or m in merged}
        bench = {**old.get("timing", {}), **bench}
    return _write(runs, bench, cfg, out, commands, minutes, say)


def _write(runs: dict[str, list[dict[str, Any]]], bench: dict[str, dict[str, float]], cfg: Any, out: Path,
           commands: list[str], minutes: float, say: Any) -> int:
    rows = summarize(runs, bench)
    text = table(rows)
    seeds = max(len(rs) for rs in runs.values())
    head = ("# DiLoCo modes compared\n\nCommands (their wall time on this machine):\n\n"
            + "".join(f"    {c}\n" for c in commands)
            + f"\nChar transformer (113 K parameters), {cfg.peers} peers, {cfg.steps} inner steps of batch "
            f"{cfg.batch} per peer (equal compute), H = {cfg.sync_every}; one peer SIGKILLed at {cfg.kill_at:.0%} of "
            f"the run and a new one joining; {seeds} seeds. Exposed communication: 2 peers through the stress proxy "
            f"at 10 MB/s and 25 ms one way, 4 MiB of parameters, 50 ms inner steps (see the script's docstring).\n\n")
    out.with_suffix(".md").write_text(head + text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"config": asdict(cfg), "commands": commands, "minutes": minutes,
                                                    "runs": runs, "timing": bench, "rows": rows}, indent=1))
    say("\n" + text)
    try:
        plot(rows, out.with_suffix(".png"), cfg)
        say(f"wrote {out}.md, .json and .png")
    except ImportError:
        say(f"wrote {out}.md and .json (no plot: pip install 'pyccl[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
