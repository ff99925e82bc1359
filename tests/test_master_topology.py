"""optimize_topology() rounds on the master's pure state machine."""

from __future__ import annotations

from typing import Any

import pytest

from test_master_state import Harness, last_epoch

pytestmark = pytest.mark.timeout(30)

FAST, SLOW = 500e6, 20e6  # bytes/s inside a region, between regions
NEAR, FAR = 0.001, 0.040  # RTT seconds


def group_of(h: Harness, regions: list[str]) -> list[int]:
    """Members joined in this order, each hello naming its region."""
    conns = [h.hello(region=regions[0])]
    for r in regions[1:]:
        conns.append(h.hello(region=r))
        k = h.admit_round(conns[:-1])
        h.send(conns[-1], {"type": "vote", "round": k})
    for c in conns:
        h.take(c)
    return conns


def links_of(h: Harness, c: int, conns: list[int], region: dict[int, str]) -> list[list[Any]]:
    out = []
    for other in conns:
        if other != c:
            same = region[c] == region[other]
            out.append([h.pid(other), NEAR if same else FAR, FAST if same else SLOW])
    return out


def optimize_vote(h: Harness, c: int, links: list[list[Any]]) -> None:
    h.send(c, {"type": "vote", "round": h.st._conns[c].next_round, "links": links})


def crossings(ring: tuple[int, ...], region_of_pid: dict[int, str]) -> int:
    return sum(1 for i in range(len(ring)) if region_of_pid[ring[i]] != region_of_pid[ring[(i + 1) % len(ring)]])


def setup(n: int = 6) -> tuple[Harness, list[int], dict[int, str], dict[int, str]]:
    h = Harness()
    regions = ["a" if i % 2 == 0 else "b" for i in range(n)]
    conns = group_of(h, regions)
    region = dict(zip(conns, regions))
    by_pid = {h.pid(c): r for c, r in region.items()}
    return h, conns, region, by_pid


def test_optimize_reorders_the_ring_at_the_next_epoch() -> None:
    h, conns, region, by_pid = setup()
    assert crossings(h.info().members, by_pid) == 6
    epoch = h.info().epoch
    for c in conns:
        optimize_vote(h, c, links_of(h, c, conns, region))
    drains = [f for f in h.take(conns[0]) if f["type"] == "drain"]
    assert drains and drains[0]["kind"] == "topology"
    for c in conns:
        h.drained(c)
    frames = h.take(conns[0])
    ep = last_epoch(frames)
    assert ep["epoch"] == epoch + 1 and ep["kind"] == "topology"
    ring = tuple(m[0] for m in ep["members"])
    assert ring[0] == h.pid(conns[0])  # rank 0 stays put
    assert crossings(ring, by_pid) == 2
    assert frames[-1]["type"] == "round_done" and frames[-1]["changed"] is True
    # Optimizing again changes nothing: answered at once, no drain.
    for c in conns:
        h.take(c)
        optimize_vote(h, c, links_of(h, c, conns, region))
    for c in conns:
        assert h.take(c) == [{"type": "round_done", "round": h.st._conns[c].next_round - 1, "changed": False}]
    assert h.info().epoch == epoch + 1


def test_a_member_dying_before_its_vote_does_not_stop_the_round() -> None:
    h, conns, region, by_pid = setup()
    for c in conns[:-1]:
        optimize_vote(h, c, links_of(h, c, conns, region))
    h.disconnect(conns[-1])  # died before voting: drained as a death, then the round completes
    survivors = conns[:-1]
    for c in survivors:
        h.drained(c)
    for c in survivors:  # the topology drain of the round
        h.drained(c)
    ep = last_epoch(h.take(survivors[0]))
    assert ep["kind"] == "topology"
    ring = tuple(m[0] for m in ep["members"])
    assert len(ring) == 5 and crossings(ring, by_pid) == 2


def test_a_joiner_with_a_region_is_placed_inside_it() -> None:
    h, conns, region, by_pid = setup()
    for c in conns:
        optimize_vote(h, c, links_of(h, c, conns, region))
    for c in conns:
        h.drained(c)
    for c in conns:
        h.take(c)
    joiner = h.hello(region="b")
    k = h.admit_round(conns)
    by_pid[h.pid(joiner)] = "b"
    ring = tuple(m[0] for m in last_epoch(h.take(joiner))["members"])
    assert len(ring) == 7 and crossings(ring, by_pid) == 2, ring
    h.send(joiner, {"type": "vote", "round": k})
    # Without a region there is nothing to go on: it goes last.
    other = h.hello()
    h.admit_round([*conns, joiner])
    ring = tuple(m[0] for m in last_epoch(h.take(other))["members"])
    assert ring[-1] == h.pid(other)


def test_bad_links_expel_the_voter() -> None:
    h, conns, _, _ = setup(3)
    h.send(conns[1], {"type": "vote", "round": h.st._conns[conns[1]].next_round,
                      "links": [[h.pid(conns[0]), float("nan"), 1.0]]})
    assert conns[1] in h.closed


def test_relink_commits_a_new_epoch_with_the_same_order() -> None:
    h, conns, region, _ = setup(3)
    members = h.info().members
    epoch = h.info().epoch
    for i, c in enumerate(conns):
        h.send(c, {"type": "vote", "round": h.st._conns[c].next_round, "links": links_of(h, c, conns, region),
                   "relink": i == 1})
    for c in conns:
        h.drained(c)
    ep = last_epoch(h.take(conns[0]))
    assert ep["epoch"] == epoch + 1 and tuple(m[0] for m in ep["members"]) == members


def test_epochs_carry_the_members_regions() -> None:
    h, conns, region, _ = setup(4)
    joiner = h.hello(region="b")
    h.admit_round(conns)
    ep = last_epoch(h.take(joiner))
    by_pid = {h.pid(c): r for c, r in region.items()}
    assert ep["regions"] == [by_pid.get(m[0], "b") for m in ep["members"]]
    h.vote(joiner)  # its first vote is the round that admitted it
    other = h.hello()  # no region: regions unknown until links are measured
    h.admit_round([*conns, joiner])
    assert "regions" not in last_epoch(h.take(other))
