"""The control protocol between peers and the master, one typed frame each.

Every control frame is a frozen dataclass with ``parse`` (from the decoded
msgpack map, every field checked against the limits below; a bad frame
raises :class:`~pyccl.wire.FrameError` naming the frame and the field) and
``to_wire`` (back to the map :func:`pyccl.wire.encode` sends). The master
(:mod:`pyccl.master.state`) and the peer (:mod:`pyccl.peer`) both use these
classes and dispatch on the class, never on the ``type`` string, which is
read in one place: :func:`parse_peer_frame` / :func:`parse_master_frame`.

Checks here are the ones a frame can fail on its own (types, ranges,
lengths, list shapes); checks against protocol state (an epoch newer than
the current one, a duplicate report) belong to the state machines.

The field tables in docs/architecture.md ("Control protocol") list exactly
the fields of :data:`PEER_FRAMES` and :data:`MASTER_FRAMES`;
tests/test_protocol.py checks that they match.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple

from pyccl.wire import (
    MAX_INT,
    MAX_TAG,
    MAX_UINT64,
    FrameError,
    clip,
    get_bool,
    get_choice,
    get_float,
    get_int,
    get_list,
    get_pairs,
    get_str,
    is_int,
)

PROTOCOL_VERSION = 1
MAX_PEER_GROUP = (1 << 31) - 1
MAX_HOST_LEN = 255
MAX_NAME_LEN = 128
MAX_REASON_LEN = 1024
MAX_KIND_LEN = 32
MAX_NEXT_SEQ_ENTRIES = 4096
MAX_FENCE_ENTRIES = 4096
MAX_MEMBERS = 1 << 20
FAILURE_KINDS = ("peer", "mismatch", "protocol")
ERROR_KINDS = ("protocol", "expelled", "auth", "standby")  # why the master closes a session
NONCE_BYTES = 32
PROOF_BYTES = 32
STRATEGIES = ("enforce_popular", "receive_only", "send_only")
MAX_STATE_KEYS = 1 << 16
MAX_KEY_NAME_LEN = 256
MAX_DTYPE_LEN = 16
MAX_DIMS = 32


def clip_reason(reason: str) -> str:
    """A reason string cut to what a frame may carry."""
    return reason if len(reason) <= MAX_REASON_LEN else reason[: MAX_REASON_LEN - 3] + "..."


class StateKey(NamedTuple):
    """One key of a peer's shared state as reported in its ``sync`` frame."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    hash: int


class Member(NamedTuple):
    """A ring member in an ``epoch`` frame: who, and where its data port is."""

    peer_id: int
    host: str
    port: int


class _Frame:
    """Base of every frame class: ``TYPE`` is the wire name."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None:
                continue  # optional fields are left out
            out[f.name] = _plain(v)
        return out


def _blob(m: Mapping[str, Any], field: str, size: int) -> bytes:
    """A binary field of exactly ``size`` bytes."""
    v = m.get(field)
    if not isinstance(v, bytes) or len(v) != size:
        raise FrameError(f"'{m.get('type')}' field '{field}' must be {size} bytes")
    return v


def _members(m: Mapping[str, Any], field: str, what: str) -> tuple[Member, ...]:
    """A list of ``[peer_id, host, port]`` entries."""
    out = []
    for e in get_list(m, field, MAX_MEMBERS):
        if not (isinstance(e, (list, tuple)) and len(e) == 3 and is_int(e[0], 1) and isinstance(e[1], str)
                and len(e[1]) <= MAX_HOST_LEN and is_int(e[2], 1, 65535)):
            raise FrameError(f"'{m.get('type')}' {what} entry {clip(e, 60)} is not [peer_id, host, port]")
        out.append(Member(e[0], e[1], e[2]))
    return tuple(out)


def _plain(v: Any) -> Any:
    """Tuples (of NamedTuples) become lists, as msgpack sends them; a nested
    frame (``Hello.resume``) becomes its map."""
    if isinstance(v, _Frame):
        return v.to_wire()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


# ------------------------------------------------------------ peer -> master


@dataclass(frozen=True, slots=True)
class Hello(_Frame):
    """First frame of a peer: which group it joins and where its data port is."""

    TYPE: ClassVar[str] = "hello"
    peer_group: int
    data_host: str
    data_port: int
    name: str = ""
    beat: bool = False  # ask for the master's heartbeats (frozen-master detection)
    order: int | None = None  # ring-order key (torch: the rank)
    nonce: bytes | None = None  # the peer's challenge to the master (see pyccl.auth)
    resume: Resume | None = None  # failover: what a member holds when it re-registers (see Resume)
    version: int = PROTOCOL_VERSION

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Hello:
        version = m.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise FrameError(f"'hello' protocol version {clip(version, 20)} unsupported "
                             f"(master speaks {PROTOCOL_VERSION})")
        host = get_str(m, "data_host", MAX_HOST_LEN)
        if not host:
            raise FrameError("'hello' field 'data_host' is empty")
        return cls(
            peer_group=get_int(m, "peer_group", 0, MAX_PEER_GROUP),
            data_host=host,
            data_port=get_int(m, "data_port", 1, 65535),
            name=get_str(m, "name", MAX_NAME_LEN, optional=True),
            beat=m.get("beat") is True,
            order=get_int(m, "order", 0, MAX_PEER_GROUP) if m.get("order") is not None else None,
            nonce=_blob(m, "nonce", NONCE_BYTES) if m.get("nonce") is not None else None,
            resume=Resume.parse(m["resume"]) if m.get("resume") is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Auth(_Frame):
    """The peer's proof that it holds the run secret (answer to ``challenge``)."""

    TYPE: ClassVar[str] = "auth"
    proof: bytes

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Auth:
        return cls(_blob(m, "proof", PROOF_BYTES))


@dataclass(frozen=True, slots=True)
class Heartbeat(_Frame):
    """Liveness, both ways."""

    TYPE: ClassVar[str] = "heartbeat"

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Heartbeat:
        return HEARTBEAT


HEARTBEAT = Heartbeat()


@dataclass(frozen=True, slots=True)
class Bye(_Frame):
    """The peer leaves the group gracefully."""

    TYPE: ClassVar[str] = "bye"

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Bye:
        return cls()


@dataclass(frozen=True, slots=True)
class Vote(_Frame):
    """``update_topology()``: the member's vote in round ``round``."""

    TYPE: ClassVar[str] = "vote"
    round: int

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Vote:
        return cls(get_int(m, "round"))


@dataclass(frozen=True, slots=True)
class Done(_Frame):
    """The member's data plane finished op (epoch, tag, seq) without error."""

    TYPE: ClassVar[str] = "done"
    epoch: int
    tag: int
    seq: int

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Done:
        return cls(get_int(m, "epoch"), get_int(m, "tag", 0, MAX_TAG), get_int(m, "seq"))


@dataclass(frozen=True, slots=True)
class Failed(_Frame):
    """The member's data plane failed op (epoch, tag, seq): ``kind`` is one of FAILURE_KINDS."""

    TYPE: ClassVar[str] = "failed"
    epoch: int
    tag: int
    seq: int
    kind: str
    reason: str

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Failed:
        return cls(get_int(m, "epoch"), get_int(m, "tag", 0, MAX_TAG), get_int(m, "seq"),
                   get_choice(m, "kind", FAILURE_KINDS), get_str(m, "reason", MAX_REASON_LEN))


@dataclass(frozen=True, slots=True)
class Drained(_Frame):
    """Answer to ``drain``: per tag, how many ops the member began in the epoch."""

    TYPE: ClassVar[str] = "drained"
    epoch: int
    next_seq: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Drained:
        return cls(get_int(m, "epoch"), tuple(get_pairs(m, "next_seq", MAX_NEXT_SEQ_ENTRIES)))


@dataclass(frozen=True, slots=True)
class Sync(_Frame):
    """``sync_shared_state``: the member's revision, strategy and per-key hashes."""

    TYPE: ClassVar[str] = "sync"
    revision: int
    strategy: str
    keys: tuple[StateKey, ...]

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Sync:
        return cls(get_int(m, "revision"), get_choice(m, "strategy", STRATEGIES), parse_keys(m))


@dataclass(frozen=True, slots=True)
class SyncDone(_Frame):
    """The member carried out its part of sync ``sync`` (or failed to)."""

    TYPE: ClassVar[str] = "sync_done"
    sync: int
    ok: bool
    reason: str = ""

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> SyncDone:
        return cls(get_int(m, "sync"), get_bool(m, "ok"), get_str(m, "reason", MAX_REASON_LEN))


# ------------------------------------------------------------ master -> peer


@dataclass(frozen=True, slots=True)
class Challenge(_Frame):
    """A master with a secret answers ``hello`` with its nonce and its proof."""

    TYPE: ClassVar[str] = "challenge"
    nonce: bytes
    proof: bytes

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Challenge:
        return cls(_blob(m, "nonce", NONCE_BYTES), _blob(m, "proof", PROOF_BYTES))


@dataclass(frozen=True, slots=True)
class Welcome(_Frame):
    """Answer to ``hello``: the peer's id and the liveness settings."""

    TYPE: ClassVar[str] = "welcome"
    peer_id: int
    heartbeat_interval: float
    heartbeat_timeout: float
    term: int = 0  # failover: the master's term (see Resume); 0 before it first committed an epoch

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Welcome:
        return cls(get_int(m, "peer_id", 1), get_float(m, "heartbeat_interval", 0.001, 3600.0),
                   get_float(m, "heartbeat_timeout", 0.001, 36000.0), _term(m))


@dataclass(frozen=True, slots=True)
class Epoch(_Frame):
    """A new membership epoch: the ring, the fence, the joiners' round position."""

    TYPE: ClassVar[str] = "epoch"
    epoch: int
    members: tuple[Member, ...]
    fence: tuple[tuple[int, int], ...]
    next_round: int
    kind: str
    reason: str
    salt: bytes | None = None  # a run with a secret: the epoch key's salt (see pyccl.auth)
    term: int = 0  # failover: the term of the master that committed the epoch

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Epoch:
        members = _members(m, "members", "member")
        if not members:
            raise FrameError("'epoch' field 'members' must be a non-empty list")
        return cls(get_int(m, "epoch"), members, tuple(get_pairs(m, "fence", MAX_FENCE_ENTRIES)),
                   get_int(m, "next_round"), get_str(m, "kind", MAX_KIND_LEN),
                   get_str(m, "reason", MAX_REASON_LEN, optional=True),
                   _blob(m, "salt", NONCE_BYTES) if m.get("salt") is not None else None, _term(m))


@dataclass(frozen=True, slots=True)
class Drain(_Frame):
    """Epoch ``epoch`` ends: fail its undecided ops and answer ``drained``."""

    TYPE: ClassVar[str] = "drain"
    epoch: int
    kind: str
    reason: str

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Drain:
        return cls(get_int(m, "epoch"), get_str(m, "kind", MAX_KIND_LEN),
                   get_str(m, "reason", MAX_REASON_LEN, optional=True))


@dataclass(frozen=True, slots=True)
class OpOk(_Frame):
    """Every member reported op (epoch, tag, seq) done: commit it."""

    TYPE: ClassVar[str] = "op_ok"
    epoch: int
    tag: int
    seq: int

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> OpOk:
        return cls(get_int(m, "epoch"), get_int(m, "tag", 0, MAX_TAG), get_int(m, "seq"))


@dataclass(frozen=True, slots=True)
class RoundDone(_Frame):
    """Round ``round`` is over; ``changed``: it admitted peers."""

    TYPE: ClassVar[str] = "round_done"
    round: int
    changed: bool

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> RoundDone:
        return cls(get_int(m, "round"), get_bool(m, "changed"))


@dataclass(frozen=True, slots=True)
class Error(_Frame):
    """The master closes this peer's session, saying why."""

    TYPE: ClassVar[str] = "error"
    reason: str
    kind: str = "protocol"  # one of ERROR_KINDS

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Error:
        kind = get_choice(m, "kind", ERROR_KINDS) if m.get("kind") is not None else "protocol"
        return cls(get_str(m, "reason", MAX_REASON_LEN, optional=True) or "no reason given", kind)


@dataclass(frozen=True, slots=True)
class SyncPlan(_Frame):
    """Sync ``sync``'s plan for this peer: the keys to fetch and who holds them."""

    TYPE: ClassVar[str] = "sync_plan"
    sync: int
    revision: int
    fetch: tuple[tuple[int, int], ...]  # (key index, expected hash)
    holders: tuple[Member, ...]

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> SyncPlan:
        return cls(get_int(m, "sync"), get_int(m, "revision"),
                   tuple(get_pairs(m, "fetch", MAX_STATE_KEYS, hi_first=MAX_STATE_KEYS, hi_second=MAX_UINT64)),
                   _members(m, "holders", "holder"))


@dataclass(frozen=True, slots=True)
class SyncResult(_Frame):
    """Sync ``sync`` ended for this peer: ``ok`` and the group's revision."""

    TYPE: ClassVar[str] = "sync_result"
    sync: int
    ok: bool
    revision: int
    reason: str = ""

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> SyncResult:
        return cls(get_int(m, "sync"), get_bool(m, "ok"), get_int(m, "revision"),
                   get_str(m, "reason", MAX_REASON_LEN, optional=True))


# ------------------------------------------------------------ failover (issue 12)
# A member that lost its master re-registers with a restarted or standby one:
# its hello carries ``resume``, the state it holds (docs/architecture.md,
# "Master failover"). Masters number their terms; ``welcome`` and ``epoch``
# carry the term, a peer never goes back to a lower one, and a master that
# meets a higher term steps down.

MAX_RESUME_PAIRS = 4096
MAX_RESUME_MEMBERS = 1 << 16


def _term(m: Mapping[str, Any]) -> int:
    return get_int(m, "term") if m.get("term") is not None else 0


@dataclass(frozen=True, slots=True)
class Resume(_Frame):
    """What a member holds, sent inside ``hello`` when it re-registers.

    ``members``: the peer ids of its epoch in ring order; ``draining``: it
    answered the drain of that epoch; ``next_seq``: ops begun per tag in it;
    ``undecided``: ``(tag, seq)`` it finished and awaits the verdict of;
    ``committed``: ``(tag, seq)`` of its most recent ``op_ok`` in the epoch;
    ``answered``: every round below it was answered for this peer;
    ``position``: the round its next vote would carry; ``sync``/``sync_ok``:
    the sync round whose result it awaits after finishing its own transfer
    (0: none) and how that transfer ended; ``last_sync``/``revision``/
    ``state_hash``: the last sync result it received, the group's revision
    it announced, and a hash of its copy then; ``term``: the highest master
    term it has seen.
    """

    TYPE: ClassVar[str] = "resume"
    peer_id: int
    epoch: int
    members: tuple[int, ...]
    draining: bool
    next_seq: tuple[tuple[int, int], ...]
    undecided: tuple[tuple[int, int], ...]
    committed: tuple[tuple[int, int], ...]
    answered: int
    position: int
    sync: int = 0
    sync_ok: bool = False
    last_sync: int = 0
    revision: int | None = None
    state_hash: int = 0
    term: int = 0

    @classmethod
    def parse(cls, m: Any) -> Resume:
        if not isinstance(m, Mapping) or m.get("type") != cls.TYPE:
            raise FrameError("'hello' field 'resume' must be a 'resume' map")
        members = get_list(m, "members", MAX_RESUME_MEMBERS)
        if not members or not all(is_int(x, 1) for x in members):
            raise FrameError("'resume' field 'members' must be a non-empty list of peer ids")
        return cls(
            get_int(m, "peer_id", 1), get_int(m, "epoch", 1), tuple(members), get_bool(m, "draining"),
            tuple(get_pairs(m, "next_seq", MAX_RESUME_PAIRS)), tuple(get_pairs(m, "undecided", MAX_RESUME_PAIRS)),
            tuple(get_pairs(m, "committed", MAX_RESUME_PAIRS)), get_int(m, "answered"), get_int(m, "position"),
            get_int(m, "sync"), get_bool(m, "sync_ok"), get_int(m, "last_sync"),
            get_int(m, "revision") if m.get("revision") is not None else None,
            get_int(m, "state_hash", 0, MAX_UINT64), _term(m),
        )


@dataclass(frozen=True, slots=True)
class Probe(_Frame):
    """Master to master (first and only frame of a connection): is the
    receiver alive, active, and in which term? ``active``/``term``/``address``
    describe the prober; an active prober with a higher term makes the
    receiver step down and watch ``address``. ``proof`` (a run with a
    secret): HMAC of the secret over these fields and ``nonce``."""

    TYPE: ClassVar[str] = "probe"
    term: int
    active: bool
    address: str
    nonce: bytes
    proof: bytes | None = None

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Probe:
        return cls(get_int(m, "term"), get_bool(m, "active"), get_str(m, "address", MAX_HOST_LEN + 6),
                   _blob(m, "nonce", NONCE_BYTES), _blob(m, "proof", PROOF_BYTES) if m.get("proof") is not None
                   else None)


@dataclass(frozen=True, slots=True)
class Standing(_Frame):
    """Answer to ``probe``: the receiver's term and whether it serves peers."""

    TYPE: ClassVar[str] = "standing"
    term: int
    active: bool

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Standing:
        return cls(get_int(m, "term"), get_bool(m, "active"))


# ------------------------------------------------------------ frame unions

PeerFrame = Hello | Auth | Heartbeat | Bye | Vote | Done | Failed | Drained | Sync | SyncDone | Probe
MasterFrame = (Challenge | Welcome | Heartbeat | Epoch | Drain | OpOk | RoundDone | Error | SyncPlan | SyncResult
               | Standing)

PEER_FRAMES: dict[str, Any] = {c.TYPE: c for c in (Hello, Auth, Heartbeat, Bye, Vote, Done, Failed, Drained, Sync,
                                                     SyncDone, Probe)}
MASTER_FRAMES: dict[str, Any] = {c.TYPE: c for c in (Challenge, Welcome, Heartbeat, Epoch, Drain, OpOk, RoundDone,
                                                       Error, SyncPlan, SyncResult, Standing)}


def parse_peer_frame(m: Mapping[str, Any]) -> PeerFrame:
    """A decoded map from a peer as its frame class, or FrameError."""
    cls = PEER_FRAMES.get(m.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise FrameError(f"unknown frame type {clip(m.get('type'), 40)}")
    frame: PeerFrame = cls.parse(m)
    return frame


def parse_master_frame(m: Mapping[str, Any]) -> MasterFrame:
    """A decoded map from the master as its frame class, or FrameError."""
    cls = MASTER_FRAMES.get(m.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise FrameError(f"unknown frame type {clip(m.get('type'), 40)} from the master")
    frame: MasterFrame = cls.parse(m)
    return frame


def parse_keys(m: Mapping[str, Any], field: str = "keys") -> tuple[StateKey, ...]:
    """The ``sync`` frame's key list, fully checked, or FrameError naming the entry.

    Each entry is ``[name (str <= 256), dtype (non-empty str <= 16), shape
    (list of <= 32 ints in [0, 2**63)), nbytes (int in [0, 2**63)), hash
    (int in [0, 2**64))]``; names strictly increasing (sorted by code point,
    no duplicates); at most 65536 entries.
    """
    raw = get_list(m, field, MAX_STATE_KEYS)
    keys: list[StateKey] = []
    prev: str | None = None
    for i, e in enumerate(raw):
        where = f"'sync' field '{field}' entry {i}"
        if not isinstance(e, (list, tuple)) or len(e) != 5:
            raise FrameError(f"{where} must be [name, dtype, shape, nbytes, hash], got {clip(e, 60)}")
        name, dtype, shape, nbytes, h = e
        if not isinstance(name, str) or len(name) > MAX_KEY_NAME_LEN:
            raise FrameError(f"{where}: name must be a string of at most {MAX_KEY_NAME_LEN} characters")
        if not isinstance(dtype, str) or not 0 < len(dtype) <= MAX_DTYPE_LEN:
            raise FrameError(f"{where}: dtype must be a non-empty string of at most {MAX_DTYPE_LEN} characters")
        if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
                or not all(is_int(d) for d in shape)):
            raise FrameError(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers")
        if not is_int(nbytes):
            raise FrameError(f"{where}: nbytes must be an integer in [0, {MAX_INT}]")
        if not is_int(h, 0, MAX_UINT64):
            raise FrameError(f"{where}: hash must be an integer in [0, 2**64)")
        if prev is not None and not name > prev:
            what = "duplicate key" if name == prev else "keys not sorted by name at key"
            raise FrameError(f"{where}: {what} {clip(name, 60)}")
        prev = name
        keys.append(StateKey(name, dtype, tuple(shape), nbytes, h))
    return tuple(keys)
