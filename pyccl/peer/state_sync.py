"""``Communicator.sync_shared_state``: the collective that makes every
member's shared state identical (the protocol is in docs/architecture.md,
"Shared state"; the planner is pyccl/master/sync.py, the transfer
pyccl/peer/shared_state.py). A mixin of the Communicator, like
:class:`~pyccl.peer.failover.Failover`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pyccl import protocol as P
from pyccl.errors import CCLError
from pyccl.peer import state as S
from pyccl.peer.reconnect import combined_hash
from pyccl.peer.shared_state import STRATEGIES, SharedState, SyncInfo, content_hash, fetch_planned

__all__ = ["SharedStateSync"]


class SharedStateSync:
    """The shared-state sync of the Communicator."""

    # Provided by the Communicator.
    _cv: threading.Condition
    _state: S.PeerState
    _dp: Any
    _control: Any
    _in_sync: bool
    _sync_frames: dict[type, P.MasterFrame]
    _epoch_key: tuple[int, bytes]

    def _check_connected(self) -> None: ...
    def _send(self, frame: P.PeerFrame, session: int | None = None) -> None: ...

    def sync_shared_state(self, state: SharedState, strategy: str = "enforce_popular") -> SyncInfo:
        """Make this peer's copy of ``state`` identical to the group's popular copy.

        A collective: every member calls it at the same point. Each member
        reports its revision and per-key hashes; the master picks the content
        held by the most peers at the highest revision; members that are
        behind or differ fetch exactly the keys that differ, from every
        holder at once, and verify each by hash before this returns. On
        success ``state.revision`` is the group's revision. If the transfer
        cannot complete (every holder failed) this raises ``CCLError`` and
        the revision is left unchanged.

        Strategies: ``enforce_popular`` (default: send and receive),
        ``receive_only`` (never counted as a holder), ``send_only`` (never
        overwritten).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        if not isinstance(state, SharedState):
            raise ValueError("sync_shared_state takes a pyccl.SharedState")
        self._check_connected()
        t0 = time.perf_counter()
        keys = state.describe()
        hashes = [content_hash(k.buffer) for k in keys]
        with self._cv:
            err = self._state.usable_error()
            if err is not None:
                raise err
            if self._in_sync:
                raise CCLError("sync_shared_state is already running on this Communicator")
            self._cv.wait_for(lambda: self._state.quiet() and self._state.can_vote())
            err = self._state.usable_error()
            if err is not None:
                raise err
            self._in_sync = True
            self._sync_frames.clear()
            session = self._state.sync_begin()
        result: P.MasterFrame | None = None
        try:
            # Publish before asking: a fetcher may call the moment the plan is out.
            self._dp.state_publish([(k.buffer.ptr, k.nbytes, h) for k, h in zip(keys, hashes)])
            self._send(P.Sync(state.revision, strategy, tuple(
                P.StateKey(k.name, k.dtype, k.shape, k.nbytes, h) for k, h in zip(keys, hashes))), session)
            first = self._await_sync_frame((P.SyncPlan, P.SyncResult))
            if isinstance(first, P.SyncResult):
                raise CCLError(f"shared-state sync refused: {first.reason or '?'}")
            assert isinstance(first, P.SyncPlan)
            # A holder silent for a heartbeat timeout is given up (the timeout
            # restarts with every byte, so a slow but live holder is kept).
            ok, reason, rx = fetch_planned(first, keys, self._control.peer_id, timeout=self._control.heartbeat_timeout,
                                           credential=self._epoch_key)
            with self._cv:
                self._state.sync_fetched(first.sync, ok)
            self._send(P.SyncDone(first.sync, ok, P.clip_reason(reason)), session)
            result = self._await_sync_frame((P.SyncResult,))
            for index, h in first.fetch:
                hashes[index] = h
        finally:
            tx = self._dp.state_unpublish()
            with self._cv:
                self._in_sync = False
                if isinstance(result, P.SyncResult):
                    self._state.sync_result(result, combined_hash(hashes))
                self._state.sync_end()
        assert isinstance(result, P.SyncResult)
        if not result.ok:
            raise CCLError(f"shared-state sync failed: {result.reason or reason}")
        state.revision = result.revision
        return SyncInfo(state.revision, int(tx), int(rx), time.perf_counter() - t0)

    def _await_sync_frame(self, types: tuple[type, ...]) -> P.MasterFrame:
        with self._cv:
            self._cv.wait_for(lambda: any(t in self._sync_frames for t in types) or self._state.stopped()
                              or self._state.sync_cut_off())
            for t in types:
                if t in self._sync_frames:
                    return self._sync_frames.pop(t)
            if self._state.sync_cut_off():
                raise self._state.sync_failure()
            err = self._state.usable_error()
            raise err if err is not None else CCLError("the shared-state sync was interrupted")
