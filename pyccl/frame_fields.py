"""The fields of control frames: limits, the small value types frames carry
(members, state keys, link reports) and the checked readers of composite
fields, each raising :class:`~pyccl.wire.FrameError` naming the frame and
the field. The frames themselves are in :mod:`pyccl.protocol`, which
re-exports every public name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar, NamedTuple

from pyccl.wire import (
    MAX_INT,
    MAX_UINT64,
    FrameError,
    clip,
    get_int,
    get_list,
    is_int,
)

PROTOCOL_VERSION = 1
MAX_PEER_GROUP = (1 << 31) - 1
MAX_HOST_LEN = 255
MAX_HOST_ID_LEN = 64  # hello "host_id": which machine (and network namespace) a peer runs on
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
MAX_REGION_LEN = 64
MAX_LINK_REPORTS = 4096


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


class LinkReport(NamedTuple):
    """One measured link in a ``vote`` of ``optimize_topology()``: from the voter to ``peer_id``."""

    peer_id: int
    rtt: float  # seconds, smallest echo
    bandwidth: float  # bytes/s over the voter's connections to it


class Member(NamedTuple):
    """A ring member in an ``epoch`` frame: who, and where its data port is."""

    peer_id: int
    host: str
    port: int


def blob(m: Mapping[str, Any], field: str, size: int) -> bytes:
    """A binary field of exactly ``size`` bytes."""
    v = m.get(field)
    if not isinstance(v, bytes) or len(v) != size:
        raise FrameError(f"'{m.get('type')}' field '{field}' must be {size} bytes")
    return v


def members(m: Mapping[str, Any], field: str, what: str) -> tuple[Member, ...]:
    """A list of ``[peer_id, host, port]`` entries."""
    out = []
    for e in get_list(m, field, MAX_MEMBERS):
        if not (isinstance(e, (list, tuple)) and len(e) == 3 and is_int(e[0], 1) and isinstance(e[1], str)
                and len(e[1]) <= MAX_HOST_LEN and is_int(e[2], 1, 65535)):
            raise FrameError(f"'{m.get('type')}' {what} entry {clip(e, 60)} is not [peer_id, host, port]")
        out.append(Member(e[0], e[1], e[2]))
    return tuple(out)


def host_ids(m: Mapping[str, Any], n: int) -> tuple[str, ...] | None:
    """The optional ``hosts`` list of an ``epoch`` frame: one host id per member."""
    if m.get("hosts") is None:
        return None
    ids = get_list(m, "hosts", MAX_MEMBERS)
    if len(ids) != n or not all(isinstance(h, str) and len(h) <= MAX_HOST_ID_LEN for h in ids):
        raise FrameError(f"'{m.get('type')}' field 'hosts' must list one host id (str <= {MAX_HOST_ID_LEN}) "
                         "per member")
    return tuple(ids)


def links(m: Mapping[str, Any]) -> tuple[LinkReport, ...]:
    """A list of ``[peer_id, rtt, bandwidth]`` entries (finite, non-negative numbers)."""
    out = []
    for e in get_list(m, "links", MAX_LINK_REPORTS):
        ok = isinstance(e, (list, tuple)) and len(e) == 3 and is_int(e[0], 1)
        nums = e[1:] if ok else []
        if not ok or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1e15
                             for x in nums):
            raise FrameError(f"'vote' links entry {clip(e, 60)} is not [peer_id, rtt, bandwidth]")
        out.append(LinkReport(e[0], float(e[1]), float(e[2])))
    return tuple(out)


def regions(m: Mapping[str, Any], n: int) -> tuple[str, ...]:
    """One region label per member (strings of at most MAX_REGION_LEN)."""
    v = get_list(m, "regions", MAX_MEMBERS)
    if len(v) != n or not all(isinstance(r, str) and len(r) <= MAX_REGION_LEN for r in v):
        raise FrameError(f"'epoch' field 'regions' must list one string of at most {MAX_REGION_LEN} "
                         "characters per member")
    return tuple(v)


MAX_RESUME_PAIRS = 4096
MAX_RESUME_MEMBERS = 1 << 16


def term(m: Mapping[str, Any]) -> int:
    return get_int(m, "term") if m.get("term") is not None else 0


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


class Frame:
    """Base of every frame class: ``TYPE`` is the wire name."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None:
                continue  # optional fields are left out
            out[f.name] = plain(v)
        return out


def plain(v: Any) -> Any:
    """Tuples (of NamedTuples) become lists, as msgpack sends them; a nested
    frame (``Hello.resume``) becomes its map."""
    if isinstance(v, Frame):
        return v.to_wire()
    if isinstance(v, tuple):
        return [plain(x) for x in v]
    return v
