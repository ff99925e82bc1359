"""The master's writer (pyccl/master/writer.py): large batches go out a slice
per loop iteration, yet no frame overtakes an earlier one to the same peer,
and other connections are written at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pyccl import protocol as P
from pyccl.master.model import Close, Send
from pyccl.master.verdicts import Verdict
from pyccl.master.writer import MAX_WRITE_BUFFER, SLICE_WRITES, Writer
from pyccl.wire import decode_body

pytestmark = pytest.mark.timeout(30)


class FakeTransport:
    def __init__(self) -> None:
        self.frames: list[str] = []
        self.closed = False
        self.buffered = 0

    def write(self, data: bytes) -> None:
        assert not self.closed
        f = decode_body(data[4:])
        self.frames.append(f"{f['type']}:{f.get('epoch', f.get('round', ''))}")

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return self.buffered


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list[Callable[[], Any]] = []

    def call_soon(self, fn: Callable[[], Any]) -> None:
        self.soon.append(fn)

    def run_one(self) -> bool:
        if not self.soon:
            return False
        self.soon.pop(0)()
        return True


def make(n: int) -> tuple[Writer, FakeLoop, dict[int, FakeTransport], list[int]]:
    loop = FakeLoop()
    transports = {c: FakeTransport() for c in range(n)}
    overflowed: list[int] = []
    return Writer(loop, transports, overflowed.extend), loop, transports, overflowed  # type: ignore[arg-type]


def test_small_batch_written_at_once():
    w, loop, ts, _ = make(3)
    frame = P.Drain(4, "admit", "x")
    w.apply([Send(c, frame) for c in ts] + [Send(1, P.RoundDone(7, True)), Close(2, "bye")])
    assert not loop.soon
    assert ts[0].frames == ["drain:4"] and ts[1].frames == ["drain:4", "round_done:7"] and ts[2].closed


def test_large_fan_out_goes_out_in_slices_and_keeps_per_connection_order():
    n = 3 * SLICE_WRITES
    w, loop, ts, _ = make(n + 1)
    drain, epoch = P.Drain(4, "admit", "x"), P.Epoch(5, (P.Member(1, "h", 1),), (), 0, "admit", "")
    w.apply([Send(c, drain) for c in range(n)] + [Send(c, epoch) for c in range(n)])
    written = sum(len(t.frames) for t in ts.values())
    assert written == SLICE_WRITES  # one slice now, the rest a slice per loop iteration
    w.apply([Send(n, P.OpOk(1, 0, 0))])  # another group's verdict: not behind the queue
    assert ts[n].frames == ["op_ok:1"]
    w.apply([Send(0, P.RoundDone(3, True))])  # a connection with queued frames: behind them
    iterations = 0
    while loop.run_one():
        iterations += 1
    assert iterations == 2 * n // SLICE_WRITES
    assert ts[0].frames == ["drain:4", "epoch:5", "round_done:3"]
    assert all(ts[c].frames == ["drain:4", "epoch:5"] for c in range(1, n))


def test_verdict_fan_out_behind_a_queue_and_on_its_own():
    n = SLICE_WRITES + 5
    w, loop, ts, _ = make(n)
    ids = tuple(range(n))
    w.fan_out(Verdict(P.OpOk(2, 0, 0), ids[:4]))
    assert [ts[c].frames for c in range(4)] == [["op_ok:2"]] * 4
    w.apply([Send(c, P.Drain(2, "peer", "x")) for c in ids])
    w.fan_out(Verdict(P.OpOk(2, 0, 1), ids))
    while loop.run_one():
        pass
    assert ts[n - 1].frames == ["drain:2", "op_ok:2"]
    assert ts[0].frames == ["op_ok:2", "drain:2", "op_ok:2"]


def test_closed_connections_are_skipped_and_overflow_reported():
    w, _, ts, overflowed = make(3)
    ts[0].closed = True
    ts[2].buffered = MAX_WRITE_BUFFER + 1
    w.fan_out(Verdict(P.OpOk(1, 0, 0), (0, 1, 2)))
    w.apply([Send(2, P.RoundDone(1, False))])
    assert ts[0].frames == [] and ts[1].frames == ["op_ok:1"]
    assert overflowed == [2, 2]


def test_clear_drops_the_queue():
    w, loop, ts, _ = make(2 * SLICE_WRITES)
    w.broadcast(list(ts), b"\x00\x00\x00\x0b" + b"\x81\xa4type\xa4ping")
    w.clear()
    while loop.run_one():
        pass
    assert sum(len(t.frames) for t in ts.values()) == SLICE_WRITES
