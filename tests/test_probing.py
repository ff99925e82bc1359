"""Peer-side probe planning (pure parts of pyccl.peer.probing)."""

from __future__ import annotations

from pyccl import protocol as P
from pyccl.peer.probing import AUTO_MAX, choose_connections, targets


def members(n: int) -> list[P.Member]:
    return [P.Member(i + 1, "127.0.0.1", 20000 + i) for i in range(n)]


def test_small_groups_probe_every_other_member_in_ring_offset_order() -> None:
    ms = members(5)
    assert [m.peer_id for m in targets(ms, 3, 7, 16)] == [4, 5, 1, 2]


def test_large_groups_sample_with_the_neighbours_reproducibly() -> None:
    ms = members(40)
    a = targets(ms, 10, 3, 8)
    assert len(a) == 8 and {m.peer_id for m in a} >= {11, 9}
    assert a == targets(ms, 10, 3, 8)  # the same plan every time
    assert {m.peer_id for m in a} != {m.peer_id for m in targets(ms, 10, 4, 8)}  # another epoch, another sample
    assert 10 not in {m.peer_id for m in a}


def test_choose_connections() -> None:
    assert choose_connections(10e6, 160e6) == 15  # window-limited: each adds its share
    assert choose_connections(10e6, 40e6) == 4  # the link saturates at 40 MB/s
    assert choose_connections(2e9, 2.1e9) == 1  # CPU or link bound: one is enough
    assert choose_connections(0.0, 1e6) == AUTO_MAX
    assert choose_connections(1e6, 1e9) == AUTO_MAX
