"""The typed control frames (pyccl/protocol.py): every frame survives the
wire, bad fields are refused with the frame and field named, and the frame
tables in docs/architecture.md list exactly the fields the classes have."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from pyccl import protocol as P
from pyccl import wire

pytestmark = pytest.mark.timeout(30)

SAMPLES: list[Any] = [
    P.Hello(3, "10.0.0.1", 7000, "w0", True, 2),
    P.Hello(0, "h", 1),
    P.Hello(0, "h", 1, nonce=bytes(range(32))),
    P.Hello(0, "h", 1, host_id="0f" * 16),
    P.Hello(0, "h", 1, host_id="0f" * 16, region="eu-west"),
    P.Auth(b"p" * 32),
    P.Challenge(b"n" * 32, b"q" * 32),
    P.Error("refused", "auth"),
    P.HEARTBEAT,
    P.Bye(),
    P.Vote(1 << 20 | 3),
    P.Done(4, 2, 9),
    P.Failed(4, 2, 9, "mismatch", "sizes differ"),
    P.Drained(4, ((0, 3), (7, 1))),
    P.Sync(2, "receive_only", (P.StateKey("a", "float32", (2, 3), 24, 2**64 - 1), P.StateKey("b", "int8", (), 1, 0))),
    P.SyncDone(1, False, "holder gone"),
    P.Welcome(5, 1.0, 5.0),
    P.Epoch(4, (P.Member(1, "h1", 7001), P.Member(2, "h2", 7002)), ((0, 3),), 12, "peer", "peer 3 is gone"),
    P.Epoch(5, (P.Member(1, "h1", 7001),), (), 0, "admit", "", b"s" * 32),
    P.Epoch(6, (P.Member(1, "h1", 7001), P.Member(2, "h2", 7002)), (), 0, "admit", "", None, ("ab", "")),
    P.Epoch(7, (P.Member(1, "h1", 7001), P.Member(2, "h2", 7002)), (), 0, "admit", "", None, ("ab", ""),
            ("eu", "us")),
    P.Drain(4, "admit", "admitting [5]"),
    P.OpOk(4, 2, 9),
    P.RoundDone(7, True),
    P.Error("expelled"),
    P.SyncPlan(1, 3, ((0, 17),), (P.Member(2, "h2", 7002),)),
    P.SyncResult(1, True, 3, ""),
    P.Hello(0, "h", 1, resume=P.Resume(4, 9, (4, 2), True, ((0, 3),), ((0, 2),), ((0, 1),), 5, 6, 2, True, 1, 7,
                                        2**64 - 1, 3)),
    P.Welcome(5, 1.0, 5.0, 3),
    P.Probe(2, True, "10.0.0.2:48148", b"n" * 32, b"p" * 32),
    P.Probe(0, False, "h:1", b"n" * 32),
    P.Standing(2, False),
    P.EpochDelta(8, 7, (2,), (P.Added(1, 9, "h9", 7009, "cd"),), ((0, 3),), 4, "admit", "", b"s" * 32, ("eu", "us"), 3),
    P.EpochDelta(8, 7, (), (), (), 0, "peer", "why"),
]


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: f.TYPE)
def test_every_frame_survives_the_wire(frame: Any) -> None:
    decoded = wire.decode_body(wire.encode(frame.to_wire())[4:])
    parse = P.parse_peer_frame if frame.TYPE in P.PEER_FRAMES and not isinstance(frame, (P.Heartbeat,)) \
        else P.parse_master_frame
    assert parse(decoded) == frame


def test_every_frame_class_has_a_sample() -> None:
    assert {type(f) for f in SAMPLES} == set(P.PEER_FRAMES.values()) | set(P.MASTER_FRAMES.values())


@pytest.mark.parametrize("raw, match", [
    ({"type": "done", "epoch": 1, "tag": 2**31, "seq": 0}, "'done' field 'tag'"),
    ({"type": "done", "epoch": True, "tag": 0, "seq": 0}, "'done' field 'epoch' must be an integer"),
    ({"type": "failed", "epoch": 1, "tag": 0, "seq": 0, "kind": "other", "reason": ""}, "'failed' field 'kind'"),
    ({"type": "hello", "version": 2, "peer_group": 0, "data_host": "h", "data_port": 1}, "protocol version 2"),
    ({"type": "hello", "version": 1, "peer_group": 0, "data_host": "", "data_port": 1}, "'data_host' is empty"),
    ({"type": "drained", "epoch": 1, "next_seq": [[1, 2, 3]]}, "malformed pair"),
    ({"type": "hello", "version": 1, "peer_group": 0, "data_host": "h", "data_port": 1, "host_id": "x" * 65},
     "'host_id'"),
    ({"type": "sync", "revision": 0, "strategy": "enforce_popular", "keys": [["b", "u8", [], 0, 0],
                                                                             ["a", "u8", [], 0, 0]]}, "not sorted"),
    ({"type": "nonsense"}, "unknown frame type"),
])
def test_bad_peer_frames_are_refused_naming_the_field(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(wire.FrameError, match=match):
        P.parse_peer_frame(raw)


@pytest.mark.parametrize("raw, match", [
    ({"type": "epoch", "epoch": 2, "members": [], "fence": [], "next_round": 0, "kind": "peer"}, "non-empty"),
    ({"type": "epoch", "epoch": 2, "members": [[1, "h", 0]], "fence": [], "next_round": 0, "kind": "peer"},
     "is not \\[peer_id, host, port\\]"),
    ({"type": "epoch", "epoch": 2, "members": [[1, "h", 1]], "fence": [], "next_round": 0, "kind": "peer",
      "hosts": ["a", "b"]}, "'hosts' must list one host id"),
    ({"type": "epoch", "epoch": 2, "members": [[1, "h", 1]], "fence": [], "next_round": 0, "kind": "peer",
      "hosts": ["x" * 65]}, "'hosts' must list one host id"),
    ({"type": "op_ok", "epoch": 1, "tag": -1, "seq": 0}, "'op_ok' field 'tag'"),
    ({"type": "welcome", "peer_id": 0, "heartbeat_interval": 1, "heartbeat_timeout": 5}, "'peer_id'"),
    ({"type": "sync_plan", "sync": 1, "revision": 1, "fetch": [], "holders": [["x", "h", 1]]}, "holder entry"),
])
def test_bad_master_frames_are_refused_naming_the_field(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(wire.FrameError, match=match):
        P.parse_master_frame(raw)


def _doc_tables() -> dict[str, set[set[str]]]:
    """frame type -> the field names its rows in docs/architecture.md list."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    known = set(P.PEER_FRAMES) | set(P.MASTER_FRAMES)
    out: dict[str, Any] = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        for i, cell in enumerate(cells[:2]):
            m = re.fullmatch(r"`([a-z_]+)`", cell)
            if m and m.group(1) in known and i + 1 < len(cells):
                names = set(re.findall(r"`([a-z_]+)`", cells[i + 1]))
                out.setdefault(m.group(1), []).append(names)
                break
    return out


def test_docs_frame_tables_match_the_classes() -> None:
    tables = _doc_tables()
    classes = {**P.PEER_FRAMES, **P.MASTER_FRAMES}
    assert set(tables) == set(classes), "docs/architecture.md must list every frame type"
    for name, rows in tables.items():
        want = {f.name for f in fields(classes[name])}
        for got in rows:
            assert got == want, f"docs row for '{name}' lists {sorted(got)}, the class has {sorted(want)}"
