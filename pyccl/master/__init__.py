"""The pyccl master (control plane): admission, epochs, heartbeats, op outcomes.

:class:`Master` is the server users start; :mod:`pyccl.master.state` is the
pure state machine it drives (importable without uvloop or sockets).
"""

from __future__ import annotations

from pyccl.master.server import DEFAULT_PORT, Master
from pyccl.master.state import (
    Action,
    Close,
    GroupInfo,
    GroupPhase,
    MasterState,
    PeerPhase,
    RoundDecision,
    Send,
)

__all__ = [
    "DEFAULT_PORT",
    "Master",
    "MasterState",
    "PeerPhase",
    "GroupPhase",
    "RoundDecision",
    "Send",
    "Close",
    "Action",
    "GroupInfo",
]
