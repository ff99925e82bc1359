"""The peer side: the public :class:`Communicator`, its protocol state
(:mod:`pyccl.peer.state`, pure), the master connection
(:mod:`pyccl.peer.control`), the collective plumbing (:mod:`pyccl.peer.ops`)
and shared state (:mod:`pyccl.peer.shared_state`)."""

from __future__ import annotations

from pyccl.peer.communicator import Communicator
from pyccl.peer.ops import AsyncHandle, ReduceInfo
from pyccl.peer.shared_state import SharedState, SyncInfo

__all__ = ["Communicator", "ReduceInfo", "AsyncHandle", "SharedState", "SyncInfo"]
