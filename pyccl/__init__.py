"""pyccl: fault-tolerant collective communication for training over the internet."""

from __future__ import annotations

from typing import Any

from pyccl.errors import AuthenticationError, CCLError, GroupLost, MismatchError, PeerFailure, ProtocolError, Timeout

__all__ = [
    "CCLError",
    "PeerFailure",
    "GroupLost",
    "AuthenticationError",
    "Timeout",
    "ProtocolError",
    "MismatchError",
    "Master",
    "Communicator",
    "ReduceOp",
    "ReduceInfo",
    "SharedState",
    "SyncInfo",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import pyccl` cheap and let the master run without the
    # compiled core (and the core without uvloop).
    if name == "Master":
        from pyccl.master import Master

        return Master
    if name in ("Communicator", "ReduceInfo", "AsyncHandle", "SharedState", "SyncInfo"):
        from pyccl import peer

        return getattr(peer, name)
    if name == "ReduceOp":
        from pyccl.types import ReduceOp

        return ReduceOp
    if name == "diloco":
        import importlib

        return importlib.import_module("pyccl.diloco")  # needs torch
    raise AttributeError(f"module 'pyccl' has no attribute {name!r}")
