"""The ``pyccl`` command line: ``pyccl master | demo | stress | bench``.

Each subcommand is one entry of :data:`COMMANDS`: a function that adds its
arguments to an argparse sub-parser, and a function that runs it and returns
the process exit code. Adding a subcommand = adding one entry.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["main", "COMMANDS", "Command"]


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    default_log_level: str = "INFO"


# ---------------------------------------------------------------- master


def _master_arguments(p: argparse.ArgumentParser) -> None:
    from pyccl.master.server import DEFAULT_PORT

    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="TCP port; 0 picks a free one, logged at start (default: %(default)s)")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0,
                   help="seconds without a frame before a peer is declared dead (default: %(default)s)")
    p.add_argument("--tls-cert", default=None, help="certificate (PEM) to serve the control port over TLS")
    p.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")
    p.add_argument("--secret-file", default=None,
                   help="file holding the run secret: only peers that hold it may join "
                        "(default: the PYCCL_SECRET environment variable; neither: an open run)")
    p.add_argument("--recovery-hold", type=float, default=None,
                   help="seconds a (re)started master waits for the members of a running group to re-register "
                        "before it forms a new group from fresh peers (default: the heartbeat timeout)")
    p.add_argument("--standby-of", default=None, metavar="HOST:PORT",
                   help="run as a standby of the master at HOST:PORT: serve no peer until it has been "
                        "unreachable for the heartbeat timeout, then take over (peers list both masters)")


def _master_run(args: argparse.Namespace) -> int:
    # Imported here so that other subcommands do not pay for uvloop.
    from pyccl.auth import read_secret_file
    from pyccl.master import Master

    secret = read_secret_file(args.secret_file) if args.secret_file else None
    hold = args.heartbeat_timeout if args.recovery_hold is None else args.recovery_hold
    master = Master(host=args.host, port=args.port, heartbeat_timeout=args.heartbeat_timeout, secret=secret,
                    tls_cert=args.tls_cert, tls_key=args.tls_key, recovery_hold=hold, standby_of=args.standby_of)
    master.serve_forever()  # logs "pyccl master listening on HOST:PORT"; returns on SIGINT/SIGTERM
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from pyccl import demo

    demo.add_arguments(p)


def _demo_run(args: argparse.Namespace) -> int:
    from pyccl import demo

    return demo.run(args)


def _stress_arguments(p: argparse.ArgumentParser) -> None:
    from pyccl.stress import cli as stress_cli

    stress_cli.add_arguments(p)


def _stress_run(args: argparse.Namespace) -> int:
    from pyccl.stress import cli as stress_cli

    return stress_cli.run(args)


COMMANDS: dict[str, Command] = {
    "master": Command("run the coordinator of a training run", _master_arguments, _master_run),
    "demo": Command(
        "local demo: a master and 4 peers all-reducing 16 MiB tensors through a kill and a join",
        _demo_arguments,
        _demo_run,
        default_log_level="WARNING",
    ),
    "stress": Command(
        "prove a deployment survives churn, hangs and bad networks: peers all-reduce and sync state while "
        "processes are killed, hung and added and links are delayed, stalled and reset; every result is checked",
        _stress_arguments,
        _stress_run,
        default_log_level="WARNING",
    ),
}


# ---------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyccl", description="pyccl: fault-tolerant collective communication")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--log-level", default=cmd.default_log_level, type=str.upper,
                       choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                       help="logging level (default: %(default)s)")
        cmd.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
