"""``pyccl stress``: proves a deployment survives churn, hangs and bad networks.

A master and N peer processes run on this machine; peers loop over
update_topology, sync_shared_state, concurrent all-reduces and a
deterministic state update, while the orchestrator kills, hangs and adds
peers and a proxy in front of every peer delays, throttles, stalls and
resets its links. Every completed all-reduce is checked exactly, results and
shared state are compared across peers, and a peer stuck too long is a
violation. See docs/architecture.md ("pyccl stress") for the design.

Modules, one job each:

* :mod:`~pyccl.stress.config`: settings and the parsers of sizes, rates, durations
* :mod:`~pyccl.stress.cli`: command-line options -> config -> run -> exit code
* :mod:`~pyccl.stress.orchestrator`: the asyncio/uvloop loop that runs everything
* :mod:`~pyccl.stress.worker`: the peer process loop and its local checks
* :mod:`~pyccl.stress.workload`: deterministic inputs, exact expected results, state update
* :mod:`~pyccl.stress.protocol`: telemetry frames (msgpack over TCP) between them
* :mod:`~pyccl.stress.faults`: the seeded fault schedule and fault records
* :mod:`~pyccl.stress.proxy`: the fault-injecting TCP proxy
* :mod:`~pyccl.stress.netem`: the process hosting every proxy, and its client
* :mod:`~pyccl.stress.processes`: the master process, free ports
* :mod:`~pyccl.stress.verify`: cross-peer checks of results and shared state
* :mod:`~pyccl.stress.watchdog`: the stuck-phase detector
* :mod:`~pyccl.stress.stats`: counters, timeline, recovery times
* :mod:`~pyccl.stress.live`: the live terminal view
* :mod:`~pyccl.stress.report`: summary table, JSON report, plot
"""

from __future__ import annotations

from pyccl.stress.config import NetConfig, StressConfig

__all__ = ["StressConfig", "NetConfig", "add_arguments", "run"]


def add_arguments(parser):  # type: ignore[no-untyped-def]
    """Add the ``pyccl stress`` options to an argparse parser."""
    from pyccl.stress.cli import add_arguments as add

    add(parser)


def run(args):  # type: ignore[no-untyped-def]
    """Run ``pyccl stress`` from parsed arguments; returns the exit code."""
    from pyccl.stress.cli import run as run_cli

    return run_cli(args)
