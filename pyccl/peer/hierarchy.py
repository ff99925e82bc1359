"""Two-level all-reduce on the peer side: its rings and when to use it (pure).

The master sends each member's region with every epoch (``epoch`` field
``regions``: given with ``Communicator(region=...)``, else latency clusters
from ``optimize_topology()``). When the members form R >= 2 regions of the
same size m >= 2, every peer derives the same two extra rings of the epoch
from (ring order, regions): its *region ring* (the region's members in ring
order) and its *cross ring* (the peer of the same rank in its region from
every region, regions in order of first appearance in the ring). The data
plane connects them alongside the ring (``LinkHello.ring`` 1 and 2) and
runs a two-level all-reduce over them (``csrc/collectives/two_level_allreduce.*``).

Unequal regions (a joiner arrived in one region, a peer of another died)
run the flat ring until the sizes match again: the shards of the cross
ring must be the same bytes in every region.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyccl import protocol as P

__all__ = ["MODES", "TWO_LEVEL_MIN_BYTES", "check_options", "groups", "sub_rings", "use_two_level"]

MODES = ("auto", "on", "off")
# "auto": smaller all-reduces stay on the ring, where three ring ops' extra
# hops and start frames would cost more than the inter-region bytes saved.
TWO_LEVEL_MIN_BYTES = 1 << 20

Ring = tuple[int, int, int, int, str, int, int]  # (ring id, rank, size, next id, next host, next port, prev id)


def groups(members: Sequence[P.Member], regions: Sequence[str] | None) -> list[list[P.Member]] | None:
    """Members per region (regions in order of first appearance, members in
    ring order), or None when a two-level all-reduce is not possible."""
    if regions is None or len(regions) != len(members) or any(not r for r in regions):
        return None
    by_region: dict[str, list[P.Member]] = {}
    for m, r in zip(members, regions):
        by_region.setdefault(r, []).append(m)
    sizes = {len(v) for v in by_region.values()}
    if len(by_region) < 2 or len(sizes) != 1 or sizes.pop() < 2:
        return None
    return list(by_region.values())


def sub_rings(members: Sequence[P.Member], regions: Sequence[str] | None, me: int) -> tuple[Ring, ...]:
    """The region ring (id 1) and cross ring (id 2) of peer ``me``, or () if none."""
    gs = groups(members, regions)
    if gs is None:
        return ()
    g = next(i for i, grp in enumerate(gs) if any(m.peer_id == me for m in grp))
    region = gs[g]
    r = next(i for i, m in enumerate(region) if m.peer_id == me)
    cross = [grp[r] for grp in gs]

    def ring(ring_id: int, ms: list[P.Member], rank: int) -> Ring:
        nxt, prev = ms[(rank + 1) % len(ms)], ms[(rank - 1) % len(ms)]
        return (ring_id, rank, len(ms), nxt.peer_id, nxt.host, nxt.port, prev.peer_id)

    return ring(1, region, r), ring(2, cross, g)


def use_two_level(mode: str, has_rings: bool, plain_all_reduce: bool, nbytes: int) -> bool:
    """Whether an op runs two-level: a plain (not quantized) all-reduce in an
    epoch with the rings, ``mode`` "on", or "auto" and at least
    TWO_LEVEL_MIN_BYTES. Every peer decides alike (same epoch, same call,
    same mode)."""
    if not has_rings or not plain_all_reduce or mode == "off":
        return False
    return mode == "on" or nbytes >= TWO_LEVEL_MIN_BYTES


def check_options(region: str | None, mode: str) -> tuple[str | None, str]:
    """``Communicator(region=, two_level=)`` validated (ValueError naming the problem)."""
    if region is not None and not 0 < len(region) <= P.MAX_REGION_LEN:
        raise ValueError(f"region must be 1..{P.MAX_REGION_LEN} characters, got {region!r}")
    if mode not in MODES:
        raise ValueError(f"two_level must be one of {MODES}, got {mode!r}")
    return region, mode
