"""gloo's monitored barrier over the point-to-point side channel.

The contract (``ProcessGroup.monitored_barrier`` as gloo implements it):
every rank but 0 sends rank 0 a token and waits for one back; rank 0 waits
at most ``timeout`` for the tokens, in rank order, and raises naming the
first rank that did not send one (``wait_all_ranks``: every such rank), so
a hang somewhere in the job turns into an error that says who is missing.
Only when every token arrived does rank 0 answer them all, so the barrier
is passed by every rank or by none.

The error texts are gloo's, so code (and torch's tests) that match them
work unchanged. The tokens travel with their own message kind and two fixed
tags (arrive, release): a rank that skipped a barrier leaves no sequence
number behind, and a token that arrives after rank 0 gave up waits in the
side channel's queue of unexpected messages.
"""

from __future__ import annotations

import threading
import time

import torch
from pyccl.torch._p2p import KIND_MONITOR, Endpoint
from pyccl.torch._work import BackendError

ARRIVE = 0
RELEASE = 1


class _Transfer:
    """One token transfer: an event set when it is over, with its error."""

    def __init__(self) -> None:
        self.buf = torch.zeros(1, dtype=torch.uint8)
        self.event = threading.Event()
        self.error: BaseException | None = None

    def recv_done(self, src: int, error: BaseException | None) -> None:
        self.error = error
        self.event.set()

    def send_done(self, error: BaseException | None) -> None:
        self.error = error
        self.event.set()

    def wait(self, seconds: float) -> bool:
        """True if it completed without error within ``seconds``."""
        return self.event.wait(max(0.0, seconds)) and self.error is None


def monitored_barrier(ep: Endpoint, rank: int, size: int, timeout: float, group_timeout: float,
                      wait_all_ranks: bool) -> None:
    """Run the barrier on ``ep``; raise :class:`BackendError` as gloo would."""
    if size == 1:
        return
    if rank != 0:
        _follower(ep, rank, group_timeout)
        return
    start = time.monotonic()
    deadline = start + timeout
    ms = int(round(timeout * 1000))
    tokens = {r: _Transfer() for r in range(1, size)}
    for r, tr in tokens.items():
        ep.post_recv(tr.buf, r, ARRIVE, KIND_MONITOR, tr.recv_done)
    try:
        responded: list[int] = []
        missing: list[int] = []
        for r, tr in tokens.items():
            left = deadline - time.monotonic()
            if not wait_all_ranks and left <= 0 and not tr.event.is_set():
                got = ", ".join(map(str, responded)) or "none"
                raise BackendError(f"pyccl: [Rank 0]: Rank 0 timed out in monitoredBarrier after {ms} ms "
                                   f"(ranks that responded: {got})")
            if tr.wait(left):
                responded.append(r)
            elif wait_all_ranks:
                missing.append(r)
            else:
                raise BackendError(f"pyccl: [Rank 0]: Rank {r} failed to pass monitoredBarrier in {ms} ms"
                                   + _cause(tr))
        if missing:
            raise BackendError(f"pyccl: [Rank 0]: Ranks {', '.join(map(str, missing))} failed to pass "
                               f"monitoredBarrier in {ms} ms")
    finally:
        ep.cancel_recvs(KIND_MONITOR, ARRIVE, "pyccl: monitored_barrier gave up waiting")
    # Everyone arrived: release them all.
    releases = {r: _Transfer() for r in range(1, size)}
    for r, tr in releases.items():
        ep.send(tr.buf, r, RELEASE, KIND_MONITOR, tr.send_done)
    for r, tr in releases.items():
        if not tr.wait(max(deadline - time.monotonic(), 1.0)):
            raise BackendError(f"pyccl: [Rank 0]: Rank {r} failed to pass monitoredBarrier in {ms} ms "
                               "(it did not take its release)" + _cause(tr))


def _follower(ep: Endpoint, rank: int, group_timeout: float) -> None:
    sent, back = _Transfer(), _Transfer()
    ep.post_recv(back.buf, 0, RELEASE, KIND_MONITOR, back.recv_done)
    ep.send(sent.buf, 0, ARRIVE, KIND_MONITOR, sent.send_done)
    deadline = time.monotonic() + group_timeout
    for tr in (sent, back):
        if not tr.wait(deadline - time.monotonic()):
            ep.cancel_recvs(KIND_MONITOR, RELEASE, "pyccl: monitored_barrier gave up waiting")
            raise BackendError(f"pyccl: Rank {rank} successfully reached monitoredBarrier, but received errors "
                               "while waiting for send/recv from rank 0. Please check rank 0 logs for faulty rank."
                               + _cause(tr))


def _cause(tr: _Transfer) -> str:
    if tr.error is not None:
        return f" ({tr.error})"
    return "" if tr.event.is_set() else " (timed out)"
