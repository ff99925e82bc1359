"""Which transport this peer's ring links may use, and which host it runs on.

Ring neighbours on one host move their bytes through shared memory instead
of loopback TCP (see ``csrc/net/shm_stream.h``). A peer tells the master its
host id in its hello; the master passes every member's id on in each
``epoch`` frame, and a peer whose next ring neighbour has its own id asks
that neighbour for a shared-memory link. ``PYCCL_TRANSPORT=tcp`` (or
``Communicator(transport="tcp")``) keeps every link on TCP: the peer then
sends no host id, so nobody asks it for shared memory either.
"""

from __future__ import annotations

import hashlib
import os

TRANSPORTS = ("auto", "tcp")


def resolve_transport(transport: str | None) -> str:
    """The transport setting: the argument, else ``PYCCL_TRANSPORT``, else ``auto``."""
    value = transport if transport is not None else os.environ.get("PYCCL_TRANSPORT", "") or "auto"
    if value not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)} (from the argument or "
                         f"PYCCL_TRANSPORT), got {value!r}")
    return value


def host_id() -> str:
    """An id shared by exactly the processes that can hand each other shared
    memory: one kernel (its boot id) and one network namespace (the memfd of
    a ring travels over an abstract Unix socket, which is per namespace).
    Empty where Linux does not tell (the peer then uses TCP)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/net")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}/{ns.st_dev}:{ns.st_ino}".encode()).hexdigest()[:32]
