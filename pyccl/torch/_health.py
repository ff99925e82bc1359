"""Whether a pyccl process group is still whole, and the errors it raises.

A torch process group has a fixed membership: the ranks it formed with. It
is *whole* while its Communicator's epoch has exactly those members and the
master connection is alive. Once a member is lost (SIGKILL, hang, leave),
the master is gone, or an op timed out, the group is *broken*: the op that
found out fails with a :class:`~pyccl.torch._work.BackendError` naming
pyccl, the op, the group and the cause, and every later call raises at
once with the same cause. There is no retry inside a torch group: destroy
it and re-initialise.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pyccl.errors import CCLError, MismatchError, PeerFailure
from pyccl.peer import Communicator
from pyccl.torch._work import BackendError, PendingOp

log = logging.getLogger("pyccl.torch")


class GroupHealth:
    """Health and error translation of one process group.

    Args:
        name, rank, size: the group's name and this rank's place in it.
        global_ranks: global rank of each group rank (for messages).
        master_host: global rank whose process runs the master (None: external).
        master_address: the master's ``host:port``.
    """

    def __init__(self, name: str, rank: int, size: int, global_ranks: list[int], master_host: int | None,
                 master_address: str) -> None:
        self.name, self.rank, self.size = name, rank, size
        self.global_ranks = global_ranks
        self.master_host = master_host
        self.master_address = master_address
        self.comm: Communicator | None = None
        self.peers: tuple[int, ...] = ()  # peer ids of the formed group, by rank
        self._epoch_ok = -1  # last epoch seen with the formed membership
        self._lock = threading.Lock()
        self.broken: str | None = None
        self.lost_at_break: list[int] = []
        self.timed_out: tuple[PendingOp, str] | None = None  # the op that timed out, and its error
        self.closed = False

    def formed(self, comm: Communicator) -> None:
        """The group formed: its current members are its membership for good."""
        self.comm = comm
        self.peers = tuple(comm.peers)
        self._epoch_ok = comm.epoch

    def head(self) -> str:
        return f"process group '{self.name}' (rank {self.rank} of {self.size})"

    # --------------------------------------------------------------- state

    def lost_ranks(self) -> list[int]:
        comm = self.comm
        if comm is None:
            return []
        now = set(comm.peers)
        return [r for r, pid in enumerate(self.peers) if pid not in now]

    def describe_lost(self) -> str:
        lost = self.lost_ranks()
        comm = self.comm
        master_gone = comm.lost if comm is not None else None
        if lost:
            who = ", ".join(f"rank {r}" + (f" (global rank {g})" if g != r else "")
                            for r, g in ((r, self.global_ranks[r]) for r in lost))
            return f"lost peer {who}: it died or stopped responding"
        if master_gone:
            if self.master_host is None:
                return f"lost the pyccl master at {self.master_address} ({master_gone})"
            return (f"lost peer global rank {self.master_host}, which hosted the pyccl master at "
                    f"{self.master_address}: it died or stopped responding ({master_gone})")
        return ""

    def check(self) -> str | None:
        """None while the group is whole; else why not."""
        if self.broken:
            return self.broken
        if self.closed:
            return f"pyccl: process group '{self.name}' was shut down"
        comm = self.comm
        if comm is not None and comm.epoch == self._epoch_ok and comm.lost is None:
            return None  # fast path: no epoch change since the last check
        why = self.describe_lost()
        if why:
            self.mark_broken(why)
            return self.broken
        if comm is not None:
            self._epoch_ok = comm.epoch  # a new epoch with the same members (e.g. after a mismatch)
        return None

    def mark_broken(self, why: str) -> None:
        self.break_with(f"pyccl: {self.head()} {why}")

    def break_with(self, message: str) -> bool:
        """Mark the group unusable with ``message``; False if it already was."""
        lost = self.lost_ranks()
        with self._lock:
            if self.broken is not None:
                return False
            self.lost_at_break = lost
            self.broken = message
        log.error("%s", message)
        return True

    def ensure_usable(self, name: str) -> None:
        if self.closed:
            raise BackendError(f"pyccl: {name} on process group '{self.name}' after it was shut down")
        why = self.check()
        if why:
            raise BackendError(f"{why}; {name} cannot run: destroy the process group and re-initialise")

    def timeout_message(self, op: PendingOp, timeout: float, group_timeout: float) -> str:
        which = "the call's" if timeout != group_timeout else "the process group's"
        return (f"pyccl: {op.name} on process group '{self.name}' (rank {self.rank} of {self.size}) "
                f"Timed out after {timeout:g} s ({which} timeout): a rank did not call it or is stuck; "
                "the group is aborted: destroy it and re-initialise")

    # -------------------------------------------------------------- errors

    def check_result(self, info: Any) -> BaseException | None:
        """A core op that succeeded in an epoch with other members still breaks the group."""
        peers = getattr(info, "peers", None)
        if peers is not None and tuple(peers) and tuple(peers) != self.peers:
            self.mark_broken(self.describe_lost() or "the group's membership changed")
            return BackendError(str(self.broken))
        return None

    def translate(self, op: PendingOp, exc: BaseException) -> BaseException:
        """The torch-facing error for an op that failed with ``exc``."""
        head = f"pyccl: {op.name} failed on {self.head()}"
        timed_out = self.timed_out
        if timed_out is not None:
            late, message = timed_out
            return _chain(BackendError(message if late is op else f"{head}: the group was aborted: {message}"), exc)
        if isinstance(exc, MismatchError):
            return _chain(BackendError(f"{head}: the ranks called it with different arguments: {exc}"), exc)
        if isinstance(exc, CCLError):
            # PeerFailure: the new membership is already known (core guarantee).
            why = self.describe_lost()
            if why:
                self.mark_broken(why)
                detail = exc.reason if isinstance(exc, PeerFailure) else str(exc)
                return _chain(BackendError(f"{head}: {why}" + (f" [core: {detail}]" if detail not in why else "")),
                              exc)
            if self.closed:
                return _chain(BackendError(f"{head}: the process group was shut down"), exc)
            return _chain(BackendError(f"{head}: {exc}"), exc)
        return _chain(BackendError(f"{head}: {type(exc).__name__}: {exc}"), exc)


def _chain(err: BackendError, cause: BaseException) -> BackendError:
    err.__cause__ = cause
    return err
