"""Op verdicts on the master: ``done`` reports in, ``op_ok`` out (pure).

Every collective of every member passes here, so this is the master's hot
path and is kept flat: the fields of a ``done`` map are checked with plain
type and range tests (a map that fails them goes through the full parser,
which names the bad field), the reports of an op are one set per
``(tag, seq)``, and a complete op yields one :class:`Verdict`: the ``op_ok``
frame and the connections of the members, a tuple computed once per epoch.
The I/O layer encodes the frame once and writes it to each connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from pyccl import protocol as P
from pyccl.master.model import Group, Peer
from pyccl.wire import MAX_INT, MAX_TAG, FrameError

__all__ = ["Verdict", "done_fields", "record_done", "member_conns"]


class Verdict(NamedTuple):
    """Every member reported op (epoch, tag, seq) done: send ``frame`` to each of ``conn_ids``."""

    frame: P.OpOk
    conn_ids: tuple[int, ...]


def done_fields(frame: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """``(epoch, tag, seq)`` of a decoded ``done`` map whose fields are valid
    (the limits of :class:`pyccl.protocol.Done`), else None."""
    epoch, tag, seq = frame.get("epoch"), frame.get("tag"), frame.get("seq")
    if (type(epoch) is int and type(tag) is int and type(seq) is int
            and 0 <= epoch <= MAX_INT and 0 <= tag <= MAX_TAG and 0 <= seq <= MAX_INT):
        return epoch, tag, seq
    return None


def record_done(peer: Peer, epoch: int, tag: int, seq: int, max_open: int) -> Verdict | None:
    """Record a member's ``done``; the verdict once every member reported the op.

    A report for an older epoch, or while the epoch drains, is stale: the op
    has failed already. Raises FrameError (the sender is expelled) for a
    newer epoch, a duplicate report, or more than ``max_open`` undecided ops.
    """
    group = peer.group
    assert group is not None
    if epoch != group.epoch:
        if epoch > group.epoch:
            raise FrameError(f"'done' for epoch {epoch}, newer than the current epoch {group.epoch}")
        return None  # stale: that epoch's undecided ops already failed
    if group.drain is not None:
        return None  # the drain failed every undecided op of this epoch
    key = (tag, seq)
    reported = group.ops.get(key)
    if reported is None:
        if len(group.ops) >= max_open:
            raise FrameError(f"more than {max_open} undecided ops in epoch {epoch}")
        reported = group.ops[key] = set()
    elif peer.peer_id in reported:
        raise FrameError(f"duplicate 'done' for epoch {epoch} tag {tag} seq {seq}")
    reported.add(peer.peer_id)
    if len(reported) < len(group.members):
        return None
    del group.ops[key]
    return Verdict(P.OpOk(epoch, tag, seq), member_conns(group))


def member_conns(group: Group) -> tuple[int, ...]:
    """The members' connections in ring order. Members only change with the
    epoch (a death mid-epoch starts a drain, which ends the epoch), so the
    tuple is built once per epoch (and member count, to be safe)."""
    key = (group.epoch, len(group.members))
    cached = group.fanout
    if cached is None or cached[0] != key:
        cached = group.fanout = (key, tuple(m.conn_id for m in group.members))
    return cached[1]
