"""Ring order from measured links, on the master (pure).

``optimize_topology()`` rounds carry every member's measurements of its
links (``vote`` with ``links``); once all members voted, :func:`plan` turns
them into the ring order the next epoch commits (:mod:`pyccl.ringopt`
solves it). Measurements are kept per group (:attr:`Group.links`, newest
wins), so later admissions place a joiner where it costs least
(:func:`place_joiners`): its links are estimated from its region's measured
links (``Communicator(region=...)``); a joiner with no region goes to the end,
as without measurements. Groups whose peers gave ``order`` keys (the torch
backend: ring position == rank) keep that order: there is nothing to optimise.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyccl import protocol as P
from pyccl import ringopt
from pyccl.master.model import Peer

__all__ = ["REFERENCE_BYTES", "record", "plan", "place_joiners", "region_labels"]

# The all-reduce size the ring is optimised for: large enough that
# bandwidth, not latency, decides between rings that differ in both.
REFERENCE_BYTES = 64 << 20
# A new ring must be estimated this much faster than the current one: rings
# that tie (or differ by measurement noise) are not worth an epoch change.
MIN_GAIN = 0.05

Links = dict[tuple[int, int], tuple[float, float]]  # (from id, to id) -> (bytes/s, one-way s)


def record(links: Links, voter: int, reports: Sequence[P.LinkReport]) -> None:
    """Fold one voter's measurements into the group's links (newest wins)."""
    for r in reports:
        if r.peer_id != voter and r.bandwidth > 0:
            links[(voter, r.peer_id)] = (r.bandwidth, r.rtt / 2)


def _matrices(peers: Sequence[Peer], links: Links) -> tuple[list[list[float]], list[list[float]]]:
    index = {p.peer_id: i for i, p in enumerate(peers)}
    measured = {(index[a], index[b]): v for (a, b), v in links.items() if a in index and b in index}
    return ringopt.fill(len(peers), measured, [p.region for p in peers])


def plan(members: Sequence[Peer], links: Links) -> list[Peer]:
    """The members in the ring order of least estimated all-reduce time; the
    current first member stays first (a ring has no start; rank 0 stays put).
    The current order stays unless the new one is MIN_GAIN faster."""
    if len(members) < 3 or any(p.order is not None for p in members):
        return list(members)
    bw, lat = _matrices(members, links)
    regions = _regions(members, lat)
    order = ringopt.solve(bw, lat, REFERENCE_BYTES, regions=regions)
    current = list(range(len(members)))
    if ringopt.ring_time(order, bw, lat, REFERENCE_BYTES, regions) > (1 - MIN_GAIN) * ringopt.ring_time(
            current, bw, lat, REFERENCE_BYTES, regions):
        return list(members)
    return [members[i] for i in order]


def _regions(peers: Sequence[Peer], lat: list[list[float]]) -> list[str] | list[int]:
    """The peers' given regions, or (if any lacks one) clusters of measured latency."""
    given = [p.region for p in peers]
    if all(r is not None for r in given):
        return [r for r in given if r is not None]
    return ringopt.rtt_regions(lat)


def place_joiners(members: list[Peer], joiners: Sequence[Peer], links: Links) -> list[Peer]:
    """``members`` with each joiner inserted where the estimated ring time is least
    (in arrival order); joiners without a region, or with nothing measured, go last."""
    ring = list(members)
    if any(p.order is not None for p in ring) or not links:
        return ring + [j for j in joiners if j not in ring]
    for j in joiners:
        if j in ring:
            continue
        if j.region is None or len(ring) < 2:
            ring.append(j)
            continue
        peers = [*ring, j]
        bw, lat = _matrices(peers, links)
        regions = [p.region for p in peers]

        def cost(order: Sequence[int], bw: list[list[float]] = bw, lat: list[list[float]] = lat,
                 regions: list[str | None] = regions) -> float:
            return ringopt.ring_time(order, bw, lat, REFERENCE_BYTES, regions)

        order = ringopt.insert_cheapest(list(range(len(ring))), len(ring), cost)
        ring = [peers[i] for i in order]
    return ring


def region_labels(members: Sequence[Peer], links: Links) -> tuple[str, ...] | None:
    """Each member's region for the ``epoch`` frame: the given ones if every
    member gave one; else latency clusters ("~0", "~1", ...) when every
    member's links were measured; else None (no two-level all-reduce)."""
    given = [p.region for p in members]
    if all(r is not None for r in given):
        return tuple(r for r in given if r is not None)
    ids = {p.peer_id for p in members}
    if len(members) < 4 or any(not any(a == p.peer_id and b in ids for a, b in links) for p in members):
        return None
    _, lat = _matrices(members, links)
    return tuple(f"~{c}" for c in ringopt.rtt_regions(lat))
