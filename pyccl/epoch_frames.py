"""Epoch frames: ``epoch`` (the whole ring) and ``epoch_delta`` (the change
from the previous epoch). Re-exported by :mod:`pyccl.protocol`.

An ``epoch`` frame carries the whole ring (about 17 bytes per member, plus
its host id): at 10,000 members every membership change wrote about 1.7 GB
in all, and at about 60,000 members the frame would pass the 1 MiB frame
limit. A member that holds the previous epoch (every member except the
joiners) gets an ``epoch_delta`` instead: the ids that left and the members
that came in with their ring positions. It expands into exactly the
``epoch`` frame the master would have sent (:meth:`EpochDelta.expand`),
so nothing past the control connection knows deltas exist.

Pure: :func:`make_delta` on the master, :meth:`EpochDelta.expand` on the
peer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from pyccl.frame_fields import (
    MAX_FENCE_ENTRIES,
    MAX_HOST_ID_LEN,
    MAX_HOST_LEN,
    MAX_KIND_LEN,
    MAX_MEMBERS,
    MAX_REASON_LEN,
    MAX_REGION_LEN,
    NONCE_BYTES,
    Frame,
    Member,
    blob,
    host_ids,
    members,
    regions,
    term,
)
from pyccl.wire import FrameError, clip, get_int, get_list, get_pairs, get_str, is_int

__all__ = ["Added", "Epoch", "EpochDelta", "make_delta"]


@dataclass(frozen=True, slots=True)
class Epoch(Frame):
    """A new membership epoch: the ring, the fence, the joiners' round position."""

    TYPE: ClassVar[str] = "epoch"
    epoch: int
    members: tuple[Member, ...]
    fence: tuple[tuple[int, int], ...]
    next_round: int
    kind: str
    reason: str
    salt: bytes | None = None  # a run with a secret: the epoch key's salt (see pyccl.auth)
    hosts: tuple[str, ...] | None = None  # members' host ids, in ring order (absent: none gave one)
    regions: tuple[str, ...] | None = None  # per member ("": unknown); issue 13, two-level all-reduce
    term: int = 0  # failover: the term of the master that committed the epoch

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Epoch:
        ring = members(m, "members", "member")
        if not ring:
            raise FrameError("'epoch' field 'members' must be a non-empty list")
        return cls(get_int(m, "epoch"), ring, tuple(get_pairs(m, "fence", MAX_FENCE_ENTRIES)),
                   get_int(m, "next_round"), get_str(m, "kind", MAX_KIND_LEN),
                   get_str(m, "reason", MAX_REASON_LEN, optional=True),
                   blob(m, "salt", NONCE_BYTES) if m.get("salt") is not None else None,
                   host_ids(m, len(ring)),
                   regions(m, len(ring)) if m.get("regions") is not None else None, term(m))


class Added(NamedTuple):
    """A member new in the epoch: its ring position, entry and host id ("": none)."""

    position: int
    peer_id: int
    host: str
    port: int
    host_id: str


def _added(m: Mapping[str, Any]) -> tuple[Added, ...]:
    out = []
    for e in get_list(m, "added", MAX_MEMBERS):
        if not (isinstance(e, (list, tuple)) and len(e) == 5 and is_int(e[0], 0, MAX_MEMBERS) and is_int(e[1], 1)
                and isinstance(e[2], str) and len(e[2]) <= MAX_HOST_LEN and is_int(e[3], 1, 65535)
                and isinstance(e[4], str) and len(e[4]) <= MAX_HOST_ID_LEN):
            raise FrameError(f"'epoch_delta' added entry {clip(e, 60)} is not [position, peer_id, host, port, host_id]")
        out.append(Added(*e))
    if any(b.position <= a.position for a, b in zip(out, out[1:])):
        raise FrameError("'epoch_delta' added entries must be in increasing ring position")
    return tuple(out)


def _labels(m: Mapping[str, Any]) -> tuple[str, ...] | None:
    if m.get("regions") is None:
        return None
    v = get_list(m, "regions", MAX_MEMBERS)
    if not all(isinstance(r, str) and len(r) <= MAX_REGION_LEN for r in v):
        raise FrameError(f"'epoch_delta' field 'regions' must list strings of at most {MAX_REGION_LEN} characters")
    return tuple(v)


@dataclass(frozen=True, slots=True)
class EpochDelta(Frame):
    """Epoch ``epoch`` as the change from epoch ``base``: the ring is
    ``base``'s without the ids in ``removed``, with ``added`` inserted in
    increasing ring position. ``regions`` (labels may change for everyone)
    is whole; every other field is the ``epoch`` frame's."""

    TYPE: ClassVar[str] = "epoch_delta"
    epoch: int
    base: int
    removed: tuple[int, ...]
    added: tuple[Added, ...]
    fence: tuple[tuple[int, int], ...]
    next_round: int
    kind: str
    reason: str
    salt: bytes | None = None
    regions: tuple[str, ...] | None = None
    term: int = 0

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> EpochDelta:
        removed = get_list(m, "removed", MAX_MEMBERS)
        if not all(is_int(x, 1) for x in removed):
            raise FrameError("'epoch_delta' field 'removed' must be a list of peer ids")
        return cls(get_int(m, "epoch"), get_int(m, "base"), tuple(removed), _added(m),
                   tuple(get_pairs(m, "fence", MAX_FENCE_ENTRIES)), get_int(m, "next_round"),
                   get_str(m, "kind", MAX_KIND_LEN), get_str(m, "reason", MAX_REASON_LEN, optional=True),
                   blob(m, "salt", NONCE_BYTES) if m.get("salt") is not None else None, _labels(m), term(m))

    def expand(self, prev: Epoch | None) -> Epoch:
        """The ``epoch`` frame (a :class:`pyccl.protocol.Epoch`) this delta
        stands for, given ``prev``, the epoch ``base`` as this peer holds it;
        FrameError if it does not fit."""

        if prev is None or prev.epoch != self.base or self.epoch <= self.base:
            have = "no epoch" if prev is None else f"epoch {prev.epoch}"
            raise FrameError(f"'epoch_delta' for epoch {self.epoch} applies to epoch {self.base}, this peer has {have}")
        hosts = prev.hosts or ("",) * len(prev.members)
        gone = set(self.removed)
        ring = [(m, h) for m, h in zip(prev.members, hosts) if m.peer_id not in gone]
        if len(ring) != len(prev.members) - len(gone):
            raise FrameError("'epoch_delta' removes peers that are not in its base epoch")
        for a in self.added:
            if a.position > len(ring):
                raise FrameError(f"'epoch_delta' inserts at ring position {a.position} of {len(ring)}")
            ring.insert(a.position, (Member(a.peer_id, a.host, a.port), a.host_id))
        if not ring or (self.regions is not None and len(self.regions) != len(ring)):
            raise FrameError("'epoch_delta' leaves an empty ring, or its regions do not match the ring")
        new_hosts = tuple(h for _, h in ring)
        return Epoch(self.epoch, tuple(m for m, _ in ring), self.fence, self.next_round, self.kind, self.reason,
                     self.salt, new_hosts if any(new_hosts) else None, self.regions, self.term)


def make_delta(prev: Epoch, new: Epoch) -> EpochDelta | None:
    """``new`` (an Epoch) as a delta from ``prev`` (the group's previous
    Epoch), or None where the whole frame is as small or the delta cannot
    say it (the members who stay changed order, address or host)."""
    prev_hosts = prev.hosts or ("",) * len(prev.members)
    new_hosts = new.hosts or ("",) * len(new.members)
    before = {m.peer_id: (m, h) for m, h in zip(prev.members, prev_hosts)}
    after = {m.peer_id for m in new.members}
    stay_new = [(m, h) for m, h in zip(new.members, new_hosts) if m.peer_id in before]
    stay_old = [(m, h) for m, h in zip(prev.members, prev_hosts) if m.peer_id in after]
    if stay_new != stay_old:
        return None
    removed = tuple(m.peer_id for m in prev.members if m.peer_id not in after)
    added = tuple(Added(i, m.peer_id, m.host, m.port, h)
                  for i, (m, h) in enumerate(zip(new.members, new_hosts)) if m.peer_id not in before)
    if 2 * (len(removed) + len(added)) >= len(new.members):
        return None
    return EpochDelta(new.epoch, prev.epoch, removed, added, new.fence, new.next_round, new.kind, new.reason,
                      new.salt, new.regions, new.term)
