"""The exceptions pyccl raises. ``CCLError`` is the base of all of them."""

from __future__ import annotations


class CCLError(RuntimeError):
    """Base class of every pyccl error."""


class PeerFailure(CCLError):
    """The operation was aborted because the group's membership changed.

    ``Communicator.world_size`` already reflects the new membership when this
    is raised, and the caller's input buffer is unchanged, so the call can be
    retried as it is.
    """


class Timeout(CCLError):
    """An operation did not finish within its deadline."""


class ProtocolError(CCLError):
    """A peer or the master sent something that breaks the protocol."""


class MismatchError(CCLError, ValueError):
    """Peers called the same collective with different sizes, dtypes or ops."""
