"""epoch_delta (pyccl/epoch_frames.py): a delta made by the master expands on
the peer into exactly the epoch frame it stands for; what it cannot say is
sent whole; a delta that does not fit the peer's epoch is an invalid frame."""

from __future__ import annotations

import random

import pytest
from pyccl import protocol as P
from pyccl.wire import FrameError, decode_body, encode

from test_master_state import Harness


def _epoch(n: int, ids: list[int], hosts: bool = True, regions: bool = False) -> P.Epoch:
    members = tuple(P.Member(i, f"10.0.{i >> 8}.{i & 255}", 7000 + i % 1000) for i in ids)
    return P.Epoch(n, members, ((0, n),), n + 1, "peer", f"epoch {n}", b"s" * 32,
                   tuple(f"host{i % 3}" for i in ids) if hosts else None,
                   tuple(f"r{i % 2}" for i in ids) if regions else None, 2)


def _wire(frame: P.EpochDelta) -> P.EpochDelta:
    body = encode(frame.to_wire())[4:]
    return P.EpochDelta.parse(decode_body(body))


@pytest.mark.parametrize("seed", range(200))
def test_a_delta_expands_to_the_epoch_it_stands_for(seed: int) -> None:
    rng = random.Random(seed)
    ids = rng.sample(range(1, 10_000), rng.randint(1, 60))
    stay = [i for i in ids if rng.random() > 0.2] or ids[:1]
    new = list(stay)
    for j in rng.sample(range(10_000, 20_000), rng.randint(0, 10)):
        new.insert(rng.randint(0, len(new)), j)
    hosts, regions = rng.random() < 0.7, rng.random() < 0.3
    prev, nxt = _epoch(5, ids, hosts, regions), _epoch(6, new, hosts, regions)
    delta = P.make_delta(prev, nxt)
    changed = len(set(ids) ^ set(new))
    if delta is None:
        assert 2 * changed >= len(new)  # only when the whole frame is about as small
        return
    assert _wire(delta).expand(prev) == nxt


def test_a_delta_is_much_smaller_than_a_large_ring() -> None:
    ids = list(range(1, 10_001))
    prev, nxt = _epoch(5, ids), _epoch(6, ids[:5000] + [20_000] + ids[5000:9000])
    delta = P.make_delta(prev, nxt)
    assert delta is not None and delta.expand(prev) == nxt
    assert len(encode(delta.to_wire())) * 20 < len(encode(nxt.to_wire()))


def test_what_a_delta_cannot_say_goes_whole() -> None:
    prev = _epoch(5, [1, 2, 3, 4, 5, 6])
    assert P.make_delta(prev, _epoch(6, [2, 1, 3, 4, 5, 6])) is None  # the members who stay changed order
    moved = P.Epoch(6, (P.Member(1, "elsewhere", 1),) + prev.members[1:], (), 0, "peer", "")
    assert P.make_delta(prev, moved) is None  # a member's data address changed


@pytest.mark.parametrize("prev_epoch, ids", [(4, [1, 2, 3, 4, 5, 6]), (5, [1, 2, 3])])
def test_a_delta_that_does_not_fit_the_held_epoch_is_invalid(prev_epoch: int, ids: list[int]) -> None:
    delta = P.make_delta(_epoch(5, [1, 2, 3, 4, 5, 6]), _epoch(6, [1, 2, 3, 4, 5]))
    assert delta is not None
    with pytest.raises(FrameError):
        delta.expand(_epoch(prev_epoch, [7, 8] if prev_epoch == 5 else ids))
    with pytest.raises(FrameError):
        delta.expand(None)


@pytest.mark.parametrize("bad", [
    {"added": [[0, 9, "h", 7009]]},
    {"added": [[3, 9, "h", 7009, ""], [3, 10, "h", 7010, ""]]},
    {"removed": [0]},
    {"regions": ["x" * 65]},
])
def test_malformed_deltas_are_refused(bad: dict) -> None:
    m = {"type": "epoch_delta", "epoch": 6, "base": 5, "removed": [], "added": [], "fence": [], "next_round": 0,
         "kind": "peer", **bad}
    with pytest.raises(FrameError):
        P.EpochDelta.parse(m)


def test_the_master_sends_members_deltas_and_joiners_the_ring() -> None:
    h = Harness()
    conns = h.join_group(8)  # members since earlier epochs get deltas; each joiner the whole ring
    assert h.deltas > 0
    h.disconnect(conns[3])
    for c in conns[:3] + conns[4:]:
        h.drained(c)
    assert h.info().members == tuple(h.pid(c) for c in conns[:3] + conns[4:])
