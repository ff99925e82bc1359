"""Telemetry between the stress orchestrator and its peer processes.

Framing is the control plane's (:mod:`pyccl.wire`): ``u32 big-endian length |
msgpack map`` with a string ``type``. Each peer process holds one TCP
connection to the orchestrator (never a shared queue: a SIGKILL in the middle
of a write can only break that peer's own connection). The orchestrator side
is asyncio on uvloop (:mod:`pyccl.stress.orchestrator`); the peer side is the
blocking :class:`TelemetryClient`.

Peer -> orchestrator (every frame has ``t``: the peer's ``time.monotonic()``,
which on Linux is one clock for all processes of the machine):

=============  ================================================================
``hello``      ``index``, ``pid``: first frame
``admitted``   ``peer_id``, ``epoch``, ``members``: a Communicator was admitted
``phase``      ``peer_id``, ``phase`` (one of :data:`PHASES`), ``rev``, ``epoch``,
               ``members``: the peer entered a phase of its loop
``sync``       ``peer_id``, ``rev``, ``hash``, ``epoch``, ``members``,
               ``rx``, ``seconds``: a shared-state sync succeeded
``sync_failed`` ``peer_id``, ``reason``: a sync raised CCLError (peer rejoins)
``step``       ``peer_id``, ``rev``, ``t0``, ``t1``, ``ops`` (list of
               :class:`OpOutcome` rows), ``findings`` (list of maps): one step
``lost``       ``peer_id``, ``reason``: the Communicator is gone (expelled,
               master lost); the peer will rejoin with a new one
``error``      ``text``: unexpected exception (traceback)
``bye``        -: the peer stops after the orchestrator's ``stop``
=============  ================================================================

Orchestrator -> peer: ``stop``.

Parsing validates every field (types and ranges) and raises
:class:`pyccl.wire.FrameError`; the orchestrator then closes that peer's
telemetry connection and counts a violation, as a bad frame means a broken
peer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyccl import wire
from pyccl.wire import FrameError

__all__ = [
    "PHASES",
    "OP_STATUSES",
    "OpOutcome",
    "StepReport",
    "SyncReport",
    "PhaseReport",
    "parse_peer_frame",
    "TelemetryClient",
    "FrameReader",
]

# Phases of the peer loop; the watchdog times the first four.
PHASES = ("connect", "topology", "sync", "ops", "update", "idle")
WATCHED_PHASES = frozenset({"connect", "topology", "sync", "ops"})
# Outcome of one all-reduce as the peer saw it.
OP_STATUSES = ("ok", "peer_failure", "lost", "mismatch", "error")

_MAX_MEMBERS = 4096
_MAX_OPS = 64


def _members(frame: Mapping[str, Any], key: str = "members") -> tuple[int, ...]:
    raw = wire.get_list(frame, key, _MAX_MEMBERS)
    if not all(wire.is_int(p, 1) for p in raw):
        raise FrameError(f"'{frame['type']}' field '{key}' must be a list of peer ids")
    return tuple(int(p) for p in raw)


@dataclass(frozen=True)
class OpOutcome:
    """One all-reduce of a step.

    ``epoch``/``peers``/``hash`` are meaningful only for ``status == "ok"``.
    ``e0``/``e1`` are the Communicator's epoch just before and just after the
    call was issued: when equal, the op ran in that epoch.
    """

    tag: int
    status: str
    epoch: int = 0
    peers: tuple[int, ...] = ()
    hash: int = 0
    seconds: float = 0.0
    e0: int = 0
    e1: int = 0
    reason: str = ""

    def to_row(self) -> list[Any]:
        return [self.tag, self.status, self.epoch, list(self.peers), self.hash, self.seconds, self.e0, self.e1,
                self.reason[:512]]

    @classmethod
    def from_row(cls, row: Any) -> OpOutcome:
        if not isinstance(row, list) or len(row) != 9:
            raise FrameError("'step' op row must be a list of 9 fields")
        tag, status, epoch, peers, h, secs, e0, e1, reason = row
        fake = {"type": "step", "tag": tag, "epoch": epoch, "hash": h, "e0": e0, "e1": e1, "secs": secs,
                "reason": reason, "status": status, "peers": peers}
        return cls(
            wire.get_int(fake, "tag", 0, wire.MAX_TAG),
            wire.get_choice(fake, "status", OP_STATUSES),
            wire.get_int(fake, "epoch"),
            _members(fake, "peers"),
            wire.get_int(fake, "hash", 0, wire.MAX_UINT64),
            wire.get_float(fake, "secs", 0.0, 1e9),
            wire.get_int(fake, "e0"),
            wire.get_int(fake, "e1"),
            wire.get_str(fake, "reason", 512),
        )


@dataclass(frozen=True)
class StepReport:
    """One pass of a peer's loop over ``concurrency`` all-reduces at revision ``rev``.

    ``findings`` are the peer's own checks that failed (wrong values, input
    changed by a failed op, MismatchError): each a map with ``kind``,
    ``tag`` and details; every one is a violation.
    """

    peer_id: int
    rev: int
    t0: float
    t1: float
    ops: tuple[OpOutcome, ...]
    findings: tuple[dict[str, Any], ...] = ()

    @property
    def complete(self) -> bool:
        """Every op succeeded, so the peer applied the update."""
        return bool(self.ops) and all(o.status == "ok" for o in self.ops)

    def to_frame(self) -> dict[str, Any]:
        return {"type": "step", "peer_id": self.peer_id, "rev": self.rev, "t0": self.t0, "t1": self.t1,
                "t": self.t1, "ops": [o.to_row() for o in self.ops], "findings": list(self.findings)}


@dataclass(frozen=True)
class SyncReport:
    """A successful ``sync_shared_state``: revision and content hash afterwards."""

    peer_id: int
    rev: int
    hash: int
    epoch: int
    members: tuple[int, ...]
    rx: int
    seconds: float
    t: float


@dataclass(frozen=True)
class PhaseReport:
    """The peer entered ``phase`` at time ``t`` (revision and epoch as it knew them)."""

    peer_id: int
    phase: str
    rev: int
    epoch: int
    members: tuple[int, ...]
    t: float


@dataclass(frozen=True)
class Other:
    """Any other peer frame, kept as its validated fields."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)


PeerFrame = StepReport | SyncReport | PhaseReport | Other


def parse_peer_frame(frame: Mapping[str, Any]) -> PeerFrame:
    """Validate a peer -> orchestrator frame and return its typed form."""
    t = frame["type"]
    now = wire.get_float(frame, "t", 0.0, 1e12) if t != "bye" or "t" in frame else 0.0
    if t == "step":
        findings = wire.get_list(frame, "findings", 256)
        if not all(isinstance(f, dict) and isinstance(f.get("kind"), str) for f in findings):
            raise FrameError("'step' findings must be maps with a string 'kind'")
        return StepReport(
            wire.get_int(frame, "peer_id", 1),
            wire.get_int(frame, "rev"),
            wire.get_float(frame, "t0", 0.0, 1e12),
            wire.get_float(frame, "t1", 0.0, 1e12),
            tuple(OpOutcome.from_row(r) for r in wire.get_list(frame, "ops", _MAX_OPS)),
            tuple(findings),
        )
    if t == "sync":
        return SyncReport(
            wire.get_int(frame, "peer_id", 1), wire.get_int(frame, "rev"),
            wire.get_int(frame, "hash", 0, wire.MAX_UINT64), wire.get_int(frame, "epoch"), _members(frame),
            wire.get_int(frame, "rx"), wire.get_float(frame, "seconds", 0.0, 1e9), now,
        )
    if t == "phase":
        return PhaseReport(
            wire.get_int(frame, "peer_id", 0), wire.get_choice(frame, "phase", PHASES), wire.get_int(frame, "rev"),
            wire.get_int(frame, "epoch"), _members(frame), now,
        )
    if t == "hello":
        return Other(t, {"index": wire.get_int(frame, "index"), "pid": wire.get_int(frame, "pid", 1), "t": now})
    if t == "admitted":
        return Other(t, {"peer_id": wire.get_int(frame, "peer_id", 1), "epoch": wire.get_int(frame, "epoch"),
                         "members": _members(frame), "t": now})
    if t in ("sync_failed", "lost"):
        return Other(t, {"peer_id": wire.get_int(frame, "peer_id", 0), "reason": wire.get_str(frame, "reason", 4096),
                         "t": now})
    if t == "error":
        return Other(t, {"text": wire.get_str(frame, "text", 65536), "t": now})
    if t == "bye":
        return Other(t, {"t": now})
    raise FrameError(f"unknown telemetry frame type {wire.clip(t, 32)}")


# ------------------------------------------------------------------ peer side


class TelemetryClient:
    """The peer's blocking telemetry connection.

    ``send`` is thread-safe and never raises: if the orchestrator is gone the
    peer is told to stop (``stop_requested`` becomes set), which is also what
    a ``stop`` frame does.
    """

    def __init__(self, host: str, port: int, index: int, timeout: float = 30.0) -> None:
        self.stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        import os

        self.send({"type": "hello", "index": index, "pid": os.getpid()})
        self._reader = threading.Thread(target=self._read_loop, name="stress-telemetry", daemon=True)
        self._reader.start()

    def send(self, frame: dict[str, Any]) -> None:
        frame.setdefault("t", time.monotonic())
        data = wire.encode(frame)
        try:
            with self._lock:
                self._sock.sendall(data)
        except OSError:
            self.stop_requested.set()

    def _read_loop(self) -> None:
        try:
            while True:
                frame = wire.recv_frame(self._sock)
                if frame["type"] == "stop":
                    self.stop_requested.set()
        except (OSError, ConnectionError, FrameError):
            pass
        self.stop_requested.set()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        except OSError:
            pass
        # Close the descriptor only once the reader is gone: a number closed
        # under a thread about to read it may already belong to a new socket.
        self._reader.join(5.0)
        if not self._reader.is_alive():
            self._sock.close()


# ------------------------------------------------------------ orchestrator side


class FrameReader:
    """Splits a byte stream into frames; bounded by :data:`pyccl.wire.MAX_FRAME_BYTES`.

    ``feed(data)`` calls ``on_frame`` for every complete frame and raises
    FrameError on garbage (the caller closes the connection).
    """

    def __init__(self, on_frame: Callable[[dict[str, Any]], None]) -> None:
        self._buf = bytearray()
        self._on_frame = on_frame

    def feed(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 4:
            n = wire.decode_length(bytes(self._buf[:4]))
            if len(self._buf) < 4 + n:
                return
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            self._on_frame(wire.decode_body(body))
