"""The exceptions pyccl raises. ``CCLError`` is the base of all of them.

Each error carries what a program needs to decide what to do as fields
(never parse the message: it is for people), and chains its cause
(``raise ... from exc``) where one exists.
"""

from __future__ import annotations

import enum


class DrainKind(enum.Enum):
    """Why the master ended an epoch (the ``kind`` of its ``drain`` frame)."""

    PEER = "peer"  # a member died, was expelled, or its links failed
    LEAVE = "leave"  # a member left gracefully (close())
    ADMIT = "admit"  # waiting peers were admitted
    TOPOLOGY = "topology"  # optimize_topology() reordered the ring
    MISMATCH = "mismatch"  # members called a collective with different arguments
    PROTOCOL = "protocol"  # a member's data plane saw a malformed frame

    @classmethod
    def parse(cls, value: str) -> DrainKind:
        """The kind named ``value``; unknown names (a newer master) count as PEER."""
        try:
            return cls(value)
        except ValueError:
            return cls.PEER


class LostCause(enum.Enum):
    """Why a peer is no longer part of its group."""

    MASTER_UNREACHABLE = "master_unreachable"  # connection to the master failed or went silent
    EXPELLED = "expelled"  # the master closed this peer's session (an ``error`` frame)
    CLOSED = "closed"  # close() was called on this peer


class CCLError(RuntimeError):
    """Base class of every pyccl error."""


class PeerFailure(CCLError):
    """The operation was aborted because the group's membership changed.

    ``Communicator.world_size`` already reflects the new membership when this
    is raised, and the caller's input buffer is unchanged, so the call can be
    retried as it is.

    Attributes:
        epoch: the epoch the op ran in (0 if unknown).
        lost_peers: ids of the peers of that epoch that are not in the new one.
        kind: why the epoch ended.
        op: the collective that was aborted (``"all_reduce"``, ...).
        reason: the master's (or the data plane's) account of what happened.
    """

    def __init__(self, message: str, *, epoch: int = 0, lost_peers: tuple[int, ...] = (),
                 kind: DrainKind = DrainKind.PEER, op: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.epoch = epoch
        self.lost_peers = lost_peers
        self.kind = kind
        self.op = op
        self.reason = reason or message


class GroupLost(CCLError):
    """This peer is no longer part of its group: create a new Communicator.

    Attributes:
        cause: why (:class:`LostCause`).
        reason: the details (the master's address and what happened).
    """

    def __init__(self, message: str, *, cause: LostCause, reason: str = "") -> None:
        super().__init__(message)
        self.cause = cause
        self.reason = reason or message


class AuthenticationError(CCLError):
    """The run secret check failed between this peer and the master: the
    secret differs, one side has none, or the master could not prove it.

    Attributes:
        master: the master's ``host:port``.
    """

    def __init__(self, message: str, *, master: str = "") -> None:
        super().__init__(message)
        self.master = master


class Timeout(CCLError):
    """An operation did not finish within its deadline.

    Attributes:
        seconds: the deadline that passed (0.0 if unknown).
    """

    def __init__(self, message: str, *, seconds: float = 0.0) -> None:
        super().__init__(message)
        self.seconds = seconds


class ProtocolError(CCLError):
    """A peer or the master sent something that breaks the protocol."""


class MismatchError(CCLError, ValueError):
    """Peers called the same collective with different sizes, dtypes or ops.

    Attributes:
        op: the collective (empty if unknown).
    """

    def __init__(self, message: str, *, op: str = "") -> None:
        super().__init__(message)
        self.op = op
