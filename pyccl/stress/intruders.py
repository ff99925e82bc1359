"""Intruders: strangers that try to join, read or disturb a run with a secret.

``pyccl stress --intruder-rate`` starts one attempt per Poisson arrival. Each
attempt is one :class:`Attack` against the run's master or a live peer's data
port, made the way a stranger on the network would (it knows addresses, the
wire formats and the protocol, but not the run secret), and ends in an
:class:`Attempt` that says whether it was *rejected* (closed at once, having
learnt nothing) or *leaked* (admitted, answered with data, or left open).

The attacks:

* ``join_no_secret`` / ``join_wrong_secret``: a real :class:`pyccl.Communicator`
  in its own process, without the secret or with a wrong one; ``connect()``
  must raise :class:`pyccl.AuthenticationError` (its latency is recorded).
* ``forged_proof``: a raw control connection answers the master's challenge
  with a random proof; the master must send ``error`` (kind ``auth``) and close.
* ``replay``: an eavesdropper's replay. The orchestrator (which holds the
  secret, standing in for a legitimate peer) computes the ``auth`` a member
  would have sent for one challenge; the intruder replays the same ``hello``
  and that ``auth`` on a new connection, which gets a fresh challenge.
* ``control_frames``: well-formed peer frames (``vote``, ``done``,
  ``heartbeat``) with guessed ids and rounds, without a handshake.
* ``data_frames``: a ring-link hello with a guessed epoch and peer ids, a
  guessed proof, then data frames with guessed op tags; the payload is a
  marker pattern (+inf / large values) that would show in any result it
  reached, and every result of the run is checked exactly by the verifier.
* ``state_request``: a shared-state request with a guessed key and epoch.

Whether a byte of an intruder reached a result or the state is checked
twice: the attempt sees what it was answered (any reply byte beyond the
acceptor's nonce is a leak), and the run's verifier checks every result and
every synced state bit for bit.
"""

from __future__ import annotations

import enum
import multiprocessing as mp
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from pyccl import auth, wire
from pyccl import protocol as P

__all__ = ["Attack", "Attempt", "IntruderTally", "attack"]

# Time an acceptor may take to close a rejected connection. A ring-link hello
# naming a future epoch waits up to 10 s for that epoch before its proof is
# checked (see DataPlane::serve_incoming), so the bound is above that.
CLOSE_WITHIN = 12.0
_JOIN_TIMEOUT = 5.0
_LINK_HELLO = struct.Struct("<IB3xQQQII")      # csrc/net/wire_format.h LinkHello
_DATA_HEADER = struct.Struct("<IBBBBQIIQQQII")  # csrc/net/wire_format.h DataHeader
_STATE_REQUEST = struct.Struct("<IIQQQQ")       # csrc/state/state_wire.h StateRequest
_LINK_MAGIC, _DATA_MAGIC, _REQUEST_MAGIC = 0x4B4E4C50, 0x41544450, 0x51525350


class Attack(str, enum.Enum):
    """What one intruder attempt tries."""

    JOIN_NO_SECRET = "join_no_secret"
    JOIN_WRONG_SECRET = "join_wrong_secret"
    FORGED_PROOF = "forged_proof"
    REPLAY = "replay"
    CONTROL_FRAMES = "control_frames"
    DATA_FRAMES = "data_frames"
    STATE_REQUEST = "state_request"

    @property
    def on_data_port(self) -> bool:
        return self in (Attack.DATA_FRAMES, Attack.STATE_REQUEST)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt.

    ``rejected``: the target closed the connection (or refused the join)
    within :data:`CLOSE_WITHIN` having sent nothing but its challenge.
    ``leak``: empty, or what the intruder got that it must not have (a
    welcome, reply bytes, a connection left open).
    """

    attack: Attack
    t: float
    target: str
    rejected: bool
    seconds: float
    leak: str = ""
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {"attack": self.attack.value, "t": round(self.t, 4), "target": self.target,
                "rejected": self.rejected, "seconds": round(self.seconds, 4), "leak": self.leak,
                "detail": self.detail}


@dataclass
class IntruderTally:
    """Every attempt of a run."""

    attempts: list[Attempt] = field(default_factory=list)

    def add(self, a: Attempt) -> None:
        self.attempts.append(a)

    @property
    def leaks(self) -> list[Attempt]:
        return [a for a in self.attempts if a.leak]

    def by_attack(self) -> dict[str, dict[str, Any]]:
        """Per attack: attempts, rejections, leaks, median and slowest time to rejection."""
        out: dict[str, dict[str, Any]] = {}
        for kind in Attack:
            xs = [a for a in self.attempts if a.attack == kind]
            secs = sorted(a.seconds for a in xs if a.rejected)
            out[kind.value] = {
                "attempts": len(xs), "rejected": sum(1 for a in xs if a.rejected),
                "leaks": sum(1 for a in xs if a.leak),
                "median_s": secs[len(secs) // 2] if secs else None, "max_s": secs[-1] if secs else None,
            }
        return out


def attack(kind: Attack, target: tuple[str, int], secret: bytes, seed: int) -> tuple[bool, str, str]:
    """Make one attempt (blocking); returns ``(rejected, leak, detail)``.

    ``target`` is the master's control address for the join and control
    attacks, a peer's data port for the data-port ones. ``secret`` is used
    only to stand in for the legitimate peer whose handshake ``replay``
    records, and to pick a wrong secret that differs from it.
    """
    rng = random.Random(seed)
    if kind in (Attack.JOIN_NO_SECRET, Attack.JOIN_WRONG_SECRET):
        wrong = None if kind == Attack.JOIN_NO_SECRET else _wrong_secret(secret, rng)
        return _join(target, wrong)
    if kind == Attack.FORGED_PROOF:
        return _forged_proof(target, rng)
    if kind == Attack.REPLAY:
        return _replay(target, secret, rng)
    if kind == Attack.CONTROL_FRAMES:
        return _control_frames(target, rng)
    if kind == Attack.DATA_FRAMES:
        return _data_frames(target, rng)
    return _state_request(target, rng)


def _wrong_secret(secret: bytes, rng: random.Random) -> bytes:
    while True:
        guess = rng.randbytes(len(secret) or 16)
        if guess != secret:
            return guess


# --------------------------------------------------------------- joins (real peers)


def _join_main(master: str, secret: bytes | None, conn: Any) -> None:
    """Child process: a real Communicator that tries to join ``master``."""
    os.environ.pop(auth.ENV_VAR, None)  # the run's secret must not leak in through the environment
    import pyccl

    comm = pyccl.Communicator(master, name="intruder", connections=1, secret=secret)
    t0 = time.monotonic()
    try:
        comm.connect(timeout=_JOIN_TIMEOUT)
    except pyccl.AuthenticationError as exc:
        conn.send(("refused", time.monotonic() - t0, str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, which counts it as not rejected
        if comm.peer_id:  # welcomed (a pending member), though nobody admitted it in time
            conn.send(("admitted", time.monotonic() - t0, f"welcomed as peer {comm.peer_id}, then {exc}"))
        else:
            conn.send(("error", time.monotonic() - t0, f"{type(exc).__name__}: {exc}"))
        comm.close()
    else:
        conn.send(("admitted", time.monotonic() - t0, f"admitted as peer {comm.peer_id}"))
        comm.close()
    finally:
        conn.close()


def _join(target: tuple[str, int], secret: bytes | None) -> tuple[bool, str, str]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_join_main, args=(f"{target[0]}:{target[1]}", secret, child),
                       name="pyccl-stress-intruder", daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(_JOIN_TIMEOUT + 30.0):
            return False, "", "the intruder's connect() neither failed nor succeeded"
        outcome, seconds, message = parent.recv()
    except EOFError:
        return False, "", f"the intruder process died (exit code {proc.exitcode})"
    finally:
        proc.join(5.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(5.0)
        parent.close()
    if outcome == "admitted":
        return False, message, message
    return outcome == "refused", "", f"{outcome} after {seconds:.3f} s: {message}"


# --------------------------------------------------------------- raw control connections


def _connect(target: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(target, timeout=5.0)
    sock.settimeout(CLOSE_WITHIN)
    return sock


def _hello(nonce: bytes, rng: random.Random) -> bytes:
    return wire.encode(P.Hello(peer_group=0, data_host="127.0.0.1", data_port=rng.randrange(20000, 60000),
                               name="intruder", nonce=nonce).to_wire())


def _until_closed(sock: socket.socket, allowed: tuple[type, ...] = ()) -> tuple[bool, str]:
    """Read control frames until the master closes; frames of ``allowed`` types
    are expected, anything else (a welcome, an epoch) is a leak."""
    while True:
        try:
            frame = P.parse_master_frame(wire.recv_frame(sock))
        except (ConnectionError, EOFError, wire.FrameError):
            return True, ""
        except TimeoutError:
            return False, f"the master left the connection open for {CLOSE_WITHIN:g} s"
        if not isinstance(frame, allowed):
            return False, f"the master answered with '{frame.TYPE}'"


def _forged_proof(target: tuple[str, int], rng: random.Random) -> tuple[bool, str, str]:
    with _connect(target) as sock:
        sock.sendall(_hello(auth.new_nonce(), rng))
        first = P.parse_master_frame(wire.recv_frame(sock))
        if not isinstance(first, P.Challenge):
            return False, f"the master answered hello with '{first.TYPE}', not a challenge", ""
        sock.sendall(wire.encode(P.Auth(rng.randbytes(auth.PROOF_BYTES)).to_wire()))
        ok, leak = _until_closed(sock, (P.Error,))
        return ok, leak, "random proof"


def _replay(target: tuple[str, int], secret: bytes, rng: random.Random) -> tuple[bool, str, str]:
    nonce = auth.new_nonce()
    with _connect(target) as sock:  # the recorded session: hello, challenge
        sock.sendall(_hello(nonce, rng))
        first = P.parse_master_frame(wire.recv_frame(sock))
    if not isinstance(first, P.Challenge):
        return False, f"the master answered hello with '{first.TYPE}', not a challenge", ""
    recorded = P.Auth(auth.peer_proof(secret, nonce, first.nonce))  # what the member answered then
    with _connect(target) as sock:  # the replay
        sock.sendall(_hello(nonce, rng))
        second = P.parse_master_frame(wire.recv_frame(sock))
        if isinstance(second, P.Challenge) and second.nonce == first.nonce:
            return False, "the master repeated its challenge nonce", ""
        sock.sendall(wire.encode(recorded.to_wire()))
        ok, leak = _until_closed(sock, (P.Error, P.Challenge))
        return ok, leak, "recorded hello and auth of an earlier handshake"


def _control_frames(target: tuple[str, int], rng: random.Random) -> tuple[bool, str, str]:
    frames: list[P.PeerFrame] = [
        P.Vote(round=rng.randrange(1, 1000)),
        P.Done(tag=rng.randrange(64), seq=rng.randrange(1, 1000), epoch=rng.randrange(1, 50)),
        P.HEARTBEAT,
    ]
    first = rng.choice(frames)
    with _connect(target) as sock:
        try:
            sock.sendall(b"".join(wire.encode(f.to_wire()) for f in [first, *frames]))
        except ConnectionError:
            return True, "", f"closed while sending, first frame '{first.TYPE}'"
        ok, leak = _until_closed(sock, (P.Error,))
        return ok, leak, f"first frame '{first.TYPE}' without a handshake"


# --------------------------------------------------------------- data ports


def _data_port_answer(sock: socket.socket, expect_nonce: int) -> tuple[bool, str]:
    """After the intruder's frames: the acceptor must close having sent only its nonce."""
    got = b""
    deadline = time.monotonic() + CLOSE_WITHIN
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                return False, f"the data port left the connection open for {CLOSE_WITHIN:g} s"
            chunk = b""
        if not chunk:
            extra = len(got) - expect_nonce
            return (extra <= 0), (f"the data port answered {extra} bytes" if extra > 0 else "")
        got += chunk


def _send_all(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except (ConnectionError, OSError):
        return False


def _data_frames(target: tuple[str, int], rng: random.Random) -> tuple[bool, str, str]:
    epoch = rng.randrange(1, 64)
    hello = _LINK_HELLO.pack(_LINK_MAGIC, 1, epoch, rng.randrange(1, 64), rng.randrange(1, 64), 0, 1)
    payload = struct.pack("<f", float("inf")) * 256 + struct.pack("<d", 1e300) * 128
    frames = b"".join(
        _DATA_HEADER.pack(_DATA_MAGIC, 1, rng.choice((1, 2)), 0, 0, epoch, rng.randrange(64), rng.randrange(4),
                          rng.randrange(1, 100), 1 << 20, 0, len(payload), rng.randrange(2, 8)) + payload
        for _ in range(4))
    with _connect(target) as sock:
        nonce_ok = _read_nonce(sock)
        sent = _send_all(sock, hello + rng.randbytes(auth.PROOF_BYTES) + frames)
        ok, leak = _data_port_answer(sock, 0)
    return ok, leak, f"link hello for epoch {epoch}, {'nonce' if nonce_ok else 'no nonce'}, " \
                     f"{'all frames sent' if sent else 'closed while sending'}"


def _state_request(target: tuple[str, int], rng: random.Random) -> tuple[bool, str, str]:
    epoch = rng.randrange(1, 64)
    req = _STATE_REQUEST.pack(_REQUEST_MAGIC, rng.randrange(4), rng.getrandbits(64), 0, 1 << 16, epoch)
    with _connect(target) as sock:
        nonce_ok = _read_nonce(sock)
        _send_all(sock, req + rng.randbytes(auth.PROOF_BYTES))
        ok, leak = _data_port_answer(sock, 0)
    return ok, leak, f"state request for epoch {epoch}, {'nonce' if nonce_ok else 'no nonce'}"


def _read_nonce(sock: socket.socket) -> bool:
    """A data port of a run with a secret speaks first: its 32-byte nonce."""
    got = b""
    sock.settimeout(5.0)
    while len(got) < auth.NONCE_BYTES:
        try:
            chunk = sock.recv(auth.NONCE_BYTES - len(got))
        except OSError:
            return False
        if not chunk:
            return False
        got += chunk
    return True
