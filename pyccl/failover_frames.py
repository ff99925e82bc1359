"""Control frames of master failover (docs/architecture.md, "Master failover"):
what a member holds when it re-registers (``Resume``, inside ``hello``), and
the probe / standing exchange between a standby and the active master.
Re-exported by :mod:`pyccl.protocol`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pyccl.frame_fields import (
    MAX_HOST_LEN,
    MAX_RESUME_MEMBERS,
    MAX_RESUME_PAIRS,
    NONCE_BYTES,
    PROOF_BYTES,
    Frame,
    blob,
    term,
)
from pyccl.wire import MAX_UINT64, FrameError, get_bool, get_int, get_list, get_pairs, get_str, is_int

# ------------------------------------------------------------ failover (issue 12)
# A member that lost its master re-registers with a restarted or standby one:
# its hello carries ``resume``, the state it holds (docs/architecture.md,
# "Master failover"). Masters number their terms; ``welcome`` and ``epoch``
# carry the term, a peer never goes back to a lower one, and a master that
# meets a higher term steps down.

@dataclass(frozen=True, slots=True)
class Resume(Frame):
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
            get_int(m, "state_hash", 0, MAX_UINT64), term(m),
        )


@dataclass(frozen=True, slots=True)
class Probe(Frame):
    """Master to master (first and only frame of a connection): is the
    receiver alive, active, and in which term? ``active``/``term``/``address``
    describe the prober; an active prober with a higher term makes the
    receiver step down and watch ``address``. ``silence_ms``: how long a
    passive prober has gone without an active answer, so the receiver knows
    how long the prober cannot take over (its lease). ``proof`` (a run with
    a secret): HMAC of the secret over these fields and ``nonce``."""

    TYPE: ClassVar[str] = "probe"
    term: int
    active: bool
    address: str
    nonce: bytes
    proof: bytes | None = None
    silence_ms: int = 0

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Probe:
        return cls(get_int(m, "term"), get_bool(m, "active"), get_str(m, "address", MAX_HOST_LEN + 6),
                   blob(m, "nonce", NONCE_BYTES), blob(m, "proof", PROOF_BYTES) if m.get("proof") is not None
                   else None, get_int(m, "silence_ms") if m.get("silence_ms") is not None else 0)


@dataclass(frozen=True, slots=True)
class Standing(Frame):
    """Answer to ``probe``: the receiver's term and whether it serves peers."""

    TYPE: ClassVar[str] = "standing"
    term: int
    active: bool

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> Standing:
        return cls(get_int(m, "term"), get_bool(m, "active"))
