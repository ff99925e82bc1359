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
from dataclasses import dataclass
from typing import Any, ClassVar

from pyccl.epoch_frames import Added as Added
from pyccl.epoch_frames import Epoch as Epoch
from pyccl.epoch_frames import EpochDelta as EpochDelta
from pyccl.epoch_frames import make_delta as make_delta
from pyccl.failover_frames import Probe as Probe
from pyccl.failover_frames import Resume as Resume
from pyccl.failover_frames import Standing as Standing
from pyccl.frame_fields import (
    ERROR_KINDS as ERROR_KINDS,
)
from pyccl.frame_fields import (
    FAILURE_KINDS as FAILURE_KINDS,
)
from pyccl.frame_fields import (
    MAX_DIMS as MAX_DIMS,
)
from pyccl.frame_fields import (
    MAX_DTYPE_LEN as MAX_DTYPE_LEN,
)
from pyccl.frame_fields import (
    MAX_FENCE_ENTRIES as MAX_FENCE_ENTRIES,
)
from pyccl.frame_fields import (
    MAX_HOST_ID_LEN as MAX_HOST_ID_LEN,
)
from pyccl.frame_fields import (
    MAX_HOST_LEN as MAX_HOST_LEN,
)
from pyccl.frame_fields import (
    MAX_KEY_NAME_LEN as MAX_KEY_NAME_LEN,
)
from pyccl.frame_fields import (
    MAX_KIND_LEN as MAX_KIND_LEN,
)
from pyccl.frame_fields import (
    MAX_LINK_REPORTS as MAX_LINK_REPORTS,
)
from pyccl.frame_fields import (
    MAX_MEMBERS as MAX_MEMBERS,
)
from pyccl.frame_fields import (
    MAX_NAME_LEN as MAX_NAME_LEN,
)
from pyccl.frame_fields import (
    MAX_NEXT_SEQ_ENTRIES as MAX_NEXT_SEQ_ENTRIES,
)
from pyccl.frame_fields import (
    MAX_PEER_GROUP as MAX_PEER_GROUP,
)
from pyccl.frame_fields import (
    MAX_REASON_LEN as MAX_REASON_LEN,
)
from pyccl.frame_fields import (
    MAX_REGION_LEN as MAX_REGION_LEN,
)
from pyccl.frame_fields import (
    MAX_RESUME_MEMBERS as MAX_RESUME_MEMBERS,
)
from pyccl.frame_fields import (
    MAX_RESUME_PAIRS as MAX_RESUME_PAIRS,
)
from pyccl.frame_fields import (
    MAX_STATE_KEYS as MAX_STATE_KEYS,
)
from pyccl.frame_fields import (
    NONCE_BYTES as NONCE_BYTES,
)
from pyccl.frame_fields import (
    PROOF_BYTES as PROOF_BYTES,
)
from pyccl.frame_fields import (
    PROTOCOL_VERSION as PROTOCOL_VERSION,
)
from pyccl.frame_fields import (
    STRATEGIES as STRATEGIES,
)
from pyccl.frame_fields import (
    Frame as Frame,
)
from pyccl.frame_fields import (
    LinkReport as LinkReport,
)
from pyccl.frame_fields import (
    Member as Member,
)
from pyccl.frame_fields import (
    StateKey as StateKey,
)
from pyccl.frame_fields import (
    blob as _blob,
)
from pyccl.frame_fields import (
    clip_reason as clip_reason,
)
from pyccl.frame_fields import (
    links as _links,
)
from pyccl.frame_fields import (
    members as _members,
)
from pyccl.frame_fields import (
    parse_keys as parse_keys,
)
from pyccl.frame_fields import (
    term as _term,
)
from pyccl.wire import (
    MAX_TAG,
    MAX_UINT64,
    FrameError,
    clip,
    get_bool,
    get_choice,
    get_float,
    get_int,
    get_pairs,
    get_str,
)

# ------------------------------------------------------------ peer -> master


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """First frame of a peer: which group it joins and where its data port is."""

    TYPE: ClassVar[str] = "hello"
    peer_group: int
    data_host: str
    data_port: int
    name: str = ""
    beat: bool = False  # ask for the master's heartbeats (frozen-master detection)
    order: int | None = None  # ring-order key (torch: the rank)
    nonce: bytes | None = None  # the peer's challenge to the master (see pyccl.auth)
    host_id: str = ""  # same non-empty id: same host, ring links may use shared memory
    region: str | None = None  # where the peer runs (Communicator(region=...)); issue 13
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
            host_id=get_str(m, "host_id", MAX_HOST_ID_LEN, optional=True),
            region=get_str(m, "region", MAX_REGION_LEN) if m.get("region") is not None else None,
            resume=Resume.parse(m["resume"]) if m.get("resume") is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Auth(Frame):
    """The peer's proof that it holds the run secret (answer to ``challenge``)."""

    TYPE: ClassVar[str] = "auth"
    proof: bytes

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Auth:
        return cls(_blob(m, "proof", PROOF_BYTES))


@dataclass(frozen=True, slots=True)
class Heartbeat(Frame):
    """Liveness, both ways."""

    TYPE: ClassVar[str] = "heartbeat"

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Heartbeat:
        return HEARTBEAT


HEARTBEAT = Heartbeat()


@dataclass(frozen=True, slots=True)
class Bye(Frame):
    """The peer leaves the group gracefully."""

    TYPE: ClassVar[str] = "bye"

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Bye:
        return cls()


@dataclass(frozen=True, slots=True)
class Vote(Frame):
    """``update_topology()``: the member's vote in round ``round``;
    ``optimize_topology()`` adds ``links``, what it measured."""

    TYPE: ClassVar[str] = "vote"
    round: int
    links: tuple[LinkReport, ...] | None = None
    relink: bool | None = None  # with links: start a new epoch even if the order stays (new pool sizes)

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Vote:
        return cls(get_int(m, "round"), _links(m) if m.get("links") is not None else None,
                   get_bool(m, "relink") if m.get("relink") is not None else None)


@dataclass(frozen=True, slots=True)
class Done(Frame):
    """The member's data plane finished op (epoch, tag, seq) without error."""

    TYPE: ClassVar[str] = "done"
    epoch: int
    tag: int
    seq: int

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Done:
        return cls(get_int(m, "epoch"), get_int(m, "tag", 0, MAX_TAG), get_int(m, "seq"))


@dataclass(frozen=True, slots=True)
class Failed(Frame):
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
class Drained(Frame):
    """Answer to ``drain``: per tag, how many ops the member began in the epoch."""

    TYPE: ClassVar[str] = "drained"
    epoch: int
    next_seq: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Drained:
        return cls(get_int(m, "epoch"), tuple(get_pairs(m, "next_seq", MAX_NEXT_SEQ_ENTRIES)))


@dataclass(frozen=True, slots=True)
class Sync(Frame):
    """``sync_shared_state``: the member's revision, strategy and per-key hashes."""

    TYPE: ClassVar[str] = "sync"
    revision: int
    strategy: str
    keys: tuple[StateKey, ...]

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Sync:
        return cls(get_int(m, "revision"), get_choice(m, "strategy", STRATEGIES), parse_keys(m))


@dataclass(frozen=True, slots=True)
class SyncDone(Frame):
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
class Challenge(Frame):
    """A master with a secret answers ``hello`` with its nonce and its proof."""

    TYPE: ClassVar[str] = "challenge"
    nonce: bytes
    proof: bytes

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Challenge:
        return cls(_blob(m, "nonce", NONCE_BYTES), _blob(m, "proof", PROOF_BYTES))


@dataclass(frozen=True, slots=True)
class Welcome(Frame):
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
class Drain(Frame):
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
class OpOk(Frame):
    """Every member reported op (epoch, tag, seq) done: commit it."""

    TYPE: ClassVar[str] = "op_ok"
    epoch: int
    tag: int
    seq: int

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> OpOk:
        return cls(get_int(m, "epoch"), get_int(m, "tag", 0, MAX_TAG), get_int(m, "seq"))


@dataclass(frozen=True, slots=True)
class RoundDone(Frame):
    """Round ``round`` is over; ``changed``: it admitted peers."""

    TYPE: ClassVar[str] = "round_done"
    round: int
    changed: bool

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> RoundDone:
        return cls(get_int(m, "round"), get_bool(m, "changed"))


@dataclass(frozen=True, slots=True)
class Error(Frame):
    """The master closes this peer's session, saying why."""

    TYPE: ClassVar[str] = "error"
    reason: str
    kind: str = "protocol"  # one of ERROR_KINDS

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Error:
        kind = get_choice(m, "kind", ERROR_KINDS) if m.get("kind") is not None else "protocol"
        return cls(get_str(m, "reason", MAX_REASON_LEN, optional=True) or "no reason given", kind)


@dataclass(frozen=True, slots=True)
class SyncPlan(Frame):
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
class SyncResult(Frame):
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


# ------------------------------------------------------------ frame unions

PeerFrame = Hello | Auth | Heartbeat | Bye | Vote | Done | Failed | Drained | Sync | SyncDone | Probe
MasterFrame = (Challenge | Welcome | Heartbeat | Epoch | EpochDelta | Drain | OpOk | RoundDone | Error | SyncPlan
               | SyncResult | Standing)

PEER_FRAMES: dict[str, Any] = {c.TYPE: c for c in (Hello, Auth, Heartbeat, Bye, Vote, Done, Failed, Drained, Sync,
                                                     SyncDone, Probe)}
MASTER_FRAMES: dict[str, Any] = {c.TYPE: c for c in (Challenge, Welcome, Heartbeat, Epoch, EpochDelta, Drain, OpOk,
                                                       RoundDone, Error, SyncPlan, SyncResult, Standing)}


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


