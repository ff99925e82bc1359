"""``pyccl stress``: command-line arguments -> :class:`StressConfig` -> run -> exit code.

Exit codes: 0 no violation; 1 violations (or nothing completed); 2 bad
arguments (argparse).
"""

from __future__ import annotations

import argparse
import os
import sys

from pyccl.stress.config import (
    DTYPES,
    OPS,
    NetConfig,
    StressConfig,
    argparse_type,
    parse_bandwidth,
    parse_duration,
    parse_duration_range,
    parse_rate,
    parse_size,
)

__all__ = ["add_arguments", "config_from_args", "run"]

_CORRUPT_ENV = "PYCCL_STRESS_CORRUPT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``pyccl stress`` options to ``p``."""
    size, dur, rate, bw, rng = (argparse_type(f) for f in (parse_size, parse_duration, parse_rate, parse_bandwidth,
                                                          parse_duration_range))
    g = p.add_argument_group("workload")
    g.add_argument("--peers", type=int, default=4, help="peer processes at the start (default: %(default)s)")
    g.add_argument("--duration", type=dur, default=60.0, help="run time after warm-up, e.g. 60s, 10m (default: 60s)")
    g.add_argument("--size", type=size, default=16 << 20, help="bytes per all-reduce, e.g. 16MiB (default: 16MiB)")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32", help="element type (default: %(default)s)")
    g.add_argument("--op", choices=list(OPS), default="sum",
                   help="reduction; 'mixed' uses sum/max/min by tag (default: %(default)s)")
    g.add_argument("--connections", type=int, default=4, help="TCP connections per ring neighbour (default: %(default)s)")
    g.add_argument("--concurrency", type=int, default=4,
                   help="concurrent all_reduce_async ops per step, tags 0..N-1 (default: %(default)s)")
    g.add_argument("--state-size", type=size, default=64 << 10,
                   help="bytes of shared state synced every step (default: 64KiB)")
    g.add_argument("--pace", type=dur, default=0.0, help="pause between a peer's steps (default: 0)")
    g.add_argument("--optimize-every", type=int, default=0, metavar="N",
                   help="call optimize_topology() instead of update_topology() at every N-th shared-state "
                        "revision (default: 0, never)")
    g.add_argument("--seed", type=int, default=0, help="seeds inputs and the fault schedule (default: %(default)s)")

    g = p.add_argument_group("process faults")
    g.add_argument("--kill-rate", type=rate, default=0.1, help="SIGKILLs per second, e.g. 0.2/s (default: 0.1/s)")
    g.add_argument("--hang-rate", type=rate, default=0.02, help="SIGSTOPs per second (default: 0.02/s)")
    g.add_argument("--join-rate", type=rate, default=0.1, help="new peers per second (default: 0.1/s)")
    g.add_argument("--hang-duration", type=rng, default=None,
                   help="how long a SIGSTOP lasts: 3s, 1s..8s or forever (default: 0.4..2.5 x heartbeat timeout)")
    g.add_argument("--hang-kill-fraction", type=float, default=0.3,
                   help="share of hangs ended by SIGKILL instead of SIGCONT (default: %(default)s)")
    g.add_argument("--max-peers", type=int, default=0, help="most peer processes at once (default: 2 x --peers)")
    g.add_argument("--min-alive", type=int, default=2, help="never kill or hang below this many (default: 2)")
    g.add_argument("--master-kill-rate", type=rate, default=0.0,
                   help="SIGKILLs of the master per second; it is restarted on its address after "
                        "--master-restart-delay and the peers must carry the run on (default: 0)")
    g.add_argument("--master-restart-delay", type=rng, default=None,
                   help="how long the master stays dead: 1s, 0s..5s (default: 0..heartbeat timeout)")

    g = p.add_argument_group("intruders (the run gets a secret: PYCCL_SECRET, or a fresh random one)")
    g.add_argument("--intruder-rate", type=rate, default=0.0,
                   help="attempts per second by strangers without the secret to join, replay a handshake, or feed "
                        "frames to the master, data ports and state servers; any that is not rejected fails the run")

    g = p.add_argument_group("network faults (a proxy in front of every peer's data port)")
    g.add_argument("--net-delay", type=dur, default=0.0, help="one-way delay per link, e.g. 50ms")
    g.add_argument("--net-window", type=size, default=None,
                   help="bytes in flight per connection and direction, e.g. 4MiB (throughput <= window/delay)")
    g.add_argument("--net-bandwidth", type=bw, default=None, help="per link and direction, e.g. 100MiB/s, 1Gbit/s")
    g.add_argument("--net-stall-rate", type=rate, default=0.0, help="silent link stalls per second")
    g.add_argument("--net-stall-duration", type=rng, default=None,
                   help="how long a stall lasts: 2s, 1s..15s or forever (default: 1s..3 x heartbeat timeout)")
    g.add_argument("--net-reset-rate", type=rate, default=0.0, help="connection resets (RST) per second")
    g.add_argument("--net-proxy", action="store_true", help="use the proxy even without network faults")
    g.add_argument("--net-emulator", choices=("compiled", "python"), default="compiled",
                   help="compiled: pyccl-linkemu (default); python: the asyncio proxy (slower)")
    g.add_argument("--geography", metavar="FILE", default=None,
                   help="regions and the links inside and between them (JSON; see pyccl.stress.geography); "
                        "peers are placed in the regions in turn")

    g = p.add_argument_group("checks")
    g.add_argument("--heartbeat-timeout", type=dur, default=5.0, help="the master's (default: 5s)")
    g.add_argument("--stuck-slack", type=dur, default=5.0,
                   help="a peer in one phase longer than heartbeat timeout + this (counted from the last fault) "
                        "is a violation (default: 5s)")
    g.add_argument("--sync-timeout", type=dur, default=None,
                   help="longest legitimate wait in sync_shared_state/connect before the slack (default: the "
                        "core's fetch timeout, max(5s, 2 x heartbeat timeout))")
    g.add_argument("--cooldown", type=dur, default=None,
                   help="no faults in the last this-many seconds (default: heartbeat timeout + slack)")

    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no live view (for CI); violations and the summary only")
    g.add_argument("--live", dest="live", action="store_true", default=None,
                   help="redraw the live view in place even when stdout is not a terminal")
    g.add_argument("--report", metavar="PATH", help="write the JSON report here")
    g.add_argument("--plot", metavar="PATH", help="draw world size, throughput and faults over time (PNG; matplotlib)")
    g.add_argument("--workdir", metavar="DIR",
                   help="logs of the master, the proxies and every peer (default: a temporary directory, "
                        "removed after a run without violations unless --keep-logs)")
    g.add_argument("--keep-logs", action="store_true", help="keep the temporary log directory of a passing run")
    # Hidden debug switch: the peer with this spawn index corrupts one of its
    # results, to prove the checks catch it (also PYCCL_STRESS_CORRUPT=N).
    p.add_argument("--debug-corrupt-peer", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> StressConfig:
    """Build and validate the configuration (raises ValueError naming the bad option)."""
    hb = args.heartbeat_timeout
    corrupt = args.debug_corrupt_peer
    env = os.environ.get(_CORRUPT_ENV)
    if corrupt is None and env not in (None, ""):
        try:
            corrupt = int(env)
        except ValueError as exc:
            raise ValueError(f"{_CORRUPT_ENV}={env!r} must be a peer index") from exc
    stall = args.net_stall_duration or parse_duration_range(f"1s..{3 * hb:g}s")
    net = NetConfig(
        delay=args.net_delay, window=args.net_window, bandwidth=args.net_bandwidth,
        stall_rate=args.net_stall_rate, stall_duration=stall, reset_rate=args.net_reset_rate,
        force_proxy=args.net_proxy, emulator=args.net_emulator, geography=args.geography,
    )
    if net.enabled and net.emulator == "compiled":
        from pyccl.stress.linkemu import EmulatorError, find_binary

        try:
            find_binary()
        except EmulatorError as exc:
            raise ValueError(f"{exc} (or use --net-emulator python)") from exc
    if net.geography:
        from pyccl.stress.geography import Geography

        if net.emulator != "compiled":
            raise ValueError("--geography needs the compiled emulator (--net-emulator compiled)")
        Geography.load(net.geography)  # a bad file is a usage error now, not a failed run later
    return StressConfig(
        peers=args.peers, duration=args.duration, size=args.size, dtype=args.dtype, op=args.op,
        connections=args.connections, concurrency=args.concurrency, kill_rate=args.kill_rate,
        hang_rate=args.hang_rate, join_rate=args.join_rate, intruder_rate=args.intruder_rate,
        master_kill_rate=args.master_kill_rate, master_restart_delay=args.master_restart_delay,
        hang_duration=args.hang_duration,
        hang_kill_fraction=args.hang_kill_fraction, seed=args.seed, heartbeat_timeout=hb,
        stuck_slack=args.stuck_slack, sync_timeout=args.sync_timeout, max_peers=args.max_peers, min_alive=args.min_alive,
        state_size=args.state_size, pace=args.pace, optimize_every=args.optimize_every, cooldown=args.cooldown, net=net, report=args.report,
        plot=args.plot, quiet=args.quiet, live=args.live, workdir=args.workdir, keep_logs=args.keep_logs,
        corrupt_peer=corrupt,
    ).validate()


def run(args: argparse.Namespace) -> int:
    """Run ``pyccl stress``; prints the summary, writes the report/plot, returns the exit code."""
    from pyccl.stress import orchestrator, report

    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"pyccl stress: error: {exc}", file=sys.stderr)
        return 2
    if cfg.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            print("pyccl stress: error: --plot needs matplotlib: pip install 'pyccl[plot]'", file=sys.stderr)
            return 2
    if not cfg.quiet:
        print(f"pyccl stress: {cfg.peers} peers, {cfg.duration:g} s, {cfg.concurrency} x {cfg.size} B {cfg.dtype}; "
              f"kill {cfg.kill_rate:g}/s hang {cfg.hang_rate:g}/s join {cfg.join_rate:g}/s"
              + (f" intruders {cfg.intruder_rate:g}/s" if cfg.intruder_rate else "")
              + (f"; net delay {cfg.net.delay * 1e3:g} ms stall {cfg.net.stall_rate:g}/s reset {cfg.net.reset_rate:g}/s"
                 if cfg.net.enabled else ""), flush=True)
    result = orchestrator.run(cfg)
    text = report.summary_table(result)
    if result.ok and cfg.workdir is None and not cfg.keep_logs:
        import shutil

        shutil.rmtree(result.workdir, ignore_errors=True)
        text = text.replace(f"logs: {result.workdir}", "logs: removed (the run passed; --keep-logs or --workdir keeps them)")
    print(text, flush=True)
    if cfg.report:
        report.write_json(result, cfg.report)
    if cfg.plot:
        report.plot(result, cfg.plot)
    return result.exit_code
