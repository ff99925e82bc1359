"""Writes the seed inputs of the fuzzers into ``corpus/<fuzzer>/`` (run once;
the files are kept in the repository beside any regression inputs).

Seeds are valid inputs (well-formed frames of every kind), so that the
fuzzers start from the protocol's accepted paths and mutate from there.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pyccl import protocol as P
from pyccl import wire

HERE = Path(__file__).resolve().parent
LINK = struct.Struct("<IB3xQQQII")
HEADER = struct.Struct("<IBBBBQIIQQQII")
REQUEST = struct.Struct("<IIQQQQ")
LINK_MAGIC, DATA_MAGIC, REQUEST_MAGIC = 0x4B4E4C50, 0x41544450, 0x51525350


def control_frames() -> list[P.PeerFrame | P.MasterFrame]:
    return [
        P.Hello(3, "10.0.0.1", 7000, "w0", True, 2, bytes(range(32))),
        P.Auth(b"p" * 32), P.Challenge(b"n" * 32, b"q" * 32), P.Error("refused", "auth"), P.Bye(),
        P.Vote(1 << 20 | 3), P.Done(4, 2, 9), P.Failed(4, 2, 9, "mismatch", "sizes differ"),
        P.Drained(4, ((0, 3), (7, 1))),
        P.Sync(2, "receive_only", (P.StateKey("a", "float32", (2, 3), 24, 2**64 - 1),)),
        P.SyncDone(1, False, "holder gone"), P.Welcome(5, 1.0, 5.0),
        P.Epoch(4, (P.Member(1, "h1", 7001), P.Member(2, "h2", 7002)), ((0, 3),), 12, "peer", "gone", b"s" * 32),
        P.Drain(4, "admit", "admitting [5]"), P.OpOk(4, 2, 9), P.RoundDone(7, True), P.HEARTBEAT,
        P.SyncPlan(1, 3, ((0, 17),), (P.Member(2, "h2", 7002),)), P.SyncResult(1, True, 3, ""),
        P.EpochDelta(5, 4, (2,), (P.Added(1, 9, "h9", 7009, "cd"),), ((0, 3),), 4, "admit", "", b"s" * 32),
    ]


def telemetry_frames() -> list[dict[str, object]]:
    return [
        {"type": "step", "t": 1.0, "peer_id": 3, "rev": 2, "t0": 0.5, "t1": 0.9, "ops": [], "findings": []},
        {"type": "sync", "t": 1.0, "peer_id": 3, "rev": 2, "hash": 7, "epoch": 4, "members": [1, 3], "rx": 10,
         "seconds": 0.1},
        {"type": "phase", "t": 1.0, "peer_id": 3, "phase": "op", "rev": 2, "epoch": 4, "members": [1, 3]},
        {"type": "lost", "t": 1.0, "peer_id": 3, "reason": "expelled"},
    ]


def main() -> None:
    def put(fuzzer: str, name: str, data: bytes) -> None:
        d = HERE / "corpus" / fuzzer
        d.mkdir(parents=True, exist_ok=True)
        (d / f"seed-{name}").write_bytes(data)

    for f in control_frames():
        put("fuzz_frames", f.TYPE, b"\x01" + wire.encode(f.to_wire()))
    for m in telemetry_frames():
        put("fuzz_frames", f"telemetry-{m['type']}", b"\x01" + wire.encode(m))
    put("fuzz_frames", "stream", b"\x01" + b"".join(wire.encode(f.to_wire()) for f in control_frames()[:6]))

    # fuzz_handshake: flags (bit 0 authenticate, bit 1 valid proof), opening, proof, then more.
    for flags in (0, 1, 3):
        put("fuzz_handshake", f"link-{flags}", bytes([flags]) + LINK.pack(LINK_MAGIC, 1, 5, 0, 1, 0, 1) + bytes(32))
        put("fuzz_handshake", f"state-{flags}",
            bytes([flags]) + REQUEST.pack(REQUEST_MAGIC, 0, 0, 0, 16, 5) + bytes(32) +
            REQUEST.pack(REQUEST_MAGIC, 1, 0, 0, 16, 5))

    # fuzz_state_requests: requests for the published keys (hashes 0x1111, 0x2222, 0x3333).
    put("fuzz_state_requests", "pieces",
        REQUEST.pack(REQUEST_MAGIC, 0, 0x1111, 0, 500, 0) + REQUEST.pack(REQUEST_MAGIC, 0, 0x1111, 500, 500, 0) +
        REQUEST.pack(REQUEST_MAGIC, 1, 0x2222, 0, 64, 0) + REQUEST.pack(REQUEST_MAGIC, 2, 0x3333, 0, 0, 0))

    # fuzz_data_frames: an all-reduce of 16 float32 in a world of 2 (two 32-byte
    # segments), rank 0, then frames of both phases for both chunks.
    op = bytes([0, 0, 0, 1, 0, 0, 4, 0])  # collective, dtype, redop, world-1, rank, root, count>>2, count&3
    frames = b""
    for phase, chunk in ((1, 1), (2, 0), (4, 0)):
        length = 0 if phase == 4 else 32
        frames += HEADER.pack(DATA_MAGIC, 1, phase, 1, 1, 7, 3, chunk, 11, 64, 32 * chunk if length else 0,
                              length, 2) + b"\x01" + bytes(range(length))
    put("fuzz_data_frames", "allreduce", op + frames)


if __name__ == "__main__":
    main()
