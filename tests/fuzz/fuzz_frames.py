"""Coverage-guided fuzzing (atheris, libFuzzer's engine for Python) of every
Python parser of bytes from the network: the control frames a master reads
from peers and peers read from the master (:mod:`pyccl.protocol` over
:mod:`pyccl.wire`), and the telemetry frames ``pyccl stress`` reads from its
peers (:mod:`pyccl.stress.protocol`).

Each input is either a raw byte stream, split into frames the way a
connection is, or (structure-aware, to get past msgpack quickly) a map of a
known frame type with fields drawn from every field name the protocol uses
and values of every msgpack type. Each decoded map goes through every
parser. A parser may refuse a frame only with ``FrameError``; anything else
is a finding. A frame that parses must survive a round trip
(``parse(frame.to_wire()) == frame``).

Run through ``tests/fuzz/run.sh``, or directly:
``python tests/fuzz/fuzz_frames.py -max_total_time=60 CORPUS_DIR``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    import msgpack
    from pyccl import protocol as P
    from pyccl import wire
    from pyccl.stress import protocol as SP

_TYPES = sorted(set(P.PEER_FRAMES) | set(P.MASTER_FRAMES) |
                {"step", "sync", "phase", "hello", "admitted", "sync_failed", "lost", "error", "bye"})
_FIELDS = sorted({f.name for cls in (*P.PEER_FRAMES.values(), *P.MASTER_FRAMES.values())
                  for f in dataclasses.fields(cls)} |
                 {"t", "t0", "t1", "peer_id", "rev", "ops", "findings", "hash", "rx", "seconds", "phase", "index",
                  "pid", "reason", "text", "members", "version"})


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 11 if depth < 2 else 8)
    if kind == 0:
        return fdp.ConsumeIntInRange(0, 70)
    if kind == 1:  # anywhere in msgpack's range: negative, beyond 2**63
        return fdp.ConsumeInt(8) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**64 - 1)
    if kind == 2:
        return fdp.ConsumeRegularFloat()
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 4:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
    if kind == 5:
        return fdp.ConsumeBytes(32)
    if kind == 6:
        return fdp.ConsumeBool()
    if kind == 7:
        return None
    if kind == 8:
        return fdp.PickValueInList(["h", "float32", "admit", "peer", "receive_only", "auth", "expelled"])
    if kind == 9:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 10:
        return [[_value(fdp, depth + 2) for _ in range(3)] for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {fdp.PickValueInList(_FIELDS): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def _parse_everywhere(m: dict[str, Any]) -> None:
    for parse in (P.parse_peer_frame, P.parse_master_frame):
        try:
            frame = parse(m)
        except wire.FrameError:
            continue
        again = parse(frame.to_wire())
        if again != frame:
            raise AssertionError(f"round trip changed {frame!r} into {again!r}")
    try:
        SP.parse_peer_frame(m)
    except wire.FrameError:
        pass


def _feed(stream: bytes) -> None:
    try:
        SP.FrameReader(_parse_everywhere).feed(stream)
    except wire.FrameError:
        pass  # garbage framing: the connection is closed


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        _feed(fdp.ConsumeBytes(fdp.remaining_bytes()))
        return
    m: dict[str, Any] = {"type": fdp.PickValueInList(_TYPES)}
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        m[fdp.PickValueInList(_FIELDS)] = _value(fdp)
    _feed(wire.encode(m) if len(msgpack.packb(m, use_bin_type=True)) <= wire.MAX_FRAME_BYTES else b"")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
