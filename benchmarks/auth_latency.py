"""How long a refused peer waits, and what authentication adds to a join.

A master with a run secret and one member run in this process; each
repetition times ``Communicator.connect()`` of a new peer, interleaved:

* no secret, and a wrong secret: the time until ``AuthenticationError``
  (the contract: within one second);
* the right secret: the time until the peer is welcomed and admitted;
* an open master (no secret on either side): the same, for comparison.

Prints a table of medians and maxima.

    python benchmarks/auth_latency.py [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import pyccl

SECRET = b"benchmark run secret"


def _time_connect(address: str, secret: bytes | None, member: pyccl.Communicator | None) -> tuple[float, str]:
    """Seconds until connect() returns or raises; and how it ended."""
    comm = pyccl.Communicator(address, connections=1, secret=secret)
    stop = threading.Event()
    voter = None
    if member is not None:  # the member votes the joiner in, as a training loop would
        def vote() -> None:
            while not stop.is_set():
                member.update_topology()
                time.sleep(0.001)
        voter = threading.Thread(target=vote, daemon=True)
        voter.start()
    t0 = time.perf_counter()
    try:
        comm.connect(timeout=10)
        outcome = "admitted"
    except pyccl.AuthenticationError:
        outcome = "AuthenticationError"
    dt = time.perf_counter() - t0
    stop.set()
    if voter is not None:
        voter.join(5)
    comm.close()
    if member is not None and outcome == "admitted":  # let the group drop the joiner again
        deadline = time.monotonic() + 10
        while member.world_size > 1 and time.monotonic() < deadline:
            member.update_topology()
            time.sleep(0.001)
    return dt, outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the table to this file (markdown)")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    outcomes: dict[str, set[str]] = {}
    with pyccl.Master(host="127.0.0.1", port=0, secret=SECRET) as secured, \
            pyccl.Master(host="127.0.0.1", port=0, secret=None) as open_master:
        members = {secured.address: pyccl.Communicator(secured.address, connections=1, secret=SECRET).connect(),
                   open_master.address: _open_member(open_master.address)}
        cases = [
            ("no secret (refused)", secured.address, None, False),
            ("wrong secret (refused)", secured.address, b"not the secret", False),
            ("right secret (admitted)", secured.address, SECRET, True),
            ("open master (admitted)", open_master.address, None, True),
        ]
        for _ in range(args.reps):
            for name, address, secret, admitted in cases:
                dt, how = _time_connect(address, secret, members[address] if admitted else None)
                rows.setdefault(name, []).append(dt)
                outcomes.setdefault(name, set()).add(how)
        for m in members.values():
            m.close()
    lines = [f"connect() of a new peer, {args.reps} repetitions each, interleaved (loopback)", "",
             "| case | outcome | median | max |", "|---|---|---|---|"]
    for name, xs in rows.items():
        lines.append(f"| {name} | {', '.join(sorted(outcomes[name]))} | {statistics.median(xs) * 1e3:.1f} ms "
                     f"| {max(xs) * 1e3:.1f} ms |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")

def _open_member(address: str) -> pyccl.Communicator:
    import os

    saved = os.environ.pop("PYCCL_SECRET", None)
    try:
        return pyccl.Communicator(address, connections=1).connect()
    finally:
        if saved is not None:
            os.environ["PYCCL_SECRET"] = saved


if __name__ == "__main__":
    main()
