"""Link measurement for ``Communicator.optimize_topology()`` (peer side).

Each member measures its *outgoing* links (to the data ports the master
published, so probes cross the same paths as the ring) with the data
plane's probe (``csrc/net/probe.*``): the smallest of a few echoes gives the
RTT, then every one of the peer's ``connections`` streams for ``seconds``
(at least 4 RTTs) and the receiver reports what arrived per second. Cost per
member: at most ``max_targets`` probes, each at most ``max_bytes`` and
about ``max(seconds, 4 RTT)`` plus an RTT of set-up, one after another; all
members probe at once, peer i's r-th probe going to ring position i + r,
so that in each step every peer is probed by about one other.

With ``n - 1 <= max_targets`` every ordered pair is measured (n (n-1)
probes). Beyond, each member measures its two ring neighbours and a sample
of the others, drawn from (epoch, its id) so the choice is reproducible;
the master fills the gaps (``pyccl.ringopt.fill``): the reverse direction,
else the two regions' median, else the slowest link seen.

``connections="auto"``: each target is probed twice, with one connection
(``b1``) and with ``AUTO_MAX`` (``bk``). Once a path is window-limited, k
connections carry about k x b1; once the link or the CPU is the limit,
more connections add nothing. The peer then uses
:func:`choose_connections` connections towards that peer: the fewest that
reach 90% of ``bk``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from pyccl import protocol as P

__all__ = ["AUTO_MAX", "targets", "measure", "choose_connections"]

AUTO_MAX = 16  # connections of the "many" probe in connections="auto"

log = logging.getLogger("pyccl.peer")


def targets(members: Sequence[P.Member], me: int, epoch: int, max_targets: int) -> list[P.Member]:
    """Whom member ``me`` (a peer id) probes, in order."""
    ids = [m.peer_id for m in members]
    n, i = len(members), ids.index(me)
    by_offset = [members[(i + r) % n] for r in range(1, n)]
    if len(by_offset) <= max_targets:
        return by_offset
    keep = {by_offset[0].peer_id, by_offset[-1].peer_id}  # ring neighbours
    rest = [m for m in by_offset if m.peer_id not in keep]
    picked = random.Random(epoch * 1_000_003 + me).sample(rest, max(0, max_targets - len(keep)))
    chosen = keep | {m.peer_id for m in picked}
    return [m for m in by_offset if m.peer_id in chosen]


def choose_connections(b1: float, bk: float, k_max: int = AUTO_MAX) -> int:
    """The fewest connections that carry 90% of ``bk`` (bytes/s with ``k_max``)
    when each carries ``b1`` (bytes/s with one alone)."""
    if b1 <= 0 or not math.isfinite(b1):
        return k_max
    return max(1, min(k_max, math.ceil(0.9 * bk / b1 - 1e-9)))


def measure(dp: Any, members: Sequence[P.Member], me: int, epoch: int, connections: int, seconds: float,
            max_bytes: int, max_targets: int, auto: dict[int, int] | None = None, timeout: float = 10.0,
            moved: Callable[[], bool] = lambda: False) -> tuple[tuple[P.LinkReport, ...], bool]:
    """Probe this member's links; a probe that fails (a peer died or hangs:
    each probe gives up after ``timeout``) is left out, and probing stops
    once ``moved()`` says the epoch is over. With ``auto`` (connections per
    peer id, updated here) each link is probed for its connection count.
    Returns the reports and whether a count in ``auto`` changed."""
    out = []
    counts: dict[int, int] = {}
    for m in targets(members, me, epoch, max_targets):
        if moved():
            break
        try:
            if auto is not None:
                _, b1, _ = dp.probe(m.host, m.port, 1, 3, seconds, max_bytes, timeout)
                rtt, bandwidth, sent = dp.probe(m.host, m.port, AUTO_MAX, 1, seconds, max_bytes, timeout)
                counts[m.peer_id] = choose_connections(b1, bandwidth)
            else:
                rtt, bandwidth, sent = dp.probe(m.host, m.port, connections, 3, seconds, max_bytes, timeout)
        except RuntimeError as exc:
            log.info("peer %d: probing peer %d failed: %s", me, m.peer_id, exc)
            continue
        log.debug("peer %d -> %d: rtt %.2f ms, %.1f MB/s (%d bytes)", me, m.peer_id, rtt * 1e3, bandwidth / 1e6, sent)
        out.append(P.LinkReport(m.peer_id, rtt, bandwidth))
    changed = auto is not None and any(auto.get(p) != c for p, c in counts.items())
    if auto is not None:
        auto.update(counts)
    return tuple(out), changed
