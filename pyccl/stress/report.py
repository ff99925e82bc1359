"""The results of a run for people and machines: summary table, JSON report, plot.

:class:`StressResult` is what :func:`pyccl.stress.orchestrator.run` returns;
``exit_code`` is 0 exactly when there was no violation and the group made
progress (every fault was survived and the run ended with completed steps).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from pyccl.stress.config import StressConfig
from pyccl.stress.faults import FaultKind
from pyccl.stress.intruders import IntruderTally
from pyccl.stress.stats import RunStats
from pyccl.stress.verify import Violation
from pyccl.stress.watchdog import StuckEpisode

__all__ = ["StressResult", "summary_table", "to_json", "write_json", "plot"]


@dataclass
class StressResult:
    config: StressConfig
    stats: RunStats
    violations: list[Violation]
    stuck: list[StuckEpisode]
    elapsed: float
    peers_started: int
    results_checked: int
    syncs_checked: int
    workdir: str
    notes: list[str] = field(default_factory=list)
    warmup: float = 0.0               # seconds from start until the initial group formed (t of run start)
    ports: dict[str, Any] = field(default_factory=dict)  # every port the run listened on (cleanup checks)
    intruders: IntruderTally = field(default_factory=IntruderTally)

    @property
    def ok(self) -> bool:
        return not self.violations and self.stats.ops_completed > 0

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def summary_table(r: StressResult) -> str:
    """A fixed-width summary for the terminal."""
    s = r.stats
    c = r.config
    net = c.net
    lines = [
        "",
        "pyccl stress summary",
        "=" * 72,
        f"run            {r.elapsed:.1f} s, {c.peers} peers initially ({r.peers_started} started in all), "
        f"seed {c.seed}",
        f"workload       {c.concurrency} x all_reduce of {c.size} B {c.dtype} ({c.op}) per step, "
        f"{c.connections} connections, heartbeat timeout {c.heartbeat_timeout:g} s",
    ]
    if net.enabled and net.geography:
        lines.append(f"network        geography {net.geography} ({net.emulator} emulator), stalls {net.stall_duration}")
    elif net.enabled:
        lines.append(
            f"network        delay {net.delay * 1e3:g} ms, window {net.window or '-'} B, bandwidth "
            f"{f'{net.bandwidth / 1e6:g} MB/s' if net.bandwidth else '-'}, stalls {net.stall_duration} "
            f"({net.emulator} emulator)")
    mean_gbps = s.ops_completed * c.size / r.elapsed / 1e9 if r.elapsed > 0 else 0.0
    lines += [
        f"ops completed  {s.ops_completed} distinct all-reduces ({r.results_checked} results checked exactly "
        f"by their peers), {s.steps_completed} complete steps, {s.op_failures} PeerFailures retried",
        f"throughput     {mean_gbps:.3f} GB/s reduced on average",
        f"shared state   {r.syncs_checked} syncs checked, {s.sync_failures} failed syncs, "
        f"{s.state_rx_bytes / 2**20:.1f} MiB transferred",
        f"membership     {s.rejoins} rejoins, {s.expelled} expulsions, newest epoch {s.newest_epoch}",
        "",
        f"{'fault':<12}{'injected':>10}{'survived':>10}{'median rec.':>13}{'slowest rec.':>14}",
        "-" * 59,
    ]
    for kind, d in s.by_kind().items():
        extra = ""
        if kind == FaultKind.HANG.value and d["injected"]:
            extra = f"   ({d['ended_by_cont']} SIGCONT, {d['ended_by_kill']} SIGKILL)"
        lines.append(f"{kind:<12}{d['injected']:>10}{d['survived']:>10}{_fmt_s(d['median_recovery_s']):>13}"
                     f"{_fmt_s(d['max_recovery_s']):>14}{extra}")
    slow = s.slowest_recovery()
    lines.append("-" * 59)
    lines += _intruder_lines(r.intruders)
    if slow is not None:
        lines.append(f"slowest recovery: {slow.recovery:.2f} s after the {slow.kind.value} of {slow.victim} "
                     f"at t={slow.t:.1f}s {slow.detail}".rstrip())
    for ep in r.stuck:
        lines.append(f"stuck: peer #{ep.index} (id {ep.peer_id}) in '{ep.phase}' from t={ep.since:.1f}s "
                     f"for {_fmt_s(ep.length) if ep.length is not None else 'the rest of the run'}")
    for n in r.notes:
        lines.append(n)
    lines.append("")
    if r.violations:
        kinds: dict[str, int] = {}
        for v in r.violations:
            kinds[v.kind] = kinds.get(v.kind, 0) + 1
        lines.append(f"VIOLATIONS: {len(r.violations)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")
        for v in r.violations[:20]:
            lines.append("  " + v.line())
        if len(r.violations) > 20:
            lines.append(f"  ... and {len(r.violations) - 20} more (see the JSON report)")
        lines.append("RESULT: FAILED")
    elif s.ops_completed == 0:
        lines.append("RESULT: FAILED (no all-reduce completed)")
    else:
        lines.append("RESULT: OK (0 violations)")
    lines.append(f"logs: {r.workdir}")
    return "\n".join(lines)


def _intruder_lines(t: IntruderTally) -> list[str]:
    if not t.attempts:
        return []
    lines = [f"{'intruder':<18}{'attempts':>9}{'rejected':>9}{'leaks':>7}{'median':>9}{'slowest':>9}"]
    for kind, d in t.by_attack().items():
        if d["attempts"]:
            lines.append(f"{kind:<18}{d['attempts']:>9}{d['rejected']:>9}{d['leaks']:>7}{_fmt_s(d['median_s']):>9}"
                         f"{_fmt_s(d['max_s']):>9}")
    rejected = sum(1 for a in t.attempts if a.rejected)
    lines.append(f"intruders: {len(t.attempts)} attempts, {rejected} rejected, {len(t.leaks)} leaks "
                 "(every result and synced state was also checked bit for bit)")
    lines.append("-" * 59)
    return lines


def to_json(r: StressResult) -> dict[str, Any]:
    c = r.config
    cfg = dataclasses.asdict(c)
    cfg["net"]["stall_duration"] = str(c.net.stall_duration)
    cfg["hang_duration"] = str(c.hang_range)
    s = r.stats
    slow = s.slowest_recovery()
    return {
        "ok": r.ok,
        "exit_code": r.exit_code,
        "elapsed_s": round(r.elapsed, 3),
        "warmup_s": round(r.warmup, 3),
        "time_base": "every t is in seconds since the orchestrator started; faults start at warmup_s",
        "config": cfg,
        "totals": {
            "ops_completed": s.ops_completed,
            "results_checked": r.results_checked,
            "steps_completed": s.steps_completed,
            "op_failures_retried": s.op_failures,
            "syncs_checked": r.syncs_checked,
            "sync_failures": s.sync_failures,
            "state_rx_bytes": s.state_rx_bytes,
            "rejoins": s.rejoins,
            "expelled": s.expelled,
            "peers_started": r.peers_started,
            "newest_epoch": s.newest_epoch,
            "mean_gbps": round(s.ops_completed * c.size / r.elapsed / 1e9, 6) if r.elapsed > 0 else 0.0,
        },
        "faults_by_kind": s.by_kind(),
        "slowest_recovery": slow.to_json() if slow else None,
        "faults": [f.to_json() for f in s.faults],
        "intruders": {"by_attack": r.intruders.by_attack(), "leaks": len(r.intruders.leaks),
                      "attempts": [a.to_json() for a in r.intruders.attempts]},
        "violations": [v.to_json() for v in r.violations],
        "stuck": [dataclasses.asdict(e) for e in r.stuck],
        "timeline": {
            "columns": ["t", "world_size", "alive", "ops", "gbps", "faults", "violations"],
            "rows": [x.to_json() for x in s.samples],
        },
        "notes": r.notes,
        "ports": r.ports,
        "workdir": r.workdir,
    }


def write_json(r: StressResult, path: str) -> None:
    with open(path, "w") as f:
        json.dump(to_json(r), f, indent=1)
        f.write("\n")


_COLORS = {
    FaultKind.KILL: "tab:red",
    FaultKind.HANG: "tab:orange",
    FaultKind.JOIN: "tab:green",
    FaultKind.NET_STALL: "tab:purple",
    FaultKind.NET_RESET: "tab:brown",
    FaultKind.MASTER_KILL: "black",
}


def plot(r: StressResult, path: str) -> None:
    """World size, throughput and injected faults over time, as a PNG.

    Needs matplotlib (``pip install pyccl[plot]``); raises ImportError with
    that hint otherwise.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'pyccl[plot]' (or pip install matplotlib)") from exc
    s = r.stats
    t = [x.t for x in s.samples]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(10, 7.5), gridspec_kw={"height_ratios": [2, 2, 1.3]})
    ax = axes[0]
    ax.step(t, [x.world_size for x in s.samples], where="post", label="world size (newest epoch)", color="tab:blue")
    ax.step(t, [x.alive for x in s.samples], where="post", label="peer processes alive", color="tab:gray",
            linestyle="--")
    ax.set_ylabel("peers")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_ylim(bottom=0)
    ax = axes[1]
    ax.plot(t, [x.gbps for x in s.samples], color="tab:blue")
    ax.set_ylabel("reduced GB/s")
    ax.set_ylim(bottom=0)
    ax = axes[2]
    kinds = list(FaultKind)
    for i, kind in enumerate(kinds):
        ft = [f.t for f in s.faults if f.kind == kind]
        if ft:
            ax.scatter(ft, [i] * len(ft), marker="|", s=200, color=_COLORS[kind], label=kind.value)
    for v in r.violations:
        ax.axvline(v.t, color="red", alpha=0.4, linewidth=1)
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels([k.value for k in kinds], fontsize=8)
    ax.set_ylim(-0.7, len(kinds) - 0.3)
    ax.set_xlabel("seconds" + (f"   (red lines: {len(r.violations)} violations)" if r.violations else ""))
    c = r.config
    fig.suptitle(f"pyccl stress: {c.peers} peers, {c.concurrency} x {c.size} B {c.dtype}, seed {c.seed} "
                 f"- {'OK' if r.ok else 'FAILED'}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
